"""The learning-rate range test behind `tinygpt plan --find-lr`.

A throwaway copy of the config's model trains for a few steps on the real training data while the learning rate
climbs exponentially from `start_lr` to `end_lr`; the loss, smoothed, falls while the LR is useful and climbs once it
is too high. The peak LR suggested is where the smoothed loss fell fastest (Smith's rule, "Cyclical Learning Rates
for Training Neural Networks"), kept between a tenth and a half of the LR where it was lowest (a tenth of that is
fast.ai's rule; on `micro` it trained worse than the fastest fall, docs/planning.md). Nothing is written: no run, no
checkpoint.

Everything else is the config's own: its model (or `train.init_from`'s weights), batch, accumulation, optimizer
(AdamW, or Muon with train.muon_lr kept at its ratio to train.lr), gradient clipping, device, dtype and compile.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tinygpt_cli.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from tinygpt_cli.config import RunConfig

SMOOTHING = 0.9  # the running loss (an exponential moving average, debiased) that the stop test reads
DIVERGED = 4.0  # the sweep ends once the running loss is this many times its lowest, or back above its first
SETTLE_STEPS = 5  # steps before the stop test: the first losses of fresh weights swing
WINDOW_SHARE = 0.05  # the curve read for the suggestion: each loss averaged with its neighbours, 5% of the steps
MIN_STEPS = 10
MAX_STEPS = 10_000


@dataclass(frozen=True)
class LRPoint:
    step: int
    lr: float
    loss: float
    smoothed: float  # the mean of the losses of the steps around it (a centred window): no lag behind the LR


def centred_means(values: list[float], steps: int) -> list[float]:
    """Each value averaged with its neighbours, `WINDOW_SHARE` of `steps` wide (3 at least, odd), the window
    shrinking at the ends. A causal average trails the LR by its memory and would put the lowest loss late."""
    half = max(1, round(steps * WINDOW_SHARE) // 2)
    return [sum(values[max(0, i - half): i + half + 1]) / len(values[max(0, i - half): i + half + 1])
            for i in range(len(values))]


@dataclass(frozen=True)
class LRSweep:
    """A range test's curve and what it suggests. `suggested_lr` is None where the curve says nothing (the loss
    never fell); `notes` say why, and what to change."""

    points: list[LRPoint]
    start_lr: float
    end_lr: float
    steps: int  # asked for; len(points) is fewer where the loss diverged first
    lowest_lr: float | None  # where the smoothed loss was lowest
    steepest_lr: float | None  # where it fell fastest (against log LR)
    suggested_lr: float | None  # steepest_lr, kept within [lowest_lr / 10, lowest_lr / 2]
    suggested_muon_lr: float | None  # train.optimizer=muon: suggested_lr at train.muon_lr's ratio to train.lr
    diverged: bool
    tokens_per_step: int
    device: str
    dtype: str
    seconds: float
    notes: list[str] = field(default_factory=list)


def sweep_lr_at(step: int, steps: int, start_lr: float, end_lr: float) -> float:
    """The LR of step `step` of `steps`: start_lr at the first, end_lr at the last, evenly spaced in log LR."""
    return start_lr * (end_lr / start_lr) ** (step / max(1, steps - 1))


def check_sweep(steps: int, start_lr: float, end_lr: float) -> None:
    for value, name in ((start_lr, "--start-lr"), (end_lr, "--end-lr")):
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number (got {value})")
    if end_lr <= start_lr:
        raise ConfigError(f"--end-lr ({end_lr:g}) must be above --start-lr ({start_lr:g}): the LR climbs from one "
                          f"to the other")
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ConfigError(f"--find-lr takes {MIN_STEPS} to {MAX_STEPS:,} steps (got {steps}); 100 is usual")


def suggest(points: list[LRPoint], diverged: bool, end_lr: float) -> tuple[float | None, float | None, list[str]]:
    """(the LR of the lowest smoothed loss, of its steepest fall, notes) of a sweep's points."""
    notes: list[str] = []
    if len(points) < MIN_STEPS:
        at = f", at LR {points[-1].lr:.2g}" if points else ""
        return None, None, [f"the loss diverged after {len(points)} step(s){at}: the sweep says nothing; start it "
                            f"lower (--start-lr)"]
    lowest = min(points, key=lambda point: point.smoothed)
    if lowest.smoothed >= points[0].smoothed:
        notes.append("the loss never fell below its first value: the sweep says nothing; try more steps, or a "
                     "higher --end-lr")
        return None, None, notes
    if lowest is points[-1] and not diverged:
        notes.append(f"the loss was still falling at the last LR ({end_lr:.2g}): the best LR may be higher; try a "
                     f"higher --end-lr")
    # the steepest fall, by finite differences over log LR, left of the lowest point (beyond it the loss climbs)
    upto = points[: points.index(lowest) + 1]
    slopes = [(b.smoothed - a.smoothed) / (math.log(b.lr) - math.log(a.lr)) for a, b in itertools.pairwise(upto)]
    steepest = upto[slopes.index(min(slopes))].lr if slopes else None
    return lowest.lr, steepest, notes


def suggested_peak(lowest: float | None, steepest: float | None) -> float | None:
    """The peak LR to train with: where the loss fell fastest, kept between a tenth and a half of where it was lowest
    (a noisy curve's steepest point can sit at either end of the fall)."""
    if lowest is None:
        return None
    return min(max(steepest if steepest is not None else lowest / 10, lowest / 10), lowest / 2)


