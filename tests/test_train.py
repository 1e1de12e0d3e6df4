import json
import math

import numpy as np
import pytest
import torch

from conftest import TINY_SETTINGS, tiny_config
from tinygpt_cli import checkpoint as ckpt
from tinygpt_cli.errors import CheckpointError, ConfigError, TrainingError
from tinygpt_cli.training import learning_rate, make_optimizer, train


def _losses(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["kind"], r["step"], r.get("loss", r.get("val_loss"))) for r in lines]


def test_train_writes_a_self_describing_run(with_shakespeare):
    events = []
    result = train(tiny_config(max_steps=4), run_name="r", on_event=events.append)
    run = result.run_dir
    assert result.steps == 4 and result.stopped == "completed"
    assert (run / "config.yaml").is_file()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_2", "step_4"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_4"
    state = json.loads((run / "checkpoints" / "step_4" / "state.json").read_text())
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 4 * 32 and "torch" in state["rng"]
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and "eval" in kinds and "checkpoint" in kinds
    assert math.isfinite(result.final_val_loss) and result.unigram_val_loss > 0


def _stop_at(step: int, stop):
    def on_event(event):
        if event.kind == "step" and event.step == step:
            stop.reason = "interrupted"

    return on_event


def test_resume_reproduces_the_uninterrupted_run(with_shakespeare):
    """8 straight steps vs 4 + SIGINT-style stop + resume + 4: identical train and val losses."""
    from dataclasses import replace

    from tinygpt_cli.training import StopFlag

    plain = tiny_config(max_steps=8, eval_interval=4)
    with_dropout = replace(plain, model=replace(plain.model, dropout=0.1))  # exercises the saved torch RNG
    for name, config in (("plain", plain), ("dropout", with_dropout)):
        straight = train(config, run_name=f"{name}-straight")
        stop = StopFlag()
        first = train(config, run_name=f"{name}-split", on_event=_stop_at(3, stop), stop=stop)
        assert first.stopped == "interrupted" and first.steps == 3
        assert ckpt.latest_checkpoint(first.run_dir).name == "step_3"
        resumed = train(config, run_name=f"{name}-split", resume=True)
        assert resumed.steps == 8 and resumed.stopped == "completed"
        assert _losses(straight.run_dir) == _losses(resumed.run_dir)


def test_a_resume_in_the_middle_of_a_log_window_logs_the_same_losses(with_shakespeare):
    """Audit: a run stopped between log steps logged, at the next log step, the mean of the steps after the
    resume only. The window's sum is saved with the checkpoint (an eval checkpoint or the stop's) and goes on."""
    from tinygpt_cli.training import StopFlag

    config = tiny_config(max_steps=12, eval_interval=3, log_interval=4)
    straight = train(config, run_name="straight")

    def stop_at_eval(stop):
        def on_event(event):
            if event.kind == "eval" and event.step == 3:
                stop.reason = "interrupted"
        return on_event

    stop = StopFlag()
    first = train(config, run_name="split", on_event=stop_at_eval(stop), stop=stop)
    assert first.steps == 3
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(first.run_dir)).state
    assert state["log_window"]["steps"] == 3 and state["skipped_steps"] == 0
    resumed = train(config, run_name="split", resume=True)
    assert resumed.steps == 12
    assert _losses(straight.run_dir) == _losses(resumed.run_dir)
    # each log step has the window's mean gradient norm (before clipping), carried across the resume as the loss
    norms = [_grad_norms(run) for run in (straight.run_dir, resumed.run_dir)]
    assert norms[0] == norms[1] and [step for step, _ in norms[0]] == [4, 8, 12]
    assert all(0 < norm < math.inf for _, norm in norms[0])
    # review: a checkpoint saved before the norms were summed resumed its window with a sum of 0 and logged a norm
    # too low (2/3 of it); that window's norm is unknown, so null, and the next windows' are right again
    stop = StopFlag()
    train(config, run_name="old", on_event=stop_at_eval(stop), stop=stop)
    state_file = ckpt.latest_checkpoint(workspace_run("old")) / "state.json"
    state = json.loads(state_file.read_text())
    del state["log_window"]["grad_norm_total"]
    state_file.write_text(json.dumps(state))
    train(config, run_name="old", resume=True)
    old = _grad_norms(workspace_run("old"))
    assert old == [(4, None), *norms[0][1:]]
    assert _losses(workspace_run("old")) == _losses(straight.run_dir)


def workspace_run(name):
    from tinygpt_cli import workspace

    return workspace.runs_dir() / name


def _grad_norms(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["grad_norm"]) for r in lines if r["kind"] == "train"]


