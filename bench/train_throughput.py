"""Training throughput: tinygpt vs Hugging Face transformers' GPT2LMHeadModel (sdpa), same run, same shapes.

Both models get the identical shape (layers, width, heads, context, vocabulary 50304), batch and AdamW
hyper-parameters, and each its best settings: fused AdamW for both; on CUDA bf16 autocast and
torch.compile for both; on CPU fp32 (no native bf16 here). Steps alternate between the two models in
rounds so that machine noise hits both alike; the median tokens/s of each is reported with the ratio.

    python bench/train_throughput.py                       # micro and tiny on this machine
    python bench/train_throughput.py --sizes small --device cuda --batch-size 16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from tinygpt_cli.config import resolve_config
from tinygpt_cli.model import GPT
from tinygpt_cli.train import device_peak_flops, flops_per_token


def build_hf(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
    )
    hf_cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf_cfg)


def make_step(model, kind: str, device: torch.device, dtype: torch.dtype, compile_model: bool):
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile_model else model
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast:
            if kind == "tinygpt":
                _, loss = forward(x, y)
            else:
                loss = forward(input_ids=x, labels=x).loss  # HF shifts the labels itself
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_size(size: str, device: torch.device, batch_size: int | None, rounds: int, steps_per_round: int) -> dict:
    cfg = resolve_config(size=size)
    model_cfg = cfg.model
    batch = batch_size or cfg.train.batch_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_model = device.type == "cuda"
    torch.manual_seed(0)
    ours = GPT(model_cfg)
    theirs = build_hf(model_cfg)
    steps = {
        "tinygpt": make_step(ours, "tinygpt", device, dtype, compile_model),
        "hf": make_step(theirs, "hf", device, dtype, compile_model),
    }
    x = torch.randint(0, 50257, (batch, model_cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    for step in steps.values():  # warm-up (and compilation)
        for _ in range(3):
            step(x, y)
    sync(device)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    tokens = batch * model_cfg.block_size * steps_per_round
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            began = time.perf_counter()
            for _ in range(steps_per_round):
                step(x, y)
            sync(device)
            rates[name].append(tokens / (time.perf_counter() - began))
    result = {name: statistics.median(values) for name, values in rates.items()}
    peak = device_peak_flops(device, dtype)
    result["mfu"] = result["tinygpt"] * flops_per_token(ours) / peak if peak else None
    result["ratio"] = result["tinygpt"] / result["hf"]
    result["batch"] = batch
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="micro,tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} · torch {torch.__version__}")
    print(f"{'size':<8}{'batch':>6}{'tinygpt tok/s':>16}{'HF tok/s':>12}{'ratio':>8}{'MFU':>8}")
    for size in args.sizes.split(","):
        r = bench_size(size, device, args.batch_size, args.rounds, args.steps_per_round)
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        print(f"{size:<8}{r['batch']:>6}{r['tinygpt']:>16,.0f}{r['hf']:>12,.0f}{r['ratio']:>7.2f}x{mfu:>8}")


if __name__ == "__main__":
    main()
