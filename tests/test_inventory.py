"""`tinygpt runs`, `tinygpt runs show`, `tinygpt data`, `tinygpt data show`, and the checkpoint-size estimate."""

import json
import re
import shutil
from pathlib import Path

import pytest
from test_cli import assert_one_line_error
from typer.testing import CliRunner

from conftest import tiny_config
from tinygpt_cli.cli import app
from tinygpt_cli.inventory import list_dataset_summaries, list_run_summaries
from tinygpt_cli.plan import checkpoint_bytes
from tinygpt_cli.training import train

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "160"})


def test_runs_and_data_listings(with_shakespeare):
    cfg = tiny_config(max_steps=2, eval_batches=1, batch_size=2)
    result = train(cfg, run_name="listed")
    [summary] = list_run_summaries()
    assert (summary.name, summary.size, summary.steps, summary.max_steps) == ("listed", "micro", 2, 2)
    assert summary.tokens == result.tokens and summary.best_val_loss == result.best_val_loss
    assert summary.dataset == "shakespeare" and summary.has_report and summary.saved_at
    assert summary.shape == "custom 2×32"  # micro's settings, not its 4×128 shape
    from tinygpt_cli.config import ModelConfig
    from tinygpt_cli.inventory import _shape

    assert _shape(ModelConfig(n_layer=4, n_head=4, n_embd=128), "micro") == "4×128"
    assert _shape(ModelConfig(n_layer=4, n_head=4, n_embd=128), "tiny") == "custom 4×128"

    listing = invoke("runs")
    assert listing.exit_code == 0, listing.output
    assert "listed" in listing.stdout and f"{result.best_val_loss:.4f}" in listing.stdout
    assert "custom 2×32" in listing.stdout and "micro" not in listing.stdout  # audit: it said micro
    as_json = json.loads(invoke("runs", "--json").stdout)
    assert as_json[0]["name"] == "listed" and as_json[0]["steps"] == 2
    report = invoke("runs", "show", "listed")
    assert report.exit_code == 0 and report.stdout.startswith("# Run listed")
    assert invoke("runs", "show").stdout == report.stdout  # the latest run by default
    assert_one_line_error(invoke("runs", "show", "nosuch"), "no run or checkpoint at nosuch")
    checkpoint = invoke("runs", "show", str(result.run_dir / "checkpoints" / "step_2"))  # wrongly said "no report"
    assert checkpoint.exit_code == 0 and checkpoint.stdout == report.stdout
    odd = result.run_dir.parent.parent / "ck" / "checkpoints" / "myrun"  # a run in a folder named checkpoints
    odd.mkdir(parents=True)
    assert_one_line_error(invoke("runs", "show", str(odd)), "myrun is not a run")  # an empty folder
    (odd / "config.yaml").write_text("model: {}\n")  # killed before its first checkpoint: nothing to resume
    assert_one_line_error(invoke("runs", "show", str(odd)), "myrun holds no checkpoint yet: train it with "
                          "`tinygpt train`")
    early = result.run_dir.with_name("early")  # QA: "train it with `tinygpt train`" named no run, no settings
    early.mkdir()
    shutil.copy(result.run_dir / "config.yaml", early / "config.yaml")
    assert_one_line_error(invoke("runs", "show", "early"), "early holds no checkpoint yet (stopped before its "
                          f"first): start it again with `tinygpt train --config {early / 'config.yaml'} --name "
                          "early`, or delete it with `tinygpt runs rm early`")
    exported = result.run_dir.parent.parent / "my-gpt"  # QA: "no ... config.json" of a folder that holds one
    exported.mkdir()
    (exported / "config.json").write_text("{}")
    assert_one_line_error(invoke("runs", "show", str(exported)), "my-gpt is a model folder (config.json), not a "
                          "run: it has no checkpoints or report; `tinygpt eval")
    finished = result.run_dir.with_name("finished")  # audit: told to resume, which was refused at its last step
    shutil.copytree(result.run_dir, finished)
    (finished / "report.md").unlink()
    assert_one_line_error(invoke("runs", "show", "finished"), "finished reached its last step (2) but has no "
                          "report.md (killed, or a crash): `tinygpt train --resume --name finished` writes it, and "
                          "`tinygpt eval finished` measures the run")
    # audit: a run killed (kill -9) before its report: said "no report.md yet", as if it were still training
    killed = result.run_dir.with_name("killed")
    shutil.copytree(result.run_dir, killed)
    (killed / "report.md").unlink()
    state_path = killed / "checkpoints" / "step_2" / "state.json"
    state = json.loads(state_path.read_text())
    state["run_config"]["train"]["max_steps"] = 5
    state_path.write_text(json.dumps(state))
    assert_one_line_error(invoke("runs", "show", "killed"), "killed stopped at step 2 of 5 without writing its "
                          "report.md (killed, or a crash): `tinygpt train --resume --name killed` goes on")
    # audit: a resume killed after a checkpoint showed the report of the stop before it, as if it were the run's
    stale = result.run_dir.with_name("stale")
    shutil.copytree(result.run_dir, stale)
    (stale / "report.md").write_text((stale / "report.md").read_text().replace("at step 2 (", "at step 1 ("))
    shown = invoke("runs", "show", "stale")
    assert shown.exit_code == 0 and "Stopped: completed at step 1 (" in shown.stdout  # (a copy of "listed")
    assert shown.stderr.strip() == ("note: this report is of step 1, and the run's latest checkpoint is step 2, "
                                    "saved since without a report (killed, or a crash): `tinygpt train --resume "
                                    "--name stale` goes on and writes one")
    assert invoke("runs", "show", "listed").stderr == ""
    long_name = "micro-shakespeare-20261126-052233"
    shutil.copytree(result.run_dir, result.run_dir.with_name(long_name))
    piped = runner.invoke(app, ["runs"], env={"COLUMNS": "60"})  # was cut to "micro-shakespea…" when piped
    assert piped.exit_code == 0 and long_name in piped.stdout
    damaged = result.run_dir.with_name("damaged")
    shutil.copytree(result.run_dir, damaged)
    (damaged / "checkpoints" / "step_2" / "state.json").write_text("{not json")
    noted = invoke("runs")  # was left out without a word
    assert noted.exit_code == 0 and "damaged" not in noted.stdout and "listed" in noted.stdout
    assert "note: damaged is left out:" in noted.stderr and "state.json is corrupted" in noted.stderr

    [dataset] = list_dataset_summaries()
    meta = json.loads((with_shakespeare / "meta.json").read_text())
    assert dataset.train_tokens == meta["splits"]["train"]["tokens"]
    listing = invoke("data")
    assert listing.exit_code == 0 and "shakespeare" in listing.stdout
    assert f"{dataset.train_tokens:,}" in listing.stdout
    assert json.loads(invoke("data", "show", "shakespeare", "--json").stdout) == meta
    assert "tokens" in invoke("data", "show").stdout
    assert_one_line_error(invoke("data", "show", "nosuch"), "no tokenized dataset named 'nosuch'")

    # the plan's checkpoint size: 12 bytes per parameter plus small files
    folder = result.run_dir / "checkpoints" / "step_2"
    actual = sum(f.stat().st_size for f in folder.iterdir())
    assert abs(actual - checkpoint_bytes(cfg.model)) < 0.01 * actual


def test_empty_workspace_listings(workspace):
    assert invoke("runs").exit_code == 0 and "No runs" in invoke("runs").stderr
    assert invoke("data").exit_code == 0 and "No tokenized data" in invoke("data").stderr
    assert json.loads(invoke("runs", "--json").stdout) == [] and json.loads(invoke("data", "--json").stdout) == []
    assert_one_line_error(invoke("runs", "show"), "no trained run")