def test_a_stop_during_an_evaluation_cuts_it_short_and_keeps_the_step(with_shakespeare, monkeypatch):
    """A signal in the middle of a long evaluation (train.eval_batches=30) stops it at the next batch: the step's
    checkpoint is saved without a val loss of its own, and the run resumes to the same end."""
    from tinygpt_cli import training as train_module
    from tinygpt_cli.training import StopFlag

    stop = StopFlag()
    real = train_module.windows_at
    evaluated = []

    def windows(*args, **kwargs):
        if not torch.is_grad_enabled():  # an evaluation batch (training batches are drawn with grad on)
            evaluated.append(1)
            if len(evaluated) == 3:
                stop.reason = "interrupted"
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "windows_at", windows)
    config = tiny_config(max_steps=6, eval_interval=3, eval_batches=30)
    notes = []
    first = train(config, run_name="cut", stop=stop,
                  on_event=lambda event: notes.append(event.message) if event.kind == "info" else None)
    assert first.stopped == "interrupted" and first.steps == 3 and len(evaluated) == 3
    assert any("lower train.eval_batches or raise train.eval_interval" in note for note in notes)
    assert ckpt.latest_checkpoint(first.run_dir).name == "step_3"
    rows = [json.loads(line) for line in (first.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not [row for row in rows if row["kind"] == "eval"]  # no val loss from a third of an evaluation
    monkeypatch.setattr(train_module, "windows_at", real)
    resumed = train(config, run_name="cut", resume=True)
    assert resumed.steps == 6 and resumed.stopped == "completed" and resumed.final_val_loss is not None
    # the last step's evaluation is never cut: a run at max_steps could not be resumed to measure it
    monkeypatch.setattr(train_module, "windows_at", windows)
    evaluated.clear()
    stop = StopFlag()
    last = train(tiny_config(max_steps=3, eval_interval=3, eval_batches=30), run_name="last", stop=stop)
    assert last.stopped == "completed" and last.final_val_loss is not None and len(evaluated) == 30


def test_a_resume_that_changes_the_global_batch_says_so(with_shakespeare):
    """Another process count, --batch-size or --grad-accum on resume changes the tokens per step: a note, with
    the --grad-accum that keeps it; the same settings say nothing."""
    from tinygpt_cli.training import StopFlag

    config = tiny_config(max_steps=6, eval_interval=3, grad_accum=2)
    stop = StopFlag()
    train(config, run_name="batch", on_event=_stop_at(2, stop), stop=stop)
    notes = []

    def collect(event):
        if event.kind == "info":
            notes.append(event.message)

    train(tiny_config(max_steps=4, eval_interval=3, grad_accum=2), run_name="batch", resume=True, on_event=collect)
    assert not [n for n in notes if "sequences per step" in n]
    train(tiny_config(max_steps=6, eval_interval=3, grad_accum=4), run_name="batch", resume=True, on_event=collect)
    (note,) = [n for n in notes if "sequences per step" in n]
    batch = config.train.batch_size
    assert f"trained with {2 * batch} sequences per step" in note and f"this resume takes {4 * batch}" in note
    assert note.endswith("--grad-accum 2 keeps it") and "(1 process × " in note
    notes.clear()  # QA: where no --grad-accum keeps it (4 sequences a step, now 6 a micro-batch), a smaller one
    train(tiny_config(max_steps=7, eval_interval=3, grad_accum=1, batch_size=batch + 2), run_name="batch",
          resume=True, on_event=collect)
    (note,) = [n for n in notes if "sequences per step" in n]
    assert note.endswith(f"--batch-size {batch} --grad-accum 4 keeps it"), note


@pytest.mark.parametrize("eval_interval", [10, 3])
def test_a_stop_before_the_first_log_step_still_reports_the_train_loss(with_shakespeare, eval_interval):
    """A token budget that ends the run at step 3 of 20, before the first log step (10): between evaluations,
    or right after one (whose checkpoint then records it)."""
    config = tiny_config(max_steps=20, eval_interval=eval_interval, log_interval=10)
    per_step = config.train.batch_size * config.train.grad_accum * config.model.block_size
    result = train(tiny_config(max_steps=20, eval_interval=eval_interval, log_interval=10, max_tokens=3 * per_step),
                   run_name="early")
    assert result.steps == 3 and result.stopped == "token_limit"
    assert result.final_loss is not None and math.isfinite(result.final_loss)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(result.run_dir)).state
    assert state["train_loss"] == result.final_loss


def test_keep_last_prunes_old_checkpoints(with_shakespeare):
    result = train(tiny_config(max_steps=8, eval_interval=2, keep_last=2, keep_best=False), run_name="k")
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == ["step_6", "step_8"]


def test_the_best_checkpoint_is_kept_past_keep_last(with_shakespeare, monkeypatch):
    """Audit: keep_last pruned by step alone, so the checkpoint of the best val loss (the one to use after a run
    that overfits or diverges late) was deleted, while the listing still showed its loss. It is kept (and named in
    state.json, the report and `tinygpt runs --json`), and a resume goes on keeping it."""
    import json

    from tinygpt_cli import training
    from tinygpt_cli.inventory import list_run_summaries

    losses = iter([3.0, 1.0, 2.0, 2.5, 2.2, 2.1, 2.4, 0.5])
    monkeypatch.setattr(training._Trainer, "_evaluate", lambda self, can_cut=False: next(losses))
    result = train(tiny_config(max_steps=5, eval_interval=1, keep_last=1), run_name="best")
    assert [p.name for p in ckpt.list_checkpoints(result.run_dir)] == ["step_2", "step_5"]
    assert result.best_step == 2 and result.best_val_loss == 1.0
    assert json.loads((result.run_dir / "checkpoints" / "step_5" / "state.json").read_text())["best_step"] == 2
    assert "(best 1.0000 at step 2)" in (result.run_dir / "report.md").read_text()
    assert list_run_summaries()[0].best_step == 2
    resumed = train(tiny_config(max_steps=7, eval_interval=1, keep_last=1), run_name="best", resume=True)
    assert [p.name for p in ckpt.list_checkpoints(resumed.run_dir)] == ["step_2", "step_7"]
    later = train(tiny_config(max_steps=8, eval_interval=1, keep_last=1), run_name="best", resume=True)
    assert [p.name for p in ckpt.list_checkpoints(later.run_dir)] == ["step_8"] and later.best_step == 8
    state_file = later.run_dir / "checkpoints" / "step_8" / "state.json"  # a run saved before best_step was kept
    state = json.loads(state_file.read_text())
    del state["best_step"]
    state_file.write_text(json.dumps(state))
    losses = iter([0.9, 0.8])
    old = train(tiny_config(max_steps=10, eval_interval=1, keep_last=1), run_name="best", resume=True)
    assert old.best_step == 8 and [p.name for p in ckpt.list_checkpoints(old.run_dir)] == ["step_8", "step_10"]
    losses = iter([3.0, 1.0, 2.0])
    plain = train(tiny_config(max_steps=3, eval_interval=1, keep_last=1, keep_best=False), run_name="plain")
    assert [p.name for p in ckpt.list_checkpoints(plain.run_dir)] == ["step_3"]


def test_existing_run_needs_resume(with_shakespeare):
    train(tiny_config(max_steps=2), run_name="dup")
    with pytest.raises(TrainingError, match="already exists: pass --resume"):
        train(tiny_config(max_steps=2), run_name="dup")
    with pytest.raises(TrainingError, match="no checkpoint to resume"):
        train(tiny_config(max_steps=2), run_name="fresh", resume=True)


def test_warmup_then_cosine_and_wsd():
    cfg = tiny_config(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4).train
    assert learning_rate(0, cfg) == pytest.approx(1e-4)
    assert learning_rate(9, cfg) == learning_rate(10, cfg) == pytest.approx(1e-3)
    # the last step trained (99) is at min_lr: it was 1.003e-4, min_lr coming at step 100, which never trains
    assert learning_rate(99, cfg) == pytest.approx(1e-4, rel=1e-12)
    for k in range(0, 90, 7):  # the cosine is symmetric about its midpoint between steps 10 and 99
        assert learning_rate(10 + k, cfg) + learning_rate(99 - k, cfg) == pytest.approx(1.1e-3)
    wsd = tiny_config(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=0, schedule="wsd", decay_fraction=0.2).train
    assert learning_rate(50, wsd) == pytest.approx(1e-3)
    assert learning_rate(79, wsd) == pytest.approx(1e-3)
    assert learning_rate(89, wsd) == pytest.approx(5e-4)
    assert learning_rate(99, wsd) == pytest.approx(0.0)


def test_a_rewarm_rises_linearly_from_the_last_lr_to_the_schedule():
    cfg = tiny_config(max_steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4).train
    base = learning_rate(60, cfg)
    assert learning_rate(60, cfg, rewarm=(60, 1e-4)) == pytest.approx(1e-4 + (base - 1e-4) / 10)
    assert learning_rate(64, cfg, rewarm=(60, 1e-4)) == pytest.approx(1e-4 + (learning_rate(64, cfg) - 1e-4) / 2)
    assert learning_rate(69, cfg, rewarm=(60, 1e-4)) == pytest.approx(learning_rate(69, cfg))
    assert learning_rate(80, cfg, rewarm=(60, 1e-4)) == learning_rate(80, cfg)
    assert learning_rate(59, cfg, rewarm=(60, 1e-4)) == learning_rate(59, cfg)
    no_warmup = tiny_config(max_steps=100, warmup_steps=0, lr=1e-3, min_lr=1e-4).train
    assert learning_rate(60, no_warmup, rewarm=(60, 1e-4)) == learning_rate(60, no_warmup)


def _lrs(run_dir):
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["lr"] for r in lines if r["kind"] == "train"}


def test_extending_a_finished_run_rewarms_the_lr_instead_of_jumping(with_shakespeare):
    """A finished cosine run ends at min_lr; a longer --max-steps recomputes the schedule, whose LR at the resume
    step is far higher. The LR climbs there over train.warmup_steps (a note says so) instead of jumping, and a
    stop in the middle of that climb resumes onto the same LRs and losses."""
    from tinygpt_cli.training import StopFlag

    def config(steps):
        return tiny_config(max_steps=steps, warmup_steps=4, lr=1e-3, min_lr=1e-4, eval_interval=6, log_interval=1)

    for name in ("straight", "split"):
        train(config(12), run_name=name)
    notes = []

    def collect(event):
        if event.kind == "info":
            notes.append(event.message)

    straight = train(config(24), run_name="straight", resume=True, on_event=collect)
    (note,) = [n for n in notes if "learning rate" in n]
    assert "12 to 24 steps" in note and "over the next 4 steps" in note
    lrs, longer = _lrs(straight.run_dir), config(24).train
    last = learning_rate(11, config(12).train)  # the LR of the finished run's last step, near min_lr
    assert lrs[12] == pytest.approx(last) and f"from {last:.1e} to {lrs[16]:.1e}" in note
    assert lrs[13] == pytest.approx(last + (learning_rate(12, longer) - last) / 4)
    assert lrs[13] < lrs[14] < lrs[15] < lrs[16] == pytest.approx(learning_rate(15, longer))
    assert lrs[24] == pytest.approx(learning_rate(23, longer))

    stop = StopFlag()
    first = train(config(24), run_name="split", resume=True, on_event=_stop_at(14, stop), stop=stop)
    assert first.steps == 14
    notes.clear()
    train(config(24), run_name="split", resume=True, on_event=collect)  # same schedule: no new climb, no note
    assert not [n for n in notes if "learning rate" in n]
    assert _losses(straight.run_dir) == _losses(first.run_dir)
    assert _lrs(straight.run_dir) == _lrs(first.run_dir)

    # audit: extended by fewer steps than the climb takes, the note promised a climb to the longer schedule's LR
    notes.clear()
    short = train(config(26), run_name="straight", resume=True, on_event=collect)
    (note,) = [n for n in notes if "learning rate" in n]
    peak = max(_lrs(short.run_dir)[s] for s in (25, 26))
    assert f"to {peak:.1e} over the next" in note


def test_weight_decay_only_on_matrices():
    from tinygpt_cli.model import GPT

    cfg = tiny_config()
    optimizer = make_optimizer(GPT(cfg.model), cfg.train)
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == cfg.train.weight_decay and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])


