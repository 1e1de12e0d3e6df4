"""`train --log-to tensorboard,wandb`: metrics.jsonl mirrored to experiment trackers, on rank 0, across resumes."""

import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types

import pytest
from typer.testing import CliRunner

from conftest import TINY_SETTINGS, assert_one_line_error, tiny_config
from tinygpt_cli import trackers
from tinygpt_cli.cli import app
from tinygpt_cli.errors import ConfigError, TrainingError
from tinygpt_cli.training import StopFlag, train

runner = CliRunner()


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _expected(run_dir):
    """What a tracker should hold: {tag: [(step, value), ...]} from metrics.jsonl, in order."""
    series: dict[str, list] = {}
    for record in _records(run_dir):
        for key, value in record.items():
            if key not in ("kind", "step") and isinstance(value, (int, float)):
                series.setdefault(f"{record['kind']}/{key}", []).append((record["step"], float(value)))
    return series


def test_log_to_takes_the_trackers_by_name_and_refuses_others():
    assert trackers.parse("") == () and trackers.parse("none") == ()
    assert trackers.parse(" WandB , tensorboard,wandb") == ("tensorboard", "wandb")
    with pytest.raises(ConfigError, match="train.log_to takes tensorboard, wandb"):
        trackers.parse("mlflow")
    with pytest.raises(ConfigError, match="train.log_to"):
        tiny_config(log_to="tensorboard,comet")


def test_an_unknown_tracker_on_the_command_line_is_one_line(workspace):
    result = runner.invoke(app, ["train", "--size", "micro", "--log-to", "mlflow"])
    assert_one_line_error(result, "train.log_to takes tensorboard, wandb")
    assert not (workspace / "runs").exists()


def test_a_missing_tracker_package_is_said_before_anything_is_spent(with_shakespeare, workspace, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    events = []
    with pytest.raises(TrainingError, match=r"needs wandb, which is not installed: `pip install wandb`"):
        train(tiny_config(max_steps=2, log_to="wandb"), run_name="nowandb", on_event=events.append)
    assert not (workspace / "runs" / "nowandb").exists()
    assert not any(event.kind == "start" for event in events)


def test_tensorboard_holds_what_metrics_jsonl_holds_across_a_resume(with_shakespeare):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(max_steps=6, eval_interval=4, log_to="tensorboard")
    run = train(config, run_name="tb").run_dir
    # a kill after steps 5 and 6 were logged but before their checkpoint: the resume trains them again
    shutil.rmtree(run / "checkpoints" / "step_6")
    (run / "checkpoints" / "latest").write_text("step_4\n")
    resumed = train(config, run_name="tb", resume=True)
    assert resumed.steps == 6

    board = EventAccumulator(str(run / trackers.TENSORBOARD_DIR))
    board.Reload()
    expected = _expected(run)
    assert set(board.Tags()["scalars"]) == set(expected)
    assert {"train/loss", "train/lr", "train/tokens_per_s", "eval/val_loss"} <= set(expected)
    for tag, points in expected.items():  # each step once: what the killed attempt logged past step 4 is purged
        assert [(event.step, pytest.approx(event.value, rel=1e-6)) for event in board.Scalars(tag)] == points, tag
    assert "config" in "".join(board.Tags()["tensors"])  # the run's config.yaml, as text


def test_a_new_run_in_a_folder_left_by_a_killed_start_shows_only_its_own_points(with_shakespeare, workspace):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tiny_config(max_steps=2, log_to="tensorboard")
    first = train(config, run_name="again").run_dir
    for name in ("checkpoints", "report.md", "loss.png"):  # killed before its first checkpoint: its events stay
        shutil.rmtree(first / name) if name == "checkpoints" else (first / name).unlink()
    second = train(tiny_config(max_steps=2, log_to="tensorboard", seed=7), run_name="again").run_dir
    board = EventAccumulator(str(second / trackers.TENSORBOARD_DIR))
    board.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in board.Scalars("train/loss")] == \
        _expected(second)["train/loss"]