def test_runs_survives_a_state_json_of_wrong_types(workspace):
    """Audit: one state.json with a null step, a string loss or a non-dict run_config crashed `tinygpt runs` (and
    `runs --json`) with a traceback. A field of the wrong type reads as missing; a step that is no count makes the
    run be left out with a note."""
    good = {"format": "tinygpt", "step": 3, "tokens_seen": 96, "best_val_loss": 5.5, "val_loss": 5.6,
            "saved_at": "2026-01-01T00:00:00+00:00", "data": {"dataset": "d"},
            "model_config": {"n_layer": 1, "n_head": 1, "n_embd": 8, "block_size": 8},
            "run_config": {"size": "micro", "train": {"max_steps": 3}}}
    cases = {"nullstep": {"step": None}, "strtokens": {"tokens_seen": "many"}, "strloss": {"best_val_loss": "x"},
             "strconfig": {"run_config": "x"}, "listtrain": {"run_config": {"train": [1]}}, "strdata": {"data": "x"},
             "intdate": {"saved_at": 5}, "intsize": {"run_config": {"size": 7}},
             "badmodel": {"model_config": {"n_head": "x"}}}
    for name, change in cases.items():
        checkpoint = workspace / "runs" / name / "checkpoints" / "step_3"
        checkpoint.mkdir(parents=True)
        (checkpoint / "state.json").write_text(json.dumps({**good, **change}))
        (checkpoint / "model.safetensors").write_bytes(b"")  # not read by the listing
    listing = invoke("runs")
    assert listing.exit_code == 0 and "Traceback" not in listing.output, listing.output
    assert "note: nullstep is left out" in listing.stderr and "note: strtokens is left out" in listing.stderr
    as_json = {row["name"]: row for row in json.loads(invoke("runs", "--json").stdout)}
    assert set(as_json) == set(cases) - {"nullstep", "strtokens"}
    assert as_json["strloss"]["best_val_loss"] is None and as_json["intdate"]["saved_at"] is None
    assert as_json["intsize"]["size"] is None and as_json["listtrain"]["max_steps"] is None
    assert as_json["strdata"]["dataset"] is None and as_json["badmodel"]["parameters"] is None
    assert as_json["strconfig"]["steps"] == 3 and as_json["strconfig"]["tokens"] == 96


def test_runs_show_of_a_damaged_report(workspace):
    """Audit: a report.md with bytes that are not UTF-8 made `tinygpt runs show` fail with a traceback."""
    run = workspace / "runs" / "r"
    (run / "checkpoints").mkdir(parents=True)
    (run / "report.md").write_bytes(b"# Run r\n\xff\xfe\n")
    shown = invoke("runs", "show", "r")
    assert shown.exit_code == 0 and shown.stdout.startswith("# Run r"), shown.output


def test_a_document_split_between_train_and_val_counts_once(tmp_path):
    """A one-document source gives val the tail of that document: the listing says 1 document, not 2."""
    from tinygpt_cli.inventory import dataset_summary

    meta = {"documents": {"in_source": 1, "selected": 1},
            "splits": {"train": {"tokens": 90, "documents": 1}, "val": {"tokens": 10, "documents": 1}}}
    assert dataset_summary(meta, tmp_path / "one").documents == 1
    older = {"splits": {"train": {"documents": 4}, "val": {"documents": 1}}}  # no "documents": the splits' sum
    assert dataset_summary(older, tmp_path / "old").documents == 5


def test_a_run_being_trained_says_so(with_shakespeare, workspace):
    """`tinygpt runs` could not tell a run training now from one that stopped, and `runs show` told a user to
    resume a run that was still training (which would have written beside it)."""
    from tinygpt_cli import workspace as ws

    train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="live")
    report = workspace / "runs" / "live" / "report.md"
    report.unlink()  # as while it trains: the report is written when it stops
    lock = ws.lock_of(workspace / "runs" / "live")
    assert not ws.held(lock)
    with ws.exclusive(lock, "runs/live"):  # what a training of it holds
        assert ws.held(lock)
        [summary] = list_run_summaries()
        assert summary.training
        assert re.search(r"│ live +│ training +│", invoke("runs").stdout)
        listed = json.loads(invoke("runs", "--json").stdout)[0]
        assert listed["training"] is True and listed["status"] == "training"
        assert_one_line_error(invoke("runs", "show", "live"), "live is training now: its report.md is written when "
                                                              "it stops")
    assert not ws.held(lock) and not list_run_summaries()[0].training
    after = invoke("runs", "show", "live").stderr  # stopped: the advice for a finished run without its report
    assert "live reached its last step (2) but has no report.md" in after and "training now" not in after


def test_a_report_of_evaluations_only_is_shown_with_what_the_run_is_doing(with_shakespeare, workspace):
    """An eval during training makes report.md with its section alone: `runs show` printed that as the run's
    report, with no word that it trains (or was killed), and `runs --json` said has_report (audit)."""
    from tinygpt_cli import workspace as ws

    train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="live")
    report = workspace / "runs" / "live" / "report.md"
    report.write_text("# Run live\n\n## Evaluation: loss on shakespeare/val · now\n\n| loss | 9.9 |\n")
    with ws.exclusive(ws.lock_of(workspace / "runs" / "live"), "runs/live"):  # what a training of it holds
        shown = invoke("runs", "show", "live")
        assert shown.exit_code == 0 and "## Evaluation: loss on shakespeare/val" in shown.stdout
        assert "note: live is training now: its report.md is written when it stops" in shown.stderr
    shown = invoke("runs", "show", "live")
    assert shown.exit_code == 0 and "## Evaluation: loss on shakespeare/val" in shown.stdout
    assert "note: live reached its last step (2) but has no training report" in shown.stderr
    assert json.loads(invoke("runs", "--json").stdout)[0]["has_report"] is False


def test_a_lock_is_taken_even_while_another_process_looks_at_it(workspace, monkeypatch):
    """`held` locks the file for an instant to look: a training that starts in that instant waits for it rather
    than failing as if another training held the run."""
    import fcntl

    from tinygpt_cli import workspace as ws

    real = fcntl.flock
    tries = []

    def busy_once(handle, operation):
        tries.append(operation)
        if len(tries) == 1:
            raise BlockingIOError(11, "Resource temporarily unavailable")
        return real(handle, operation)

    monkeypatch.setattr(fcntl, "flock", busy_once)
    with ws.exclusive(workspace / ".x.lock", "runs/x"):
        assert len(tries) == 2


def test_the_latest_run_with_a_file_missing_is_not_passed_over_in_silence(with_shakespeare, workspace):
    """Newest run s2 lost its state.json: `train --resume`, `generate` and `runs show` took the older s1 without a
    word, and `runs` left s2 out silently; `train --resume --name s2` then said to start it without --resume, which
    refuses the folder (bad-input audit). Each now names s2 and what it lacks."""
    import os
    import time

    from test_cli import invoke

    config = tiny_config(max_steps=2, eval_interval=2)
    train(config, run_name="s1")
    time.sleep(0.05)
    s2 = train(config, run_name="s2").run_dir
    state = s2 / "checkpoints" / "step_2" / "state.json"
    state.unlink()
    os.utime(s2 / "checkpoints" / "step_2")  # newer than s1's, whatever the file system's time resolution
    lacks = "has no complete checkpoint: checkpoints/step_2 lacks state.json"
    for args in (("train", "--resume", "--max-steps", "3"), ("generate", "hi", "--max-new-tokens", "2"),
                 ("runs", "show"), ("eval",)):
        assert_one_line_error(invoke(*args), lacks)
    assert_one_line_error(invoke("train", "--resume", "--name", "s2", "--max-steps", "3"), lacks)
    listed = invoke("runs")
    assert listed.exit_code == 0 and "s1" in listed.stdout
    assert f"note: s2 is left out: {s2} {lacks}" in listed.stderr
    assert invoke("generate", "hi", "--run", "s1", "--max-new-tokens", "2").exit_code == 0  # named: it is used


def test_an_unreadable_weights_file_is_called_unreadable(with_shakespeare, workspace, monkeypatch):
    """safetensors says "No such file" of a model.safetensors it may not open (seen as a user, chmod 000): the
    checkpoint was called incomplete, its file there (bad-input audit)."""
    import safetensors.torch
    from test_cli import invoke

    train(tiny_config(max_steps=2, eval_interval=2), run_name="s1")
    real = safetensors.torch.safe_open

    def refused(path, *args, **kwargs):
        if str(path).endswith("model.safetensors"):
            raise FileNotFoundError(f"No such file or directory: {path}")  # what safetensors raises for EACCES
        return real(path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "safe_open", refused)
    assert_one_line_error(invoke("generate", "hi", "--run", "s1", "--max-new-tokens", "2"),
                          "model.safetensors cannot be read: check its permissions")