def test_a_checkpoint_pruned_while_it_is_loaded_gives_way_to_the_new_latest(with_shakespeare, monkeypatch):
    """With --keep-last 1, eval or generate of a run that trains could find step N, then meet it pruned: "has no
    model.safetensors: the checkpoint is incomplete" (audit). The load looks up the run's latest again, once."""
    import shutil

    run = train(tiny_config(max_steps=2, eval_interval=1, keep_last=0), run_name="pruned").run_dir
    (run / "checkpoints" / "latest").write_text("step_1\n")
    real = ckpt.resolve_checkpoint

    def found_then_pruned(spec):
        found = real(spec)
        if found.name == "step_1":  # the training saves step 2, points latest at it and prunes step 1
            (run / "checkpoints" / "latest").write_text("step_2\n")
            shutil.rmtree(found)
        return found

    monkeypatch.setattr(ckpt, "resolve_checkpoint", found_then_pruned)
    loaded = ckpt.load_checkpoint("pruned")
    assert loaded.path.name == "step_2" and loaded.state["step"] == 2
    (run / "checkpoints" / "step_2" / "state.json").write_text("{damaged")  # found again: the error, once
    calls = []
    monkeypatch.setattr(ckpt, "resolve_checkpoint", lambda spec: calls.append(spec) or real(spec))
    with pytest.raises(CheckpointError, match="state.json is corrupted"):
        ckpt.load_checkpoint(run / "checkpoints" / "step_2")
    assert len(calls) == 2
    (run / "checkpoints" / "step_2" / "state.json").write_text("[]")  # QA: JSON, no record: it gave no advice
    with pytest.raises(CheckpointError, match=r"state.json is corrupted \(it holds a list, not the checkpoint's "
                                              r"record\): "):
        ckpt.read_state(run / "checkpoints" / "step_2")


def test_metrics_are_closed_however_a_new_run_ends(with_shakespeare, workspace, monkeypatch):
    """metrics.jsonl stayed open when an error the loop did not name ended a run (code review); train() now closes
    it, before a run that saved nothing removes its files (Windows removes no open file)."""
    from tinygpt_cli import training as train_module

    handles = []
    real_init = train_module._Metrics.__init__

    def kept(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        handles.append(self.handle)

    def failing(self, step, metrics):
        raise TrainingError("a failure the loop does not name")

    monkeypatch.setattr(train_module._Metrics, "__init__", kept)
    monkeypatch.setattr(train_module._Trainer, "_eval_and_save", failing)
    with pytest.raises(TrainingError, match="does not name"):
        train(tiny_config(max_steps=2, eval_interval=1), run_name="closed")
    assert handles and all(handle.closed for handle in handles)
    assert not (workspace / "runs" / "closed").exists()  # no checkpoint: its files went with it


def test_cpu_mfu_never_reads_over_100_percent(with_shakespeare, monkeypatch):
    """A CPU's peak is measured on two matmul shapes at the start; a run whose own matmuls went faster (GPT-2
    small's head shape, a quieter moment) read 102% MFU (audit). The best rate seen is the peak from then on."""
    from tinygpt_cli import training as train_module

    monkeypatch.setattr(train_module, "measured_cpu_peak", lambda dtype: 1e3)  # far under any real rate
    events = []
    train(tiny_config(max_steps=4, eval_interval=4, log_interval=1), run_name="mfu", on_event=events.append)
    readings = [e.mfu for e in events if e.kind == "step"]
    assert readings and all(0 < mfu <= 1.0 for mfu in readings)
    assert readings[0] == pytest.approx(1.0)


def test_corrupted_and_foreign_checkpoints(with_shakespeare, workspace):
    result = train(tiny_config(max_steps=2), run_name="c")
    weights = result.run_dir / "checkpoints" / "step_2" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="corrupted"):
        ckpt.load_checkpoint("c")
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2)}, str(weights))  # a valid file, but not ours
    with pytest.raises(CheckpointError, match="not a tinygpt model"):
        ckpt.load_checkpoint("c")
    with pytest.raises(CheckpointError, match="no run or checkpoint"):
        ckpt.load_checkpoint("missing-run")


def test_training_stops_on_repeated_non_finite_loss(with_shakespeare, monkeypatch):
    from tinygpt_cli import model as model_module

    def nan_loss(*args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True)

    monkeypatch.setattr(model_module, "chunked_cross_entropy", nan_loss)
    events = []
    with pytest.raises(TrainingError, match="non-finite loss or gradient.*lower train.lr .* start the run again"):
        train(tiny_config(max_steps=20, eval_interval=1000), run_name="nan", on_event=events.append)
    assert sum("skipped" in e.message for e in events if e.kind == "info") == 5


def test_a_nan_val_loss_is_never_saved_as_the_latest_checkpoint(with_shakespeare, workspace, monkeypatch):
    """--lr 1e9 trained finite steps into NaN weights: step_3 was saved, `latest` pointed at it, and the report's
    sample then failed blaming the dtype (found by an audit)."""
    from tinygpt_cli.training import _Trainer

    run = workspace / "runs" / "d"
    train(tiny_config(max_steps=2, eval_interval=2), run_name="d")
    monkeypatch.setattr(_Trainer, "_evaluate", lambda self, can_cut=False: float("nan"))
    with pytest.raises(TrainingError, match="val loss is nan at step 4, so that checkpoint is not saved.*"
                                            r"lower train.lr .* resume from its last checkpoint \(step 2: "
                                            r"`tinygpt train --resume --name d --lr 0.0002`\), or start a new run "
                                            r"from an earlier one \(--init-from runs/d/checkpoints/step_N\)"):
        train(tiny_config(max_steps=4, eval_interval=2), run_name="d", resume=True)
    assert ckpt.latest_checkpoint(run).name == "step_2" and not (run / "checkpoints" / "step_4").exists()


def test_a_fine_tune_records_the_checkpoint_it_started_from(with_shakespeare, workspace):
    """QA: config.yaml said `init_from: base` alone, so after base trained on, the same config started from other
    weights without a word, and `runs rm base` did not say that a run had started from it. The checkpoint loaded is
    pinned when the run starts and recorded (state.json, report.md, the start line); a resume keeps it."""
    from test_cli import invoke

    base = train(tiny_config(max_steps=2, eval_interval=1), run_name="base").run_dir
    notes = []
    tuned = train(tiny_config(max_steps=1, init_from="base"), run_name="tuned",
                  on_event=lambda e: notes.append(e.message) if e.kind == "info" else None)
    pinned = str(base / "checkpoints" / "step_2")
    assert ckpt.read_state(ckpt.latest_checkpoint(tuned.run_dir))["init_from_checkpoint"] == pinned
    assert any(note.startswith("Starting from base (base's step_2): ") for note in notes if note)
    assert f"| started from | base (checkpoint {pinned}) |" in (tuned.run_dir / "report.md").read_text()
    train(tiny_config(max_steps=3, eval_interval=1), run_name="base", resume=True)  # base trains on: not pinned
    train(tiny_config(max_steps=2, init_from="base"), run_name="tuned", resume=True)
    assert ckpt.read_state(ckpt.latest_checkpoint(tuned.run_dir))["init_from_checkpoint"] == pinned
    assert f"(checkpoint {pinned})" in (tuned.run_dir / "report.md").read_text()
    shown = invoke("runs", "rm", "base")  # stdin is no terminal: says what goes, deletes nothing
    assert "note: 1 run started from it (tuned): their config.yaml names weights that go with it" in shown.stderr
    assert base.is_dir()


def test_init_from_a_run_and_an_exported_hf_folder(with_shakespeare, workspace):
    from dataclasses import replace

    from tinygpt_cli.export import export_model

    train(tiny_config(max_steps=30, eval_interval=30, lr=3e-3), run_name="base")
    scratch = _losses(train(tiny_config(max_steps=2, eval_interval=2), run_name="scratch").run_dir)[0][2]
    cfg = tiny_config(max_steps=2, eval_interval=2, init_from="base")
    notes = []
    tuned = train(cfg, run_name="tuned", on_event=lambda e: notes.append(e.message) if e.kind == "info" else None)
    first = _losses(tuned.run_dir)[0][2]
    assert first < scratch - 1.0  # starts where base left off, not from ln(vocab)
    exported = export_model("base", "hf", workspace / "hf-base")
    via_hf = train(replace(cfg, train=replace(cfg.train, init_from=str(exported.path))), run_name="via-hf")
    # the HF folder drops the 47 padding rows of the vocabulary (they come back as zeros), so the softmax
    # denominators differ very slightly from the run's own
    assert _losses(via_hf.run_dir)[0][2] == pytest.approx(first, abs=1e-2)
    saved = (tuned.run_dir / "config.yaml").read_text()
    assert "init_from: base" in saved
    # audit: the run was labelled with --size though its shape is the source's. base's shape (2 layers × 32) is
    # no preset's, so the label stays the --size that gave the training settings, and a note says so
    assert "size: micro" in saved
    # (QA: "--size micro gives only…" read as if --size had been given, where it was the default)
    assert "the weights of base are 2 layers × 32 (no preset size): the training settings are the micro preset's " \
           "(--size chooses them)" in notes
    notes.clear()
    from tinygpt_cli.config import resolve_config

    quick = ["train.max_steps=1", "train.eval_batches=1", "train.batch_size=2"]
    train(resolve_config(size="micro", overrides=quick), run_name="preset")
    relabelled = train(resolve_config(size="tiny", overrides=[*quick, "train.init_from=preset"]),
                       on_event=lambda e: notes.append(e.message) if e.kind == "info" else None)
    assert relabelled.run_dir.name.startswith("micro-")  # the default name takes the weights' size
    assert "size: micro" in (relabelled.run_dir / "config.yaml").read_text()
    assert "(micro size): the training settings are the tiny preset's (--size chooses them; --size micro for its " \
           "own)" in notes[0]
    # audit: a shape the command asked for was dropped without a word, the weights trained as they are
    wider = tiny_config(max_steps=1, init_from="base")
    wider = replace(wider, model=replace(wider.model, n_layer=3))
    with pytest.raises(TrainingError, match=r"^--init-from base trains its weights' shape \(2 layers, 2 heads, 32 "
                                            r"wide\), not model.n_layer=3: drop those settings"):
        train(wider, run_name="wider")
    assert not (workspace / "runs" / "wider").exists()
    from tinygpt_cli.errors import ConfigError
    from tinygpt_cli.plan import plan

    with pytest.raises(ConfigError, match="not model.n_layer=3"):
        plan(wider)