class _FakeWandb:
    """Stands in for the wandb package: records what tinygpt asks of it."""

    def __init__(self, fail_init: Exception | None = None, fail_log_at: int | None = None, mode: str = "online"):
        self.inits: list[dict] = []
        self.logged: list[dict] = []
        self.finished: list[int] = []
        self.torn_down = 0
        self.fail_init, self.fail_log_at = fail_init, fail_log_at
        self.module = types.ModuleType("wandb")
        self.module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
        self.module.init = self.init
        self.module.Settings = lambda **kw: kw
        self.module.setup = lambda: types.SimpleNamespace(settings=types.SimpleNamespace(mode=mode))
        self.module.teardown = self.teardown

    def teardown(self):
        self.torn_down += 1

    def init(self, **kwargs):
        if self.fail_init is not None:
            raise self.fail_init
        self.inits.append(kwargs)
        fake = self

        class Run:
            id = kwargs.get("id") or f"run{len(fake.inits)}"

            def define_metric(self, name, **kw):
                pass

            def log(self, data):
                if fake.fail_log_at is not None and data["step"] >= fake.fail_log_at:
                    raise ConnectionError("the network went away\nmore detail")
                fake.logged.append(data)

            def finish(self, exit_code=0):
                fake.finished.append(exit_code)

        return Run()


@pytest.fixture
def fake_wandb(monkeypatch):
    def install(**kwargs):
        fake = _FakeWandb(**kwargs)
        monkeypatch.setitem(sys.modules, "wandb", fake.module)
        return fake

    return install


