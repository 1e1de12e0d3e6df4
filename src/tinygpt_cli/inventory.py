"""What a workspace holds: runs (read from their latest checkpoint's state.json) and tokenized datasets
(read from their meta.json). Nothing here loads a model or a token file.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt_cli import workspace
from tinygpt_cli.config import ModelConfig, is_count, preset_of
from tinygpt_cli.errors import CheckpointError, ConfigError, DataError

REPORT_FILE = "report.md"


@dataclass(frozen=True)
class RunSummary:
    """One run folder, as its latest checkpoint describes it."""

    name: str
    path: str
    size: str | None  # the preset that gave its settings (config.yaml's `size`)
    shape: str | None  # "4×128": layers × width, "custom 2×64" where no preset has it or not its size's
    parameters: int | None
    dataset: str | None
    steps: int
    max_steps: int | None
    tokens: int
    best_val_loss: float | None
    val_loss: float | None
    saved_at: str | None  # ISO 8601 (UTC) time the latest checkpoint was written
    has_report: bool
    training: bool  # a tinygpt process is training it now (it holds the run's lock)
    status: str  # one of STATUSES
    best_step: int | None = None  # the step of the best val loss (train.keep_best keeps its checkpoint)
    task: dict[str, Any] | None = None  # train.eval_task's first task's last figures: metrics.jsonl's record
    tasks: list[dict[str, Any]] | None = None  # the last record of each task train.eval_task names, in its order


# what `tinygpt runs` says of a run: training now; finished (its last step); stopped by Ctrl-C or a signal, or by
# --max-minutes / --max-tokens, and saved; failed (stopped on an error: diverged, out of memory, bad data, a
# checkpoint it could not write; metrics.jsonl's last line says which); killed (a SIGKILL, a power cut: its latest
# checkpoint has no report); starting (training, no checkpoint yet); no checkpoint (it stopped before saving one)
STATUSES = ("training", "finished", "interrupted", "time limit", "token limit", "failed", "killed", "starting",
            "no checkpoint")
_STOP_STATUS = {"completed": "finished", "interrupted": "interrupted", "time limit": "time limit",
                "token limit": "token limit"}  # read with "_" as " ": older reports say time_limit


def run_summary(run_dir: Path) -> RunSummary:
    """Summarise `run_dir` from its latest checkpoint (raises CheckpointError if it has none)."""
    from tinygpt_cli.checkpoint import STATE_FILE, latest_checkpoint, no_checkpoint_message, read_state

    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise CheckpointError(no_checkpoint_message(run_dir))
    state = read_state(checkpoint)
    counts = {key: state.get(key, 0) for key in ("step", "tokens_seen")}
    for key, value in counts.items():
        if not is_count(value):
            raise CheckpointError(f"{checkpoint / STATE_FILE} is damaged ({key} is {value!r}, not a count)")
    run_config = _dict(state.get("run_config"))
    parameters, shape = _model_facts(state.get("model_config"), run_config)
    max_steps = _count_or_none(_dict(run_config.get("train")).get("max_steps"))
    report = _report_text(run_dir)
    training = workspace.held(workspace.lock_of(run_dir))
    records = _tail_records(run_dir / "metrics.jsonl")
    last = _last_record(records)
    failed = last.get("kind") == "failed"
    # trained past its latest checkpoint (a resumed session that has not saved yet, or one killed before it did)
    ahead = last.get("step") if is_count(last.get("step")) and last["step"] > counts["step"] else None
    named = (_str(_dict(run_config.get("train")).get("eval_task")) or "").strip().lower()
    tasks = [record for record in (_last_record(records, name) for name in named.split(",") if name) if record]
    return RunSummary(
        name=run_dir.name, path=str(run_dir), size=_str(run_config.get("size")), shape=shape, parameters=parameters,
        dataset=_str(_dict(state.get("data")).get("dataset")),
        steps=ahead if ahead is not None and training else counts["step"], max_steps=max_steps,
        tokens=counts["tokens_seen"], best_val_loss=number_or_none(state.get("best_val_loss")),
        val_loss=number_or_none(state.get("val_loss")), saved_at=_str(state.get("saved_at")),
        has_report=_reported_step(report) is not None, training=training,
        status=_status(training, counts["step"], max_steps, report, failed, ahead is not None),
        best_step=_count_or_none(state.get("best_step")),
        task=tasks[0] if tasks else None, tasks=tasks or None,
    )


def _status(training: bool, step: int, max_steps: int | None, report: str | None, failed: bool = False,
            ahead: bool = False) -> str:
    """A run's STATUSES entry, from its lock, its latest checkpoint's step, its report.md, whether metrics.jsonl
    ends with a failure (`failed`) and whether it logged steps past that checkpoint (`ahead`: a session that died
    before saving them, killed). A report of that step says why it stopped; none of it means that training stopped
    on an error (failed) or that its process died (killed) before writing one."""
    if training:
        return "training"
    if ahead:
        return "killed"
    if max_steps is not None and step >= max_steps:
        return "finished"
    if _reported_step(report) == step:
        found = re.search(r"^Stopped: (.+?) at step \d+ \(", report or "", re.M)
        return _STOP_STATUS.get(found.group(1).replace("_", " ") if found else "", "killed")
    return "failed" if failed else "killed"


def _report_text(run_dir: Path) -> str | None:
    try:
        return (run_dir / REPORT_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def unsaved_run_summary(run_dir: Path) -> RunSummary:
    """A run folder with no checkpoint yet, from its config.yaml and its metrics.jsonl's last training record:
    starting (training now), or stopped before its first save."""
    config = _config_yaml(run_dir)
    parameters, shape = _model_facts(config.get("model"), config)
    records = _tail_records(run_dir / "metrics.jsonl")
    last = _last_record(records, "train")
    training = workspace.held(workspace.lock_of(run_dir))
    return RunSummary(
        name=run_dir.name, path=str(run_dir), size=_str(config.get("size")), shape=shape, parameters=parameters,
        dataset=_str(_dict(config.get("data")).get("dataset")) or None, steps=_count_or_none(last.get("step")) or 0,
        max_steps=_count_or_none(_dict(config.get("train")).get("max_steps")),
        tokens=_count_or_none(last.get("tokens")) or 0, best_val_loss=None, val_loss=None,
        saved_at=None, has_report=False, training=training,
        status="starting" if training else "failed" if _last_record(records).get("kind") == "failed" else
        "no checkpoint",
    )


def _config_yaml(run_dir: Path) -> dict[str, Any]:
    """A run's config.yaml as a mapping; {} where it is missing, cannot be read or is no mapping (a listing shows
    what it can)."""
    import yaml

    try:
        return _dict(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}


def _model_facts(model_config: Any, run_config: dict[str, Any]) -> tuple[int | None, str | None]:
    """(parameters, shape) of a saved model config (state.json's or config.yaml's), or Nones where it is no valid
    one; the shape marked custom where it is not the preset's that `run_config` names (`_shape`)."""
    from tinygpt_cli.plan import count_parameters

    with contextlib.suppress(TypeError, ValueError, ConfigError):
        model = ModelConfig(**_dict(model_config))
        return count_parameters(model), _shape(model, _str(run_config.get("size")))
    return None, None


