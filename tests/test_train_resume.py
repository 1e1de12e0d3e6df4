"""What a resume changes and keeps: AdamW settings, a cut evaluation, --init-from, a metrics.jsonl cut by a crash."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import tiny_config
from tinygpt_cli import checkpoint as ckpt
from tinygpt_cli.errors import CheckpointError, TrainingError
from tinygpt_cli.report import read_metrics
from tinygpt_cli.training import train


def test_a_resume_applies_the_new_adamw_settings_not_the_checkpoints(with_shakespeare):
    """Loading the optimizer state loads its param groups too: --set train.weight_decay/beta1/beta2 on a resume
    must reach the optimizer, as config.yaml says they do."""
    config = tiny_config(max_steps=2, eval_interval=2)
    train(config, run_name="r")
    changed = replace(config, train=replace(config.train, max_steps=3, weight_decay=0.5, beta1=0.8, beta2=0.5))
    resumed = train(changed, run_name="r", resume=True)
    saved = torch.load(ckpt.latest_checkpoint(resumed.run_dir) / "optimizer.pt", weights_only=True)
    assert [(g["weight_decay"], tuple(g["betas"])) for g in saved["param_groups"]] == [(0.5, (0.8, 0.5)),
                                                                                      (0.0, (0.8, 0.5))]


def test_a_resume_drops_a_metrics_line_a_crash_cut_short(with_shakespeare):
    config = tiny_config(max_steps=4, eval_interval=2, log_interval=1)
    first = train(replace(config, train=replace(config.train, max_steps=2)), run_name="r")
    with open(first.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
        handle.write('{"kind": "train", "step": 3, "lo')  # killed mid-line
    resumed = train(config, run_name="r", resume=True)
    rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3, 4]



def test_a_resume_removes_what_saves_killed_mid_write_left(with_shakespeare):
    """A save killed by SIGKILL (a scheduler's grace period ending during the last save) leaves its temporary
    step folder, as large as a checkpoint, and its `latest` file: the next training of the run removes them."""
    config = tiny_config(max_steps=2, eval_interval=2)
    run = train(replace(config, train=replace(config.train, max_steps=1)), run_name="r").run_dir
    folder = run / "checkpoints"
    (folder / ".tmp-step_2-4242").mkdir()
    (folder / ".tmp-step_2-4242" / "model.safetensors").write_bytes(b"\0" * 1000)
    (folder / ".latest.tmp-4242").write_text("step_2\n")
    train(config, run_name="r", resume=True)
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_1", "step_2"]

def test_a_re_save_of_a_step_always_leaves_one_whole_copy_of_it(with_shakespeare, monkeypatch):
    """A re-save of the same step (a resume of a run stopped in its evaluation) deleted the old step folder before
    renaming the new one in: a kill between the two left the run with no checkpoint at all (audit). The old one is
    now set aside until the new one is in place."""
    run = train(tiny_config(max_steps=1, eval_interval=1), run_name="r").run_dir
    folder = run / "checkpoints"
    seen = []
    real = ckpt.workspace.replace

    def replace_and_look(source, target):
        if os.path.basename(target) == "step_1":
            whole = [p for p in folder.iterdir() if p.name == "step_1" or p.name.startswith(".old-step_1-")]
            seen.append([p.name.split("-")[0] for p in whole if (p / "state.json").is_file()])
        real(source, target)

    monkeypatch.setattr(ckpt.workspace, "replace", replace_and_look)
    loaded = ckpt.load_checkpoint(folder / "step_1")
    ckpt.save_checkpoint(run, 1, loaded.model, None, {"seen": "again"}, keep_last=1)
    assert seen == [[".old"]]
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_1"]
    assert json.loads((folder / "step_1" / "state.json").read_text())["seen"] == "again"


def test_a_step_set_aside_by_a_killed_re_save_is_put_back(with_shakespeare, workspace):
    """Killed between setting the old step aside and renaming the new one in: the run's next training puts the
    set-aside copy back (it is whole) instead of finding no checkpoint; eval, generate and `runs` say what to run,
    rather than take an older step in silence (review)."""
    from test_cli import invoke

    config = tiny_config(max_steps=3, eval_interval=1)
    run = train(replace(config, train=replace(config.train, max_steps=2)), run_name="r").run_dir
    folder = run / "checkpoints"
    (folder / "step_2").rename(folder / ".old-step_2-4242")
    (folder / ".tmp-step_2-4242").mkdir()  # the new copy, whole or not: not trusted
    killed = r"step_2 was being saved again when its training was killed.*--resume --name r"
    with pytest.raises(CheckpointError, match=killed):
        ckpt.load_checkpoint(run)
    with pytest.raises(CheckpointError, match=killed):  # the latest run
        ckpt.load_checkpoint(None)
    assert "step_2 was being saved again" in invoke("runs").stderr
    resumed = train(config, run_name="r", resume=True)
    assert resumed.steps == 3 and resumed.first_step == 2
    assert sorted(p.name for p in folder.iterdir()) == ["latest", "step_1", "step_2", "step_3"]


def test_runs_started_together_without_a_name_get_names_of_their_own(with_shakespeare, workspace, monkeypatch):
    """Two `tinygpt train` without --name started in the same second took the same default name: one was refused
    as "training run X ... pick another --name", a name its user never chose (audit). A default name that is
    taken, by a run that trains or one that is done, now gets -2, -3."""
    from tinygpt_cli import training
    from tinygpt_cli import workspace as ws

    monkeypatch.setattr(training, "default_run_name", lambda cfg, dataset: "same-second")
    config = tiny_config(max_steps=1, eval_interval=1)
    (workspace / "runs").mkdir(parents=True, exist_ok=True)
    with ws.exclusive(ws.lock_of(workspace / "runs" / "same-second"), "runs/same-second"):  # one trains now
        assert train(config).run_dir.name == "same-second-2"
    assert train(config).run_dir.name == "same-second"
    assert train(config).run_dir.name == "same-second-3"  # -2 and the base are done runs now
    with pytest.raises(TrainingError, match="run same-second-2 already exists"):  # a name given is that name
        train(config, run_name="same-second-2")


def test_a_resume_without_a_name_goes_on_with_the_latest_run(with_shakespeare):
    """train(resume=True) took the latest run's config, as its docstring says, then looked for a checkpoint under a
    new default name and said there was nothing to resume."""
    config = tiny_config(max_steps=1, eval_interval=1)
    first = train(config, run_name="latest")
    resumed = train(replace(config, train=replace(config.train, max_steps=2)), resume=True)
    assert resumed.run_dir == first.run_dir and resumed.steps == 2


def test_the_loss_plot_reads_past_a_cut_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "eval", "st\n')
    assert read_metrics(path) == ([(1, 2.0)], [])


def test_a_new_run_does_not_append_to_the_metrics_of_an_attempt_killed_before_its_first_checkpoint(
        with_shakespeare, workspace):
    """A run killed (SIGKILL, the OOM killer) before its first checkpoint leaves metrics.jsonl; starting the same
    --name again must not mix that attempt's records into the new run's."""
    run = workspace / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 99.0}\n')
    result = train(tiny_config(max_steps=2, eval_interval=2, log_interval=1), run_name="r")
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert all(r.get("loss") != 99.0 for r in rows)


def test_init_from_on_a_resume_is_refused_not_recorded_unused(with_shakespeare, workspace):
    import pytest

    from tinygpt_cli.errors import TrainingError

    config = tiny_config(max_steps=2, eval_interval=2)
    train(config, run_name="source")
    train(config, run_name="r")
    later = replace(config, train=replace(config.train, max_steps=3, init_from="source"))
    with pytest.raises(TrainingError, match="--init-from cannot change run r on resume"):
        train(later, run_name="r", resume=True)
    assert ckpt.latest_checkpoint(workspace / "runs" / "r").name == "step_2"
    assert "init_from: ''" in (workspace / "runs" / "r" / "config.yaml").read_text()


def test_a_resume_runs_the_evaluation_a_stop_cut_short(with_shakespeare, monkeypatch):
    """A stop in the middle of step 3's evaluation: the resume measures it before training on, so the val curve,
    the best val loss and the train losses are those of the uninterrupted run."""
    from tinygpt_cli import training as train_module
    from tinygpt_cli.training import StopFlag

    config = tiny_config(max_steps=6, eval_interval=3, eval_batches=4, log_interval=2)
    straight = train(config, run_name="straight")
    stop, real, evaluated = StopFlag(), train_module.windows_at, []

    def windows(*args, **kwargs):
        if not torch.is_grad_enabled():
            evaluated.append(1)
            if len(evaluated) == 2:
                stop.reason = "interrupted"
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "windows_at", windows)
    first = train(config, run_name="cut", stop=stop)
    assert first.stopped == "interrupted" and first.steps == 3
    monkeypatch.setattr(train_module, "windows_at", real)
    resumed = train(config, run_name="cut", resume=True)

    def curve(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in rows]

    assert curve(resumed.run_dir) == curve(straight.run_dir)
    assert resumed.best_val_loss == straight.best_val_loss
    state = json.loads((ckpt.latest_checkpoint(resumed.run_dir) / "state.json").read_text())
    assert not state["val_pending"]


def test_a_resume_stopped_before_its_first_step_leaves_the_run_as_it_was(with_shakespeare):
    """The CLI says "the run is as it was": config.yaml must not take the new --max-steps, nor report.md a
    session of 0 tokens/s, when nothing was trained."""
    from tinygpt_cli.training import StopFlag

    config = tiny_config(max_steps=2, eval_interval=2)
    run = train(config, run_name="r").run_dir
    before = {name: (run / name).read_text() for name in ("config.yaml", "report.md")}
    stop = StopFlag()
    stop.reason = "interrupted"
    later = replace(config, train=replace(config.train, max_steps=9))
    result = train(later, run_name="r", resume=True, stop=stop)
    assert result.stopped == "interrupted" and result.steps == 2
    assert {name: (run / name).read_text() for name in ("config.yaml", "report.md")} == before
    resumed = train(later, run_name="r", resume=True)  # and a resume that trains records the new budget
    assert resumed.steps == 9 and "max_steps: 9" in (run / "config.yaml").read_text()


def test_a_resume_goes_on_counting_non_finite_steps_in_a_row(with_shakespeare, workspace, monkeypatch):
    """Training stops after MAX_BAD_STEPS non-finite steps in a row. The count was not checkpointed: a run that
    saved after 2 such steps needed 5 more after a resume, where the straight run stops after 3 (audit)."""
    import pytest

    from tinygpt_cli import model as model_module
    from tinygpt_cli.errors import TrainingError
    from tinygpt_cli.training import MAX_BAD_STEPS

    config = tiny_config(max_steps=2, eval_interval=2, log_interval=1)
    train(config, run_name="r")
    real = model_module.chunked_cross_entropy

    def nan_when_training(*args, **kwargs):
        loss = real(*args, **kwargs)
        return loss * float("nan") if torch.is_grad_enabled() else loss  # evaluations stay finite

    monkeypatch.setattr(model_module, "chunked_cross_entropy", nan_when_training)
    train(replace(config, train=replace(config.train, max_steps=4)), run_name="r", resume=True)  # steps 3, 4 bad
    state = json.loads((ckpt.latest_checkpoint(workspace / "runs" / "r") / "state.json").read_text())
    assert state["bad_run"] == 2
    events = []
    with pytest.raises(TrainingError, match=f"{MAX_BAD_STEPS} steps in a row had a non-finite loss"):
        train(replace(config, train=replace(config.train, max_steps=20, eval_interval=20)), run_name="r",
              resume=True, on_event=events.append)
    assert [e.step for e in events if e.kind == "info" and "skipped" in e.message] == [5, 6, 7]


def test_a_dataset_given_by_a_relative_path_is_found_from_any_folder(with_shakespeare, workspace, tmp_path,
                                                                      monkeypatch):
    """`--data ../corpora/b` was kept as typed in config.yaml: a resume or an eval from another folder found no
    such dataset (audit). The run names it by absolute path."""
    from test_cli import invoke, train_tiny

    outside = tmp_path / "corpora" / "b"
    shutil.copytree(with_shakespeare, outside)
    shutil.rmtree(with_shakespeare)
    monkeypatch.chdir(tmp_path / "corpora")
    assert train_tiny("--data", "b", "--name", "y", steps=2).exit_code == 0
    config = (workspace / "runs" / "y" / "config.yaml").read_text()
    assert f"dataset: {outside}" in config, config
    monkeypatch.chdir(workspace)
    resumed = invoke("train", "--resume", "--name", "y", "--max-steps", "3")
    assert resumed.exit_code == 0, resumed.output
    assert invoke("eval", "y", "--tokens", "64").exit_code == 0


def test_a_linked_dataset_in_the_workspace_keeps_its_name(with_shakespeare, workspace, tmp_path):
    """A dataset linked into data/ (kept on another disk) was recorded by its target's path (review): a re-pointed
    link then left the run looking for a path that had moved."""
    from test_cli import train_tiny

    elsewhere = tmp_path / "disk2" / "shakespeare"
    elsewhere.parent.mkdir()
    shutil.move(with_shakespeare, elsewhere)
    with_shakespeare.symlink_to(elsewhere, target_is_directory=True)
    assert train_tiny("--data", "shakespeare", "--name", "linked", steps=1).exit_code == 0
    assert "dataset: shakespeare\n" in (workspace / "runs" / "linked" / "config.yaml").read_text()


def test_a_resume_into_checkpoints_it_cannot_write_stops_before_training(with_shakespeare, monkeypatch):
    """A read-only checkpoints/ was found out at the first save, every step before it lost, and the advice was to
    free disk space (bad-input audit): it is refused up front, and a save that still fails says what stopped it."""
    import errno
    from pathlib import Path

    import pytest

    from tinygpt_cli import training
    from tinygpt_cli.errors import TrainingError

    config = tiny_config(max_steps=4, eval_interval=2, log_interval=1)
    first = train(replace(config, train=replace(config.train, max_steps=2)), run_name="r")
    metrics = (first.run_dir / "metrics.jsonl").read_text()
    real = Path.write_bytes

    def read_only(self, data):  # as chmod a-w would, for any user root included
        if self.parent.name == "checkpoints":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(TrainingError, match=r"cannot write to .*checkpoints \(Permission denied\): make it writable"):
        train(config, run_name="r", resume=True)
    assert (first.run_dir / "metrics.jsonl").read_text() == metrics  # no step was trained
    monkeypatch.setattr(Path, "write_bytes", real)

    def refused(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(training, "save_checkpoint", refused)
    with pytest.raises(TrainingError, match=r"intact: make .* writable, then resume") as caught:
        train(config, run_name="r", resume=True)
    assert "free disk space" not in str(caught.value)


def test_a_run_started_from_a_run_draws_the_batches_after_its_own(with_shakespeare, workspace, monkeypatch):
    """QA: `train --init-from a` drew its batches from step 0 of the stream run a drew, with the same seed, so a
    continued pretraining re-spent its first steps on windows its weights had learned (its train loss read below the
    split's mean). It goes on from a's step now, through resumes and chains, and says so."""
    from tinygpt_cli import training

    train(tiny_config(max_steps=6, eval_interval=1000), run_name="a")
    drawn = []
    real = training._batch_generator
    monkeypatch.setattr(training, "_batch_generator",
                        lambda seed, step, micro, rank=0: drawn.append(step) or real(seed, step, micro, rank))
    notes = []
    train(tiny_config(init_from="a", max_steps=3, eval_interval=1000), run_name="b",
          on_event=lambda event: notes.append(event.message or ""))
    assert drawn[0] == 6 and min(drawn) == 6
    assert any("its batches go on from step 6 of the stream that run drew" in note for note in notes)
    state = ckpt.read_state(ckpt.latest_checkpoint(workspace / "runs" / "b"))
    assert state["data"]["step_offset"] == 6 and "step_offset + step" in state["data"]["sampler"]
    drawn.clear()
    train(tiny_config(init_from="a", max_steps=5, eval_interval=1000), run_name="b", resume=True)
    assert drawn[0] == 6 + 3  # a resume keeps the offset
    drawn.clear()
    train(tiny_config(init_from="b", max_steps=2, eval_interval=1000), run_name="c")
    assert drawn[0] == 6 + 5  # b's step 5, past a's 6
    drawn.clear()
    train(tiny_config(max_steps=2, eval_interval=1000), run_name="fresh")
    assert drawn[0] == 0


def test_a_resume_of_a_run_killed_before_its_report_writes_the_report(with_shakespeare, workspace):
    """Chaos QA: a run killed after its last checkpoint and before report.md (or whose report was of an earlier
    stop) could only get one by training more steps: --resume said 'already at step 8 of 8', though `runs show` and
    the troubleshooting guide said a resume writes it."""
    from tinygpt_cli.inventory import reported_step, run_report

    config = tiny_config(max_steps=4, eval_interval=2, log_interval=1)
    run = train(config, run_name="r").run_dir
    report, metrics = run / "report.md", (run / "metrics.jsonl").read_text()
    first = report.read_text()
    report.unlink()  # the kill
    events = []
    other_batch = replace(config, train=replace(config.train, batch_size=config.train.batch_size * 2))
    again = train(other_batch, run_name="r", resume=True, on_event=events.append)
    assert (again.steps, again.first_step, again.stopped) == (4, 4, "completed")
    assert any("was stopped before it wrote its report.md: writing it now" in (e.message or "") for e in events)
    text = report.read_text()
    assert text.splitlines()[:10] == first.splitlines()[:10]  # the same run, step, losses and settings
    assert f"| batch | {config.train.batch_size} sequences" in text  # the batch it trained with (review)
    assert "| time (this session) | no step trained |" in text and "tokens/s (the median logged)" in text
    assert (run / "metrics.jsonl").read_text() == metrics  # nothing trained, logged or saved
    assert ckpt.latest_checkpoint(run).name == "step_4" and not list((run / "checkpoints").glob(".*"))
    assert run_report("r")[2] is None and reported_step(run) == 4
    with pytest.raises(TrainingError, match="already at step 4 of 4"):  # now there is nothing left to do
        train(config, run_name="r", resume=True)

    budget = 3 * 4 * 32  # the same for a run that ended at its --max-tokens, with a report of an earlier stop
    limited = replace(config, train=replace(config.train, max_steps=1000, max_tokens=budget))
    train(replace(limited, train=replace(limited.train, max_tokens=budget // 3)), run_name="t")
    train(limited, run_name="t", resume=True)
    tokens_run = workspace / "runs" / "t"
    (tokens_run / "report.md").write_text((tokens_run / "report.md").read_text().replace("at step 3", "at step 1"))
    assert train(limited, run_name="t", resume=True).stopped == "token_limit"
    assert reported_step(tokens_run) == 3