def test_a_run_folder_that_cannot_be_read_is_left_out_of_the_listing(with_shakespeare, workspace, monkeypatch):
    """One unreadable run folder (chmod 000) ended `tinygpt runs` with an error; the others are listed now."""
    from pathlib import Path

    from test_cli import invoke

    config = tiny_config(max_steps=2, eval_interval=2)
    train(config, run_name="s1")
    locked = train(config, run_name="s2").run_dir
    real = Path.iterdir

    def iterdir(self):  # as chmod 000 would, for any user root included
        if locked in (self, *self.parents):
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    monkeypatch.setattr(Path, "is_file", lambda self: False if locked in self.parents else Path.exists(self)
                        and not Path.is_dir(self))
    listed = invoke("runs")
    assert listed.exit_code == 0 and "s1" in listed.stdout, listed.output
    assert "note: s2 is left out: it cannot be read (Permission denied)" in listed.stderr


def test_freeing_space_in_an_old_run_does_not_make_it_the_latest(with_shakespeare, workspace):
    """Deleting an old run's weights (to free disk space) touched its step folder, which then counted as the newest:
    every command without a run named failed on it (review). What counts is when a run last trained."""
    import time

    from test_cli import invoke

    config = tiny_config(max_steps=2, eval_interval=2)
    old = train(config, run_name="old").run_dir
    time.sleep(0.05)
    train(config, run_name="new")
    time.sleep(0.05)
    (old / "checkpoints" / "step_2" / "model.safetensors").unlink()
    shown = invoke("runs", "show")
    assert shown.exit_code == 0 and "new" in shown.stdout, shown.output
    assert "note: old is left out" in invoke("runs").stderr


def test_a_stop_reason_with_spaces_is_still_a_training_report():
    """StopFlag's reason is the caller's: "paused by notebook" hid the report as if none had been written (review)."""
    from tinygpt_cli import inventory

    assert inventory._reported_step("# Run r\n\nStopped: paused by notebook at step 3 (384 tokens seen).\n") == 3
    assert inventory._reported_step("# Run r\n\n## Evaluation: loss on d/val · now\n") is None


def _stop_at(step: int):
    """A StopFlag and an on_event that sets it at `step`, as Ctrl-C there would."""
    from tinygpt_cli.training import StopFlag

    stop = StopFlag()

    def on_event(event):
        if event.kind == "step" and event.step >= step:
            stop.reason = "interrupted"

    return stop, on_event


def test_each_run_says_how_it_ended(with_shakespeare, workspace):
    """Audit: a finished run, one stopped by Ctrl-C, one stopped by its token budget and one killed after a
    checkpoint (its report of an earlier stop) read alike; a run training or killed before its first checkpoint
    was not listed at all, though it holds its name."""
    from tinygpt_cli import workspace as ws

    cfg = tiny_config(max_steps=2, eval_batches=1, batch_size=2, eval_interval=1, log_interval=1)
    train(cfg, run_name="done")
    stop, on_event = _stop_at(1)
    train(tiny_config(max_steps=4, eval_batches=1, batch_size=2, log_interval=1), run_name="cut", stop=stop,
          on_event=on_event)
    train(tiny_config(max_steps=4, max_tokens=1, eval_batches=1, batch_size=2), run_name="budget")
    killed = train(tiny_config(max_steps=4, eval_batches=1, batch_size=2, eval_interval=1, log_interval=1),
                   run_name="killed").run_dir
    shutil.rmtree(killed / "checkpoints" / "step_4")  # its last save went, and its report is of step 4: as if a
    (killed / "checkpoints" / "latest").unlink()  # resume from step 3 had been killed after saving step 3 again
    starting, dead = workspace / "runs" / "starting", workspace / "runs" / "dead"
    for folder in (starting, dead):  # what a run holds before its first checkpoint
        folder.mkdir()
        shutil.copy(killed / "config.yaml", folder / "config.yaml")
    (starting / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 3, "tokens": 192}) + "\n")
    (dead / "metrics.jsonl").write_text("")
    with ws.exclusive(ws.lock_of(starting), "runs/starting"):
        listed = {entry["name"]: entry for entry in json.loads(invoke("runs", "--json").stdout)}
        table = invoke("runs").stdout
    assert {name: entry["status"] for name, entry in listed.items()} == {
        "done": "finished", "cut": "interrupted", "budget": "token limit", "killed": "killed",
        "starting": "starting", "dead": "no checkpoint"}
    assert (listed["starting"]["steps"], listed["starting"]["tokens"], listed["starting"]["max_steps"]) == (3, 192, 4)
    assert listed["dead"]["steps"] == 0 and listed["dead"]["saved_at"] is None
    assert list(listed)[:2] == ["starting", "dead"]  # what has no checkpoint yet comes first, training first
    for name, status in (("cut", "interrupted"), ("budget", "token limit"), ("starting", "starting")):
        assert re.search(rf"│ {name} +│ {status} +│", table), table
    assert invoke("runs", "show", "cut").exit_code == 0
    report = workspace / "runs" / "budget" / "report.md"  # QA: it said "Stopped: token_limit", an identifier
    assert "Stopped: token limit at step 1 (" in report.read_text()
    report.write_text(report.read_text().replace("Stopped: token limit", "Stopped: token_limit"))  # an older one
    assert {entry["name"]: entry["status"] for entry in json.loads(invoke("runs", "--json").stdout)}["budget"] == \
        "token limit"


def test_the_latest_run_is_the_one_saved_last_not_the_newest_files(with_shakespeare, workspace):
    """Audit: runs were ordered by their checkpoint folder's time, which deleting an old run's optimizer.pt (to
    free disk) or copying runs (cp -r, scp, unzip) changes: `train --resume`, `generate`, `eval` and `export` then
    took an old run for the latest."""
    import os

    from tinygpt_cli.checkpoint import find_run

    cfg = tiny_config(max_steps=2, eval_batches=1, batch_size=2)
    old = train(cfg, run_name="old").run_dir
    state = old / "checkpoints" / "step_2" / "state.json"
    saved = json.loads(state.read_text())
    saved["saved_at"] = "2000-01-01T00:00:00+00:00"
    state.write_text(json.dumps(saved))
    train(cfg, run_name="new")
    (old / "checkpoints" / "step_2" / "optimizer.pt").unlink()  # freeing disk: the folder's time is now
    os.utime(old / "checkpoints" / "step_2")
    assert find_run(None).name == "new"
    assert [entry["name"] for entry in json.loads(invoke("runs", "--json").stdout)] == ["new", "old"]


