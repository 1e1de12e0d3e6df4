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
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from tinygpt_cli.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from tinygpt_cli.config import RunConfig

SMOOTHING = 0.9  # the running loss (an exponential moving average, debiased) that the stop test reads
DIVERGED = 4.0  # the sweep ends once the running loss is this many times its lowest, or back above its first
CLEAR_FALL_SIGMAS = 4.0  # a fall of fewer batch-to-batch sigmas says nothing: no stop "back above", no suggestion
SETTLE_STEPS = 5  # steps before the stop test: the first losses of fresh weights swing
WINDOW_SHARE = 0.05  # the curve read for the suggestion: each loss averaged with its neighbours, 5% of the steps
MIN_STEPS = 10  # --find-lr-steps: from this many
MIN_POINTS = 5  # a curve of fewer says nothing
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
    steps: int  # asked for; len(points) is fewer where the sweep stopped first
    lowest_lr: float | None  # where the smoothed loss was lowest
    steepest_lr: float | None  # where it fell fastest (against log LR)
    suggested_lr: float | None  # steepest_lr, kept within [lowest_lr / 10, lowest_lr / 2]
    suggested_muon_lr: float | None  # train.optimizer=muon: suggested_lr at train.muon_lr's ratio to train.lr
    stopped: str  # "completed" | "climbed" (the loss climbed back, or far past its lowest) | "non-finite"
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


def suggest(points: list[LRPoint], stopped: str, end_lr: float) -> tuple[float | None, float | None, list[str]]:
    """(the LR of the lowest smoothed loss, of its steepest fall, notes) of a sweep's points (`stopped`: why it ended
    before its last step, if it did)."""
    notes: list[str] = []
    if not points:
        return None, None, ["the first loss was not finite: with --dtype fp16 try bf16 or fp32; else check the data"]
    if len(points) < MIN_POINTS:
        return None, None, [f"the loss {'became non-finite' if stopped == 'non-finite' else 'climbed'} after "
                            f"{len(points)} step(s), at LR {points[-1].lr:.2g}: the sweep says nothing; start it "
                            f"lower (--start-lr)"]
    lowest = min(points, key=lambda point: point.smoothed)
    upto = points[: points.index(lowest) + 1]
    noise = scatter([point.loss for point in (upto if len(upto) > 2 else points)])  # up to the lowest: no climb
    fall = points[0].smoothed - lowest.smoothed
    if fall <= CLEAR_FALL_SIGMAS * noise:  # the lowest of many noisy means sits a sigma or two below the first
        notes.append(f"the loss never fell clearly below its first values (by {fall:.3g}, against a step-to-step "
                     f"scatter of {noise:.2g}): the sweep says nothing; try more steps, or a higher --end-lr")
        return None, None, notes
    if lowest is points[-1] and stopped == "completed":
        notes.append(f"the loss was still falling at the last LR ({end_lr:.2g}): the best LR may be higher; try a "
                     f"higher --end-lr")
    # the steepest fall, by finite differences over log LR, left of the lowest point (beyond it the loss climbs)
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
    """Run the range test of `cfg` on this machine (one process) and return its curve and suggestion. It writes no
    run; as `train`, it tokenizes the embedded corpus first where the workspace holds no dataset."""
    import torch

    from tinygpt_cli import training
    from tinygpt_cli.model import release_cpu_workspace

    check_sweep(steps, start_lr, end_lr)
    if not training._ONE_AT_A_TIME.acquire(blocking=False):  # torch's random state is the process's, as train's
        raise TrainingError("a train() or find_lr() is running in this process: run them one after another")
    try:
        device = training.resolve_device(cfg.train.device)
        cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
        tf32 = training._tf32_while_training() if device.type == "cuda" else contextlib.nullcontext()
        mps_state = torch.mps.get_rng_state() if device.type == "mps" else None  # fork_rng forks one device type
        with tf32, torch.random.fork_rng(devices=cuda):  # every GPU's stream: manual_seed sets them all
            try:
                return _sweep(cfg, device, steps, start_lr, end_lr, on_point, on_info or (lambda message: None))
            finally:
                if mps_state is not None:
                    torch.mps.set_rng_state(mps_state)
                release_cpu_workspace()
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # the sweep's model, gradients and optimizer state are gone now
    finally:
        training._ONE_AT_A_TIME.release()


