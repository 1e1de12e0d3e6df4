"""The command line end to end, through CliRunner, including every error path issue #2 names."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from conftest import TINY_SETTINGS, assert_one_line_error
from tinygpt_cli import checkpoint as ckpt
from tinygpt_cli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def train_tiny(*extra: str, steps: int = 4):
    return invoke("train", *TINY_SETTINGS, "--max-steps", str(steps), *extra)


def test_help_does_not_import_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from tinygpt_cli.cli import app; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'tokenize' in r.output; "
        "assert 'torch' not in sys.modules, 'torch imported on the --help path'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _commands(group, path=()):
    """Every command under a click group, as (its words, the command)."""
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_help_of_every_command_reads_cleanly():
    """A flag's help row showed a type, `--json <bool>`, as if it took a value (recent Typer); a command's one-line
    summary broke where its docstring's source line did (`tinygpt runs --help`)."""
    import typer.main

    root = typer.main.get_command(app)
    for words, command in [((), root), *_commands(root)]:
        result = runner.invoke(app, [*words, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (words, result.output)
        assert "<bool>" not in result.stdout, words
        assert "\n" not in (command.help or "").split("\n\n")[0].strip(), words
    typed = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "200"}).stdout
    assert re.search(r"--seed +(<int>|INTEGER)", typed)  # Typer before 0.27 names the type INTEGER
    assert re.search(r"--json +Print the result as JSON", typed)


