"""Where a decode step's GPU time goes: the kernels of one static-shape decode step of a preset (default `small`,
bf16, batch 1), eager and compiled, from the PyTorch profiler, against the time a step takes when `generate`
replays chunks of steps as CUDA graphs.

The kernel total is what the GPU is busy with per token; the replayed time per token minus it is what launch gaps,
sampling and the host still cost. Weight bytes over the kernel total bound the bandwidth use that removing every
gap could reach with these kernels.

    python bench/decode_profile.py --shape small --steps 64
"""

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from tinygpt_cli.config import PRESETS, ModelConfig
from tinygpt_cli.model import GPT
from tinygpt_cli.sample import GenerationStats, KVCache, StaticDecodeView, _compiled_step, _last_logits, generate

PEAK_BANDWIDTH_GBS = {"H100": 3350, "H200": 4800}


def kernel_times(step, model: GPT, steps: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Mean kernel microseconds per step, and the kernels (name, us per step, launches per step), largest first."""
    cache = KVCache(model, 1)
    view = StaticDecodeView(cache)
    current = torch.zeros((1, 1), dtype=torch.long, device="cuda")
    for position in range(8):  # warm-up (and the compile)
        view.input_pos.fill_(position)
        step(model, current, view, None)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for position in range(8, 8 + steps):
            view.input_pos.fill_(position)
            step(model, current, view, None)
        torch.cuda.synchronize()
    totals: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for entry in prof.key_averages():
        if entry.device_type != torch.autograd.DeviceType.CUDA:
            continue  # CPU-side ops: their kernels are listed on their own
        us = getattr(entry, "self_device_time_total", None)
        totals[entry.key] += us if us is not None else entry.self_cuda_time_total
        counts[entry.key] += entry.count
    rows = sorted(((name[:90], us / steps, counts[name] // steps) for name, us in totals.items()),
                  key=lambda row: -row[1])
    return sum(totals.values()) / steps, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per timed generate run")
    args = parser.parse_args()
    preset = PRESETS[args.shape]["model"]
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=preset["n_layer"], n_head=preset["n_head"], n_embd=preset["n_embd"],
                            block_size=1024)).eval().to("cuda", torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in gpu), None)
    print(f"{gpu}, torch {torch.__version__}; {args.shape} bf16, {weight_bytes / 1e6:.0f} MB of weights; "
          f"peak {peak} GB/s")
    with torch.inference_mode():
        for label, step in (("eager", _last_logits), ("compiled", _compiled_step(torch.device("cuda"), graphs=True))):
            busy, rows = kernel_times(step, model, args.steps)
            print(f"\n{label} step: {busy:.1f} us of kernels per token, {sum(r[2] for r in rows)} launches; "
                  f"bound {weight_bytes / busy / 1e3 / peak:.0%} of peak bandwidth" if peak else "")
            for name, us, count in rows[:14]:
                print(f"  {us:7.1f} us  x{count:<3d} {name}")
        for label, kwargs in (("compiled, graph of 16 steps", dict(compile=True)),
                              ("eager step, graph of 16 steps", dict(static_cache=True)),
                              ("compiled, graph of 64 steps", dict(compile=True, flush_every=64))):
            for _ in range(2):  # the first run compiles and captures
                stats = GenerationStats()
                torch.cuda.synchronize()
                started = time.perf_counter()
                for _token in generate(model, [1, 2, 3, 4], args.tokens, temperature=0, seed=0, stats=stats,
                                       **kwargs):
                    pass
                torch.cuda.synchronize()
                seconds = time.perf_counter() - started
            us = seconds / args.tokens * 1e6
            print(f"{label}: {us:.1f} us per token ({args.tokens / seconds:,.0f} tokens/s), "
                  f"{weight_bytes / us / 1e3 / peak:.0%} of peak bandwidth; graphed={stats.graphed} "
                  f"{stats.graph_error or ''}")


if __name__ == "__main__":
    main()
