"""The training loop: `train(cfg, on_event) -> TrainResult`.

Resume is exact: the batch of optimizer step `s`, micro-step `m` is drawn from a generator seeded by
(seed, s, m), the LR is a pure function of the step, and the torch RNG state (dropout) is saved in each
checkpoint, so N straight steps and N/2 + resume + N/2 give the same losses on CPU.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygpt_cli import __version__, workspace
from tinygpt_cli.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    save_checkpoint,
    write_text_atomic,
)
from tinygpt_cli.config import RunConfig, TrainConfig, config_from_dict, config_to_dict, dump_yaml
from tinygpt_cli.data import Dataset, find_dataset, tokenize
from tinygpt_cli.errors import DataError, TrainingError
from tinygpt_cli.model import GPT

MAX_BAD_STEPS = 5  # consecutive non-finite steps before training stops


# ----------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TrainEvent:
    """What `train` reports. `kind`: info | start | step | eval | checkpoint | done."""

    kind: str
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    val_loss: float | None = None
    lr: float | None = None
    tokens: int = 0
    tokens_per_s: float | None = None
    mfu: float | None = None
    elapsed_s: float = 0.0
    message: str = ""
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    unigram_val_loss: float | None
    stopped: str  # "completed" | "interrupted" | "time_limit"
    skipped_steps: int = 0


# ----------------------------------------------------------------------------------------------- devices
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingError("--device cuda was asked for but no CUDA GPU is visible: use --device auto or cpu")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast compute dtype. auto: bf16 on CUDA GPUs that have it (else fp16), fp32 elsewhere.

    On CPU fp32 is the default: without native bf16 instructions (avx512_bf16/AMX) autocast to bf16 is
    slower than fp32 (measured on the 2-core AMD EPYC CI machine).
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise TrainingError("--dtype fp16 is not supported on CPU: use fp32 or bf16")
    return dtype


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------- data
def _batch_generator(seed: int, step: int, micro: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, step, micro, rank])


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `block_size + 1` tokens -> inputs x (B, T) and next-token targets y (B, T)."""
    starts = rng.integers(0, len(tokens) - block_size - 1, size=batch_size)
    window = np.stack([tokens[s : s + block_size + 1] for s in starts]).astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(window[:, :-1])
    y = torch.from_numpy(window[:, 1:])
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, sample: int = 20_000_000) -> float:
    """Cross-entropy (nats/token) of val under the train unigram distribution (add-one smoothed).

    The loss a model reaches by learning token frequencies alone: a trained model must beat it.
    """
    counts = np.bincount(np.asarray(train_tokens[:sample]), minlength=65536).astype(np.float64) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[np.asarray(val_tokens[:sample])].mean())


# ----------------------------------------------------------------------------------------------- schedule
def learning_rate(step: int, cfg: TrainConfig) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_steps = max(1, int(cfg.max_steps * cfg.decay_fraction))
        decay_start = cfg.max_steps - decay_steps
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on 2-D weights (matmuls, embeddings) only; biases and LayerNorms undecayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    extra: dict[str, Any] = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, **extra)


# ----------------------------------------------------------------------------------------------- throughput
def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12*L*T*C."""
    cfg = model.config
    non_embedding = model.num_params(non_embedding=True)
    head = cfg.vocab_size * cfg.n_embd  # the tied head is a real matmul even though it shares wte
    return 6.0 * (non_embedding + head) + 12.0 * cfg.n_layer * cfg.block_size * cfg.n_embd


_GPU_PEAK_BF16 = {  # dense tensor-core TFLOP/s (bf16/fp16) from the vendors' datasheets
    "H200": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12, "GH200": 989e12,
    "A100": 312e12, "A10G": 125e12, "A10": 125e12, "L40S": 362e12, "L4": 121e12,
    "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12, "T4": 65e12,
}


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s for MFU: the datasheet figure for known GPUs; on CPU a measured fp32 matmul rate."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in _GPU_PEAK_BF16.items():
            if key in name:
                return peak if dtype != torch.float32 else peak / 2  # tf32 runs at half the bf16 rate
        return None
    if device.type == "cpu":
        return measured_cpu_peak()
    return None


def measured_cpu_peak(size: int = 2048, repeats: int = 3) -> float:
    """Best fp32 FLOP/s of a large square matmul on this CPU with torch's current thread count."""
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout, resume) untouched
    a = torch.randn(size, size, generator=generator)
    b = torch.randn(size, size, generator=generator)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = 0.0
    for _ in range(repeats):
        began = time.perf_counter()
        torch.mm(a, b, out=out)
        best = max(best, 2 * size**3 / (time.perf_counter() - began))
    return best