def find_lr(cfg: RunConfig, *, steps: int = 100, start_lr: float = 1e-6, end_lr: float = 1.0,
            on_point: Callable[[LRPoint], None] | None = None,
            on_info: Callable[[str], None] | None = None) -> LRSweep:
    """Run the range test of `cfg` on this machine (one process) and return its curve and suggestion."""
    import torch

    from tinygpt_cli import dist
    from tinygpt_cli.model import GPT, release_cpu_workspace
    from tinygpt_cli.optim import make_optimizer, set_learning_rate
    from tinygpt_cli.training import (
        TrainEvent,
        _batch_generator,
        _maybe_compile,
        _tf32_while_training,
        autocast_context,
        get_batch,
        prepare_dataset,
        resolve_device,
        resolve_dtype,
    )

    check_sweep(steps, start_lr, end_lr)
    say = on_info or (lambda message: None)

    def emit(event: TrainEvent) -> None:
        if event.kind == "info" and event.message:
            say(event.message)

    tc = cfg.train
    device = resolve_device(tc.device)
    dtype = resolve_dtype(tc.dtype, device, training=True)
    dataset = prepare_dataset(cfg, emit, dist.DistInfo())
    tokens = dataset.split("train")
    tf32 = _tf32_while_training() if device.type == "cuda" else contextlib.nullcontext()
    with tf32, torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(tc.seed)
        offset = 0  # where the batch stream starts: past the steps a run started from drew (as train does)
        if tc.init_from:
            model, cfg, offset = _start_from(cfg, say)
            tc = cfg.train
        else:
            model = GPT(cfg.model)
        block = model.config.block_size
        if len(tokens) <= block + 1:
            raise TrainingError(f"{dataset.name}'s train split has {len(tokens):,} tokens, fewer than a window of "
                                f"{block + 1}: lower model.block_size or tokenize more text")
        model.to(device).train()
        optimizer = make_optimizer(model, tc)
        muon_ratio = tc.muon_lr / tc.lr if tc.optimizer == "muon" else None
        try:  # a micro-batch that does not fit is said as train says it
            forward = _maybe_compile(model, tc.compile, device, emit, (tc.batch_size, block), dtype)
            scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
            lrs: list[float] = []
            losses: list[float] = []
            average, best, first, diverged = 0.0, math.inf, math.inf, False
            began = time.perf_counter()
            for step in range(steps):
                lr = sweep_lr_at(step, steps, start_lr, end_lr)
                set_learning_rate(optimizer, lr, lr * muon_ratio if muon_ratio is not None else None)
                step_loss = torch.zeros((), device=device)
                for micro in range(tc.grad_accum):
                    x, y = get_batch(tokens, tc.batch_size, block,
                                     _batch_generator(tc.batch_seed, offset + step, micro), device)
                    with autocast_context(device, dtype):
                        _, loss = forward(x, y)
                    scaled = loss / tc.grad_accum
                    (scaler.scale(scaled) if scaler else scaled).backward()
                    step_loss += loss.detach().float() / tc.grad_accum
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = float(step_loss)  # a host sync a step: a trial of a hundred steps, not a run
                if not math.isfinite(value):
                    diverged = True
                    break
                lrs.append(lr)
                losses.append(value)
                average = SMOOTHING * average + (1 - SMOOTHING) * value
                running = average / (1 - SMOOTHING ** (step + 1))
                if on_point is not None:
                    on_point(LRPoint(step, lr, value, running))
                first = running if step == 0 else first
                best = min(best, running)
                if step >= SETTLE_STEPS and running > min(DIVERGED * best, first):
                    diverged = True  # too high: the loss climbed back to where it started, or far past its lowest
                    break
            seconds = time.perf_counter() - began
        except torch.cuda.OutOfMemoryError:
            raise TrainingError(f"a micro-batch of {tc.batch_size} sequences of {block} tokens does not fit in "
                                f"{device}'s memory: lower --batch-size and raise --grad-accum (the same tokens a "
                                f"step)") from None
        finally:
            del optimizer
            release_cpu_workspace()
    points = [LRPoint(step, lr, loss, smoothed) for step, (lr, loss, smoothed)
              in enumerate(zip(lrs, losses, centred_means(losses, steps), strict=True))]
    lowest, steepest, notes = suggest(points, diverged, end_lr)
    suggested = suggested_peak(lowest, steepest)
    return LRSweep(
        points=points, start_lr=start_lr, end_lr=end_lr, steps=steps, lowest_lr=lowest, steepest_lr=steepest,
        suggested_lr=suggested, suggested_muon_lr=suggested * muon_ratio if suggested and muon_ratio else None,
        diverged=diverged, tokens_per_step=tc.batch_size * tc.grad_accum * block, device=str(device),
        dtype=str(dtype).split(".")[-1], seconds=seconds, notes=notes)


def _start_from(cfg: RunConfig, say: Callable[[str], None]):
    """train.init_from's weights, the config they train with and where their batch stream starts, as `tinygpt
    train --init-from` takes them."""
    from tinygpt_cli.checkpoint import read_state
    from tinygpt_cli.config import init_from_block_size, start_from
    from tinygpt_cli.export import load_pretrained, pretrained_checkpoint
    from tinygpt_cli.training import stream_position

    spec = cfg.train.init_from
    pinned = pretrained_checkpoint(spec)
    offset = stream_position(read_state(pinned) if pinned is not None else None)
    model, model_cfg = load_pretrained(pinned or spec, block_size=init_from_block_size(cfg),
                                       dropout=cfg.model.dropout)
    try:
        cfg, _ = start_from(cfg, model_cfg)
    except ConfigError as exc:
        raise TrainingError(str(exc)) from None
    say(f"Starting from {spec}: {model.num_params() / 1e6:.1f}M parameters, context {model_cfg.block_size}")
    return model, replace(cfg, train=replace(cfg.train, init_from=spec)), offset
