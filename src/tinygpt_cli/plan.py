"""Know before you spend: parameters, FLOPs, data, disk, memory and time of a run, before it starts.

`plan(cfg, data=..., device=..., nproc=...) -> Plan` is arithmetic on the config alone: this module does not
import torch unless asked to measure (`do_measure=True`) or to detect the local GPU (`device="auto"|"cuda"`).
Every formula is spelled out in `docs/planning.md`; the per-layer activation bytes were read off the tensors
autograd saves for one forward pass of this repository's model (see `tests/test_plan.py`).
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tinygpt_cli.config import (
    ModelConfig,
    RunConfig,
    TrainConfig,
    dtype_refusal,
    init_from_block_size,
    start_from,
    trains_compiled,
)
from tinygpt_cli.errors import ConfigError, DataError

GIB = 2**30
CHINCHILLA_TOKENS_PER_PARAM = 20  # Hoffmann et al. 2022: compute-optimal tokens ≈ 20 × parameters
MIN_MFU = 0.001  # `--mfu`'s floor: a tenth of a percent
DEFAULT_GPU_MFU = 0.40  # compiled, bf16: `small` measured 45% on an H200; smaller models and GPUs get less
LOSS_CHUNK_TOKENS = 2048  # = model.LOSS_CHUNK_TOKENS (plan imports no torch): the most logits the loss holds
CHECKPOINT_OVERHEAD_BYTES = 200_000  # safetensors header, optimizer.pt pickle framing, state.json (RNG states)
CUDA_RESERVE_BYTES = GIB  # CUDA context, cuBLAS workspace and allocator slack, on top of 5% of the memory
CUDA_RESERVE_SHARE = 0.05
HOST_USABLE_SHARE = 0.9  # CPU/MPS: share of the machine's RAM a run may count on
# CPU/MPS: the process itself, in the RAM a run counts on: torch and tinygpt imported (0.37 GiB measured on Linux)
# and what the allocator keeps of memory freed during a step (0.15-0.23 GiB)
HOST_RUNTIME_BYTES = GIB // 2
DEFAULT_VAL_FRACTION = 0.005  # `tinygpt tokenize`'s default, used to split a source not tokenized yet


# ----------------------------------------------------------------------------------------------- devices
@dataclass(frozen=True)
class DeviceSpec:
    """A device to plan for. `peak_flops` is the dense bf16/fp16 tensor-core rate (None: unknown, measure)."""

    key: str
    name: str
    kind: str  # cuda | cpu | mps
    memory_bytes: int | None
    peak_flops: float | None
    bf16: bool = True  # False: autocast runs fp16 with a gradient scaler (T4, V100)
    cuda_name: str = ""  # what torch.cuda.get_device_name() contains for this GPU
    fp32_flops: float | None = None  # fp32 without TF32 (before Ampere); None: TF32, half the bf16 rate

    def peak(self, half: bool) -> float | None:
        """The peak FLOP/s of a run in bf16/fp16 (`half`) or in fp32 (TF32 from Ampere on, plain fp32 before)."""
        if self.peak_flops is None or half:
            return self.peak_flops
        return self.fp32_flops if self.fp32_flops is not None else self.peak_flops / 2


# Datasheet figures (dense, no sparsity); `train.device_peak_flops` reads its MFU peaks from here too.
DEVICES: dict[str, DeviceSpec] = {
    spec.key: spec
    for spec in (
        DeviceSpec("h100", "NVIDIA H100 SXM 80GB", "cuda", 80 * GIB, 989e12, cuda_name="H100"),
        DeviceSpec("h100-pcie", "NVIDIA H100 PCIe 80GB", "cuda", 80 * GIB, 756e12, cuda_name="H100 PCIe"),
        DeviceSpec("h100-nvl", "NVIDIA H100 NVL 94GB", "cuda", 94 * GIB, 835e12, cuda_name="H100 NVL"),
        DeviceSpec("h200", "NVIDIA H200 141GB", "cuda", 141 * GIB, 989e12, cuda_name="H200"),
        DeviceSpec("gh200", "NVIDIA GH200 96GB", "cuda", 96 * GIB, 989e12, cuda_name="GH200"),
        DeviceSpec("a100", "NVIDIA A100 80GB", "cuda", 80 * GIB, 312e12, cuda_name="A100"),
        DeviceSpec("a100-40", "NVIDIA A100 40GB", "cuda", 40 * GIB, 312e12, cuda_name="A100"),
        DeviceSpec("l40s", "NVIDIA L40S 48GB", "cuda", 48 * GIB, 362e12, cuda_name="L40S"),
        DeviceSpec("l40", "NVIDIA L40 48GB", "cuda", 48 * GIB, 181e12, cuda_name="L40"),  # not the L4's figure
        DeviceSpec("a10g", "NVIDIA A10G 24GB", "cuda", 24 * GIB, 125e12, cuda_name="A10G"),
        DeviceSpec("a10", "NVIDIA A10 24GB", "cuda", 24 * GIB, 125e12, cuda_name="A10"),
        DeviceSpec("l4", "NVIDIA L4 24GB", "cuda", 24 * GIB, 121e12, cuda_name="L4"),
        DeviceSpec("rtx4090", "NVIDIA GeForce RTX 4090 24GB", "cuda", 24 * GIB, 165e12, cuda_name="RTX 4090"),
        DeviceSpec("rtx3090", "NVIDIA GeForce RTX 3090 24GB", "cuda", 24 * GIB, 71e12, cuda_name="RTX 3090"),
        DeviceSpec("v100", "NVIDIA V100 32GB", "cuda", 32 * GIB, 125e12, bf16=False, cuda_name="V100",
                   fp32_flops=15.7e12),
        DeviceSpec("t4", "NVIDIA T4 16GB", "cuda", 16 * GIB, 65e12, bf16=False, cuda_name="T4", fp32_flops=8.1e12),
        DeviceSpec("cpu", "this machine's CPU", "cpu", None, None),
        DeviceSpec("mps", "Apple GPU (MPS)", "mps", None, None),
    )
}
DEVICE_CHOICES = ("auto", "cuda", *DEVICES)


CGROUP_ROOT = Path("/sys/fs/cgroup")


def passes_text(passes: float) -> str:
    """How many times a budget reads its data, to the digits that count: 0.25, 3.4, but 210,167 (not 210,167.0)."""
    if passes < 0.01:  # a sliver of the data: its first digits (0.0012), not 0.00
        return f"{passes:.2g}"
    return f"{passes:.2f}" if passes < 10 else f"{passes:.1f}" if passes < 100 else f"{passes:,.0f}"


def cgroup_memory(root: Path | None = None) -> tuple[int, int] | None:
    """(limit, usage) in bytes of the memory cgroup at `root` (v2, else v1) when it sets a limit: a container's
    RAM. Usage leaves out reclaimable page cache (inactive files), as docker and the kubelet count it. None
    without a limit. (Only the cgroup mounted at the root is read: a container's own.)"""
    root = CGROUP_ROOT if root is None else root
    for limit_file, usage_file, stat_file, cache_key in (
        ("memory.max", "memory.current", "memory.stat", "inactive_file"),
        ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes", "memory/memory.stat", "total_inactive_file"),
    ):
        try:
            limit_text = (root / limit_file).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 2**62:  # unlimited (v1 writes a huge number)
                return None
            usage = int((root / usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        try:
            stats = dict(line.split() for line in (root / stat_file).read_text().splitlines() if line.count(" ") == 1)
            usage -= int(stats.get(cache_key, 0))
        except (OSError, ValueError):
            pass
        return int(limit_text), max(0, usage)
    return None


def _host_memory() -> int | None:
    """RAM in bytes a run may count on: the machine's, or its container's limit when lower; None where unknown."""
    try:
        physical = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        physical = _windows_memory() if sys.platform == "win32" else None
    container = cgroup_memory()
    if container is None:
        return physical
    return container[0] if physical is None else min(physical, container[0])


def _windows_memory() -> int | None:
    """Windows' physical RAM in bytes (it has no sysconf), from GlobalMemoryStatusEx; None if the call fails."""
    import ctypes

    class MemoryStatus(ctypes.Structure):  # MEMORYSTATUSEX
        _fields_ = [("dwLength", ctypes.c_uint32), ("dwMemoryLoad", ctypes.c_uint32),
                    ("ullTotalPhys", ctypes.c_uint64), ("ullAvailPhys", ctypes.c_uint64),
                    ("ullTotalPageFile", ctypes.c_uint64), ("ullAvailPageFile", ctypes.c_uint64),
                    ("ullTotalVirtual", ctypes.c_uint64), ("ullAvailVirtual", ctypes.c_uint64),
                    ("ullAvailExtendedVirtual", ctypes.c_uint64)]

    status = MemoryStatus()
    status.dwLength = ctypes.sizeof(MemoryStatus)
    try:
        if not ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):  # type: ignore[attr-defined]
            return None
    except (AttributeError, OSError):
        return None
    return int(status.ullTotalPhys) or None


def gpu_spec(name: str, memory: int) -> DeviceSpec:
    """The table entry whose `cuda_name` is in `name` (the longest match: "H100 PCIe" before "H100")."""
    matches = [s for s in DEVICES.values() if s.cuda_name and s.cuda_name in name]
    if not matches:
        return DeviceSpec("cuda", name, "cuda", memory, None)
    best = max(matches, key=lambda s: len(s.cuda_name))
    return replace(best, name=name, memory_bytes=memory)


def resolve_device_spec(key: str) -> DeviceSpec:
    """A DeviceSpec from a table key, or the local device for "auto"/"cuda" (which imports torch)."""
    key = key.strip().lower()
    if key in ("auto", "cuda"):
        try:
            import torch
        except ImportError:  # planning on a machine without torch: nothing local to detect
            torch = None  # type: ignore[assignment]
        if torch is not None and torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return gpu_spec(torch.cuda.get_device_name(0), int(props.total_memory))
        if key == "cuda":
            raise ConfigError("--device cuda was asked for but no CUDA GPU is visible: name one, e.g. --device h100")
        mps = torch is not None and getattr(torch.backends, "mps", None) is not None and \
            torch.backends.mps.is_available()
        key = "mps" if mps else "cpu"
    spec = DEVICES.get(key)
    if spec is None:
        raise ConfigError(f"unknown device {key!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if spec.kind in ("cpu", "mps"):
        return replace(spec, memory_bytes=_host_memory())
    return spec


# ----------------------------------------------------------------------------------------------- arithmetic
def matrix_parameters(model: ModelConfig) -> int:
    """The blocks' matmul weights, 12·C² a layer: what autocast copies to half precision and Muon trains."""
    return 12 * model.n_layer * model.n_embd**2


def layer_parameters(model: ModelConfig) -> int:
    """One transformer block: 12·C² matmul weights, 9·C of biases (with `bias`) and two LayerNorms (2·2·C)."""
    C = model.n_embd
    matmuls = 12 * C * C
    biases = (3 * C + C + 4 * C + C) if model.bias else 0
    layer_norms = 2 * (2 * C if model.bias else C)
    return matmuls + biases + layer_norms


def count_parameters(model: ModelConfig, non_embedding: bool = False) -> int:
    """Parameters of `GPT(model)` with the head tied to wte (counted once); `non_embedding` leaves out wte, wpe.

    GPT-2 124M: 124,439,808 with GPT-2's vocabulary of 50257; 124,475,904 with tinygpt's padded 50304.
    """
    C = model.n_embd
    ln_f = 2 * C if model.bias else C
    body = model.n_layer * layer_parameters(model) + ln_f
    if non_embedding:
        return body
    return body + model.vocab_size * C + model.block_size * C


def training_flops_per_token(model: ModelConfig) -> float:
    """Training FLOPs per token: 6 per parameter (forward + backward) plus attention's 12*L*T*C.

    Parameters here are the non-embedding ones plus the head (V*C): the tied head is a real matmul even though
    it shares wte, while the embedding lookups cost nothing. GPT-2 124M (V=50304): 855,383,040 FLOPs/token.
    """
    head = model.vocab_size * model.n_embd
    attention = 12.0 * model.n_layer * model.block_size * model.n_embd
    return 6.0 * (count_parameters(model, non_embedding=True) + head) + attention


def optimizer_state_bytes(model: ModelConfig, optimizer: str = "adamw") -> int:
    """The optimizer's fp32 state: AdamW's two moments (8 B/param); with train.optimizer=muon, Muon's one momentum
    (4 B/param) for the blocks' matrices (`optim.muon_parameters`) and AdamW's for the rest."""
    params = count_parameters(model)
    muon = matrix_parameters(model) if optimizer == "muon" else 0
    return 8 * (params - muon) + 4 * muon


def checkpoint_bytes(model: ModelConfig, optimizer: str = "adamw") -> int:
    """One checkpoint: fp32 weights (4 B/param) + the optimizer's state (AdamW: 8 B/param) + small files."""
    return 4 * count_parameters(model) + optimizer_state_bytes(model, optimizer) + CHECKPOINT_OVERHEAD_BYTES


def _checkpoint_disk_note(need: int) -> str | None:
    """Where a run's checkpoints (`need` bytes at the peak) would not fit on the workspace's disk: what `train`
    refuses before its first step, said in the plan."""
    from tinygpt_cli import workspace

    try:
        runs, free = workspace.runs_dir(), workspace.free_bytes(workspace.runs_dir())
    except OSError:
        return None
    if need <= free:
        return None
    return (f"its checkpoints need about {workspace.format_bytes(need)} of disk, {workspace.format_bytes(free)} free "
            f"on {runs}: `tinygpt train` will refuse it; free some space, keep fewer (--keep-last N), or set "
            f"TINYGPT_HOME to a larger disk")


def checkpoints_kept(max_steps: int, eval_interval: int, keep_last: int, keep_best: bool = False) -> int:
    """Checkpoints on disk at the peak of a run: one per evaluation, or with `keep_last` that many + 1 (a new one
    is complete before the oldest goes), once there are that many, and the best val loss's with `keep_best`."""
    evals = -(-max_steps // eval_interval)
    return min(evals, keep_last + 1 + keep_best) if keep_last else evals


def fused_attention(model: ModelConfig, kind: str) -> bool:
    """Whether training's attention runs as one fused kernel, keeping no T×T probabilities for backward. A CPU
    with attention dropout takes PyTorch's unfused path (measured: see `activation_bytes_per_token`)."""
    return not (kind == "cpu" and model.dropout > 0)


def activation_bytes_per_token(model: ModelConfig, half: bool, fused_attention: bool = True) -> float:
    """Bytes autograd keeps per token of a micro-batch between forward and backward (eager mode).

    Per layer, under bf16/fp16 autocast: 36·C + 4·nh + 16 — the two LayerNorms' fp32 inputs (2 × 4C) and
    mean/rstd (2 × 8), the bf16 inputs of c_attn (2C), c_fc (2C) and the MLP's c_proj (8C), q/k/v (6C), the
    attention output (2C, also attn.c_proj's input), the GELU input (8C) and the attention's log-sum-exp (4·nh).
    In fp32: 64·C + 4·nh + 16. Dropout > 0 adds two masks per layer. Without a fused attention kernel (SDPA's
    math path) add the T×T probabilities: with dropout (a CPU's), 12·nh·T + 8·C (half) or 2·C (fp32) - 4·nh,
    read off the tensors autograd saves; without, 6·nh·T (half) or 4·nh·T (fp32). Once per model: ln_f's input
    and the loss's gradient buffer for the hidden states (fp32, 8·C), ln_f's statistics and the token ids (16).
    """
    C, nh, T = model.n_embd, model.n_head, model.block_size
    per_layer = (36 * C if half else 64 * C) + 4 * nh + 16
    if not fused_attention and model.dropout > 0:
        per_layer += 12 * nh * T + (8 if half else 2) * C - 4 * nh
    elif not fused_attention:
        per_layer += (6 if half else 4) * nh * T
    if model.dropout > 0:
        per_layer += 2 * C * (2 if half else 4)
    return model.n_layer * per_layer + 8 * C + 16


def loss_chunk_bytes(model: ModelConfig, tokens: int, half: bool, compiled: bool = False) -> int:
    """The loss's transient buffer. Eager, the fused cross-entropy's: one chunk of fp32 logits (+ its bf16 copy
    under autocast). Compiled, the model takes its loss from whole logits: those and their gradient, in the
    autocast dtype (inductor fuses the fp32 upcast into the loss kernels)."""
    if compiled:
        return tokens * model.vocab_size * (4 if half else 8)
    rows = min(LOSS_CHUNK_TOKENS, tokens)
    return rows * model.vocab_size * (6 if half else 4)


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak training memory of one device, in bytes, and the largest micro-batch that fits."""

    batch_size: int
    weights: int  # fp32 parameters, 4 B/param (sharded under FSDP)
    gradients: int  # fp32, 4 B/param
    optimizer: int  # AdamW's two fp32 moments, 8 B/param (Muon's matrices: one, 4 B/param)
    autocast_weight_copies: int  # bf16/fp16 copies of the matmul weights autocast keeps for backward
    ddp_buckets: int  # DDP's gradient buckets (4 B/param) when several processes run without FSDP
    fsdp_gathered: int  # FSDP: unsharded root + two blocks' parameters and gradients in flight
    head_gradient: int  # the fused loss holds the head's fp32 gradient (V×C) from forward to backward
    loss_chunk: int
    runtime: int  # CPU/MPS: the process itself (HOST_RUNTIME_BYTES); 0 on CUDA, whose reserve covers its context
    activations: int
    activations_per_sequence: int
    total: int
    device_memory: int | None
    usable_memory: int | None  # device memory minus the reserve the estimate keeps free
    fits: bool | None
    max_batch_size: int | None  # largest micro-batch that fits (None: memory unknown)


def _usable(spec: DeviceSpec) -> int | None:
    if spec.memory_bytes is None:
        return None
    if spec.kind == "cuda":
        return int(spec.memory_bytes * (1 - CUDA_RESERVE_SHARE)) - CUDA_RESERVE_BYTES
    return int(spec.memory_bytes * HOST_USABLE_SHARE)


def estimate_memory(
    model: ModelConfig, batch_size: int, spec: DeviceSpec, half: bool, nproc: int = 1, fsdp: bool = False,
    compiled: bool = False, optimizer_kind: str = "adamw",
) -> MemoryEstimate:
    """Peak memory of a training step on one device: states + saved activations + transient buffers.

    Conservative: gradients are counted alongside all activations, as they are from the second micro-step
    of an accumulating step on. Eager mode; torch.compile usually needs less (it recomputes cheap ops).
    """
    params = count_parameters(model)
    sharded = fsdp and nproc > 1
    shards = nproc if sharded else 1
    weights, gradients = 4 * params // shards, 4 * params // shards
    optimizer = optimizer_state_bytes(model, optimizer_kind) // shards
    copies = 2 * matrix_parameters(model) if half else 0
    ddp = 4 * params if nproc > 1 and not sharded else 0
    gathered = 0
    if sharded:  # FSDP2 keeps the root (embeddings, ln_f) gathered and prefetches the next block
        root = params - model.n_layer * layer_parameters(model)
        gathered = 4 * root + 2 * 2 * 4 * layer_parameters(model)
    head = 0 if compiled else 4 * model.vocab_size * model.n_embd  # the fused loss's fp32 head gradient
    per_sequence = math.ceil(activation_bytes_per_token(model, half, fused_attention(model, spec.kind))
                             * model.block_size)
    runtime = HOST_RUNTIME_BYTES if spec.kind in ("cpu", "mps") else 0
    fixed = weights + gradients + optimizer + copies + ddp + gathered + head + runtime

    def total_for(batch: int) -> int:
        return fixed + batch * per_sequence + loss_chunk_bytes(model, batch * model.block_size, half, compiled)

    usable = _usable(spec)
    max_batch = None
    if usable is not None:
        max_batch = 0
        if total_for(1) <= usable:
            low, high = 1, 1
            while total_for(high * 2) <= usable and high < 2**20:
                high *= 2
            low, high = high, high * 2
            while high - low > 1:  # total_for is increasing: bisect for the last batch that fits
                mid = (low + high) // 2
                low, high = (mid, high) if total_for(mid) <= usable else (low, mid)
            max_batch = low
    total = total_for(batch_size)
    return MemoryEstimate(
        batch_size=batch_size, weights=weights, gradients=gradients, optimizer=optimizer,
        autocast_weight_copies=copies, ddp_buckets=ddp, fsdp_gathered=gathered, head_gradient=head,
        loss_chunk=loss_chunk_bytes(model, batch_size * model.block_size, half, compiled), runtime=runtime,
        activations=batch_size * per_sequence, activations_per_sequence=per_sequence, total=total,
        device_memory=spec.memory_bytes, usable_memory=usable,
        fits=None if usable is None else total <= usable, max_batch_size=max_batch,
    )


def micro_batch_within(batch_size: int, global_batch: int, largest: int) -> int:
    """The largest micro-batch up to `batch_size` and `largest` (at least 1) that divides `global_batch`, so
    accumulation keeps the global batch exactly."""
    fitting = max(1, min(batch_size, largest))
    while global_batch % fitting:
        fitting -= 1
    return fitting


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataEstimate:
    """Tokens a run would train on: from a tokenized dataset's meta.json, or a known source's size × fraction."""

    name: str
    origin: str  # "meta.json" (counted) | "registry" (estimated from the source's known size)
    fraction: float
    train_tokens: int
    val_tokens: int
    token_file_bytes: int  # train.bin + val.bin: 2 bytes per token
    text_bytes: int | None  # text the tokens come from, where known
    download_bytes: int | None = None  # text still to download (a known source not downloaded yet)
    source_tokens: int | None = None  # the whole known source, before --fraction
    path: str | None = None


def _registry() -> dict[str, Any]:
    from tinygpt_cli.sources import REGISTRY

    return REGISTRY


def _val_share(documents: int, fraction: float, val_fraction: float, text_bytes: int) -> float:
    """The share of a source's tokens that `tinygpt tokenize` puts in val, documents taken at their mean size: its
    split is by document, at least one (`data.SplitPlan`), or with few documents the tail of each."""
    from tinygpt_cli.data import cut_share, split_counts

    if not documents:
        return val_fraction
    kept, val = split_counts(documents, fraction, val_fraction)
    return val / kept if val else cut_share(val_fraction, text_bytes // documents)


def estimate_data(spec: str | None, fraction: float | None = None) -> DataEstimate:
    """`spec`: a tokenized dataset (name or folder), a known source (`tinygpt download` names), or None.

    None picks what `tinygpt train` would: the newest tokenized dataset, else the embedded Shakespeare corpus.
    `fraction` applies to sources that are not tokenized yet (a tokenized dataset's counts are what they are).
    """
    from pathlib import Path

    from tinygpt_cli import data as data_module
    from tinygpt_cli import workspace

    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1] (got {fraction})")
    dataset = None
    if not spec:
        dataset = data_module.find_dataset(None)
        spec = dataset.name if dataset is not None else "shakespeare"
    else:
        candidate = workspace.data_dir() / spec
        if (Path(spec).expanduser() / "meta.json").is_file() or (candidate / "meta.json").is_file():
            dataset = data_module.find_dataset(spec)
    if dataset is not None:
        splits = dataset.meta["splits"]
        train, val = int(splits["train"]["tokens"]), int(splits["val"]["tokens"])
        file_bytes = int(splits["train"].get("bytes", 2 * train)) + int(splits["val"].get("bytes", 2 * val))
        return DataEstimate(dataset.name, "meta.json", float(dataset.meta.get("fraction", 1.0)), train, val,
                            file_bytes, dataset.meta.get("text_bytes"), path=str(dataset.path))
    registry = _registry()
    source = registry.get(spec)
    if source is None:
        tokenized = ", ".join(d.name for d in data_module.list_datasets()) or "none"
        raise DataError(f"unknown data {spec!r}: name a tokenized dataset (here: {tokenized}) or a known source "
                        f"({', '.join(registry)})")
    share = 1.0 if fraction is None else fraction
    tokens = round(source.tokens * share)
    val = round(tokens * _val_share(source.documents, share, DEFAULT_VAL_FRACTION, source.text_bytes))
    text_bytes = int(source.text_bytes * share)
    download = None
    if source.kind != "embedded":
        from tinygpt_cli.sources import raw_dir, read_download_record

        record = read_download_record(raw_dir() / spec)
        download = None if record is not None and record.get("complete") else text_bytes
    return DataEstimate(spec, "registry", share, tokens - val, val, 2 * tokens, text_bytes, download,
                        source.tokens)


# ----------------------------------------------------------------------------------------------- measuring
@dataclass(frozen=True)
class Measurement:
    """A short real trial of the config's training step on this machine (random tokens, nothing written)."""

    device: str
    device_name: str
    dtype: str
    batch_size: int  # the micro-batch measured (capped on CPU so the trial stays short)
    micro_steps: int
    seconds_per_micro_step: float
    optimizer_step_seconds: float
    tokens_per_s: float  # one process, at the config's micro-batch and accumulation
    peak_memory_bytes: int | None  # CUDA: torch.cuda.max_memory_allocated over the trial
    compiled: bool
    notes: tuple[str, ...] = ()  # what the trial reported (e.g. torch.compile falling back to eager)


CPU_MEASURE_TOKENS = 2048  # tokens per measured micro-step on CPU (a 124M model: ~15 s each on 2 cores)


def measure(cfg: RunConfig, micro_steps: int = 3, warmup: int = 1) -> Measurement:
    """Time `micro_steps` forward+backward micro-steps and one optimizer step of `cfg` on this machine, after
    `warmup` whole steps (compilation, first allocations). Random tokens; nothing is written, and the caller's
    random stream and memory are as they were."""
    import torch

    from tinygpt_cli.model import release_cpu_workspace

    try:
        with torch.random.fork_rng(devices=[]):
            return _measure(cfg, micro_steps, warmup)
    finally:
        release_cpu_workspace()


def _measure(cfg: RunConfig, micro_steps: int, warmup: int) -> Measurement:
    import torch

    from tinygpt_cli.model import GPT
    from tinygpt_cli.optim import make_optimizer
    from tinygpt_cli.training import (
        _cpu_name,
        _maybe_compile,
        autocast_context,
        resolve_device,
        resolve_dtype,
    )

    tc = cfg.train
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device, training=True)
    T = cfg.model.block_size
    batch = tc.batch_size
    if device.type == "cpu":
        batch = max(1, min(batch, CPU_MEASURE_TOKENS // T))
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    optimizer = make_optimizer(model, tc)
    notes: list[str] = []
    compiled = _maybe_compile(model, tc.compile, device, lambda event: notes.append(event.message), (batch, T),
                              dtype)
    generator = torch.Generator().manual_seed(tc.seed)
    x = torch.randint(0, 50257, (batch, T), generator=generator).to(device)
    y = torch.randint(0, 50257, (batch, T), generator=generator).to(device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    def micro_step() -> None:
        with autocast_context(device, dtype):
            _, loss = compiled(x, y)
        (scaler.scale(loss) if scaler else loss).backward()

    def optimizer_step() -> None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):  # whole steps: compiles, allocates gradients, optimizer state and the loss buffers
        micro_step()
        optimizer_step()
    sync()
    began = time.perf_counter()
    for _ in range(micro_steps):
        micro_step()
    sync()
    per_micro = (time.perf_counter() - began) / micro_steps
    began = time.perf_counter()
    optimizer_step()
    sync()
    optimizer_seconds = time.perf_counter() - began
    # scale the measured micro-step to the config's micro-batch: time per token holds when compute-bound
    step_seconds = tc.grad_accum * per_micro * tc.batch_size / batch + optimizer_seconds
    tokens_per_step = tc.batch_size * tc.grad_accum * T
    peak_memory = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return Measurement(
        device=str(device), device_name=name, dtype=str(dtype).split(".")[-1], batch_size=batch,
        micro_steps=micro_steps, seconds_per_micro_step=per_micro, optimizer_step_seconds=optimizer_seconds,
        tokens_per_s=tokens_per_step / step_seconds, peak_memory_bytes=peak_memory, compiled=compiled is not model,
        notes=tuple(notes),
    )


# ----------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Plan:
    """Everything `tinygpt plan` shows. Bytes are bytes, times are seconds, rates are per second."""

    size: str
    model: dict[str, Any]
    parameters: int
    non_embedding_parameters: int
    flops_per_token: float
    device: DeviceSpec
    nproc: int
    dtype: str  # bf16 | fp16 | fp32: the autocast dtype the estimate assumes
    optimizer: str  # train.optimizer: adamw | muon
    batch_size: int  # micro-batch per process
    grad_accum: int
    tokens_per_step: int  # batch_size × grad_accum × block_size × nproc
    max_steps: int
    budget_tokens: int  # tokens the run trains on: max_steps × tokens_per_step (capped by train.max_tokens)
    data: DataEstimate
    epochs: float  # budget_tokens / train tokens: more than 1 repeats data
    checkpoint_bytes: int
    checkpoints_on_disk: int  # at most: train.keep_last + 1 while a new one is written (fewer in a short run)
    checkpoint_disk_bytes: int
    memory: MemoryEstimate
    mfu: float | None
    peak_flops: float | None  # per device, for this dtype (fp32: the TF32 rate, half the bf16 one, from Ampere on)
    tokens_per_s: float | None  # all processes together
    seconds: float | None  # training + periodic evaluation (checkpoint writes not counted)
    time_basis: str  # "peak × MFU" | "measured" | "unknown"
    chinchilla_tokens: int
    measurement: Measurement | None = None
    notes: list[str] = field(default_factory=list)


def _autocast_dtype(cfg_dtype: str, spec: DeviceSpec) -> str:
    if cfg_dtype != "auto":
        return cfg_dtype
    if spec.kind == "cuda":
        return "bf16" if spec.bf16 else "fp16"
    return "fp32"


def heavy_evaluation_note(tc: TrainConfig, batch_size: int, sequences_per_step: int) -> str | None:
    """A note when evaluating (train.eval_batches micro-batches, forward only: a third of a training step's work
    per sequence) takes over a fifth of the work between evaluations; None otherwise. The val sample is the same
    windows every time, so a larger one buys little."""
    evaluating = tc.eval_batches * batch_size / 3
    share = evaluating / (evaluating + min(tc.eval_interval, tc.max_steps) * sequences_per_step)
    if share <= 0.2:
        return None
    return (f"evaluation (train.eval_batches={tc.eval_batches:,} every {tc.eval_interval:,} steps) is about "
            f"{share:.0%} of the work: lower train.eval_batches or raise train.eval_interval")


def too_little_data(dataset: str, split: str, tokens: int, block: int, then: str = "") -> str | None:
    """What is wrong with a split too short to train on: a context of `block` tokens and its targets take
    block + 1 tokens, and the sampler draws a start below len - block - 1, so a split needs block + 2. `then`:
    what follows from it, said before what to do."""
    if tokens >= block + 2:
        return None
    more = "re-tokenize with a larger --val-fraction, lower model.block_size, or tokenize more text" \
        if split == "val" else "lower model.block_size or tokenize more text"
    return (f"the {split} split of {dataset} has {tokens:,} tokens, fewer than the {block + 2:,} a context of "
            f"{block:,} needs: {then}{more}")


def check_here(flag: str, device: str) -> None:
    """A trial of `flag` (--measure, --find-lr) runs on this machine: `device` must be one of its own, not a GPU of
    the table to plan for."""
    if device.strip().lower() not in ("auto", "cuda", "cpu", "mps"):
        raise ConfigError(f"{flag} runs on this machine: use --device auto (or cpu, cuda, mps) instead of {device}")


def plan(
    cfg: RunConfig,
    *,
    data: str | None = None,
    fraction: float | None = None,
    device: str = "auto",
    nproc: int = 1,
    mfu: float | None = None,
    do_measure: bool = False,
) -> Plan:
    """The plan of training `cfg` on `data` with `nproc` processes of `device`. See `docs/planning.md`."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1 (got {nproc})")
    if mfu is not None and not MIN_MFU <= mfu <= 1.0:  # below it a plan is hundreds of digits of years
        raise ConfigError(f"--mfu must be in [{MIN_MFU:g}, 1] (got {mfu:g}): 0.40 is typical of a compiled GPU run")
    if mfu is not None and do_measure:
        raise ConfigError("--mfu is what the time assumes without --measure, which times real steps instead: give "
                          "one of them")
    device = device.strip().lower()
    if do_measure:
        check_here("--measure", device)
    spec = resolve_device_spec(device)
    refusal = dtype_refusal(cfg.train.dtype, spec.kind, training=True)  # the run train would refuse
    if refusal:
        raise ConfigError(refusal)
    notes: list[str] = []
    if cfg.train.init_from:  # train takes the shape of the weights it starts from; so does its plan
        from tinygpt_cli.export import pretrained_config

        shape = pretrained_config(cfg.train.init_from, block_size=init_from_block_size(cfg),
                                  dropout=cfg.model.dropout)
        cfg, started = start_from(cfg, shape)
        notes.append(f"starting from {cfg.train.init_from}: its shape, {shape.n_layer} layers × {shape.n_embd}, "
                     f"context {shape.block_size}")
        notes += started
    model = cfg.model
    tc = cfg.train
    dtype = _autocast_dtype(tc.dtype, spec)
    half = dtype != "fp32"
    compiled = trains_compiled(tc.compile, spec.kind)
    if spec.kind in ("cpu", "mps") and nproc > 1 and spec.memory_bytes is not None:
        # the processes share this machine's RAM: each counts on its share, as `train` checks it
        spec = replace(spec, memory_bytes=spec.memory_bytes // nproc)
        notes.append(f"the {nproc} processes share this machine's RAM: the memory per device is each one's share")

    batch_size, grad_accum = tc.batch_size, tc.grad_accum
    memory = estimate_memory(model, batch_size, spec, half, nproc, tc.fsdp, compiled, tc.optimizer)
    if tc.auto_batch and memory.max_batch_size:
        global_batch = batch_size * grad_accum
        fitting = micro_batch_within(batch_size, global_batch, memory.max_batch_size)
        if fitting != batch_size:
            notes.append(f"--batch-size auto: micro-batch {fitting} × {global_batch // fitting} accumulation steps "
                         f"(global batch {global_batch})")
            batch_size, grad_accum = fitting, global_batch // fitting
            memory = estimate_memory(model, batch_size, spec, half, nproc, tc.fsdp, compiled, tc.optimizer)
    if memory.fits is False:
        if memory.max_batch_size:
            notes.append(f"micro-batch {batch_size} does not fit: the largest that does is "
                         f"{memory.max_batch_size}; train with --batch-size auto (same global batch)")
        else:
            notes.append("not even a micro-batch of 1 fits: use a smaller --size, a shorter model.block_size, "
                         "more GPUs with train.fsdp, or a larger device")

    tokens_per_step = batch_size * grad_accum * model.block_size * nproc
    budget = tc.max_steps * tokens_per_step
    if tc.max_tokens:
        budget = min(budget, math.ceil(tc.max_tokens / tokens_per_step) * tokens_per_step)
    if nproc > 1:
        keep = f": --grad-accum {grad_accum // nproc} keeps {tokens_per_step // nproc:,}" \
            if grad_accum % nproc == 0 else ""
        notes.append(f"train.grad_accum is per process: {nproc} processes × {grad_accum} accumulation × "
                     f"{batch_size} × {model.block_size} = {tokens_per_step:,} tokens/step{keep}")

    data_estimate = estimate_data(data, fraction)
    if data_estimate.origin == "meta.json" and fraction is not None and fraction != data_estimate.fraction:
        notes.append(f"{data_estimate.name} is already tokenized (fraction {data_estimate.fraction:g}): its "
                     f"counts are used; --fraction applies to sources not tokenized yet")
    if data_estimate.origin == "meta.json":  # counted: the same check `train` makes before its first step
        for split, tokens in (("train", data_estimate.train_tokens), ("val", data_estimate.val_tokens)):
            short = too_little_data(data_estimate.name, split, tokens, model.block_size,
                                    then="`tinygpt train` will refuse it; ")
            if short:
                notes.append(short)
    epochs = budget / data_estimate.train_tokens if data_estimate.train_tokens else math.inf
    if epochs > 1:
        notes.append(f"the budget is {passes_text(epochs)} passes over the training tokens: repeating data helps "
                     f"little past ~4 passes (and overfits a small corpus sooner)")

    evals = -(-tc.max_steps // tc.eval_interval)
    eval_tokens = evals * tc.eval_batches * batch_size * model.block_size  # forward only: a third of the work
    heavy = heavy_evaluation_note(tc, batch_size, tokens_per_step // model.block_size)
    if heavy:
        notes.append(heavy)
    flops = training_flops_per_token(model)
    measurement = None
    if do_measure:
        local = spec.kind if device != "auto" else cfg.train.device
        measurement = measure(replace(cfg, train=replace(tc, device=local, batch_size=batch_size,
                                                         grad_accum=grad_accum, auto_batch=False)))
        notes += measurement.notes
        if measurement.peak_memory_bytes and measurement.batch_size == batch_size and nproc == 1:
            notes.append(f"measured peak memory {measurement.peak_memory_bytes / GIB:.2f} GiB "
                         f"(estimate {memory.total / GIB:.2f} GiB)")
    rate: float | None = None
    basis = "unknown"
    used_mfu = peak = None
    if measurement is not None:
        rate, basis = measurement.tokens_per_s * nproc, "measured"
        if nproc > 1:
            notes.append(f"measured on one process; × {nproc} assumes perfect scaling")
    elif spec.peak_flops is not None:
        used_mfu = mfu if mfu is not None else DEFAULT_GPU_MFU
        peak = spec.peak(half)
        rate, basis = peak * used_mfu * nproc / flops, "peak × MFU"
    else:
        notes.append(f"no peak FLOP/s is known for {spec.name}: add --measure for tokens/s and time")
    seconds = (budget + eval_tokens / 3) / rate if rate else None
    if seconds is not None and tc.max_minutes and seconds > tc.max_minutes * 60:
        notes.append(f"train.max_minutes={tc.max_minutes:g} stops the run before its budget")

    kept = checkpoints_kept(tc.max_steps, tc.eval_interval, tc.keep_last, tc.keep_best)
    one_checkpoint = checkpoint_bytes(model, tc.optimizer)
    disk_note = _checkpoint_disk_note(kept * one_checkpoint)
    if disk_note:
        notes.append(disk_note)
    params = count_parameters(model)
    return Plan(
        size=cfg.size,
        model={"n_layer": model.n_layer, "n_head": model.n_head, "n_embd": model.n_embd,
               "block_size": model.block_size, "vocab_size": model.vocab_size},
        parameters=params, non_embedding_parameters=count_parameters(model, non_embedding=True),
        flops_per_token=flops, device=spec, nproc=nproc, dtype=dtype, optimizer=tc.optimizer, batch_size=batch_size,
        grad_accum=grad_accum, tokens_per_step=tokens_per_step, max_steps=tc.max_steps, budget_tokens=budget,
        data=data_estimate, epochs=epochs, checkpoint_bytes=one_checkpoint, checkpoints_on_disk=kept,
        checkpoint_disk_bytes=kept * one_checkpoint, memory=memory, mfu=used_mfu, peak_flops=peak,
        tokens_per_s=rate, seconds=seconds, time_basis=basis, chinchilla_tokens=CHINCHILLA_TOKENS_PER_PARAM * params,
        measurement=measurement, notes=notes,
    )


def plan_to_dict(result: Plan) -> dict[str, Any]:
    """The plan as plain JSON-ready data (`tinygpt plan --json`)."""
    from dataclasses import asdict

    out = asdict(result)
    if math.isinf(out["epochs"]):
        out["epochs"] = None
    return out