def _tail_records(metrics: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl's last 16 KB, the last first (what a listing needs: it reads no whole log)."""
    from tinygpt_cli.report import metrics_record

    try:
        with open(metrics, "rb") as handle:
            handle.seek(0, 2)
            handle.seek(max(0, handle.tell() - 16384))
            lines = handle.read().splitlines()
    except OSError:
        return []
    records = (metrics_record(line.decode("utf-8", errors="replace")) for line in reversed(lines))
    return [record for record in records if record is not None]


def _last_record(records: list[dict[str, Any]], kind: str | None = None) -> dict[str, Any]:
    """The first of `records` (`_tail_records`: the last logged) of `kind` where given; {} where there is none."""
    return next((record for record in records if kind is None or record.get("kind") == kind), {})


def _count_or_none(value: Any) -> int | None:
    return value if is_count(value) else None


def _shape(model: ModelConfig, size: str | None) -> str:
    """Layers × width, marked custom where it is not the shape of the preset `size` (a run of --set model.*)."""
    return f"{'' if size is not None and preset_of(model) == size else 'custom '}{model.n_layer}×{model.n_embd}"


# state.json is read as written by tinygpt, but a hand-edited or damaged one must not break the whole listing:
# a field of the wrong type reads as missing (counts that a summary needs make the run be left out instead)
def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def number_or_none(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def list_run_summaries(problems: list[str] | None = None) -> list[RunSummary]:
    """Every run in the workspace: those that have saved no checkpoint yet first (starting, or stopped before their
    first), then those that hold one, the one saved last first. A run whose latest checkpoint cannot be read is
    left out, and what is wrong with it appended to `problems`."""
    from tinygpt_cli.checkpoint import no_checkpoint_message, scan_runs

    scan = scan_runs(problems)
    summaries = [unsaved_run_summary(run_dir) for run_dir in scan.unsaved]
    summaries.sort(key=lambda summary: not summary.training)  # starting now, then the ones killed before a save
    for run_dir in scan.complete:
        try:
            summaries.append(run_summary(run_dir))
        except CheckpointError as exc:  # a damaged state.json
            if problems is not None:
                problems.append(f"{run_dir.name} is left out: {exc}")
    if problems is not None:  # a file of each of its checkpoints went missing
        problems += [f"{run_dir.name} is left out: {no_checkpoint_message(run_dir)}" for _, run_dir in scan.incomplete]
    return summaries


def run_report(spec: str | None) -> tuple[Path, str, str | None]:
    """(path, text, note) of a run's report.md; `spec` is a run name or folder, None the latest run. The note
    (else None) says where the report is of an earlier stop than the run's latest checkpoint, or where report.md
    holds no report of training (an eval's sections alone): why not, and what to run."""
    from tinygpt_cli.checkpoint import (
        STATE_FILE,
        WEIGHTS_FILE,
        find_run,
        is_run_folder,
        latest_step,
        no_checkpoint_message,
        record_folder,
        run_of_checkpoints,
    )

    run_dir = find_run(spec)
    if (run_dir / STATE_FILE).is_file() or (run_dir / WEIGHTS_FILE).is_file():  # a checkpoint folder
        folder = record_folder(run_dir)  # runs/<name>/checkpoints/step_N -> runs/<name>
        if folder == run_dir:  # a checkpoint outside a run: its own eval records
            report = run_dir / REPORT_FILE
            if not report.is_file():
                raise CheckpointError(f"{run_dir} is a checkpoint outside a run, with no {REPORT_FILE}: "
                                      f"`tinygpt eval {run_dir}` writes one")
            return report, report.read_text(encoding="utf-8", errors="replace"), None
        run_dir = folder
    run_dir = run_of_checkpoints(run_dir)
    if not is_run_folder(run_dir):
        raise CheckpointError(no_checkpoint_message(run_dir))
    report = run_dir / REPORT_FILE
    training = workspace.held(workspace.lock_of(run_dir))
    resume = f"`tinygpt train --resume --name {run_dir.name}`"
    text = report.read_text(encoding="utf-8", errors="replace") if report.is_file() else None  # damaged bytes: shown
    reported, latest = _reported_step(text), latest_step(run_dir)
    if reported is None:  # no report of training: none yet, or what `tinygpt eval` appended alone, shown with why
        why = _no_training_report(run_dir, training, latest, resume, REPORT_FILE if text is None else
                                  f"training report (its {REPORT_FILE} holds no more)")
        if text is None:
            raise CheckpointError(why)
        return report, text, why
    note = None
    if latest is not None and reported < latest:  # a resume after it, cut short
        note = (f"this report is of step {reported}, and the run's latest checkpoint is step {latest}, "
                + ("which is training now" if training else
                   f"saved since without a report (killed, or a crash): {resume} goes on and writes one"))
    return report, text, note


def reported_step(run_dir: Path) -> int | None:
    """The step the run's report.md says it stopped at; None where it has no report of training."""
    return _reported_step(_report_text(run_dir))


def _reported_step(text: str | None) -> int | None:
    """The step a report.md of training says the run stopped at; None for none (or one of evaluations only)."""
    found = re.search(r"^Stopped: .+? at step (\d+) \(", text or "", re.M)  # a stop reason may have spaces
    return int(found.group(1)) if found else None


def _no_training_report(run_dir: Path, training: bool, latest: int | None, resume: str, lacking: str) -> str:
    """Why a run (its latest checkpoint's step `latest`) has no report of its training (`lacking` names what it
    lacks), and what to run."""
    from tinygpt_cli.checkpoint import no_checkpoint_message

    if training:
        return (f"{run_dir.name} is training now: its {REPORT_FILE} is written when it stops (`tinygpt runs` shows "
                f"how far it is)")
    if latest is None:  # stopped before its first checkpoint: nothing to resume
        return no_checkpoint_message(run_dir)
    summary = run_summary(run_dir)  # stopped (a kill, a crash) before the report was written
    if summary.max_steps and summary.steps >= summary.max_steps:  # a resume writes the report, training nothing
        return (f"{run_dir.name} reached its last step ({summary.steps}) but has no {lacking} (killed, or a crash): "
                f"{resume} writes it, and `tinygpt eval {run_dir.name}` measures the run")
    of = f" of {summary.max_steps}" if summary.max_steps else ""
    return (f"{run_dir.name} stopped at step {summary.steps}{of} without writing its {lacking} (killed, or a crash): "
            f"{resume} goes on and writes one")


@dataclass(frozen=True)
class RunRecord:
    """One run as `tinygpt runs compare` shows it: its summary, its settings and what it measured."""

    summary: RunSummary
    config: dict[str, Any]  # its settings as dotted keys ("train.lr"), from its latest checkpoint (else config.yaml)
    train_loss: float | None  # the last train loss logged
    tokens_per_s: float | None  # the median of the rates logged (the first steps' compile does not drag it down)
    mfu: float | None  # the median of the MFUs logged
    elapsed_s: float | None  # training time over all its sessions, to its latest checkpoint
    val_curve: list[tuple[int, int, float]]  # (step, tokens, val loss) of each evaluation in metrics.jsonl
    measures: dict[str, dict[str, Any]]  # the latest record of each measure: "hellaswag", "loss shakespeare/val"


@dataclass(frozen=True)
class RunGroup:
    """A column of `runs compare`: one run, or the runs a pattern matched (repeats of one setting with other seeds,
    read as a mean and a spread)."""

    label: str  # the pattern as given, or the run's name
    runs: list[RunRecord]


@dataclass(frozen=True)
class Comparison:
    runs: list[RunRecord]  # every run compared, in the order of the columns
    differing: list[str]  # the settings (dotted keys) whose values are not the same in all runs
    same: int  # how many are
    common_tokens: int | None  # where the runs trained on different numbers of tokens: the most all have reached
    groups: list[RunGroup]  # the columns: a run each, or a pattern's runs


def compare_runs(specs: list[str]) -> Comparison:
    """`tinygpt runs compare`: two or more runs (names or folders) side by side."""
    from tinygpt_cli.checkpoint import find_run, run_of_checkpoints

    folders: dict[Path, tuple[str, bool]] = {}  # each run's spec, and whether that is a pattern
    columns: list[tuple[str, list[Path]]] = []
    for spec in specs:
        matched = matching_runs(spec)
        matched = None if matched is None else [run.resolve() for run in matched]
        found = matched if matched is not None else [run_of_checkpoints(find_run(spec)).resolve()]
        for run_dir in found:
            if run_dir in folders:
                before, pattern = folders[run_dir]
                same = f"both take {run_dir.name}" if pattern or matched is not None else "are the same run"
                raise ConfigError(f"{before} and {spec} {same}: name each run once")
            folders[run_dir] = (spec, matched is not None)
        columns.append((spec if len(found) > 1 else found[0].name, found))
    if len(columns) < 2:
        label, found = columns[0] if columns else ("", [])
        raise ConfigError(f"{label} is one column ({workspace.counted(len(found), 'run')}): name a second run or "
                          f"pattern to compare it with, or its runs one by one to see them side by side"
                          if len(found) > 1 else "name two runs or more to compare (`tinygpt runs` lists them), "
                          "e.g. `tinygpt runs compare run-a run-b`")
    records = {run_dir: run_record(run_dir) for run_dir in folders}
    groups = [RunGroup(label, [records[run_dir] for run_dir in found]) for label, found in columns]
    runs = [run for group in groups for run in group.runs]
    keys = list(dict.fromkeys(key for run in runs for key in run.config))
    differing = [key for key in keys if len({repr(run.config.get(key)) for run in runs}) > 1]
    reached = [run.val_curve[-1][1] for run in runs if run.val_curve]
    common = min(reached) if len(reached) == len(runs) and len(set(reached)) > 1 else None
    return Comparison(runs, differing, len(keys) - len(differing), common, groups)


def matching_runs(spec: str) -> list[Path] | None:
    """The workspace's run folders (or links to them) whose names a pattern (`lr0.01-*`, `s[1-3]`) matches, by name;
    None where `spec` is no pattern: a path, or a name without * ? [ (or a run of that very name). Raises
    CheckpointError where a pattern matches none."""
    import fnmatch

    from tinygpt_cli.checkpoint import scan_runs

    if not workspace.is_bare_name(spec) or not any(char in spec for char in "*?[") \
            or (workspace.runs_dir() / spec).is_dir():
        return None
    scan = scan_runs()
    candidates = [*scan.complete, *(run for _, run in scan.incomplete), *scan.unsaved]
    matched = sorted((run for run in candidates if fnmatch.fnmatchcase(run.name, spec)), key=lambda run: run.name)
    if not matched:
        raise CheckpointError(f"no run matches {spec}: `tinygpt runs` lists them")
    return matched


def run_record(run_dir: Path) -> RunRecord:
    """What `compare_runs` shows of one run folder (raises CheckpointError where it is no run)."""
    import statistics

    from tinygpt_cli.checkpoint import (
        STATE_FILE,
        WEIGHTS_FILE,
        is_run_folder,
        latest_checkpoint,
        no_checkpoint_message,
        read_state,
    )
    from tinygpt_cli.config import config_from_dict, config_to_dict, flat_config
    from tinygpt_cli.report import metrics_records

    if (run_dir / STATE_FILE).is_file() or (run_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{run_dir} is a checkpoint, not a run: compare runs by the names `tinygpt runs` lists")
    if not is_run_folder(run_dir):
        raise CheckpointError(no_checkpoint_message(run_dir))
    checkpoint = latest_checkpoint(run_dir)
    state = read_state(checkpoint) if checkpoint is not None else {}
    summary = run_summary(run_dir) if checkpoint is not None else unsaved_run_summary(run_dir)
    saved = _dict(state.get("run_config")) or _config_yaml(run_dir)
    try:  # a key added since the run was trained reads as the default it trained with
        config = flat_config(config_to_dict(config_from_dict(saved))) if saved else {}  # none read: none shown
    except (ConfigError, TypeError, ValueError):  # a run of another version of tinygpt: its keys as they are
        config = flat_config(saved)
    if config.get("data.dataset") == "" and summary.dataset:  # "the last tokenized" when it started: the one it took
        config["data.dataset"] = summary.dataset
    records = metrics_records(run_dir / "metrics.jsonl")
    last = None
    curve: list[tuple[int, int, float]] = []
    rates: list[float] = []
    mfus: list[float] = []
    measures: dict[str, dict[str, Any]] = {}
    for record in records:
        kind, step = record.get("kind"), _count_or_none(record.get("step"))
        if kind == "train":
            last = record
            rates += [rate for rate in (number_or_none(record.get("tokens_per_s")),) if rate is not None]
            mfus += [mfu for mfu in (number_or_none(record.get("mfu")),) if mfu is not None]
        elif kind == "eval" and step is not None and (loss := number_or_none(record.get("val_loss"))) is not None \
                and math.isfinite(loss):  # a damaged line's Infinity would flatten every curve of the plot
            curve.append((step, _count_or_none(record.get("tokens")) or 0, float(loss)))
        elif isinstance(kind, str) and kind not in ("failed",):  # train.eval_task's figures
            measures[kind] = record
    for record in metrics_records(run_dir / "eval.jsonl"):  # `tinygpt eval`: after training's own
        if record.get("kind") == "task" and isinstance(record.get("task"), str):
            measures[record["task"]] = record
        elif record.get("kind") == "loss":
            measures[f"loss {record.get('dataset')}/{record.get('split')}"] = record
    # the latest checkpoint's: a stop between log steps saves the loss of the steps since the last, which
    # metrics.jsonl has no line for (the summary and the report show it too)
    saved_loss = number_or_none(state.get("train_loss"))
    return RunRecord(
        summary=summary, config=config,
        train_loss=saved_loss if saved_loss is not None else number_or_none((last or {}).get("loss")),
        tokens_per_s=statistics.median(rates) if rates else None, mfu=statistics.median(mfus) if mfus else None,
        elapsed_s=number_or_none(state.get("elapsed_s")), val_curve=curve, measures=measures)


def val_loss_at(run: RunRecord, tokens: int) -> float | None:
    """`run`'s val loss at `tokens` tokens: its evaluation there, else the straight line between the evaluations
    either side (runs whose evaluations fall at other token counts are read at the same one); None outside them."""
    for (_, before, low), (_, after, high) in zip(run.val_curve, run.val_curve[1:], strict=False):
        if before <= tokens <= after and after > before:
            return low + (high - low) * (tokens - before) / (after - before)
    return next((loss for _, seen, loss in run.val_curve if seen == tokens), None)


@dataclass(frozen=True)
class DatasetSummary:
    """One tokenized dataset, from its meta.json."""

    name: str
    path: str
    source: str | None
    fraction: float | None
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    documents: int  # selected from the source: one whose tail went to val counts once, unlike the splits' sum
    bytes: int  # train.bin + val.bin
    created: str | None


def dataset_summary(meta: dict[str, Any], path: Path) -> DatasetSummary:
    splits = meta.get("splits", {})
    train, val = splits.get("train", {}), splits.get("val", {})
    source = meta.get("source") or {}
    counts = meta.get("documents")
    selected = counts.get("selected") if isinstance(counts, dict) else None
    return DatasetSummary(
        name=path.name, path=str(path), source=source.get("spec"), fraction=meta.get("fraction"),
        train_tokens=int(train.get("tokens", 0)), val_tokens=int(val.get("tokens", 0)),
        train_documents=int(train.get("documents", 0)), val_documents=int(val.get("documents", 0)),
        documents=selected if isinstance(selected, int) else
        int(train.get("documents", 0)) + int(val.get("documents", 0)),
        bytes=int(train.get("bytes", 0)) + int(val.get("bytes", 0)), created=meta.get("created"),
    )


def list_dataset_summaries(problems: list[str] | None = None) -> list[DatasetSummary]:
    """Complete tokenized datasets in the workspace, newest first (see `data.list_datasets` for `problems`)."""
    from tinygpt_cli.data import list_datasets

    return [dataset_summary(d.meta, d.path) for d in list_datasets(problems, check_files=True)]


def dataset_meta(spec: str | None) -> tuple[Path, dict[str, Any], str | None]:
    """(folder, meta.json, problem) of a tokenized dataset by name or folder; None: the newest one. `problem` says
    what is wrong with its token files (missing, or not of the sizes meta.json gives) and how to make them again,
    else None: its meta.json is still worth showing (where it came from, with what settings)."""
    from tinygpt_cli.data import find_dataset

    dataset = find_dataset(spec)
    if dataset is None:
        raise DataError("no tokenized dataset in this workspace yet: run `tinygpt tokenize`")
    try:
        dataset.check_files()
    except DataError as exc:
        return dataset.path, dataset.meta, str(exc)
    return dataset.path, dataset.meta, None


# ----------------------------------------------------------------------------------------------- removal
@dataclass(frozen=True)
class Removal:
    """What `tinygpt runs rm` / `data rm` deletes for one name: `path` (a folder; for a link only the link goes),
    `extra` (what belongs with it: a dataset's interrupted tokenize and the copies a publish set aside), the bytes
    that frees, a line saying what it is, and notes on what depends on it."""

    what: str  # "runs/NAME" or "data/NAME"
    path: Path
    link: bool
    extra: tuple[Path, ...]
    bytes: int
    detail: str
    notes: tuple[str, ...] = ()


# what a deletion renames a folder to first (`.removing-PID-N`, no other name: nothing that looks for `.NAME.partial`
# or `.NAME.old-*` can take it for one): listings skip hidden names, so a run or dataset is listed whole or not at
# all, and a deletion killed halfway leaves a hidden folder that the next `rm` in that folder finishes
_REMOVING = ".removing-"


def _entry(spec: str, folder: Path, kind: str, listing: str = "") -> Path:
    """The entry of `folder` (runs/, data/ or data/raw/) that `spec` names: a name as the listing shows it, or a
    path to it. `tinygpt {kind} rm` deletes what `listing` (default `tinygpt {kind}`) lists."""
    listing = listing or f"tinygpt {kind}"
    if not spec.strip():  # `runs rm "$NAME"` with NAME unset: folder / "" is the folder itself
        raise DataError(f"an empty name names nothing `{listing}` lists: give a name it does")
    if workspace.is_bare_name(spec):
        path = folder / spec
    else:
        given = Path(spec).expanduser().absolute()
        try:
            inside = given.parent.resolve() == folder.resolve()
        except (OSError, RuntimeError):
            inside = False
        if not inside:
            raise DataError(f"{spec} is not in {folder}: `tinygpt {kind} rm` deletes only what `{listing}` lists; "
                            f"delete other folders yourself")
        path = folder / given.name
    if path.name.startswith(".") or path.name in ("", ".", "..") or path.parent != folder:  # C:name on Windows
        raise DataError(f"{spec} is not something `{listing}` lists: name one it does")
    return path


def _link_detail(path: Path, kept: str) -> str:
    """What `rm` of the link `path` does; `kept` names what it links to (run, dataset, download)."""
    sibling = workspace.sibling_target(path)
    if sibling is not None:
        return f"a second name of {sibling.parent.name}/{sibling.name}: only the link goes, the {kept} stays"
    target = os.readlink(path)
    if not path.exists():
        return f"a link to {target}, which is missing: only the link goes"
    return f"a link to {target}: only the link goes, the folder it names stays"


def plan_run_removal(spec: str) -> Removal:
    """What deleting the run `spec` (a name from `tinygpt runs`, or a path into runs/) would remove; raises a one-line
    error for one that is not there, or that is training now."""
    from tinygpt_cli.checkpoint import is_run_folder, latest_checkpoint, step_folders

    root = workspace.runs_dir()
    path = _entry(spec, root, "runs")
    what = f"runs/{path.name}"
    if not path.is_symlink() and not path.exists():
        raise DataError(f"no run named {path.name!r}{workspace.close_names(path.name, root)}: list them with "
                        f"`tinygpt runs`")
    if workspace.held(workspace.lock_of(path)):
        raise DataError(f"{what} is training now: stop it first (Ctrl-C where it runs, or end its job), then delete it")
    _check_deletable(what, [path])
    if path.is_symlink():
        return Removal(what, path, True, (), 0, _link_detail(path, "run"))
    if not path.is_dir():
        raise DataError(f"{what} is a file, not a run: move or delete it yourself")
    if not is_run_folder(path) and _holds_anything(path):  # the user's own files, kept in runs/
        raise DataError(f"{what} is not a run (no config.yaml or checkpoints/: `tinygpt runs` does not list it), so "
                        f"nothing was deleted: move or delete it yourself")
    size = workspace.tree_bytes(path)
    try:
        summary = run_summary(path) if latest_checkpoint(path) is not None else unsaved_run_summary(path)
        steps = f"{summary.steps:,}/{summary.max_steps:,}" if summary.max_steps else f"{summary.steps:,}"
        facts = [summary.status, f"step {steps}"]
        if summary.best_val_loss is not None:
            facts.append(f"best val loss {summary.best_val_loss:.4f}")
    except (CheckpointError, OSError):  # a damaged state.json: deleting it is still what was asked
        facts = ["unreadable checkpoint"]
    kept = len(step_folders(path))
    facts.append(f"{workspace.counted(kept, 'checkpoint')}, {workspace.format_bytes(size)}")
    return Removal(what, path, False, (), size, ", ".join(facts), _links_to(path) + _started_from(path))


def _started_from(path: Path) -> tuple[str, ...]:
    """A note naming the runs that started from the run `path` (its name, its folder or one of its checkpoints as
    their train.init_from): their config.yaml names weights its deletion takes away."""
    mine = os.path.abspath(path)
    children = []
    with contextlib.suppress(OSError):
        for run_dir in sorted(path.parent.iterdir()):
            if run_dir.name.startswith(".") or os.path.abspath(run_dir) == mine:
                continue
            spec = _str(_dict(_config_yaml(run_dir).get("train")).get("init_from")) or ""
            where = os.path.abspath(path.parent / spec)  # an absolute spec is itself
            if spec and (where == mine or where.startswith(mine + os.sep)):
                children.append(run_dir.name)
    if not children:
        return ()
    names = ", ".join(children[:6]) + (", …" if len(children) > 6 else "")
    return (f"{workspace.counted(len(children), 'run')} started from it ({names}): their config.yaml names weights "
            f"that go with it (each keeps its own checkpoints)",)


def _check_deletable(what: str, paths: list[Path]) -> None:
    """Refuse, before anything goes, what this user may not delete whole (another user's run or dataset in a shared
    workspace): renamed out of the listing and then only half deleted, it would be lost to its owner."""
    for path in paths:
        blocked = workspace.cannot_delete(path)  # (a link: only the link, `cannot_move`)
        if blocked is not None:
            advice = "make it writable (`chmod -R u+rwX` it), then delete it" if blocked.yours else \
                "ask its owner or an administrator to delete it"
            raise DataError(f"{what} cannot be deleted by you ({blocked.reason}), so nothing was deleted: {advice}")


def _holds_anything(folder: Path) -> bool:
    """Whether `folder` holds any file or folder (one that cannot be read counts as holding some)."""
    try:
        return any(True for _ in folder.iterdir())
    except OSError:
        return True


def _links_to(path: Path) -> tuple[str, ...]:
    """A note naming the other names of `path` in its folder (`runs/alias -> r`), which its deletion leaves
    pointing at nothing."""
    with contextlib.suppress(OSError):
        links = sorted(entry.name for entry in path.parent.iterdir() if workspace.sibling_target(entry) == path)
        if links:
            return (f"{', '.join(f'{path.parent.name}/{name}' for name in links)} links to it and will point at "
                    f"nothing: delete {'it' if len(links) == 1 else 'them'} too",)
    return ()


def runs_on_dataset(folder: Path) -> list[RunSummary]:
    """The runs of this workspace that trained on the tokenized dataset `folder` (newest first): those that name it,
    less those whose latest checkpoint recorded another train split (they trained on a dataset of that name made
    from other text, replaced since, or elsewhere: `--data PATH`) and those that saved no checkpoint; one training
    now counts whatever it recorded."""
    return [summary for summary, _ in dataset_users(folder)]


def dataset_users(folder: Path, meta: dict[str, Any] | None = None) -> list[tuple[RunSummary, str | None]]:
    """`runs_on_dataset`, each with the train hash its latest checkpoint recorded: "" where it recorded none (a
    checkpoint of an earlier tinygpt, or one that cannot be read), None for a run training now (not read). `meta`:
    the dataset's meta.json where the caller read it already."""
    from tinygpt_cli.checkpoint import latest_checkpoint, read_state
    from tinygpt_cli.data import train_hash, train_sha256

    current = train_hash(meta) if meta is not None else train_sha256(folder)
    users: list[tuple[RunSummary, str | None]] = []
    for summary in list_run_summaries():
        if summary.dataset != folder.name:
            continue
        if summary.training:  # it reads data/<name> now, whatever it trained on before
            users.append((summary, None))
            continue
        checkpoint = latest_checkpoint(Path(summary.path))
        if checkpoint is None:  # stopped before its first checkpoint: nothing to resume
            continue
        try:
            data = read_state(checkpoint).get("data")
        except (CheckpointError, OSError, ValueError):
            data = None
        recorded = data.get("train_sha256") if isinstance(data, dict) else None
        recorded = recorded if isinstance(recorded, str) else ""
        if recorded and current and recorded != current:
            continue
        users.append((summary, recorded))
    return users


def plan_dataset_removal(spec: str) -> Removal:
    """What deleting the tokenized dataset `spec` (a name from `tinygpt data`, or a path into data/) would remove,
    with an interrupted tokenize of it and copies set aside; raises a one-line error for one that is not there, or
    that a tokenize is writing or a training reading now. The runs that trained on it are named in the notes."""
    from tinygpt_cli.data import _old_copies, _partial_of
    from tinygpt_cli.sources import RAW_DIR_NAME

    root = workspace.data_dir()
    path = _entry(spec, root, "data")
    what = f"data/{path.name}"
    if path.name == RAW_DIR_NAME:
        raise DataError(f"data/{RAW_DIR_NAME} holds downloaded corpora, not a tokenized dataset: `tinygpt data rm "
                        f"--download NAME` deletes one (a tokenized dataset does not need its download)")
    if workspace.held(workspace.lock_of(path)):
        raise DataError(f"{what} is being tokenized now: stop that `tinygpt tokenize` first, then delete it")
    linked = path.is_symlink()
    extra = () if linked else (_partial_of(path), *_old_copies(path))
    extra = tuple(p for p in extra if p.is_dir())
    if not linked and not path.exists() and not extra:
        raise DataError(f"no tokenized dataset named {path.name!r}{workspace.close_names(path.name, root)}: list them "
                        f"with `tinygpt data`")
    if not linked and path.exists() and not path.is_dir():
        raise DataError(f"{what} is a file, not a tokenized dataset: move or delete it yourself")
    if not linked and path.is_dir() and _holds_anything(path) and \
            not any((path / name).exists() for name in ("meta.json", "train.bin", "val.bin")):
        raise DataError(f"{what} is not a tokenized dataset (no meta.json, train.bin or val.bin: `tinygpt data` does "
                        f"not list it), so nothing was deleted: move or delete it yourself")
    _check_deletable(what, [p for p in (path, *extra) if p.is_symlink() or p.exists()])
    users = runs_on_dataset(path)
    training = [s.name for s in users if s.training]
    if training:
        raise DataError(f"run {training[0]} is training on {what} now: wait for it to end or stop it, then delete it")
    notes = []
    if users:
        names = ", ".join(s.name for s in users[:6]) + (", …" if len(users) > 6 else "")
        notes.append(f"{workspace.counted(len(users), 'run')} trained on it ({names}): resuming one, or `tinygpt "
                     f"eval` of one without --data, will need it tokenized again")
    if linked:
        return Removal(what, path, True, (), 0, _link_detail(path, "dataset"),
                       tuple(notes))
    notes += _links_to(path)
    size = sum(workspace.tree_bytes(p) for p in (path, *extra) if p.is_dir())
    facts = []
    if path.is_dir():
        try:
            from tinygpt_cli.data import load_dataset

            summary = dataset_summary(load_dataset(path).meta, path)
            facts.append(f"{summary.train_tokens + summary.val_tokens:,} tokens")
        except DataError:
            facts.append("damaged")
    if any(p.name.endswith(".partial") for p in extra):
        facts.append("an interrupted tokenize of it")
    facts.append(workspace.format_bytes(size))
    return Removal(what, path, False, extra, size, ", ".join(facts), tuple(notes))


def plan_download_removal(spec: str) -> Removal:
    """What deleting the download `spec` (data/raw/NAME: `tinygpt download --list` says which are here) would
    remove; raises a one-line error for one that is not there or is being downloaded now. The datasets tokenized
    from it are named in the notes: they keep working, but tokenizing one again needs the download again."""
    from tinygpt_cli.data import list_datasets
    from tinygpt_cli.sources import RAW_DIR_NAME, read_download_record

    root = workspace.data_dir() / RAW_DIR_NAME
    path = _entry(spec, root, "data", "tinygpt download --list")
    what = f"data/{RAW_DIR_NAME}/{path.name}"
    if workspace.held(workspace.lock_of(path)):
        raise DataError(f"{what} is being downloaded now: stop that `tinygpt download` first, then delete it")
    if not path.is_symlink() and not path.is_dir():
        here = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) \
            if root.is_dir() else []
        known = f" (here: {', '.join(here)})" if here else " (none here)"
        raise DataError(f"no download named {path.name!r}{known}: `tinygpt download --list` shows them")
    _check_deletable(what, [path])
    users = [d.path.name for d in list_datasets() if str((d.meta.get("source") or {}).get("spec")) in
             (path.name, str(path), str(path.resolve()))]
    notes = [f"{', '.join(f'data/{name}' for name in users)} {'was' if len(users) == 1 else 'were'} tokenized from "
             f"it: {'it keeps' if len(users) == 1 else 'they keep'} working, but tokenizing again needs the download "
             f"again"] if users else []
    if path.is_symlink():
        return Removal(what, path, True, (), 0, _link_detail(path, "download"),
                       tuple(notes))
    record = read_download_record(path)
    state = "no download.json" if record is None else "complete" if record.get("complete") else "partial"
    size = workspace.tree_bytes(path)
    return Removal(what, path, False, (), size, f"{state} download, {workspace.format_bytes(size)}", tuple(notes))


def _put_back(moved: list[tuple[Path, Path]]) -> None:
    """Rename each (name, hidden) pair of a deletion back to its name, where that name is still free."""
    for path, hidden in moved:
        if not path.exists() and not path.is_symlink():
            with contextlib.suppress(OSError):
                workspace.replace(hidden, path)


def remove(removal: Removal) -> None:
    """Delete what `removal` names, holding the lock a training (of a run) or a tokenize (of a dataset) takes, so
    that neither starts on it meanwhile. The folder is first renamed to a hidden name in one step, so no listing or
    command sees it half deleted; Ctrl-C and SIGTERM wait for the end. A deletion killed halfway leaves that hidden
    folder, which the next `rm` in the same folder removes."""
    from tinygpt_cli.launch import Stopped, stops_held

    folder = removal.path.parent
    busy = DataError(f"{removal.what} is in use now (a training or tokenize started on it): wait, then delete it")
    with workspace.exclusive(workspace.lock_of(removal.path), removal.what, busy), stops_held() as stops:
        for left in folder.glob(f"{_REMOVING}*"):  # earlier deletions that were killed (not one going on now)
            pid = left.name[len(_REMOVING):].split("-")[0]
            if not pid.isdigit() or not workspace.pid_alive(int(pid)):
                shutil.rmtree(left, ignore_errors=True)
        if removal.link:
            removal.path.unlink(missing_ok=True)
        else:
            doomed: list[tuple[Path, Path]] = []
            for index, path in enumerate((removal.path, *removal.extra)):
                if not path.is_dir():
                    continue
                hidden = folder / f"{_REMOVING}{os.getpid()}-{index}"
                try:
                    workspace.replace(path, hidden)
                except PermissionError as exc:
                    _put_back(doomed)  # those moved already: nothing is hidden that the next `rm` would sweep
                    raise DataError(f"{removal.what} is open in another program (a `tinygpt generate` or `eval`?): "
                                    f"close it, then delete it" if sys.platform == "win32" else  # no folder renames
                                    f"{removal.what} cannot be deleted by you ({exc.strerror}: {path}), so nothing "
                                    f"was deleted: ask its owner or an administrator to delete it") from None
                doomed.append((path, hidden))
            for _, hidden in doomed:
                shutil.rmtree(hidden, ignore_errors=True)
            left = [(path, hidden) for path, hidden in doomed if hidden.exists()]
            if left:  # what could not go is listed again, as what it was: not left for a later `rm` to sweep
                _put_back(left)
                raise DataError(f"{removal.what} could not be deleted whole (permissions?): what is left of it is at "
                                f"{left[0][0]}; delete it yourself")
    if stops:  # then the stop, saying that this deletion was finished
        stopped = Stopped(stops[0])
        stopped.removed = removal.what  # type: ignore[attr-defined]
        raise stopped

