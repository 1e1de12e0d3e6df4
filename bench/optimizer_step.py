"""What an optimizer step costs: train.optimizer adamw vs muon, beside a training micro-step, same run.

Each preset's model gets random gradients; then optimizer steps alternate between AdamW (fused, as `train` makes
it) and Muon + AdamW (`optim.MuonAdamW`) in rounds, so that machine noise hits both alike. A forward + backward
micro-step of the preset's batch is timed in the same rounds for scale. Medians are reported, with Muon's extra
time as a share of the micro-step. Gradients stay fixed: the step's cost does not depend on their values.

    python bench/optimizer_step.py                              # micro and tiny on this machine
    python bench/optimizer_step.py --sizes small --device cuda --dtype bf16

Under torchrun (`torchrun --standalone --nproc-per-node 2 bench/optimizer_step.py`) the ranks share Muon's
Newton-Schulz work, as under DDP training; a third column times every rank orthogonalizing every matrix itself
(the split turned off), in the same rounds. Rank 0 prints.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
from dataclasses import replace

import torch

from tinygpt_cli import optim
from tinygpt_cli.config import resolve_config
from tinygpt_cli.model import GPT
from tinygpt_cli.optim import make_optimizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(function, device: torch.device) -> float:
    _sync(device)
    began = time.perf_counter()
    function()
    _sync(device)
    return time.perf_counter() - began


def measure(size: str, device: torch.device, dtype: torch.dtype, rounds: int, batch: int | None) -> dict[str, float]:
    cfg = resolve_config(size=size)
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    kinds = ("adamw", "muon", "muon unsplit") if optim._ranks()[0] > 1 else ("adamw", "muon")
    optimizers = {kind: make_optimizer(model, replace(cfg.train, optimizer=kind.split()[0])) for kind in kinds}
    batch = batch or cfg.train.batch_size
    x = torch.randint(0, 50257, (batch, cfg.model.block_size), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def micro_step() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            _, loss = model(x, x)
        loss.backward()

    micro_step()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}

    def optimizer_step(kind: str):
        def run() -> None:
            if kind == "muon unsplit":  # every rank orthogonalizes every matrix, as one process does
                split, optim._ranks = optim._ranks, lambda: (1, 0)
                try:
                    optimizers[kind].step()
                finally:
                    optim._ranks = split
            else:
                optimizers[kind].step()
        return run

    times: dict[str, list[float]] = {kind: [] for kind in (*kinds, "micro-step")}
    for round_ in range(rounds + 1):  # the first round warms up (state allocation, kernels), not counted
        took = {"micro-step": _timed(micro_step, device)}
        for kind in kinds:
            for name, parameter in model.named_parameters():
                parameter.grad = grads[name]
            took[kind] = _timed(optimizer_step(kind), device)
        with torch.no_grad():  # the weights as they were: every round steps from the same point
            for name, parameter in model.named_parameters():
                parameter.copy_(weights[name])
        if round_:
            for kind, seconds in took.items():
                times[kind].append(seconds)
    return {kind: statistics.median(values) for kind, values in times.items()} | {"batch": batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="micro,tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--batch", type=int, default=None, help="micro-batch of the micro-step (default: preset's)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under torchrun
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    main_rank = not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0
    world = optim._ranks()[0]
    split = world > 1
    show = print if main_rank else (lambda *_: None)
    show(f"torch {torch.__version__}, {device}, {args.dtype}, {args.rounds} rounds, medians, {world} rank(s)")
    show(f"{'size':<7} {'batch':>5} {'micro-step':>11} {'AdamW step':>11} {'Muon step':>10} "
         + (f"{'Muon unsplit':>13} " if split else "") + f"{'Muon/AdamW':>11} {'extra/micro-step':>17}")
    for size in args.sizes.split(","):
        got = measure(size, device, dtype, args.rounds, args.batch)
        extra = (got["muon"] - got["adamw"]) / got["micro-step"]
        show(f"{size:<7} {got['batch']:>5} {got['micro-step'] * 1e3:>9.1f}ms {got['adamw'] * 1e3:>9.2f}ms "
             f"{got['muon'] * 1e3:>8.2f}ms " + (f"{got['muon unsplit'] * 1e3:>11.2f}ms " if split else "")
             + f"{got['muon'] / got['adamw']:>10.2f}× {extra:>16.1%}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