def test_a_run_stopped_by_an_error_is_failed_not_killed(with_shakespeare, workspace, monkeypatch):
    """Review: a run that diverged (or ran out of memory, met bad data, could not save) wrote no report and was
    listed as "killed", as if a SIGKILL had stopped it; resuming it with the same settings fails again."""
    from tinygpt_cli import training
    from tinygpt_cli.errors import TrainingError

    losses = iter([5.0, float("nan")])
    monkeypatch.setattr(training._Trainer, "_evaluate", lambda self, can_cut=False: next(losses))
    with pytest.raises(TrainingError, match="diverged"):
        train(tiny_config(max_steps=4, eval_interval=1, eval_batches=1, batch_size=2), run_name="div")
    [listed] = json.loads(invoke("runs", "--json").stdout)
    assert listed["status"] == "failed" and listed["steps"] == 1
    last = json.loads((workspace / "runs" / "div" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["kind"] == "failed" and "diverged" in last["error"] and last["step"] == 1
    losses = iter([4.0, 3.0, 2.0])  # resumed (with other settings): the failure line goes, the run goes on
    train(tiny_config(max_steps=3, eval_interval=1, eval_batches=1, batch_size=2), run_name="div", resume=True)
    lines = (workspace / "runs" / "div" / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert "failed" not in kinds and json.loads(invoke("runs", "--json").stdout)[0]["status"] == "finished"
    refused = invoke("train", "--resume", "--name", "div", "--max-steps", "2")  # a refusal to resume is no failure
    assert refused.exit_code == 1 and json.loads(invoke("runs", "--json").stdout)[0]["status"] == "finished"


def test_a_link_to_a_run_is_not_a_second_run_and_shares_its_lock(with_shakespeare, workspace):
    """Audit: `runs/alias -> r` was listed twice, and `train --resume --name alias` ran beside a training of r
    (their locks were .alias.lock and .r.lock): checkpoints of both interleaved and metrics.jsonl lost steps. A
    link whose folder is gone (a disk not mounted) was left out without a word."""
    from tinygpt_cli import workspace as ws
    from tinygpt_cli.errors import TrainingError

    cfg = tiny_config(max_steps=2, eval_batches=1, batch_size=2)
    run = train(cfg, run_name="r").run_dir
    (run.parent / "alias").symlink_to("r")
    (run.parent / "gone").symlink_to(workspace / "elsewhere" / "moved")
    assert ws.lock_of(run.parent / "alias") == ws.lock_of(run)
    resumed = train(tiny_config(max_steps=3, eval_batches=1, batch_size=2), run_name="alias", resume=True)
    assert resumed.run_dir == run and (run / "report.md").read_text().startswith("# Run r\n")  # (review) not alias
    elsewhere = workspace.parent / "other-disk" / "big"  # a run kept on another disk: its lock stays in runs/
    elsewhere.mkdir(parents=True)
    (run.parent / "big").symlink_to(elsewhere)
    assert ws.lock_of(run.parent / "big") == run.parent / ".big.lock"
    (run.parent / "big").unlink()
    listed = invoke("runs", "--json")
    assert [entry["name"] for entry in json.loads(listed.stdout)] == ["r"]
    assert "note: gone is left out: it links to" in listed.stderr and "which is missing" in listed.stderr
    with ws.exclusive(ws.lock_of(run), "runs/r"), \
            pytest.raises(TrainingError, match="another tinygpt process is training run r:"):  # r trains
        train(tiny_config(max_steps=4, eval_batches=1, batch_size=2), run_name="alias", resume=True)


def test_a_listing_never_cuts_a_run_name(with_shakespeare, workspace, monkeypatch):
    """Audit: a narrow terminal showed `r-runni…`, and a piped listing cut names past 200 columns: the name is the
    cell a user copies into the next command."""
    from rich.console import Console

    from conftest import FakeTerminal
    from tinygpt_cli import cli

    long_name = "a-run-with-a-long-name-" + "x" * 70
    cfg = tiny_config(max_steps=2, eval_batches=1, batch_size=2)
    train(cfg, run_name="short-one")
    train(cfg, run_name=long_name)
    assert long_name in invoke("runs").stdout  # piped: one line per row at the table's own width
    narrow = FakeTerminal()
    monkeypatch.setattr(cli, "_stdout_console", lambda: Console(file=narrow, width=60, force_terminal=True,
                                                                color_system=None))
    assert invoke("runs").exit_code == 0
    shown = narrow.getvalue()
    names = [line.split("│")[1].strip() for line in shown.splitlines() if line.startswith("│")]
    assert "…" not in shown and long_name + "short-one" in "".join(names)  # folded: no cell cut, status included


def test_listings_say_what_a_missing_workspace_or_a_mistyped_name_is(with_shakespeare, workspace, monkeypatch,
                                                                      tmp_path):
    """Audit: TINYGPT_HOME=/nonexistent (a typo, a disk not mounted) listed as an empty workspace, and so did a file
    where runs/ goes; `runs show` of a mistyped name gave no suggestion, and `data show` listed every name."""
    train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="r-finished")
    assert_one_line_error(invoke("runs", "show", "r-finshed"), "no run or checkpoint at r-finshed (did you mean "
                                                               "r-finished?)")
    assert_one_line_error(invoke("data", "show", "shakespear"), "no tokenized dataset named 'shakespear' (did you "
                                                                "mean shakespeare?)")
    monkeypatch.setenv("TINYGPT_HOME", str(tmp_path / "nonexistent"))
    for command in ("runs", "data"):
        listed = invoke(command)
        assert listed.exit_code == 0 and f"No workspace at {tmp_path / 'nonexistent'} (TINYGPT_HOME): it does " \
            "not exist" in listed.stderr
    monkeypatch.setenv("TINYGPT_HOME", str(tmp_path))
    (tmp_path / "runs").write_text("")
    assert "runs is a file, not the folder of runs: move it aside" in invoke("runs").stderr


def test_an_interrupted_tokenize_is_said_where_its_dataset_is_looked_for(workspace):
    """Audit: a tokenize killed part way left data/.NAME.partial (65 MB there), which `tinygpt data` did not show,
    and `data show NAME` said "no tokenized dataset named NAME ... run `tinygpt tokenize` first"."""
    from tinygpt_cli import workspace as ws

    far = workspace.parent / "disk2" / "huge"  # a dataset kept on another disk: its partial is beside the target
    far.parent.mkdir()
    (workspace / "data").mkdir()
    (workspace / "data" / "huge").symlink_to(far)
    (far.parent / ".huge.partial").mkdir()
    assert_one_line_error(invoke("data", "show", "huge"), "data/huge is not finished: an interrupted tokenize of "
                                                          "it waits in")
    partial = workspace / "data" / ".big.partial"
    partial.mkdir(parents=True)
    (partial / "train.bin").write_bytes(b"\0" * 4096)
    listed = invoke("data")
    assert "note: an interrupted tokenize of big waits in data/.big.partial (4.1 kB written): run the same " \
        "`tinygpt tokenize ... --name big` again to finish it" in listed.stderr
    assert_one_line_error(invoke("data", "show", "big"), "data/big is not finished: an interrupted tokenize of it "
                                                         "waits in")
    with ws.exclusive(ws.lock_of(workspace / "data" / "big"), "data/big"):
        assert "note: big is being tokenized now (4.1 kB written so far" in invoke("data").stderr


def test_a_session_killed_before_it_saved_is_killed_whatever_the_checkpoint_said(with_shakespeare, workspace):
    """Audit: a finished run resumed for more steps and killed (SIGKILL) before its next checkpoint still read
    `finished 40/40` (an interrupted one `interrupted`): metrics.jsonl went on past the checkpoint."""
    run = train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="more").run_dir
    with open(run / "metrics.jsonl", "a") as metrics:  # what a resumed session logged before it was killed
        metrics.write(json.dumps({"kind": "train", "step": 3, "loss": 9.0, "tokens": 999}) + "\n")
    assert json.loads(invoke("runs", "--json").stdout)[0]["status"] == "killed"


def test_a_checkpoint_folder_is_found_from_outside_the_workspace(with_shakespeare, workspace, tmp_path,
                                                                  monkeypatch):
    """Audit: README's `tinygpt generate --run runs/NAME/checkpoints/step_N` worked only from the workspace folder
    (the path was taken from the current one), and `NAME/checkpoints/step_N` was refused ("did you mean st2?")."""
    from tinygpt_cli.checkpoint import find_run

    train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="r2")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    step = workspace / "runs" / "r2" / "checkpoints" / "step_2"
    assert find_run("runs/r2/checkpoints/step_2") == step and find_run("r2/checkpoints/step_2") == step
    shown = invoke("generate", "--run", "r2/checkpoints/step_2", "Hi", "--max-new-tokens", "2")
    assert shown.exit_code == 0, shown.output
    assert_one_line_error(invoke("runs", "show", "r2/checkpoints/step_9"), "no run or checkpoint at "
                                                                          "r2/checkpoints/step_9: list them")


# ------------------------------------------------------------------------------------------------ runs rm, data rm
def _two_runs():
    cfg = tiny_config(max_steps=2, eval_batches=1, batch_size=2)
    return train(cfg, run_name="a").run_dir, train(cfg, run_name="b").run_dir


def test_runs_rm_asks_then_deletes_whole_runs(with_shakespeare, workspace, monkeypatch):
    from tinygpt_cli import cli

    a, b = _two_runs()
    (a.parent / "alias").symlink_to("b")
    # stdin not a terminal, no --yes: nothing deleted, and it says how
    assert_one_line_error(invoke("runs", "rm", "a"), "nothing deleted: pass --yes to delete without being asked")
    monkeypatch.setattr(cli, "_stdin_is_interactive", lambda: True)
    declined = runner.invoke(app, ["runs", "rm", "a"], input="n\n")
    assert declined.exit_code == 1 and "Nothing deleted." in declined.output and a.is_dir()
    assert "runs/a: finished, step 2/2, best val loss" in declined.output and "1 checkpoint" in declined.output
    done = runner.invoke(app, ["runs", "rm", "a"], input="y\n")
    assert done.exit_code == 0, done.output
    assert "Deleted runs/a" in done.output and not a.exists()
    # a second name of a run: only the link goes; and a path into runs/ names a run as well as its name
    assert "note: runs/alias links to it and will point at nothing: delete it too" in \
        invoke("runs", "rm", "b").stderr  # review: the link was left dangling without a word
    linked = invoke("runs", "rm", "alias", str(b.parent / "alias"), "--yes")
    assert linked.exit_code == 0, linked.output
    assert "a second name of runs/b: only the link goes" in linked.stderr and "Deleted runs/alias (the link)" in \
        linked.stderr
    assert not (b.parent / "alias").is_symlink() and b.is_dir()
    assert [s.name for s in list_run_summaries()] == ["b"]
    assert invoke("runs", "rm", "b", "-y").exit_code == 0
    assert sorted(p.name for p in b.parent.iterdir()) == []  # no lock nor a hidden folder left behind