def _sweep(cfg: RunConfig, device, steps: int, start_lr: float, end_lr: float,
           on_point: Callable[[LRPoint], None] | None, say: Callable[[str], None]) -> LRSweep:
    import torch

    from tinygpt_cli import dist
    from tinygpt_cli.model import GPT
    from tinygpt_cli.optim import make_optimizer
    from tinygpt_cli.plan import micro_batch_within, too_little_data
    from tinygpt_cli.training import (
        TrainEvent,
        largest_step_batch,
        prepare_dataset,
        resolve_dtype,
    )

    def emit(event: TrainEvent) -> None:
        if event.kind == "info" and event.message:
            say(event.message)

    tc = cfg.train
    dtype = resolve_dtype(tc.dtype, device, training=True)
    dataset = prepare_dataset(cfg, emit, dist.DistInfo())
    tokens = dataset.split("train")
    torch.manual_seed(tc.seed)
    offset = 0  # where the batch stream starts: past the steps a run started from drew (as train does)
    if tc.init_from:
        model, cfg, offset = _start_from(cfg, say)
        tc = cfg.train
    else:
        model = GPT(cfg.model)
    block = model.config.block_size
    short = too_little_data(dataset.name, "train", len(tokens), block)  # as train refuses it
    if short:
        raise TrainingError(short)
    model.to(device).train()
    batch, accum = tc.batch_size, tc.grad_accum
    if tc.auto_batch and device.type == "cuda":  # --batch-size auto: the micro-batch train would take, same tokens
        batch = micro_batch_within(batch, batch * accum, largest_step_batch(model, batch, block, device, dtype,
                                                                            tc.compile))
        accum = tc.batch_size * tc.grad_accum // batch
    optimizer = make_optimizer(model, tc)
    muon_ratio = tc.muon_lr / tc.lr if tc.optimizer == "muon" else None
    began = time.perf_counter()
    try:
        lrs, losses, stop = _steps(model, optimizer, tc, tokens, offset, batch, accum, device, dtype, emit, steps,
                                   start_lr, end_lr, muon_ratio, on_point)
    except torch.cuda.OutOfMemoryError:  # its frame, which held the step's tensors, is gone once this block ends
        out_of_memory = True
    else:
        out_of_memory = False
    seconds = time.perf_counter() - began
    if out_of_memory:
        del optimizer, model
        torch.cuda.empty_cache()
        auto = "" if tc.auto_batch else ", or --batch-size auto"
        raise TrainingError(f"a micro-batch of {batch} sequences of {block} tokens does not fit in {device}'s "
                            f"memory: lower --batch-size and raise --grad-accum (the same tokens a step){auto}")
    points = [LRPoint(step, lr, loss, smoothed) for step, (lr, loss, smoothed)
              in enumerate(zip(lrs, losses, centred_means(losses, steps), strict=True))]
    lowest, steepest, notes = suggest(points, stop, end_lr)
    suggested = suggested_peak(lowest, steepest)
    return LRSweep(
        points=points, start_lr=start_lr, end_lr=end_lr, steps=steps, lowest_lr=lowest, steepest_lr=steepest,
        suggested_lr=suggested, suggested_muon_lr=suggested * muon_ratio if suggested and muon_ratio else None,
        stopped=stop, tokens_per_step=batch * accum * block, device=str(device), dtype=str(dtype).split(".")[-1],
        seconds=seconds, notes=notes)


def _steps(model, optimizer, tc, tokens, offset: int, batch: int, accum: int, device, dtype, emit, steps: int,
           start_lr: float, end_lr: float, muon_ratio: float | None,
           on_point: Callable[[LRPoint], None] | None) -> tuple[list[float], list[float], str]:
    """The sweep's steps, as `train` takes them: (each step's LR, its loss, why it stopped early or "completed")."""
    import torch

    from tinygpt_cli.optim import set_learning_rate
    from tinygpt_cli.training import MAX_BAD_STEPS, _batch_generator, _maybe_compile, autocast_context, get_batch

    lrs: list[float] = []
    losses: list[float] = []
    average, best, first, skipped = 0.0, math.inf, math.inf, 0
    block = model.config.block_size
    try:
        forward = _maybe_compile(model, tc.compile, device, emit, (batch, block), dtype)
        scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
        for step in range(steps):
            lr = sweep_lr_at(step, steps, start_lr, end_lr)
            set_learning_rate(optimizer, lr, lr * muon_ratio if muon_ratio is not None else None)
            step_loss = torch.zeros((), device=device)
            for micro in range(accum):
                x, y = get_batch(tokens, batch, block, _batch_generator(tc.batch_seed, offset + step, micro), device)
                with autocast_context(device, dtype):
                    _, loss = forward(x, y)
                scaled = loss / accum
                (scaler.scale(scaled) if scaler else scaled).backward()
                step_loss += loss.detach().float() / accum
            if scaler is not None:
                scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip or float("inf"))
            value = float(step_loss)  # a host sync a step: a trial of a hundred steps, not a run
            finite = math.isfinite(value) and bool(torch.isfinite(norm))
            if scaler is not None:
                scaler.step(optimizer)  # skips a step whose gradients overflowed, and lowers its scale
                scaler.update()
            elif finite:  # as train, a non-finite step is skipped
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            skipped = 0 if finite else skipped + 1
            if not math.isfinite(value) or skipped >= MAX_BAD_STEPS:  # as train, that many in a row: too high
                return lrs, losses, "non-finite"
            lrs.append(lr)
            losses.append(value)
            average = SMOOTHING * average + (1 - SMOOTHING) * value
            running = average / (1 - SMOOTHING ** (step + 1))
            if on_point is not None:
                on_point(LRPoint(step, lr, value, running))
            if step < SETTLE_STEPS:
                continue
            if step == SETTLE_STEPS:  # where it starts: the mean of the first steps, not one noisy loss
                first = sum(losses) / len(losses)
            best = min(best, running)
            # a flat, noisy start wanders about its mean: "back above it" counts once the loss clearly fell
            fell = best < first - CLEAR_FALL_SIGMAS * scatter(losses)
            if running > DIVERGED * best or (fell and running > first):
                return lrs, losses, "climbed"  # too high: back above its start after a clear fall, or far past
        return lrs, losses, "completed"
    finally:
        optimizer.zero_grad(set_to_none=True)


def scatter(losses: list[float]) -> float:
    """The losses' batch-to-batch sigma, from the median second difference (|a - 2b + c| has a sigma of √6 of
    theirs, and cancels a steady fall or climb: a first difference counted the fall itself as noise)."""
    if len(losses) < 3:
        return 0.0
    seconds = [abs(a - 2 * b + c) for a, b, c in zip(losses, losses[1:], losses[2:], strict=False)]
    return statistics.median(seconds) / (0.6745 * math.sqrt(6))


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