def test_version_and_module_entry_point():
    from tinygpt_cli import __version__

    assert invoke("--version").stdout.strip() == f"tinygpt {__version__}"
    out = subprocess.run([sys.executable, "-m", "tinygpt_cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"tinygpt {__version__}"


def test_tokenize_train_generate(workspace):
    result = invoke("tokenize")
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.stdout and "val tokens" in result.stdout
    assert re.search(r"of text in \d+(\.\d)?s \(", result.stdout)  # audit: a second's work read "in 0s"
    from tinygpt_cli.cli import _fmt_seconds

    assert [_fmt_seconds(t) for t in (0.34, 9.96, 12.5, 75, 3725)] == ["0.3s", "10.0s", "12s", "1m15s", "1h02m"]
    result = train_tiny("--name", "first")
    assert result.exit_code == 0, result.output
    assert "val loss" in result.stdout and "unigram baseline" in result.stdout
    run = workspace / "runs" / "first"
    assert (run / "config.yaml").is_file() and (run / "metrics.jsonl").is_file()
    result = invoke("generate", "To be, or not to be", "--max-new-tokens", "12", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("To be, or not to be")
    again = invoke("generate", "To be, or not to be", "--max-new-tokens", "12", "--seed", "3")
    assert again.stdout == result.stdout
    many = invoke("generate", "ROMEO:", "--max-new-tokens", "5", "--num-samples", "3", "--run", "first")
    assert many.exit_code == 0 and many.stdout.count("ROMEO:") == 3 \
        and "--- sample 1 ---" in many.stdout and "--- sample 3 ---" in many.stdout


def test_train_tokenizes_the_embedded_corpus_first(workspace):
    result = train_tiny("--json", steps=2)
    assert result.exit_code == 0, result.output
    assert "No tokenized data yet: tokenizing the embedded Shakespeare corpus first." in result.stderr
    assert (workspace / "data" / "shakespeare" / "meta.json").is_file()
    payload = json.loads(result.stdout)
    assert payload["steps"] == 2 and payload["stopped"] == "completed"


def test_resume_continues_the_latest_run(with_shakespeare, workspace):
    assert train_tiny("--name", "r", steps=2).exit_code == 0
    result = invoke("train", "--resume", "--max-steps", "4")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.stderr
    state = json.loads((workspace / "runs" / "r" / "checkpoints" / "step_4" / "state.json").read_text())
    assert state["step"] == 4
    # audit: --resume added to the command that started the run was refused for its --size, which changes nothing
    assert invoke("train", "--resume", "--size", "micro", "--max-steps", "5").exit_code == 0
    assert_one_line_error(invoke("train", "--resume", "--size", "tiny", "--max-steps", "6"),
                          "run r is micro: --size tiny cannot change a resumed run (drop --size; --set changes "
                          "training keys)")


def test_train_summary_before_the_first_log_and_after_a_token_budget(with_shakespeare, workspace):
    result = train_tiny("--name", "b", "--max-tokens", "128", "--set", "train.log_interval=10", steps=100)  # 1 step
    assert result.exit_code == 0, result.output
    # the loss of the one step, though no log step came; no val loss yet, said as "n/a" ("nan" reads as diverged)
    assert re.search(r": step 1 of 100, train loss \d+\.\d{4}, val loss n/a", result.stdout)  # "of": how far
    assert "nan" not in result.stdout
    assert "Continue with: tinygpt train --resume --name b --max-tokens N" in result.stdout
    assert_one_line_error(invoke("train", "--resume", "--name", "b"), "pass a larger --max-tokens")


def test_train_flags_reach_the_run_and_a_time_limit_says_how_to_go_on(with_shakespeare, workspace):
    """--max-minutes, --keep-last and --grad-accum were never given on a command line in a test (test audit): a
    typo in the flags' keys would have passed."""
    import yaml

    result = train_tiny("--name", "t", "--max-minutes", "0.0001", "--keep-last", "1", "--grad-accum", "2",
                        "--set", "train.eval_interval=1", steps=100000)
    assert result.exit_code == 0, result.output
    assert "Reached --max-minutes; checkpoint saved. Continue with: tinygpt train --resume --name t (it stops " \
        "again after --max-minutes of training: add --max-minutes 0 to lift that)" in result.stdout
    run = workspace / "runs" / "t"
    train_config = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (train_config["max_minutes"], train_config["keep_last"], train_config["grad_accum"]) == (0.0001, 1, 2)
    assert len(ckpt.list_checkpoints(run)) == 1


def test_resume_refusals_change_nothing(with_shakespeare, workspace, tmp_path):
    """Refusals no test reached (test audit): a --config on a resume, a checkpoint without its optimizer state
    (which said it "cannot be resumed exactly" and not what to do), and eval given both RUN and --model."""
    assert train_tiny("--name", "r", steps=2).exit_code == 0
    run = workspace / "runs" / "r"
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  lr: 0.001\n")
    assert_one_line_error(invoke("train", "--resume", "--name", "r", "--config", str(config), "--max-steps", "4"),
                          "--config cannot change a resumed run: use --set for training keys")
    (run / "checkpoints" / "step_2" / "optimizer.pt").unlink()
    assert_one_line_error(invoke("train", "--resume", "--name", "r", "--max-steps", "4"),
                          "has no optimizer.pt: it cannot be resumed exactly; start a new run from its weights "
                          "with `tinygpt train --init-from r --name NEW`")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    advised = train_tiny("--init-from", "r", "--name", "new", steps=1)
    assert advised.exit_code == 0, advised.output
    assert_one_line_error(invoke("eval", "r", "--model", "gpt2"), "give either RUN or --model, not both")


def test_interrupted_training_exits_130(with_shakespeare, monkeypatch):
    from tinygpt_cli import training as train_module

    real = train_module.train

    def interrupted(*args, stop, **kwargs):
        stop.reason, stop.signal = "interrupted", 2  # as the SIGINT handler leaves it
        return real(*args, stop=stop, **kwargs)

    monkeypatch.setattr(train_module, "train", interrupted)
    result = train_tiny("--name", "i", steps=50)
    assert result.exit_code == 130, result.output
    # stopped before its first step: no checkpoint to speak of (audit), and the same command starts it
    assert "Interrupted before the first step: nothing was trained or saved." in result.stdout
    assert "checkpoint saved" not in result.stdout
    assert not (with_shakespeare.parent.parent / "runs" / "i").exists()  # audit: no empty run folder is left
    monkeypatch.setattr(train_module, "train", real)
    again = train_tiny("--name", "i", steps=2)
    assert again.exit_code == 0, again.output
    monkeypatch.setattr(train_module, "train", interrupted)  # a resume stopped before its first step
    resumed = invoke("train", "--resume", "--name", "i", "--max-steps", "4")
    assert resumed.exit_code == 130 and "checkpoint saved" not in resumed.stdout
    assert "the run is as it was. Continue with: tinygpt train --resume --name i" in resumed.stdout


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_aborts_at_once_with_the_signals_exit_code(with_shakespeare, workspace, monkeypatch, request,
                                                                   sig):
    """The first signal asks for a checkpoint; a second one, here while the step-4 checkpoint's files are being
    written, aborts: no traceback, one line that says what is kept, 128 + the signal (130 for Ctrl-C, 143 for a
    scheduler's SIGTERM), the step-2 checkpoint intact and nothing of step 4 left. The same signal repeated
    within a second (one stop sent along two paths) is not a second one."""
    from tinygpt_cli import training as train_module

    inherited = signal.getsignal(sig)
    if inherited == signal.SIG_IGN:  # a job started in the background (`&`, nohup) ignores Ctrl-C, which train
        # rightly keeps ignored: the signal as a terminal's process has it
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
        request.addfinalizer(lambda: signal.signal(sig, inherited))
    real_save, real_fsync = train_module.save_checkpoint, ckpt.fsync_file
    sent = []

    def signalled(run_dir, step, *args, **kwargs):
        if step == 4:
            monkeypatch.setattr(train_module, "REPEAT_WINDOW_S", 3600.0)  # a repeat however slow the machine
            assert signal.getsignal(sig) not in (signal.SIG_DFL, signal.default_int_handler)  # train's own
            os.kill(os.getpid(), sig)  # the handler asks for a stop
            os.kill(os.getpid(), sig)  # a repeat at once: ignored
            sent.append(sig)
        return real_save(run_dir, step, *args, **kwargs)

    def fsync_then_signal(path):
        real_fsync(path)
        if sent and path.name == "model.safetensors":
            monkeypatch.setattr(train_module, "REPEAT_WINDOW_S", 0.0)  # as if a second had passed
            sent.append("in the write")  # the repeat did not abort: the write began
            os.kill(os.getpid(), sig)  # raises here, in the middle of the write

    monkeypatch.setattr(train_module, "save_checkpoint", signalled)
    monkeypatch.setattr(ckpt, "fsync_file", fsync_then_signal)
    result = train_tiny("--name", "a", steps=50)
    assert result.exit_code == 128 + sig, result.output
    assert sent == [sig, "in the write"]
    assert "Traceback" not in result.output and "Aborted!" not in result.output
    assert ("Aborted by a second signal: training stopped at once; the last checkpoint (step 2) is intact. "
            "Continue with: tinygpt train --resume --name a") in result.stderr
    run = workspace / "runs" / "a"
    assert ckpt.latest_checkpoint(run).name == "step_2"
    assert [p.name for p in (run / "checkpoints").iterdir() if "4" in p.name] == []  # no step_4, no temp folder


def test_the_train_view_outlives_its_terminal():
    """After a hangup writes to the terminal fail (EIO): the view goes quiet instead of ending the training that
    the hangup asked to save."""
    from rich.console import Console

    from tinygpt_cli.cli import _TrainView
    from tinygpt_cli.training import TrainEvent

    class DeadTerminal:
        def write(self, text):
            raise OSError(5, "Input/output error")

        def flush(self):
            raise OSError(5, "Input/output error")

    view = _TrainView(Console(file=DeadTerminal(), force_terminal=True))
    view.on_event(TrainEvent("info", message="a note"))
    assert view.gone
    view.on_event(TrainEvent("info", message="another"))  # nothing written, nothing raised
    view.close()


def test_config_file_and_json_output(with_shakespeare, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("size: micro\nmodel: {n_layer: 1, n_head: 2, n_embd: 32, block_size: 16}\n"
                      "train: {batch_size: 2, eval_interval: 2, eval_batches: 1, max_steps: 2}\n")
    result = invoke("train", "--config", str(config), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2


# ------------------------------------------------------------------------------------------------ errors
def test_generate_without_a_run(workspace):
    assert_one_line_error(invoke("generate", "hi"), "no trained run")


def test_tokenize_missing_path(workspace):
    assert_one_line_error(invoke("tokenize", "no/such/dir"), "does not exist")
    assert not (workspace / "data").exists()


def test_tokenize_empty_folder(workspace, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(invoke("tokenize", str(tmp_path / "empty")), "holds no .txt")
    (tmp_path / "blank.txt").write_text("")
    assert_one_line_error(invoke("tokenize", str(tmp_path / "blank.txt")), "holds no text")
    assert not (workspace / "data").exists() or not list((workspace / "data").iterdir())


def test_tokenize_non_utf8_file(workspace, tmp_path):
    bad = tmp_path / "latin.txt"
    bad.write_bytes("na\xefve caf\xe9\n".encode("latin-1") * 10)
    assert_one_line_error(invoke("tokenize", str(bad)), "latin.txt is not UTF-8 text")
    assert not list((workspace / "data").iterdir())


def test_unknown_preset_and_config_key(with_shakespeare, workspace):
    assert_one_line_error(invoke("train", "--size", "huge"), "unknown size 'huge'")
    assert_one_line_error(invoke("train", "--size", ""), "--size is empty: choose one of micro")  # QA: it was micro
    assert_one_line_error(invoke("train", "--set", "train.warmup=3"), "unknown config key train.warmup")
    assert not (workspace / "runs").exists()


def test_batch_size_is_a_number_or_auto(workspace):
    """It said "train.batch_size must be int (got 'foo')", never that auto is allowed (audit)."""
    for command in ("train", "plan"):
        assert_one_line_error(invoke(command, "--batch-size", "foo"), "--batch-size must be a whole number or auto")
    assert not (workspace / "runs").exists()


def test_usage_error_exits_2(workspace):
    result = invoke("train", "--max-steps", "many")
    assert result.exit_code == 2


@pytest.mark.parametrize(("args", "fragment", "command"), [
    (["train", "--max-steps", "many"], "Invalid value for '--max-steps'", "tinygpt train"),
    (["generate", "--bogus"], "No such option", "tinygpt generate"),
    (["eval", "--tokens"], "Option '--tokens' requires an argument", "tinygpt eval"),
    (["--bogus"], "No such option", "tinygpt"),
    (["nosuch"], "No such command 'nosuch'", "tinygpt"),
    (["runs", "rm"], "Missing argument 'NAME'", "tinygpt runs rm"),
])
def test_a_command_line_that_cannot_be_parsed_is_one_line(workspace, args, fragment, command):
    """Terminal audit: Typer printed a usage line and a boxed panel, wrapped at the terminal's width, where every
    other error is one `error:` line a CI log can be searched for. (click's wording past the first words varies
    with its version: a suggestion, a full stop.)"""
    result = invoke(*args)
    assert_one_line_error(result, fragment, code=2)
    assert result.stderr.rstrip().endswith(f"; `{command} -h` lists what it takes"), result.stderr
    assert "--bogus" in result.stderr or "--bogus" not in args
    assert "╭" not in result.stderr and "Usage:" not in result.stderr


def test_the_usage_hint_names_tinygpt_when_run_as_a_module(workspace):
    """QA: `python -m tinygpt_cli train --bogus` said "`tinygpt -m tinygpt_cli train -h` lists what it takes", a
    command that does not work (click's command path starts with `python -m tinygpt_cli`)."""
    done = subprocess.run([sys.executable, "-m", "tinygpt_cli", "runs", "show", "--bogus"], capture_output=True,
                          text=True, env={**os.environ, "TINYGPT_HOME": str(workspace)})
    assert done.returncode == 2
    assert done.stderr.strip() == "error: No such option: --bogus; `tinygpt runs show -h` lists what it takes"


def test_an_unforeseen_write_error_is_one_line(workspace, monkeypatch, tmp_path):
    """A full disk or read-only folder that no command checks for printed a traceback (found by an audit)."""
    import errno

    from tinygpt_cli import data

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(workspace / "data" / "x.bin"))

    monkeypatch.setattr(data, "tokenize", full)
    assert_one_line_error(invoke("tokenize"), "No space left on device")
    from tinygpt_cli.workspace import exclusive

    lock = exclusive(tmp_path / "no-such-folder" / ".lock", "x")
    with pytest.raises(data.DataError, match="cannot write to .*choose a writable TINYGPT_HOME"), lock:
        pass


def test_a_path_the_file_system_refuses_is_one_line(with_shakespeare, workspace, tmp_path):
    """A name or path too long for the file system, or a link that loops, gave a traceback on most commands: the
    error handler knew only full, read-only and forbidden (bad-input audit)."""
    long = "a" * 300
    for args in (("eval", long), ("generate", "hi", "--run", long), ("train", "--data", long),
                 ("train", "--init-from", long), ("runs", "show", long), ("data", "show", long),
                 ("tokenize", str(tmp_path / f"{long}.txt")), ("plan", "--config", str(tmp_path / f"{long}.yaml")),
                 ("eval", "--task", "hellaswag", "--task-data", str(tmp_path / f"{long}.jsonl"))):
        assert_one_line_error(invoke(*args), "use a shorter name or path")
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    source = tmp_path / "src"
    from test_export import hf_folder, random_model

    hf_folder(random_model(), source)
    assert_one_line_error(invoke("export", str(source), "--out", str(tmp_path / "loop1")), "link")
    assert_one_line_error(invoke("export", str(source), "--out", str(tmp_path / f"{long}")), "shorter name")


def test_an_unreadable_input_file_is_one_line(with_shakespeare, workspace, tmp_path, monkeypatch):
    """Click's own readable check of --config, --prompt-file and --task-data printed a boxed six-line usage error
    (exit 2), where a missing file got one line (bad-input audit): the reading is tinygpt's, and so is the error."""
    import builtins
    import os
    from pathlib import Path

    locked = tmp_path / "locked.yaml"
    locked.write_text("train:\n  lr: 0.001\n")
    real_access, real_open, real_path_open = os.access, builtins.open, Path.open

    def access(path, mode, *args, **kwargs):  # what click asks (root may read anything: ask as a user would)
        return False if Path(path) == locked and mode & os.R_OK else real_access(path, mode, *args, **kwargs)

    def refuse(path) -> None:
        if isinstance(path, (str, os.PathLike)) and Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))

    def builtin_open(file, *args, **kwargs):
        refuse(file)
        return real_open(file, *args, **kwargs)

    def path_open(self, *args, **kwargs):
        refuse(self)
        return real_path_open(self, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(builtins, "open", builtin_open)
    monkeypatch.setattr(Path, "open", path_open)
    for args in (("plan", "--config", str(locked)), ("train", "--config", str(locked)),
                 ("generate", "--prompt-file", str(locked)),
                 ("eval", "--task", "hellaswag", "--task-data", str(locked))):
        result = invoke(*args)
        assert result.exit_code != 2 and "is not readable" not in result.output, (args, result.output)
        assert_one_line_error(result, "Permission denied")


def test_endless_or_odd_inputs_are_one_line(with_shakespeare, workspace, tmp_path, monkeypatch):
    """`--prompt-file /dev/zero` read until the memory ran out, then blamed --num-samples; `--config /dev/zero`
    was said not to exist; a TINYGPT_HOME that is a file listed as an empty workspace (bad-input audit)."""
    from tinygpt_cli import sample

    monkeypatch.setattr(sample, "PROMPT_MAX_BYTES", 1 << 16)  # /dev/zero would take 64 MiB to reach the limit
    train = invoke("train", "--max-steps", "1", "--name", "r", "--set", "model.n_layer=1", "--set",
                   "model.n_embd=32", "--set", "model.n_head=2", "--set", "model.block_size=32")
    assert train.exit_code == 0, train.output
    assert_one_line_error(invoke("generate", "--run", "r", "--prompt-file", "/dev/zero"),
                          "/dev/zero holds more than 0 MiB (or never ends)")
    assert_one_line_error(invoke("plan", "--config", "/dev/zero"), "/dev/zero is not a regular file")
    home = tmp_path / "afile"
    home.write_text("x")
    monkeypatch.setenv("TINYGPT_HOME", str(home))
    for args in (("runs",), ("data",), ("generate", "hi")):
        assert_one_line_error(invoke(*args), f"TINYGPT_HOME={home} is a file, not a folder")


def test_a_device_that_is_not_there_is_one_line(with_shakespeare, workspace):
    """generate and eval passed --device straight to torch: tracebacks for 'tpu', 'CPU', 'cuda:0', 'meta'."""
    import torch

    from tinygpt_cli.training import resolve_device

    assert train_tiny("--name", "d", steps=1).exit_code == 0
    assert_one_line_error(invoke("generate", "hi", "--device", "tpu"), "unknown device 'tpu': use auto, cpu")
    assert_one_line_error(invoke("eval", "--device", "meta"), "unknown device 'meta'")
    assert_one_line_error(invoke("eval", "--device", "cuda:x"), "unknown device 'cuda:x'")
    if not torch.cuda.is_available():
        assert_one_line_error(invoke("eval", "--device", "cuda:0"), "no CUDA GPU is visible")
    assert resolve_device(" CPU ") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device("cpu:0") == torch.device("cpu:0")
    ok = invoke("generate", "hi", "--device", "CPU", "--max-new-tokens", "2")
    assert ok.exit_code == 0, ok.output


def test_folders_that_are_not_runs_get_the_right_advice(with_shakespeare, workspace, tmp_path):
    """A run's checkpoints/ folder is its latest checkpoint; a folder that is no run is not told to "train it"
    (audit: `eval runs/r/checkpoints` said it held no checkpoint, `runs show /tmp` to resume a run "tmp")."""
    assert train_tiny("--name", "r", steps=1).exit_code == 0
    checkpoints = workspace / "runs" / "r" / "checkpoints"
    ok = invoke("generate", "hi", "--run", str(checkpoints), "--max-new-tokens", "2")
    assert ok.exit_code == 0, ok.output
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("x")
    for command in (("generate", "hi", "--run", str(stranger)), ("eval", str(stranger)), ("runs", "show", stranger)):
        result = invoke(*map(str, command))
        assert_one_line_error(result, "is not a run")
        assert "tinygpt train" not in result.stderr
    assert_one_line_error(invoke("eval", "nosuch"), "list runs with `tinygpt runs`")
    assert_one_line_error(invoke("runs", "show", "nosuch"), "list them with `tinygpt runs`")


def test_runs_show_of_a_checkpoint_outside_a_run_shows_what_eval_wrote_there(with_shakespeare, workspace, tmp_path):
    """A checkpoint copied out of its run keeps its own eval records; `runs show` on it named its grandparent
    ("/ is not a run") instead of showing them (audit). In a run, a checkpoint still shows its run's report."""
    assert train_tiny("--name", "r", steps=2).exit_code == 0
    checkpoint = workspace / "runs" / "r" / "checkpoints" / "step_2"
    inside = invoke("runs", "show", str(checkpoint))
    assert inside.exit_code == 0 and inside.stdout == invoke("runs", "show", "r").stdout
    os.chdir(checkpoint.parent)  # (the test's folder is restored by the workspace fixture's monkeypatch)
    assert invoke("runs", "show", "step_2").stdout == inside.stdout  # a relative checkpoint path
    os.chdir(checkpoint)
    assert invoke("runs", "show", ".").stdout == inside.stdout
    lone = tmp_path / "lone"
    shutil.copytree(checkpoint, lone)
    assert_one_line_error(invoke("runs", "show", str(lone)), f"`tinygpt eval {lone}` writes one")
    assert invoke("eval", str(lone), "--tokens", "64").exit_code == 0
    shown = invoke("runs", "show", str(lone))
    assert shown.exit_code == 0, shown.output
    assert "Evaluation: loss on shakespeare/val" in shown.stdout


def test_corrupted_checkpoint(with_shakespeare, workspace):
    assert train_tiny("--name", "c", steps=2).exit_code == 0
    weights = workspace / "runs" / "c" / "checkpoints" / "step_2" / "model.safetensors"
    weights.write_bytes(b"\x00" * 64)
    result = invoke("generate", "hi")
    assert_one_line_error(result, "is corrupted")
    assert "no earlier checkpoint to fall back to" in result.stderr
    assert train_tiny("--name", "d", steps=2).exit_code == 0
    assert invoke("train", "--resume", "--name", "d", "--max-steps", "4").exit_code == 0
    step_4 = workspace / "runs" / "d" / "checkpoints" / "step_4"
    (step_4 / "model.safetensors").write_bytes(b"\x00" * 64)
    result = invoke("eval", "d", "--tokens", "64")
    assert_one_line_error(result, f"pass an earlier checkpoint ({step_4.parent / 'step_2'}), or delete {step_4}")
    # train cannot be passed a checkpoint: it is told to delete the damaged one (audit)
    result = invoke("train", "--resume", "--name", "d", "--max-steps", "6")
    assert_one_line_error(result, f"delete {step_4} and --resume falls back to step_2")
    assert "pass an earlier checkpoint" not in result.stderr
    shutil.rmtree(step_4)
    assert invoke("eval", "d", "--tokens", "64").exit_code == 0  # the run falls back to step_2


def test_resume_continues_the_named_run_only(with_shakespeare, workspace, tmp_path, monkeypatch):
    """Audit: `--resume --name /elsewhere/m1` trained the workspace's runs/m1 with /elsewhere/m1's config. A
    name is the workspace's run even when the current folder holds a folder of that name; a folder outside
    runs/ is refused, and nothing is trained."""
    assert train_tiny("--name", "m1", steps=2).exit_code == 0
    outside = tmp_path / "elsewhere" / "m1"
    shutil.copytree(workspace / "runs" / "m1", outside)
    result = invoke("train", "--resume", "--name", str(outside), "--max-steps", "4")
    assert_one_line_error(result, f"move it into {workspace / 'runs'}")
    assert ckpt.latest_step(workspace / "runs" / "m1") == 2 and ckpt.latest_step(outside) == 2
    monkeypatch.chdir(outside.parent)  # ./m1 is the copy; the name m1 is still the workspace's run
    assert ckpt.find_run("m1") == workspace / "runs" / "m1"
    assert ckpt.find_run("./m1").resolve() == outside and ckpt.find_run(str(outside)) == outside
    monkeypatch.chdir(outside)
    assert ckpt.find_run(".").resolve() == outside  # review: `.` was the workspace's runs/ folder
    assert_one_line_error(invoke("train", "--resume", "--name", ".", "--max-steps", "4"), "move it into")
    monkeypatch.chdir(outside.parent)
    assert invoke("train", "--resume", "--name", "m1", "--max-steps", "4").exit_code == 0
    assert ckpt.latest_step(workspace / "runs" / "m1") == 4 and ckpt.latest_step(outside) == 2
    assert invoke("train", "--resume", "--name", str(workspace / "runs" / "m1"), "--max-steps", "6").exit_code == 0


def test_resume_with_a_damaged_or_missing_config_yaml(with_shakespeare, workspace):
    """Audit: a damaged config.yaml ended `--resume` in a YAML traceback. It is one line now; a missing one
    falls back to the config every checkpoint keeps."""
    assert train_tiny("--name", "y", steps=2).exit_code == 0
    config = workspace / "runs" / "y" / "config.yaml"
    config.write_text("size: [\n")
    assert_one_line_error(invoke("train", "--resume", "--name", "y", "--max-steps", "4"),
                          f"{config} is not valid YAML")
    config.unlink()
    assert invoke("train", "--resume", "--name", "y", "--max-steps", "4").exit_code == 0
    assert config.is_file()


@pytest.mark.parametrize("count", ["0", "-3"])
def test_a_process_count_below_one_is_refused(with_shakespeare, workspace, count):
    """Audit: --nproc 0 or -3 fell through to a whole single-process run (500 steps of micro)."""
    assert_one_line_error(invoke("train", "--nproc", count), f"--nproc must be at least 1 (got {count})")
    assert not (workspace / "runs").exists() or not list((workspace / "runs").iterdir())


def test_dropout_may_change_on_resume_but_the_shape_may_not(with_shakespeare, workspace):
    """Audit: --dropout on resume was refused as a change of "model shape"."""
    assert train_tiny("--name", "dr", steps=2).exit_code == 0
    ok = invoke("train", "--resume", "--name", "dr", "--max-steps", "4", "--dropout", "0.1")
    assert ok.exit_code == 0, ok.output
    assert "dropout: 0.1" in (workspace / "runs" / "dr" / "config.yaml").read_text()
    assert_one_line_error(invoke("train", "--resume", "--name", "dr", "--max-steps", "6", "--set", "model.n_layer=3"),
                          "cannot change on resume")


def test_foreign_checkpoint(with_shakespeare, workspace):
    folder = workspace / "runs" / "foreign" / "checkpoints" / "step_1"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 1}))
    (folder / "model.safetensors").write_bytes(b"junk")
    assert_one_line_error(invoke("generate", "hi", "--run", "foreign"), "not a tinygpt checkpoint")


def test_prompt_longer_than_context(with_shakespeare):
    """It was refused ("shorten the prompt"); it goes on from the prompt's last block_size tokens, as nanoGPT
    crops, and says so (audit)."""
    assert train_tiny("--name", "p", steps=2).exit_code == 0
    result = invoke("generate", "word " * 40, "--max-new-tokens", "2")
    assert result.exit_code == 0 and "it went on from the last 32" in result.stderr, result.output


def test_unknown_dataset_for_training(with_shakespeare, workspace):
    assert_one_line_error(invoke("train", "--data", "owt"), "no tokenized dataset named 'owt'")
    assert not (workspace / "runs").exists()
    # QA: a named corpus not downloaded said "run `tinygpt tokenize` first", which makes the embedded corpus
    assert_one_line_error(invoke("train", "--data", "openwebtext"),
                          "make it with `tinygpt download openwebtext && tinygpt tokenize openwebtext`")
    assert_one_line_error(invoke("train", "--data", "mine"), "make it with `tinygpt tokenize SOURCE --name mine`")


@pytest.mark.parametrize("value", ["0", "-1"])
def test_bad_num_samples(with_shakespeare, value):
    assert train_tiny("--name", "n", steps=2).exit_code == 0
    assert_one_line_error(invoke("generate", "x", "--num-samples", value), "--num-samples")


def test_quiet_keeps_results_and_errors_only(with_shakespeare):
    result = invoke("--quiet", "train", *TINY_SETTINGS, "--max-steps", "2", "--name", "q")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip() == "" and "Run " in result.stdout
    assert_one_line_error(invoke("-q", "generate", "x", "--run", "missing"), "no run, checkpoint")
    assert invoke("train", *TINY_SETTINGS, "--max-steps", "2", "--name", "loud").stderr.strip() != ""


def test_tinygpt_debug_adds_the_traceback_to_the_one_line_error(workspace):
    plain = invoke("generate", "hi", "--run", "nowhere")
    assert plain.exit_code == 1 and "Traceback" not in plain.stderr
    debug = runner.invoke(app, ["generate", "hi", "--run", "nowhere"], env={"COLUMNS": "160", "TINYGPT_DEBUG": "1"})
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and debug.stderr.rstrip().endswith(
        plain.stderr.rstrip().splitlines()[-1])


def test_a_stop_whose_message_cannot_be_printed_keeps_its_exit_code():
    """Review: a command stopped by SIGTERM whose log reader had gone too printed its 'Interrupted' line into the
    broken pipe, and the BrokenPipeError made the exit 141 instead of 143."""
    import signal

    import typer

    from tinygpt_cli import cli
    from tinygpt_cli.launch import Stopped

    class Gone:
        def print(self, *args, **kwargs):
            raise BrokenPipeError(32, "the reader of the output went away")

    with pytest.raises(typer.Exit) as exited, cli._interruptible(None, Gone(), lambda exc: "Interrupted"):
        raise Stopped(signal.SIGTERM)
    assert exited.value.exit_code == 143


def test_auto_resume_starts_a_run_then_goes_on_with_it(with_shakespeare, workspace):
    """A job script submitted again and again needed a shell test to choose between starting and --resume (which
    refused the --config that started the run); --auto-resume is one command for both."""
    yaml_file = workspace / "run.yaml"
    yaml_file.write_text("train:\n  lr: 0.001\n")
    job = ("--config", str(yaml_file), "--name", "job", "--auto-resume")
    first = train_tiny(*job, steps=2)
    assert first.exit_code == 0, first.output
    (workspace / "runs" / "job" / "report.md").unlink()  # written again by the resume that trains
    again = train_tiny(*job, steps=4)
    assert again.exit_code == 0, again.output
    assert "resumed from" in again.stderr and "note:" not in again.stderr
    assert json.loads((workspace / "runs" / "job" / "checkpoints" / "step_4" / "state.json").read_text())["step"] == 4
    yaml_file.write_text("train:\n  lr: 0.002\n")  # edited since: the run keeps its own, and says so
    edited = train_tiny(*job, steps=5)
    assert edited.exit_code == 0, edited.output
    assert "note: run job goes on with its own train.lr, not those --config gives now; change one with --set " \
        "(--set train.lr=0.002)" in edited.stderr
    yaml_file.write_text("model:\n  bias: false\n")
    assert_one_line_error(train_tiny(*job, steps=6), "run job is another model than --size/--config describe now")
    assert_one_line_error(train_tiny("--auto-resume", steps=2), "--auto-resume needs --name")
    assert_one_line_error(train_tiny("--auto-resume", "--resume", "--name", "job", steps=2), "drop --resume")
    unsaved = workspace / "runs" / "killed-early"  # stopped before its first checkpoint: started (again)
    unsaved.mkdir()
    (unsaved / "config.yaml").write_text("model: {}\n")
    fresh = train_tiny("--name", "killed-early", "--auto-resume", steps=2)
    assert fresh.exit_code == 0, fresh.output
    assert "resumed from" not in fresh.stderr


def test_auto_resume_of_a_fine_tune_a_finished_run_and_an_edited_dropout(with_shakespeare, workspace):
    """Audit: a fine-tune (--init-from with --size) under --auto-resume failed on every run after its first ("another
    model": the run has its weights' shape, not the preset's); a finished run exited 1, so a job submitted once more
    was marked failed; an edited model.dropout was dropped without a note; a changed shape named no key."""
    assert train_tiny("--name", "base", steps=2).exit_code == 0
    job = ("--init-from", "base", "--size", "micro", "--name", "ft", "--auto-resume")
    first = invoke("train", *job, "--max-steps", "2", "--batch-size", "2", "--set", "train.eval_interval=2",
                   "--set", "train.eval_batches=1")
    assert first.exit_code == 0, first.output
    again = invoke("train", *job, "--max-steps", "3", "--batch-size", "2", "--set", "train.eval_interval=2",
                   "--set", "train.eval_batches=1")
    assert again.exit_code == 0 and "resumed from" in again.stderr, again.output
    done = invoke("train", *job, "--max-steps", "3", "--batch-size", "2")
    assert done.exit_code == 0 and "Run ft is complete (3 steps): nothing to train" in done.stderr, done.output
    past = invoke("train", *job, "--max-steps", "2", "--batch-size", "2")  # QA: it said "complete (2 steps)"
    assert past.exit_code == 0, past.output
    assert "Run ft is at step 3, past max_steps 2: nothing to train; a --max-steps above 3 goes on" in past.stderr
    yaml_file = workspace / "run.yaml"
    yaml_file.write_text("model:\n  dropout: 0.0\n")
    assert train_tiny("--config", str(yaml_file), "--name", "dr", "--auto-resume", steps=2).exit_code == 0
    yaml_file.write_text("model:\n  dropout: 0.2\n")
    noted = train_tiny("--config", str(yaml_file), "--name", "dr", "--auto-resume", steps=3)
    assert noted.exit_code == 0 and "goes on with its own model.dropout" in noted.stderr, noted.output
    yaml_file.write_text("model:\n  bias: false\n")
    assert_one_line_error(train_tiny("--config", str(yaml_file), "--name", "dr", "--auto-resume", steps=4),
                          "(model.bias True → False)")


def test_progress_animates_only_on_a_terminal_that_redraws(with_shakespeare, workspace):
    """Terminal audit: under FORCE_COLOR a pipe counts as a terminal to rich, and a train log filled with redrawn
    frames (60 kB in 36 s, never a newline), the plain once-a-minute lines never printed; under TERM=dumb a real
    terminal, which shows no redraw, got no progress at all. Both get the plain lines."""
    import io

    from rich.console import Console

    from tinygpt_cli import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert cli._animated(Console(file=Terminal(), force_terminal=True, _environ={"TERM": "xterm"}))
    assert not cli._animated(Console(file=io.StringIO(), force_terminal=True))  # FORCE_COLOR, into a pipe
    assert not cli._animated(Console(file=Terminal(), force_terminal=True, _environ={"TERM": "dumb"}))
    result = runner.invoke(app, ["train", "--size", "micro", "--set", "model.n_layer=1", "--set", "model.n_embd=32",
                                 "--set", "model.n_head=2", "--set", "model.block_size=16", "--max-steps", "2",
                                 "--set", "train.batch_size=2", "--set", "train.eval_batches=1"],
                           env={"FORCE_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert "\x1b[2K" not in result.stderr and "\r" not in result.stderr  # no redrawn frames
    assert "step 2/2 (100.0%) · loss " in result.stderr  # the plain line where the run ended


def test_eval_says_how_far_it_got_in_a_log(with_shakespeare, workspace, monkeypatch):
    """Terminal audit: with stderr in a log, eval printed nothing between its first line and its result, however
    long it took (the default million tokens, or HellaSwag on a large model)."""
    from test_generate_cli import make_run

    from tinygpt_cli import cli

    make_run(workspace)
    monkeypatch.setattr(cli, "PLAIN_PROGRESS_S", 0.0)
    result = invoke("eval", "--tokens", "320", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    assert "eval: 64/320 tokens (20%)" in result.stderr and "eval: 256/320 tokens (80%)" in result.stderr


def test_text_from_the_user_is_printed_as_it_is(workspace, tmp_path):
    """Terminal audit: stderr parsed what it printed as rich markup: `[best]` in a path vanished from the line
    that named it, and a path with `[/]` in it ended tokenize with a MarkupError traceback."""
    folder = tmp_path / "x[" / "]y [best]"
    folder.mkdir(parents=True)
    (folder / "a.txt").write_text("To be, or not to be, that is the question. " * 200, encoding="utf-8")
    result = invoke("tokenize", str(folder), "--name", "odd")
    assert result.exit_code == 0, result.output
    assert str(folder) in result.stdout + result.stderr


def test_the_corpus_list_never_cuts_a_source_id(monkeypatch):
    """Terminal audit: in an 80-column terminal `download --list` showed `Skylion…` and `CDLA-Sh…`: the hub id a
    user types for `download owner/name`, and the license, were cut."""
    from rich.console import Console

    from conftest import FakeTerminal
    from tinygpt_cli import cli
    from tinygpt_cli.sources import REGISTRY

    for width in (80, 60):
        screen = FakeTerminal()
        monkeypatch.setattr(cli, "_stdout_console", lambda screen=screen, width=width: Console(
            file=screen, width=width, force_terminal=True, markup=False, highlight=False))
        result = invoke("download", "--list")
        assert result.exit_code == 0, result.output
        shown = screen.getvalue()
        assert "…" not in shown
        assert all(entry.name in shown for entry in REGISTRY.values()), shown
        if width == 80:
            assert all(entry.hub_id in shown for entry in REGISTRY.values() if entry.hub_id), shown


@pytest.mark.skipif(os.name != "posix", reason="a POSIX pipe and /dev/null")
def test_help_into_a_pipe_closed_early_exits_as_sigpipe_would():
    """Terminal audit: `tinygpt --help | head -1` exited 1, an error's code, where rich (Typer's console) met the
    broken pipe: it points stdout at /dev/null and exits 1. It exits 141, as `generate | head` does."""
    for args in (["--help"], ["generate", "--help"]):
        process = subprocess.Popen([sys.executable, "-m", "tinygpt_cli", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        process.stdout.close()  # the reader is gone before the first line is written
        _, err = process.communicate(timeout=120)
        assert process.returncode == 141, err
        assert "Traceback" not in err


def test_plan_into_a_pipe_is_one_line_a_row_without_padding(workspace):
    """Terminal audit: piped, `plan` folded its rows at 80 columns and padded every line with spaces to the widest."""
    result = invoke("plan", "--size", "small")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(line == line.rstrip() for line in lines)
    assert any(line.startswith("model") and line.endswith("context 1024, vocabulary 50304") for line in lines)


def test_an_error_after_the_output_went_away_keeps_its_exit_code(monkeypatch):
    """Review: once tinygpt itself had pointed a gone reader's stream at /dev/null (a training whose `| head` had
    ended goes on), the error it ended with exited 141, as if only the pipe had closed. Only rich's own exit on a
    broken pipe (Typer's help) is 141."""
    from tinygpt_cli import cli

    null = os.stat(os.devnull)
    monkeypatch.setattr(cli, "_STDOUT_PIPE", (1, 2))
    monkeypatch.setattr(cli, "_fd_identity", lambda fd, pipe=False: (null.st_dev, null.st_ino))
    monkeypatch.setattr(cli, "_OUTPUT_DROPPED", False)
    assert cli._exit_status(1) == (141 if os.name == "posix" else 1)
    monkeypatch.setattr(cli, "_OUTPUT_DROPPED", True)
    assert cli._exit_status(1) == 1


def test_text_with_colons_is_not_read_as_emoji_codes():
    """Review: with markup off rich still turned `:cat:` in a path or a note into an emoji."""
    from tinygpt_cli import cli

    for console in (cli._stderr_console(), cli._stdout_console()):
        with console.capture() as captured:
            console.print("note: shards/x:cat:y and [bold]z[/bold]")
        assert captured.get() == "note: shards/x:cat:y and [bold]z[/bold]\n"


def test_a_tilde_in_tinygpt_home_is_the_users_home(tmp_path, monkeypatch):
    """TINYGPT_HOME='~/tg' (quoted in a shell, or set in a Dockerfile or .env file) made a folder named `~`."""
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.setenv("TINYGPT_HOME", "~/tg")
    monkeypatch.chdir(tmp_path)
    assert "No workspace at " + str(tmp_path / "user" / "tg") in invoke("runs").output
    (tmp_path / "user" / "tg" / "data" / "d").mkdir(parents=True)
    (tmp_path / "user" / "tg" / "data" / "d" / "input.txt").write_text("hello world " * 500)
    result = invoke("tokenize", str(tmp_path / "user" / "tg" / "data" / "d" / "input.txt"), "--name", "words")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "user" / "tg" / "data" / "words" / "train.bin").is_file()
    assert not (tmp_path / "~").exists()


def test_auto_resume_of_a_finished_run_killed_before_its_report_writes_it(with_shakespeare, workspace):
    """--auto-resume of a run at its last step exited 0 ('complete') even when the kill had left it no report."""
    job = ("--name", "job", "--auto-resume")
    assert train_tiny(*job, steps=2).exit_code == 0
    report = workspace / "runs" / "job" / "report.md"
    report.unlink()
    again = train_tiny(*job, steps=2)
    assert again.exit_code == 0, again.output
    assert "no step trained; report: " in again.stdout and report.is_file()
    assert "is complete (2 steps): nothing to train" in train_tiny(*job, steps=2).stderr
    # review: a run at its --max-tokens budget, submitted again, exited 1 ("has seen N tokens, its budget")
    budget = ("--name", "budget", "--auto-resume", "--max-tokens", "64")
    assert train_tiny(*budget, steps=100).exit_code == 0
    again = train_tiny(*budget, steps=100)
    assert again.exit_code == 0, again.output
    assert "Run budget has seen 128 tokens, its --max-tokens budget: nothing to train; a larger --max-tokens goes " \
           "on with it" in " ".join(again.stderr.split())
    (workspace / "runs" / "budget" / "report.md").unlink()
    written = train_tiny(*budget, steps=100)
    assert written.exit_code == 0 and "no step trained; report: " in written.stdout
    assert "checkpoint saved" not in written.stdout and "a larger --max-tokens trains it further" in written.stderr


@pytest.mark.parametrize(("signum", "code"), [(None, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_a_stop_that_escapes_a_command_exits_128_plus_its_signal_and_nothing_cuts_the_exit(tmp_path, signum, code):
    """Chaos QA: a second Ctrl-C while tokenize or export --force cleaned up after the first escaped the command
    (Typer makes that exit 130, whatever the signal) and one landing during the interpreter's teardown killed the
    process by the signal (-2 to a subprocess caller) instead of exit 130."""
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent(f"""
        import atexit, os, signal, sys, time
        from tinygpt_cli import inventory, cli
        from tinygpt_cli.launch import Stopped

        def stopped(*args, **kwargs):
            raise Stopped({signum}) if {signum} is not None else KeyboardInterrupt()

        inventory.list_dataset_summaries = stopped

        def second_signal():  # during the teardown (a thread joined, a stalled download): it ends it, with the code
            print("teardown", flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
            print("the teardown went on")

        atexit.register(second_signal)
        sys.argv = ["tinygpt", "data"]
        cli.main()
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TINYGPT_HOME": str(tmp_path)})
    assert done.returncode == code, done.stderr
    assert "teardown" in done.stdout and "went on" not in done.stdout


def _completions(words: str) -> list[str]:
    """What `tinygpt` offers on TAB after `words` (bash), as the shell asks it."""
    typed = words.split()
    env = {"_TINYGPT_COMPLETE": "complete_bash", "COMP_WORDS": words,
           "COMP_CWORD": str(len(typed) - (0 if words.endswith(" ") else 1))}
    result = runner.invoke(app, [], env=env, prog_name="tinygpt")
    assert result.exit_code == 0, result.output
    return result.output.split()


def test_tab_completes_presets_runs_datasets_and_choices(with_shakespeare, workspace, monkeypatch):
    """Packaging QA: `tinygpt export --format <TAB>` and `train --size <TAB>` offered nothing."""
    assert _completions("tinygpt train --size m") == ["medium", "micro"]
    assert _completions("tinygpt export --format ") == ["gguf", "hf", "onnx"]
    assert _completions("tinygpt eval --task arc") == ["arc_easy", "arc_challenge"]
    assert _completions("tinygpt eval --task arc_easy,") == ["arc_easy,hellaswag", "arc_easy,lambada_openai",
                                                              "arc_easy,arc_challenge"]
    assert _completions("tinygpt plan --data tiny") == ["tinystories"]
    assert _completions("tinygpt plan --size m") == ["medium", "micro"]
    assert _completions("tinygpt eval --task all,") == []
    assert _completions("tinygpt train --data ") == ["shakespeare"]
    assert _completions("tinygpt download tiny") == ["tinystories"]
    (workspace / "runs" / "alpha" / "checkpoints").mkdir(parents=True)
    (workspace / "runs" / ".hidden").mkdir()
    assert _completions("tinygpt runs show ") == ["alpha"]
    assert _completions("tinygpt generate --run ") == ["alpha", "gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl"]
    assert _completions("tinygpt data rm ") == ["shakespeare"] and _completions("tinygpt data rm x") == []
    monkeypatch.setenv("TINYGPT_HOME", str(workspace / "nowhere"))  # no workspace there: nothing, and no error
    assert _completions("tinygpt runs show ") == []