# ----------------------------------------------------------------------------------------------- signals
class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its step, checkpoints and returns. A second signal aborts."""

    def __init__(self) -> None:
        self.reason = ""

    def __bool__(self) -> bool:
        return bool(self.reason)


@contextlib.contextmanager
def _stop_on_signals(flag: StopFlag) -> Iterator[None]:
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum: int, frame: Any) -> None:
        if flag:
            raise KeyboardInterrupt  # second signal: stop at once
        flag.reason = "interrupted"

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


# ----------------------------------------------------------------------------------------------- rng
def _rng_state() -> dict[str, Any]:
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": _jsonable(np.random.get_state()),
        "python": _jsonable(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def _restore_rng(state: dict[str, Any]) -> None:
    raw = np.frombuffer(base64.b64decode(state["torch"]), dtype=np.uint8).copy()
    torch.set_rng_state(torch.from_numpy(raw))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(
            [torch.from_numpy(np.frombuffer(base64.b64decode(s), dtype=np.uint8).copy()) for s in state["cuda"]]
        )


# ----------------------------------------------------------------------------------------------- run folder
def default_run_name(cfg: RunConfig, dataset: Dataset) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return workspace.safe_name(f"{cfg.size}-{dataset.name}-{stamp}")


class _Metrics:
    """Appends JSON lines to metrics.jsonl, flushed per line so a crash loses nothing logged."""

    def __init__(self, path: Path, resume_step: int | None) -> None:
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        self.handle = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise TrainingError(f"cannot write to {run_dir} ({exc.strerror}): choose a writable TINYGPT_HOME") from None


# ----------------------------------------------------------------------------------------------- main loop
def prepare_dataset(cfg: RunConfig, on_event: Callable[[TrainEvent], None]) -> Dataset:
    dataset = find_dataset(cfg.data.dataset or None)
    if dataset is None:
        on_event(TrainEvent("info", message="No tokenized data yet: tokenizing the embedded Shakespeare corpus first."))
        tokenize(None)
        dataset = find_dataset(None)
        assert dataset is not None
    return dataset


def train(
    cfg: RunConfig,
    *,
    run_name: str | None = None,
    resume: bool = False,
    on_event: Callable[[TrainEvent], None] | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """Train a GPT-2 as `cfg` says, writing `runs/<name>/`. Returns when max_steps is reached or on a stop.

    With `resume`, continues the run `run_name` (else the latest run) from its latest checkpoint.
    """
    emit = on_event or (lambda event: None)
    stop = stop if stop is not None else StopFlag()
    tc = cfg.train
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device)
    torch.manual_seed(tc.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    dataset = prepare_dataset(cfg, emit)
    train_tokens = dataset.split("train")
    val_tokens = dataset.split("val")
    block = cfg.model.block_size
    for split, tokens in (("train", train_tokens), ("val", val_tokens)):
        if len(tokens) <= block + 1:
            raise DataError(
                f"the {split} split of {dataset.name} has {len(tokens)} tokens, fewer than one context of "
                f"{block + 1}: lower model.block_size or tokenize more text"
            )

    runs_root = workspace.runs_dir()
    run_dir = runs_root / (run_name or default_run_name(cfg, dataset))
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if resume and checkpoint is None:
        raise TrainingError(f"{run_dir} has no checkpoint to resume from: start it without --resume")
    if not resume and run_dir.exists() and latest_checkpoint(run_dir) is not None:
        raise TrainingError(f"run {run_dir.name} already exists: pass --resume to continue it or pick another --name")
    _check_writable(run_dir)

    model = GPT(cfg.model)
    start_step = 0
    tokens_seen = 0
    best_val: float | None = None
    state: dict[str, Any] = {}
    if checkpoint is not None:
        loaded = load_checkpoint(checkpoint)
        if vars(loaded.model.config) != vars(cfg.model):
            raise TrainingError(f"the model shape of {run_dir.name} cannot change on resume: drop the model overrides")
        model.load_state_dict(loaded.model.state_dict())
        state = loaded.state
        start_step = int(state["step"])
        tokens_seen = int(state.get("tokens_seen", 0))
        best_val = state.get("best_val_loss")
    model.to(device)
    raw_model = model
    optimizer = make_optimizer(raw_model, tc, device)
    if checkpoint is not None:
        optimizer.load_state_dict(load_optimizer_state(checkpoint))
    compiled = _maybe_compile(model, tc.compile, device, emit)

    write_text_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    metrics = _Metrics(run_dir / "metrics.jsonl", start_step if checkpoint is not None else None)
    tokens_per_step = tc.batch_size * tc.grad_accum * block
    flops_token = flops_per_token(raw_model)
    peak = device_peak_flops(device, dtype)
    unigram = unigram_loss(train_tokens, val_tokens)
    eval_rng = np.random.default_rng([tc.seed, 2**31])
    eval_starts = [eval_rng.integers(0, len(val_tokens) - block - 1, size=tc.batch_size)
                   for _ in range(tc.eval_batches)]
    autocast = autocast_context(device, dtype)

    emit(TrainEvent("start", step=start_step, max_steps=tc.max_steps, tokens=tokens_seen, data={
        "run_dir": str(run_dir), "dataset": dataset.name, "device": str(device), "dtype": str(dtype).split(".")[-1],
        "parameters": raw_model.num_params(), "tokens_per_step": tokens_per_step,
        "train_tokens": len(train_tokens), "val_tokens": len(val_tokens),
        "unigram_val_loss": unigram, "resumed_from": str(checkpoint) if checkpoint else None,
        "compiled": compiled is not model,
    }))

    def evaluate() -> float:
        raw_model.eval()
        total = 0.0
        with torch.no_grad(), autocast:
            for starts in eval_starts:
                window = np.stack([val_tokens[s : s + block + 1] for s in starts]).astype(np.int64)
                x = torch.from_numpy(window[:, :-1]).to(device)
                y = torch.from_numpy(window[:, 1:]).to(device)
                _, loss = compiled(x, y)
                total += float(loss)
        raw_model.train()
        return total / len(eval_starts)

    def checkpoint_now(step: int, last_loss: float | None, val_loss: float | None) -> Path:
        return save_checkpoint(run_dir, step, raw_model, optimizer, {
            "tokens_seen": tokens_seen, "best_val_loss": best_val, "val_loss": val_loss, "train_loss": last_loss,
            "lr": learning_rate(max(0, step - 1), tc), "rng": _rng_state(),
            "data": {"dataset": dataset.name, "sampler": "random-windows(seed, step, micro)", "next_step": step},
            "run_config": config_to_dict(cfg), "elapsed_s": elapsed_total(),
            "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tinygpt_version": __version__,
        }, keep_last=tc.keep_last)

    started = time.perf_counter()
    elapsed_before = float(state.get("elapsed_s", 0.0))

    def elapsed_total() -> float:
        return elapsed_before + time.perf_counter() - started

    if checkpoint is not None:
        _restore_rng(state["rng"])  # last, so nothing between here and the first step draws from it
    raw_model.train()
    step = start_step
    last_loss: float | None = state.get("train_loss")
    last_val: float | None = state.get("val_loss")
    bad_in_a_row = 0
    skipped = 0
    window_began = time.perf_counter()
    window_tokens = 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    with _stop_on_signals(stop):
        try:
            while step < tc.max_steps and not stop:
                lr = learning_rate(step, tc)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                step_loss = torch.zeros((), device=device)
                for micro in range(tc.grad_accum):
                    x, y = get_batch(train_tokens, tc.batch_size, block, _batch_generator(tc.seed, step, micro), device)
                    with autocast:
                        _, loss = compiled(x, y)
                    (loss / tc.grad_accum).backward()
                    step_loss += loss.detach() / tc.grad_accum
                if tc.grad_clip > 0:
                    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tc.grad_clip)
                else:
                    grad_norm = torch.zeros((), device=device)
                finite = bool(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
                if finite:
                    optimizer.step()
                    bad_in_a_row = 0
                else:
                    skipped += 1
                    bad_in_a_row += 1
                optimizer.zero_grad(set_to_none=True)
                step += 1
                tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                if not finite:
                    emit(TrainEvent("info", step=step, message=f"step {step}: non-finite loss or gradient, skipped"))
                    if bad_in_a_row >= MAX_BAD_STEPS:
                        raise TrainingError(
                            f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient (diverged): "
                            f"lower train.lr and resume from the last good checkpoint with --resume"
                        )
                    continue
                loss_sum += step_loss
                loss_count += 1
                if step % tc.log_interval == 0 or step == tc.max_steps:
                    last_loss = float(loss_sum) / max(1, loss_count)
                    loss_sum.zero_()
                    loss_count = 0
                    now = time.perf_counter()
                    rate = window_tokens / max(1e-9, now - window_began)
                    window_began, window_tokens = now, 0
                    mfu = rate * flops_token / peak if peak else None
                    record = {"kind": "train", "step": step, "loss": last_loss, "lr": lr, "tokens": tokens_seen,
                              "tokens_per_s": rate, "mfu": mfu, "elapsed_s": elapsed_total()}
                    metrics.write(record)
                    emit(TrainEvent("step", step=step, max_steps=tc.max_steps, loss=last_loss, lr=lr,
                                    tokens=tokens_seen, tokens_per_s=rate, mfu=mfu, elapsed_s=elapsed_total()))
                if step % tc.eval_interval == 0 or step == tc.max_steps:
                    last_val = evaluate()
                    best_val = last_val if best_val is None else min(best_val, last_val)
                    metrics.write({"kind": "eval", "step": step, "val_loss": last_val, "tokens": tokens_seen,
                                   "elapsed_s": elapsed_total()})
                    emit(TrainEvent("eval", step=step, max_steps=tc.max_steps, val_loss=last_val,
                                    tokens=tokens_seen, elapsed_s=elapsed_total()))
                    path = checkpoint_now(step, last_loss, last_val)
                    emit(TrainEvent("checkpoint", step=step, max_steps=tc.max_steps, message=str(path)))
                    window_began = time.perf_counter()  # eval and save time is not training throughput
        except KeyboardInterrupt:
            metrics.close()
            raise
        if stop and step > start_step and latest_step(run_dir) != step:
            path = checkpoint_now(step, last_loss, last_val)
            emit(TrainEvent("checkpoint", step=step, max_steps=tc.max_steps, message=str(path)))
    metrics.close()
    seconds = time.perf_counter() - started
    trained_tokens = (step - start_step) * tokens_per_step
    result = TrainResult(
        run_dir=run_dir, steps=step, tokens=tokens_seen, seconds=seconds,
        tokens_per_s=trained_tokens / max(seconds, 1e-9), final_loss=last_loss, final_val_loss=last_val,
        best_val_loss=best_val, unigram_val_loss=unigram,
        stopped=stop.reason or "completed", skipped_steps=skipped,
    )
    emit(TrainEvent("done", step=step, max_steps=tc.max_steps, loss=last_loss, val_loss=last_val,
                    tokens=tokens_seen, elapsed_s=elapsed_total(), message=result.stopped))
    return result


def latest_step(run_dir: Path) -> int | None:
    checkpoint = latest_checkpoint(run_dir)
    return int(checkpoint.name.split("_")[1]) if checkpoint is not None else None


def _maybe_compile(model: torch.nn.Module, mode: str, device: torch.device,
                   emit: Callable[[TrainEvent], None]) -> torch.nn.Module:
    """torch.compile on CUDA by default; `on` elsewhere too. Falls back to eager with one line if it fails."""
    wanted = mode == "on" or (mode == "auto" and device.type == "cuda")
    if not wanted:
        return model
    if device.type == "mps":
        emit(TrainEvent("info", message="torch.compile is not supported on MPS: running eagerly."))
        return model
    try:
        return torch.compile(model)
    except Exception as exc:  # Triton missing, unsupported platform, ...
        emit(TrainEvent("info", message=f"torch.compile unavailable ({type(exc).__name__}): running eagerly."))
        return model


def run_config_of(run_dir: Path) -> RunConfig:
    """The resolved config a run was started with (its config.yaml)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise TrainingError(f"{run_dir} has no config.yaml: it is not a tinygpt run folder")
    return config_from_dict(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, origin=str(path))
