"""Experiment trackers: what a run writes to metrics.jsonl, mirrored to TensorBoard or Weights & Biases
(`train.log_to`, `tinygpt train --log-to`).

metrics.jsonl stays the record a run keeps; a tracker is a view of it. Each numeric field of a record is logged as
`<kind>/<field>` (`train/loss`, `train/lr`, `train/tokens_per_s`, `train/mfu`, `eval/val_loss`, …) at the record's
step. Only rank 0 logs. A tracker that fails mid-run (a full disk, a dropped connection) is switched off with a
note: the training goes on, and metrics.jsonl still has every line.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tinygpt_cli.errors import ConfigError, TrainingError, first_line, install_advice

TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"  # runs/<name>/tensorboard/: `tensorboard --logdir runs` shows every run
WANDB_DIR = "wandb"  # runs/<name>/wandb/: wandb's own files (offline runs to `wandb sync`)
WANDB_PROJECT = "tinygpt"  # where WANDB_PROJECT does not name one


def parse(value: str) -> tuple[str, ...]:
    """The trackers `train.log_to` names: comma-separated, in TRACKERS order; "" or "none" for none."""
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if names == ["none"]:
        return ()
    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.log_to takes {', '.join(TRACKERS)} or both, comma-separated, or none (got "
                          f"{value!r})")
    return tuple(name for name in TRACKERS if name in names)


def check_installed(names: Iterable[str]) -> None:
    """A TrainingError naming the install command for a tracker whose package is missing: said before the run
    spends anything, not at its first log line."""
    missing = [name for name in names if importlib.util.find_spec(name) is None]  # (each is its package's name)
    if missing:
        packages = " ".join(missing)
        raise TrainingError(f"--log-to {','.join(names)} needs {packages}, which is not installed: "
                            f"{install_advice(packages)}, or drop --log-to")


def _scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numeric fields as `<kind>/<field>` (its step and kind are the coordinates)."""
    kind = record.get("kind", "train")
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool)}


class _TensorBoard:
    name = "tensorboard"

    def __init__(self, run_dir: Path, config_text: str, resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: TensorBoard drops the events a killed attempt logged past the checkpoint a resume starts
        # from (metrics.jsonl drops them too), and for a new run every event an attempt killed before its first
        # checkpoint left in the folder
        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR), flush_secs=30,
                                    purge_step=0 if resume_step is None else resume_step + 1)
        if resume_step is None:
            self.writer.add_text("config", "```yaml\n" + config_text + "```", 0)

    def log(self, record: dict[str, Any]) -> None:
        for tag, value in _scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        if record.get("kind") == "eval":  # not left to flush_secs: what an evaluation measured is seen at once
            self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()

    def state(self) -> dict[str, Any]:
        return {}


class _WandB:
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict[str, Any], run_id: str | None) -> None:
        import wandb

        try:
            # Offline, W&B cannot continue a run: a resumed id made a second offline folder of that id, which
            # `wandb sync` wrote over the first. There each invocation is a run of its own; the run's group holds
            # them all, online too.
            offline = wandb.setup().settings.mode in ("offline", "dryrun")
            run_id = None if offline else run_id
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or WANDB_PROJECT, name=run_dir.name, group=run_dir.name,
                id=run_id, resume="allow" if run_id else None, dir=str(run_dir), config=config,
                settings=wandb.Settings(console="off", quiet=True),  # (its own lines say where the run goes)
            )
        except Exception as exc:  # wandb's UsageError (no API key), a CommError (no network), …
            with contextlib.suppress(Exception):  # its exit hook would print after the error, naming a folder gone
                wandb.teardown()
            raise TrainingError(
                f"wandb could not start a run ({first_line(exc)}): log in (`wandb login`) and check the network, or "
                f"set WANDB_MODE=offline to log into {run_dir / WANDB_DIR} and `wandb sync` it later"
            ) from None
        # every series against the run's step, which a resume logs again from its checkpoint on: wandb's own step
        # only grows, and would drop those lines
        self.run.define_metric("step", hidden=True)
        self.run.define_metric("*", step_metric="step")

    def log(self, record: dict[str, Any]) -> None:
        self.run.log({**_scalars(record), "step": record["step"]})

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)

    def state(self) -> dict[str, Any]:
        return {"wandb_id": self.run.id}


class Trackers:
    """The trackers of one run on rank 0: `log` each metrics.jsonl record, `state` into every checkpoint (a
    resume continues the same wandb run), `close` at the end. `created` lists the folders they made, which a run
    that ends before its first checkpoint removes with its other files."""

    def __init__(self, names: Iterable[str], run_dir: Path, config: dict[str, Any], config_text: str,
                 resume_step: int | None, state: dict[str, Any] | None, note: Callable[[str], None]) -> None:
        names = tuple(names)
        self.note = note
        self.active: list[Any] = []
        self.saved: dict[str, Any] = {}  # what checkpoints keep: a tracker dropped mid-run keeps its run id
        folders = {"tensorboard": TENSORBOARD_DIR, "wandb": WANDB_DIR}
        self.created = [run_dir / folders[name] for name in names if not (run_dir / folders[name]).exists()]
        try:
            for name in names:
                if name == "tensorboard":
                    self.active.append(_TensorBoard(run_dir, config_text, resume_step))
                else:
                    run_id = (state or {}).get("wandb_id") if resume_step is not None else None
                    self.active.append(_WandB(run_dir, config, run_id))
                self.saved.update(self.active[-1].state())
        except BaseException:  # a later one failed to start: the earlier ones go, with what they wrote
            self.close(failed=True)
            self.remove_created()
            raise

    def log(self, record: dict[str, Any]) -> None:
        for tracker in list(self.active):
            try:
                tracker.log(record)
            except Exception as exc:  # the training is worth more than its chart
                self.active.remove(tracker)
                self.note(f"{tracker.name} stopped logging ({first_line(exc)}); training goes on, and "
                          f"metrics.jsonl has every line")
                self._close_one(tracker, failed=True)

    def state(self) -> dict[str, Any]:
        return dict(self.saved)

    def close(self, failed: bool = False) -> None:
        active, self.active = self.active, []
        for tracker in active:
            self._close_one(tracker, failed)

    def _close_one(self, tracker: Any, failed: bool) -> None:
        try:
            tracker.close(failed)
        except Exception as exc:
            self.note(f"{tracker.name} did not close cleanly ({first_line(exc)})")

    def remove_created(self) -> None:
        """Remove the folders these trackers made (a new run that ends with no checkpoint leaves nothing)."""
        for folder in self.created:
            shutil.rmtree(folder, ignore_errors=True)