def test_wandb_gets_every_record_and_a_resume_continues_the_same_run(with_shakespeare, fake_wandb, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    fake = fake_wandb()
    config = tiny_config(max_steps=4, log_to="wandb")
    stop = StopFlag()

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            stop.reason = "interrupted"

    run = train(config, run_name="wb", on_event=stop_at_3, stop=stop).run_dir
    assert fake.inits[0]["project"] == "tinygpt" and fake.inits[0]["name"] == fake.inits[0]["group"] == "wb"
    assert fake.inits[0]["id"] is None and fake.inits[0]["dir"] == str(run)
    assert fake.inits[0]["config"]["train"]["max_steps"] == 4
    state = json.loads((run / "checkpoints" / "step_3" / "state.json").read_text())
    assert state["trackers"] == {"wandb_id": "run1"}
    assert fake.finished == [0]

    monkeypatch.setenv("WANDB_PROJECT", "mine")
    train(config, run_name="wb", resume=True)
    assert fake.inits[1]["id"] == "run1" and fake.inits[1]["resume"] == "allow"
    assert fake.inits[1]["project"] == "mine"
    logged = [(data["step"], tag, value) for data in fake.logged for tag, value in data.items() if tag != "step"]
    assert sorted(logged) == sorted((step, tag, value) for tag, points in _expected(run).items()
                                    for step, value in points)
    assert fake.finished == [0, 0]


def test_a_tracker_that_fails_mid_run_is_dropped_and_training_goes_on(with_shakespeare, fake_wandb):
    fake = fake_wandb(fail_log_at=2)
    events = []
    result = train(tiny_config(max_steps=4, log_to="wandb"), run_name="flaky", on_event=events.append)
    assert result.steps == 4 and result.stopped == "completed"
    notes = [event.message for event in events if event.kind == "info" and "wandb stopped logging" in event.message]
    assert notes == ["wandb stopped logging (the network went away); training goes on, and metrics.jsonl has every "
                     "line"]
    assert {data["step"] for data in fake.logged} == {1}
    assert fake.finished == [1]  # closed as failed when it was dropped, and only then
    # a checkpoint after the failure still names the W&B run, so that a resume goes on in it (review)
    state = json.loads((result.run_dir / "checkpoints" / "step_4" / "state.json").read_text())
    assert state["trackers"] == {"wandb_id": "run1"}
    assert max(record["step"] for record in _records(result.run_dir)) == 4


def test_an_offline_resume_is_a_new_wandb_run_of_the_same_group(with_shakespeare, fake_wandb):
    """Review: offline, W&B cannot continue a run; a resume under the same id made a second offline folder of it,
    which `wandb sync` wrote over the first. Each invocation is its own run, all in the tinygpt run's group."""
    fake = fake_wandb(mode="offline")
    config = tiny_config(max_steps=4, log_to="wandb")
    stop = StopFlag()

    def stop_at_2(event):
        if event.kind == "step" and event.step == 2:
            stop.reason = "interrupted"

    train(config, run_name="off", on_event=stop_at_2, stop=stop)
    train(config, run_name="off", resume=True)
    assert [(init["id"], init["resume"], init["group"]) for init in fake.inits] == [(None, None, "off")] * 2


def test_a_yaml_list_of_trackers_and_a_bare_no_are_read(workspace, tmp_path):
    from tinygpt_cli.config import resolve_config

    path = tmp_path / "run.yaml"
    for text, expected in (("[tensorboard, wandb]", "tensorboard,wandb"), ("no", "none")):
        path.write_text(f"train:\n  log_to: {text}\n")
        assert resolve_config(size="micro", config_file=path).train.log_to == expected


def test_wandb_that_cannot_start_stops_the_run_before_its_first_step(with_shakespeare, workspace, fake_wandb):
    fake = fake_wandb(fail_init=RuntimeError("No API key configured. Use `wandb login` to log in."))
    result = runner.invoke(app, ["train", "--size", "micro", *TINY_SETTINGS, "--max-steps", "2",
                                 "--log-to", "tensorboard,wandb", "--name", "nokey"])
    assert_one_line_error(result, "wandb could not start a run (No API key configured.")
    assert "WANDB_MODE=offline" in result.stderr
    assert fake.torn_down == 1  # wandb's exit hook would print after the error line, naming the removed folder
    assert not (workspace / "runs" / "nokey").exists()  # nor the tensorboard folder started before it


@pytest.mark.slow
def test_wandb_offline_through_the_real_package(with_shakespeare, workspace, tmp_path):
    pytest.importorskip("wandb")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"), "TINYGPT_HOME": str(workspace)}
    done = subprocess.run([sys.executable, "-m", "tinygpt_cli", "train", "--size", "micro", *TINY_SETTINGS,
                           "--max-steps", "2", "--log-to", "wandb", "--name", "offline"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    runs = list((workspace / "runs" / "offline" / trackers.WANDB_DIR).glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


@pytest.mark.slow
def test_a_wandb_that_cannot_start_on_rank_0_stops_every_rank_with_one_line(with_shakespeare, workspace, tmp_path):
    pytest.importorskip("wandb")
    home = tmp_path / "user"  # no ~/.netrc, no wandb settings: no API key
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_") and
           key != "OMP_NUM_THREADS"}
    env.update(HOME=str(home), WANDB_MODE="online", WANDB_CONFIG_DIR=str(home / "wandb"), TINYGPT_HOME=str(workspace))
    done = subprocess.run([sys.executable, "-m", "tinygpt_cli", "train", "--nproc", "2", *TINY_SETTINGS,
                           "--max-steps", "2", "--log-to", "wandb", "--name", "nokey"],
                          env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 1, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "wandb could not start a run" in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr
    assert not (workspace / "runs" / "nokey").exists()


def test_a_run_that_succeeds_inside_the_callers_except_block_is_not_marked_failed(with_shakespeare, fake_wandb):
    """Review: whether the run failed was read from sys.exc_info() in a `finally`, which also sees an exception
    the caller is handling: a notebook's train() inside an `except` marked a good W&B run failed."""
    fake = fake_wandb()
    try:
        raise ValueError("the caller's own")
    except ValueError:
        train(tiny_config(max_steps=2, log_to="wandb"), run_name="inside")
    assert fake.finished == [0]
