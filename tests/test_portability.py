"""What differs on Windows and on macOS (MPS), simulated on Linux: a platform name, a missing device, an encoding."""

import contextlib
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from tinygpt_cli import workspace

SRC = str(Path(__file__).resolve().parents[1] / "src")


# ------------------------------------------------------------------------------------------------ console encoding
def test_help_redirected_to_a_legacy_code_page_does_not_crash():
    """Windows writes a redirected stdout in the ANSI code page, strictly: `tinygpt --help > f` raised
    UnicodeEncodeError on the → of the help text."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PYTHONPATH": SRC}
    done = subprocess.run([sys.executable, "-m", "tinygpt_cli", "--help"], capture_output=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"tokenize" in done.stdout


def test_a_non_utf8_stream_on_windows_writes_utf8(monkeypatch):
    from tinygpt_cli import cli

    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="cp1252", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    monkeypatch.setattr(sys, "platform", "win32")
    cli._encodable_streams()
    print("tokenize → train ≈ 你好")
    stream.flush()
    assert raw.getvalue().decode("utf-8").strip() == "tokenize → train ≈ 你好"


class _WindowsClosedPipe(io.RawIOBase):
    """A pipe whose reader went away, as Windows reports it: EINVAL, not EPIPE, for every write while the
    descriptor is still that pipe (once it points at the null device, writes go there)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.fd

    def write(self, data) -> int:
        import stat

        if stat.S_ISFIFO(os.fstat(self.fd).st_mode):
            raise OSError(22, "Invalid argument")
        return len(data)


@pytest.mark.parametrize("args", [("download", "--list"), ("generate", "Hi", "--max-new-tokens", "5")])
def test_a_reader_gone_on_windows_exits_as_sigpipe_quietly(workspace, monkeypatch, capfd, args):
    """`tinygpt runs | more` quit early on Windows: the write fails with EINVAL, which rich and click take for an
    error (they know EPIPE only): a traceback, then "Exception ignored" at exit, and exit 1 or 120 instead of 141.
    (A table through rich, and generate's text streamed through sys.stdout.)"""
    from test_generate_cli import make_run

    from tinygpt_cli import cli

    make_run(workspace)
    read_end, write_end = os.pipe()
    os.close(read_end)
    broken = io.TextIOWrapper(io.BufferedWriter(_WindowsClosedPipe(write_end)), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["tinygpt", *args])
    monkeypatch.setattr(sys, "stdout", broken)
    monkeypatch.setattr(cli, "_on_windows", lambda: True)  # (sys.platform faked breaks imports made meanwhile)
    # after a test that opened a `datasets` stream main() ends the process with os._exit: pytest's own, here
    monkeypatch.setattr(cli, "_streams_opened", lambda: False)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 141
    broken.flush()  # what Python does at exit: the descriptor now points at the null device
    assert not stat_is_pipe(write_end)
    assert "Traceback" not in capfd.readouterr().err
    os.close(write_end)


def stat_is_pipe(fd: int) -> bool:
    import stat

    return stat.S_ISFIFO(os.fstat(fd).st_mode)


def test_einval_that_is_no_closed_pipe_stays_an_error(monkeypatch):
    """EINVAL for a path (Windows' answer to a name with ':' in it) is not a reader gone, nor is EINVAL elsewhere."""
    from tinygpt_cli import cli

    monkeypatch.setattr(cli, "_on_windows", lambda: True)
    assert not cli._reader_went_away(OSError(22, "Invalid argument", "C:/runs/a:b"))
    monkeypatch.setattr(cli, "_on_windows", lambda: False)
    assert not cli._reader_went_away(OSError(22, "Invalid argument"))
    assert cli._as_broken_pipe() is None  # (review) no standard stream that fails: the EINVAL is another error's
    assert cli._reader_went_away(BrokenPipeError(32, "Broken pipe"))


def test_commands_to_copy_are_quoted_for_the_platforms_shell(monkeypatch):
    """The "make it again with `tinygpt tokenize ...`" advice single-quoted a Windows path ('C:\\My Data\\x.txt'),
    quotes that cmd.exe hands to the program as part of the name."""
    from tinygpt_cli import data

    words = ["tinygpt", "tokenize", "C:\\My Data\\x.txt", "--name", "x"]
    assert data.command_line(words) == "tinygpt tokenize 'C:\\My Data\\x.txt' --name x"
    monkeypatch.setattr(data.sys, "platform", "win32")
    assert data.command_line(words) == 'tinygpt tokenize "C:\\My Data\\x.txt" --name x'