def test_a_deletion_that_cannot_finish_puts_back_what_it_moved(workspace, monkeypatch):
    """Security QA: a deletion that failed halfway left what it had renamed hidden as .removing-*, out of every
    listing, and the next `rm` in that folder swept it away for good. What it moved goes back under its name."""
    from tinygpt_cli import inventory
    from tinygpt_cli import workspace as ws

    dataset = workspace / "data" / "ds"
    dataset.mkdir(parents=True)
    (dataset / "meta.json").write_text("{}")
    partial = workspace / "data" / ".ds.partial"
    partial.mkdir()
    (partial / "train.bin").write_bytes(b"\0\0")
    real_replace, calls = ws.replace, []

    def second_refused(source, target):
        calls.append(source)
        if len(calls) == 2:
            raise PermissionError(13, "Permission denied")
        real_replace(source, target)

    monkeypatch.setattr(ws, "replace", second_refused)
    assert_one_line_error(invoke("data", "rm", "ds", "--yes"), "data/ds cannot be deleted by you (Permission denied: ")
    assert sorted(p.name for p in dataset.parent.iterdir()) == [".ds.partial", "ds"]
    monkeypatch.setattr(ws, "replace", real_replace)
    monkeypatch.setattr(inventory.shutil, "rmtree", lambda path, ignore_errors=False: None)  # nothing can go
    assert_one_line_error(invoke("data", "rm", "ds", "--yes"), f"data/ds could not be deleted whole (permissions?): "
                                                               f"what is left of it is at {dataset}; delete it")
    assert sorted(p.name for p in dataset.parent.iterdir()) == [".ds.partial", "ds"]
    assert (dataset / "meta.json").is_file() and (partial / "train.bin").is_file()


def test_runs_rm_takes_a_pattern_as_runs_compare_does(with_shakespeare, workspace):
    """A sweep's runs go with one quoted pattern, the runs `tinygpt runs` lists that it matches; a pattern that
    matches nothing deletes nothing."""
    cfg = tiny_config(max_steps=1, eval_batches=1, batch_size=2)
    runs = workspace / "runs"
    for name in ("lr-1", "lr-2", "keep"):
        train(cfg, run_name=name)
    (runs / "lr-alias").symlink_to("keep")
    assert_one_line_error(invoke("runs", "rm", "lr-*", "nosuch-*", "--yes"), "no run matches nosuch-*")
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["keep", "lr-1", "lr-2",
                                                                                   "lr-alias"]
    done = invoke("runs", "rm", "lr-*", "lr-1", "--yes")
    assert done.exit_code == 0, done.output
    assert "Deleted runs/lr-1" in done.stderr and "Deleted runs/lr-2" in done.stderr
    # a second name of a run is not listed, so no pattern takes it: it is named whole, as `tinygpt runs` lists it
    assert sorted(p.name for p in runs.iterdir() if not p.name.startswith(".")) == ["keep", "lr-alias"]


@pytest.mark.parametrize(("spec", "fragment"), [
    ("", "an empty name names nothing"),  # review: `runs rm "$NAME"` with NAME unset deleted all of runs/
    (" ", "an empty name names nothing"),
    ("nosuch", "no run named 'nosuch'"),
    ("bb", "no run named 'bb' (did you mean"),
    ("/tmp", "/tmp is not in"),
    (".b.lock", "is not something `tinygpt runs` lists"),
])
def test_runs_rm_of_what_is_not_a_run_deletes_nothing(with_shakespeare, workspace, spec, fragment):
    cfg = tiny_config(max_steps=1, eval_batches=1, batch_size=2)
    run = train(cfg, run_name="b").run_dir
    result = invoke("runs", "rm", "b", spec, "--yes")  # all are checked before any goes
    assert_one_line_error(result, fragment)
    assert run.is_dir()
    with_shakespeare = workspace / "data" / "shakespeare"
    if not spec.strip():
        assert_one_line_error(invoke("data", "rm", spec, "--yes"), fragment)
        assert (with_shakespeare / "meta.json").is_file()


def test_rm_refuses_a_folder_of_the_users_own_files(workspace):
    """QA: `data rm mystuff --yes` deleted data/mystuff, the user's raw text kept in data/ (it said "damaged"), and
    `runs rm notes` a folder of notes in runs/: neither is listed, so neither is deleted. An empty folder goes."""
    for folder, kind, fragment in (("data", "data", "is not a tokenized dataset (no meta.json, train.bin or val.bin"),
                                   ("runs", "runs", "is not a run (no config.yaml or checkpoints/")):
        mine = workspace / folder / "mystuff"
        mine.mkdir(parents=True)
        (mine / "corpus.txt").write_text("precious")
        assert_one_line_error(invoke(kind, "rm", "mystuff", "--yes"), fragment)
        assert (mine / "corpus.txt").read_text() == "precious"
        empty = workspace / folder / "empty"
        empty.mkdir()
        assert invoke(kind, "rm", "empty", "--yes").exit_code == 0 and not empty.exists()
    damaged = workspace / "data" / "damaged"  # tinygpt's files, its meta.json lost: still deleted
    damaged.mkdir()
    (damaged / "train.bin").write_bytes(b"\0\0")
    removed = invoke("data", "rm", "damaged", "--yes")
    assert removed.exit_code == 0 and "damaged" in removed.stderr and not damaged.exists()


def test_a_run_or_dataset_in_use_is_not_deleted(with_shakespeare, workspace):
    from tinygpt_cli import workspace as ws

    a, _ = _two_runs()
    with ws.exclusive(ws.lock_of(a), "runs/a"):  # what a training of it holds
        assert_one_line_error(invoke("runs", "rm", "a", "--yes"), "runs/a is training now: stop it first")
        assert_one_line_error(invoke("data", "rm", "shakespeare", "--yes"),
                              "run a is training on data/shakespeare now")
    with ws.exclusive(ws.lock_of(with_shakespeare), "data/shakespeare"):  # what a tokenize of it holds
        assert_one_line_error(invoke("data", "rm", "shakespeare", "--yes"), "data/shakespeare is being tokenized now")
    assert a.is_dir() and (with_shakespeare / "meta.json").is_file()


def test_a_dataset_runs_trained_on_is_tokenized_again_only_with_force(with_shakespeare, workspace):
    """QA: `tokenize --force` replaced the dataset a run was training on (`data rm` refuses to delete it), which
    then finished on deleted files and could not resume; and the same source with other settings replaced one that
    runs had trained on without a word."""
    from tinygpt_cli import workspace as ws

    a, _ = _two_runs()
    meta = (with_shakespeare / "meta.json").read_bytes()
    with ws.exclusive(ws.lock_of(a), "runs/a"):
        for force in ((), ("--force",)):
            assert_one_line_error(invoke("tokenize", "--fraction", "0.5", *force),
                                  "run a is training on data/shakespeare now: wait for it to end or stop it")
    refused = invoke("tokenize", "--fraction", "0.5", "--seed", "3")
    assert_one_line_error(refused, "2 runs trained on data/shakespeare (")
    assert re.search(r"\((a, b|b, a)\), and --fraction 0.5 \(it was made with 1\.0\); --seed 3 \(it was made with 0\) "
                     r"makes other data of it", refused.stderr.replace("\n", " ")), refused.stderr
    assert (with_shakespeare / "meta.json").read_bytes() == meta
    assert invoke("tokenize").exit_code == 0  # the same settings: up to date, nothing changes under them
    assert invoke("tokenize", "--restart").exit_code == 0  # review: refused, though it makes the same data again
    forced = invoke("tokenize", "--fraction", "0.5", "--force")
    assert forced.exit_code == 0, forced.output
    assert json.loads((with_shakespeare / "meta.json").read_text())["fraction"] == 0.5
    # review: runs that trained on the version replaced no longer hold it back, nor a run that saved no checkpoint
    early = workspace / "runs" / "early"
    shutil.copytree(a, early)
    shutil.rmtree(early / "checkpoints")
    assert invoke("tokenize", "--fraction", "0.25").exit_code == 0
    train(tiny_config(max_steps=1, eval_batches=1, batch_size=2), run_name="c")  # on the 0.25 version
    big_seed = invoke("tokenize", "--fraction", "0.25", "--seed", "123456789")  # was "1.23457e+08"
    assert_one_line_error(big_seed, "--seed 123456789 (it was made with 0)")


