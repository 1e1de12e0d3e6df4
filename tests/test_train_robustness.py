"""Never lose work: kill -9 at random moments, full disks, unwritable folders, time and token limits."""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import invoke

from conftest import TINY_SETTINGS, assert_one_line_error, tiny_config, wait_for
from tinygpt_cli import checkpoint as ckpt
from tinygpt_cli.errors import TrainingError
from tinygpt_cli.training import train


def _train_command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "tinygpt_cli", "train", *TINY_SETTINGS, *extra]


@pytest.fixture
def reaped():
    """`reaped(process)` returns the process, and kills it when the test ends if it is still running (a failed
    assertion, a timeout): a 100,000-step training must never outlive its test and slow the rest of the suite."""
    processes = []

    def keep(process: subprocess.Popen) -> subprocess.Popen:
        processes.append(process)
        return process

    yield keep
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_kill_minus_9_always_leaves_a_loadable_checkpoint(with_shakespeare, workspace, reaped):
    """SIGKILL a training process at random moments (checkpointing every step); every time the latest
    checkpoint loads and the run resumes, and in the end it completes."""
    rng = random.Random(0)
    env = {**os.environ, "TINYGPT_HOME": str(workspace)}
    args = ["--name", "k", "--max-steps", "60", "--set", "train.eval_interval=1", "--set", "train.eval_batches=1"]
    resume: list[str] = []
    kills, saved = 0, 0
    run = workspace / "runs" / "k"
    for _ in range(4):
        if saved == 60:
            break
        process = reaped(subprocess.Popen(_train_command(*args, *resume), env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        # past the imports and the resume, into training: the kill lands among its steps and saves
        wait_for(process, lambda saved=saved: (ckpt.latest_step(run) or 0) > saved, "a new checkpoint")
        time.sleep(rng.uniform(0.0, 1.5))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        latest = ckpt.latest_checkpoint(run)
        assert latest is not None
        loaded = ckpt.load_checkpoint(str(run))
        assert loaded.state["step"] > saved
        saved = loaded.state["step"]
        ckpt.load_optimizer_state(latest)
        resume = ["--resume"]
    assert kills >= 2
    finished = subprocess.run(_train_command(*args, "--resume"), env=env, capture_output=True, text=True,
                              timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert json.loads((workspace / "runs" / "k" / "checkpoints" / "step_60" / "state.json").read_text())["step"] == 60
    leftovers = [p.name for p in (workspace / "runs" / "k" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # what the saves killed mid-write left was removed by the next training


def test_a_sigterm_before_the_first_step_says_what_is_kept(with_shakespeare, workspace):
    """A scheduler's SIGTERM while the run was loading its data (or compiling) killed it without a word: exit 143,
    nothing said. It is said as for Ctrl-C there, and the run's folder, with no checkpoint, is gone."""
    script = (
        "import os, signal, sys\n"
        "from tinygpt_cli import training\n"
        "from tinygpt_cli.cli import main\n"
        "real = training.prepare_dataset\n"
        "def signalled(*args, **kwargs):\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(*args, **kwargs)\n"
        "training.prepare_dataset = signalled\n"
        "sys.argv = ['tinygpt', *sys.argv[1:]]\n"
        "main()\n"
    )
    stopped = subprocess.run([sys.executable, "-c", script, "train", *TINY_SETTINGS, "--name", "early",
                              "--max-steps", "5"], env={**os.environ, "TINYGPT_HOME": str(workspace)},
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert "Interrupted before the run's first checkpoint: nothing is kept; start it again" in stopped.stderr
    assert "Traceback" not in stopped.stderr and not (workspace / "runs" / "early").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_finishes_the_step_and_saves(with_shakespeare, workspace, sig, reaped):
    """A scheduler's SIGTERM, or the hangup of a dropped ssh session (SIGHUP, which used to end the run with no
    save): the step finishes, a checkpoint is saved, and the exit code is 128 + the signal. The run starts with
    the signal's default action even where the tests run under nohup, whose ignored SIGHUP train must keep."""
    env = {**os.environ, "TINYGPT_HOME": str(workspace)}
    process = reaped(subprocess.Popen(
        _train_command("--name", "t", "--max-steps", "100000", "--set", "train.eval_interval=100000"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL),
    ))
    metrics = workspace / "runs" / "t" / "metrics.jsonl"
    wait_for(process, lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, "3 logged steps")
    process.send_signal(sig)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 128 + sig, err  # not 0: `train && export` must not go on
    assert f"Interrupted by {signal.Signals(sig).name}; checkpoint saved. Continue with: tinygpt train --resume " \
           "--name t" in out  # which signal: a scheduler's time limit, or a dropped terminal (audit)
    state = json.loads((ckpt.latest_checkpoint(workspace / "runs" / "t") / "state.json").read_text())
    assert state["step"] >= 3


def test_under_nohup_a_hangup_is_still_ignored(with_shakespeare, workspace, reaped):
    """`nohup tinygpt train` starts with SIGHUP ignored, to outlive its terminal: train's handler must not undo
    that (the run goes on), while SIGTERM still stops it with a checkpoint."""
    env = {**os.environ, "TINYGPT_HOME": str(workspace)}
    process = reaped(subprocess.Popen(
        _train_command("--name", "n", "--max-steps", "100000", "--set", "train.eval_interval=100000"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),  # what nohup does
    ))
    metrics = workspace / "runs" / "n" / "metrics.jsonl"

    def logged() -> int:
        return len(metrics.read_text().splitlines()) if metrics.exists() else 0

    wait_for(process, lambda: logged() >= 3, "3 logged steps")
    process.send_signal(signal.SIGHUP)
    before = logged()
    wait_for(process, lambda: logged() >= before + 3, "3 steps logged after the hangup")  # still training
    assert process.poll() is None
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err


@pytest.mark.parametrize("safetensors_error", [False, True])
def test_full_disk_keeps_the_previous_checkpoint(with_shakespeare, monkeypatch, safetensors_error):
    """safetensors reports a full disk as a SafetensorError ("... (os error 28)"), not an OSError: a real full disk
    was a 63-line traceback (audit)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:
            if safetensors_error:
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(TrainingError, match="No space left on device.*previous checkpoint is intact"):
        train(tiny_config(max_steps=6, eval_interval=2), run_name="full")
    run = with_shakespeare.parent.parent / "runs" / "full"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_2"]
    assert ckpt.load_checkpoint(str(run)).state["step"] == 2
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp")]


def test_unwritable_runs_folder_fails_before_training(with_shakespeare, workspace):
    (workspace / "runs").write_text("not a folder")
    with pytest.raises(TrainingError, match="cannot write to"):
        train(tiny_config(max_steps=2), run_name="x")


def test_a_full_disk_before_training_says_to_free_space(with_shakespeare, workspace, monkeypatch):
    """The write probe before any step said "make it writable" for a full disk too (code review)."""
    from pathlib import Path

    real = Path.write_bytes

    def full(self, data):
        if self.name.startswith(".write-test-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(TrainingError, match=r"\(No space left on device\): free some space") as caught:
        train(tiny_config(max_steps=2), run_name="x")
    assert "writable" not in str(caught.value)


def test_two_runs_in_a_fresh_workspace_tokenize_the_corpus_once(workspace, monkeypatch):
    """Two trains started together in a fresh workspace both tokenized the corpus: the second waited a second for
    the first's lock, then failed with "another tinygpt process is writing data/shakespeare" (audit). It now waits
    for that tokenize and trains on what it made."""
    import threading

    from tinygpt_cli import data

    real_open, opened = data._Partial.open, []

    def slow_open(self, restart):
        opened.append(self.folder.name)
        time.sleep(2.5)  # longer than the lock's grace: the second finds the first at work
        return real_open(self, restart)

    monkeypatch.setattr(data._Partial, "open", slow_open)
    first = threading.Thread(target=data.tokenize, args=(None,))
    first.start()
    deadline = time.monotonic() + 60
    while not opened and time.monotonic() < deadline:  # the first tokenize holds the lock now
        time.sleep(0.01)
    result = train(tiny_config(max_steps=1, eval_interval=1), run_name="second")
    first.join(60)
    assert result.steps == 1 and opened == [".shakespeare.partial"]


def test_time_and_token_limits_stop_with_a_checkpoint(with_shakespeare):
    result = train(tiny_config(max_steps=1000, eval_interval=1000, max_tokens=3 * 4 * 32), run_name="tokens")
    assert result.stopped == "token_limit" and result.steps == 3
    assert ckpt.latest_checkpoint(result.run_dir).name == "step_3"
    result = train(tiny_config(max_steps=100000, eval_interval=100000, max_minutes=0.02), run_name="minutes")
    assert result.stopped == "time_limit" and 1 <= result.steps < 100000
    assert ckpt.latest_checkpoint(result.run_dir).name == f"step_{result.steps}"
    assert (result.run_dir / "report.md").is_file()


def test_report_and_loss_plot(with_shakespeare):
    result = train(tiny_config(max_steps=4, eval_interval=2), run_name="rep")
    png = (result.run_dir / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    report = (result.run_dir / "report.md").read_text()
    for needle in ("# Run rep", "final val loss", "unigram baseline", "## Sample", "## Config", "tokens/s",
                   " 1 process "):  # was "1 process(es)"
        assert needle in report, needle


def test_the_reports_sample_takes_the_runs_sample_settings(with_shakespeare, monkeypatch):
    """QA: report.md's sample was always 80 tokens at temperature 0.8, top-k 200, whatever the run's sample.*
    settings, which `tinygpt generate` of the run takes."""
    from tinygpt_cli import sample

    asked = []
    real = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: asked.append((args[2], kwargs)) or real(
        *args, **kwargs))
    from dataclasses import replace

    from tinygpt_cli.config import SampleConfig

    cfg = replace(tiny_config(max_steps=1, eval_interval=1000), sample=SampleConfig(
        max_new_tokens=7, temperature=0.0, top_k=0, top_p=0.9, repetition_penalty=1.2, seed=5))
    train(cfg, run_name="greedy")
    tokens, kwargs = asked[-1]
    assert tokens == 7 and (kwargs["temperature"], kwargs["top_k"], kwargs["top_p"], kwargs["repetition_penalty"],
                            kwargs["seed"]) == (0.0, 0, 0.9, 1.2, 5)


def test_out_of_memory_at_the_first_step_is_one_clear_error(with_shakespeare, monkeypatch):
    from tinygpt_cli import model as model_module

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model_module, "chunked_cross_entropy", out_of_memory)
    with pytest.raises(TrainingError, match=r"micro-batch of 4 × 32 tokens does not fit in cpu memory"):
        train(tiny_config(max_steps=3), run_name="oom")
    assert not (with_shakespeare.parent.parent / "runs" / "oom").exists()  # nothing half-written: no run folder


def test_a_batch_beyond_the_machines_ram_is_refused_before_training(with_shakespeare, workspace):
    """On CPU an allocation past RAM is the OOM killer (exit 137, no message), so plan's estimate is checked first."""
    result = invoke("train", *TINY_SETTINGS, "--batch-size", "50000000", "--max-steps", "1", "--name", "huge")
    assert_one_line_error(result, "GiB of RAM")
    assert "--batch-size auto" in result.stderr and "the largest that fits is" in result.stderr
    assert not (workspace / "runs" / "huge").exists()  # audit: the empty run folder was left behind
    (workspace / "runs" / "kept").mkdir(parents=True)
    (workspace / "runs" / "kept" / "notes.txt").write_text("mine")  # a folder of the user's is never removed
    result = invoke("train", *TINY_SETTINGS, "--batch-size", "50000000", "--max-steps", "1", "--name", "kept")
    assert_one_line_error(result, "GiB of RAM")
    assert [p.name for p in (workspace / "runs" / "kept").iterdir()] == ["notes.txt"]


def test_checkpoints_that_cannot_fit_on_disk_are_refused_before_training(with_shakespeare, workspace, monkeypatch):
    """The checkpoints a run keeps at its peak (plan's count, 12 bytes a parameter each) against the free disk."""
    from tinygpt_cli import plan
    from tinygpt_cli import workspace as ws

    cfg = tiny_config(max_steps=6, eval_interval=2, keep_last=1)
    one = plan.checkpoint_bytes(cfg.model)
    assert plan.checkpoints_kept(6, 2, 1) == 2 and plan.checkpoints_kept(6, 2, 0) == 3
    monkeypatch.setattr(ws, "free_bytes", lambda path: int(1.5 * one))
    with pytest.raises(Exception, match=r"run disk \(its checkpoints\) needs about .* of disk, .* free") as info:
        train(cfg, run_name="disk")
    assert "--keep-last" not in str(info.value)  # it is 1: advised where it could not help (audit)
    monkeypatch.setattr(ws, "free_bytes", lambda path: int(2.5 * one))  # the last and a new one, not the best's
    with pytest.raises(Exception, match=r"free some space, keep no checkpoint for the best val loss beside the last "
                                        r"ones \(--set train.keep_best=false\), or set TINYGPT_HOME"):
        train(cfg, run_name="disk")
    assert not list((workspace / "runs" / "disk").glob("checkpoints/step_*"))
    monkeypatch.setattr(ws, "free_bytes", lambda path: int(3.5 * one))
    with pytest.raises(Exception, match=r"keep fewer with --keep-last 1,"):  # keep all (4) does not fit; 1 does
        train(tiny_config(max_steps=8, eval_interval=2, keep_last=0), run_name="disk")  # (1, a new one, the best's)
    assert train(cfg, run_name="disk2").steps == 6


def test_batch_size_auto_on_cpu_takes_the_largest_that_fits(with_shakespeare, monkeypatch):
    """With 150 MB of RAM beside the process itself, the tiny model's micro-batch of 64 becomes one that fits, the
    global batch kept."""
    from tinygpt_cli import plan

    process = int(plan.HOST_RUNTIME_BYTES / plan.HOST_USABLE_SHARE)
    monkeypatch.setattr(plan, "_host_memory", lambda: 150 * 2**20 + process)
    events = []
    cfg = tiny_config(max_steps=1, eval_interval=1, batch_size=64, grad_accum=1, auto_batch=True)
    result = train(cfg, run_name="auto", on_event=events.append)
    note = next(e.message for e in events if e.kind == "info" and "--batch-size auto" in (e.message or ""))
    micro, accum = (int(x) for x in note.split("micro-batch ")[1].split(" accumulation")[0].split(" × "))
    assert micro < 64 and micro * accum == 64 and result.steps == 1
    expected = plan.estimate_memory(cfg.model, 64, plan.resolve_device_spec("cpu"), half=False).max_batch_size
    assert micro <= expected


def test_report_keeps_evaluation_sections_across_a_resume(with_shakespeare):
    first = train(tiny_config(max_steps=4, eval_interval=2), run_name="ev")
    report = first.run_dir / "report.md"
    report.write_text(report.read_text() + "\n## Evaluation: loss on shakespeare/val · now\n\n| loss | 9.9 |\n")
    train(tiny_config(max_steps=6, eval_interval=2), run_name="ev", resume=True)
    text = report.read_text()
    assert "Stopped: completed at step 6" in text and text.count("## Evaluation: loss on shakespeare/val") == 1


def test_an_eval_recorded_while_training_writes_its_report_is_kept(with_shakespeare, monkeypatch):
    """Training's final report.md rewrite read the eval sections, then replaced the file: an eval of the same run
    that appended in between wrote into the file being replaced, and its section was gone (eval.jsonl kept it).
    Both writes now take the report's lock, so the eval's append lands in the new file."""
    import math
    import threading

    from tinygpt_cli import evaluation, report

    first = train(tiny_config(max_steps=2, eval_interval=2), run_name="race")
    checkpoint = ckpt.step_folders(first.run_dir)[-1]
    result = evaluation.LossResult(checkpoint=str(checkpoint), step=2, dataset="d", split="val", tokens=10,
                                   text_bytes=40, windows=1, window_tokens=32, loss=1.0, perplexity=math.e,
                                   bits_per_byte=0.5, seconds=1.0, device="cpu", dtype="fp32")
    real = report._evaluation_sections
    racers = []

    def sections_while_an_eval_records(path):
        sections = real(path)
        racer = threading.Thread(target=evaluation.record_result, args=(checkpoint, result))
        racer.start()
        racers.append(racer)
        racer.join(0.5)  # the eval appends now, between the read and the replace, unless a lock makes it wait
        return sections

    monkeypatch.setattr(report, "_evaluation_sections", sections_while_an_eval_records)
    train(tiny_config(max_steps=4, eval_interval=2), run_name="race", resume=True)
    racers[0].join(10)
    assert not racers[0].is_alive()
    text = (first.run_dir / "report.md").read_text()
    assert "Stopped: completed at step 4" in text and text.count("## Evaluation: loss on d/val") == 1
    assert len((first.run_dir / "eval.jsonl").read_text().splitlines()) == 1


def test_a_resume_with_nothing_to_do_is_an_error_that_changes_nothing(with_shakespeare, workspace):
    """It used to exit 0 having done nothing, rewrite config.yaml with the lower --max-steps and mark the run
    completed; after --max-tokens, the printed resume command stopped again at once, forever."""
    train(tiny_config(max_steps=4, eval_interval=1000), run_name="r")
    config = (workspace / "runs" / "r" / "config.yaml").read_text()
    with pytest.raises(TrainingError, match="already at step 4 of 3: pass a larger --max-steps"):
        train(tiny_config(max_steps=3), run_name="r", resume=True)
    with pytest.raises(TrainingError, match="already at step 4 of 4"):
        train(tiny_config(max_steps=4), run_name="r", resume=True)
    assert (workspace / "runs" / "r" / "config.yaml").read_text() == config
    budget = 3 * 4 * 32
    result = train(tiny_config(max_steps=1000, eval_interval=1000, max_tokens=budget), run_name="t")
    assert result.stopped == "token_limit"
    with pytest.raises(TrainingError, match="--max-tokens budget of 384: pass a larger --max-tokens"):
        train(tiny_config(max_steps=1000, eval_interval=1000, max_tokens=budget), run_name="t", resume=True)
    more = train(tiny_config(max_steps=1000, eval_interval=1000, max_tokens=2 * budget), run_name="t", resume=True)
    assert more.stopped == "token_limit" and more.steps == 6


@pytest.mark.parametrize(("name", "suggestion"), [("..", "my-run"), ("../escape", "escape"), ("a/b", "a-b"),
                                                  ("my run", "my-run"), (".hidden", "hidden")])
def test_a_run_name_must_be_a_plain_folder_name(with_shakespeare, workspace, name, suggestion):
    """--name .. trained into the workspace root itself, ../x outside runs/ (found by an audit)."""
    assert_one_line_error(invoke("train", *TINY_SETTINGS, "--name", name), f"(e.g. --name {suggestion})")
    assert not (workspace / "runs").exists() and not (workspace / "checkpoints").exists()
    assert_one_line_error(invoke("train", *TINY_SETTINGS, "--name", "x" * 300), "use at most 100")  # ENAMETOOLONG


def test_a_resume_goes_on_with_the_data_it_trained_on(with_shakespeare, workspace):
    """A run on "the last tokenized dataset" resumed on whatever was tokenized since, without a word."""
    import yaml

    from tinygpt_cli import data

    run = workspace / "runs" / "r"
    train(tiny_config(max_steps=2, eval_interval=1000), run_name="r")
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["dataset"] == "shakespeare"  # named, not ""
    other = workspace / "other.txt"
    other.write_text("Some entirely different text, line after line.\n" * 4000, encoding="utf-8")
    data.tokenize(str(other), name="other")  # now the newest dataset
    train(tiny_config(max_steps=3), run_name="r", resume=True)
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["data"]["dataset"] == "shakespeare"
    resumed = invoke("train", "--resume", "--name", "r", "--max-steps", "4")  # the CLI, from config.yaml
    assert resumed.exit_code == 0, resumed.output
    assert ckpt.read_state(ckpt.latest_checkpoint(run))["data"]["dataset"] == "shakespeare"
    assert "on other" not in resumed.stderr
    (workspace / "data" / "other").rename(workspace / "data" / "fresh")  # meta.json still says "other"
    train(tiny_config(max_steps=2, eval_interval=1000), run_name="s")  # the newest: the folder fresh/
    assert yaml.safe_load((workspace / "runs" / "s" / "config.yaml").read_text())["data"]["dataset"] == "fresh"
    assert invoke("train", "--resume", "--name", "s", "--max-steps", "3").exit_code == 0


def test_a_resume_on_a_replaced_dataset_is_refused(with_shakespeare, workspace):
    """tokenize --force could swap the text under a run; resuming went on with the other data without a word."""
    import shlex

    from tinygpt_cli import data

    train(tiny_config(max_steps=2, eval_interval=1000), run_name="r")
    other = workspace / "other.txt"
    other.write_text("Some entirely different text, line after line.\n" * 4000, encoding="utf-8")
    data.tokenize(str(other), name="shakespeare", force=True)
    with pytest.raises(TrainingError, match="tokenized again from other text.*--init-from r"):
        train(tiny_config(max_steps=4), run_name="r", resume=True)
    from tinygpt_cli.evaluation import evaluate

    events = []
    evaluate("r", tokens=256, on_event=events.append, record=False)  # eval goes on, but says so
    assert any("tokenized again from other text" in (event.message or "") for event in events)
    shown = invoke("eval", "r", "--tokens", "256", "--no-record")  # QA: the command line said nothing of it
    assert shown.exit_code == 0 and "tokenized again from other text" in shown.stderr, shown.output
    # QA: the command it gives failed ("data/shakespeare already holds a dataset tokenized from other.txt"): the
    # text it must replace came from another source, which tokenize replaces with --force alone
    refused = invoke("train", "--resume", "--name", "r", "--max-steps", "4")
    command = refused.stderr.split("make it again with `")[1].split("`")[0]
    assert command.endswith(" --force")
    assert invoke(*shlex.split(command)[1:]).exit_code == 0
    assert invoke("train", "--resume", "--name", "r", "--max-steps", "4").exit_code == 0


@pytest.mark.parametrize("gone", ["tokenized again", "deleted"])
def test_a_resume_whose_data_changed_says_how_to_make_it_again(with_shakespeare, workspace, gone):
    """The same source tokenized again with another --fraction replaces the dataset (with --force, as a run trained
    on it: without, that is refused now), and the resume is refused; it said "tokenize the original source again"
    without the settings. With data/NAME deleted (to free disk) it said "run `tinygpt tokenize` first", and a bare
    tokenize makes the embedded corpus, not the run's data (audit). Both give the command that makes the exact
    bytes again (tokenizing is deterministic, and the run's checkpoint keeps it), and that command works."""
    import shlex

    assert invoke("tokenize", "shakespeare", "--name", "mine", "--val-fraction", "0.05", "--seed", "3").exit_code == 0
    train(tiny_config(max_steps=2, eval_interval=1000), run_name="r")
    if gone == "deleted":
        shutil.rmtree(workspace / "data" / "mine")
    else:
        assert_one_line_error(invoke("tokenize", "shakespeare", "--name", "mine", "--fraction", "0.5"),
                              "1 run trained on data/mine (r), and --fraction 0.5 (it was made with 1.0); "
                              "--val-fraction 0.005 (it was made with 0.05); --seed 0 (it was made with 3) makes other")
        assert invoke("tokenize", "shakespeare", "--name", "mine", "--fraction", "0.5", "--force").exit_code == 0
    refused = invoke("train", "--resume", "--name", "r", "--max-steps", "3")
    assert_one_line_error(refused, f"{'which is gone: ' if gone == 'deleted' else ''}make it again with `tinygpt "
                                   f"tokenize shakespeare --name mine --fraction 1.0 --val-fraction 0.05 --seed 3"
                                   f"{'`' if gone == 'deleted' else ' --force`'}")
    command = refused.stderr.split("make it again with `")[1].split("`")[0]
    assert invoke(*shlex.split(command)[1:]).exit_code == 0
    resumed = invoke("train", "--resume", "--name", "r", "--max-steps", "3")
    assert resumed.exit_code == 0, resumed.output


def test_a_resume_whose_source_text_changed_does_not_offer_the_same_command(with_shakespeare, workspace):
    """QA: the source file edited and tokenized again (same settings), the refusal offered the tokenize command that
    had made the current data: it said "Nothing to do", and the resume was refused again, in a loop. It now says
    the source's text changed."""
    book = workspace / "book.txt"
    book.write_text("Hello world, this is a line of text.\n" * 2000, encoding="utf-8")
    assert invoke("tokenize", str(book)).exit_code == 0
    assert invoke("train", "--data", "book", "--name", "r", "--max-steps", "2", *TINY_SETTINGS,
                  "--set", "train.eval_interval=1000").exit_code == 0
    book.write_text("Changed first line. " + book.read_text(encoding="utf-8"), encoding="utf-8")
    assert invoke("tokenize", str(book)).exit_code == 0
    refused = invoke("train", "--resume", "--name", "r", "--max-steps", "3")
    assert_one_line_error(refused, f"the text of {book} changed since run r trained on data/book: put back the text "
                                   f"it had and tokenize it again, or start a new run from these weights with "
                                   f"--init-from r")
    assert "make it again" not in refused.stderr


def test_a_run_another_process_is_training_is_refused(with_shakespeare, workspace):
    """Two trainings of one run (a job requeued while the first still runs, a second terminal) wrote the same
    checkpoints and metrics.jsonl; two new runs of one name both passed the 'already exists' check."""
    from tinygpt_cli.workspace import exclusive

    train(tiny_config(max_steps=2, eval_interval=1000), run_name="busy")
    run = workspace / "runs" / "busy"
    before = {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")}
    with exclusive(workspace / "runs" / ".busy.lock", "runs/busy"):  # what a training of it holds
        with pytest.raises(TrainingError, match="another tinygpt process is training run busy: wait for it"):
            train(tiny_config(max_steps=4, eval_interval=1000), run_name="busy", resume=True)
        with exclusive(workspace / "runs" / ".fresh.lock", "runs/fresh"), \
                pytest.raises(TrainingError, match="another tinygpt process is training run fresh"):
            train(tiny_config(max_steps=2), run_name="fresh")
    assert {p.relative_to(run): p.stat().st_mtime_ns for p in run.rglob("*")} == before
    assert not (workspace / "runs" / "fresh").exists()
    assert train(tiny_config(max_steps=4, eval_interval=1000), run_name="busy", resume=True).steps == 4
    assert sorted(p.name for p in (workspace / "runs").iterdir()) == ["busy"]  # the lock goes with the training


def test_a_filesystem_without_locks_does_not_block(workspace, monkeypatch):
    """flock fails with ENOLCK or EOPNOTSUPP on some shared filesystems (NFS without a lock daemon, Lustre
    without -o flock): that was reported as 'another tinygpt process is writing', and nothing could run."""
    import fcntl

    from tinygpt_cli.workspace import exclusive

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with exclusive(workspace / ".x.lock", "data/x"):
        pass
    assert not (workspace / ".x.lock").exists()


def test_token_ids_past_the_vocabulary_are_refused_before_a_run_starts(with_shakespeare, workspace):
    """A hand-made train.bin with an id GPT-2 does not have: an index error in the loss at some step (on CUDA a
    device-side assert), or, in the embedding's padding rows, trained on without a word (audit)."""
    from conftest import hand_made_dataset

    hand_made_dataset(with_shakespeare, workspace / "data" / "mine", "train", 5000, 50300)
    result = invoke("train", *TINY_SETTINGS, "--data", "mine", "--max-steps", "2", "--name", "r")
    assert_one_line_error(result, "token id 50300 at token 5000")
    assert not (workspace / "runs" / "r").exists()


def test_a_window_past_the_vocabulary_mid_run_keeps_the_steps_done(with_shakespeare, workspace, monkeypatch):
    """A train.bin too large to be scanned whole (only its edges hashed) is checked a window at a time: a bad
    window mid-run is one clear error, and the steps trained before it are saved."""
    from tinygpt_cli import data
    from tinygpt_cli import training as train_module
    from tinygpt_cli.errors import DataError

    monkeypatch.setattr(data, "FULL_HASH_LIMIT", 0)
    real_get_batch = train_module.get_batch
    calls = []

    def get_batch(tokens, *args):  # from the 4th batch on, every window holds an id past the vocabulary
        calls.append(1)
        return real_get_batch(tokens if len(calls) < 4 else tokens.astype("uint16") * 0 + 50257, *args)

    monkeypatch.setattr(train_module, "get_batch", get_batch)
    with pytest.raises(DataError, match="token id 50257 at token.*the 2 steps trained are saved.*--init-from r"):
        train(tiny_config(max_steps=10, eval_interval=1000), run_name="r")
    # batch 1 is the first step's, batches 2 and 3 are fetched during steps 1 and 2: step 3's fetch fails
    assert ckpt.read_state(ckpt.latest_checkpoint(workspace / "runs" / "r"))["step"] == 2


def test_a_val_sample_past_the_vocabulary_is_refused_before_the_first_step(with_shakespeare, workspace,
                                                                            monkeypatch):
    """The fixed val sample of a val.bin too large to be scanned whole failed at the first evaluation, mid-run,
    and the checkpoint it saved said its evaluation was done (review): its windows are checked before step 1."""
    from conftest import hand_made_dataset
    from tinygpt_cli import data

    monkeypatch.setattr(data, "FULL_HASH_LIMIT", 0)
    hand_made_dataset(with_shakespeare, workspace / "data" / "mine", "val", slice(None, None, 40), 50300)  # each window
    result = invoke("train", *TINY_SETTINGS, "--data", "mine", "--max-steps", "4", "--name", "r")
    assert_one_line_error(result, "token id 50300 at token")
    assert "steps trained are saved" not in result.stderr
    assert not (workspace / "runs" / "r").exists()


def test_an_atomic_write_that_fails_leaves_no_temporary_file(tmp_path, monkeypatch):
    """A full disk while writing loss.png left runs/<name>/.loss.png.tmp-<pid> behind for good (audit)."""
    (tmp_path / "run").mkdir()
    target = tmp_path / "run" / "loss.png"
    target.write_bytes(b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left"):
        ckpt.workspace.write_bytes_atomic(target, b"new")
    assert sorted(p.name for p in target.parent.iterdir()) == ["loss.png"] and target.read_bytes() == b"old"


def test_latest_names_a_checkpoint_of_its_own_run_only(tmp_path):
    """Audit: a `latest` edited to `../../other/checkpoints/step_20` made one run load and resume another's
    checkpoint. The pointer names a step folder of its run; anything else falls back to the highest step."""
    for run in ("a", "b"):
        for step in (1, 2):
            folder = tmp_path / run / "checkpoints" / f"step_{step}"
            folder.mkdir(parents=True)
            (folder / ckpt.STATE_FILE).write_text("{}")
            (folder / ckpt.WEIGHTS_FILE).write_bytes(b"")
    pointer = tmp_path / "a" / "checkpoints" / ckpt.LATEST_FILE
    pointer.write_text("step_1\n")
    assert ckpt.latest_checkpoint(tmp_path / "a") == tmp_path / "a" / "checkpoints" / "step_1"
    for elsewhere in ("../../b/checkpoints/step_2", str(tmp_path / "b" / "checkpoints" / "step_2"), "."):
        pointer.write_text(elsewhere + "\n")
        assert ckpt.latest_checkpoint(tmp_path / "a") == tmp_path / "a" / "checkpoints" / "step_2"


_SWEEP = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
# as an interactive shell starts a script: not with the ignored Ctrl-C and hangup of a nohup or background job
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.signal(signal.SIGHUP, signal.SIG_DFL)
from conftest import tiny_config
from tinygpt_cli.training import train

def first_step_terms(event):
    if event.kind == "step" and event.step == 1 and not os.environ.get("TERMED"):
        os.environ["TERMED"] = "1"
        os.kill(os.getpid(), signal.SIG{sig})

if {own_handler}:
    signal.signal(signal.SIG{sig}, lambda signum, frame: (print("caller's handler", flush=True), sys.exit(3)))
for lr in (1e-3, 2e-3):
    result = train(tiny_config(max_steps=4, eval_interval=4, log_interval=1, lr=lr), run_name=f"lr{{lr}}",
                   on_event=first_step_terms)
    print("returned", result.stopped, flush=True)
print("swept", flush=True)
"""


@pytest.mark.parametrize(("sig", "own_handler"), [("TERM", False), ("HUP", False), ("TERM", True), ("INT", False)])
def test_a_script_calling_train_is_told_of_a_sigterm(with_shakespeare, workspace, tmp_path, sig, own_handler):
    """Library audit: in a script (a sweep), SIGTERM from `docker stop` or `scancel` ended the current run with a
    checkpoint, and train() returned "interrupted" to a loop that started the next, until SIGKILL came. Once the
    checkpoint is saved, SIGTERM and SIGHUP now go on to the caller's handler (by default: the process ends, as
    the signal means). API QA: Ctrl-C returned "interrupted", and a notebook's cell went on to its next run; it
    now raises KeyboardInterrupt there, once the checkpoint is saved."""
    script = tmp_path / "sweep.py"
    script.write_text(_SWEEP.format(sig=sig, own_handler=own_handler))
    done = subprocess.run([sys.executable, str(script), str(Path(__file__).parent)], capture_output=True, text=True,
                          env={**os.environ, "TINYGPT_HOME": str(workspace)}, timeout=300)
    saved = ckpt.latest_checkpoint(workspace / "runs" / "lr0.001")
    assert saved is not None and saved.name == "step_1"  # the signal's step, saved before anything else
    if own_handler:
        assert done.returncode == 3 and done.stdout.splitlines() == ["caller's handler"], done.stdout + done.stderr
    else:
        assert done.returncode == -getattr(signal, f"SIG{sig}"), done.stdout + done.stderr
        assert done.stdout == ""
    assert not (workspace / "runs" / "lr0.002").exists()


def test_a_reader_that_goes_away_leaves_training_to_finish_and_save(with_shakespeare, workspace, reaped):
    """Audit: `tinygpt train ... 2>&1 | tee log` whose tee died, or an ssh session without a tty that dropped (no
    SIGHUP, only a broken pipe): rich exited 1 at the next line printed, the eval line of a step whose checkpoint
    was about to be saved, losing every step since the last one. Training goes on without a view and saves."""
    env = {**os.environ, "TINYGPT_HOME": str(workspace)}
    process = reaped(subprocess.Popen(
        _train_command("--name", "p", "--max-steps", "8", "--set", "train.eval_interval=4"),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGPIPE, signal.SIG_IGN),  # as Python starts: EPIPE, not death
    ))
    assert process.stdout.readline().startswith(("Training", "train.", "No tokenized"))
    process.stdout.close()  # the reader goes away before the first evaluation
    assert process.wait(timeout=300) == 0
    assert ckpt.latest_step(workspace / "runs" / "p") == 8


def test_a_log_file_gets_plain_progress_lines_instead_of_silence(with_shakespeare, workspace, monkeypatch):
    """Audit: with stderr redirected (nohup, a scheduler's log, ssh without a tty) train printed nothing between
    evaluations but a final bar cut at 80 columns, and tokenize nothing between its plan and its end. A plain
    line comes every PLAIN_PROGRESS_S instead (0 here: every update), with the run's end and an ETA."""
    from tinygpt_cli import cli

    monkeypatch.setattr(cli, "PLAIN_PROGRESS_S", 0.0)
    result = invoke("train", "--size", "micro", *TINY_SETTINGS, "--max-steps", "4", "--name", "logged")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("step ") and "/4 (" in line]
    assert lines[0].startswith("step 1/4 (25.0%) · loss ") and " tok/s · " in lines[0] and " · ETA " in lines[0]
    assert lines[-1].startswith("step 4/4 (100.0%) · loss ") and "val " in lines[-1]
    assert "━" not in result.stderr  # no bar drawn in a log
    text = workspace / "big.txt"
    text.write_text("A line of a long book.\n" * 200_000)
    tokenized = invoke("tokenize", str(text), "--name", "big")
    assert tokenized.exit_code == 0, tokenized.output
    assert any(line.startswith("tokenize: ") and "% · " in line and "MB of text" in line and "tok/s" in line
               for line in tokenized.stderr.splitlines()), tokenized.stderr


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "darwin", reason="RLIMIT_FSIZE as a full disk: Linux")
def test_a_full_disk_while_the_optimizer_state_is_written_is_one_line(with_shakespeare, workspace):
    """Resource QA: a disk that filled while optimizer.pt was written (torch.save given a path reports it as
    "RuntimeError: [enforce fail at inline_container.cc] unexpected pos") ended in a 50-line traceback. A file size
    limit between the weights' size and the optimizer state's stands for the full disk here."""
    import resource

    train(tiny_config(max_steps=2, eval_interval=2), run_name="r")
    step_2 = workspace / "runs" / "r" / "checkpoints" / "step_2"
    limit = ((step_2 / "model.safetensors").stat().st_size + (step_2 / "optimizer.pt").stat().st_size) // 2
    assert (step_2 / "model.safetensors").stat().st_size < limit < (step_2 / "optimizer.pt").stat().st_size
    done = subprocess.run([sys.executable, "-m", "tinygpt_cli", "train", "--resume", "--name", "r", "--max-steps",
                           "4"], capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: could not write the checkpoint of step 4 to "), \
        done.stderr
    assert "(File too large); the previous checkpoint is intact: fix that, then resume with --resume" in done.stderr
    assert [p.name for p in ckpt.list_checkpoints(workspace / "runs" / "r")] == ["step_2"]
    assert ckpt.load_checkpoint("r").state["step"] == 2


def test_a_failed_write_says_what_is_kept_and_how_to_go_on(with_shakespeare, workspace, monkeypatch):
    """Resource QA: a new run's first checkpoint that met a full disk said "the previous checkpoint is intact ...
    resume with --resume", though the run was dropped; a config.yaml or report.md that could not be written after
    a checkpoint was saved said neither that it was saved nor how to go on (report.md: no file named)."""
    import safetensors.torch

    from tinygpt_cli import training

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(safetensors.torch, "save_file", full)
        with pytest.raises(TrainingError, match=r"could not write the checkpoint of step 2 to .*\(No space left on "
                                                r"device\); no checkpoint was saved yet, so the run is not kept: "
                                                r"free disk space, then run the same command again"):
            train(tiny_config(max_steps=2, eval_interval=2), run_name="first")
    assert not (workspace / "runs" / "first").exists()
    real_write = training.write_text_atomic

    def config_full(path, text):
        if path.name == "config.yaml" and (path.parent / "checkpoints" / "step_2").is_dir():
            full()
        real_write(path, text)

    with monkeypatch.context() as patch:
        patch.setattr(training, "write_text_atomic", config_full)
        with pytest.raises(TrainingError, match=r"could not write .*config.yaml \(No space left on device\); the "
                                                r"checkpoint of step 2 is saved: free disk space, then resume with "
                                                r"--resume"):
            train(tiny_config(max_steps=4, eval_interval=2), run_name="cfg")
    assert ckpt.load_checkpoint("cfg").state["step"] == 2
    with monkeypatch.context() as patch:
        patch.setattr(training, "write_report", full)
        with pytest.raises(TrainingError, match=r"could not write .*report.md \(No space left on device\); the "
                                                r"checkpoints are saved: free disk space, then `tinygpt train --resume "
                                                r"--name rep` writes it"):
            train(tiny_config(max_steps=2, eval_interval=2), run_name="rep")
    assert ckpt.load_checkpoint("rep").state["step"] == 2


def test_an_atomic_write_that_fails_names_its_file(tmp_path, monkeypatch):
    """Resource QA: a full disk while report.md was written read "No space left on device: free some space", no
    file named (a write's OSError has none); and too many open files (EMFILE) was a traceback."""
    from tinygpt_cli import cli
    from tinygpt_cli import workspace as ws

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ws, "fsync_file", full)
    (tmp_path / "run").mkdir()
    with pytest.raises(OSError) as caught:
        ws.write_text_atomic(tmp_path / "run" / "report.md", "text")
    assert caught.value.filename == str(tmp_path / "run" / "report.md") and not list((tmp_path / "run").iterdir())
    assert "ulimit -n" in cli._os_advice(OSError(errno.EMFILE, "Too many open files", "x"), "train")
    assert "--out" not in cli._os_advice(caught.value, "train") and "--out" in cli._os_advice(caught.value, "export")
    monkeypatch.setattr(cli, "_stdout_disk_full", lambda: True)
    assert cli._os_advice(OSError(errno.ENOSPC, "No space left on device"), "generate").startswith(
        "stdout goes to a file on a full disk")