# ------------------------------------------------------------------------------------------------ MPS
def test_fused_adamw_found_inf_is_left_alone_on_mps():
    from tinygpt_cli.training import skips_on_device

    assert skips_on_device(torch.device("cpu")) and skips_on_device(torch.device("cuda"))
    assert not skips_on_device(torch.device("mps"))


def test_non_finite_steps_are_skipped_where_fused_adamw_takes_no_found_inf(with_shakespeare, monkeypatch):
    """MPS's fused AdamW asserts found_inf is None (torch 2.4) or ignores it: training must not hand it one, and
    must skip a non-finite step itself."""
    from tinygpt_cli import model as model_module
    from tinygpt_cli import training as train_module
    from tinygpt_cli.errors import TrainingError

    steps = []
    real_step = torch.optim.AdamW.step

    def mps_like_step(self, *args, **kwargs):
        assert getattr(self, "found_inf", None) is None, "found_inf on MPS"  # as torch 2.4's _fused_adamw
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", mps_like_step)
    monkeypatch.setattr(train_module, "skips_on_device", lambda device: False)
    result = train_module.train(tiny_config(max_steps=2, eval_interval=1000), run_name="finite")
    assert result.steps == 2 and len(steps) == 2  # finite steps are taken

    steps.clear()
    monkeypatch.setattr(model_module, "chunked_cross_entropy",
                        lambda *args, **kwargs: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(TrainingError, match="non-finite loss or gradient"):
        train_module.train(tiny_config(max_steps=20, eval_interval=1000), run_name="nan")
    assert steps == []  # every step was non-finite: none reached the optimizer


class _MPSLike:
    """A tensor as MPS has it: no float64 (`.double()` raises as torch's MPS backend does)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def double(self):
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64")

    def cpu(self):
        return self.tensor


def test_task_scoring_takes_nats_off_an_mps_device_before_float64(monkeypatch):
    from tinygpt_cli import evaluation as evaluate
    from tinygpt_cli.config import ModelConfig
    from tinygpt_cli.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50304)).eval()
    real = evaluate.token_nats
    monkeypatch.setattr(evaluate, "token_nats", lambda *args: _MPSLike(real(*args)))
    examples = [evaluate.Example("Some words", ("one", "two two"), 1)]
    accuracy, accuracy_norm = evaluate.score_examples(model, examples)
    assert accuracy in (0.0, 1.0) and accuracy_norm in (0.0, 1.0)


# ------------------------------------------------------------------------------------------------ Windows names
@pytest.mark.parametrize("name", ["nul", "CON", "aux.txt", "com1", "Lpt9.data"])
def test_windows_device_names_are_no_folder_names(name):
    assert workspace.safe_name(name) != name
    assert "device name on Windows" in workspace.name_problem(name, "data/", "my-data")
    assert workspace.name_problem(workspace.safe_name(name), "data/", "my-data") is None


@pytest.mark.parametrize("name", ["console", "nullable", "auxiliary", "com10", "lpt", "my-con"])
def test_names_that_only_start_like_a_device_stay(name):
    assert workspace.safe_name(name) == name and workspace.name_problem(name, "data/", "x") is None


def test_a_dataset_named_after_a_file_called_like_a_device(workspace, tmp_path):
    from tinygpt_cli.sources import resolve_source

    text = tmp_path / "aux.txt"
    text.write_text("To be, or not to be.\n" * 50, encoding="utf-8")
    assert resolve_source(str(text), "text").name == "aux_"


# ------------------------------------------------------------------------------------------------ Windows signals
def test_ctrl_break_stops_like_ctrl_c_where_there_is_one(monkeypatch):
    from tinygpt_cli import launch

    monkeypatch.delattr(signal, "SIGHUP", raising=False)
    monkeypatch.setattr(signal, "SIGBREAK", 21, raising=False)
    assert launch.stop_signals() == (signal.SIGINT, signal.SIGTERM, 21)


# ------------------------------------------------------------------------------------------------ Windows --nproc
def test_a_launcher_without_libuv_says_what_to_do(monkeypatch):
    import torch.distributed.launcher.api as launcher_api

    from tinygpt_cli.errors import TinyGPTError
    from tinygpt_cli.launch import launch

    def no_libuv(config, entrypoint):
        raise RuntimeError("use_libuv was requested but PyTorch was built without libuv support, run with "
                           "USE_LIBUV=0 to disable it.")

    monkeypatch.setattr(launcher_api, "elastic_launch", no_libuv)
    with pytest.raises(TinyGPTError, match="no libuv.*drop --nproc") as caught:
        launch(2, ["train", "--nproc", "2"])
    assert "torchrun yourself" not in str(caught.value)


# ------------------------------------------------------------------------------------------------ Windows fsync
@pytest.fixture
def windows_fsync(monkeypatch):
    """os.fsync as Windows has it: _commit -> FlushFileBuffers, which needs a handle with write access (EBADF)."""
    import errno
    import fcntl

    real = os.fsync

    def fsync(fd):
        if not os.path.isdir(f"/proc/self/fd/{fd}") and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_export_flushes_its_files_through_writable_handles(with_shakespeare, workspace, windows_fsync):
    from tinygpt_cli.export import export_model
    from tinygpt_cli.training import train

    train(tiny_config(max_steps=1, eval_interval=1), run_name="r")
    result = export_model("r", "hf", workspace / "exported")
    assert (result.path / "model.safetensors").is_file()


def test_a_downloaded_part_is_flushed_through_a_writable_handle(tmp_path, windows_fsync):
    pytest.importorskip("pyarrow")
    from tinygpt_cli.download import _write_part

    assert _write_part(tmp_path / "part-0.parquet", ["one", "two"]) > 0


def test_the_prompt_loop_names_the_windows_end_of_input(workspace, monkeypatch):
    from test_generate_cli import generate, make_run

    from tinygpt_cli import cli

    assert cli._end_of_input() == "Ctrl-D"
    with monkeypatch.context() as patch:
        patch.setattr(cli, "_on_windows", lambda: True)
        windows = cli._end_of_input()
    assert windows == "Ctrl-Z then Enter"
    make_run(workspace)
    monkeypatch.setattr(cli, "_stdin_is_interactive", lambda: True)
    monkeypatch.setattr(cli, "_end_of_input", lambda: windows)
    result = generate("--max-new-tokens", "2", input="ROMEO:\n")
    assert result.exit_code == 0, result.output
    assert "Ctrl-Z then Enter leaves" in result.stderr


def test_git_bash_says_that_it_reads_the_prompt_from_standard_input(workspace, monkeypatch):
    """Git Bash's window (mintty) is a pipe to a Windows program, so a bare `tinygpt generate` waited on standard
    input without a word, where a console opens the prompt loop."""
    from test_generate_cli import generate, make_run

    from tinygpt_cli import cli

    make_run(workspace)
    monkeypatch.setattr(cli, "_on_windows", lambda: True)
    monkeypatch.setenv("MSYSTEM", "MINGW64")
    result = generate("--max-new-tokens", "2", input="ROMEO:")
    assert result.exit_code == 0, result.output
    assert "Reading the prompt from standard input until it ends" in result.stderr and "winpty" in result.stderr
    assert result.stdout.startswith("ROMEO:")
    monkeypatch.delenv("MSYSTEM")
    assert "Reading the prompt" not in generate("--max-new-tokens", "2", input="ROMEO:").stderr


def test_fp16_training_on_mps_is_refused_rather_than_unscaled(with_shakespeare, monkeypatch):
    """GradScaler("cuda") on a Mac warns and disables itself: fp16 gradients would underflow, unscaled."""
    from tinygpt_cli import training as train_module
    from tinygpt_cli.errors import TrainingError

    monkeypatch.setattr(train_module, "resolve_device", lambda name: torch.device("mps"))
    with pytest.raises(TrainingError, match="fp16 .* MPS"):
        train_module.train(tiny_config(max_steps=1, dtype="fp16", device="mps"), run_name="half")


def test_plan_refuses_the_dtypes_train_refuses_on_a_mac():
    """plan planned an fp16 run on MPS that train then refused (and measured it with the scaler train avoids)."""
    from tinygpt_cli.errors import ConfigError
    from tinygpt_cli.plan import plan

    for device, dtype in [("mps", "fp16"), ("cpu", "fp16")]:
        with pytest.raises(ConfigError, match=f"fp16 .*{device.upper()}"):
            plan(tiny_config(dtype=dtype), device=device)
    assert plan(tiny_config(dtype="bf16"), device="mps").parameters > 0


def test_bf16_on_mps_needs_a_torch_and_macos_that_have_it(monkeypatch):
    """torch 2.5 turned MPS autocast off for bf16 with a warning (the run trained in fp32, saying bf16) and macOS 13
    has no bf16 on the GPU at all: refused in one line there, for training and for loading a model alike."""
    from tinygpt_cli import training
    from tinygpt_cli.errors import TrainingError

    mps = torch.device("mps")
    monkeypatch.setattr(torch, "__version__", "2.6.0")  # (the tests may run on an older torch)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: (major, minor) <= (14, 0))
    assert training.resolve_dtype("bf16", mps) == torch.bfloat16
    assert training.resolve_dtype("fp16", mps) == torch.float16  # generation's weights: no scaler involved
    for version, macos in [("2.5.1", 14), ("2.13.0", 13)]:
        monkeypatch.setattr(torch, "__version__", version)
        monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor, m=macos: major <= m)
        with pytest.raises(TrainingError, match=r"bf16 on Apple's GPU \(MPS\) needs macOS 14 and torch 2.6"):
            training.resolve_dtype("bf16", mps, training=True)


def test_torch_2_4_on_a_mac_has_no_mps_autocast_to_ask_about_or_use(monkeypatch):
    """torch 2.4 (the floor) raises "unknown device type for autocast" for MPS: the loss's fp16 question crashed
    every fp32 train and eval on a Mac there, and `eval --dtype fp16` reached torch's error."""
    from tinygpt_cli import model, training
    from tinygpt_cli.errors import TrainingError

    def no_mps_autocast(device_type):
        if device_type == "mps":
            raise RuntimeError("unknown device type for autocast in get_autocast_dispatch_key_from_device_type")
        return False

    monkeypatch.setattr(torch, "is_autocast_enabled", no_mps_autocast)
    assert model._autocast_fp16("mps") is False
    monkeypatch.setattr(torch, "__version__", "2.4.1")
    assert isinstance(training.autocast_context(torch.device("mps"), torch.float32), contextlib.nullcontext)
    with pytest.raises(TrainingError, match=r"--dtype fp16 on Apple's GPU \(MPS\) needs torch 2.5"):
        training.autocast_context(torch.device("mps"), torch.float16)
    monkeypatch.setattr(torch, "__version__", "2.5.0")
    assert training.autocast_context(torch.device("cpu"), torch.bfloat16) is not None


def test_a_resume_on_mps_goes_on_with_the_gpus_random_state(monkeypatch):
    """Only the CPU's and CUDA's random states were saved: a resumed run on a Mac drew other dropout masks."""
    import json

    from tinygpt_cli import training

    kept = torch.arange(16, dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.mps, "get_rng_state", lambda: kept.clone())
    monkeypatch.setattr(torch.mps, "set_rng_state", restored.append)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    state = json.loads(json.dumps(training._rng_state(torch.device("mps"))))  # as the checkpoint keeps it
    training._restore_rng(state)
    assert len(restored) == 1 and torch.equal(restored[0], kept)
    assert "mps" not in training._rng_state(torch.device("cpu"))


def test_a_rename_waits_out_a_scanner_holding_the_file_on_windows(tmp_path, monkeypatch):
    """A virus scanner opens each file just written, for a moment, and Windows then refuses to rename it: a saved
    checkpoint failed as if the disk were full (portability review). The rename is tried again there, briefly."""
    source, target = tmp_path / "new", tmp_path / "final"
    source.write_text("x")
    real, refusals = os.replace, []

    def held_open(a, b):
        if len(refusals) < 3:
            refusals.append(a)
            raise PermissionError(13, "The process cannot access the file because it is being used")
        real(a, b)

    monkeypatch.setattr(os, "replace", held_open)
    monkeypatch.setattr(workspace.time, "sleep", lambda seconds: None)
    with pytest.raises(PermissionError):  # elsewhere a refusal is the file's permissions: said at once
        workspace.replace(source, target)
    assert len(refusals) == 1
    monkeypatch.setattr(sys, "platform", "win32")
    workspace.replace(source, target)
    assert target.read_text() == "x" and len(refusals) == 3
    refusals.clear()
    monkeypatch.setattr(workspace, "REPLACE_PATIENCE_S", 0.1)  # held for good: the error, after the wait
    target.rename(source)
    with pytest.raises(PermissionError):
        workspace.replace(source, target)


def test_an_export_killed_on_windows_leaves_nothing_for_good(tmp_path, monkeypatch):
    """Off POSIX every process counted as running, so the folders of a killed export stayed forever (portability
    review). Windows is asked whether the process runs, without os.kill (which would terminate it there)."""
    import ctypes

    from tinygpt_cli import export

    running, ended, denied = 100, 200, 300

    class Kernel32:  # its functions as ctypes has them: objects whose restype and argtypes can be set
        error = 0

        def __init__(self):
            def open_process(access, inherit, pid):
                Kernel32.error = 5 if pid == denied else 87
                return pid if pid in (running, ended) else None  # a c_void_p NULL reads as None

            def exit_code(handle, code):
                code._obj.value = 259 if handle == running else 1
                return 1

            self.OpenProcess, self.GetExitCodeProcess, self.CloseHandle = open_process, exit_code, lambda h: 1

    monkeypatch.setattr(sys, "platform", "win32")
    kernel32 = Kernel32()
    monkeypatch.setattr(ctypes, "WinDLL", lambda name, use_last_error: kernel32, raising=False)
    monkeypatch.setattr(ctypes, "get_last_error", lambda: Kernel32.error, raising=False)  # Windows only
    monkeypatch.setattr(os, "kill", lambda *args: pytest.fail("os.kill terminates a process on Windows"))
    exports = tmp_path / "exports"
    for pid in (running, ended, denied, 400):
        (exports / f".m.tmp-{pid}").mkdir(parents=True)
    export._remove_stale_temps(exports, "m")
    assert sorted(p.name for p in exports.iterdir()) == [f".m.tmp-{running}", f".m.tmp-{denied}"]
    assert kernel32.OpenProcess.restype is ctypes.c_void_p  # a 64-bit handle, not cut to an int


# ------------------------------------------------------------------------------------------------ Windows locks
class _FakeMsvcrt:
    """msvcrt's byte-range locks as Windows keeps them: per open handle, refused (EACCES) to any other handle."""

    LK_UNLCK, LK_NBLCK = 0, 2

    def __init__(self):
        self.holders: dict[int, int] = {}  # file (inode) -> fd holding byte 0

    def locking(self, fd, mode, nbytes):
        import errno

        assert nbytes == 1 and os.lseek(fd, 0, os.SEEK_CUR) == 0  # byte 0
        inode = os.fstat(fd).st_ino
        if mode == self.LK_UNLCK:
            assert self.holders.pop(inode) == fd
        elif self.holders.setdefault(inode, fd) != fd:
            raise OSError(errno.EACCES, "Permission denied")


def test_locks_on_windows_use_byte_range_locks(workspace, monkeypatch):
    """fcntl is missing on Windows, and locks were a no-op there: two trainings of one run went unguarded and
    `tinygpt runs` never showed a run as training."""
    import tinygpt_cli.workspace as ws
    from tinygpt_cli.errors import TrainingError

    fake = _FakeMsvcrt()
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    monkeypatch.setitem(sys.modules, "msvcrt", fake)
    monkeypatch.setattr(ws, "LOOK_GRACE_S", 0.05)
    lock = ws.lock_of(workspace / "runs" / "x")
    lock.parent.mkdir(parents=True)
    assert not ws.held(lock)
    with ws.exclusive(lock, "runs/x"):
        assert ws.held(lock) and fake.holders  # a look does not take it away
        with pytest.raises(TrainingError, match="busy"), ws.exclusive(lock, "runs/x", TrainingError("busy")):
            pass
    assert not fake.holders and not lock.exists() and not ws.held(lock)
    with ws.exclusive(lock, "runs/x"):  # free again
        pass


# ------------------------------------------------------------------------------------------------ packaging
def test_every_file_the_package_reads_is_in_its_wheel():
    """A wheel (`pipx install tinygpt`) holds the package's modules and only the other files that
    pyproject.toml's package-data names: a new asset left out of it would work from a clone and fail installed."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["tinygpt_cli"]
    package = root / "src" / "tinygpt_cli"
    shipped = {p for pattern in patterns for p in package.glob(pattern)}
    files = {p for p in package.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")}
    assert files - shipped == set(), "add these to [tool.setuptools.package-data] in pyproject.toml"
    assert {"r50k_base.tiktoken", "LICENSE-shakespeare.txt"} <= {p.name for p in shipped}
    assert len([p for p in shipped if p.parent.name == "shakespeare"]) == 42
    # review: `packages` is a list (examples/ is mapped in as tinygpt_cli.examples): a folder of the package left
    # out of it would be left out of the wheel, a module in it too
    setuptools = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    folders = {".".join(("tinygpt_cli", *folder.relative_to(package).parts))
               for folder in (package, *package.rglob("*")) if folder.is_dir() and folder.name != "__pycache__"}
    listed = set(setuptools["packages"])
    assert folders <= listed, "add these to [tool.setuptools] packages in pyproject.toml"
