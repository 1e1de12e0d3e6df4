"""Training throughput: tinygpt vs Hugging Face transformers' GPT2LMHeadModel (sdpa), same run, same shapes.

Both models get the identical shape (layers, width, heads, context, vocabulary 50304), batch and AdamW
hyper-parameters, and each its best settings: fused AdamW for both; on CUDA bf16 autocast and
torch.compile (static shapes) for both; on CPU fp32 (no native bf16 here). tinygpt runs as `tinygpt train`
does: eager with the fused chunked loss head, or compiled with whole logits + cross-entropy (which inductor
fuses). `tinygpt-fused` is the compiled model with the fused head kept, to show why compiled runs drop it.
Steps alternate between the contenders in rounds so that machine noise hits all alike; the median tokens/s
of each is reported with the ratio to HF, MFU, and on CUDA the peak memory a step adds.

    python bench/train_throughput.py                       # micro and tiny on this machine
    python bench/train_throughput.py --sizes small --device cuda --contenders tinygpt,hf,tinygpt-fused
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from tinygpt_cli.config import resolve_config
from tinygpt_cli.model import GPT
from tinygpt_cli.training import device_peak_flops, flops_per_token


def build_hf(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
    )
    hf_cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(hf_cfg)


def sdpa_context(backend: str) -> contextlib.AbstractContextManager:
    """`default`: torch's own choice of attention kernel; else that kernel first (e.g. cuDNN's on Hopper)."""
    if backend == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    first = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend]
    order = [first] + [b for b in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    return sdpa_kernel(order, set_priority=True)


def make_step(model, kind: str, device: torch.device, dtype: torch.dtype, compile_model: bool, sdpa: str = "default"):
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    if kind == "tinygpt":
        model.fused_loss = not compile_model  # what `tinygpt train` does
    forward = torch.compile(model, dynamic=False) if compile_model else model
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast, sdpa_context(sdpa):
            if kind != "hf":
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


def bench_size(size: str, device: torch.device, batch_size: int | None, rounds: int, steps_per_round: int,
               contenders: list[str], sdpa: str = "default") -> dict:
    cfg = resolve_config(size=size)
    model_cfg = cfg.model
    batch = batch_size or cfg.train.batch_size
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    compile_model = device.type == "cuda"
    torch.manual_seed(0)
    models, steps, step_memory = {}, {}, {}
    x = torch.randint(0, 50257, (batch, model_cfg.block_size), device=device)
    y = torch.roll(x, -1, dims=1)
    for name in contenders:
        models[name] = build_hf(model_cfg) if name == "hf" else GPT(model_cfg)
        steps[name] = make_step(models[name], name, device, dtype, compile_model, sdpa)
        if name == "tinygpt-fused":
            models[name].fused_loss = True
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):  # warm-up (and compilation)
            steps[name](x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
            step_memory[name] = torch.cuda.max_memory_allocated(device) - before
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
    peak = device_peak_flops(device, dtype)
    flops = flops_per_token(GPT(model_cfg) if "tinygpt" not in models else models["tinygpt"])
    hf_rate = statistics.median(rates["hf"]) if "hf" in rates else None
    result = {}
    for name, values in rates.items():
        rate = statistics.median(values)
        result[name] = {
            "tokens_per_s": rate, "mfu": rate * flops / peak if peak else None,
            "vs_hf": rate / hf_rate if hf_rate else None, "step_memory": step_memory.get(name),
        }
    return {"batch": batch, "contenders": result}
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="micro,tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=3)
    parser.add_argument("--contenders", default="tinygpt,hf", help="comma-separated: tinygpt, hf, tinygpt-fused")
    parser.add_argument("--sdpa", default="default", choices=["default", "cudnn", "flash", "efficient"],
                        help="attention kernel tried first, for every contender (default: torch's choice)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    contenders = args.contenders.split(",")
    unknown = set(contenders) - {"tinygpt", "hf", "tinygpt-fused"}
    if unknown:
        parser.error(f"unknown contenders: {', '.join(sorted(unknown))}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name} · torch {torch.__version__} · attention: {args.sdpa}")
    print(f"{'size':<8}{'batch':>6}  {'contender':<15}{'tokens/s':>12}{'vs HF':>8}{'MFU':>8}{'step mem':>10}")
    for size in args.sizes.split(","):
        r = bench_size(size, device, args.batch_size, args.rounds, args.steps_per_round, contenders, args.sdpa)
        for contender, c in r["contenders"].items():
            mfu = f"{c['mfu']:.1%}" if c["mfu"] is not None else "n/a"
            ratio = f"{c['vs_hf']:.2f}x" if c["vs_hf"] is not None else "n/a"
            memory = f"{c['step_memory'] / 2**30:.1f}G" if c["step_memory"] is not None else "n/a"
            print(f"{size:<8}{r['batch']:>6}  {contender:<15}{c['tokens_per_s']:>12,.0f}{ratio:>8}{mfu:>8}{memory:>10}",
                  flush=True)


if __name__ == "__main__":
    main()
