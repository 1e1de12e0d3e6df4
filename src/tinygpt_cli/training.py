"""The training loop: `train(cfg, on_event) -> TrainResult`.

Resume is exact: the batch of optimizer step `s`, micro-step `m` is drawn from a generator seeded by
(seed, s, m), the LR is a pure function of the step, and the torch RNG state (dropout) is saved in each
checkpoint, so N straight steps and N/2 + resume + N/2 give the same losses on CPU.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as _dt
import itertools
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygpt_cli import __version__, dist, workspace
from tinygpt_cli.checkpoint import (
    DamagedCheckpoint,
    device_name,
    device_present,
    find_run,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    no_checkpoint_message,
    read_state,
    remove_leftovers,
    save_checkpoint,
    step_folders,
    version_key,
)
from tinygpt_cli.config import (
    DTYPES,
    ModelConfig,
    RunConfig,
    TrainConfig,
    compile_wanted,
    config_from_dict,
    config_to_dict,
    dtype_choice,
    dtype_refusal,
    dump_yaml,
    flat_config,
    init_from_block_size,
    trains_compiled,
)
from tinygpt_cli.data import (
    Dataset,
    cuts_documents,
    find_dataset,
    remake_command,
    remake_source,
    token_window,
    tokenize,
    train_sha256,
    where_published,
)
from tinygpt_cli.errors import (
    DENIED,
    FULL,
    READ_ONLY,
    ConfigError,
    DataError,
    TinyGPTError,
    TrainingError,
    compile_failure,
    first_line,
    os_problem,
)
from tinygpt_cli.launch import Stopped
from tinygpt_cli.model import GPT, fp32_default, release_cpu_workspace
from tinygpt_cli.optim import apply_hyperparameters, make_optimizer, muon_schedule, set_learning_rate
from tinygpt_cli.plan import (
    GIB,
    checkpoint_bytes,
    checkpoints_kept,
    estimate_memory,
    gpu_spec,
    heavy_evaluation_note,
    loss_chunk_bytes,
    micro_batch_within,
    resolve_device_spec,
    too_little_data,
)
from tinygpt_cli.report import metrics_record, read_metrics, write_loss_plot, write_report
from tinygpt_cli.tokenizer import VOCAB_SIZE
from tinygpt_cli.trackers import Trackers
from tinygpt_cli.trackers import check_installed as check_trackers_installed
from tinygpt_cli.trackers import parse as parse_trackers
from tinygpt_cli.workspace import write_text_atomic

MAX_BAD_STEPS = 5  # consecutive non-finite steps before training stops


# ----------------------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class TrainEvent:
    """What `train` reports. `kind`: info | start | step | eval | task (train.eval_task's figures, in `data`) |
    checkpoint | done."""

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
    """What `train` did: the run's folder, steps and tokens in all, this call's time and rate, the last train
    loss, the last and best val loss (nats), the val loss of a unigram model (the baseline) and why it stopped."""

    run_dir: Path
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    final_loss: float | None
    final_val_loss: float | None
    best_val_loss: float | None
    unigram_val_loss: float | None
    stopped: str  # "completed" | "interrupted" | "time_limit" | "token_limit"
    skipped_steps: int = 0
    first_step: int = 0  # the step this call started from (a resume's checkpoint)
    max_steps: int = 0  # the run's train.max_steps
    best_step: int | None = None  # the step of the best val loss (its checkpoint is kept with train.keep_best)


# ----------------------------------------------------------------------------------------------- devices
def resolve_device(name: str | torch.device) -> torch.device:
    """`auto` (CUDA, else MPS, else CPU), `cpu`, `cuda`, `cuda:N` or `mps`, checked against what is there."""
    name = device_name(name, TrainingError)  # a torch.device too
    kind, _, index = name.partition(":")
    if name == "auto":
        return torch.device(next(kind for kind in ("cuda", "mps", "cpu") if device_present(kind)))
    if kind == "cuda" and not device_present("cuda"):
        raise TrainingError(f"--device {name} was asked for but no CUDA GPU is visible: use --device auto or cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise TrainingError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) are visible "
                            f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not device_present("mps"):
        raise TrainingError("--device mps was asked for but MPS is not available: use --device auto or cpu")
    return torch.device(name)


def resolve_dtype(name: str | torch.dtype, device: torch.device, training: bool = False) -> torch.dtype:
    """Autocast compute dtype. auto: bf16 on CUDA GPUs that have it (else fp16), fp32 elsewhere. `name` is one of
    DTYPES, or as torch names it ("bfloat16", torch.float16). `training` refuses what trains wrongly on `device`.

    On a CPU auto is fp32 whatever it has: bf16 autocast measured no faster on a 2-core EPYC with AVX-512 BF16
    (micro: 1,290 tokens/s against fp32's 1,371, medians of 3 alternating runs) and costs precision; where the CPU
    has no native bf16 it is emulated and ~10x slower. `--dtype bf16` still asks for it (an AMX CPU may gain).
    """
    name = dtype_choice(name)
    if name not in DTYPES:
        raise TrainingError(f"--dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    refusal = dtype_refusal(name, device.type, training)
    if refusal:
        raise TrainingError(refusal)
    if name == "bf16" and device.type == "mps" and not _mps_has_bf16():
        raise TrainingError("--dtype bf16 on Apple's GPU (MPS) needs macOS 14 and torch 2.6 or later: use fp32, or "
                            "upgrade")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _mps_has_bf16() -> bool:
    """Whether MPS computes in bf16 here: macOS 14 has it, and torch's autocast takes it on MPS from 2.6 (2.5 turned
    autocast off with a warning, training in fp32 while the run said bf16)."""
    try:
        return _torch_at_least(2, 6) and bool(torch.backends.mps.is_macos_or_newer(14, 0))
    except (AttributeError, RuntimeError):  # no MPS backend to ask
        return False


def _torch_at_least(major: int, minor: int) -> bool:
    return version_key(torch.__version__) >= (major, minor)


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX), as oneDNN reports it."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and "AVX512" in capability
    except (AttributeError, RuntimeError):
        return False


def autocast_context(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device.type == "mps" and not _torch_at_least(2, 5):  # torch.autocast("mps") came with 2.5
        name = "fp16" if dtype == torch.float16 else "bf16"
        raise TrainingError(f"--dtype {name} on Apple's GPU (MPS) needs torch 2.5 or later: use --dtype fp32, or "
                            f"upgrade torch")
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------- data
def _batch_generator(seed: int, step: int, micro: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, step, micro, rank])


def stream_position(state: dict[str, Any] | None) -> int:
    """Where the batch stream of a run started from a tinygpt checkpoint (train.init_from; `state`: its state.json)
    begins: past the steps that checkpoint's run drew (its step, plus its own offset where it too started from one).
    Drawn again from step 0, with the same seed, a continued pretraining re-spent its first steps on batches its
    weights had learned (QA: the train loss read below the split's mean). 0 for weights of elsewhere (None: gpt2, a
    Hugging Face folder)."""
    if state is None:
        return 0
    data = state.get("data") if isinstance(state.get("data"), dict) else {}
    return int(state.get("step") or 0) + int(data.get("step_offset") or 0)


def get_batch(
    tokens: np.ndarray, batch_size: int, block_size: int, rng: np.random.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of `block_size + 1` tokens -> inputs x (B, T) and next-token targets y (B, T). Every start
    is drawn, the last one (len - block_size - 1) included."""
    return windows_at(tokens, rng.integers(0, len(tokens) - block_size, size=batch_size), block_size, device)


# The val sample's windows are drawn from this seed, not train.seed: runs of other seeds, and of other micro-batch
# sizes (whose sample is the same stream of windows, cut into batches of their size), are measured on the same text
VAL_SAMPLE_SEED = 0x7661_6C  # "val"
VAL_SAMPLE = "fixed-windows"  # state.json's data.val_sample: a run saved without it drew its sample from its seed


def val_sample_starts(tokens: int, block_size: int, batch_size: int, batches: int,
                      legacy_seed: int | None = None) -> list[np.ndarray]:
    """The starts of the val sample's windows, `batches` micro-batches of `batch_size`, in a split of `tokens`
    tokens: the first batch_size × batches of one fixed stream. `legacy_seed`: the sample a run saved before that
    drew (each batch from its train.seed), so that its val curve goes on comparable after a resume."""
    if legacy_seed is not None:
        legacy = np.random.default_rng([legacy_seed, 2**31])
        return [legacy.integers(0, tokens - block_size, size=batch_size) for _ in range(batches)]
    stream = np.random.default_rng(VAL_SAMPLE_SEED).integers(0, tokens - block_size, size=batch_size * batches)
    return list(stream.reshape(batches, batch_size))


def checked_windows(tokens: np.ndarray, starts: np.ndarray, block_size: int) -> np.ndarray:
    """The windows of `block_size + 1` tokens at `starts` (B, T+1) int64, each checked as it is read
    (`data.token_window`)."""
    return np.stack([token_window(tokens, int(s), int(s) + block_size + 1) for s in starts])


def windows_at(
    tokens: np.ndarray, starts: np.ndarray, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The windows of `block_size + 1` tokens at `starts` -> inputs x (B, T), targets y (B, T) on `device`."""
    window = checked_windows(tokens, starts, block_size)
    # contiguous, so every batch has the strides of the compile probe (a strided view would be compiled again)
    x = torch.from_numpy(np.ascontiguousarray(window[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(window[:, 1:]))
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def unigram_loss(train_tokens: np.ndarray, val_tokens: np.ndarray, sample: int = 20_000_000) -> float:
    """Cross-entropy (nats/token) of val under the train unigram distribution (add-one smoothed over GPT-2's
    50257 ids: not the 65536 a uint16 holds, whose extra mass made the baseline easier to beat).

    The loss a model reaches by learning token frequencies alone: a trained model must beat it.
    """
    train_ids, val_ids = np.asarray(train_tokens[:sample]), np.asarray(val_tokens[:sample])
    counts = np.bincount(train_ids[train_ids < VOCAB_SIZE], minlength=VOCAB_SIZE) + 1.0
    log_probs = np.log(counts / counts.sum())
    return float(-log_probs[val_ids[val_ids < VOCAB_SIZE]].mean())  # (an id past them is the reader's to report)


# ----------------------------------------------------------------------------------------------- schedule
SCHEDULE_KEYS = ("max_steps", "lr", "min_lr", "warmup_steps", "schedule", "decay_fraction")


def learning_rate(step: int, cfg: TrainConfig, rewarm: tuple[int, float] | None = None) -> float:
    """LR for optimizer step `step` (0-based): linear warmup, then cosine or warmup-stable-decay.

    `rewarm` = (step s, LR a): from step s the LR climbs linearly from a to the schedule's over warmup_steps
    steps. A resume that stretches the schedule (a larger --max-steps) sets it, so that a finished run's LR rises
    from where it ended instead of jumping to the longer schedule's (the re-warming of continued pretraining).
    """
    base = _scheduled_lr(step, cfg)
    if rewarm is None or step < rewarm[0] or step - rewarm[0] >= cfg.warmup_steps:
        return base
    start, from_lr = rewarm
    return from_lr + (base - from_lr) * (step - start + 1) / cfg.warmup_steps


def wsd_decay(cfg: TrainConfig) -> tuple[int, int]:
    """The WSD schedule's decay: its first step, and how many steps it spans (the last train.decay_fraction)."""
    decay_steps = max(1, int(cfg.max_steps * cfg.decay_fraction))
    return cfg.max_steps - decay_steps, decay_steps


def _scheduled_lr(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "wsd":
        decay_start, decay_steps = wsd_decay(cfg)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return cfg.lr + progress * (cfg.min_lr - cfg.lr)
    span = max(1, cfg.max_steps - 1 - cfg.warmup_steps)  # the last step trained, max_steps - 1, is at min_lr
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def fsdp2_fully_shard() -> Any:
    """FSDP2's `fully_shard`: in torch.distributed.fsdp from torch 2.6, in torch.distributed._composable.fsdp before
    (pyproject allows torch 2.4)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard  # type: ignore[no-redef]
    return fully_shard


def skips_on_device(device: torch.device) -> bool:
    """Whether fused AdamW on `device` honours `optimizer.found_inf`, skipping a non-finite step on the device.
    MPS's is not known to: its first versions refuse a found_inf, and one that takes it without honouring it would
    apply a non-finite step. There the loop skips the step itself, after a host sync (MPS only)."""
    return device.type != "mps"


# ----------------------------------------------------------------------------------------------- throughput
def flops_per_token(model: GPT) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12*L*T*C."""
    from tinygpt_cli.plan import training_flops_per_token

    return training_flops_per_token(model.config)


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s for MFU: the datasheet figure for known GPUs (`plan.DEVICES`); on CPU a measured fp32 rate."""
    if device.type == "cuda":
        return gpu_spec(torch.cuda.get_device_name(device), 0).peak(dtype != torch.float32)
    if device.type == "cpu":
        return measured_cpu_peak(dtype)
    return None


_CPU_PEAK: dict[tuple[int, torch.dtype], float] = {}  # (threads, dtype) -> FLOP/s, measured once per process


def measured_cpu_peak(dtype: torch.dtype = torch.float32, size: int = 2048, repeats: int = 3) -> float:
    """Best FLOP/s of large `dtype` matmuls (the training's compute dtype: against fp32 matmuls a bf16 run read
    83% MFU) on this CPU with torch's current thread count, measured once per process: a square one and one
    shaped like a small GPT's vocabulary head (many tokens × a narrow width × many outputs), which BLAS often runs
    faster; taking only the square one let MFU read over 100% on the CI machine."""
    key = (torch.get_num_threads(), dtype)
    if key not in _CPU_PEAK:
        _CPU_PEAK[key] = _matmul_peak(size, repeats, dtype)
    return _CPU_PEAK[key]


def _matmul_peak(size: int, repeats: int, dtype: torch.dtype) -> float:
    generator = torch.Generator().manual_seed(0)  # leaves the global RNG (dropout, resume) untouched
    best = 0.0
    for m, k, n in ((size, size, size), (size, 256, 8 * size)):
        a = torch.randn(m, k, generator=generator).to(dtype)
        b = torch.randn(k, n, generator=generator).to(dtype)
        out = torch.empty(m, n, dtype=dtype)
        torch.mm(a, b, out=out)
        for _ in range(repeats):
            began = time.perf_counter()
            torch.mm(a, b, out=out)
            best = max(best, 2 * m * k * n / (time.perf_counter() - began))
    return best


# ----------------------------------------------------------------------------------------------- signals
class SecondSignal(Stopped):
    """A second SIGINT/SIGTERM while the first one's checkpoint is pending: training stops at once, keeping the
    last complete checkpoint (writes are atomic). `signal` is the signal's number, for the exit code."""


# A repeat of the first signal within this many seconds is the same stop said twice, not a second one: a
# scheduler that signals every process of a job (SLURM's scancel, `kill -- -PGID`) reaches each worker of
# `train --nproc` directly and again through the launcher, milliseconds apart.
REPEAT_WINDOW_S = 1.0


class StopFlag:
    """Set by SIGINT/SIGTERM/SIGHUP: the loop finishes its step, checkpoints and returns. A second signal aborts."""

    def __init__(self) -> None:
        self.reason = ""
        self.signal = 0  # the signal that set it (0: none, or set another way)
        self.signalled_at = 0.0  # time.monotonic() of that signal

    def __bool__(self) -> bool:
        return bool(self.reason)


@contextlib.contextmanager
def _stop_on_signals(flag: StopFlag) -> Iterator[None]:
    # SIGHUP: the terminal went away (a dropped ssh session). A signal the process was started ignoring stays
    # ignored: `nohup tinygpt train` must outlive its terminal, not stop with it (see `signals_handled`).
    from tinygpt_cli.launch import signals_handled

    def handler(signum: int, frame: Any) -> None:
        now = time.monotonic()
        if flag and signum == flag.signal and now - flag.signalled_at < REPEAT_WINDOW_S:
            return  # the first signal again, through another path
        if flag:
            raise SecondSignal(signum)  # stop at once
        flag.reason, flag.signal, flag.signalled_at = "interrupted", signum, now

    with signals_handled(handler):
        yield


# ----------------------------------------------------------------------------------------------- rng
def _rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """The random state a resume goes on from: the CPU's, numpy's, Python's, and the device's own (CUDA, MPS)."""
    state = {
        "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
        "numpy": _jsonable(np.random.get_state()),
        "python": _jsonable(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    if device is not None and device.type == "mps":  # dropout's masks on a Mac's GPU
        state["mps"] = base64.b64encode(torch.mps.get_rng_state().numpy().tobytes()).decode("ascii")
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
    if "mps" in state and device_present("mps"):
        torch.mps.set_rng_state(torch.from_numpy(np.frombuffer(base64.b64decode(state["mps"]), dtype=np.uint8).copy()))


# ----------------------------------------------------------------------------------------------- run folder
def default_run_name(cfg: RunConfig, dataset: Dataset) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return workspace.safe_name(f"{cfg.size}-{dataset.name}-{stamp}")


class _RunBusy(TrainingError):
    """Another process holds the run's lock: it trains that run now."""


class _Metrics:
    """Appends JSON lines to metrics.jsonl, flushed per line so a crash loses nothing logged."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool = True, drop_eval: bool = False) -> None:
        self.path = path
        self.handle = None
        self.trackers: Trackers | None = None  # TensorBoard / wandb: each record goes to them too
        if not enabled:  # ranks other than 0 write nothing
            return
        if resume_step is not None and path.exists():
            # drop what was logged after the checkpoint we resume from: those steps are trained again; and a
            # line a crash cut short (a kill or a full disk mid-write), which would stop every later reader
            kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if (record := metrics_record(line)) is not None and record.get("step", 0) <= resume_step
                    and record.get("kind") != "failed"  # the resume goes on past that failure
                    and not (drop_eval and record.get("kind") == "eval" and record.get("step") == resume_step)]
            write_text_atomic(path, "".join(line + "\n" for line in kept))
        # a new run starts its own file: one left by an attempt killed before its first checkpoint is not its own
        self.handle = open(path, "a" if resume_step is not None else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.note(record)
        if self.trackers is not None:
            self.trackers.log(record)

    def note(self, record: dict[str, Any]) -> None:
        """A line for metrics.jsonl alone (not a metric the trackers plot)."""
        if self.handle is not None:
            self.handle.write(json.dumps(record) + "\n")
            self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md", "loss.png")  # what a run writes besides checkpoints/


def _check_writable(run_dir: Path) -> None:
    """Refuse before any step a run folder, or a resumed run's checkpoints/, that a checkpoint could not be
    written to: found out at the first save, every step before it was lost (audit)."""
    folder = run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for folder in (run_dir, run_dir / "checkpoints"):
            if folder.is_dir():  # checkpoints/ is made at the first save, in the run folder checked first
                probe = folder / f".write-test-{os.getpid()}"
                probe.write_bytes(b"ok")
                probe.unlink()
    except OSError as exc:
        advice = ("free some space, or choose a TINYGPT_HOME on a larger disk" if os_problem(exc) == FULL else
                  "make it writable, or choose a writable TINYGPT_HOME")
        raise TrainingError(f"cannot write to {folder} ({exc.strerror}): {advice}") from None


def _unsaved_advice(exc: OSError, run_dir: Path, again: bool = False) -> str:
    """What to do about a checkpoint (or a run's file) that could not be written, by what stopped it; `again`: the
    run has no checkpoint to resume from, and is started again."""
    then = "run the same command again" if again else "resume with --resume"
    problem = os_problem(exc)
    if problem == FULL:
        return f"free disk space, then {then}"
    if problem in (DENIED, READ_ONLY):
        return f"make {run_dir} and its checkpoints/ writable, then {then}"
    return f"fix that, then {then}"


# ----------------------------------------------------------------------------------------------- main loop
def prepare_dataset(cfg: RunConfig, on_event: Callable[[TrainEvent], None], info: dist.DistInfo) -> Dataset:
    """The dataset to train on; with none in the workspace, rank 0 tokenizes the embedded corpus first.

    Under torchrun rank 0's workspace decides, and every rank agrees before any goes on: whether to tokenize (a
    collective waits for it), and which dataset "the last tokenized" is. Another machine, which may not share rank
    0's filesystem, must hold the same data (the same name and train split) or every rank stops with one error."""
    dataset = None
    with dist.agreed():
        dataset = find_dataset(cfg.data.dataset or None)
        if dataset is not None and workspace.held(lock := workspace.lock_of(where_published(dataset.path))):
            # a tokenize of it again (or a `data rm`) is under way: what it leaves is what to train on (QA: a
            # `tokenize --force` put other text under a run started a moment after it, which could not resume)
            on_event(TrainEvent("info", message=f"data/{dataset.name} is being written by another tinygpt process "
                                                f"(a tokenize, or a data rm): waiting for it to end."))
            workspace.wait_until_free(lock)
            dataset = find_dataset(cfg.data.dataset or None)
    tokenized = dist.from_main(dataset is None)
    if tokenized:
        with dist.agreed():
            if info.is_main:
                on_event(TrainEvent("info", message="No tokenized data yet: "
                                    "tokenizing the embedded Shakespeare corpus first."))
                while True:
                    try:
                        tokenize(None)
                        break
                    except workspace.Busy as busy:  # another train (or tokenize) in this fresh workspace makes it
                        on_event(TrainEvent("info", message="Another tinygpt process is tokenizing it: waiting."))
                        workspace.wait_until_free(busy.lock_path)
                        if find_dataset(None) is not None:  # else it stopped part-way: go on from where it was
                            break
        if dataset is None:
            dataset = find_dataset(None)
    main_name, main_sha = dist.from_main((dataset.name, dataset.meta["splits"]["train"].get("sha256"))
                                         if dataset is not None else (None, None))
    with dist.agreed():
        if dataset is not None and dataset.name != main_name and not cfg.data.dataset:
            dataset = find_dataset(main_name) if (workspace.data_dir() / main_name).is_dir() else None
        if dataset is None:  # another machine, which does not share rank 0's workspace
            raise TrainingError(f"no tokenized dataset {main_name} in {workspace.data_dir()} on this machine (rank 0 "
                                f"{'tokenized its own' if tokenized else 'trains on it'}): run tinygpt tokenize "
                                f"on every machine, or share TINYGPT_HOME")
        sha = dataset.meta["splits"]["train"].get("sha256")
        if dataset.name != main_name or (sha and main_sha and sha != main_sha):
            raise TrainingError(f"rank {info.rank} would train on other data ({dataset.name}) than rank 0 "
                                f"({main_name}): every machine needs the same tokenized dataset")
    return dataset


def _quiet(event: TrainEvent) -> None:
    return None


def train(
    cfg: RunConfig | None = None,
    *,
    run_name: str | None = None,
    resume: bool = False,
    on_event: Callable[[TrainEvent], None] | None = None,
    stop: StopFlag | None = None,
) -> TrainResult:
    """Train a GPT-2 as `cfg` says, writing `runs/<name>/`. Returns at max_steps/max_tokens/max_minutes or on a stop.

    With `resume`, continues the run `run_name` (else the latest run) from its latest checkpoint, with the run's
    own config when `cfg` is None. A `cfg` given replaces it whole (training keys may change, the model's shape
    may not): `resolve_config(base=run_config_of(run_dir), overrides=["train.max_steps=N"])` changes one key, as
    `tinygpt train --resume --max-steps N` does. `stop` is set (`reason`) to end the run with a checkpoint.
    Ctrl-C (SIGINT), SIGTERM and SIGHUP end the run with a checkpoint, then, unless the caller passed its own
    `stop` (and so reads `stop.signal`; `stopped` is "interrupted"), go on to the caller's handler: Ctrl-C raises
    KeyboardInterrupt (a notebook's cell stops, its sweep too), SIGTERM by default ends the process, as the
    signal asks (a script's loop must not start the next run). Under torchrun every rank calls this; only rank 0
    reports events and writes files.
    """
    if resume and run_name is None:  # the latest run
        run_name = find_run(None).name
    if cfg is None and resume:  # the run's own config, as `tinygpt train --resume` takes it
        cfg = run_config_of(find_run(run_name))
    if cfg is None:
        raise TrainingError("train needs a RunConfig, built with resolve_config(size=..., overrides=[...]), or "
                            "resume=True to go on with a run's own")
    if not isinstance(cfg, RunConfig):
        raise TrainingError(f"train takes a RunConfig, not a {type(cfg).__name__}: build one with "
                            f"resolve_config(size=..., overrides=[...])")
    if stop is not None and not isinstance(stop, StopFlag):
        raise TrainingError(f"stop takes a StopFlag (tinygpt_cli.training.StopFlag: set its reason to stop), not a "
                            f"{type(stop).__name__}")
    if not _ONE_AT_A_TIME.acquire(blocking=False):
        raise TrainingError("another train() is running in this process: torch's random state is the process's, so "
                            "two at once would change each other's results; run them one after another, or in "
                            "separate processes")
    own_stop = stop is None
    stop = stop if stop is not None else StopFlag()
    try:
        with _callers_state_kept():
            result = _train(cfg, run_name, resume, on_event, stop)
    finally:
        _ONE_AT_A_TIME.release()
    if own_stop and stop.signal in _ENDING_SIGNALS:  # the checkpoint is saved: the signal's own meaning now
        signal.raise_signal(stop.signal)
    return result


# Signals that ask the process to end, or the code to stop (a scheduler, `docker stop`, a closed terminal, Ctrl-C):
# after its checkpoint, train() passes them on to the caller's handlers. Ctrl-C once returned, and a notebook's
# cell went on to its next run (API QA).
_ENDING_SIGNALS = frozenset(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP")
                            if hasattr(signal, name))


# train() in one thread of a process at a time: it seeds torch's process-wide random stream (the weights, dropout)
# and puts the caller's back after, which another thread's run would see change under it.
_ONE_AT_A_TIME = threading.Lock()


@contextlib.contextmanager
def _callers_state_kept() -> Iterator[None]:
    """The caller's random streams (torch's on the CPU, numpy's, Python's) come back as they were when `train`
    returns: it seeds them (and a resume restores the run's), which in a notebook would change its own seeded
    draws after. (CUDA's streams are left: saving them would start a context on every visible GPU.)"""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]), _torch_defaults():
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


@contextlib.contextmanager
def _torch_defaults() -> Iterator[None]:
    """Train as the config says whatever a notebook's cells left switched: gradients on (`set_grad_enabled(False)`
    or `inference_mode()` after an inference cell failed with "element 0 of tensors does not require grad"), fp32
    as the default dtype (a float64 default failed in the fused loss), no outer autocast (one trained an fp32 run
    in bf16, in silence). The caller's settings are back as it returns."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(fp32_default())
        for device_type in ("cpu", "cuda"):
            if _autocast_on(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


def _autocast_on(device_type: str) -> bool:
    """Whether autocast is on for `device_type` here (torch's call for it changed in 2.4)."""
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # before 2.4: no argument (CUDA's), and CPU's own call
        return bool(torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled())


@contextlib.contextmanager
def _tf32_while_training() -> Iterator[None]:
    """TF32 matmuls and convolutions while training on CUDA (fp32 work on tensor cores), the caller's switches back
    after: left on, a notebook's own fp32 work would run at TF32's precision. A caller on torch's newer
    `fp32_precision` switches, which refuse a read of these, keeps its own choice."""
    try:
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    except RuntimeError:  # "mix of the legacy and new APIs"
        yield
        return
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _train(cfg: RunConfig, run_name: str | None, resume: bool, on_event: Callable[[TrainEvent], None] | None,
           stop: StopFlag) -> TrainResult:
    info = dist.from_environment()
    owns_group = info.enabled and not torch.distributed.is_initialized()
    trainer = None
    finished = False  # (not sys.exc_info() in `finally`: that also sees an exception the caller is handling)
    try:
        trainer = _Trainer(cfg, info, on_event if info.is_main else None, stop)
        result = trainer.run(run_name, resume)
        finished = True
        return result
    except Exception as exc:
        # torch.distributed.DistError (a RuntimeError) of a peer that left: that peer's error says why
        lost = _peer_lost(exc) if info.enabled and isinstance(exc, RuntimeError) else None
        if trainer is not None:
            trainer.note_failure(lost or exc)
        if lost is not None:
            raise lost from None
        raise
    finally:
        if trainer is not None:
            if trainer.metrics is not None:  # closed before the files are removed (Windows removes no open file)
                trainer.metrics.close()
            if trainer.trackers is not None:  # a wandb run ended by an error is marked failed
                trainer.trackers.close(failed=not finished)
            try:
                trainer.drop_if_unstarted()
                trainer.held.close()
            finally:
                release_cpu_workspace()  # the fused loss's logits buffer (412 MB for micro) goes with the run
            # the trainer (its DDP wrapper holds the process group) goes before the group is destroyed: gloo's
            # destructor after destroy_process_group joins threads that wait on a peer that has already left
            trainer = None
        if owns_group:
            dist.shutdown()


# How gloo (and the c10d store) report a collective whose peer process has gone: another rank's error or death
# is the cause, said by it (or named by the launcher), and this one's traceback would only bury it.
_PEER_LOST_SIGNS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                    "failed to recv, got 0 bytes")


def _peer_lost(exc: RuntimeError) -> TrainingError | None:
    """A TrainingError for a collective that failed because another process of the group left; None otherwise."""
    from tinygpt_cli.launch import PEER_LOST

    text = str(exc)
    if not any(sign in text for sign in _PEER_LOST_SIGNS):
        return None
    detail = first_line(exc).split("] ", 1)[-1].split(". This is typically", 1)[0]  # gloo's source path and hint go
    return TrainingError(f"{PEER_LOST} ({detail}): its own error or exit code says why; this rank stopped too")


class _TaskCut(Exception):
    """A stop came while train.eval_task was being scored (one process): the scoring ends there."""


class _Trainer:
    """One training run: setup in `run`, the step loop in `_loop`."""

    def __init__(self, cfg: RunConfig, info: dist.DistInfo, on_event: Callable[[TrainEvent], None] | None,
                 stop: StopFlag) -> None:
        self.cfg = cfg
        self.tc = cfg.train
        self.info = info
        self.emit = on_event or _quiet
        self.stop = stop
        self.device = dist.init(info, resolve_device(self.tc.device))
        self.dtype = resolve_dtype(self.tc.dtype, self.device, training=True)
        self.grad_accum = self.tc.grad_accum
        self.batch_size = self.tc.batch_size
        self.run_dir: Path | None = None  # known once `run` has named the run
        self.new_run = False  # a run this call starts: its folder goes again if it ends with no checkpoint
        self.looping = False  # from the step loop's start a failure is the run's (`note_failure`)
        self.saved_step: int | None = None  # the step of the checkpoint last saved (the loop's start, at first)
        self.metrics: _Metrics | None = None
        self.trackers: Trackers | None = None  # rank 0's, where train.log_to names any
        self.wrote_files = False  # RUN_FILES are this run's own once its loop has written them: removed with it
        self.fsdp = self.tc.fsdp and info.enabled
        self.held = contextlib.ExitStack()  # until train() returns: rank 0's lock on the run, CUDA's TF32
        self.norm_unknown = False  # the log window's gradient norms were not all summed (`_loop`)
        self.init_checkpoint: str | None = None  # the checkpoint folder train.init_from loaded (a tinygpt one)
        self.step_offset = 0  # the batch stream's step at this run's step 0: a run it started from trained on those
        self.val_sample: str | None = VAL_SAMPLE  # None: a resumed run's sample of its seed (`val_sample_starts`)
        self.tasks: list[tuple[Any, list[Any]]] = []  # train.eval_task's: (evaluation.Task, its examples) each
        self.report_only = False  # a resume of a run at its end that was killed before writing its report

    # -------------------------------------------------------------------------------------------- setup
    def run(self, run_name: str | None, resume: bool) -> TrainResult:
        cfg, tc, info = self.cfg, self.tc, self.info
        if info.enabled:  # --dtype auto is each machine's pick: fp16 (a GradScaler) beside bf16 mixes scaled gradients
            dtypes = dist.all_gather_objects(str(self.dtype).split(".")[-1])
            if len(set(dtypes)) > 1 and "float16" in dtypes:
                raise TrainingError(f"the ranks would compute in {', '.join(dtypes)} (by rank; --dtype {tc.dtype} "
                                    f"on other hardware): pass one --dtype that every machine has, e.g. fp32")
            _check_same_settings(cfg)
        torch.manual_seed(tc.seed)  # the same initial weights on every rank (FSDP does not broadcast them)
        if self.device.type == "cuda":
            self.held.enter_context(_tf32_while_training())

        # Under torchrun each rank reads its own machine's files (which need not be rank 0's) until the first
        # collective: an error met by some ranks only is raised by all of them (dist.agreed), never left to a rank
        # that goes on into a collective alone.
        with dist.agreed():
            if run_name is not None and not resume:
                check_run_name(run_name)
            if info.is_main:  # a tracker's package is missing: said before the data, the model or a step
                check_trackers_installed(parse_trackers(tc.log_to))
            if resume and run_name and not cfg.data.dataset:  # "the last tokenized" means the one it trained on
                cfg = self._with_dataset(_trained_dataset(workspace.runs_dir() / run_name))
        if tc.eval_task:  # their examples (the hub's, or a file's) before the data and the model: a problem is said
            with dist.agreed():  # before minutes of tokenizing or loading
                self.tasks = self._load_tasks()
        try:
            self.dataset = prepare_dataset(cfg, self.emit, info)
        except DataError:
            advice = _gone_dataset_advice(workspace.runs_dir() / run_name, cfg.data.dataset) if resume and run_name \
                else None
            if advice is None:
                raise
            raise DataError(advice) from None
        with dist.agreed():
            # config.yaml names the data so that a resume, an eval or a rerun finds the same from any folder: by
            # name in the workspace, else by absolute path (a relative --data PATH held only from where it was typed)
            where = Path(os.path.abspath(self.dataset.path))  # a link in data/ stays a name: not its target
            in_workspace = where.parent.resolve() == workspace.data_dir().resolve()
            named = where.name if in_workspace else str(where)
            if cfg.data.dataset != named:
                cfg = self._with_dataset(named)
            self.train_tokens = self.dataset.split("train")
            self.val_tokens = self.dataset.split("val")
            starting = bool(tc.init_from) and not resume
            if not starting or init_from_block_size(cfg) is not None:  # else the weights' context: checked on load
                self._check_data_fits(cfg.model.block_size)
            start = self._init_from(tc.init_from) if starting else None
        # every rank draws from rank 0's position (a checkpoint saved between the ranks' reads moves it: review)
        self.step_offset = dist.from_main(self.step_offset)
        cfg, tc = self.cfg, self.tc  # with the weights' shape, size and lr (init_from), before the name takes the size
        name = run_name
        if name is None:  # a new run (train() names the run a resume takes): rank 0 claims a free name, held
            with dist.agreed():
                claimed = self._claim_default_name(cfg) if info.is_main else None
            name = dist.from_main(claimed)
        alias_of = workspace.sibling_target(workspace.runs_dir() / name)  # `runs/alias -> r`: run r, so named
        self.run_dir = workspace.runs_dir() / (alias_of.name if alias_of is not None else name)
        with dist.agreed():  # its own block: every rank looks for the latest checkpoint once rank 0 has tidied
            if info.is_main:
                if run_name is not None:
                    self._hold_run(resume)
                try:  # of saves killed mid-write: they would count as space held, or hide a step set aside
                    remove_leftovers(self.run_dir)
                except OSError as exc:
                    raise TrainingError(f"cannot tidy {self.run_dir / 'checkpoints'} after a killed save "
                                        f"({exc.strerror}): make it writable") from None
        with dist.agreed():
            checkpoint = latest_checkpoint(self.run_dir) if resume else None
            if resume and checkpoint is None:
                raise TrainingError(no_checkpoint_message(self.run_dir) if step_folders(self.run_dir) else
                                    f"{self.run_dir} has no checkpoint to resume from: start it without --resume")
            # a new run's checkpoints are rank 0's alone: another machine's runs/ (not shared) does not count
            if not resume and info.is_main and latest_checkpoint(self.run_dir) is not None:
                raise TrainingError(
                    f"run {self.run_dir.name} already exists: pass --resume to continue it or pick another --name"
                )
            if not resume and info.is_main:
                self._check_unused_folder()
            self.new_run = info.is_main and not resume
            if info.is_main:
                _check_writable(self.run_dir)

            # CPU/MPS: past the RAM the OOM killer ends the process without a word, building the model included
            host_largest = self._fit_host_memory(start.config if start is not None else cfg.model) \
                if self.device.type != "cuda" else None
            self.model = start if start is not None else GPT(cfg.model)
            self.block = self.model.config.block_size
            self._check_data_fits(self.block)
            if info.is_main:
                self._check_checkpoint_space()
            torch.manual_seed(tc.seed + 1 + info.rank)  # then each rank its own dropout stream
            self.state: dict[str, Any] = {}
            self.lr_rewarm: tuple[int, float] | None = None
            self.muon_rewarm: tuple[int, float] | None = None  # Muon's LR climb (train.optimizer=muon)
            if checkpoint is not None:
                with _resume_advice():
                    loaded = load_checkpoint(checkpoint)
                saved = replace(loaded.model.config, dropout=cfg.model.dropout)  # dropout may change
                if saved != cfg.model:
                    differ = ", ".join(f"model.{key} {getattr(saved, key)} → {getattr(cfg.model, key)}"
                                       for key in vars(saved) if getattr(saved, key) != getattr(cfg.model, key))
                    raise TrainingError(
                        f"the model shape of {self.run_dir.name} cannot change on resume ({differ}): keep the run's "
                        f"model settings (drop the model overrides)"
                    )
                self.model.load_state_dict(loaded.model.state_dict())
                self.state = loaded.state
                self.step_offset = int((self.state.get("data") or {}).get("step_offset") or 0)
                pinned = self.state.get("init_from_checkpoint")
                self.init_checkpoint = pinned if isinstance(pinned, str) else None  # kept by every checkpoint
                self._check_resumable()  # before the device, the compile and anything written
        self.report_only = dist.from_main(self.report_only)
        if info.enabled:  # each rank loaded its own machine's copy (or none): the same checkpoint, or none goes on
            held = dist.all_gather_objects(f"{self.run_dir.name} step {int(self.state.get('step', 0))}" if resume
                                           else f"{self.run_dir.name}: no checkpoint (a new run)")
            if len(set(held)) > 1:  # a machine with a stale copy of the run folder, or another "latest run", or
                raise TrainingError(  # none (--auto-resume decides on each machine, from its own runs/)
                    f"the ranks would resume from different checkpoints ({', '.join(held)}, by rank): every "
                    f"machine needs rank 0's run folder (a shared filesystem, or a fresh copy)")
        self.model.to(self.device)
        if tc.fsdp and not info.enabled:
            self.emit(TrainEvent("info", message="--fsdp needs several processes (torchrun): training unsharded."))
        if self.device.type == "cpu" and self.dtype == torch.bfloat16 and not cpu_has_native_bf16():
            self.emit(TrainEvent("info", message="bf16 on this CPU is emulated (no AVX-512 BF16 or AMX) and much "
                                                 "slower than fp32 (~10× measured): --dtype auto trains in fp32."))
        shorter = max(1, tc.max_steps // 10)  # a warmup to offer: a tenth of the run
        if checkpoint is None and tc.warmup_steps >= tc.max_steps and shorter < tc.warmup_steps:
            peak = learning_rate(tc.max_steps - 1, tc) / tc.lr  # e.g. --size small (700) --max-steps 100
            tenth = " warms up over a tenth of it" if tc.max_steps >= 10 else ""
            self.emit(TrainEvent("info", message=f"train.warmup_steps is {tc.warmup_steps}, and the run is "
                                                 f"{workspace.counted(tc.max_steps, 'step')}: the learning rate "
                                                 f"climbs to {peak:.0%} of train.lr and never decays; e.g. --set "
                                                 f"train.warmup_steps={shorter}{tenth}."))
        decay_start = wsd_decay(tc)[0]
        if checkpoint is None and tc.schedule == "wsd" and 0 < decay_start < tc.warmup_steps < tc.max_steps:
            drop = 1 - learning_rate(tc.warmup_steps, tc) / tc.lr  # ML QA: a fall nothing said
            self.emit(TrainEvent("info", message=f"the WSD decay starts at step {decay_start}, inside the warmup "
                                                 f"(train.warmup_steps {tc.warmup_steps}): the learning rate falls "
                                                 f"{drop:.0%} at once when the warmup ends; lower "
                                                 f"train.warmup_steps or train.decay_fraction."))
        if self.fsdp:
            fully_shard = fsdp2_fully_shard()

            for block in self.model.transformer.h:  # one all-gather per block, the tied embedding at the root
                fully_shard(block)
            fully_shard(self.model)
        self.optimizer = make_optimizer(self.model, tc)
        if checkpoint is not None:
            self._load_optimizer(checkpoint)
        largest = host_largest
        auto_batch = tc.auto_batch and not self.report_only  # (a session that writes a report trains no step)
        if self.device.type == "cuda":
            with dist.agreed():  # the machines' memory may differ: every rank takes the same micro-batch, or none
                largest = self._largest_batch(self.batch_size) if auto_batch else None
        if auto_batch:
            self._fit_batch_size(largest)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None
        if self.scaler is not None and checkpoint is not None and self.state.get("grad_scaler"):
            self.scaler.load_state_dict(self.state["grad_scaler"])  # its scale and growth count go on
        try:  # DDP wraps the compiled model before the probe, so dynamo splits the graph at DDP's buckets
            self.forward_model = _maybe_compile(self.model, "off" if self.report_only else tc.compile, self.device,
                                                self.emit,
                                                (self.batch_size, self.block), self.dtype,
                                                wrap=None if self.fsdp else self._wrap)
        except torch.cuda.OutOfMemoryError:
            raise self._out_of_memory(True) from None
        self.checkpoint = checkpoint
        return self._loop()

    def _load_tasks(self) -> list[tuple[Any, list[Any]]]:
        """train.eval_task's tasks and their examples, to score at each evaluation (`_score_task`)."""
        from tinygpt_cli.evaluation import find_task, load_task

        tc = self.tc
        if self.fsdp:
            raise TrainingError(f"train.eval_task does not run under --fsdp (the sharded weights are whole only inside "
                                f"the training step): drop it, and score the checkpoints with `tinygpt eval --task "
                                f"{tc.eval_task}`")
        tasks = []
        for name in tc.eval_task.split(","):  # all loaded before any step: a missing one is said first
            task = find_task(name)
            examples, source = load_task(task, tc.eval_task_data or None, tc.eval_task_limit or None,
                                         option="train.eval_task_data")
            if tc.eval_task_data and source != tc.eval_task_data:  # config.yaml names the file from any folder
                self.cfg = replace(self.cfg, train=replace(tc, eval_task_data=source))
                self.tc = self.cfg.train
            self.emit(TrainEvent("info", message=f"Scoring {task.name} zero-shot at each evaluation: "
                                                 f"{workspace.counted(len(examples), 'example')} from {source}"))
            tasks.append((task, examples))
        return tasks

    def _hold_run(self, resume: bool, stack: contextlib.ExitStack | None = None) -> None:
        """One training of a run at a time: a second (a job requeued while the first still runs, another
        terminal) would write the same checkpoints and metrics, and two new runs of one name would both start."""
        runs, name = self.run_dir.parent, self.run_dir.name
        try:
            runs.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrainingError(f"cannot write to {runs} ({exc.strerror}): choose a writable TINYGPT_HOME") from None
        busy = _RunBusy(f"another tinygpt process is training run {name}: wait for it to finish"
                        + ("" if resume else ", or pick another --name"))
        (stack or self.held).enter_context(workspace.exclusive(workspace.lock_of(self.run_dir), f"runs/{name}", busy))

    def _claim_default_name(self, cfg: RunConfig) -> str:
        """`default_run_name` for a new run, held (`_hold_run`). Where it is taken, by a run training now or one
        whose folder is there (two started in one second, a loop of runs), the first free of -2, -3, ..."""
        base = default_run_name(cfg, self.dataset)
        for number in itertools.count(1):
            self.run_dir = workspace.runs_dir() / (base if number == 1 else f"{base}-{number}")
            if self.run_dir.exists():
                continue
            with contextlib.ExitStack() as attempt:
                try:
                    self._hold_run(False, attempt)
                except _RunBusy:
                    continue
                if self.run_dir.exists():  # made by a run that held the name until a moment ago
                    continue
                self.held.enter_context(attempt.pop_all())
                return self.run_dir.name
        raise AssertionError("unreachable: itertools.count does not end")

    def _check_unused_folder(self) -> None:
        """A new run writes its files (`RUN_FILES`) into its folder, and removes the ones it wrote if it stops
        before its first checkpoint. An earlier run's results there (its checkpoints deleted: a report,
        evaluations) are refused rather than written over. What a start killed before its first checkpoint left
        (config.yaml, metrics.jsonl, and the plot of it that an evaluation draws just before that checkpoint) is
        replaced, as `_Metrics` does; other files stay as they are."""
        run_dir = self.run_dir
        results = [name for name in ("eval.jsonl", "report.md") if (run_dir / name).exists()]
        if results:
            raise TrainingError(f"{run_dir} holds an earlier run's results ({', '.join(results)}) but no checkpoint "
                                f"to resume: pick another --name, or move or delete those files first")

    def _check_checkpoint_space(self) -> None:
        """The checkpoints this run keeps at its peak must fit on the disk, less those it already holds (resume):
        told now, not when the first one fails to save hours in."""
        tc = self.tc
        folder = self.run_dir / "checkpoints"
        held = workspace.tree_bytes(folder)
        size = checkpoint_bytes(self.model.config, tc.optimizer)
        need = checkpoints_kept(tc.max_steps, tc.eval_interval, tc.keep_last, tc.keep_best) * size - held
        free = workspace.free_bytes(self.run_dir)
        if need <= free:
            return
        fits = (free + held) // size - 1 - tc.keep_best  # the most --keep-last that fits (N + 1 + the best's)
        fewer = f"keep fewer with --keep-last {fits}, " if fits >= 1 and (fits < tc.keep_last or not tc.keep_last) \
            else ""
        without_best = checkpoints_kept(tc.max_steps, tc.eval_interval, tc.keep_last) * size - held
        if tc.keep_best and not fewer and without_best <= free:
            fewer = "keep no checkpoint for the best val loss beside the last ones (--set train.keep_best=false), "
        workspace.check_disk(self.run_dir, need, f"run {self.run_dir.name} (its checkpoints)",
                             f"free some space, {fewer}or set TINYGPT_HOME to a larger disk")

    def _check_data_fits(self, block: int) -> None:
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            short = too_little_data(self.dataset.name, split, len(tokens), block)
            if short:
                raise DataError(short)

    def drop_if_unstarted(self) -> None:
        """A new run that ends without a checkpoint (an error in setup or before the first save, a stop before
        the first step) leaves no folder behind: only the files a run writes are removed, and only then."""
        run_dir = self.run_dir
        if not self.new_run or run_dir is None or latest_checkpoint(run_dir) is not None:
            return
        with contextlib.suppress(OSError):  # best effort, never in the way of the error that ended the run
            for name in RUN_FILES if self.wrote_files else ():  # before, those there are not this run's
                (run_dir / name).unlink(missing_ok=True)
        if self.trackers is not None:
            self.trackers.remove_created()
        for folder in (run_dir / "checkpoints", run_dir):
            with contextlib.suppress(OSError):  # not empty: something else is there, and it stays
                folder.rmdir()

    def _init_from(self, spec: str) -> GPT:
        """Weights to start from (fine-tuning / continued pretraining), and the config they train with
        (`config.start_from`: their shape, a shorter context where model.block_size was given, a fine-tuning lr)."""

        from tinygpt_cli.config import start_from
        from tinygpt_cli.export import load_pretrained, pretrained_checkpoint, source_record

        # a run's latest checkpoint, pinned: the weights loaded are those recorded, though the run trains on
        pinned = pretrained_checkpoint(spec)
        source = read_state(pinned) if pinned is not None else None  # before the weights: a prune may take it after
        self.step_offset = stream_position(source)
        model, model_cfg = load_pretrained(pinned or spec, block_size=init_from_block_size(self.cfg),
                                           dropout=self.cfg.model.dropout)
        self.init_checkpoint = str(pinned) if pinned is not None else None
        try:
            self.cfg, notes = start_from(self.cfg, model_cfg)
        except ConfigError as exc:
            raise TrainingError(str(exc)) from None
        self.cfg = replace(self.cfg, train=replace(self.cfg.train, init_from=source_record(spec)))
        self.tc = self.cfg.train
        for note in notes:
            self.emit(TrainEvent("info", message=note))
        its = f" ({pinned.parent.parent.name}'s {pinned.name})" if pinned is not None and \
            pinned.parent.name == "checkpoints" else ""
        trained_on = (source or {}).get("data")
        same_data = isinstance(trained_on, dict) and trained_on.get("dataset") == self.dataset.name
        onward = f"; its batches go on from step {self.step_offset:,} of the stream that run drew (not again from " \
            f"its first)" if self.step_offset and same_data else ""
        self.emit(TrainEvent("info", message=f"Starting from {spec}{its}: {model.num_params() / 1e6:.1f}M "
                                             f"parameters, context {model_cfg.block_size}{onward}"))
        return model.train()

    def _load_optimizer(self, checkpoint: Path) -> None:
        with _resume_advice():
            saved = load_optimizer_state(checkpoint)
        # a run written under FSDP keeps its optimizer state keyed by parameter name (a full state dict), one
        # written without by position (optimizer.state_dict()): either resumes with or without FSDP
        by_name = any(isinstance(key, str) for key in saved.get("state", {})) or any(
            isinstance(key, str) for group in saved.get("param_groups", []) for key in group.get("params", []))
        if not self.fsdp and not by_name:
            self.optimizer.load_state_dict(saved)
        else:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            if not by_name:
                saved = self._optimizer_state_by_name(saved)
            set_optimizer_state_dict(self.model, self.optimizer, optim_state_dict=saved,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        apply_hyperparameters(self.optimizer, self.tc)  # the saved groups carry the run's old settings

    def _optimizer_state_by_name(self, saved: dict[str, Any]) -> dict[str, Any]:
        """`optimizer.state_dict()` of a run trained without FSDP (parameters numbered in the order of the
        optimizer's groups, as `make_optimizer` made them) keyed by parameter name instead, as FSDP's full
        optimizer state dict is."""
        names = {id(parameter): name for name, parameter in self.model.named_parameters()}
        order = [names[id(p)] for group in self.optimizer.param_groups for p in group["params"]]
        numbered = [index for group in saved["param_groups"] for index in group["params"]]
        if len(numbered) != len(order):
            raise TrainingError("the checkpoint's optimizer state does not match the model's parameters")
        name_of = dict(zip(numbered, order, strict=True))
        return {"state": {name_of[index]: value for index, value in saved["state"].items()},
                "param_groups": [{**group, "params": [name_of[index] for index in group["params"]]}
                                 for group in saved["param_groups"]]}

    def _full_state(self) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any] | None]:
        """Full (unsharded, CPU) model and optimizer state dicts under FSDP; (None, None) otherwise."""
        if not self.fsdp:
            return None, None
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=options),
                get_optimizer_state_dict(self.model, self.optimizer, options=options))

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """DDP around the (compiled) model when running under torchrun; gradients sync on the last micro-step."""
        if not self.info.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def _largest_batch(self, start: int) -> int:
        return largest_step_batch(self.model, start, self.block, self.device, self.dtype, self.tc.compile)

    def _fit_batch_size(self, largest: int | None) -> None:
        """--batch-size auto: the largest micro-batch (dividing the global batch) that fits, `largest` (None: any)
        on this rank; the smallest of the ranks' (collective), so that all run the same micro-steps."""
        global_batch = self.batch_size * self.grad_accum
        largest = min(self.batch_size if each is None else each for each in dist.all_gather_objects(largest))
        fitting = micro_batch_within(self.batch_size, global_batch, largest)
        if fitting != self.batch_size:
            self.batch_size = fitting
            self.grad_accum = global_batch // fitting
            self.emit(TrainEvent("info", message=f"--batch-size auto: micro-batch {fitting} × "
                                                 f"{self.grad_accum} accumulation steps (global batch {global_batch})"))

    def _fit_host_memory(self, model: ModelConfig) -> int | None:
        """CPU/MPS: past the machine's RAM an allocation is not an exception but the OOM killer (exit 137, not a
        word), so the model and micro-batch are checked against plan's estimate before the model is built (an
        --init-from model is loaded first: its source's size is what a user picked).
        --batch-size auto takes the largest that fits (returned, for `_fit_batch_size`); an explicit one whose
        estimate exceeds the RAM itself is refused."""

        spec = resolve_device_spec(self.device.type)
        if spec.memory_bytes is None:
            return None
        local = max(1, dist.env_count("LOCAL_WORLD_SIZE", 1))  # processes on this machine share its RAM
        spec = replace(spec, memory_bytes=spec.memory_bytes // local)
        memory = estimate_memory(model, self.batch_size, spec, self.dtype != torch.float32, self.info.world_size,
                                 self.fsdp, trains_compiled(self.tc.compile, self.device.type), self.tc.optimizer)
        ram = spec.memory_bytes
        if not memory.max_batch_size:
            states = memory.weights + memory.gradients + memory.optimizer
            raise TrainingError(f"not even a micro-batch of 1 × {model.block_size} tokens fits in this machine's "
                                f"{ram / GIB:.1f} GiB of RAM (the model's weights, gradients and "
                                f"{'AdamW and Muon' if self.tc.optimizer == 'muon' else 'AdamW'} state alone "
                                f"take {states / GIB:,.1f} GiB): use a smaller --size or model shape, which "
                                f"`tinygpt plan` sizes")
        if self.tc.auto_batch:
            return memory.max_batch_size
        if memory.total > ram:
            raise TrainingError(
                f"a micro-batch of {self.batch_size} × {model.block_size} tokens needs about "
                f"{memory.total / GIB:,.1f} GiB to train, more than this machine's {ram / GIB:.1f} GiB of RAM; the "
                f"largest that fits is {memory.max_batch_size}: use --batch-size {memory.max_batch_size} (or "
                f"--batch-size auto, which keeps the global batch)"
            )
        return None

    # -------------------------------------------------------------------------------------------- pieces
    def _batches(self, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Micro-batches in (step, micro) order. Rank r's micro m of step s is global micro m*world + r, so N
        ranks with accumulation k see exactly the batches of one process with accumulation N*k."""
        world, rank = self.info.world_size, self.info.rank
        step = start_step
        while True:
            for micro in range(self.grad_accum):
                rng = _batch_generator(self.tc.batch_seed, self.step_offset + step, micro * world + rank)
                yield get_batch(self.train_tokens, self.batch_size, self.block, rng, self.device)
            step += 1

    def _gradient_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced across ranks only on the last micro-step of an optimizer step."""
        if not self.info.enabled or enabled:
            if self.fsdp:
                self.model.set_requires_gradient_sync(True)
            return contextlib.nullcontext()
        if self.fsdp:
            self.model.set_requires_gradient_sync(False)
            return contextlib.nullcontext()
        return self.forward_model.no_sync()

    def _evaluate(self, can_cut: bool = False) -> float | None:
        """Mean loss on the fixed val sample; its batches are split over the ranks and summed back.

        With `can_cut`, None when a stop (a signal) came during it, in one process: it ends at the next batch
        rather than after all of them (many with a large train.eval_batches). Several processes finish it, so
        that every rank takes part in the same collectives."""
        self.model.eval()
        total = torch.zeros(2, device=self.device)
        world, rank = self.info.world_size, self.info.rank
        rounds = -(-len(self.eval_starts) // world)  # every rank runs as many forwards (FSDP gathers in each)
        with torch.no_grad(), autocast_context(self.device, self.dtype):
            for index in range(rank, rounds * world, world):
                if can_cut and self.stop and not self.info.enabled:
                    self.model.train()
                    return None
                counted = index < len(self.eval_starts)
                starts = self.eval_starts[index % len(self.eval_starts)]
                x, y = windows_at(self.val_tokens, starts, self.block, self.device)
                _, loss = self.eval_model(x, y)
                if counted:
                    total[0] += loss.float()
                    total[1] += 1
        self.model.train()
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def note_failure(self, exc: BaseException) -> None:
        """metrics.jsonl's last line says that the run stopped on an error, and which (`tinygpt runs`: failed):
        a run that diverged, ran out of memory, met bad data or could not save is no run killed from outside."""
        if self.looping and self.metrics is not None:
            with contextlib.suppress(OSError):
                self.metrics.note({"kind": "failed", "step": self.saved_step, "error": first_line(exc)})

    def _best_checkpoint(self) -> tuple[Path, ...]:
        """The checkpoint pruning keeps besides the last train.keep_last: the best val loss's (train.keep_best)."""
        if not self.tc.keep_best or self.best_step is None:
            return ()
        return (self.run_dir / "checkpoints" / f"step_{self.best_step}",)

    def _save(self, step: int) -> None:
        """Checkpoint on rank 0 (every rank's RNG state included); the other ranks wait for it."""
        rng_states = dist.all_gather_objects(_rng_state(self.device))
        model_state, optimizer_state = self._full_state()  # collective under FSDP: every rank takes part
        error: TrainingError | None = None
        if self.info.is_main:
            try:
                path = save_checkpoint(self.run_dir, step, self.model, self.optimizer, {
                    "tokens_seen": self.tokens_seen, "best_val_loss": self.best_val, "best_step": self.best_step,
                    "val_loss": self.last_val,
                    "train_loss": self.last_loss, "lr": learning_rate(max(0, step - 1), self.tc, self.lr_rewarm),
                    "lr_rewarm": self.lr_rewarm,
                    "muon_lr": self._muon_lr(max(0, step - 1)), "muon_lr_rewarm": self.muon_rewarm,
                    "rng": rng_states[0], "rng_per_rank": rng_states if self.info.enabled else None,
                    "world_size": self.info.world_size, "skipped_steps": self._skipped_total(), "fsdp": self.fsdp,
                    "val_pending": self.eval_cut,  # the step's evaluation was cut short: a resume runs it first
                    "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,  # fp16
                    "bad_run": int(self.bad_run.item()),  # non-finite steps in a row (MAX_BAD_STEPS stops)
                    "log_window": self.log_window,
                    "data": {"dataset": self.dataset.name,
                             "sampler": "random-windows(data_seed, step_offset + step, micro*world+rank)",
                             "step_offset": self.step_offset,
                             **({"val_sample": self.val_sample} if self.val_sample else {}),
                             "next_step": step, "train_sha256": self.dataset.meta["splits"]["train"].get("sha256"),
                             "remake": remake_command(self.dataset),
                             "split_rule": self.dataset.meta.get("split_rule")},
                    "batch": {"batch_size": self.batch_size, "grad_accum": self.grad_accum},
                    "run_config": config_to_dict(self.cfg), "elapsed_s": self.elapsed(),
                    "init_from_checkpoint": self.init_checkpoint,
                    "saved_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                    "tinygpt_version": __version__,
                    "trackers": self.trackers.state() if self.trackers is not None else None,  # a resume goes on
                }, keep_last=self.tc.keep_last, model_state=model_state, optimizer_state=optimizer_state,
                    keep=self._best_checkpoint())
            except OSError as exc:
                first = self.new_run and latest_checkpoint(self.run_dir) is None  # its folder goes as it ends
                kept = "no checkpoint was saved yet, so the run is not kept" if first else \
                    "the previous checkpoint is intact"
                error = TrainingError(
                    f"could not write the checkpoint of step {step} to {self.run_dir} ({exc.strerror or exc}); "
                    f"{kept}: {_unsaved_advice(exc, self.run_dir, again=first)}"
                )
            else:
                # config.yaml describes the checkpoints: a resume stopped before its first one leaves the run's as
                # it was
                try:
                    write_text_atomic(self.run_dir / "config.yaml", dump_yaml(self.cfg))
                except OSError as exc:
                    error = TrainingError(f"could not write {self.run_dir / 'config.yaml'} ({exc.strerror or exc}); "
                                          f"the checkpoint of step {step} is saved: "
                                          f"{_unsaved_advice(exc, self.run_dir)}")
                else:
                    self.emit(TrainEvent("checkpoint", step=step, max_steps=self.tc.max_steps, message=str(path)))
        dist.agree(error)  # the others wait for it, and stop with rank 0's error rather than a lost connection
        self.saved_step = step

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def _with_dataset(self, spec: str) -> RunConfig:
        self.cfg = replace(self.cfg, data=replace(self.cfg.data, dataset=spec))
        return self.cfg

    def _check_resumable(self) -> None:
        """Refuse a resume that cannot go on: nothing left under the budget, or the data replaced."""
        state, tc = self.state, self.tc
        trained_on = state.get("data") or {}
        recorded, current = trained_on.get("train_sha256"), self.dataset.meta["splits"]["train"].get("sha256")
        if trained_on.get("dataset") == self.dataset.name and recorded and current and recorded != current:
            remake = trained_on.get("remake")
            if isinstance(remake, str) and remake == remake_command(self.dataset):  # the same source and settings:
                source = remake_source(self.dataset)  # its text is what changed, which that command cannot undo
                few = cuts_documents(self.dataset.meta)  # SPLIT_RULE's part earlier versions applied otherwise
                trained_rule, rule_now = trained_on.get("split_rule"), self.dataset.meta.get("split_rule")
                if few and trained_rule and trained_rule != rule_now:
                    raise TrainingError(
                        f"run {self.run_dir.name} trained on data/{self.dataset.name} as an earlier tinygpt cut its "
                        f"few documents into train and val, and this one cuts them otherwise: go on from these "
                        f"weights in a new run with --init-from {self.run_dir.name}")
                rule = ", or an earlier tinygpt cut its few documents into train and val otherwise" \
                    if few and not trained_rule else ""  # a checkpoint from before the rule was recorded
                raise TrainingError(
                    f"the text of {source} changed since run {self.run_dir.name} trained on "
                    f"data/{self.dataset.name}{rule}: put back the text it had and tokenize it again, or start a "
                    f"new run from these weights with --init-from {self.run_dir.name}")
            # --force: the name holds the other text now (made from another source, tokenize asks for it)
            again = f"make it again with `{remake} --force`" if isinstance(remake, str) else \
                "tokenize the original source again with the settings it had (--force replaces the other text)"
            raise TrainingError(
                f"run {self.run_dir.name} trained on data/{self.dataset.name} as it was before it was tokenized "
                f"again from other text or with other settings: resuming would go on with other data: {again}, "
                f"or start a new run from these weights with --init-from {self.run_dir.name}"
            )
        made, saved = self.dataset.meta.get("created"), state.get("saved_at")
        if not recorded and trained_on.get("dataset") == self.dataset.name and _later(made, saved):
            self.emit(TrainEvent("info", message=(  # an earlier tinygpt's checkpoint: the text may be another now
                f"run {self.run_dir.name} was saved by an earlier tinygpt, which recorded no hash of the text it "
                f"trained on, and data/{self.dataset.name} was tokenized again since ({made}): if its text changed, "
                f"this resume goes on with the new text (`tinygpt train --init-from {self.run_dir.name} --name NEW` "
                f"starts a new run from these weights instead)")))
        if recorded and current and recorded != current and trained_on.get("dataset") != self.dataset.name:
            self.emit(TrainEvent("info", message=(
                f"run {self.run_dir.name} trained on {trained_on.get('dataset')}; this resume trains on "
                f"{self.dataset.name}, other text: its val losses (and the best so far) are on another val split")))
        saved_config = state.get("run_config")
        trained_from = ((saved_config or {}).get("train") or {}).get("init_from") or ""
        from tinygpt_cli.export import same_source

        # the same weights named another way (a relative path, a run by its path) are no change, and the run keeps
        # its own record of them
        if isinstance(saved_config, dict) and not same_source(tc.init_from, trained_from):
            raise TrainingError(
                f"--init-from cannot change run {self.run_dir.name} on resume: it goes on from its own checkpoint "
                f"(started from {trained_from or 'scratch'}); drop --init-from, or start a new run with --name"
            )
        trained_with = ((saved_config or {}).get("train") or {}).get("optimizer") or "adamw"
        if isinstance(saved_config, dict) and tc.optimizer != trained_with:
            raise TrainingError(
                f"train.optimizer cannot change run {self.run_dir.name} on resume: its checkpoint holds "
                f"{trained_with}'s state; drop --set train.optimizer, or start a new run from its weights with "
                f"--init-from {self.run_dir.name} --set train.optimizer={tc.optimizer}"
            )
        if isinstance(saved_config, dict) and tc.init_from != trained_from:  # the same, named as the run named it
            self.cfg = replace(self.cfg, train=replace(self.cfg.train, init_from=trained_from))
            self.tc = self.cfg.train
        self._note_batch_change()
        step = int(state.get("step", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        if step >= tc.max_steps or self._token_budget_spent():
            from tinygpt_cli.inventory import reported_step

            # killed between its last checkpoint and its report (rank 0's report: the others take its word, below)
            if not self.info.is_main or reported_step(self.run_dir) != step:
                self.report_only = True
                trained = state.get("batch") if isinstance(state.get("batch"), dict) else {}  # the report's batch row
                self.batch_size = int(trained.get("batch_size") or self.batch_size)  # is the one it trained with
                self.grad_accum = int(trained.get("grad_accum") or self.grad_accum)  # (--batch-size auto's pick)
                limit = "--max-steps" if step >= tc.max_steps else "--max-tokens"
                self.emit(TrainEvent("info", message=(
                    f"run {self.run_dir.name} has trained all it was to (step {step}) but was stopped before it "
                    f"wrote its report.md: writing it now (a larger {limit} trains it further)")))
                return
        if step >= tc.max_steps:
            raise TrainingError(
                f"run {self.run_dir.name} is already at step {step} of {tc.max_steps}: pass a larger "
                f"--max-steps to train it further"
            )
        self.lr_rewarm = self._resumed_schedule(step)
        if tc.optimizer == "muon":
            self.muon_rewarm = self._resumed_schedule(step, muon=True)
        if self._token_budget_spent():
            raise TrainingError(
                f"run {self.run_dir.name} has seen {self.tokens_seen:,} tokens, its --max-tokens budget of "
                f"{tc.max_tokens:,}: pass a larger --max-tokens (or --set train.max_tokens=0 for none) to go on"
            )

    def _check_data_unchanged(self) -> None:
        """Refuse to train on a dataset replaced since it was read: a `tokenize --force` that looked for runs on it
        before this one's config.yaml named it saw none, and may have put other text in place since (review). The
        run would train on the text it read and record it, and its resume be refused."""
        now = train_sha256(self.dataset.path)  # None: gone or unreadable, which the next read of it says
        if now is not None and now != self.dataset.meta["splits"]["train"].get("sha256"):
            again = "resume it again" if self.checkpoint is not None else "start it again"
            raise TrainingError(f"data/{self.dataset.name} was tokenized again while this run was starting, after it "
                                f"had read the text: {again} to train on the new text")

    def _muon_lr(self, step: int) -> float | None:
        """Muon's LR at optimizer step `step` (None without Muon): its own schedule and climb (`muon_schedule`)."""
        if self.tc.optimizer != "muon":
            return None
        return learning_rate(step, muon_schedule(self.tc), self.muon_rewarm)

    def _resumed_schedule(self, step: int, muon: bool = False) -> tuple[int, float] | None:
        """The LR climb (see `learning_rate`) this resume goes on with. The saved one while the schedule is the
        run's own; a new one, and a note, when the schedule changed (a larger --max-steps, another train.lr) and
        its LR at `step` is above the LR the run last trained with. `muon`: the same for Muon's LR, from the Muon
        LR the run last trained with (a new train.muon_lr, or train.lr, changes its schedule too)."""
        saved = self.state.get("muon_lr_rewarm" if muon else "lr_rewarm")
        trained = (self.state.get("run_config") or {}).get("train") or {}
        if all(trained.get(key) == getattr(self.tc, key) for key in SCHEDULE_KEYS + (("muon_lr",) if muon else ())):
            return (int(saved[0]), float(saved[1])) if saved else None
        schedule = muon_schedule(self.tc) if muon else self.tc
        last, target = self.state.get("muon_lr" if muon else "lr"), learning_rate(step, schedule)
        if last is None or step < self.tc.warmup_steps or self.tc.warmup_steps == 0 or target <= 1.01 * last:
            return None
        rewarm = (step, float(last))
        # what the climb reaches within the steps left (a short extension ends before the climb would)
        climb = [learning_rate(s, schedule, rewarm) for s in range(step, min(step + self.tc.warmup_steps,
                                                                             self.tc.max_steps))]
        peak = max(climb)
        if peak > 1.01 * last:
            was = trained.get("max_steps")
            span = f"goes from {was} to {self.tc.max_steps} steps" if was != self.tc.max_steps else "changed"
            rise = climb.index(peak) + 1
            whose = "Muon's" if muon else "the"
            self.emit(TrainEvent("info", message=(
                f"the schedule of run {self.run_dir.name} {span}: {whose} learning rate rises from {last:.1e} to "
                f"{peak:.1e} over the next {rise} step{'s' if rise > 1 else ''} (at most train.warmup_steps, "
                f"{self.tc.warmup_steps}), then follows it")))
        return rewarm

    def _note_batch_change(self) -> None:
        """Say so when a resume changes the global batch (another process count, --batch-size or --grad-accum):
        the run goes on, but each step then sees another number of tokens than before."""
        saved, world = self.state.get("batch") or {}, int(self.state.get("world_size") or 1)
        if not saved.get("batch_size") or not saved.get("grad_accum"):
            return
        before = int(saved["batch_size"]) * int(saved["grad_accum"]) * world
        now = self.tc.batch_size * self.tc.grad_accum * self.info.world_size
        if now == before:
            return
        world_now = self.info.world_size
        # the accumulation alone, else the largest micro-batch up to this one that the step divides into (QA: with
        # no --grad-accum to offer, it offered nothing)
        split = next(((b, before // (b * world_now)) for b in range(self.tc.batch_size, 0, -1)
                      if before % (b * world_now) == 0), None)
        hint = "" if split is None else f"; --grad-accum {split[1]} keeps it" if split[0] == self.tc.batch_size \
            else f"; --batch-size {split[0]} --grad-accum {split[1]} keeps it"
        processes = workspace.counted(world, "process", "processes")
        self.emit(TrainEvent("info", message=(
            f"run {self.run_dir.name} trained with {before} sequences per step ({processes} × "
            f"{saved['batch_size']} × {saved['grad_accum']} accumulation); this resume takes {now} "
            f"({self.info.world_size} × {self.tc.batch_size} × {self.tc.grad_accum}){hint}")))

    def _window_loss(self, loss_sum: torch.Tensor, skipped: torch.Tensor, bad_run: torch.Tensor,
                     norm_sum: torch.Tensor, steps: int) -> tuple[float | None, float, float, float | None]:
        """(mean train loss of the `steps` steps since the last log step, or None if all were skipped; skipped
        steps and the run of non-finite steps, summed over the ranks; the steps' mean gradient norm, before
        clipping), read at a log step, an evaluation or a stop. Collective: every rank calls it at the same step.
        A host sync.

        Kept as `log_window` for the checkpoint, so a resume goes on with the window's sums and logs what one
        uninterrupted run does."""
        stats = torch.stack([loss_sum, skipped, bad_run, norm_sum])
        dist.all_reduce(stats)
        loss_total, skipped_now, bad_now, norm_total = stats.tolist()
        self.log_window = {"steps": steps, "loss_total": loss_total, "skipped": skipped_now,
                           **({} if self.norm_unknown else {"grad_norm_total": norm_total})}
        good = steps * self.info.world_size - skipped_now
        if good <= 0:
            return None, skipped_now, bad_now, None
        return loss_total / good, skipped_now, bad_now, None if self.norm_unknown else norm_total / good

    def _skipped_total(self) -> int:
        """Skipped steps so far: those of the logged windows and of the window in progress at the last read."""
        return self.skipped + (round(self.log_window["skipped"] / self.info.world_size) if self.log_window else 0)

    def _token_budget_spent(self) -> bool:
        return bool(self.tc.max_tokens) and self.tokens_seen >= self.tc.max_tokens

    def _stop_reason(self, step: int) -> str:
        """Why to stop now ("" = go on), agreed by all ranks so none waits in a collective alone."""
        tc = self.tc
        code = 0
        if self.stop:
            code = 3
        elif (tc.max_minutes and step > self.session_first_step
              and time.perf_counter() - self.loop_started >= tc.max_minutes * 60):
            code = 2  # wall time of this invocation (a scheduler slot), after at least one step
        elif self._token_budget_spent():
            code = 1
        signum = self.stop.signal if self.stop else 0
        if self.info.enabled:  # with the signal, so that every rank passes it on after (see `train`)
            code, signum = (int(value) for value in dist.all_reduce(
                torch.tensor([code, signum], device=self.device), op="max").tolist())
        if code == 3 and not self.stop:
            self.stop.reason, self.stop.signal = "interrupted", signum
        return {0: "", 1: "token_limit", 2: "time_limit", 3: self.stop.reason or "interrupted"}[code]

    # -------------------------------------------------------------------------------------------- loop
    def _loop(self) -> TrainResult:
        cfg, tc, info, device = self.cfg, self.tc, self.info, self.device
        state = self.state
        start_step = int(state.get("step", 0))
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.best_val: float | None = state.get("best_val_loss")
        self.best_step: int | None = state.get("best_step")
        if self.best_step is None and self.best_val is not None:  # a checkpoint of before train.keep_best
            self.best_step = _step_of_val_loss(self.run_dir, self.best_val)
        self.looping = True  # a failure from here on is the run's, not a refusal to start it
        self.last_loss: float | None = state.get("train_loss")
        self.last_val: float | None = state.get("val_loss")
        self.skipped = int(state.get("skipped_steps", 0))
        self.elapsed_before = float(state.get("elapsed_s", 0.0))
        self.eval_model = self.forward_model.module if (info.enabled and not self.fsdp) else self.forward_model
        if info.is_main and self.checkpoint is None:  # a resume's goes with its next checkpoint (see `_save`)
            write_text_atomic(self.run_dir / "config.yaml", dump_yaml(cfg))
        val_pending = self.checkpoint is not None and bool(state.get("val_pending"))
        metrics = _Metrics(self.run_dir / "metrics.jsonl", start_step if self.checkpoint else None, info.is_main,
                           drop_eval=val_pending)
        self.metrics = metrics  # closed by train() whatever ends the loop
        self.wrote_files = True  # config.yaml and metrics.jsonl written over: this run's own now, to drop with it
        with dist.agreed():  # config.yaml names the dataset now: a tokenize of it from here on sees this run
            self._check_data_unchanged()
        with dist.agreed():  # a wandb that cannot start stops every rank, not rank 0 alone
            trackers = parse_trackers(tc.log_to)
            if info.is_main and trackers:
                self.trackers = metrics.trackers = Trackers(
                    trackers, self.run_dir, config_to_dict(cfg), dump_yaml(cfg),
                    start_step if self.checkpoint else None, state.get("trackers"),
                    note=lambda message: self.emit(TrainEvent("info", message=message)))
        self.started = time.perf_counter()  # after the trackers: their start-up is not training time
        tokens_per_step = self.batch_size * self.grad_accum * self.block * info.world_size
        flops_token = flops_per_token(self.model)
        peak = device_peak_flops(device, self.dtype)
        unigram = unigram_loss(self.train_tokens, self.val_tokens)
        legacy = self.checkpoint is not None and "val_sample" not in (state.get("data") or {})
        self.eval_starts = val_sample_starts(len(self.val_tokens), self.block, self.batch_size, tc.eval_batches,
                                             tc.seed if legacy else None)
        self.val_sample = None if legacy else VAL_SAMPLE
        for starts in self.eval_starts:  # read at every evaluation: a bad id is an error now, not mid-run
            checked_windows(self.val_tokens, starts, self.block)
        autocast = autocast_context(device, self.dtype)
        self.emit(TrainEvent("start", step=start_step, max_steps=tc.max_steps, tokens=self.tokens_seen, data={
            "run_dir": str(self.run_dir), "dataset": self.dataset.name, "device": str(device),
            "dtype": str(self.dtype).split(".")[-1], "parameters": self.model.num_params(),
            "tokens_per_step": tokens_per_step, "world_size": info.world_size,
            "batch_size": self.batch_size, "grad_accum": self.grad_accum,
            "train_tokens": len(self.train_tokens), "val_tokens": len(self.val_tokens),
            "unigram_val_loss": unigram, "resumed_from": str(self.checkpoint) if self.checkpoint else None,
            "compiled": self.model is not (self.eval_model), "peak_flops": peak, "optimizer": tc.optimizer,
        }))
        heavy = heavy_evaluation_note(tc, self.batch_size, self.batch_size * self.grad_accum * info.world_size)
        if heavy and info.is_main:
            self.emit(TrainEvent("info", message=heavy))
        if self.checkpoint is not None:
            rank_rng = _rank_rng(state, info.rank)
            if rank_rng is not None:
                _restore_rng(rank_rng)  # last, so nothing before the first step draws from it

        # Non-finite steps are skipped without a host sync: fused AdamW reads `found_inf` on the device.
        found_inf = torch.zeros((), device=device)
        skipped_in_window = torch.zeros((), device=device)
        bad_run = torch.zeros((), device=device)  # non-finite steps in a row, up to the last (a resume goes on)
        if self.checkpoint is not None:
            bad_run.fill_(float(state.get("bad_run") or 0))
        self.bad_run = bad_run
        on_device = skips_on_device(device)
        if self.scaler is None and on_device:
            self.optimizer.found_inf = found_inf  # type: ignore[attr-defined]
        loss_sum = torch.zeros((), device=device)
        norm_sum = torch.zeros((), device=device)  # the window's gradient norms (before clipping), as loss_sum
        window_steps = 0
        self.log_window: dict[str, float] | None = None
        saved_window = state.get("log_window") if self.checkpoint is not None else None
        # a window saved before gradient norms were summed: its norm is unknown (null) at its log step, not low
        self.norm_unknown = bool(saved_window) and "grad_norm_total" not in saved_window
        if saved_window:  # go on with its sums
            # they are over the ranks that saved them (per-rank mean losses, skips counted on each rank): another
            # number of processes takes them scaled to its own, so the window's mean and skips read the same
            scale = info.world_size / max(1, int(state.get("world_size") or 1))
            saved_window = {**saved_window, "loss_total": float(saved_window["loss_total"]) * scale,
                            "skipped": float(saved_window["skipped"]) * scale,
                            "grad_norm_total": float(saved_window.get("grad_norm_total") or 0.0) * scale}
            window_steps = int(saved_window["steps"])
            if info.is_main:  # the sums are over all ranks: one rank carries them into the next all-reduce
                loss_sum.fill_(float(saved_window["loss_total"]))
                skipped_in_window.fill_(float(saved_window["skipped"]))
                norm_sum.fill_(float(saved_window["grad_norm_total"]))
            self.log_window = saved_window
            self.skipped -= round(float(saved_window["skipped"]) / info.world_size)  # counted again at the log
        window_began = time.perf_counter()
        window_tokens = 0
        self.session_first_step = start_step
        self.eval_cut = False  # a stop ended an evaluation early (see `_eval_and_save`)
        # the step of the last checkpoint, kept on every rank: only rank 0's filesystem need hold the checkpoints,
        # and every rank must agree whether a stop saves (a collective)
        self.saved_step = start_step
        self.loop_started = time.perf_counter()
        batches = self._batches(start_step)
        x, y = next(batches)
        step = start_step
        stopped = ""
        failure: DataError | None = None
        self.model.train()
        with _stop_on_signals(self.stop):
            try:
                if val_pending:  # the evaluation a stop cut short at this step: as the uninterrupted run has it
                    self._eval_and_save(step, metrics)
                    window_began = time.perf_counter()
                if start_step == 0 and tc.init_from:  # where a fine-tune starts: its weights' val loss (no save)
                    self._evaluate_start(metrics)
                    window_began = time.perf_counter()
                while step < tc.max_steps:
                    stopped = self._stop_reason(step)
                    if stopped:
                        break
                    lr = learning_rate(step, tc, self.lr_rewarm)
                    muon_lr = self._muon_lr(step)
                    set_learning_rate(self.optimizer, lr, muon_lr)
                    step_loss = torch.zeros((), device=device)
                    for micro in range(self.grad_accum):
                        last_micro = micro == self.grad_accum - 1
                        with self._gradient_sync(last_micro):
                            with autocast:
                                _, loss = self.forward_model(x, y)
                            x, y = next(batches)  # prefetch: host work overlaps the device's forward
                            scaled = loss / self.grad_accum
                            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
                        step_loss += loss.detach().float() / self.grad_accum
                    if self.scaler is not None:
                        self.scaler.unscale_(self.optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip or float("inf"))
                    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                        grad_norm = grad_norm.full_tensor()
                    bad = ~(torch.isfinite(step_loss) & torch.isfinite(grad_norm))
                    if self.scaler is not None:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        found_inf.copy_(bad.float())
                        if on_device or not bool(bad):  # MPS: skipped here (a sync per step)
                            self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped_in_window += bad.float()
                    bad_run.mul_((bad).float()).add_(bad.float())
                    loss_sum += torch.where(bad, torch.zeros_like(step_loss), step_loss)
                    norm_sum += torch.where(bad, torch.zeros_like(step_loss), grad_norm.float())
                    step += 1
                    window_steps += 1
                    self.tokens_seen += tokens_per_step
                    window_tokens += tokens_per_step
                    if step % tc.log_interval == 0 or step == tc.max_steps:
                        loss, skipped_now, bad_now, grad_norm_mean = self._window_loss(
                            loss_sum, skipped_in_window, bad_run, norm_sum, window_steps)  # the window's one host sync
                        self.skipped += round(skipped_now / info.world_size)
                        if skipped_now:
                            self.emit(TrainEvent("info", step=step, message=f"{skipped_now / info.world_size:.0f} "
                                                 f"step(s) with a non-finite loss or gradient skipped by step {step}"))
                        if bad_now / info.world_size >= MAX_BAD_STEPS:
                            raise self._diverged(f"{MAX_BAD_STEPS} steps in a row had a non-finite loss or gradient")
                        loss_sum.zero_()
                        norm_sum.zero_()
                        skipped_in_window.zero_()
                        self.log_window = None
                        self.norm_unknown = False
                        if loss is not None:
                            self.last_loss = loss
                            now = time.perf_counter()
                            rate = window_tokens / max(1e-9, now - window_began)
                            if peak and device.type == "cpu" and rate * flops_token > peak * info.world_size:
                                peak = rate * flops_token / info.world_size  # the best rate seen is the peak
                            mfu = rate * flops_token / (peak * info.world_size) if peak else None
                            metrics.write({"kind": "train", "step": step, "loss": self.last_loss,
                                           "grad_norm": grad_norm_mean, "lr": lr,
                                           **({"muon_lr": muon_lr} if muon_lr is not None else {}),
                                           "tokens": self.tokens_seen, "tokens_per_s": rate, "mfu": mfu,
                                           "elapsed_s": self.elapsed()})
                            self.emit(TrainEvent("step", step=step, max_steps=tc.max_steps, loss=self.last_loss,
                                                 lr=lr, tokens=self.tokens_seen, tokens_per_s=rate, mfu=mfu,
                                                 elapsed_s=self.elapsed()))
                        window_began, window_tokens, window_steps = time.perf_counter(), 0, 0
                    if step % tc.eval_interval == 0 or step == tc.max_steps:
                        if window_steps:  # the checkpoint records the train loss of the steps since the last log
                            self.last_loss = self._window_loss(loss_sum, skipped_in_window, bad_run, norm_sum,
                                                               window_steps)[0] or self.last_loss
                        paused = time.perf_counter()
                        self._eval_and_save(step, metrics)
                        # eval and save time is not training throughput: the window's steps before it still count
                        window_began += time.perf_counter() - paused
            except DataError as exc:  # a window past the vocabulary (`windows_at`): the steps done are kept below
                if info.enabled:  # a save is collective, and the other ranks go on into the step's all-reduce
                    raise
                failure = exc
            except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError on torch >= 2.5, any device
                raise self._out_of_memory(step == start_step) from None
            if window_steps:  # stopped between log steps: the train loss of the steps since the last one
                self.last_loss = self._window_loss(loss_sum, skipped_in_window, bad_run, norm_sum,
                                                   window_steps)[0] or self.last_loss
            if step != self.saved_step:
                self._save(step)  # stopped between evals (signal, time or token limit): keep the work
            if not stopped and self.eval_cut:  # a signal during the last evaluation, which it cut short
                stopped = self.stop.reason or "interrupted"
        if failure is not None:  # the same window comes at the same step of a resume: the data must change first
            saved = f"; the {step} steps trained are saved: once it is tokenized again, go on from them with " \
                f"`tinygpt train --init-from {self.run_dir.name}`" if step > 0 else ""
            raise DataError(f"{failure}{saved}") from None
        seconds = time.perf_counter() - self.started
        trained_tokens = (step - start_step) * tokens_per_step
        result = TrainResult(
            run_dir=self.run_dir, steps=step, tokens=self.tokens_seen, seconds=seconds,
            tokens_per_s=trained_tokens / max(seconds, 1e-9), final_loss=self.last_loss, final_val_loss=self.last_val,
            best_val_loss=self.best_val, unigram_val_loss=unigram, stopped=stopped or "completed",
            skipped_steps=self._skipped_total(), first_step=start_step, max_steps=tc.max_steps,
            best_step=self.best_step,
        )
        # a resume stopped before its first step keeps the run's report; one of a run at its end writes the report
        # its kill left unwritten
        if step > start_step or val_pending or self.report_only:
            report_model = self._report_model()
            if info.is_main:
                try:
                    self._write_report(result, report_model)
                except OSError as exc:
                    advice = _unsaved_advice(exc, self.run_dir).removesuffix(", then resume with --resume")
                    raise TrainingError(f"could not write {self.run_dir / 'report.md'} ({exc.strerror or exc}); the "
                                        f"checkpoints are saved: {advice}, then `tinygpt train --resume --name "
                                        f"{self.run_dir.name}` writes it") from None
        self.emit(TrainEvent("done", step=step, max_steps=tc.max_steps, loss=self.last_loss, val_loss=self.last_val,
                             tokens=self.tokens_seen, elapsed_s=self.elapsed(), message=result.stopped))
        return result

    def _out_of_memory(self, first_step: bool) -> TrainingError:
        """The message for a device OOM: at the first step, with the largest micro-batch that does fit."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if not first_step:
            return TrainingError(f"out of {self.device.type} memory mid-run: resume with --resume and a smaller "
                                 f"--batch-size (or --batch-size auto)")
        fits = 0
        if self.device.type == "cuda" and self.batch_size > 1:
            try:
                fits = self._largest_batch(self.batch_size // 2)
            except TrainingError:
                fits = 0
        hint = f"the largest that fits is {fits}: use --batch-size {fits}" if fits else "use a smaller --batch-size"
        return TrainingError(f"a micro-batch of {self.batch_size} × {self.block} tokens does not fit in "
                             f"{self.device.type} memory; {hint} (or --batch-size auto, which keeps the global batch)")

    def _diverged(self, what: str) -> TrainingError:
        """The error that stops a run whose weights went non-finite, with what to do about it."""
        name, lower = self.run_dir.name, f"{self.tc.lr / 10:g}"
        if self.saved_step == 0:
            return TrainingError(f"{what} (diverged): lower train.lr (now {self.tc.lr:g}; e.g. --lr {lower}) and start "
                                 f"the run again")
        return TrainingError(f"{what} (diverged): lower train.lr (now {self.tc.lr:g}) and resume from its last "
                             f"checkpoint (step {self.saved_step}: `tinygpt train --resume --name {name} --lr "
                             f"{lower}`), or start a new run from an earlier one (--init-from "
                             f"runs/{name}/checkpoints/step_N)")

    def _eval_and_save(self, step: int, metrics: _Metrics) -> None:
        # the last step's evaluation always finishes: a run at max_steps cannot be resumed to measure it
        val = self._evaluate(can_cut=step < self.tc.max_steps)
        if val is None:  # stopped during it: keep the step's work, with the last val loss measured
            self.eval_cut = True
            self.emit(TrainEvent("info", step=step, message=f"evaluation of step {step} cut short by the stop; "
                                                            f"its checkpoint is saved without one (a resume runs it)"))
            self._save(step)
            return
        self.last_val = val
        if not math.isfinite(self.last_val):  # never save (and point `latest` at) weights that are NaN
            raise self._diverged(f"the val loss is {self.last_val} at step {step}, so that checkpoint is not saved")
        if self.best_val is None or self.last_val < self.best_val:
            self.best_val, self.best_step = self.last_val, step
        self._record_eval(step, self.last_val, metrics)
        if self.info.is_main:
            with contextlib.suppress(OSError):  # a picture: a full disk is said by the checkpoint that follows
                write_loss_plot(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        self._save(step)
        for task, examples in self.tasks:  # after the checkpoint: a stop or a failure during them loses no step
            if not self._score_task(task, examples, step, metrics):
                break

    def _score_task(self, task: Any, examples: list[Any], step: int, metrics: _Metrics) -> bool:
        """A task of train.eval_task, zero-shot, on the weights of `step`: each rank scores its share of the examples
        and the sums are added up. The plain module scores them (no compile, whose shapes they would change, nor
        DDP). One process that is stopping skips it, and says False (the tasks after it are skipped too): its
        checkpoint is saved, and `tinygpt eval --task` scores it later."""
        from tinygpt_cli.evaluation import task_figures, task_sums

        if self.stop and not self.info.enabled:
            return False
        mine = examples[self.info.rank :: self.info.world_size]
        started = time.perf_counter()

        def cut_if_stopping(done: int, total: int) -> None:  # one process: a stop ends it at the next batch
            if self.stop and not self.info.enabled:
                raise _TaskCut

        self.model.eval()
        try:
            sums = task_sums(task, self.model, mine, autocast=autocast_context(self.device, self.dtype),
                             on_progress=cut_if_stopping) if mine else (0.0, 0.0)
        except _TaskCut:
            self.emit(TrainEvent("info", step=step, message=f"{task.name} of step {step} cut short by the stop (its "
                                                            f"checkpoint is saved: `tinygpt eval --task {task.name}` "
                                                            f"scores it)"))
            return False
        finally:
            self.model.train()
        if self.info.enabled:
            total = torch.tensor(sums, dtype=torch.float64, device=self.device)
            dist.all_reduce(total)
            sums = tuple(total.tolist())
        figures = {key: value for key, value in task_figures(task, sums, len(examples)).items() if value is not None}
        record = {"kind": task.name, "step": step,
                  **{key: value if math.isfinite(value) else None for key, value in figures.items()},
                  "examples": len(examples), "seconds": time.perf_counter() - started, "tokens": self.tokens_seen,
                  "elapsed_s": self.elapsed()}
        metrics.write(record)  # metrics.jsonl, and `<task>/accuracy` ... to the trackers
        self.emit(TrainEvent("task", step=step, max_steps=self.tc.max_steps, tokens=self.tokens_seen,
                             elapsed_s=self.elapsed(), data=record))
        return True

    def _evaluate_start(self, metrics: _Metrics) -> None:
        """The val loss of the weights a run starts from (train.init_from), at step 0, as nanoGPT measures its
        iteration 0: the curve then shows what the fine-tune gained. It is no checkpoint's: the best val loss and
        the report's figures stay those of the steps trained."""
        val = self._evaluate(can_cut=True)
        if val is None:
            return
        if not math.isfinite(val):  # metrics.jsonl is strict JSON; the weights' first steps will say more
            self.emit(TrainEvent("info", step=0, message=f"the val loss of {self.tc.init_from} is {val}: its "
                                                         "weights hold non-finite values"))
            return
        self._record_eval(0, val, metrics)

    def _record_eval(self, step: int, val: float, metrics: _Metrics) -> None:
        """A val loss into metrics.jsonl and to the caller's events."""
        metrics.write({"kind": "eval", "step": step, "val_loss": val, "tokens": self.tokens_seen,
                       "elapsed_s": self.elapsed()})
        self.emit(TrainEvent("eval", step=step, max_steps=self.tc.max_steps, val_loss=val, tokens=self.tokens_seen,
                             elapsed_s=self.elapsed()))

    def _report_model(self) -> torch.nn.Module:
        """A model rank 0 can sample from alone: under FSDP an unsharded CPU copy (collective to build)."""
        model_state, _ = self._full_state() if self.fsdp else (None, None)
        if model_state is None or not self.info.is_main:  # with cpu_offload only rank 0 receives the tensors
            return self.model
        plain = GPT(self.cfg.model)
        plain.load_state_dict(model_state)
        return plain

    def _write_report(self, result: TrainResult, model: torch.nn.Module) -> None:
        write_report(self.run_dir, self.cfg, result, self.dataset.summary(), {
            "device": str(self.device), "dtype": str(self.dtype).split(".")[-1], "world_size": self.info.world_size,
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else _cpu_name(),
            "torch": torch.__version__, "batch_size": self.batch_size, "grad_accum": self.grad_accum,
        }, model, self.init_checkpoint)


def _later(first: Any, second: Any) -> bool:
    """Whether ISO time `first` is after `second` (False where either is missing or not a time)."""
    try:
        return _dt.datetime.fromisoformat(first) > _dt.datetime.fromisoformat(second)
    except (TypeError, ValueError):
        return False


def _rank_rng(state: dict[str, Any], rank: int) -> dict[str, Any] | None:
    """The RNG state rank `rank` goes on with; None for a rank the checkpoint has none for (a resume on more
    processes), which keeps its own stream (seed + 1 + rank) rather than repeat rank 0's dropout masks."""
    per_rank = state.get("rng_per_rank")
    if per_rank and rank < len(per_rank):
        return per_rank[rank]
    return state["rng"] if rank == 0 else None


def _cpu_name() -> str:
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def largest_step_batch(model: GPT, start: int, block: int, device: torch.device, dtype: torch.dtype,
                       compile_mode: str) -> int:
    """The largest micro-batch from `start` down (halving) whose training step fits, compiled (`compile_mode`) or
    not: what --batch-size auto takes on CUDA."""
    ballast = 0
    if compile_wanted(compile_mode, device.type):
        ballast = loss_chunk_bytes(model.config, 1, dtype != torch.float32, compiled=True)
    return largest_fitting_batch(model, start, block, device, dtype, ballast)


def largest_fitting_batch(model: GPT, start: int, block: int, device: torch.device, dtype: torch.dtype,
                          ballast_per_token: int = 0) -> int:
    """Halve the micro-batch from `start` until a forward + backward at full context fits in GPU memory.

    The trial runs eagerly with the fused loss. A model that will run compiled takes its loss from whole logits
    instead: `ballast_per_token` bytes per token are held during the trial for those (and eager activations
    already exceed compiled ones, which recompute cheap results), so the answer holds for the compiled step.
    """
    fused, model.fused_loss = model.fused_loss, True
    batch = start
    try:
        while batch >= 1:
            if _batch_fits(model, batch, block, device, dtype, ballast_per_token):
                return batch
            torch.cuda.empty_cache()  # the trial's tensors died with its frame: the next trial has their memory
            batch //= 2
    finally:
        model.fused_loss = fused
    raise TrainingError("not even a micro-batch of 1 fits in GPU memory: use a smaller --size or model.block_size")


def _batch_fits(model: GPT, batch: int, block: int, device: torch.device, dtype: torch.dtype,
                ballast_per_token: int) -> bool:
    """One trial of `largest_fitting_batch`, in a frame of its own so that what it allocated is freed on return."""
    try:
        ballast = _hold(batch * block * ballast_per_token, device)  # noqa: F841 (held through the trial)
        x = torch.zeros(batch, block, dtype=torch.long, device=device)
        with autocast_context(device, dtype):
            _, loss = model(x, x)
        loss.backward()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        model.zero_grad(set_to_none=True)


def _hold(n_bytes: int, device: torch.device) -> torch.Tensor | None:
    """Allocate `n_bytes` on `device` (raises the device's out-of-memory error where they do not fit)."""
    return torch.empty(n_bytes, dtype=torch.uint8, device=device) if n_bytes else None


# the shapes (model, batch, dtype, device) trained compiled in this process since dynamo's caches were last emptied
_COMPILED_SHAPES: list[tuple] = []
COMPILED_SHAPES_KEPT = 3


def _make_room_to_compile(key: tuple) -> None:
    """Before compiling a training of the shape `key`. torch.compile keeps each graph of a function (GPT.forward:
    a training and an evaluation graph per shape) up to its recompile limit, 8, and past it runs the function
    eagerly without a word: a notebook's sweep over model sizes trained its fifth run and on uncompiled, on the
    slow loss path, while it recorded itself as compiled (API QA). So once COMPILED_SHAPES_KEPT other shapes were
    compiled, dynamo's caches are emptied and this one compiles afresh; the same shape again reuses its graphs."""
    if key in _COMPILED_SHAPES:
        return
    if len(_COMPILED_SHAPES) >= COMPILED_SHAPES_KEPT:
        torch._dynamo.reset()
        _COMPILED_SHAPES.clear()
    _COMPILED_SHAPES.append(key)


def _maybe_compile(model: GPT, mode: str, device: torch.device, emit: Callable[[TrainEvent], None],
                   shape: tuple[int, int], dtype: torch.dtype,
                   wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> torch.nn.Module:
    """torch.compile on CUDA by default; `on` elsewhere too. Falls back to eager with one line if it fails.
    Returns `wrap(model)` (e.g. DDP), compiled inside where it can be.

    Compiled, the model takes its loss from whole logits (`GPT.fused_loss` off: inductor fuses the upcast and the
    cross-entropy itself). Compilation is lazy, so one training step of the real shape under the real autocast
    runs here, through `wrap` (no gradient sync; its gradients are dropped): it compiles the very graphs the loop
    runs, with static shapes (under DDP split at its buckets, so gradient sync overlaps the backward pass), and a
    missing Triton or C++ compiler shows here rather than mid-run.
    """
    wrap = wrap or (lambda module: module)
    if not compile_wanted(mode, device.type):
        return wrap(model)
    if device.type == "mps":
        emit(TrainEvent("info", message="torch.compile is not supported on MPS: running eagerly."))
        return wrap(model)
    model.fused_loss = False
    _make_room_to_compile((tuple(sorted(vars(model.config).items())), shape, str(dtype), device.type))
    failure: Exception | None = None
    try:
        wrapped = wrap(torch.compile(model, dynamic=False))
        # two tensors, as in the loop: one passed twice would be guarded as an alias and compiled again at step 1
        idx, targets = (torch.zeros(shape, dtype=torch.long, device=device) for _ in range(2))
        with getattr(wrapped, "no_sync", contextlib.nullcontext)():
            with autocast_context(device, dtype):
                _, loss = wrapped(idx, targets)
            loss.backward()
    except torch.cuda.OutOfMemoryError:  # the caller says which batch fits
        raise
    except Exception as exc:  # Triton missing, no C++ compiler, unsupported platform, ...
        failure = exc
    finally:
        model.zero_grad(set_to_none=True)
    # every rank compiled, or every rank runs eagerly: a rank whose machine lacks the compiler must not wrap (DDP,
    # a collective) again alone. (The probe under DDP's no_sync runs no collective, so all ranks get here.)
    failed = dist.all_gather_objects(None if failure is None else compile_failure(failure))
    reason = next((name for name in failed if name is not None), None)
    if reason is None:
        return wrapped
    model.fused_loss = True
    emit(TrainEvent("info", message=f"torch.compile unavailable ({reason}): running eagerly."))
    return wrap(model)


def _check_same_settings(cfg: RunConfig) -> None:
    """Every rank must run rank 0's settings (machines started with another config file or flag would part ways
    at the first evaluation or the last step, one waiting for the other forever): all ranks stop if not."""
    settings = dist.all_gather_objects(flat_config(config_to_dict(cfg)))
    differ = sorted({key for other in settings[1:] for key in settings[0].keys() | other.keys()
                     if settings[0].get(key) != other.get(key)})
    if differ:
        raise TrainingError(f"some ranks were started with other settings than rank 0 ({', '.join(differ)}): "
                            f"start every machine with the same command and config file")


def check_run_name(name: str) -> None:
    """A new run's name must be one plain folder name under runs/ (no `..`, no slash, nothing hidden)."""
    problem = workspace.name_problem(name, "runs/", "my-run")
    if problem:
        raise TrainingError(problem)


def _step_of_val_loss(run_dir: Path, loss: float) -> int | None:
    """The step whose checkpoint holds val loss `loss`, from metrics.jsonl's evaluations (a run saved before
    state.json recorded best_step), where that checkpoint is still there; else None."""
    try:
        _, evals = read_metrics(run_dir / "metrics.jsonl")
    except (OSError, UnicodeDecodeError):
        return None
    return next((step for step, value in reversed(evals)
                 if value == loss and (run_dir / "checkpoints" / f"step_{step}").is_dir()), None)


def _trained_dataset(run_dir: Path) -> str:
    """The dataset a run's latest checkpoint trained on ("" if it does not say, or there is none)."""
    return str(_trained_data(run_dir).get("dataset") or "")


def _trained_data(run_dir: Path) -> dict[str, Any]:
    """What a run's latest checkpoint says of its data (state.json's `data`), or {}."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return {}
    try:
        data = read_state(checkpoint).get("data")
    except TinyGPTError:
        return {}  # a damaged state.json is reported where the checkpoint is loaded
    return data if isinstance(data, dict) else {}


def _gone_dataset_advice(run_dir: Path, spec: str) -> str | None:
    """For a resume whose dataset `spec` is not in the workspace: the command that makes it again, byte for byte
    (`data.remake_command`, kept in the run's checkpoint), where the run recorded one."""
    trained = _trained_data(run_dir)
    remake = trained.get("remake")
    if not spec or trained.get("dataset") != spec or not isinstance(remake, str) or \
            (workspace.data_dir() / spec).exists():
        return None
    return (f"run {run_dir.name} trained on data/{spec}, which is gone: make it again with `{remake}` (the same "
            f"tokens: tokenizing is deterministic), then resume")


@contextlib.contextmanager
def _resume_advice() -> Iterator[None]:
    """A damaged checkpoint met by --resume: the advice that fits train, which takes no checkpoint path."""
    try:
        yield
    except DamagedCheckpoint as exc:
        raise TrainingError(f"{exc.what}: {exc.resume_advice()}") from None


def run_config_of(run_dir: str | Path) -> RunConfig:
    """The resolved config a run trains with: its config.yaml, else the copy in its latest checkpoint. `run_dir`:
    the run's folder, or its name in the workspace (as `tinygpt runs` lists it)."""
    import yaml

    from tinygpt_cli.checkpoint import find_run

    run_dir = find_run(str(run_dir))  # a name or a folder; none: "no run ... (did you mean ...)"
    path = run_dir / "config.yaml"
    if not path.is_file():
        checkpoint = latest_checkpoint(run_dir)
        with _resume_advice():
            saved = read_state(checkpoint).get("run_config") if checkpoint is not None else None
        if not isinstance(saved, dict):
            raise TrainingError(f"{run_dir} has no config.yaml: it is not a tinygpt run folder")
        return config_from_dict(saved, origin=str(checkpoint / "state.json"))
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise TrainingError(f"{path} is not valid YAML ({first_line(exc)}): fix it, or delete it and the run goes "
                            f"on with the config its latest checkpoint keeps") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise TrainingError(f"{path} is not a mapping of config sections: fix it, or delete it and the run goes "
                            f"on with the config its latest checkpoint keeps")
    return config_from_dict(loaded or {}, origin=str(path))
