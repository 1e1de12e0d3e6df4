"""What a run leaves for people to read: `loss.png` (train and val curves) and `report.md`.

The plot is drawn with numpy and written as a PNG with zlib, so no plotting library is needed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tinygpt_cli import workspace
from tinygpt_cli.workspace import write_bytes_atomic, write_text_atomic

if TYPE_CHECKING:
    from tinygpt_cli.config import SampleConfig

# 3x5 pixel glyphs, one string of 15 bits per character, row by row
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001010010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "a": "000011101101011", "e": "000111111100111", "i": "010000010010010", "k": "100101110101101",
    "l": "010010010010010", "n": "000110101101101", "o": "000111101101111", "p": "000111101111100",
    "r": "000111100100100", "s": "000111110011111", "t": "010111010010011", "v": "000101101101010",
    " ": "000000000000000", "b": "100100111101111", "c": "000111100100111", "d": "001001111101111",
    "f": "011010111010010", "g": "000011101011110", "h": "100100111101101", "j": "001000001101111",
    "m": "000111111101101", "q": "000011101011001", "u": "000101101101111", "w": "000101101111111",
    "x": "000000101010101", "y": "000101101011110", "z": "000111001100111", "_": "000000000000111",
    "/": "001001010100100", ":": "000010000010000", "(": "010100100100010", ")": "010001001001010",
    "+": "000010111010000", ",": "000000000010100", "=": "000111000111000", "*": "000101010101000",
    "?": "111001010000010", "[": "110100100100110", "]": "011001001001011",
}
_TRAIN_COLOUR = (31, 119, 180)
_VAL_COLOUR = (214, 39, 40)
_AXIS_COLOUR = (60, 60, 60)


def _png(image: np.ndarray) -> bytes:
    """Encode an (H, W, 3) uint8 image as PNG."""
    height, width, _ = image.shape
    raw = b"".join(b"\x00" + image[row].tobytes() for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _text(image: np.ndarray, x: int, y: int, text: str, colour: tuple[int, int, int], scale: int = 2) -> None:
    for index, char in enumerate(text.lower()):
        bits = _GLYPHS.get(char, _GLYPHS[" "])
        for bit in range(15):
            if bits[bit] == "1":
                row, col = divmod(bit, 3)
                top, left = y + row * scale, x + (index * 4 + col) * scale
                image[top : top + scale, left : left + scale] = colour


def _line(image: np.ndarray, points: list[tuple[float, float]], colour: tuple[int, int, int]) -> None:
    height, width, _ = image.shape
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1)) * 2
        xs = np.clip(np.round(np.linspace(x0, x1, steps)).astype(int), 0, width - 1)
        ys = np.clip(np.round(np.linspace(y0, y1, steps)).astype(int), 0, height - 1)
        for dy in (0, 1):
            image[np.clip(ys + dy, 0, height - 1), xs] = colour
    if len(points) == 1:
        x, y = points[0]
        image[int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = colour


# one colour per run in `tinygpt runs compare --plot` (the tab10 palette), in the order the runs are named
_RUN_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75),
                (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))


def _short(value: float) -> str:
    """An axis label: 1234567 -> 1.23m, 65536 -> 65.5k, 500 -> 500."""
    for limit, suffix in ((1e9, "g"), (1e6, "m"), (1e3, "k")):
        if value >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:g}"


def _render_curves(series: list[tuple[list[tuple[float, float]], tuple[int, int, int]]],
                   legend: list[list[tuple[str, tuple[int, int, int]]]], x_label: str, width: int = 640,
                   height: int = 400) -> bytes:
    """A PNG of lines of (x, loss) points, each in its colour, with min/max labels on both axes and `legend` above
    the frame: one row of (label, colour) pairs per entry."""
    top = 16 + 14 * len(legend)
    height += top - 30
    image = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, bottom = 70, width - 20, height - 40
    everything = [point for points, _ in series for point in points]
    if everything:
        max_x = max(x for x, _ in everything) or 1
        losses = [loss for _, loss in everything]
        low, high = min(losses), max(losses)
        if high - low < 1e-6:
            low, high = low - 0.5, high + 0.5

        def place(x: float, loss: float) -> tuple[float, float]:
            return (left + (right - left) * x / max_x, bottom - (bottom - top) * (loss - low) / (high - low))

        for points, colour in series:
            if points:
                _line(image, [place(x, v) for x, v in points], colour)
        _text(image, 4, top - 4, f"{high:.2f}", _AXIS_COLOUR)
        _text(image, 4, bottom - 6, f"{low:.2f}", _AXIS_COLOUR)
        _text(image, right - 4 * 2 * len(_short(max_x)), bottom + 10, _short(max_x), _AXIS_COLOUR)
    image[top:bottom, left] = _AXIS_COLOUR
    image[bottom, left:right] = _AXIS_COLOUR
    _text(image, left, bottom + 10, "0", _AXIS_COLOUR)
    _text(image, (left + right) // 2 - 4 * len(x_label), bottom + 10, x_label, _AXIS_COLOUR)
    for row, entries in enumerate(legend):
        x = left + 10
        for label, colour in entries:
            _text(image, x, 8 + 14 * row, label, colour)
            x += 8 * len(label) + 12
    return _png(image)


def render_loss_plot(train: list[tuple[int, float]], val: list[tuple[int, float]],
                     width: int = 640, height: int = 400) -> bytes:
    """A PNG of loss against step: train in blue, val in red, with min/max labels on both axes."""
    return _render_curves([(train, _TRAIN_COLOUR), (val, _VAL_COLOUR)],
                          [[("train", _TRAIN_COLOUR), ("val", _VAL_COLOUR), ("loss", _AXIS_COLOUR)]], "step",
                          width, height)


def render_comparison_plot(curves: list[tuple[str, list[list[tuple[int, float]]]]], x_label: str = "tokens") -> bytes:
    """A PNG of several runs' val loss against tokens (or steps): one colour a name, named above the frame; a name's
    lines are its runs (a pattern's repeats)."""
    colours = [_RUN_COLOURS[index % len(_RUN_COLOURS)] for index in range(len(curves))]
    return _render_curves([(points, colour) for (_, lines), colour in zip(curves, colours, strict=True)
                           for points in lines],
                          [[(name, colour)] for (name, _), colour in zip(curves, colours, strict=True)]
                          + [[(f"val loss against {x_label}", _AXIS_COLOUR)]], x_label)


def metrics_record(line: str) -> dict[str, Any] | None:
    """One metrics.jsonl line as its record; None for a blank, damaged or cut line (a crash mid-write: the resume
    that follows drops it)."""
    try:
        record = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def metrics_records(path: Path) -> list[dict[str, Any]]:
    """The records of a .jsonl file (metrics.jsonl, eval.jsonl) in order, a damaged or cut line left out; [] where
    there is no file, or none that can be read."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [record for record in map(metrics_record, lines) if record is not None]


def read_metrics(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train: list[tuple[int, float]] = []
    val: list[tuple[int, float]] = []
    for record in metrics_records(path):
        kind = record.get("kind")
        value = record.get("loss") if kind == "train" else record.get("val_loss")
        if value is None or not math.isfinite(value):
            continue
        (train if kind == "train" else val).append((record["step"], value))
    return train, val


def write_loss_plot(metrics_path: Path, png_path: Path) -> None:
    train, val = read_metrics(metrics_path)
    write_bytes_atomic(png_path, render_loss_plot(train, val))


def _sample_text(model: Any, settings: SampleConfig, longest: int = 80) -> str:
    """A short sample from a fresh document, for the report: as `tinygpt generate` samples from the run (its sample.*
    settings and seed, so reruns agree), at most `longest` tokens."""
    import torch

    from tinygpt_cli.sample import generate
    from tinygpt_cli.tokenizer import EOT_ID, get_encoding

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ids = [int(t[0]) for t in generate(
                model, [EOT_ID], min(longest, settings.max_new_tokens), temperature=settings.temperature,
                top_k=settings.top_k, top_p=settings.top_p, repetition_penalty=settings.repetition_penalty,
                seed=settings.seed)]
    finally:
        model.train(was_training)
    return get_encoding().decode([i for i in ids if i < 50257])


def task_line(figures: dict[str, Any]) -> str:
    """`hellaswag: acc_norm 0.2950 ± 0.0046 · acc 0.2880 on 10,042 examples`, `lambada_openai: acc 0.3256 ± 0.0065 ·
    perplexity 40.06 on 5,153 examples`: a task's figures (a TaskResult's fields, or a metrics.jsonl record's)."""

    def figure(key: str, digits: int = 4) -> str:
        value = figures.get(key)
        return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"

    name = figures.get("task") or figures.get("kind")
    count = figures.get("examples")  # a damaged record's field of another type reads as none
    examples = workspace.counted(count if isinstance(count, int) and not isinstance(count, bool) else 0, "example")
    if figures.get("perplexity") is not None or "accuracy_norm" not in figures:  # a completion task (LAMBADA)
        return (f"{name}: acc {figure('accuracy')} ± {figure('accuracy_stderr')} · perplexity "
                f"{figure('perplexity', 2)} on {examples}")
    return (f"{name}: acc_norm {figure('accuracy_norm')} ± {figure('accuracy_norm_stderr')} · acc "
            f"{figure('accuracy')} on {examples}")


def optimizer_line(tc: Any) -> str:
    """The optimizer and its schedule in words: "AdamW, cosine from lr 0.002 to 0.0002"."""
    schedule = f"{tc.schedule} from lr {tc.lr:g} to {tc.min_lr:g}"
    if tc.optimizer == "muon":
        return f"Muon for the blocks' matrices (lr {tc.muon_lr:g} on the same schedule) + AdamW, {schedule}"
    return f"AdamW, {schedule}"


def write_report(run_dir: Path, cfg: Any, result: Any, dataset: dict[str, Any], hardware: dict[str, Any],
                 model: Any, started_from: str | None = None) -> None:
    """runs/<name>/report.md: config, data, hardware, time, throughput, final losses and a sample. The model is
    named by its preset where it has that preset's shape, else custom, as `tinygpt runs` does. `started_from`: the
    checkpoint folder train.init_from loaded, where it named a tinygpt run or checkpoint."""
    from tinygpt_cli.config import dump_yaml, size_label

    def fmt(value: float | None) -> str:
        return f"{value:.4f}" if value is not None else "n/a"

    sample = _sample_text(model, cfg.sample)
    lines = [
        f"# Run {run_dir.name}",
        "",
        # "time limit", as `tinygpt runs` says it (the listing reads the line back; older reports say time_limit)
        f"Stopped: {result.stopped.replace('_', ' ')} at step {result.steps} ({result.tokens:,} tokens seen).",
        "",
        "| | |",
        "|---|---|",
        f"| model | {size_label(cfg.size, cfg.model)}: "
        f"{model.num_params() / 1e6:.1f}M parameters, {cfg.model.n_layer} layers × {cfg.model.n_embd}, context "
        f"{cfg.model.block_size} |",
        *([f"| started from | {cfg.train.init_from}"
           f"{f' (checkpoint {started_from})' if started_from and started_from != cfg.train.init_from else ''} |"]
          if cfg.train.init_from else []),
        f"| data | {dataset['name']}: {dataset['train_tokens']:,} train / {dataset['val_tokens']:,} val tokens |",
        f"| hardware | {hardware['device_name']} · {hardware['device']} {hardware['dtype']} · "
        f"{workspace.counted(hardware['world_size'], 'process', 'processes')} · torch {hardware['torch']} |",
        f"| batch | {hardware['batch_size']} sequences × {hardware['grad_accum']} accumulation × "
        f"{workspace.counted(hardware['world_size'], 'process', 'processes')} |",
        f"| optimizer | {optimizer_line(cfg.train)} |",
        *_time_rows(run_dir, result),
        f"| final train loss | {fmt(result.final_loss)} |",
        f"| final val loss | {fmt(result.final_val_loss)} (best {fmt(result.best_val_loss)}"
        f"{f' at step {result.best_step}' if result.best_step is not None else ''}) |",
        f"| unigram baseline | {fmt(result.unigram_val_loss)} |",
        *(f"| {task['kind']} (zero-shot, train.eval_task) | {task_line(task).split(': ', 1)[1]} at step "
          f"{task['step']} |" for task in _last_tasks(run_dir, cfg.train.eval_task)),
        f"| skipped non-finite steps | {result.skipped_steps} |",
        "",
        "![loss](loss.png)",
        "",
        "## Sample",
        "",
        "```",
        sample.strip("\n"),
        "```",
        "",
        "## Config",
        "",
        "```yaml",
        dump_yaml(cfg).rstrip(),
        "```",
        "",
    ]
    with report_lock(run_dir):  # an eval appending between the read and the replace would be lost
        write_text_atomic(run_dir / "report.md", "\n".join(lines) + _evaluation_sections(run_dir / "report.md"))


def _time_rows(run_dir: Path, result: Any) -> list[str]:
    """The report's time and throughput: this session's, or where it trained no step (it wrote the report of a run
    killed before writing one, or ran the evaluation a stop had cut) the median rate metrics.jsonl logged."""
    if result.steps > result.first_step:
        return [f"| time (this session) | {result.seconds:.0f} s |",
                f"| throughput | {result.tokens_per_s:,.0f} tokens/s |"]
    rates = sorted(record["tokens_per_s"] for record in metrics_records(run_dir / "metrics.jsonl")
                   if record.get("kind", "train") == "train" and isinstance(record.get("tokens_per_s"), (int, float)))
    rate = f"{rates[len(rates) // 2]:,.0f} tokens/s (the median logged)" if rates else "n/a"
    return ["| time (this session) | no step trained |", f"| throughput | {rate} |"]


def _last_tasks(run_dir: Path, names: str) -> list[dict[str, Any]]:
    """metrics.jsonl's last record of each task train.eval_task names (`names`: comma-separated), in its order;
    a task not scored yet has none."""
    wanted = [name for name in names.split(",") if name]
    found = {record["kind"]: record for record in (metrics_records(run_dir / "metrics.jsonl") if wanted else [])
             if record.get("kind") in wanted}
    return [found[name] for name in wanted if name in found]


# How long a write of report.md waits for another to finish: each holds the lock for one append or one rewrite.
REPORT_PATIENCE_S = 30.0


def report_lock(run_dir: Path) -> contextlib.AbstractContextManager[None]:
    """The lock that `train`'s rewrite of a run's report.md and `eval`'s appends to it take, one at a time."""
    return workspace.exclusive(workspace.lock_of(run_dir / "report.md"), f"{run_dir.name}/report.md",
                               patience_s=REPORT_PATIENCE_S)


def _evaluation_sections(report: Path) -> str:
    """The "## Evaluation" sections `tinygpt eval` appended to an earlier report, kept across rewrites."""
    if not report.is_file():
        return ""
    text = report.read_text(encoding="utf-8")
    start = text.find("\n## Evaluation")
    return text[start:] if start >= 0 else ""