def test_init_from_honours_a_model_setting_given_even_where_it_is_the_presets(with_shakespeare, workspace):
    """Audit: with --init-from, a model key the command line set to its preset's value was taken for the preset's
    and dropped: `--size micro --set model.block_size=128` trained at the weights' context, and a shape asked for
    trained as the weights' without a word. A setting given is now honoured (a shorter context) or refused."""
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.errors import TinyGPTError
    from tinygpt_cli.plan import plan

    train(tiny_config(max_steps=1, eval_interval=1), run_name="base")  # 2 layers × 32, context 32
    quick = ["train.max_steps=1", "train.eval_batches=1", "train.batch_size=2", "train.init_from=base"]
    for setting, refusal in (("model.block_size=128", "longer than the model's context of 32"),
                             ("model.n_layer=4", r"not model.n_layer=4: drop those settings")):
        cfg = resolve_config(size="micro", overrides=[*quick, setting])  # micro's own block_size and n_layer
        with pytest.raises(TinyGPTError, match=refusal):
            train(cfg, run_name="tuned")
        with pytest.raises(TinyGPTError, match=refusal):
            plan(cfg, device="cpu")
    assert not (workspace / "runs" / "tuned").exists()


def test_init_from_checks_the_data_against_the_weights_context_not_the_presets(with_shakespeare, workspace,
                                                                               tmp_path):
    """QA: `--init-from RUN --size micro` on a dataset whose val split holds 34 to 129 tokens was refused for micro's
    context of 128 ("fewer than the 130 a context of 128 needs"), though the run trains at its weights' context of
    32; with more data the same command trained at 32. A context given is still checked before the weights load."""
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.data import tokenize
    from tinygpt_cli.errors import DataError
    from tinygpt_cli.training import run_config_of

    train(tiny_config(max_steps=1, eval_interval=1), run_name="base")  # 2 layers × 32, context 32
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"Document {i} says a few plain words about the weather today."})
                            + "\n" for i in range(400)))
    made = tokenize(str(docs), name="small", val_fraction=0.01)
    assert 34 <= made.meta["splits"]["val"]["tokens"] < 130, made.meta["splits"]
    quick = ["train.max_steps=1", "train.eval_batches=1", "train.batch_size=2", "train.init_from=base",
             "data.dataset=small"]
    result = train(resolve_config(size="micro", overrides=quick), run_name="tuned")
    assert result.steps == 1 and run_config_of(result.run_dir).model.block_size == 32
    with pytest.raises(DataError, match="fewer than the 130 a context of 128 needs"):
        train(resolve_config(size="micro", overrides=[*quick, "model.block_size=128"]), run_name="longer")


def test_what_counts_as_given_for_init_from(with_shakespeare, workspace):
    """Review: `given` held every key of a --config file, so a run's own config.yaml (which lists every key) given
    back with --init-from gpt2 fine-tuned at its pretraining lr, and a micro one refused gpt2's shape; and a config
    changed with dataclasses.replace after resolve_config kept the old `given`, so a context and an lr set that way
    were dropped. --set and flags count where they equal the preset; a file's values and later edits where they
    differ from it."""
    from dataclasses import replace

    import yaml

    from tinygpt_cli.config import dump_yaml, init_from_block_size, resolve_config, start_from
    from tinygpt_cli.export import pretrained_config

    gpt2 = pretrained_config("gpt2")
    saved = workspace / "saved.yaml"
    saved.write_text(dump_yaml(resolve_config(size="small")))
    cfg, notes = start_from(resolve_config(config_file=saved, overrides=["train.init_from=gpt2"]), gpt2)
    assert cfg.train.lr == 3e-5 and any("fine-tuning at lr 3e-05" in note for note in notes)
    micro = workspace / "micro.yaml"
    micro.write_text(dump_yaml(resolve_config(size="micro")))
    start_from(resolve_config(config_file=micro, overrides=["train.init_from=gpt2"]), gpt2)  # not refused
    edited = resolve_config(size="small")
    edited = replace(edited, model=replace(edited.model, block_size=256),
                     train=replace(edited.train, init_from="gpt2", lr=1e-4))
    assert init_from_block_size(edited) == 256
    assert start_from(edited, gpt2)[0].train.lr == 1e-4
    own = workspace / "own.yaml"
    own.write_text(yaml.safe_dump({"size": "small", "train": {"lr": 3e-5, "init_from": "gpt2"}}))
    assert start_from(resolve_config(config_file=own), gpt2)[0].train.lr == 3e-5
    floor = start_from(resolve_config(size="small", overrides=["train.init_from=gpt2", "train.min_lr=1e-4"]), gpt2)
    assert (floor[0].train.lr, floor[0].train.min_lr) == (1e-4, 1e-4)
    assert any("fine-tuning at a constant lr 0.0001, the train.min_lr given" in note for note in floor[1])


def test_init_from_fine_tunes_at_a_twentieth_of_the_presets_lr_unless_told(with_shakespeare, workspace):
    """Audit: `--init-from gpt2` with no --lr trained GPT-2 at micro's pretraining rate, 2e-3 (67 times what
    examples/finetune_from_gpt2.yaml uses), which overwrites what the weights know. A run started from weights
    takes a twentieth of the peak lr of its weights' preset (GPT-2 small: 3e-5) unless the lr is given."""
    import yaml

    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.plan import plan

    quick = ["train.max_steps=1", "train.eval_batches=1", "train.batch_size=2", "model.block_size=32"]
    train(resolve_config(size="micro", overrides=quick), run_name="base")  # micro's shape: lr 2e-3
    notes = []
    tuned = train(resolve_config(size="micro", overrides=[*quick, "train.init_from=base"]), run_name="tuned",
                  on_event=lambda e: notes.append(e.message) if e.kind == "info" else None)
    saved = yaml.safe_load((tuned.run_dir / "config.yaml").read_text())["train"]
    assert (saved["lr"], saved["min_lr"]) == (1e-4, 1e-5)
    assert any("fine-tuning at lr 0.0001, the micro preset's 0.002 over 20" in note for note in notes)
    told = train(resolve_config(size="micro", overrides=[*quick, "train.init_from=base", "train.lr=5e-4"]),
                 run_name="told")
    saved = yaml.safe_load((told.run_dir / "config.yaml").read_text())["train"]
    assert (saved["lr"], saved["min_lr"]) == (5e-4, 5e-5)
    kept_floor = train(resolve_config(size="micro", overrides=[*quick, "train.init_from=base", "train.min_lr=0"]),
                       run_name="floor")
    assert yaml.safe_load((kept_floor.run_dir / "config.yaml").read_text())["train"]["min_lr"] == 0
    # gpt2's shape is small's: plan shows that size (it said "micro") and the fine-tuning rate (offline: no weights)
    planned = plan(resolve_config(size="micro", overrides=["train.init_from=gpt2"]), device="cpu")
    assert planned.size == "small"
    assert any("fine-tuning at lr 3e-05, the small preset's 0.0006 over 20" in note for note in planned.notes)