def test_a_dataset_whose_source_changed_is_made_again_with_a_note_for_its_runs(workspace):
    """The same settings over a source that changed make the dataset again (it is the user's text), and say that
    the runs that trained on it can no longer resume on it."""
    source = workspace / "corp.txt"
    source.write_text("".join(f"Line {i} of a small corpus, with words enough to train on.\n" for i in range(400)))
    assert invoke("tokenize", str(source), "--name", "corp").exit_code == 0
    train(tiny_config(max_steps=1, eval_batches=1, batch_size=2), run_name="on-corp")
    source.write_text("A line put first since.\n" + source.read_text())  # in train (a line appended may land in val)
    again = invoke("tokenize", str(source), "--name", "corp")
    assert again.exit_code == 0, again.output
    assert "1 run trained on data/corp as it was (on-corp): it holds other text now, so resuming one is refused" in \
        " ".join(again.stderr.split()), again.stderr


def test_data_rm_names_the_runs_that_need_it_and_takes_an_interrupted_tokenize_along(with_shakespeare, workspace):
    _two_runs()
    tokens = sum(json.loads((with_shakespeare / "meta.json").read_text())["splits"][s]["tokens"] for s in ("train",
                                                                                                          "val"))
    partial = with_shakespeare.with_name(".shakespeare.partial")
    partial.mkdir()
    (partial / "train.bin").write_bytes(b"\0" * 64)
    result = invoke("data", "rm", "shakespeare", "--yes")
    assert result.exit_code == 0, result.output
    assert re.search(rf"data/shakespeare: {tokens:,} tokens, an interrupted tokenize of it, [\d.]+ [kM]B\n",
                     result.stderr), result.stderr
    assert "2 runs trained on it (b, a): resuming one, or `tinygpt eval` of one without --data, will need it " \
           "tokenized again" in result.stderr
    assert sorted(p.name for p in with_shakespeare.parent.iterdir()) == []
    assert_one_line_error(invoke("data", "rm", "shakespeare", "--yes"), "no tokenized dataset named 'shakespeare'")
    assert_one_line_error(invoke("data", "rm", "raw"), "data/raw holds downloaded corpora")


def test_a_deletion_killed_halfway_is_never_listed_and_is_finished_by_the_next(with_shakespeare, workspace):
    import os
    import subprocess

    a, _ = _two_runs()
    dead = subprocess.Popen(["true"])  # a process that has ended: its deletion was killed
    dead.wait()
    leftover = a.parent / f".removing-{dead.pid}-0"  # what `runs rm` of a left when SIGKILLed mid-delete
    a.rename(leftover)
    ongoing = a.parent / f".removing-{os.getpid()}-7"  # another `rm` deleting now (review): not its to sweep
    ongoing.mkdir()
    assert [s.name for s in list_run_summaries()] == ["b"]
    assert invoke("runs", "--json").stderr == ""  # not a run, nor a note
    assert invoke("runs", "rm", "b", "--yes").exit_code == 0
    assert not leftover.exists() and ongoing.is_dir()


def test_ctrl_c_during_a_deletion_finishes_that_one_and_keeps_the_rest(with_shakespeare, workspace, monkeypatch):
    import os
    import signal

    from tinygpt_cli import inventory

    a, b = _two_runs()
    real = shutil.rmtree

    def interrupted(path, *args, **kwargs):
        # a stop while the first run's files are being deleted (SIGTERM: a background job ignores SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(inventory.shutil, "rmtree", interrupted)
    result = invoke("runs", "rm", "b", "a", "--yes")
    assert result.exit_code == 143, result.output
    assert "Interrupted: deleted runs/b; kept runs/a." in result.stderr
    assert not b.exists() and a.is_dir()
    assert [p.name for p in a.parent.iterdir()] == ["a"]


def test_the_report_names_the_model_as_the_listing_does(with_shakespeare, workspace):
    """The report said "micro: 0.1M parameters, 2 layers × 32" of a run that `tinygpt runs` lists as custom 2×32:
    micro's settings, not its shape."""
    run = train(tiny_config(max_steps=1, eval_interval=1, eval_batches=1, batch_size=2), run_name="c").run_dir
    assert "| model | custom (from micro): " in (run / "report.md").read_text()
    assert list_run_summaries()[0].shape == "custom 2×32"


