"""Distributed training through torchrun: process-group setup, rank info and the few collectives we use.

torchrun, or `tinygpt train --nproc N` through the same elastic agent (launch.py), sets RANK / LOCAL_RANK /
WORLD_SIZE and the rendezvous; this module reads them.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from tinygpt_cli.errors import TinyGPTError, TrainingError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_environment() -> DistInfo:
    """Rank info set by torchrun; a single process when WORLD_SIZE is absent or 1."""
    world = env_count("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    return DistInfo(env_count("RANK", 0), env_count("LOCAL_RANK", 0), world)


def env_count(name: str, default: int) -> int:
    """The whole number 0 or more in the environment variable `name` (torchrun's), else a one-line error: a job
    script's leftover `export WORLD_SIZE=` read as a traceback."""
    value = os.environ.get(name)
    if value is None:
        return default
    if not (value.strip().isascii() and value.strip().isdigit()):  # "²" is a digit to isdigit
        raise TinyGPTError(f"{name}={value!r} in the environment is not a whole number: unset it (`unset {name}`); "
                          f"torchrun sets it for the processes it starts")
    return int(value)


MPS_ALONE = ("MPS is one GPU that processes cannot share: train in one process (drop --nproc), or pass --device "
             "cpu to train on the CPU cores")


def init(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (NCCL on CUDA, gloo elsewhere); returns this rank's device."""
    if not info.enabled:
        return device
    if not dist.is_initialized():
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:  # WORLD_SIZE left in the environment (another tool, a scheduler), not set by torchrun
            raise TrainingError(
                f"WORLD_SIZE={info.world_size} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                f"not: start several processes with --nproc N or torchrun, or unset WORLD_SIZE for one")
    if device.type == "mps":  # gloo has no MPS tensors, and there is one such GPU to a machine
        raise TrainingError(MPS_ALONE)
    if device.type == "cuda":
        if not dist.is_nccl_available():  # Windows builds of torch have none
            raise TrainingError("this build of torch has no NCCL, which training on several GPUs needs (Windows "
                                "builds have none): train on one GPU (drop --nproc), or on Linux or WSL2")
        if info.local_rank >= torch.cuda.device_count():
            raise TrainingError(
                f"{os.environ.get('LOCAL_WORLD_SIZE') or info.local_rank + 1} processes on this machine, but only "
                f"{torch.cuda.device_count()} CUDA GPU(s) are visible: use --nproc {torch.cuda.device_count()} "
                f"(one process per GPU)")
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch._dynamo imported after the group is made (fused AdamW's constructor imports it) keeps the FSDP
        # mesh's group alive past destroy_process_group, and gloo's threads then lived on to interpreter teardown
        # (see `_release_meshes`); imported before, it does not. (Nothing else of tinygpt imports it at start.)
        importlib.import_module("torch._dynamo")
        backend = "nccl" if device.type == "cuda" else "gloo"
        with signals_end_the_process():
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
            # gloo's init can return on one rank while another is still connecting to it: a rank that then fails
            # at once (a bad --data) and exits broke the other's connection, which printed gloo's error besides ours
            dist.barrier()
    return device


@contextlib.contextmanager
def signals_end_the_process() -> Iterator[None]:
    """Within: Ctrl-C, SIGTERM and SIGHUP end this process at once, as their default does. Joining the group waits
    in C++ for every rank (up to its timeout, 30 minutes), where Python's handlers, which run between bytecodes, never
    get to run: a stop while a slow rank was still starting hung until the launcher's grace ran out (QA: ten
    minutes, then an exit with no word). Nothing is saved before the group is joined, so nothing is lost."""
    import signal
    import threading

    from tinygpt_cli.launch import STOP_SIGNALS

    if threading.current_thread() is not threading.main_thread():  # handlers are the main thread's to set
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    changed = {sig: handler for sig, handler in previous.items() if handler not in (signal.SIG_IGN, None)}
    for sig in changed:  # one ignored (nohup's SIGHUP) stays ignored
        signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in changed.items():
            signal.signal(sig, handler)


def shutdown() -> None:
    """Leave the process group, and let its backend's threads end now rather than at interpreter teardown."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _release_meshes()


def _release_meshes() -> None:
    """Drop the process groups that device meshes still hold once the group is destroyed.

    FSDP2 shards over a DeviceMesh, which (torch >= 2.10) keeps its process groups in `_pg_registry`, and
    DTensor's sharding caches keep the mesh for the life of the process. The gloo group then outlived
    destroy_process_group, and its threads were joined during interpreter teardown, which now and then aborted a
    rank that had finished its work ("terminate called without an active exception"). Older meshes look groups
    up by name in c10d's registry, which destroy_process_group clears; they need nothing here.
    """
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:
        return
    for obj in gc.get_objects():
        if issubclass(type(obj), DeviceMesh):  # not isinstance: that asks deprecated proxies for __class__
            registry = getattr(obj, "_pg_registry", None)
            if isinstance(registry, dict):
                registry.clear()
    gc.collect()  # the sharded model's reference cycles hold the group too


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In place over all ranks (no-op in a single process). op: sum | max."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def from_main(value: Any) -> Any:
    """Rank 0's `value` on every rank (`value` itself in a single process)."""
    return all_gather_objects(value)[0]


def agree(error: Exception | None) -> None:
    """Raise on every rank the error any rank met while setting up on its own (the lowest rank's), so that no rank
    goes on into a collective that another one never joins. In a single process, `error` as it is."""
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    messages = all_gather_objects(None if error is None else str(error))
    rank, message = next(((r, m) for r, m in enumerate(messages) if m is not None), (None, None))
    if message is None:
        return
    # the same words on every rank, so the launcher says them once
    raise TrainingError(message if rank == 0 else f"rank {rank}: {message}") from None


@contextlib.contextmanager
def agreed() -> Iterator[None]:
    """Within: a TinyGPTError raised on some ranks only is raised on every rank at the end of the block (see
    `agree`). Only for a block with no collective in it."""
    error: Exception | None = None
    try:
        yield
    except TinyGPTError as exc:
        error = exc
    agree(error)
