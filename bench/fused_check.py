"""First look at tinygpt's fused decode kernels on a real GPU: does the step compute the eager step's logits and
cache, with and without programmatic dependent launch, and how fast does it replay from a CUDA graph?

Runs GPT-2 `small`'s shape (random weights whose layer norms and biases are moved off 1 and 0, so that a slip in
them shows) in bf16 and in fp32, teacher-forced: at every step both steps get the eager step's greedy token, and
the logits and the cache slots written so far are compared. Prints one line per check and `fused check: OK` or
`fused check: FAILED (...)` last, exiting non-zero on a failure, so that `bench/gpu_checks.sh` can leave the
fused contenders out of the later stages (a fault in a kernel would end their processes).

    python bench/fused_check.py                  # small, bf16 and fp32, 48 steps each, then graph replay times
    python bench/fused_check.py --layers 2 --steps 4 --no-timing   # small enough for compute-sanitizer
    python bench/fused_check.py --sweep "block_s=64;num_warps=8"   # then time other kernels.TUNING

The checks run under the shipped kernels.TUNING, with and without programmatic dependent launch.
"""

import argparse
import sys

import torch
from decode_profile import PEAK_BANDWIDTH_GBS, replay_times, tuned  # bench/ is on sys.path when run as a script

from tinygpt_cli import kernels, sample
from tinygpt_cli.config import ModelConfig
from tinygpt_cli.model import GPT
from tinygpt_cli.sample import KVCache, StaticDecodeView

DEVICE = torch.device("cuda")  # --device cpu with TRITON_INTERPRET=1 checks this script without a GPU