def test_init_from_is_recorded_so_that_it_names_the_same_weights_from_any_folder(with_shakespeare, workspace,
                                                                                 tmp_path, monkeypatch):
    """Audit: config.yaml kept --init-from as typed, relative to the folder it was typed in: the run's config.yaml
    given back as --config from another folder failed ("no run ... at exports/base-hf"), and a resume naming the
    same folder by its absolute path was refused. report.md did not say where the run started from."""
    import yaml

    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.export import export_model

    train(tiny_config(max_steps=1, eval_interval=1), run_name="base")
    folder = export_model("base", "hf", workspace / "exp" / "base-hf").path
    monkeypatch.chdir(workspace)
    tuned = train(tiny_config(max_steps=1, eval_interval=1, init_from="exp/base-hf"), run_name="tuned")
    assert yaml.safe_load((tuned.run_dir / "config.yaml").read_text())["train"]["init_from"] == str(folder)
    assert f"| started from | {folder} |" in (tuned.run_dir / "report.md").read_text()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    again = train(resolve_config(config_file=tuned.run_dir / "config.yaml"), run_name="again")
    assert yaml.safe_load((again.run_dir / "config.yaml").read_text())["train"]["init_from"] == str(folder)
    train(tiny_config(max_steps=2, eval_interval=1, init_from=str(folder)), run_name="tuned", resume=True)
    assert ckpt.latest_checkpoint(tuned.run_dir).name == "step_2"
    monkeypatch.chdir(workspace)  # review: a resume naming it relatively wrote the relative name back
    train(tiny_config(max_steps=3, eval_interval=1, init_from="exp/base-hf"), run_name="tuned", resume=True)
    assert yaml.safe_load((tuned.run_dir / "config.yaml").read_text())["train"]["init_from"] == str(folder)
    named = train(tiny_config(max_steps=1, eval_interval=1, init_from="base"), run_name="named")
    assert "init_from: base\n" in (named.run_dir / "config.yaml").read_text()  # a run's name stays a name
    # review: the same run named by its path was refused on resume as another source
    train(tiny_config(max_steps=2, eval_interval=1, init_from="runs/base"), run_name="named", resume=True)


