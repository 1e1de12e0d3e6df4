"""Where a decode step's GPU time goes: the kernels of one static-shape decode step of a preset (default `small`,
bf16, batch 1), eager, compiled and through tinygpt's fused Triton kernels (`kernels.FusedDecodeStep`), from the
PyTorch profiler, against the time a step takes when `generate` replays chunks of steps as CUDA graphs.

The kernel total is what the GPU is busy with per token; the replayed time per token minus it is what launch gaps,
sampling and the host still cost. Weight bytes over the kernel total bound the bandwidth use that removing every
gap could reach with these kernels.

`--sweep` also times the fused step replayed from a graph under other `kernels.TUNING` settings (programmatic
dependent launch off, rows per product block, input columns per load, warps, attention's block of slots), to pick
the defaults on a new GPU.

    python bench/decode_profile.py --shape small --steps 64 --sweep 60
"""

import argparse
import contextlib
import itertools
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from tinygpt_cli import kernels, sample
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


@contextlib.contextmanager
def tuned(**changes):
    """kernels.TUNING with `changes` inside the block, as it was after (the fused step reads it when built)."""
    default = dict(kernels.TUNING)
    kernels.TUNING.update(changes)
    try:
        yield
    finally:
        kernels.TUNING.update(default)


def replay_times(step, model: GPT, steps: int, replays: int = 20, position: int = 0,
                 batch: int = 1) -> tuple[float, float]:
    """Capture `steps` one-token forward steps (the cache slot moved on inside the graph) as one CUDA graph:
    (milliseconds to capture it and run it once, median microseconds per step of later replays), each replay
    starting at the cache slot `position`; `batch` samples a step (the step built for them)."""
    cache = KVCache(model, batch)
    view = StaticDecodeView(cache)
    current = torch.zeros((batch, 1), dtype=torch.long, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(model, current, view, None)  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    started = time.perf_counter()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(steps):
            step(model, current, view, None)
            view.input_pos.add_(1)
    view.input_pos.fill_(position)
    graph.replay()
    torch.cuda.synchronize()
    setup_ms = (time.perf_counter() - started) * 1e3
    return setup_ms, median_replay_us(graph, steps, replays, before=lambda: view.input_pos.fill_(position))


def median_replay_us(graph: torch.cuda.CUDAGraph, per_replay: int, replays: int, before=None) -> float:
    """Median microseconds per item of `graph`'s replays, `per_replay` items each; `before` runs ahead of each."""
    times = []
    for _ in range(replays):
        if before is not None:
            before()
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / per_replay)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--tokens", default="256,2048", help="tokens per timed generate run, comma-separated")
    parser.add_argument("--sweep", type=float, default=0.0, metavar="SECONDS",
                        help="time the fused step under other kernels.TUNING settings for up to this long")
    parser.add_argument("--no-fused", action="store_true", help="leave the fused Triton kernels out")
    args = parser.parse_args()
    preset = PRESETS[args.shape]["model"]
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=preset["n_layer"], n_head=preset["n_head"], n_embd=preset["n_embd"],
                            block_size=1024)).eval().to("cuda", torch.bfloat16)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gpu = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in gpu), 1e9)

    def use(us: float) -> str:
        return f"{weight_bytes / us / 1e3 / peak:.0%} of peak bandwidth"

    print(f"{gpu}, torch {torch.__version__}; {args.shape} bf16, {weight_bytes / 1e6:.0f} MB of weights; "
          f"peak {peak} GB/s")
    steps = {"eager": _last_logits, "compiled": _compiled_step(torch.device("cuda"), graphs=True)}
    if not args.no_fused:
        fused = kernels.FusedDecodeStep(model, 1)
        steps[f"fused (programmatic dependent launch: {fused.pdl})"] = fused
        with tuned(pdl=False):
            steps["fused, plain launches"] = kernels.FusedDecodeStep(model, 1)
    with torch.inference_mode():
        for label, step in steps.items():
            busy, rows = kernel_times(step, model, args.steps)
            print(f"\n{label} step: {busy:.1f} us of kernels per token, {sum(r[2] for r in rows)} launches; "
                  f"bound {use(busy)}", flush=True)
            for name, us, count in rows[:14]:
                print(f"  {us:7.1f} us  x{count:<3d} {name}")
        print("\nforward steps replayed as one CUDA graph (no sampling):")
        for label, step in steps.items():
            for per_graph in (1, 16):
                setup_ms, us = replay_times(step, model, per_graph)
                print(f"  {label}, {per_graph:2d} steps per graph: {us:6.1f} us per token ({use(us)}); "
                      f"capture + first replay {setup_ms:.0f} ms", flush=True)
        variants = {"eager, sliced cache, no graphs": dict(static_cache=False),
                    "eager step, a graph per step (--no-fused)": dict(),
                    "compiled, torch.compile's graphs (--compile on)": dict(compile=True),
                    "compiled, our graph per step": dict(compile=True, graphs=True),
                    "fused kernels, a graph per step (default)": dict(fused=True),
                    "fused kernels, a graph per 8 steps": dict(fused=True, graph_steps=8),
                    # sampled as `tinygpt generate` samples by default: by the draw kernel, then by PyTorch's sampler
                    "fused kernels, sampled (temperature 0.8, top-k 200)": dict(fused=True, temperature=0.8,
                                                                                top_k=200),
                    "fused kernels, sampled by PyTorch's sampler": dict(fused=True, temperature=0.8, top_k=200,
                                                                        fused_top_k=0)}
        if args.no_fused:
            variants = {label: kwargs for label, kwargs in variants.items() if "fused" not in label}
        print("\ngenerate from 4 tokens, greedy unless said (setup, compile excepted, included): a first call, with no "
              "decoder kept from another, then a later call, which takes the one the first built (sample._KeptDecoder)")
        for new_tokens in (int(n) for n in args.tokens.split(",")):
            for label, kwargs in variants.items():
                kwargs = dict(temperature=0, seed=0) | kwargs
                sample.GRAPH_STEPS = kwargs.pop("graph_steps", 1)  # host work per replay over more tokens
                kernels.FUSED_TOP_K = kwargs.pop("fused_top_k", 1024)  # 0: top-k sampling by PyTorch's sampler
                sample._KEPT.clear()
                for call in ("first call", "later call"):
                    stats = GenerationStats()
                    torch.cuda.synchronize()
                    started = time.perf_counter()
                    for _token in generate(model, [1, 2, 3, 4], new_tokens, stats=stats, **kwargs):
                        pass
                    torch.cuda.synchronize()
                    seconds = time.perf_counter() - started
                    us = seconds / new_tokens * 1e6
                    print(f"  {new_tokens} tokens, {label}, {call}: {us:.1f} us per token "
                          f"({new_tokens / seconds:,.0f} tokens/s), {use(us)}; first token "
                          f"{stats.time_to_first_token_s * 1e3:.1f} ms, capture {stats.capture_s * 1e3:.1f} ms, "
                          f"graphed={stats.graphed} {stats.graph_error or ''}{stats.compile_error or ''}", flush=True)
        sample.GRAPH_STEPS, kernels.FUSED_TOP_K = 1, 1024
        if not args.no_fused:
            draw_times(model.config.vocab_size)
        if args.sweep and not args.no_fused:
            sweep(model, use, args.sweep)