# ------------------------------------------------------------------------------------------------ runs compare
def _table_rows(text: str) -> dict[str, list[str]]:
    """A rich table's rows (one line each) by their first cell: the other cells, stripped."""
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip() for cell in re.split(r"[│┃]", line)[1:-1]]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_runs_compare_sets_runs_side_by_side(with_shakespeare, workspace, tmp_path):
    from tinygpt_cli.inventory import compare_runs, val_loss_at
    from tinygpt_cli.report import read_metrics

    long = train(tiny_config(max_steps=4, eval_interval=2, eval_batches=1, batch_size=2), run_name="long").run_dir
    short = train(tiny_config(max_steps=2, eval_interval=2, eval_batches=1, batch_size=2, lr="0.01"),
                  run_name="short").run_dir
    assert invoke("eval", "short", "--tokens", "256").exit_code == 0  # an eval.jsonl measure, for one run alone

    comparison = compare_runs(["long", "short"])
    assert [run.summary.name for run in comparison.runs] == ["long", "short"]
    # what differs: lr (and min_lr, which follows it) and the steps; the rest is counted, not shown
    assert comparison.differing == ["train.max_steps", "train.lr", "train.min_lr"]
    assert comparison.same == len(comparison.runs[0].config) - 3 and comparison.same > 30
    for run, folder in zip(comparison.runs, (long, short), strict=True):
        _, evals = read_metrics(folder / "metrics.jsonl")
        assert [(step, loss) for step, _, loss in run.val_curve] == evals
        assert run.train_loss is not None and run.tokens_per_s > 0 and run.elapsed_s > 0
    # the longer run is also read at the tokens the shorter one reached: the figure that compares them fairly
    assert comparison.common_tokens == comparison.runs[1].val_curve[-1][1] < comparison.runs[0].val_curve[-1][1]
    assert val_loss_at(comparison.runs[0], comparison.common_tokens) == comparison.runs[0].val_curve[0][2]
    assert list(comparison.runs[1].measures) == ["loss shakespeare/val"] and not comparison.runs[0].measures

    shown = invoke("runs", "compare", "long", str(short))  # a name and a folder
    assert shown.exit_code == 0, shown.output
    rows = _table_rows(shown.stdout)
    assert rows[""] == ["long", "short"]  # a column a run, in the order named
    assert rows["train.lr"] == ["0.002", "0.01"] and rows["status"] == ["finished", "finished"]
    assert [row for row in rows if row.startswith("val loss at ")] == ["val loss at 128 tokens"]  # 2 steps × 2 × 32
    assert rows["loss shakespeare/val"][0] == "" and re.fullmatch(r"\d+\.\d{4} · \d\.\d{4} bits/byte \(step 2\)",
                                                                   rows["loss shakespeare/val"][1])
    assert "other settings are the same in all" in shown.stderr
    as_json = json.loads(invoke("runs", "compare", "long", "short", "--json").stdout)
    assert as_json["differing"] == comparison.differing and as_json["common_tokens"] == comparison.common_tokens
    assert [run["val_loss_at_common_tokens"] for run in as_json["runs"]] == [
        val_loss_at(run, comparison.common_tokens) for run in comparison.runs]
    assert as_json["runs"][0]["summary"]["name"] == "long" and as_json["runs"][1]["config"]["train.lr"] == 0.01

    from tinygpt_cli import checkpoint as ckpt

    state_file = ckpt.latest_checkpoint(long) / "state.json"  # upgrade QA: an earlier version saved the dataset as
    state = json.loads(state_file.read_text())               # given, "" for the last tokenized, which compare
    state["run_config"]["data"]["dataset"] = ""              # showed as a setting that differs
    state_file.write_text(json.dumps(state))
    assert compare_runs(["long", "short"]).runs[0].config["data.dataset"] == "shakespeare"

    plot = tmp_path / "val.png"
    drawn = invoke("runs", "compare", "long", "short", "--plot", str(plot))
    assert drawn.exit_code == 0 and f"Plot written to {plot}" in drawn.stderr
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_runs_compare_reads_a_pattern_as_one_column_of_mean_and_spread(with_shakespeare, workspace, tmp_path):
    """QA (researcher): a gap of 0.02 between two runs may be the seed's doing; nanoGPT and llm.c leave the repeats to
    a spreadsheet. A pattern (`'lr0.01-*'`) takes the runs it matches as one column: mean ± sample std, the
    settings that vary inside it listed."""
    import statistics

    from tinygpt_cli.inventory import compare_runs

    for lr, seeds in (("0.002", (1, 2, 3)), ("0.01", (1, 2))):
        for seed in seeds:
            train(tiny_config(max_steps=2, eval_interval=2, eval_batches=1, batch_size=2, lr=lr, seed=seed),
                  run_name=f"lr{lr}-s{seed}")
    comparison = compare_runs(["lr0.002-*", "lr0.01-*"])
    assert [(group.label, [run.summary.name for run in group.runs]) for group in comparison.groups] == [
        ("lr0.002-*", ["lr0.002-s1", "lr0.002-s2", "lr0.002-s3"]), ("lr0.01-*", ["lr0.01-s1", "lr0.01-s2"])]
    assert [run.summary.name for run in comparison.runs] == ["lr0.002-s1", "lr0.002-s2", "lr0.002-s3", "lr0.01-s1",
                                                               "lr0.01-s2"]
    assert comparison.differing == ["train.lr", "train.min_lr", "train.seed"]

    shown = invoke("runs", "compare", "lr0.002-*", "lr0.01-*")
    assert shown.exit_code == 0, shown.output
    rows = _table_rows(shown.stdout)
    assert rows[""] == ["lr0.002-* (3 runs)", "lr0.01-* (2 runs)"]
    assert rows["train.seed"] == ["1 · 2 · 3", "1 · 2"] and rows["train.lr"] == ["0.002", "0.01"]
    assert rows["status"] == ["3 finished", "2 finished"] and rows["steps"] == ["2/2", "2/2"]
    for cell, group in zip(rows["val loss"], comparison.groups, strict=True):
        finals = [run.val_curve[-1][2] for run in group.runs]
        assert cell == f"{statistics.fmean(finals):.4f} ± {statistics.stdev(finals):.4f}"
    as_json = json.loads(invoke("runs", "compare", "lr0.002-*", "lr0.01-*", "--json").stdout)
    first = as_json["groups"][0]
    assert first["label"] == "lr0.002-*" and first["runs"] == ["lr0.002-s1", "lr0.002-s2", "lr0.002-s3"]
    finals = [run.val_curve[-1][2] for run in comparison.groups[0].runs]
    assert first["val_loss"] == {"mean": pytest.approx(statistics.fmean(finals)),
                                 "std": pytest.approx(statistics.stdev(finals)), "n": 3}
    assert len(as_json["runs"]) == 5
    # an eval of some runs: each column reads the mean of those that have it, and says how many of its runs do
    for name in ("lr0.01-s1", "lr0.01-s2", "lr0.002-s2"):
        assert invoke("eval", name, "--tokens", "256").exit_code == 0
    evals = _table_rows(invoke("runs", "compare", "lr0.002-*", "lr0.01-*").stdout)["loss shakespeare/val loss"]
    assert re.fullmatch(r"\d+\.\d{4} \(1 of 3\)", evals[0]) and re.fullmatch(r"\d+\.\d{4} ± \d\.\d{4}", evals[1])
    # review: an accuracy's best is the highest, where a loss's is the lowest (it bolded the lowest accuracy)
    from tinygpt_cli.cli import _comparison_table

    for name, accuracy in (("lr0.002-s1", 0.30), ("lr0.01-s1", 0.25)):
        with open(workspace / "runs" / name / "eval.jsonl", "a") as handle:
            handle.write(json.dumps({"kind": "task", "task": "hellaswag", "accuracy_norm": accuracy,
                                     "accuracy": accuracy, "examples": 10, "step": 2}) + "\n")
    table = _comparison_table(compare_runs(["lr0.002-*", "lr0.01-*"]))
    row = [str(cell.plain if hasattr(cell, "plain") else cell) for cell in table.columns[0]._cells].index(
        "hellaswag acc_norm")
    cells = [column._cells[row] for column in table.columns[1:]]
    assert [cell.plain for cell in cells] == ["0.3000 (1 of 3)", "0.2500 (1 of 2)"]
    assert [str(span.style) for span in cells[0].spans] == ["bold green"] and not cells[1].spans

    # a pattern beside a run; a pattern of one run is that run's column; a run in two columns is refused
    assert_one_line_error(invoke("runs", "compare", "lr0.002-s1", "lr0.002-*"),
                          "lr0.002-s1 and lr0.002-* both take lr0.002-s1: name each run once")
    pair = _table_rows(invoke("runs", "compare", "lr0.002-s[1]", "lr0.01-*").stdout)
    assert pair[""] == ["lr0.002-s1", "lr0.01-* (2 runs)"] and re.fullmatch(r"\d+\.\d{4}", pair["val loss"][0])
    assert_one_line_error(invoke("runs", "compare", "lr0.002-s1", "nothing-*"),
                          "no run matches nothing-*: `tinygpt runs` lists them")
    # QA: one pattern of three runs said "name two runs or more"
    assert_one_line_error(invoke("runs", "compare", "lr0.002-*"),
                          "lr0.002-* is one column (3 runs): name a second run or pattern to compare it with")
    plot = tmp_path / "groups.png"
    drawn = invoke("runs", "compare", "lr0.002-*", "lr0.01-*", "--plot", str(plot))
    assert drawn.exit_code == 0 and plot.read_bytes().startswith(b"\x89PNG")


def test_runs_compare_shows_the_train_loss_a_stop_between_log_steps_saved(with_shakespeare, workspace):
    """QA: stopped between log steps (Ctrl-C, --max-minutes), the summary and the report gave the loss of the steps
    since the last log, and `runs compare` the older one metrics.jsonl logged, beside the later step."""
    from tinygpt_cli.checkpoint import latest_checkpoint, read_state
    from tinygpt_cli.inventory import compare_runs
    from tinygpt_cli.report import metrics_records

    stopped = train(tiny_config(max_steps=8, log_interval=2, eval_interval=100, eval_batches=1, batch_size=2,
                                max_tokens=3 * 2 * 32), run_name="stopped")
    assert stopped.steps == 3
    logged = [r["loss"] for r in metrics_records(stopped.run_dir / "metrics.jsonl") if r.get("kind") == "train"]
    saved = read_state(latest_checkpoint(stopped.run_dir))["train_loss"]
    assert saved == stopped.final_loss and saved != logged[-1]
    train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="other")
    assert compare_runs(["stopped", "other"]).runs[0].train_loss == saved


def test_runs_compare_refuses_what_it_cannot_compare(with_shakespeare, workspace, tmp_path):
    cfg = tiny_config(max_steps=2, eval_batches=1, batch_size=2)
    one = train(cfg, run_name="one").run_dir
    assert_one_line_error(invoke("runs", "compare", "one"), "name two runs or more", code=2)
    assert_one_line_error(invoke("runs", "compare", "one", "nosuch"), "no run or checkpoint at nosuch")
    assert_one_line_error(invoke("runs", "compare", "one", str(one)), "are the same run: name each run once")
    assert_one_line_error(invoke("runs", "compare", "one", str(one / "checkpoints" / "step_2")),
                          "is a checkpoint, not a run")
    assert_one_line_error(invoke("runs", "compare", "one", "one", "--plot", str(tmp_path / "val.jpg")),
                          "does not end in .png", code=2)
    # a run killed before its first checkpoint is compared from its config.yaml; a plot with no val loss is refused
    unsaved = one.with_name("unsaved")
    unsaved.mkdir()
    shutil.copy(one / "config.yaml", unsaved / "config.yaml")
    compared = invoke("runs", "compare", "one", "unsaved")
    assert compared.exit_code == 0 and _table_rows(compared.stdout)["status"] == ["finished", "no checkpoint"]
    assert "Every setting is the same in all." in compared.stderr
    lonely = unsaved.with_name("lonely")
    lonely.mkdir()
    shutil.copy(one / "config.yaml", lonely / "config.yaml")
    assert_one_line_error(invoke("runs", "compare", "lonely", "unsaved", "--plot", str(tmp_path / "v.png")),
                          "none of these runs has evaluated yet")
    for target in (tmp_path / "missing" / "v.png",):  # no folder to write it in: one line, no file
        assert_one_line_error(invoke("runs", "compare", "one", "unsaved", "--plot", str(target)), "cannot write")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".png") == []