def test_a_fine_tune_measures_the_val_loss_it_starts_from(with_shakespeare, workspace):
    """Audit: metrics.jsonl of a fine-tune had no point before its first step (nanoGPT evaluates iteration 0),
    so nothing showed what it gained. Its step 0 is the source's val loss; a run from scratch has none."""
    base = train(tiny_config(max_steps=4, eval_interval=4), run_name="base")
    first = json.loads((base.run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "train"
    events = []
    tuned = train(tiny_config(max_steps=2, eval_interval=2, init_from="base"), run_name="tuned",
                  on_event=events.append)
    rows = [json.loads(line) for line in (tuned.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kind"] == "eval" and rows[0]["step"] == 0 and rows[0]["tokens"] == 0
    assert rows[0]["val_loss"] == pytest.approx(base.final_val_loss, abs=1e-4)  # the same weights, the same sample
    assert [e.step for e in events if e.kind == "eval"] == [0, 2]
    assert tuned.best_val_loss == tuned.final_val_loss  # the start is no checkpoint's
    train(tiny_config(max_steps=4, eval_interval=2, init_from="base"), run_name="tuned", resume=True)
    rows = [json.loads(line) for line in (tuned.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 2, 4]


def test_a_non_finite_start_is_said_and_kept_out_of_metrics(with_shakespeare, workspace, monkeypatch):
    """Review: weights that score NaN at step 0 wrote a bare NaN (not JSON) into metrics.jsonl without a word."""
    from tinygpt_cli.training import _Trainer

    train(tiny_config(max_steps=1, eval_interval=1), run_name="base")
    real, calls = _Trainer._evaluate, []

    def nan_first(self, can_cut=False):
        calls.append(1)
        return float("nan") if len(calls) == 1 else real(self, can_cut)

    monkeypatch.setattr(_Trainer, "_evaluate", nan_first)
    events = []
    tuned = train(tiny_config(max_steps=1, eval_interval=1, init_from="base"), run_name="t", on_event=events.append)
    rows = [json.loads(line) for line in (tuned.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [1]
    assert any("the val loss of base is nan: its weights hold non-finite values" in (e.message or "")
               for e in events)


def test_train_lets_go_of_the_cpu_logits_buffer(with_shakespeare):
    """CPU audit: the fused loss's reused (2048 × 50304) fp32 buffer, 412 MB for micro, stayed alive after train()
    returned, held by a notebook or script that trains and then does other work."""
    from tinygpt_cli import model as model_module

    train(tiny_config(max_steps=1, eval_interval=1), run_name="b")
    assert not model_module._CPU_WORKSPACE.by_shape


def test_a_second_train_in_one_process_at_once_is_refused(with_shakespeare):
    """Library audit: two train() calls at once in threads of one process gave wrong losses (10.79 and 6.90 where
    each alone gives 10.72): torch's random stream, which seeds the weights and draws dropout, is the process's.
    The second is refused with what to do, and the first goes on unharmed."""
    import threading

    alone = train(tiny_config(max_steps=2, eval_interval=2), run_name="alone").final_loss
    inside, leave = threading.Event(), threading.Event()
    results = {}

    def hold(event):
        if event.kind == "step":
            inside.set()
            leave.wait(60)

    worker = threading.Thread(target=lambda: results.setdefault("first", train(
        tiny_config(max_steps=2, eval_interval=2, log_interval=1), run_name="first", on_event=hold)))
    worker.start()
    assert inside.wait(60)
    try:
        with pytest.raises(TrainingError, match=r"^another train\(\) is running in this process: torch's random "
                                                r"state is the process's, so two at once would change each "
                                                r"other's results; run them one after another, or in separate "
                                                r"processes$"):
            train(tiny_config(max_steps=2, eval_interval=2), run_name="second")
    finally:
        leave.set()
        worker.join(120)
    assert results["first"].final_loss == pytest.approx(alone, rel=1e-6)
    train(tiny_config(max_steps=2, eval_interval=2), run_name="third")  # one after another is fine


def test_init_from_gpt2_offline_is_one_clear_error(with_shakespeare, monkeypatch):
    from tinygpt_cli.errors import TinyGPTError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TinyGPTError, match=r"cannot download gpt2 \(openai-community/gpt2\).*connect to the internet"):
        train(tiny_config(max_steps=2, init_from="gpt2"), run_name="g")


def test_tf32_is_on_while_training_and_the_callers_after(monkeypatch):
    """Switched on for CUDA runs only, so no CPU test saw the switches put back (test audit): the context itself
    works without a GPU, after a return and after an error."""
    from tinygpt_cli import training as train_module

    for matmul, cudnn in ((False, False), (False, True)):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        with train_module._tf32_while_training():
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)
        with pytest.raises(ValueError), train_module._tf32_while_training():
            raise ValueError("a failed run")
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (matmul, cudnn)


def test_compiled_training_probes_the_real_step_and_keeps_the_curve(with_shakespeare, monkeypatch):
    """train.compile=on: the probe is a training step of the loop's shape (its gradients dropped), the compiled
    model takes its loss from whole logits, and the loss curve is the eager run's. An identity `torch.compile`
    stands in for inductor, which takes a minute on CPU."""
    calls = []

    def fake_compile(model, **kwargs):
        assert kwargs.get("dynamic") is False

        def compiled(idx, targets=None):
            calls.append((tuple(idx.shape), targets is not None, torch.is_grad_enabled(), model.fused_loss))
            return model(idx, targets)

        return compiled

    eager = train(tiny_config(max_steps=6, eval_interval=3), run_name="eager")
    monkeypatch.setattr(torch, "compile", fake_compile)
    events = []
    compiled = train(tiny_config(max_steps=6, eval_interval=3, compile="on"), run_name="compiled",
                     on_event=events.append)
    start = next(e for e in events if e.kind == "start")
    batch, block = start.data["batch_size"], 32
    assert start.data["compiled"]
    assert calls[0] == ((batch, block), True, True, False)  # the probe: a real training step
    assert all(not fused for *_, fused in calls)
    for (kind, step, loss), (kind2, step2, loss2) in zip(_losses(eager.run_dir), _losses(compiled.run_dir),
                                                         strict=True):
        assert (kind, step) == (kind2, step2) and loss2 == pytest.approx(loss, rel=1e-4)


def test_a_failing_compile_trains_eagerly_with_the_fused_loss(with_shakespeare, monkeypatch):
    def broken_compile(model, **kwargs):
        def compiled(idx, targets=None):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found in torch._inductor.config.cpp.cxx")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    events = []
    result = train(tiny_config(max_steps=2, eval_interval=2, compile="on"), run_name="fallback",
                   on_event=events.append)
    assert result.stopped == "completed"
    # packaging QA: it said only "(InductorError)", not that a C++ compiler was missing
    assert any("torch.compile unavailable (RuntimeError: InvalidCxxCompiler: No working C++ compiler found in "
               "torch._inductor.config.cpp.cxx; install a C and C++ compiler (gcc/g++, clang), or point CC/CXX at "
               "one): running eagerly." in (e.message or "") for e in events), [e.message for e in events]
    assert not next(e for e in events if e.kind == "start").data["compiled"]


def test_the_compile_probe_leaves_nothing_to_compile_at_step_one(with_shakespeare, monkeypatch):
    """Dynamo (with a backend that only counts graphs, for speed) traces the training step once, at the probe, and
    the no-grad eval step once: a probe whose inputs differ from the loop's (aliased, strided, another autocast)
    makes the first step compile everything again — about 15 s of a GPT-2 124M run on an H200."""
    graphs = []
    real_compile = torch.compile

    def counting_backend(graph_module, example_inputs):
        graphs.append(torch.is_grad_enabled())
        return graph_module.forward

    monkeypatch.setattr(torch, "compile", lambda model, **kw: real_compile(model, backend=counting_backend, **kw))
    torch._dynamo.reset()
    result = train(tiny_config(max_steps=4, eval_interval=2, compile="on"), run_name="dynamo")
    torch._dynamo.reset()
    assert result.stopped == "completed"
    assert graphs == [True, False]  # the training step (compiled by the probe), then evaluation


def test_the_probe_runs_through_the_ddp_wrapper_without_gradient_sync(monkeypatch):
    """Under torchrun the compiled model is wrapped (DDP) before the probe, so dynamo compiles inside DDP's forward
    and splits the graph at its buckets; the probe's step must not all-reduce, and leaves no gradients."""
    import contextlib

    from tinygpt_cli.config import ModelConfig
    from tinygpt_cli.model import GPT
    from tinygpt_cli.training import _maybe_compile

    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module, self.syncing, self.calls = module, True, []

        @contextlib.contextmanager
        def no_sync(self):
            self.syncing = False
            yield
            self.syncing = True

        def forward(self, idx, targets=None):
            self.calls.append(self.syncing)
            return self.module(idx, targets)

    compiled = []
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compiled.append(model) or model)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    wrapped = _maybe_compile(model, "on", torch.device("cpu"), lambda event: None, (2, 8), torch.float32,
                             wrap=FakeDDP)
    assert isinstance(wrapped, FakeDDP) and wrapped.module is model and compiled == [model]
    assert wrapped.calls == [False]  # one probe step, inside no_sync
    assert all(p.grad is None for p in model.parameters()) and not model.fused_loss
    eager = _maybe_compile(model, "off", torch.device("cpu"), lambda event: None, (2, 8), torch.float32, wrap=FakeDDP)
    assert isinstance(eager, FakeDDP) and eager.calls == []


def test_the_largest_fitting_batch_leaves_room_for_the_compiled_loss(monkeypatch):
    """The trial runs eagerly with the fused loss and holds the whole-logits loss's bytes beside it."""
    from tinygpt_cli import training as train_module
    from tinygpt_cli.config import ModelConfig
    from tinygpt_cli.model import GPT

    held = []

    def hold(n_bytes, device):
        held.append(n_bytes)
        if n_bytes > 3 * 8 * 100:  # room for the ballast of 3 sequences of 8 tokens at 100 bytes a token
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(train_module, "_hold", hold)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    model.fused_loss = False
    fits = train_module.largest_fitting_batch(model, 16, 8, torch.device("cpu"), torch.float32, ballast_per_token=100)
    assert fits == 2 and held == [16 * 800, 8 * 800, 4 * 800, 2 * 800]
    assert model.fused_loss is False and all(p.grad is None for p in model.parameters())


def test_a_failed_batch_trial_frees_its_memory_before_the_next(monkeypatch):
    """After an out-of-memory trial its ballast and input stayed bound while the cache was emptied and while the
    halved trial allocated its own: `--batch-size auto` could reject a batch that fits (code review)."""
    import gc
    import weakref

    from tinygpt_cli import training as train_module
    from tinygpt_cli.config import ModelConfig
    from tinygpt_cli.model import GPT

    trials, alive_at_start = [], []

    def hold(n_bytes, device):
        gc.disable()  # freed by reference counts, as the CUDA caching allocator needs: not by a later collection
        alive_at_start.append(sum(ref() is not None for ref in trials))
        ballast = torch.empty(n_bytes, dtype=torch.uint8)
        trials.append(weakref.ref(ballast))
        return ballast

    class OutOfMemoryAbove2(GPT):
        def forward(self, idx, targets=None):
            if idx.shape[0] > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().forward(idx, targets)

    monkeypatch.setattr(train_module, "_hold", hold)
    model = OutOfMemoryAbove2(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    try:
        fits = train_module.largest_fitting_batch(model, 16, 8, torch.device("cpu"), torch.float32, 100)
    finally:
        gc.enable()
    assert fits == 2 and alive_at_start == [0, 0, 0, 0]


def test_the_cpu_peak_is_measured_once_per_process_and_thread_count(monkeypatch):
    from tinygpt_cli import training as train_module

    calls = []
    monkeypatch.setattr(train_module, "_CPU_PEAK", {})
    monkeypatch.setattr(train_module, "_matmul_peak", lambda size, repeats, dtype: calls.append(dtype) or 1e11)
    assert train_module.measured_cpu_peak() == train_module.measured_cpu_peak() == 1e11
    assert calls == [torch.float32]
    train_module.measured_cpu_peak(torch.bfloat16)  # bf16 training: MFU against bf16 matmuls (it read 83%)
    assert calls == [torch.float32, torch.bfloat16]


def test_auto_dtype_on_any_cpu_is_fp32(monkeypatch):
    """`--dtype auto` took bf16 autocast on a CPU with AVX-512 BF16, where it measured no faster than fp32 (a
    2-core EPYC: 1,290 against 1,371 tokens/s on micro), lost precision, and made train, plan and generate disagree
    (plan estimated fp32, generate cast its weights to bf16). Every command now takes fp32 on a CPU for auto."""
    from tinygpt_cli import training as train_module

    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: True)
    assert train_module.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert train_module.resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_a_warmup_longer_than_the_run_is_said(with_shakespeare):
    """`--size small --max-steps 100` warms up over 700 steps: the LR reached 14% of train.lr, without a word."""
    events = []
    train(tiny_config(max_steps=3, eval_interval=1000, warmup_steps=30), run_name="w", on_event=events.append)
    notes = [e.message for e in events if e.kind == "info" and "warmup" in (e.message or "")]
    assert notes == ["train.warmup_steps is 30, and the run is 3 steps: the learning rate climbs to 10% of "
                     "train.lr and never decays; e.g. --set train.warmup_steps=1."]
    events.clear()
    # audit: "the run is 1 steps", and a warmup of 1 advised where it was 1 already
    train(tiny_config(max_steps=1, eval_interval=1000, warmup_steps=1), run_name="w1", on_event=events.append)
    assert not [e for e in events if e.kind == "info" and "warmup" in (e.message or "")]
    train(tiny_config(max_steps=20, eval_interval=1000, warmup_steps=30), run_name="w20", on_event=events.append)
    assert [e.message for e in events if e.kind == "info" and "warmup" in (e.message or "")] == [
        "train.warmup_steps is 30, and the run is 20 steps: the learning rate climbs to 67% of train.lr and never "
        "decays; e.g. --set train.warmup_steps=2 warms up over a tenth of it."]
    events.clear()
    train(tiny_config(max_steps=30, eval_interval=1000, warmup_steps=3), run_name="w2", on_event=events.append)
    assert not [e for e in events if e.kind == "info" and "warmup" in (e.message or "")]


def test_emulated_bf16_on_cpu_is_said(with_shakespeare, monkeypatch):
    """--dtype bf16 trained ~10x slower than fp32 on a CPU without native bf16, without a word (audit)."""
    from tinygpt_cli import training as train_module

    monkeypatch.setattr(train_module, "cpu_has_native_bf16", lambda: False)
    events = []
    cfg = tiny_config(max_steps=1, eval_interval=1000, dtype="bf16", device="cpu")
    train(cfg, run_name="b", on_event=events.append)
    assert any("bf16 on this CPU is emulated" in (e.message or "") for e in events)



def test_tokens_per_second_leaves_out_evaluations_between_log_steps(with_shakespeare, workspace, monkeypatch):
    """The rate divided every token since the last log by the time since the last evaluation: with evaluations
    every 3 steps and logs every 4, it read up to 4× too fast, and MFU over 100% (audit). A clock that moves 1 s a
    batch fetched and 100 s an evaluation: every logged rate is the steps' tokens over their seconds."""
    import time as time_module

    from tinygpt_cli import training as train_module

    clock = [0.0]

    def perf_counter():  # a microsecond a reading, so that nothing divides by zero
        clock[0] += 1e-6
        return clock[0]

    monkeypatch.setattr(time_module, "perf_counter", perf_counter)
    real_get_batch, real_eval = train_module.get_batch, train_module._Trainer._eval_and_save

    def get_batch(*args):
        clock[0] += 1.0
        return real_get_batch(*args)

    def eval_and_save(self, *args):
        real_eval(self, *args)
        clock[0] += 100.0

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    monkeypatch.setattr(train_module._Trainer, "_eval_and_save", eval_and_save)
    train(tiny_config(max_steps=12, eval_interval=3, log_interval=4), run_name="r")
    rows = [json.loads(line) for line in (workspace / "runs" / "r" / "metrics.jsonl").read_text().splitlines()]
    rates = [row["tokens_per_s"] for row in rows if row["kind"] == "train"]
    per_step = 4 * 32  # train.batch_size × model.block_size of the tiny config, one batch a step
    assert len(rates) == 3 and all(0.75 * per_step <= rate <= per_step for rate in rates), rates


def test_every_window_of_the_split_is_drawn_the_last_included():
    """The last start (len - block - 1) was never drawn, so the split's last token was never a target (ML review)."""
    import numpy as np

    from tinygpt_cli.training import get_batch, unigram_loss

    tokens = np.arange(10, dtype=np.uint16)  # block 8: starts 0 and 1
    x, y = get_batch(tokens, 200, 8, np.random.default_rng(0), torch.device("cpu"))
    assert set(x[:, 0].tolist()) == {0, 1} and y[:, -1].max() == 9
    # the unigram baseline smooths over GPT-2's 50257 ids, not all 65536 a uint16 holds
    train_ids, val_ids = np.array([5] * 99, dtype=np.uint16), np.array([5], dtype=np.uint16)
    assert unigram_loss(train_ids, val_ids) == pytest.approx(-math.log(100 / (99 + 50257)))


# ------------------------------------------------------------------------------------------------ train.eval_task
def _task_file(tmp_path, task):
    from test_evaluate import HELLASWAG_ROWS, LAMBADA_ROWS

    rows = LAMBADA_ROWS if task == "lambada_openai" else HELLASWAG_ROWS
    path = tmp_path / f"{task}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * 2), encoding="utf-8")
    return path


@pytest.mark.parametrize("task", ["lambada_openai", "hellaswag"])
def test_a_task_scored_during_training_is_the_eval_of_its_checkpoint(with_shakespeare, workspace, tmp_path, task):
    """train.eval_task scores HellaSwag or LAMBADA at each evaluation, as llm.c does HellaSwag: into metrics.jsonl
    (and so the trackers) and the progress lines, the same figures `tinygpt eval --task` gives that checkpoint."""
    from test_cli import invoke

    from tinygpt_cli.evaluation import evaluate_task

    data = _task_file(tmp_path, task)
    result = invoke("train", "--size", "micro", "--name", "t", "--max-steps", "4",
                    *[arg for key in ("n_layer=2", "n_head=2", "n_embd=32", "block_size=32") for arg in
                      ("--set", f"model.{key}")],
                    "--set", "train.batch_size=4", "--set", "train.eval_interval=2", "--set", "train.eval_batches=2",
                    "--set", f"train.eval_task={task}", "--set", f"train.eval_task_data={data}",
                    "--set", "train.eval_task_limit=6")
    assert result.exit_code == 0, result.output
    run = workspace / "runs" / "t"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if r["kind"] == task]
    assert [r["step"] for r in scored] == [2, 4] and all(r["examples"] == 6 for r in scored)
    for record in scored:
        expected = evaluate_task(run / "checkpoints" / f"step_{record['step']}", task=task, task_data=data, limit=6,
                                 record=False)
        figure = "perplexity" if task == "lambada_openai" else "accuracy_norm"
        assert (record["accuracy"], record[figure]) == pytest.approx((expected.accuracy, getattr(expected, figure)))
    assert f"Scoring {task} zero-shot at each evaluation: 6 examples from {data}" in result.stderr
    shown = "perplexity" if task == "lambada_openai" else "acc_norm"
    assert f"step 4: {task}: " in result.stderr and shown in result.stderr and "on 6 examples" in result.stderr
    report = (run / "report.md").read_text()
    assert f"| {task} (zero-shot, train.eval_task) | " in report and "on 6 examples at step 4 |" in report
    listed = json.loads(invoke("runs", "--json").stdout)[0]["task"]  # for a sweep's `runs --json | jq`
    assert listed == scored[-1]


@pytest.mark.parametrize(("settings", "fragment"), [
    (["train.eval_task=mmlu"], "train.eval_task: unknown task 'mmlu': choose one of hellaswag, lambada_openai, "
                               "arc_easy, arc_challenge, several comma-separated, or all"),
    (["train.eval_task=hellaswag,mmlu"], "train.eval_task: unknown task 'mmlu'"),
    (["train.eval_task=all", "train.eval_task_data=h.jsonl"], "train.eval_task_data is one task's examples, and "
     "train.eval_task names several (hellaswag,lambada_openai,arc_easy,arc_challenge): name one task with its file"),
    (["train.eval_task_limit=5"], "train.eval_task_limit and train.eval_task_data go with train.eval_task"),
    (["train.eval_task=hellaswag", "train.eval_task_limit=-1"], "train.eval_task_limit must be 0 or more"),
    (["train.eval_task_limit=-1"], "train.eval_task_limit must be 0 or more"),  # QA: "go with train.eval_task"
    (["train.grad_clip=-1"], "train.grad_clip must be 0 or more (got -1; 0 turns it off)"),  # QA: named both keys
    (["train.eval_task=hellaswag"], "could not load HellaSwag from the Hugging Face hub"),  # offline, no copy
    # review: it named eval's --task-data, not the setting that takes a local copy in training
    (["train.eval_task=ARC_Challenge"], "cache it, or set train.eval_task_data=PATH to a local .jsonl/.json/.parquet"),
    (["train.eval_task=lambada_openai", "train.eval_task_data=nope.jsonl"], "nope.jsonl does not exist"),
])
def test_a_task_that_cannot_be_scored_stops_training_before_it_starts(with_shakespeare, workspace, settings,
                                                                       fragment):
    from test_cli import assert_one_line_error, invoke

    sets = [arg for setting in settings for arg in ("--set", setting)]
    assert_one_line_error(invoke("train", "--size", "micro", "--name", "t", "--max-steps", "2", *sets), fragment)
    assert not (workspace / "runs" / "t").exists()


def test_several_tasks_are_scored_at_each_evaluation(with_shakespeare, workspace, monkeypatch):
    """train.eval_task=a,b (or all), as `tinygpt eval --task` takes them: each task is loaded before training and
    scored at each evaluation, in the order named, into metrics.jsonl, the report and `runs --json`."""
    from test_cli import invoke
    from test_evaluate import ARC_ROWS, LAMBADA_ROWS

    from tinygpt_cli import evaluation
    from tinygpt_cli.config import TrainConfig

    assert TrainConfig(eval_task=" ARC_easy, hellaswag,arc_easy").eval_task == "arc_easy,hellaswag"
    assert TrainConfig(eval_task="all").eval_task == "hellaswag,lambada_openai,arc_easy,arc_challenge"
    hub = {"lambada_openai": LAMBADA_ROWS, "arc_challenge": ARC_ROWS}  # the hub, as a cached copy gives it
    loaded = []
    monkeypatch.setattr(evaluation, "_hub_rows", lambda task, limit, option: (
        loaded.append(task.name) or hub[task.name][:limit], f"hub {task.name}"))
    result = invoke("train", *TINY_SETTINGS, "--name", "t", "--max-steps", "4",
                    "--set", "train.eval_task=arc_challenge,lambada_openai", "--set", "train.eval_task_limit=3")
    assert result.exit_code == 0, result.output
    assert loaded == ["arc_challenge", "lambada_openai"]  # once each, before the first step
    run = workspace / "runs" / "t"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    scored = [(r["kind"], r["step"]) for r in records if r["kind"] not in ("train", "eval")]
    assert scored == [("arc_challenge", 2), ("lambada_openai", 2), ("arc_challenge", 4), ("lambada_openai", 4)]
    assert "step 4: arc_challenge: acc_norm" in result.stderr and "step 4: lambada_openai: acc" in result.stderr
    report = (run / "report.md").read_text()
    rows = [line.split(" |")[0] for line in report.splitlines() if "(zero-shot, train.eval_task)" in line]
    assert rows == ["| arc_challenge (zero-shot, train.eval_task)", "| lambada_openai (zero-shot, train.eval_task)"]
    listed = json.loads(invoke("runs", "--json").stdout)[0]
    last = {kind: record for record in records if (kind := record["kind"]) not in ("train", "eval")}
    assert listed["tasks"] == [last["arc_challenge"], last["lambada_openai"]] and listed["task"] == listed["tasks"][0]


def test_a_task_file_given_relative_is_found_from_any_folder_on_resume(with_shakespeare, workspace, tmp_path,
                                                                        monkeypatch):
    """Review: train.eval_task_data typed relative was kept so in config.yaml, and a resume from another folder
    stopped at "task data lam.jsonl does not exist: check the --task-data path" (an option train does not have)."""
    from conftest import TINY_OVERRIDES
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.training import run_config_of

    data = _task_file(tmp_path, "lambada_openai")
    monkeypatch.chdir(tmp_path)
    settings = [*TINY_OVERRIDES, "train.eval_task=lambada_openai", f"train.eval_task_data={data.name}"]
    train(resolve_config(size="micro", overrides=[*settings, "train.max_steps=2"]), run_name="rel")
    run = workspace / "runs" / "rel"
    assert run_config_of(run).train.eval_task_data == str(data)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = train(resolve_config(config_file=run / "config.yaml", overrides=["train.max_steps=4"]), run_name="rel",
                    resume=True)
    assert resumed.steps == 4
    with pytest.raises(Exception, match="check the train.eval_task_data path"):
        train(resolve_config(size="micro", overrides=[*settings, "train.max_steps=2"]), run_name="rel2")


def test_a_stop_while_a_task_is_scored_ends_the_scoring_not_the_checkpoint(with_shakespeare, workspace, tmp_path,
                                                                            monkeypatch):
    """Review: Ctrl-C during train.eval_task's scoring (all of HellaSwag on a CPU: minutes) waited for all of it.
    One process ends it at the next batch; the step's checkpoint was saved before it began."""
    from conftest import TINY_OVERRIDES
    from tinygpt_cli import evaluation
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.training import StopFlag

    data = _task_file(tmp_path, "lambada_openai")
    stop = StopFlag()
    real = evaluation._score_continuations

    def scoring(*args, **kwargs):
        stop.reason = "interrupted"  # Ctrl-C as the first batch is scored
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "_score_continuations", scoring)
    events = []
    cfg = resolve_config(size="micro", overrides=[*TINY_OVERRIDES, "train.eval_task=lambada_openai",
                                                  f"train.eval_task_data={data}", "train.max_steps=6"])
    result = train(cfg, run_name="cut", stop=stop, on_event=events.append)
    assert result.stopped == "interrupted" and result.steps == 2
    assert "lambada_openai of step 2 cut short by the stop" in " ".join(e.message for e in events)
    kinds = [json.loads(line)["kind"] for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "lambada_openai" not in kinds
    assert ckpt.latest_checkpoint(result.run_dir).name == "step_2"


def test_the_val_sample_is_the_same_whatever_the_seed_or_micro_batch(with_shakespeare, workspace, monkeypatch):
    """QA: the val windows were drawn from train.seed, and a batch at a time: a seed sweep (or a batch-size one)
    measured each run on other text, a spread of 0.03 nats on one checkpoint, as large as the gaps it compared. A
    run saved before keeps its own sample on a resume, so that its val curve goes on comparable."""
    from tinygpt_cli import training
    from tinygpt_cli.training import val_sample_starts

    eight = val_sample_starts(10_000, 32, 8, 4)
    assert [len(batch) for batch in eight] == [8] * 4
    four = val_sample_starts(10_000, 32, 4, 8)
    assert all((a == b).all() for a, b in zip(eight, [np.concatenate(four[i:i + 2]) for i in range(0, 8, 2)],
                                              strict=True))
    assert (val_sample_starts(10_000, 32, 16, 4)[0][:8] == eight[0]).all()  # a larger batch: the same windows first

    drawn = []
    original = training.val_sample_starts
    monkeypatch.setattr(training, "val_sample_starts", lambda *args: drawn.append(args) or original(*args))
    one = train(tiny_config(max_steps=2, seed=1), run_name="one")
    two = train(tiny_config(max_steps=2, seed=2), run_name="two")
    assert drawn[0] == drawn[1] and drawn[0][-1] is None  # no seed in it
    assert one.final_val_loss != two.final_val_loss  # other weights, the same windows
    state_file = one.run_dir / "checkpoints" / "step_2" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["val_sample"] == "fixed-windows"
    del state["data"]["val_sample"]  # a run saved before: its seed's sample, kept by every later checkpoint
    state_file.write_text(json.dumps(state))
    train(tiny_config(max_steps=4, seed=1), run_name="one", resume=True)
    assert drawn[-1][-1] == 1
    assert "val_sample" not in json.loads((one.run_dir / "checkpoints" / "step_4" / "state.json").read_text())["data"]


def test_data_seed_orders_the_batches_apart_from_the_weights_seed(with_shakespeare, workspace, monkeypatch):
    """QA: one seed set both the initial weights and the batch order, so a study of either alone (the same weights
    on other batches; other weights on the same batches) could not be run. train.data_seed orders the batches;
    unset (-1), it is train.seed, as before."""
    from safetensors.torch import load_file

    from tinygpt_cli import training

    drawn: list[tuple[str, int]] = []
    original = training._batch_generator
    name = ""
    monkeypatch.setattr(training, "_batch_generator",
                        lambda seed, *rest: drawn.append((name, seed)) or original(seed, *rest))

    def run(run_name: str, **keys):
        nonlocal name
        name = run_name
        return train(tiny_config(max_steps=1, eval_interval=1, lr=1e-12, min_lr=0.0, warmup_steps=0, **keys),
                     run_name=run_name).run_dir

    def weights(run_dir):
        return load_file(str(run_dir / "checkpoints" / "step_1" / "model.safetensors"))

    plain = run("plain", seed=5)
    same_weights = run("same-weights", seed=5, data_seed=9)
    same_batches = run("same-batches", seed=6, data_seed=5)
    assert {seed for run_name, seed in drawn if run_name == "plain"} == {5}  # unset: train.seed, as before
    assert {seed for run_name, seed in drawn if run_name == "same-weights"} == {9}
    assert {seed for run_name, seed in drawn if run_name == "same-batches"} == {5}
    first, second, third = weights(plain), weights(same_weights), weights(same_batches)  # lr 1e-12: initial weights
    assert all(torch.allclose(first[key], second[key], rtol=0, atol=1e-9) for key in first)
    assert not torch.equal(first["transformer.wte.weight"], third["transformer.wte.weight"])
    with pytest.raises(ConfigError, match=r"train\.data_seed must be -1 \(train\.seed\) or 0 to"):
        tiny_config(data_seed=-2)


def test_the_same_run_twice_writes_the_same_weights_file(with_shakespeare, workspace):
    """QA: two runs with the same seed wrote model.safetensors files that differed at byte 27 (safetensors writes
    its metadata in a Rust HashMap's order, which changes at each save), so a reproduction could not be checked
    with sha256. The tensors were equal; now the files are too."""
    import hashlib

    digests = set()
    for name in ("first", "second", "third"):
        run_dir = train(tiny_config(max_steps=1, eval_interval=1), run_name=name).run_dir
        digests.add(hashlib.sha256((run_dir / "checkpoints" / "step_1" / "model.safetensors").read_bytes()).digest())
    assert len(digests) == 1


def test_a_sweep_in_one_process_keeps_compiling(monkeypatch):
    """API QA: a notebook's sweep over model sizes in one process hit dynamo's recompile limit (8 graphs of
    GPT.forward, two a shape) at its fifth run, which then trained eagerly on the slow loss path, in silence. Past
    COMPILED_SHAPES_KEPT shapes dynamo's caches are emptied; a shape seen again keeps its graphs."""
    import torch._dynamo

    from tinygpt_cli import training

    resets = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(len(training._COMPILED_SHAPES)))
    monkeypatch.setattr(training, "_COMPILED_SHAPES", [])
    for key in ("a", "b", "a", "c", "c", "d", "a"):
        training._make_room_to_compile((key,))
    assert resets == [3] and training._COMPILED_SHAPES == [("d",), ("a",)]
    config = torch._dynamo.config
    assert (getattr(config, "recompile_limit", None) or config.cache_size_limit) > 2 * training.COMPILED_SHAPES_KEPT


def test_train_runs_as_its_config_says_whatever_the_callers_torch_state(with_shakespeare, workspace):
    """API QA: after a notebook's inference cell (`inference_mode`, grad off) train() failed with "element 0 of
    tensors does not require grad"; under a float64 default dtype the fused loss failed; under an outer autocast an
    fp32 run trained in bf16, in silence; and load_checkpoint gave float64 weights. The caller's state comes back."""
    cfg = tiny_config(max_steps=2, eval_interval=2)
    reference = train(cfg, run_name="ref").final_loss
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            result = train(cfg, run_name="odd")
            assert torch.is_inference_mode_enabled() and torch.get_default_dtype() == torch.float64
            assert torch.is_autocast_enabled("cpu")
        assert next(ckpt.load_checkpoint("odd").model.parameters()).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
    assert result.final_loss == pytest.approx(reference, rel=1e-6)


def test_a_wsd_decay_inside_the_warmup_is_said(with_shakespeare):
    """ML QA: a WSD decay that began under a long warmup made the LR fall 22% in one step at the warmup's end, and
    nothing said so. (The schedule stays as runs trained with it: a resume goes on with the same curve.)"""
    events = []
    train(tiny_config(max_steps=20, warmup_steps=10, schedule="wsd", decay_fraction=0.6), run_name="w",
          on_event=events.append)
    notes = [e.message for e in events if e.kind == "info" and "WSD decay" in e.message]
    assert notes == ["the WSD decay starts at step 8, inside the warmup (train.warmup_steps 10): the learning rate "
                     "falls 22% at once when the warmup ends; lower train.warmup_steps or train.decay_fraction."]