def build(dtype: torch.dtype, layers: int, width: int = 768, block_size: int = 1024,
          device: torch.device | None = None) -> GPT:
    """GPT-2's shape (heads of 64) with seeded random weights, its layer norms and biases moved off 1 and 0."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=layers, n_head=width // 64, n_embd=width, block_size=block_size)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.to(device or DEVICE, dtype)


def compare(model: GPT, steps: int, pdl: bool, tolerance: float, batch: int = 1, samples: int = 1) -> list[str]:
    """Teacher-forced steps of the fused and the eager step side by side, `batch` samples fed other tokens (the
    eager step's greedy ones), up to `samples` of them a block of the products: the problems found (none: [])."""
    with tuned(pdl=pdl, samples_per_program=samples):
        fused = kernels.FusedDecodeStep(model, batch)
    mine, theirs = StaticDecodeView(KVCache(model, batch)), StaticDecodeView(KVCache(model, batch))
    for buffer in (*mine.k, *mine.v):  # poisoned: a slot the step should write and does not, or reads and should
        buffer.fill_(float("nan"))  # not, shows (the eager step needs zeros there: it weighs them by 0)
    token = torch.arange(464, 464 + batch, device=DEVICE)[:, None]
    problems, worst, agree = [], 0.0, 0
    with torch.inference_mode():
        for position in range(steps):
            for view in (mine, theirs):
                view.input_pos.fill_(position)
            fused.logits.fill_(float("nan"))
            got = fused(model, token, mine).float()
            want = sample._last_logits(model, token, theirs).float()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()
            if not torch.isfinite(want).all():
                problems.append(f"step {position}: the eager step's logits are not finite")
                break
            if not torch.isfinite(got).all():
                problems.append(f"step {position}: {int((~torch.isfinite(got)).sum())} logits not finite")
                break
            error = float((got - want).abs().max() / want.abs().max())
            worst = max(worst, error)
            agree += bool((got.argmax(dim=-1) == want.argmax(dim=-1)).all())
            token = want.argmax(dim=-1, keepdim=True)
        for layer in range(model.config.n_layer):
            for name, a, b in (("key", mine.k[layer], theirs.k[layer]), ("value", mine.v[layer], theirs.v[layer])):
                a, b = a[:, :, :steps].float(), b[:, :, :steps].float()
                if not torch.isfinite(a).all():
                    problems.append(f"layer {layer} {name}s: slots left unwritten or not finite")
                elif float((a - b).abs().max()) > tolerance * max(float(b.abs().max()), 1e-6):
                    problems.append(f"layer {layer} {name}s differ by {float((a - b).abs().max()):.3g}")
    if worst > tolerance:
        problems.append(f"logits differ by up to {worst:.2e} of their largest (tolerance {tolerance:g})")
    print(f"  {next(model.parameters()).dtype!s:15s} pdl={fused.pdl!s:5s} batch {batch} ({fused.samples} a block) "
          f"{steps} steps: largest logit "
          f"difference {worst:.2e} of the largest logit, same greedy token at {agree}/{steps} steps"
          f"{'; ' + '; '.join(problems) if problems else ''}", flush=True)
    return problems


def parse_settings(text: str) -> list[dict[str, int]]:
    """"block_s=64;block_s=32,num_warps=8" -> [{"block_s": 64}, {"block_s": 32, "num_warps": 8}]: changes to
    kernels.TUNING, one group each."""
    groups = []
    for group in filter(None, (part.strip() for part in text.split(";"))):
        changes = dict(item.split("=", 1) for item in group.split(","))
        unknown = set(changes) - set(kernels.TUNING)
        if unknown:
            raise SystemExit(f"unknown kernels.TUNING keys: {', '.join(sorted(unknown))}")
        groups.append({key.strip(): int(value) for key, value in changes.items()})
    return groups


def sweep(model: GPT, groups: list[dict[str, int]], batch: int = 1) -> None:
    """The fused step replayed from a graph at several cache positions under the shipped kernels.TUNING and under
    each group of changes to it (attention's blocks of slots, the products' warps, ...)."""
    positions = (0, 127, 255, 511, 1023)
    print(f"fused step (us per step of {batch} sample{'s' if batch > 1 else ''}) by kernels.TUNING, at cache "
          f"positions {positions}:")
    with torch.inference_mode():
        for changes in [{}, *groups]:
            with tuned(**changes):
                step = kernels.FusedDecodeStep(model, batch)
                times = [replay_times(step, model, 1, replays=30, position=p, batch=batch)[1] for p in positions]
            print("  " + "  ".join(f"{us:6.1f}" for us in times) + f"   mean {sum(times) / len(times):6.1f}  "
                  + (str(changes) if changes else "(shipped)"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--width", type=int, default=768, help="n_embd (heads of 64)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=1,
                        help="samples a step (the checks run at batch 1 too, the sweep at this batch only)")
    parser.add_argument("--sweep", default="", metavar="SETTINGS",
                        help="then time the step at several cache positions under the shipped kernels.TUNING and "
                             "each group of changes to it, e.g. 'block_s=64;block_s=256,num_warps=8'")
    args = parser.parse_args()
    groups = parse_settings(args.sweep)
    global DEVICE
    DEVICE = torch.device(args.device)
    reason = kernels.unavailable(DEVICE)
    if reason:
        raise SystemExit(f"fused check: FAILED (the fused decode kernels: {reason})")
    gpu = DEVICE.type == "cuda"
    print(f"{torch.cuda.get_device_name() if gpu else DEVICE}, torch {torch.__version__}, triton "
          f"{getattr(kernels.triton, '__version__', '?')}; programmatic dependent launch supported: "
          f"{gpu and kernels.uses_pdl(torch.cuda.get_device_capability())}", flush=True)
    problems = []
    for dtype, tolerance in ((torch.bfloat16, 0.05), (torch.float32, 2e-3)):
        model = build(dtype, args.layers, args.width)
        for pdl in (True, False):
            problems += compare(model, args.steps, pdl, tolerance)
        # several samples a block: the largest divisor of the batch up to 4, else the batch (a prime one), which
        # FusedDecodeStep takes as it is (min(4, 5) would give it 1 a block, the first check again)
        several = next((d for d in (4, 3, 2) if args.batch % d == 0), args.batch)
        for samples in sorted({1, several}) if args.batch > 1 else ():
            problems += compare(model, args.steps, True, tolerance, args.batch, samples)
    if gpu and not args.no_timing and not problems:
        model = build(torch.bfloat16, args.layers, args.width)
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        peak = next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in torch.cuda.get_device_name()), 1e9)
        print(f"one step replayed from a CUDA graph ({weight_bytes / 1e6:.0f} MB of bf16 weights, peak {peak} GB/s):")
        with torch.inference_mode():
            for label, make in (("eager PyTorch step", lambda: sample._last_logits),
                                ("fused, programmatic dependent launch", lambda: kernels.FusedDecodeStep(model, 1)),
                                ("fused, plain launches", lambda: kernels.FusedDecodeStep(model, 1))):
                with tuned(pdl="plain" not in label):
                    _, us = replay_times(make(), model, 1, replays=50)
                print(f"  {label}: {us:.1f} us per token, {weight_bytes / us / 1e3 / peak:.0%} of peak bandwidth",
                      flush=True)
    if problems:
        print(f"fused check: FAILED ({len(problems)} problems)")
        sys.exit(1)
    print("fused check: OK", flush=True)
    if gpu and groups:
        try:  # a measurement only: the check above has passed
            sweep(build(torch.bfloat16, args.layers, args.width), groups, args.batch)
        except Exception as exc:
            print(f"sweep: {type(exc).__name__}: {exc}")


if __name__ == "__main__":
    main()