def test_runs_compare_reads_damaged_records_as_missing(with_shakespeare, workspace):
    """Review: a value of the wrong type in eval.jsonl was a traceback ("Unknown format code 'f'"), an Infinity
    val loss in metrics.jsonl flattened every curve of the plot, and a run whose config.yaml could not be read was
    shown with the defaults as its settings."""
    from tinygpt_cli.inventory import compare_runs

    one = train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="one").run_dir
    two = shutil.copytree(one, one.with_name("two"))
    with open(two / "eval.jsonl", "a") as handle:
        handle.write(json.dumps({"kind": "loss", "dataset": "x", "split": "val", "loss": "bad", "step": 2,
                                 "bits_per_byte": "no"}) + "\n")
        handle.write(json.dumps({"kind": "task", "task": "arc_easy", "accuracy": "hi", "examples": "many",
                                 "step": "two"}) + "\n")
    with open(two / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "eval", "step": 3, "val_loss": Infinity, "tokens": 999}\n')
    shown = invoke("runs", "compare", "one", "two")
    assert shown.exit_code == 0, shown.output
    rows = _table_rows(shown.stdout)
    assert rows["loss x/val"] == ["", "n/a (step 2)"]
    assert rows["arc_easy"] == ["", "acc n/a ± n/a · perplexity n/a on 0 examples"]
    assert compare_runs(["one", "two"]).runs[1].val_curve == compare_runs(["one", "two"]).runs[0].val_curve
    unsaved = one.with_name("unsaved")
    unsaved.mkdir()
    (unsaved / "config.yaml").write_text("[not a mapping\n")
    comparison = compare_runs(["one", "unsaved"])
    assert comparison.runs[1].config == {} and comparison.differing == list(comparison.runs[0].config)


def test_val_loss_at_reads_between_evaluations(with_shakespeare, workspace):
    """Review: "val loss at N tokens" took each run's last evaluation at or before N: a run evaluated at 96 and
    192 tokens was read at 96 under a label of 128. It reads the line between the evaluations either side."""
    from tinygpt_cli.inventory import RunRecord, val_loss_at

    run = RunRecord(summary=None, config={}, train_loss=None, tokens_per_s=None, mfu=None, elapsed_s=None,
                    val_curve=[(1, 96, 6.0), (2, 192, 5.0)], measures={})
    assert val_loss_at(run, 128) == pytest.approx(6.0 - 1 / 3)
    assert (val_loss_at(run, 96), val_loss_at(run, 192)) == (6.0, 5.0)
    assert val_loss_at(run, 64) is None and val_loss_at(run, 200) is None


def _rewrite_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _made_by_an_earlier_rule(meta: dict, train_sha256: str | None = None) -> None:
    """A dataset's meta.json as an earlier version's split rule wrote it (with no job hash), of `train_sha256`."""
    meta["split_rule"] = "documents numbered in source order; ...; a single-document source is cut at the line " \
                         "break before its last max(val_fraction, 0.1)"
    del meta["job_sha256"]
    if train_sha256:
        meta["splits"]["train"]["sha256"] = train_sha256


def test_a_dataset_an_earlier_split_rule_made_is_not_made_otherwise_under_its_runs(workspace):
    """Upgrade QA: the same tokenize command, run by a version whose rule cuts a source of fewer than 10 documents
    otherwise, replaced the dataset its runs trained on without --force, and their resume then blamed the text."""
    from tinygpt_cli import checkpoint as ckpt
    from tinygpt_cli.errors import TrainingError

    folder = workspace / "three"
    folder.mkdir()
    for i in range(3):
        (folder / f"book{i}.txt").write_text("".join(f"Book {i}, line {n}: words to train on.\n" for n in range(300)))
    assert invoke("tokenize", str(folder), "--name", "three").exit_code == 0
    train(tiny_config(max_steps=1, eval_batches=1, batch_size=2), run_name="on-three")
    meta_file = workspace / "data" / "three" / "meta.json"
    _rewrite_json(meta_file, lambda meta: _made_by_an_earlier_rule(meta, "0" * 64))  # other data, trained on
    state_file = ckpt.latest_checkpoint(workspace / "runs" / "on-three") / "state.json"
    _rewrite_json(state_file, lambda state: state["data"].update(train_sha256="0" * 64))
    before = meta_file.read_bytes()
    refused = invoke("tokenize", str(folder), "--name", "three")
    assert_one_line_error(refused, "1 run trained on data/three (on-three), and this version of tinygpt cuts a "
                                   "source of so few documents into train and val otherwise than the one that made it")
    assert "the new dataset is finished and waits; rerun with --force to put it in place" in \
        " ".join(refused.stderr.split()) and meta_file.read_bytes() == before
    forced = invoke("tokenize", str(folder), "--name", "three", "--force")
    assert forced.exit_code == 0, forced.output
    assert "An earlier run of this command finished it: putting it in place" in forced.stderr  # not made again
    assert json.loads(meta_file.read_text())["split_rule"] != json.loads(before)["split_rule"]
    _rewrite_json(ckpt.latest_checkpoint(workspace / "runs" / "on-three") / "state.json",  # trained on its cut
                  lambda state: state["data"].update(split_rule="an earlier version's rule", train_sha256="0" * 64))
    with pytest.raises(TrainingError, match="run on-three trained on data/three as an earlier tinygpt cut its few "
                                            "documents into train and val, and this one cuts them otherwise"):
        train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="on-three", resume=True)

    many = workspace / "many"  # 10 documents or more are split whole by every version's rule: no refusal
    many.mkdir()
    for i in range(12):
        (many / f"part{i}.txt").write_text("".join(f"Part {i}, line {n}: words to train on.\n" for n in range(60)))
    (many / "part0.txt").rename(workspace / "one.txt")  # review: and one document up to 10 MiB is cut as before
    for source, name in ((many, "many"), (workspace / "one.txt", "one")):
        assert invoke("tokenize", str(source), "--name", name).exit_code == 0
        train(tiny_config(max_steps=1, eval_batches=1, batch_size=2), run_name=f"on-{name}")
        _rewrite_json(workspace / "data" / name / "meta.json", _made_by_an_earlier_rule)
        assert invoke("tokenize", str(source), "--name", name).exit_code == 0
    # and text that changed in a source of 10 documents or more goes ahead as it always did, with the runs' note
    _rewrite_json(workspace / "data" / "many" / "meta.json", _made_by_an_earlier_rule)
    (many / "part1.txt").write_text("A line put first since.\n" + (many / "part1.txt").read_text())
    changed = invoke("tokenize", str(many), "--name", "many")
    assert changed.exit_code == 0, changed.output
    assert "1 run trained on data/many as it was (on-many): it holds other text now" in " ".join(changed.stderr.split())


def test_a_run_saved_before_its_data_was_hashed_is_told_its_text_may_have_changed(workspace):
    """Upgrade QA: a checkpoint of an earlier tinygpt records no hash of its train split; tokenize said resuming it
    was refused, and the resume then trained on the new text without a word."""
    from tinygpt_cli import checkpoint as ckpt

    source = workspace / "corp.txt"
    source.write_text("".join(f"Line {i} of a small corpus, with words enough to train on.\n" for i in range(400)))
    assert invoke("tokenize", str(source), "--name", "corp").exit_code == 0
    run = train(tiny_config(max_steps=1, eval_batches=1, batch_size=2), run_name="old").run_dir
    def as_saved_before_hashes(state):
        del state["data"]["train_sha256"]
        state["saved_at"] = "2026-01-01T00:00:00+00:00"

    _rewrite_json(ckpt.latest_checkpoint(run) / "state.json", as_saved_before_hashes)
    source.write_text("A line put first since.\n" + source.read_text())
    again = invoke("tokenize", str(source), "--name", "corp")
    assert again.exit_code == 0, again.output
    said = " ".join(again.stderr.split())
    assert "1 run trained on data/corp as it was, saved by an earlier tinygpt that recorded no hash of the text " \
           "(old): resuming one goes on with the new text" in said and "refused" not in said
    events = []
    resumed = train(tiny_config(max_steps=2, eval_batches=1, batch_size=2), run_name="old", resume=True,
                    on_event=events.append)
    assert resumed.steps == 2
    assert any("was saved by an earlier tinygpt, which recorded no hash of the text it trained on, and data/corp "
               "was tokenized again since" in (event.message or "") for event in events)