def draw_times(width: int, reps: int = 32) -> None:
    """One token's draw for a batch of 1, replayed from a CUDA graph of `reps` draws: `kernels.draw_token` greedy
    and sampling itself (temperature 0.8, top-k 200, as `tinygpt generate` samples by default: one torch.topk and
    the kernel) under a few slice sizes and warps, against PyTorch's sampler picking the token the kernel then
    records (how the fused path sampled before)."""
    logits = torch.randn((1, width), device="cuda").to(torch.bfloat16)
    step = torch.zeros((), dtype=torch.long, device="cuda")
    finished = torch.zeros(1, dtype=torch.bool, device="cuda")
    first_bad = torch.full((1,), sample.NEVER, dtype=torch.long, device="cuda")
    tokens = torch.zeros((1, 1), dtype=torch.long, device="cuda")
    current = torch.zeros((1, 1), dtype=torch.long, device="cuda")
    uniform = torch.rand((1, 1), dtype=torch.float64, device="cuda")
    vocab = min(width, sample.VOCAB_SIZE)

    def timed(draw) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            draw()  # builds the kernels
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(reps):
                draw()
        return median_replay_us(graph, reps, 10)

    def drawn(scratch, temperature: float, picked_by_pytorch: bool = False):
        def draw() -> None:
            picked = (sample.sample_next_token(logits, temperature, 200, 1.0, None, uniform)
                      if picked_by_pytorch else None)
            kernels.draw_token(logits, picked, step, finished, first_bad, None, False, tokens, 0, current, scratch,
                               never=sample.NEVER, eot=sample.EOT_ID, temperature=temperature, top_k=200,
                               uniform=uniform)
        return draw

    print(f"\none token's draw (batch 1, {width} bf16 logits), replayed from a graph of {reps} draws:")
    default = (kernels.TUNING["draw_block"], kernels.TUNING["draw_warps"])
    try:
        with torch.inference_mode():
            for block, warps in ((2048, 4), (1024, 4), (4096, 4), (4096, 8), (8192, 8)):
                with tuned(draw_block=block, draw_warps=warps):
                    scratch = kernels.DrawScratch(1, vocab, torch.device("cuda"))
                    greedy, sampled = timed(drawn(scratch, 0.0)), timed(drawn(scratch, 0.8))
                mark = " (the default)" if (block, warps) == default else ""
                print(f"  slices of {block:5d}, {warps} warps{mark}: greedy {greedy:6.1f} us, "
                      f"sampled {sampled:6.1f} us", flush=True)
            scratch = kernels.DrawScratch(1, vocab, torch.device("cuda"))
            print(f"  PyTorch's sampler, then the kernel's bookkeeping (the fused path before): "
                  f"{timed(drawn(scratch, 0.8, picked_by_pytorch=True)):6.1f} us", flush=True)
    except Exception as exc:  # a setting Triton cannot build: say so, and go on to the sweep
        print(f"  draw timing: {type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}")


def sweep(model: GPT, use, seconds: float) -> None:
    """The fused step replayed from a one-step graph under other kernels.TUNING settings, best first: every mix of
    product blocks (programs per SM, tile, warps), then attention's block of slots and the columns per load, until
    `seconds` have passed (each new setting compiles its kernels)."""
    default = dict(kernels.TUNING)
    settings = [dict(default, pdl=False)] + [dict(default, programs_per_sm=p, tile=t, num_warps=w)
                                             for p, t, w in itertools.product((1, 2, 4), (4096, 8192, 16384), (4, 8))]
    settings += [dict(default, block_s=b) for b in (16, 32, 128)] + [dict(default, block_k=256)]
    results = []
    deadline = time.perf_counter() + seconds
    print(f"\nfused step replayed from a graph, by kernels.TUNING (1 step per graph; up to {seconds:.0f} s):")
    for tuning in settings:
        if time.perf_counter() > deadline:
            print(f"  stopped after {len(results)} of {len(settings)} settings")
            break
        try:
            with tuned(**tuning):
                _, us = replay_times(kernels.FusedDecodeStep(model, 1), model, 1)
        except Exception as exc:  # a setting Triton cannot compile (registers, shared memory)
            print(f"  {tuning}: {type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}")
            continue
        results.append((us, tuning))
    for us, tuning in sorted(results, key=lambda row: row[0])[:12]:
        changed = {key: value for key, value in tuning.items() if value != default[key]} or "(the default)"
        print(f"  {us:6.1f} us per token ({use(us)}): {changed}")

if __name__ == "__main__":
    main()
