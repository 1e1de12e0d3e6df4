"""The `tinygpt` command: a thin Typer + rich shell over the library.

This is the only module that imports typer/rich. Torch is imported inside commands, so `--help` is instant.
Errors have one boundary (`TinyGPTGroup.invoke`): a `TinyGPTError` becomes one red line on stderr and
exit code 1 (the traceback too with TINYGPT_DEBUG=1); usage errors exit 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import stat
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from typer import core as _typer_core
from typer.core import TyperCommand, TyperGroup

from tinygpt_cli import __version__
from tinygpt_cli.errors import (
    DENIED,
    FULL,
    PATH_ADVICE,
    READ_ONLY,
    TinyGPTError,
    allocation_failed,
    os_problem,
)
from tinygpt_cli.workspace import counted, format_bytes

_QUIET = False  # set by `tinygpt --quiet`: no progress or status lines (errors and results still show)


# Markup off: what they print holds user text (paths, prompts, names), and `shards/[a-z].jsonl` would lose its
# brackets, `x[/]y` end in rich's MarkupError; a line that styles itself passes markup=True with escape()d text
def _stderr_console(quiet: bool | None = None):
    return _console_class()(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False,
                            quiet=_QUIET if quiet is None else quiet)


def _stdout_console():
    return _console_class()(highlight=False, soft_wrap=True, markup=False, emoji=False)


def _on_terminal(console) -> bool:
    """Whether `console` writes to a terminal: one rich takes for one (not NO_TTY) that is one (rich calls a pipe
    one under FORCE_COLOR or TTY_COMPATIBLE). A table then fits its width; in a pipe it is one line a row."""
    if not console.is_terminal:
        return False
    try:
        return bool(console.file.isatty())
    except (AttributeError, ValueError, OSError):  # a file object without a descriptor, or a closed one
        return False


def _animated(console) -> bool:
    """Whether a progress bar can redraw in place on `console`: a terminal (`_on_terminal`: under FORCE_COLOR a log
    would fill with redrawn frames) that is not TERM=dumb (which shows no redraw at all). Elsewhere progress is
    plain lines every PLAIN_PROGRESS_S."""
    return _on_terminal(console) and not console.is_dumb_terminal


@functools.cache
def _console_class():
    """rich's Console, but a reader that goes away (`| head`, a dead `tee`, an ssh session without a tty that
    dropped) raises BrokenPipeError, an OSError, where rich exits 1 at once: training then goes on to its
    checkpoints without a view, as it does when the terminal hangs up, instead of dying before the save its eval
    line was printed for (audit). What is written after that is dropped."""
    from rich.console import Console

    class QuietOnBrokenPipe(Console):
        def _check_buffer(self) -> None:  # rich takes only BrokenPipeError for a reader gone; Windows says EINVAL
            try:
                super()._check_buffer()
            except BrokenPipeError:  # rich's own handler raised it (on_broken_pipe below)
                raise
            except OSError as exc:
                if not _reader_went_away(exc):
                    raise
                self.on_broken_pipe()

        def on_broken_pipe(self) -> None:
            self.quiet = True
            _drop_output_like(self.file)
            raise BrokenPipeError(errno.EPIPE, "the reader of the output went away")

    return QuietOnBrokenPipe


_OUTPUT_DROPPED = False  # `_drop_output_like` pointed a stream at /dev/null: the command went on, its exit is its own


def _drop_output_like(broken) -> None:
    """Point the standard streams that write where `broken` does at /dev/null (as rich does with stdout), so that
    nothing later, nor Python's flush at exit, fails on it again."""
    global _OUTPUT_DROPPED
    _OUTPUT_DROPPED = True
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stream with no descriptor (tests, notebooks)
        broken_fd = broken.fileno()
        broken_file = os.fstat(broken_fd)
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                fd = stream.fileno()
                same = os.fstat(fd)
                # Windows gives pipes and consoles no inode (0): there only the broken stream itself is known
                if fd == broken_fd or (broken_file.st_ino and (same.st_dev, same.st_ino) == (broken_file.st_dev,
                                                                                            broken_file.st_ino)):
                    os.dup2(devnull, fd)
        os.close(devnull)


def _reader_went_away(exc: OSError) -> bool:
    """Whether `exc`, raised by a write of the output, says its reader went away (`| head`): EPIPE, or on Windows
    EINVAL from a write to a pipe (how Windows reports a closed pipe, where click and rich expect EPIPE)."""
    if exc.errno == errno.EPIPE:
        return True
    if not _on_windows() or exc.errno != errno.EINVAL or exc.filename is not None:
        return False
    return any(_is_pipe(stream) for stream in (sys.stdout, sys.stderr))


def _on_windows() -> bool:
    return sys.platform == "win32"


def _is_pipe(stream) -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
    except (OSError, ValueError, AttributeError):
        return False


def _as_broken_pipe() -> BrokenPipeError | None:
    """Windows' EINVAL for a pipe whose reader went away, as the BrokenPipeError click takes for one (its exit then
    becomes 141), where a standard stream that is a pipe cannot be written indeed (None where each can: the EINVAL
    was another error's, said as it is). The stream that cannot be written is pointed at the null device, so that
    Python's flush at exit does not fail on it again."""
    broken = False
    for stream in (sys.stdout, sys.stderr):
        if _is_pipe(stream):
            try:
                stream.flush()
            except OSError:
                _drop_output_like(stream)
                broken = True
    return BrokenPipeError(errno.EPIPE, "the reader of the output went away") if broken else None


# click's UsageError: recent Typer carries its own copy of click (typer._click), older Typer uses click itself
_UsageError = (getattr(_typer_core, "_click", None) or _typer_core.click).exceptions.UsageError


class _FlagsTakeNoValue:
    """Recent Typer prints each flag's type where a value would go (`--json <bool>`), as if it took one: a flag's
    type column is left empty."""

    def get_params(self, ctx):  # type: ignore[no-untyped-def]
        params = super().get_params(ctx)  # type: ignore[misc]
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class _Command(_FlagsTakeNoValue, TyperCommand):
    pass


class _Group(_FlagsTakeNoValue, TyperGroup):
    pass


def _usage_error(exc: Exception, root: Any = None) -> Exception:
    """A command line that cannot be parsed, as one error line (not Typer's boxed usage) and exit code 2; `root`:
    the program's context, which knows the command an error without one of its own was met in. `tinygpt` alone
    (its help, printed already) is left as it is."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        return exc
    ctx = getattr(exc, "ctx", None)
    if ctx is not None:  # the commands' names under the program's, which is `tinygpt` whatever ran it (not the
        words = []  # `python -m tinygpt_cli` of command_path)
        while ctx.parent is not None:
            words.insert(0, ctx.info_name)
            ctx = ctx.parent
    else:
        words = [root.invoked_subcommand] if root is not None and root.invoked_subcommand else []
    command = " ".join(["tinygpt", *words])
    if words[-1:] == ["tokenize"] and "unexpected extra argument" in getattr(exc, "message", ""):
        print_error(TinyGPTError("tokenize takes one SOURCE: put the files in one folder, or quote a glob so "
                                 "that the shell leaves it to tinygpt (tinygpt tokenize 'shards/*.jsonl')"))
    else:
        message = exc.format_message().rstrip(".")  # type: ignore[attr-defined]
        print_error(TinyGPTError(f"{message}; `{command} -h` lists what it takes"))
    return typer.Exit(2)


class TinyGPTGroup(_FlagsTakeNoValue, TyperGroup):
    """Turns library errors into one line and exit code 1, and command lines that cannot be parsed into one line
    and exit code 2, for `tinygpt` and for CliRunner alike."""

    def make_context(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        try:  # the program's own options (`tinygpt --bogus`) are parsed here, before any command is invoked
            return super().make_context(*args, **kwargs)
        except _UsageError as exc:
            raise _usage_error(exc) from None

    def invoke(self, ctx):  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except _UsageError as exc:
            raise _usage_error(exc, ctx) from None
        except TinyGPTError as exc:
            _debug_traceback()
            print_error(exc)
            raise typer.Exit(1) from None
        except (MemoryError, RuntimeError) as exc:  # an allocation the machine refused that no estimate foresaw
            if isinstance(exc, RuntimeError) and str(exc).startswith(_LINK_LOOP):
                print_error(TinyGPTError(f"{exc}: {PATH_ADVICE[errno.ELOOP]}"))
                raise typer.Exit(1) from None
            if not allocation_failed(exc):
                raise
            _debug_traceback()
            advice = _MEMORY_ADVICE.get(ctx.invoked_subcommand or "", "close what else uses the memory, or give "
                                                                        "the command less at once")
            print_error(TinyGPTError(f"out of memory: an allocation did not fit in this machine's memory: {advice}"))
            raise typer.Exit(1) from None
        except OSError as exc:  # a full disk or a read-only folder that no check above foresaw: still one line
            gone = _as_broken_pipe() if exc.errno != errno.EPIPE and _reader_went_away(exc) else None
            if gone is not None:
                raise gone from None
            advice = _os_advice(exc, ctx.invoked_subcommand or "")
            if advice is None:
                raise
            _debug_traceback()
            where = f" ({exc.filename})" if exc.filename else ""
            print_error(TinyGPTError(f"{exc.strerror}{where}: {advice}"))
            raise typer.Exit(1) from None


def _debug_traceback() -> None:
    """The traceback of the error being handled, on stderr, with TINYGPT_DEBUG=1 (for a bug report)."""
    if os.environ.get("TINYGPT_DEBUG"):
        import traceback

        traceback.print_exc()


_MEMORY_ADVICE = {
    "train": "the model shape (model.n_embd, model.n_layer, model.vocab_size) or the batch is too large, or other "
             "programs hold the memory: check the sizes with `tinygpt plan` and use smaller ones",
    "generate": "ask for fewer --num-samples, or sample from a smaller model",
}


def _stdout_disk_full() -> bool:
    """Whether stdout is a file on a disk with less than 1 MB free (`generate > out.txt` on a full disk)."""
    import stat

    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        disk = os.fstatvfs(fd)
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False
    return disk.f_bavail * disk.f_frsize < 1 << 20


def _os_advice(exc: OSError, command: str = "") -> str | None:
    """What to do about an OSError no command foresaw, by its errno; None for one this does not know. Only export
    has --out."""
    if exc.filename is None and os_problem(exc) == FULL and _stdout_disk_full():
        return "stdout goes to a file on a full disk: free some space there, or send the output elsewhere"
    where = "--out (or TINYGPT_HOME)" if command == "export" else "TINYGPT_HOME"
    advice = {FULL: f"free some space, or point {where} at a larger disk",
              READ_ONLY: f"point {where} at a writable folder",
              DENIED: f"check the permissions of that file or folder; to write elsewhere, point {where} at a folder "
                      f"you can write"}
    return PATH_ADVICE.get(exc.errno) or advice.get(os_problem(exc) or "")


_LINK_LOOP = "Symlink loop"  # how Path.resolve says ELOOP before Python 3.13 (a RuntimeError)


def print_error(exc: Exception) -> None:
    """The one-line `error: ...` on stderr (shown under --quiet too)."""
    from rich.markup import escape

    from tinygpt_cli.launch import report_rank_error

    if report_rank_error(str(exc)):  # a worker of `train --nproc`: the launcher says it, once for all ranks
        return
    _stderr_console(quiet=False).print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, soft_wrap=True)


app = typer.Typer(
    name="tinygpt",
    cls=TinyGPTGroup,
    help="Train a GPT-2 from scratch: tokenize → train → generate, offline on the embedded corpus.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"tinygpt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress or status lines on stderr; errors and results stay.")
    ] = False,
) -> None:
    """Train a GPT-2 from scratch: tokenize → train → generate, offline on the embedded corpus.

    Everything lives under $TINYGPT_HOME (default: the current folder): data/<name>/ and runs/<name>/.
    """
    global _QUIET
    _QUIET = quiet


# ----------------------------------------------------------------------------------------- shared options
# help panels of `tinygpt train`, which has the most options
_P_WHAT = "What to train"
_P_RUN = "Run folder"
_P_BUDGET = "Budget"
_P_OPT = "Optimisation"
_P_HW = "Hardware"


def _completion(names: Callable[[], Iterable[str]]) -> Callable[[str], list[str]]:
    """A Typer autocompletion (run only when the shell asks, on TAB): the values of `names()` that start with what
    is typed; none where they cannot be read, and the shell then completes file names (a run or dataset folder)."""
    def complete(incomplete: str) -> list[str]:
        try:
            return sorted(name for name in names() if name.startswith(incomplete))
        except Exception:  # an error printed into the command line being typed would be worse than none
            return []
    return complete


def _folders_in(folder: Path, marker: str | None = None) -> list[str]:
    """The names of `folder`'s folders (not hidden), those holding `marker` where given."""
    return [child.name for child in folder.iterdir() if child.is_dir() and not child.name.startswith(".")
            and (marker is None or (child / marker).is_file())]


def _run_names() -> list[str]:
    from tinygpt_cli import workspace

    return _folders_in(workspace.runs_dir())


def _model_names() -> list[str]:
    """Runs, and the Hugging Face GPT-2 checkpoints by name."""
    from tinygpt_cli.config import HUB_MODELS

    return [*_run_names(), *HUB_MODELS]


def _dataset_names() -> list[str]:
    from tinygpt_cli import workspace

    return _folders_in(workspace.data_dir(), "meta.json")


def _config_names(name: str) -> Callable[[str], list[str]]:
    """A completion of the names config.py keeps as `name` (a tuple, or a dict's keys), imported on TAB only."""
    def names() -> Iterable[str]:
        from tinygpt_cli import config

        return getattr(config, name)
    return _completion(names)


def _export_dtypes() -> set[str]:
    from tinygpt_cli.config import FORMAT_DTYPES

    return {dtype for dtypes in FORMAT_DTYPES.values() for dtype in dtypes}


def _task_names(incomplete: str) -> list[str]:
    """--task's names, and after a comma the list so far with each name not in it yet (`arc_easy,<TAB>`)."""
    from tinygpt_cli.config import EVAL_TASKS

    done, _, last = incomplete.rpartition(",")
    taken = done.split(",") if done else []
    if "all" in taken:  # all of them already
        return []
    prefix = f"{done}," if done else ""
    return [f"{prefix}{name}" for name in (*EVAL_TASKS, *(() if done else ("all",)))
            if name not in taken and name.startswith(last)]


def _corpus_names() -> list[str]:
    from tinygpt_cli.sources import REGISTRY

    return list(REGISTRY)


_CONFIG_HELP = "YAML file with model/data/train sections, or a shipped example: examples/NAME.yaml."
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (same seed → same result).")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | mps.",
                                               autocompletion=_config_names("DEVICES"))]
ModelDeviceOpt = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.",
                                                    autocompletion=_config_names("DEVICES"))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking (needed where stdin is no terminal).")]
# train's options that change a plan too: `tinygpt plan` takes them, so that a train command line plans as it is
MaxTokensOpt = Annotated[
    int | None, typer.Option(rich_help_panel=_P_BUDGET, help="Stop with a checkpoint after this many tokens.")]
MaxMinutesOpt = Annotated[
    float | None, typer.Option(rich_help_panel=_P_BUDGET, help="Stop with a checkpoint after this many minutes.")]
DropoutOpt = Annotated[
    float | None, typer.Option(rich_help_panel=_P_WHAT, help="Dropout (0 for pretraining; ~0.1 to fine-tune).")]
KeepLastOpt = Annotated[
    int | None, typer.Option(rich_help_panel=_P_RUN,
                             help="Checkpoints to keep (older ones are pruned; the best val loss's is kept too).")]
CompileOpt = Annotated[str | None, typer.Option("--compile", rich_help_panel=_P_HW, help="auto | on | off.",
                                                autocompletion=_config_names("COMPILE_MODES"))]
InitFromOpt = Annotated[str | None, typer.Option(
    rich_help_panel=_P_WHAT, help="Start from weights: gpt2[-medium|-large|-xl], a HF GPT-2 folder or a run.",
    autocompletion=_completion(_model_names))]
LrOpt = Annotated[float | None, typer.Option(
    rich_help_panel=_P_OPT,
    help="Peak learning rate (train.min_lr follows at a tenth of it unless set, here or by the run resumed).")]
FsdpOpt = Annotated[bool | None, typer.Option(
    "--fsdp/--no-fsdp", rich_help_panel=_P_HW,
    help="Under torchrun: shard parameters and optimizer state (FSDP2). Default: the config's train.fsdp.")]


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


def _fmt_seconds(seconds: float) -> str:
    if seconds < 10:  # "0s" for a quick tokenize read as nothing done
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# ----------------------------------------------------------------------------------------- tokenize
def _fmt_size(n: float) -> str:
    return f"{n / 1e9:,.2f} GB" if n >= 1e9 else f"{n / 1e6:,.1f} MB"


class _ShownWhileOutputLasts:
    """An event callback that shows events until its output fails (OSError: a terminal that hung up, a reader that
    went away), then drops them: the work reported on goes on without a view. tokenize took a broken pipe for a
    failed write of its dataset; train died before the save its eval line was printed for."""

    def __init__(self, show: Callable[[Any], None]) -> None:
        self.show, self.gone = show, False

    def __call__(self, event: Any) -> None:
        if self.gone:
            return
        try:
            self.show(event)
        except OSError:
            self.gone = True


# Where stderr is not a terminal (`> train.log 2>&1`, nohup, a scheduler's log, ssh without a tty) no bar is
# drawn: a plain progress line is printed this often instead, so that `tail -f` shows a long job moving
PLAIN_PROGRESS_S = 60.0


class _PlainClock:
    """When the next plain progress line is due (`PLAIN_PROGRESS_S` after the last, the first one after the start)."""

    def __init__(self) -> None:
        import time

        self.now = time.monotonic
        self.last = self.now()

    def due(self) -> bool:
        if self.now() - self.last < PLAIN_PROGRESS_S:
            return False
        self.last = self.now()
        return True


class _RateView:
    """A transient bar on stderr over text bytes, with rates and ETA as the library computes them; in a log (not
    a terminal), a plain line every PLAIN_PROGRESS_S."""

    def __init__(self, console, label: str) -> None:
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

        self.label, self.console, self.total, self.clock = label, console, None, _PlainClock()
        self.plain = not _animated(console)  # a log: plain lines, no bar (a transient one leaves only a blank line)
        self.progress = Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[rates]}"),
            console=console,
            transient=True,
        )
        self.task = None

    def start(self, total_bytes: float | None) -> None:
        self.total, self.clock = total_bytes, _PlainClock()
        if self.plain:
            return
        self.task = self.progress.add_task("", total=total_bytes or None, rates="")
        self.progress.start()

    def update(self, done_bytes: float, rates: list[str], eta_s: float | None) -> None:
        eta = f" · ETA {_fmt_seconds(eta_s)}" if eta_s is not None else ""
        if self.task is None:
            if self.plain and self.clock.due():
                done = f"{min(1.0, done_bytes / self.total):.1%} · " if self.total else ""
                with contextlib.suppress(OSError):  # a log whose reader went away: the work goes on
                    self.console.print(f"{self.label}: {done}{_fmt_size(done_bytes)} of text · {' · '.join(rates)}"
                                       f"{eta}")
            return
        total = self.progress.tasks[self.task].total
        self.progress.update(
            self.task, completed=min(done_bytes, total) if total else done_bytes, rates=" · ".join(rates) + eta
        )

    def close(self) -> None:
        if self.task is not None:  # stopping a bar that never started still writes a line break
            self.progress.stop()


@app.command(
    cls=_Command,
    epilog="Examples:  tinygpt tokenize  ·  tinygpt tokenize openwebtext --fraction 0.25  ·  "
    "tinygpt tokenize books/ --name books  ·  tinygpt tokenize 'shards/*.jsonl.gz' --text-field body"
)
def tokenize(
    source: Annotated[
        str | None,
        typer.Argument(
            help="A downloaded dataset, 'shakespeare' (embedded) or a .txt/.jsonl(.gz)/.parquet file, "
            "folder or glob. Default: the last download, else the embedded corpus."
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(
        help="Dataset folder under data/: letters, digits, '.', '_' and '-' (default: from the source).")] = None,
    fraction: Annotated[float, typer.Option(help="Share of the documents to use, chosen by --seed.")] = 1.0,
    val_fraction: Annotated[float, typer.Option(
        help="Share of the used documents held out for validation (under 10 documents: of each one's end, at least "
             "0.1 of it or 1 MiB).")] = 0.005,
    seed: Annotated[int, typer.Option(help="Seed of the document choice and the split.")] = 0,
    text_field: Annotated[str, typer.Option(help="Field/column holding the text in .jsonl/.parquet.")] = "text",
    workers: Annotated[int | None, typer.Option(help="Tokenizer threads (default: all cores).")] = None,
    restart: Annotated[bool, typer.Option(
        help="Discard an interrupted run's progress and start over; tokenize again a dataset that is up to date."
    )] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Replace a dataset of this name tokenized from another source, or "
                                           "with other settings where runs trained on it.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Tokenize a corpus with the GPT-2 BPE into data/<name>/{train,val}.bin + meta.json (streaming, resumable)."""
    from tinygpt_cli import data

    err = _stderr_console()
    if source is None:
        source, why = data.default_source_spec()
        err.print(f"No SOURCE given: tokenizing {why}.")
    view = _RateView(err, "tokenize")

    def on_event(event: data.TokenizeEvent) -> None:
        if event.kind == "info":
            err.print(event.message[:1].upper() + event.message[1:] + ".")
        elif event.kind == "plan":
            share = f" (fraction {fraction:g}, seed {seed})" if fraction < 1 else ""
            resumed = f"; {_fmt_int(event.resumed_documents)} already done" if event.resumed_documents else ""
            err.print(
                f"Tokenizing {event.source}: {_fmt_int(event.documents)} of {_fmt_int(event.total_documents)} "
                f"documents{share}, ~{_fmt_size(event.total_text_bytes)} of text → "
                f"~{_fmt_int(event.estimated_tokens)} tokens, ~{_fmt_size(event.estimated_tokens * 2)} on disk; "
                f"{event.workers} worker(s){resumed}"
            )
            view.start(event.total_text_bytes)
        elif event.kind == "progress":
            view.update(
                event.text_bytes,
                [
                    f"{_fmt_int(event.documents_per_s)} docs/s",
                    f"{event.tokens_per_s / 1e6:.2f}M tok/s",
                    f"{event.bytes_per_s / 1e6:.1f} MB/s",
                ],
                event.eta_s,
            )

    def interrupted(exc: KeyboardInterrupt) -> str:
        written = getattr(exc, "written", None)
        if written is not None:
            return f"Interrupted as the dataset was put in place: it was finished first, and {written} is complete."
        if getattr(exc, "saved", False):  # a checkpoint of the work so far is on disk: the same command goes on
            return "Interrupted: run the same command again to continue where it stopped (--restart starts over)."
        return "Interrupted before the first checkpoint (after 30 s or so, between documents: a single .txt file " \
            "is one document): nothing was kept, and the same command starts over."

    with _interruptible(view, err, interrupted):
        result = data.tokenize(
            source,
            name=name,
            fraction=fraction,
            val_fraction=val_fraction,
            seed=seed,
            text_field=text_field,
            workers=workers,
            restart=restart,
            force=force,
            on_event=_ShownWhileOutputLasts(on_event),
        )
    meta = result.meta
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    skipped = meta["documents"]
    if skipped["skipped_empty"] or skipped["skipped_undecodable"]:
        first = f" (first: {result.skipped_undecodable[0]})" if result.skipped_undecodable else ""
        err.print(
            f"Skipped {_fmt_int(skipped['skipped_empty'])} empty and "
            f"{_fmt_int(skipped['skipped_undecodable'])} non-UTF-8 document(s){first}"
        )
    if as_json:
        print(
            json.dumps(
                {
                    "name": result.name,
                    "path": str(result.path),
                    "seconds": result.seconds,
                    "resumed_documents": result.resumed_documents,
                    "resumed_tokens": result.resumed_tokens,
                    "workers": result.workers,
                    "unchanged": result.unchanged,
                    **meta,
                }
            )
        )
        return
    if result.unchanged:
        print(f"Up to date: {result.path}, {_fmt_int(train['tokens'])} train tokens, {_fmt_int(val['tokens'])} val "
              f"tokens (tokenized {meta.get('created', '?')})")
        return
    tokens = train["tokens"] + val["tokens"] - result.resumed_tokens  # this run's work
    print(
        f"Wrote {result.path}: {_fmt_int(train['tokens'])} train tokens ({counted(train['documents'], 'document')}), "
        f"{_fmt_int(val['tokens'])} val tokens ({counted(val['documents'], 'document')}) from "
        f"{_fmt_size(meta['text_bytes'])} of text in {_fmt_seconds(result.seconds)} "
        f"({tokens / max(result.seconds, 1e-9) / 1e6:.2f}M tokens/s)"
    )


# ----------------------------------------------------------------------------------------- download
@app.command(
    cls=_Command,
    epilog="Examples:  tinygpt download --list  ·  tinygpt download tinystories --max-docs 200000  ·  "
    "tinygpt download openwebtext --fraction 0.25  ·  tinygpt download owner/name --text-field content"
)
def download(
    name: Annotated[
        str | None,
        typer.Argument(help="A name from --list (default: openwebtext) or a Hugging Face dataset id, owner/name.",
                       autocompletion=_completion(_corpus_names)),
    ] = None,
    list_sources: Annotated[bool, typer.Option("--list", help="Show the named corpora and their sizes.")] = False,
    fraction: Annotated[float, typer.Option(help="Share of the rows to fetch; the rest is never downloaded.")] = 1.0,
    max_docs: Annotated[int | None, typer.Option(help="Fetch at most this many documents.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of which part is fetched.")] = 0,
    config: Annotated[str | None, typer.Option(help="Dataset config, e.g. sample-100BT.")] = None,
    split: Annotated[str | None, typer.Option(help="Dataset split (default: train).")] = None,
    text_field: Annotated[str | None, typer.Option(help="Column holding the text (default: text).")] = None,
    force: Annotated[bool, typer.Option(help="Delete what is there and download again.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Download a corpus into data/raw/<name>/ (streaming, resumable), ready for `tinygpt tokenize NAME`."""
    from tinygpt_cli.download import catalog
    from tinygpt_cli.download import download as fetch

    if list_sources:
        _print_catalog(catalog(), as_json)
        return
    err = _stderr_console()
    view = _RateView(err, "download")

    def on_event(event) -> None:
        if event.kind == "info":
            err.print(event.message[:1].upper() + event.message[1:] + ".")
        elif event.kind == "plan":
            target = f"~{_fmt_int(event.target_documents)}" if event.target_documents else "all"
            text = f" (~{_fmt_size(event.total_text_bytes)} of text)" if event.total_text_bytes else ""
            resumed = f"; continuing after {_fmt_int(event.documents)}" if event.documents else ""
            err.print(
                f"Downloading {event.name} from {event.where} ({event.license or 'see its card'}) into "
                f"data/raw/{event.name}: {target} documents{text} from {event.shards} shard(s){resumed}"
            )
            view.start(event.total_text_bytes)
        elif event.kind == "progress":
            view.update(
                event.text_bytes,
                [
                    f"{_fmt_int(event.documents)} docs",
                    f"{_fmt_int(event.documents_per_s)} docs/s",
                    f"{event.bytes_per_s / 1e6:.1f} MB/s",
                ],
                event.eta_s,
            )

    with _interruptible(view, err, lambda exc: "Interrupted: run the same command again to continue (the parts "
                                               "written so far are kept)."):
        result = fetch(
            name,
            fraction=fraction,
            max_docs=max_docs,
            seed=seed,
            config=config,
            split=split,
            text_field=text_field,
            force=force,
            on_event=_ShownWhileOutputLasts(on_event),
        )
    if as_json:
        print(
            json.dumps(
                {
                    "name": result.name,
                    "path": str(result.path),
                    "already": result.already,
                    "seconds": result.seconds,
                    **result.record,
                }
            )
        )
        return
    progress = result.record.get("progress", {})
    if result.record.get("kind") == "embedded":
        print(f"{result.name} is embedded in tinygpt: nothing to fetch. `tinygpt tokenize` now uses it by default.")
        return
    verb = "Already downloaded" if result.already else f"Downloaded in {_fmt_seconds(result.seconds)}"
    print(
        f"{verb}: {result.name}, {_fmt_int(progress.get('documents', 0))} documents, "
        f"{_fmt_size(progress.get('text_bytes', 0))} of text, {_fmt_size(result.disk_bytes)} on disk in "
        f"{result.path}. Next: tinygpt tokenize {result.name}"
    )


def _print_catalog(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    from rich.measure import Measurement
    from rich.table import Table

    title = "Named corpora (sizes approximate, whole split)"
    table = Table(title=title, title_justify="left")
    for column in ("name", "source", "documents", "text", "tokens", "license", "here"):
        table.add_column(column, justify="right" if column in ("documents", "text", "tokens") else "left")
    def tokens(count: int | None) -> str:
        return "?" if count is None else f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.1f}M"

    # a download of another hub dataset has no known sizes: "?"
    cells = [(row["name"], row["where"], "?" if row["documents"] is None else _fmt_int(row["documents"]),
              "?" if row["text_bytes"] is None else _fmt_size(row["text_bytes"]), tokens(row["tokens"]),
              row["license"], row["status"]) for row in rows]
    for row_cells in cells:
        table.add_row(*row_cells)
    console = _stdout_console()
    if _on_terminal(console) and Measurement.get(console, console.options.update_width(1 << 20), table).maximum \
            > console.width:
        # a terminal too narrow for the table: a block per corpus, so that no source id (what `download owner/name`
        # takes) or license is cut or broken across lines
        console.print(title)
        for name, where, documents, text, tokens, license_, status in cells:
            console.print(f"\n{name}  {where}{f'  ({status})' if status else ''}\n  {documents} documents · {text} · "
                          f"{tokens} tokens · {license_}")
        return
    _print_table(table)


def _print_table(table) -> None:
    """A table on stdout; piped, wide enough that no cell (a run name to copy) is cut."""
    console = _stdout_console()
    if _on_terminal(console):
        console.print(table)
        return
    console.width = 100_000  # no terminal width to respect: one line per row, at the table's own width
    with console.capture() as captured:
        console.print(table)
    console.print("\n".join(line.rstrip() for line in captured.get().splitlines()))  # no padding to the widest row


# ----------------------------------------------------------------------------------------- train
@app.command(
    cls=_Command,
    epilog="Examples:  tinygpt train --size micro  ·  tinygpt train --resume  ·  "
    "tinygpt train --size tiny --set train.lr=1e-3 --max-steps 2000"
)
def train(
    size: Annotated[
        str | None, typer.Option(rich_help_panel=_P_WHAT, help="Preset: micro, tiny, small (124M), medium, large, xl.",
                                 autocompletion=_config_names("PRESETS"))
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", rich_help_panel=_P_WHAT, readable=False,
                                  help=_CONFIG_HELP)
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", rich_help_panel=_P_WHAT, help="Override a key: --set train.lr=3e-4 (repeatable)."),
    ] = None,
    data_name: Annotated[
        str | None, typer.Option("--data", rich_help_panel=_P_WHAT, help="Tokenized dataset (default: the last one).",
                                 autocompletion=_completion(_dataset_names))
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", rich_help_panel=_P_RUN,
                     help="Run name under runs/ (default: size-data-time, then -2, -3 where taken)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(rich_help_panel=_P_RUN, help="Continue --name (else the latest run) from its checkpoint.")
    ] = False,
    auto_resume: Annotated[
        bool, typer.Option("--auto-resume", rich_help_panel=_P_RUN,
                           help="Continue --name if it has a checkpoint, else start it: one command for a job that "
                                "is submitted again and again.")
    ] = False,
    max_steps: Annotated[
        int | None, typer.Option(rich_help_panel=_P_BUDGET, help="Optimizer steps to train in all.")
    ] = None,
    max_tokens: MaxTokensOpt = None,
    max_minutes: MaxMinutesOpt = None,
    batch_size: Annotated[
        str | None,
        typer.Option(
            rich_help_panel=_P_OPT, help="Sequences per micro-batch, or 'auto' (the largest that fits)."
        ),
    ] = None,
    grad_accum: Annotated[
        int | None, typer.Option(rich_help_panel=_P_OPT, help="Micro-batches per optimizer step.")
    ] = None,
    lr: LrOpt = None,
    dropout: DropoutOpt = None,
    keep_last: KeepLastOpt = None,
    device: DeviceOpt = None,
    dtype: Annotated[
        str | None, typer.Option(rich_help_panel=_P_HW, help="auto | fp32 | bf16 | fp16 (autocast).")
    ] = None,
    compile_mode: CompileOpt = None,
    nproc: Annotated[
        int | None,
        typer.Option(rich_help_panel=_P_HW, help="Processes on this machine (DDP), as torchrun --standalone."),
    ] = None,
    fsdp: FsdpOpt = None,
    init_from: InitFromOpt = None,
    seed: SeedOpt = None,
    log_to: Annotated[
        str | None,
        typer.Option("--log-to", rich_help_panel=_P_RUN,
                     help="Mirror the metrics to tensorboard, wandb, or both (tensorboard,wandb); none to stop."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a GPT-2 on the last tokenized dataset (the embedded corpus if there is none), with checkpoints."""
    if nproc is not None and nproc < 1:
        raise TinyGPTError(f"--nproc must be at least 1 (got {nproc})")
    worker = all(name in os.environ for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))  # started by torchrun
    if worker:
        from tinygpt_cli.launch import stop_with_launcher

        stop_with_launcher()
    started = os.environ.get("LOCAL_WORLD_SIZE")
    if worker and nproc is not None and started is not None and started != str(nproc):
        raise TinyGPTError(f"--nproc {nproc}, but torchrun started {started} processes on this machine: drop --nproc "
                           f"when you start tinygpt with torchrun (or run `tinygpt train --nproc {nproc}` alone)")
    flags: dict[str, Any] = {
        **_run_flags(batch_size, grad_accum, max_steps, max_tokens, max_minutes, dtype, dropout, keep_last,
                     compile_mode, init_from, fsdp, lr),
        "data.dataset": data_name,
        "train.device": device,
        "train.seed": seed,
        "train.log_to": log_to,
    }
    if nproc is not None and nproc > 1 and not worker:
        import torch

        from tinygpt_cli.config import resolve_config
        from tinygpt_cli.dist import MPS_ALONE
        from tinygpt_cli.launch import launch, torchrun_command
        from tinygpt_cli.sources import available_cpus
        from tinygpt_cli.training import resolve_device

        # what every worker would refuse alike is said once, here, before N processes each import torch to say it
        if not resume:
            resolve_config(size=size, config_file=config, overrides=overrides or (), flags=flags)
        if str(device or "auto").lower() in ("auto", "mps") and resolve_device(device or "auto").type == "mps":
            raise TinyGPTError(MPS_ALONE)
        cores = available_cpus()
        gpus = torch.cuda.device_count() if torch.cuda.is_available() and str(device).lower() != "cpu" else 0
        if gpus and nproc > gpus and str(device or "auto").lower() in ("auto", "cuda"):  # said once, not by each
            raise TinyGPTError(f"--nproc {nproc}, but only {gpus} CUDA GPU(s) are visible: use --nproc {gpus} (one "
                               f"process per GPU)")
        if not gpus and nproc > 4 * cores:  # each loads torch and the model; the start-up alone takes minutes
            raise TinyGPTError(f"--nproc {nproc} is more processes than {cores} CPU cores can run: use at most "
                               f"{4 * cores}")
        if nproc > cores and not gpus:
            _stderr_console().print(f"[yellow]--nproc {nproc} on {cores} CPU cores: the processes share them, so each "
                                    f"step takes longer than with --nproc {cores}[/yellow]", markup=True)
        _stderr_console().print(f"Launching {nproc} processes, as `{' '.join(torchrun_command(nproc, sys.argv[1:]))}`")
        raise typer.Exit(launch(nproc, sys.argv[1:]))
    from tinygpt_cli import checkpoint as ckpt
    from tinygpt_cli import dist, workspace
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.training import StopFlag, run_config_of
    from tinygpt_cli.training import train as run_training

    if auto_resume:
        resume = _resume_where_saved(name, resume)
    run_name, resumed = name, None
    if resume:
        resumed = ckpt.find_run(name)
        run_name = resumed.name
        if resumed.resolve() != (workspace.runs_dir() / run_name).resolve():
            raise TinyGPTError(f"--resume continues a run of this workspace's {workspace.runs_dir()}, and {name} is "
                               f"a folder elsewhere: move it into {workspace.runs_dir()}, or point TINYGPT_HOME at "
                               f"the workspace that holds it")
        base = run_config_of(resumed)
        started = None
        if auto_resume and (size is not None or config is not None):  # the command that started it, again
            started = resolve_config(size=size, config_file=config, overrides=overrides or (), flags=flags)
            differ = [f"model.{key} {getattr(base.model, key)} → {getattr(started.model, key)}"
                      for key in vars(base.model) if key != "dropout"  # the shape (dropout may change)
                      and getattr(started.model, key) != getattr(base.model, key)]
            if differ and not started.train.init_from:  # (a fine-tune took its weights' shape, not the preset's)
                raise TinyGPTError(f"run {run_name} is another model than --size/--config describe now "
                                   f"({', '.join(differ)}): resume it with its own (drop them), or start another "
                                   f"--name")
        elif size is not None and size != base.size:  # the run's own (--resume added to the command that started it)
            raise TinyGPTError(f"run {run_name} is {base.size}: --size {size} cannot change a resumed run (drop "
                               f"--size; --set changes training keys)")
        elif config is not None:
            raise TinyGPTError("--config cannot change a resumed run: use --set for training keys")
        cfg = resolve_config(overrides=overrides or (), flags=flags, base=base)
        if started is not None:
            _note_settings_kept(run_name, config, started, cfg)
        from tinygpt_cli.checkpoint import latest_step
        from tinygpt_cli.inventory import reported_step

        reached = latest_step(resumed) if auto_resume else None
        seen = _tokens_seen(resumed) if reached is not None and cfg.train.max_tokens else 0
        spent = bool(cfg.train.max_tokens) and seen >= cfg.train.max_tokens
        # one killed before its report goes on to write it (in one process: only rank 0 is sure to have report.md)
        written = dist.from_environment().enabled or reported_step(resumed) == reached
        if reached is not None and (reached >= cfg.train.max_steps or spent) and written:
            # a job submitted once more: nothing failed
            if dist.from_environment().is_main:
                where = f"has seen {seen:,} tokens, its --max-tokens budget" if spent else \
                    f"is complete ({reached:,} steps)" if reached == cfg.train.max_steps else \
                    f"is at step {reached:,}, past max_steps {cfg.train.max_steps:,}"
                more = "a larger --max-tokens" if spent else f"a --max-steps above {reached:,}"
                _stderr_console().print(f"Run {run_name} {where}: nothing to train; {more} goes on with it")
            raise typer.Exit(0)
    else:
        cfg = resolve_config(size=size, config_file=config, overrides=overrides or (), flags=flags)

    is_main = dist.from_environment().is_main
    stop = StopFlag()
    view = _TrainView(_stderr_console())
    try:
        with _stopped_outside_the_loop(stop):
            result = run_training(cfg, run_name=run_name, resume=resume, on_event=view.on_event, stop=stop)
    except KeyboardInterrupt as exc:  # a second Ctrl-C/SIGTERM (the first one saves and returns), or one before
        view.close()
        raise typer.Exit(_training_aborted(view.run_dir or resumed, exc, is_main)) from None
    finally:
        view.close()
    with contextlib.suppress(OSError):  # a terminal that went away (the hangup that stopped it) changes no exit code
        if is_main and as_json:
            print(json.dumps({k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}))
        elif is_main:
            _print_train_result(result, stop.signal)
    if result.stopped == "interrupted":  # not a finished run: `train && export` must not go on (on every rank)
        raise typer.Exit(_signal_exit(stop.signal))


@contextlib.contextmanager
def _interruptible(view, err, message: Callable[[KeyboardInterrupt], str]) -> Iterator[None]:
    """Within: Ctrl-C, SIGTERM and SIGHUP (unless started ignored, as under nohup) stop a command that cleans up
    after itself (tokenize, download, export) the same way: its rate view (if any) closes, `message(exc)` says
    what was kept, and it exits 128 + the signal. The view is closed however it ends."""
    close = view.close if view is not None else lambda: None
    try:
        with _stops_as_ctrl_c():
            yield
    except KeyboardInterrupt as exc:
        with contextlib.suppress(OSError):  # a reader gone too (a dropped ssh session): the exit code still says why
            close()
            err.print(message(exc))
        raise typer.Exit(_signal_exit(getattr(exc, "signal", None))) from None
    finally:
        with contextlib.suppress(OSError):
            close()


def _signal_exit(signum: int | None) -> int:
    """The exit code of a process stopped by `signum`, as a shell reports it: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + (signum or 2)


@contextlib.contextmanager
def _stops_as_ctrl_c(repeated: Callable[[int], bool] = lambda signum: False) -> Iterator[None]:
    """Within: SIGTERM and SIGHUP (unless started ignored, as under nohup) raise as Ctrl-C does (`Stopped`, which
    carries the signal), except a signal `repeated` says is an earlier stop's again."""
    import signal

    from tinygpt_cli.launch import STOP_SIGNALS, Stopped, signals_handled

    def handler(signum: int, frame: Any) -> None:
        if not repeated(signum):
            raise Stopped(signum)

    with signals_handled(handler, tuple(sig for sig in STOP_SIGNALS if sig != signal.SIGINT)):
        yield


def _stopped_outside_the_loop(stop) -> contextlib.AbstractContextManager:
    """SIGTERM and SIGHUP before train's loop (loading, compiling) or after it (the report) stop it as Ctrl-C does
    there, with a line that says what is kept; they killed it silently (143). In the loop train's own handler
    takes them, to save first. The first stop's signal again within REPEAT_WINDOW_S is that stop, said twice."""
    import time

    from tinygpt_cli.training import REPEAT_WINDOW_S

    return _stops_as_ctrl_c(lambda signum: bool(stop) and signum == stop.signal
                            and time.monotonic() - stop.signalled_at < REPEAT_WINDOW_S)


def _training_aborted(run_dir: Path | None, exc: KeyboardInterrupt, is_main: bool) -> int:
    """Say what a training process stopped at once kept (by a second signal, or by a stop before train's own
    handler was in place); return its exit code, 128 + the signal."""
    from tinygpt_cli import checkpoint as ckpt
    from tinygpt_cli.training import SecondSignal

    what = "Aborted by a second signal" if isinstance(exc, SecondSignal) else "Interrupted"
    step = ckpt.latest_step(run_dir) if run_dir is not None else None
    if is_main:
        with contextlib.suppress(OSError):  # a reader gone too: the exit code still says why
            _stderr_console().print(
                f"{what} before the run's first checkpoint: nothing is kept; start it again" if step is None else
                f"{what}: training stopped at once; the last checkpoint (step {step}) is intact. Continue with: "
                f"{_resume_command(run_dir.name)}")
    return _signal_exit(getattr(exc, "signal", None))


def _budget_steps(p: Any) -> str:
    """The steps a plan trains: max_steps, or those train.max_tokens stops it after."""
    steps = p.budget_tokens // p.tokens_per_step
    if steps < p.max_steps:
        return f"{_fmt_int(steps)} of {_fmt_int(p.max_steps)} steps (train.max_tokens)"
    return f"{_fmt_int(p.max_steps)} steps"


def _run_flags(batch_size: str | None, grad_accum: int | None, max_steps: int | None, max_tokens: int | None,
               max_minutes: float | None, dtype: str | None, dropout: float | None, keep_last: int | None,
               compile_mode: str | None, init_from: str | None, fsdp: bool | None, lr: float | None
               ) -> dict[str, Any]:
    """The config keys of the options `train` and `plan` share: a train command line plans as it is."""
    auto_batch = _auto_batch(batch_size)
    return {
        "train.batch_size": None if auto_batch else batch_size,
        "train.auto_batch": True if auto_batch else None,
        "train.grad_accum": grad_accum,
        "train.max_steps": max_steps,
        "train.max_tokens": max_tokens,
        "train.max_minutes": max_minutes,
        "train.dtype": dtype,
        "model.dropout": dropout,
        "train.keep_last": keep_last,
        "train.compile": compile_mode,
        "train.init_from": init_from,
        "train.fsdp": fsdp,
        "train.lr": lr,
    }


def _auto_batch(batch_size: str | None) -> bool:
    """Whether --batch-size asks for `auto`; anything else must be a whole number."""
    if batch_size is None:
        return False
    if batch_size.strip().lower() == "auto":
        return True
    if not batch_size.strip().isdecimal():
        raise TinyGPTError(f"--batch-size must be a whole number or auto (got {batch_size!r})")
    return False


def _tokens_seen(run_dir: Path) -> int:
    """The tokens a run's latest checkpoint has seen (0 where it cannot be read: the resume says why)."""
    from tinygpt_cli.checkpoint import latest_checkpoint, read_state

    try:
        return int(read_state(latest_checkpoint(run_dir)).get("tokens_seen") or 0)
    except (TinyGPTError, OSError, TypeError, ValueError):
        return 0


def _print_train_result(result, signum: int | None = None) -> None:
    out = _stdout_console()
    val = f"{result.final_val_loss:.4f}" if result.final_val_loss is not None else "n/a"
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"  # none logged yet
    of_steps = f" of {result.max_steps:,}" if 0 < result.steps < result.max_steps else ""  # how far a stop left it
    # a session that trained no step has no rate: it stopped at once, or wrote the report a kill left unwritten
    rate = f"{_fmt_seconds(result.seconds)}, {_fmt_int(result.tokens_per_s)} tokens/s" \
        if result.steps > result.first_step else "no step trained" + (
            f"; report: {result.run_dir / 'report.md'}" if result.stopped != "interrupted" else "")
    out.print(
        f"Run {result.run_dir}: step {result.steps:,}{of_steps}, train loss {loss}, "
        f"val loss {val} (unigram baseline {result.unigram_val_loss:.4f}), {rate}"
    )
    if result.stopped == "interrupted" and result.steps == result.first_step:
        out.print("Interrupted before the first step: nothing was trained or saved." if not result.first_step else
                  f"Interrupted before the first step: the run is as it was. Continue with: "
                  f"{_resume_command(result.run_dir.name)}")
    elif result.stopped != "completed" and result.steps > result.first_step:  # (none: it wrote a report alone)
        why = {
            "interrupted": f"Interrupted{_by_signal(signum)}",
            "time_limit": "Reached --max-minutes",
            "token_limit": "Reached --max-tokens",
        }.get(result.stopped, "Stopped")
        more = {"token_limit": " --max-tokens N (more than the tokens seen so far)",
                # the limit is the run's (config.yaml): every resume stops after as long again, as a scheduler's slot
                "time_limit": " (it stops again after --max-minutes of training: add --max-minutes 0 to lift that)",
                }.get(result.stopped, "")
        out.print(f"{why}; checkpoint saved. Continue with: {_resume_command(result.run_dir.name)}{more}")


def _by_signal(signum: int | None) -> str:
    """' by SIGTERM' (a scheduler's time limit), ' by SIGHUP' (a dropped terminal); '' for Ctrl-C or none."""
    import signal

    if signum is None or signum == signal.SIGINT:
        return ""
    with contextlib.suppress(ValueError):
        return f" by {signal.Signals(signum).name}"
    return ""


def _resume_where_saved(name: str | None, resume: bool) -> bool:
    """`train --auto-resume`: whether run `name` is to be resumed (it has saved a checkpoint, or step folders that
    --resume then says what is wrong with) rather than started."""
    from tinygpt_cli import checkpoint as ckpt
    from tinygpt_cli import workspace
    from tinygpt_cli.training import check_run_name

    if resume:
        raise TinyGPTError("--auto-resume resumes a run that has a checkpoint: drop --resume")
    if not name:
        raise TinyGPTError("--auto-resume needs --name: the run to start, and to go on with once it has a checkpoint")
    check_run_name(name)
    run_dir = workspace.runs_dir() / name
    return ckpt.latest_checkpoint(run_dir) is not None or bool(ckpt.step_folders(run_dir))


def _note_settings_kept(run_name: str, config: Path | None, started: Any, resumed: Any) -> None:
    """`--auto-resume` of a run with its starting command's --config: the keys the file (edited since) gives
    otherwise than the run has (training, data, sampling, and the model's dropout: its shape is checked) are not
    applied; said, with the --set that would apply one."""
    from tinygpt_cli import dist
    from tinygpt_cli.config import config_to_dict, load_yaml

    in_file = load_yaml(config) if config is not None else {}
    now, kept = config_to_dict(started), config_to_dict(resumed)
    changed = [f"{section}.{key}" for section in ("model", "train", "data", "sample")
               for key in in_file.get(section) or {}
               if key in now[section] and kept[section].get(key) != now[section][key]
               and (section != "model" or key == "dropout")]
    if changed and dist.from_environment().is_main:
        first = changed[0]
        section, key = first.split(".")
        _stderr_console().print(
            f"note: run {run_name} goes on with its own {', '.join(changed)}, not those --config gives now; change "
            f"one with --set (--set {first}={now[section][key]})")


def _resume_command(name: str) -> str:
    """The command that continues run `name` as it trained: with the same number of processes."""
    from tinygpt_cli import dist

    world = dist.from_environment().world_size
    return f"tinygpt train --resume --name {name}" + (f" --nproc {world}" if world > 1 else "")


class _TrainView:
    """Renders TrainEvents: a live progress line on stderr, one line per eval, info lines as they come."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]} · val {task.fields[val]} · {task.fields[rate]} tok/s{task.fields[mfu]}"
            ),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.task = None
        self.run_dir: Path | None = None  # known from the start event
        self.on_event = _ShownWhileOutputLasts(self._show)  # a hangup: training goes on to its checkpoint
        self.plain = not _animated(console)  # a log: plain lines every PLAIN_PROGRESS_S, no bar
        self.clock = _PlainClock()
        self.first: tuple[float, int] = (0.0, 0)  # (time, step) of this invocation's start
        self.shown = {"loss": "…", "val": "…", "rate": "…", "mfu": ""}
        self.step = 0

    @property
    def gone(self) -> bool:
        return self.on_event.gone

    def _show(self, event) -> None:
        if event.kind == "info":
            self.console.print(event.message)
        elif event.kind == "start":
            info = event.data
            self.run_dir = Path(info["run_dir"])
            resumed = f", resumed from {info['resumed_from']}" if info["resumed_from"] else ""
            self.console.print(
                f"Training {info['parameters'] / 1e6:.1f}M parameters on {info['dataset']} "
                f"({_fmt_int(info['train_tokens'])} train tokens) · {info['device']} {info['dtype']}"
                f"{' · Muon + AdamW' if info.get('optimizer') == 'muon' else ''} · "
                f"{_fmt_int(info['tokens_per_step'])} tokens/step → {info['run_dir']}{resumed}"
            )
            self.task = self.progress.add_task(
                "train", total=event.max_steps, completed=event.step, loss="…", val="…", rate="…", mfu=""
            )
            self.first, self.clock, self.step = (self.clock.now(), event.step), _PlainClock(), event.step
            if not self.plain:
                self.progress.start()
        elif event.kind == "step" and self.task is not None:
            mfu = f" · MFU {event.mfu:.0%}" if event.mfu is not None else ""
            self.shown.update(loss=f"{event.loss:.3f}", rate=_fmt_int(event.tokens_per_s or 0), mfu=mfu)
            self.progress.update(self.task, completed=event.step, **self.shown)
            self._plain_line(event, due=self.clock.due())
        elif event.kind == "done" and self.task is not None:  # a stop between log steps: the bar shows it
            self.progress.update(self.task, completed=event.step)
            self._plain_line(event, due=event.step != self.step)  # where the log's last line left it
        elif event.kind == "eval" and self.task is not None:
            self.shown["val"] = f"{event.val_loss:.3f}"
            self.progress.update(self.task, completed=event.step, **self.shown)
            self.console.print(f"step {event.step:,}: val loss {event.val_loss:.4f}")
        elif event.kind == "task":
            from tinygpt_cli.report import task_line

            self.console.print(f"step {event.step:,}: {task_line(event.data)} ({event.data['seconds']:.0f}s)")

    def _plain_line(self, event, due: bool) -> None:
        """In a log: `step 1,200/19,073 (6.3%) · loss 3.412 · val 3.502 · 52,331 tok/s · MFU 41% · 1h02m · ETA
        5h10m`, the ETA from this invocation's steps per second."""
        if not self.plain or not due:
            return
        self.step = event.step
        began_at, began_step = self.first
        elapsed = self.clock.now() - began_at
        rate = (event.step - began_step) / elapsed if elapsed > 0 else 0.0
        eta = f" · ETA {_fmt_seconds((event.max_steps - event.step) / rate)}" if rate > 0 else ""
        shown = self.shown
        self.console.print(
            f"step {event.step:,}/{event.max_steps:,} ({event.step / max(1, event.max_steps):.1%}) · loss "
            f"{shown['loss']} · val {shown['val']} · {shown['rate']} tok/s{shown['mfu']} · {_fmt_seconds(elapsed)}"
            f"{eta}")

    def close(self) -> None:
        if self.task is not None and not self.plain:  # a Progress never started still ends a line: a blank one
            with contextlib.suppress(OSError):  # a terminal that went away
                self.progress.stop()


# ----------------------------------------------------------------------------------------- generate
# Compiling the decode step costs ~7 s. Uncompiled steps on CUDA are replayed as CUDA graphs too, so compiling
# saves only 0.12-0.24 ms a token (GPT-2 124M on an H200, bf16: 0.58-0.65 vs 0.76-0.82 ms): it pays from about
# 50,000 tokens per sample.
COMPILE_PAYS_FROM_TOKENS = 50_000


def _stdin_is_interactive() -> bool:
    return sys.stdin.isatty()


def _decode_plan(device, fused: bool | None, compile_mode: str, lookahead: bool | None, max_new_tokens: int,
                 num_samples: int) -> tuple[bool, bool]:
    """(fused, compiled): the decode step `tinygpt generate` uses on `device` for these options; a combination that
    cannot run is a GenerationError. `fused` None: the fused kernels where `sample.fused_by_default` says they
    run. `compile_mode` auto compiles on CUDA without the fused kernels, from COMPILE_PAYS_FROM_TOKENS tokens."""
    from tinygpt_cli.errors import GenerationError
    from tinygpt_cli.sample import check_fused, fused_by_default

    if fused and compile_mode == "on":
        raise GenerationError("--fused replaces the compiled decode step: drop --compile on or --fused")
    if fused and lookahead:
        raise GenerationError("--fused decodes one token a step: drop --lookahead or --fused")
    if fused:
        check_fused(device)
    elif fused is None:
        fused = fused_by_default(device, compile_mode == "on", lookahead)
    use_compile = compile_mode == "on" or (compile_mode == "auto" and device.type == "cuda" and not fused
                                           and max_new_tokens >= COMPILE_PAYS_FROM_TOKENS)
    if lookahead and num_samples > 1:
        raise GenerationError("--lookahead works for one sample: drop --num-samples or --lookahead")
    if lookahead and use_compile:
        raise GenerationError("--lookahead needs the uncompiled decode step: add --compile off or drop --lookahead")
    return fused, use_compile


@app.command(
    cls=_Command,
    epilog='Examples:  tinygpt generate "To be, or not to be"  ·  '
    'tinygpt generate "ROMEO:" --num-samples 3 --temperature 0.9 --seed 7  ·  '
    "tinygpt generate --prompt-file scene.txt --stop $'\\n\\n' --json  ·  "
    "tinygpt generate  (an interactive prompt loop)"
)
def generate(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help='Text to continue; "" starts a fresh document. Without one: --prompt-file, else stdin '
            "when piped, else an interactive prompt loop (Ctrl-D leaves; Ctrl-Z, Enter on Windows)."
        ),
    ] = None,
    runs: Annotated[
        list[str] | None,
        typer.Option(
            "--run",
            "--model",
            help="Run name or folder, a checkpoint folder, a Hugging Face GPT-2 folder "
            "or gpt2[-medium|-large|-xl] (default: the latest run).",
            autocompletion=_completion(_model_names),
            show_default=False,
            metavar="RUN",
        ),
    ] = None,
    prompt_file: Annotated[
        Path | None, typer.Option("--prompt-file", readable=False,
                                  help="Read the prompt from this file ('-': stdin), as it is.")
    ] = None,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Tokens per sample; past the context it goes on from the newest half of it.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature; 0 = greedy.")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample from the k most likely tokens (0 = all).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass (1 = off).")] = None,
    repetition_penalty: Annotated[
        float | None, typer.Option(help="Make tokens already in the text less likely (1 = off; 1.1-1.3 breaks loops).")
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option("--stop", help="End a sample at this text, left out; looked for in the "
                                       "generated text, not the prompt (repeatable; as typed: in bash, $'\\n' is a "
                                       "line break).")
    ] = None,
    ignore_eot: Annotated[
        bool, typer.Option("--ignore-eot", help="Go on past <|endoftext|> instead of ending the sample there.")
    ] = False,
    num_samples: Annotated[int, typer.Option(help="Independent samples, decoded as one batch.")] = 1,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Random seed: the same seed, device, dtype and --num-samples give the same text.")] = None,
    device: ModelDeviceOpt = None,
    dtype: Annotated[
        str, typer.Option(help="auto | fp32 | bf16 | fp16: the weights' dtype (auto: bf16/fp16 on CUDA, else fp32).")
    ] = "auto",
    compile_mode: Annotated[
        str, typer.Option("--compile", help="auto | on | off: torch.compile the decode step (auto: on CUDA without "
                          f"the fused kernels, for --max-new-tokens {COMPILE_PAYS_FROM_TOKENS:,} or more).")
    ] = "auto",
    lookahead: Annotated[
        bool | None, typer.Option("--lookahead/--no-lookahead", help="Guess tokens from earlier text and check the "
                                  "guesses in one pass: fewer passes, the same tokens up to float rounding (default: "
                                  "on for one sample, uncompiled, off CUDA; on CUDA it gives up the CUDA graphs).")
    ] = None,
    fused: Annotated[
        bool | None, typer.Option("--fused/--no-fused", help="Decode with tinygpt's fused Triton kernels, five a "
                                  "layer instead of PyTorch's ~150 small kernels a step (default: on NVIDIA GPUs from "
                                  "Ampere on, with Triton, unless --compile on or --lookahead).")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Print tokens/s and time to first token on stderr.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample text from a trained run (the latest by default), streaming it to stdout."""
    from tinygpt_cli.config import MAX_SEED, SampleConfig
    from tinygpt_cli.errors import GenerationError
    from tinygpt_cli.sample import check_settings, load_model, read_prompt, read_stdin_prompt

    if runs and len(runs) > 1:  # one option of two names: the last given was used, silently (QA)
        raise GenerationError(f"--run (or --model) given {len(runs)} times ({', '.join(runs)}): name one model")
    run = runs[0] if runs else None
    _refuse_blank(run, "--run", _LATEST_RUN_HINT)
    if compile_mode not in ("auto", "on", "off"):
        raise GenerationError(f"--compile must be one of auto, on, off (got {compile_mode!r})")
    if prompt is not None and prompt_file is not None:
        raise GenerationError("give the prompt as an argument or with --prompt-file, not both")
    if any(not text for text in stop or ()):
        raise GenerationError("--stop needs a non-empty text")
    stop = [_utf8_text(text, "--stop is not UTF-8 text: set the terminal to UTF-8") for text in stop or ()]
    if prompt is not None:
        prompt = _utf8_text(prompt, "the prompt is not UTF-8 text: set the terminal to UTF-8, or convert the text "
                                    "(iconv -t utf-8) into a --prompt-file")
    text = read_prompt(prompt_file) if prompt_file is not None else prompt
    interactive = text is None and _stdin_is_interactive()
    if text is None and not interactive:  # piped: read (and a bad one said) before a model loads, maybe minutes
        if _on_windows() and os.environ.get("MSYSTEM"):  # Git Bash's window is no console to Windows programs
            _stderr_console().print("Reading the prompt from standard input until it ends (Git Bash's window is no "
                                    "console to tinygpt): give the prompt as an argument, or start `winpty tinygpt "
                                    "generate` for the prompt loop")
        text = read_stdin_prompt()

    def chosen(defaults: SampleConfig) -> dict[str, Any]:
        return {
            "max_new_tokens": max_new_tokens if max_new_tokens is not None else defaults.max_new_tokens,
            "temperature": temperature if temperature is not None else defaults.temperature,
            "top_k": top_k if top_k is not None else defaults.top_k,
            "top_p": top_p if top_p is not None else defaults.top_p,
            "repetition_penalty": repetition_penalty if repetition_penalty is not None else defaults.repetition_penalty,
            "num_samples": num_samples,
        }

    check_settings(**chosen(SampleConfig()), seed=seed)  # what was given, before a model loads (maybe minutes)
    loaded = load_model(run, device or "auto", dtype)
    defaults = loaded.run_config.sample if loaded.run_config else SampleConfig()
    settings = chosen(defaults)
    seed = seed if seed is not None else defaults.seed
    check_settings(**settings, seed=seed)
    settings.update(stop=list(stop or ()), stop_at_eot=not ignore_eot, seed=seed)
    param = next(loaded.model.parameters())
    asked_fused = fused
    fused, use_compile = _decode_plan(param.device, fused, compile_mode, lookahead, settings["max_new_tokens"],
                                      num_samples)
    settings.update(lookahead=lookahead, fused=fused)
    err = _stderr_console()
    step = loaded.state.get("step")
    err.print(
        f"Sampling from {loaded.path} ({f'step {step}' if step is not None else 'Hugging Face weights'}) · "
        f"{param.device} "
        f"{str(param.dtype).split('.')[-1]}{' · compiled decode step' if use_compile else ''}"
        f"{' · fused decode kernels' if fused else ''}",
        soft_wrap=True,
    )
    lossy = None if as_json else _lossy_encoding(sys.stdout)  # --json escapes what is not ASCII
    if lossy:
        err.print(f"note: stdout writes {lossy}, which lacks most of what a model can write: those characters print "
                  f"as '?'. A UTF-8 locale (or PYTHONIOENCODING=utf-8) keeps them.")
    view = _GenerateView(loaded, settings, use_compile, as_json, verbose, err, fused_by_default=asked_fused is None)
    if not interactive:
        view.once(text, settings["seed"], echo_prompt=True)
        return
    err.print(f"Type a prompt and press Enter; Ctrl-C cuts a sample short, {_end_of_input()} leaves.")
    # stdout may be a file (`> samples.jsonl`): the prompt and the line breaks of the loop go to the terminal then
    chrome = sys.stdout if sys.stdout.isatty() else sys.stderr
    with contextlib.suppress(ImportError):  # line editing and history for input(), where Python has them
        import readline  # noqa: F401
    not_utf8 = "that line is not UTF-8 text: set the terminal to UTF-8"
    turn = 0
    while True:
        try:
            if chrome is sys.stdout:
                line = input("> ")
            else:
                chrome.write("> ")
                chrome.flush()
                line = input()
            line = _utf8_text(line, not_utf8, sys.stdin.encoding or "utf-8")  # read with surrogateescape
        except EOFError:
            chrome.write("\n")
            return
        except KeyboardInterrupt:  # at the prompt: a fresh one, as at Python's own (Ctrl-D leaves)
            chrome.write("\n")
            continue
        except (UnicodeDecodeError, GenerationError) as exc:  # read strictly, or with surrogateescape
            print_error(GenerationError(not_utf8) if isinstance(exc, UnicodeDecodeError) else exc)
            continue
        if not line.strip():
            continue
        try:  # a new seed per prompt, so asking again gives another sample; a file gets the prompt with its sample
            # (past the largest seed it wraps to 0: a seed the user typed never goes out of range)
            view.once(line, (settings["seed"] + turn) % (MAX_SEED + 1), echo_prompt=chrome is not sys.stdout)
        except KeyboardInterrupt:  # the sample was cut short: end its streamed line where the samples go
            if view.streams or chrome is sys.stdout:
                sys.stdout.write("\n")
            if chrome is not sys.stdout:  # and the terminal's, where the next prompt goes
                chrome.write("\n")
        except TinyGPTError as exc:  # one prompt that fails (out of memory, ...) does not end the session
            print_error(exc)
        turn += 1


def _utf8_text(text: str, message: str, encoding: str | None = None) -> str:
    """`text` as UTF-8 text. Python keeps the bytes of the command line (or of a terminal, read in `encoding`) that
    its locale's encoding could not decode as lone surrogates: those are the UTF-8 they were where the locale is C
    or ASCII and the terminal UTF-8 anyway (a bare ssh or cron environment), else GenerationError(message)."""
    from tinygpt_cli.errors import GenerationError

    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = os.fsencode(text) if encoding is None else text.encode(encoding, "surrogateescape")
        return raw.decode("utf-8")
    except (UnicodeError, LookupError):
        raise GenerationError(message) from None


class _GenerateView:
    """Runs one prompt through `sample_text` and renders it: streamed text, sample blocks, or JSON."""

    def __init__(self, loaded, settings: dict[str, Any], use_compile: bool, as_json: bool, verbose: bool, err,
                 fused_by_default: bool = False) -> None:
        self.loaded, self.settings, self.use_compile = loaded, settings, use_compile
        self.as_json, self.verbose, self.err = as_json, verbose, err
        self.warned: set[str] = set()  # the warnings given once per command
        self.fused_by_default = fused_by_default  # not asked for: a failure of the fused kernels says how to skip them
        self.streams = self.settings["num_samples"] == 1 and not as_json  # a sample's text goes out as it comes

    def once(self, text: str, seed: int, echo_prompt: bool) -> None:
        from tinygpt_cli.sample import sample_text

        stream = self.streams

        def on_text(index: int, piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

        try:
            result = sample_text(
                self.loaded.model,
                text,
                **{**self.settings, "seed": seed},
                compile=self.use_compile,
                on_text=on_text if stream else None,
                # the prompt is echoed once it is known to fit: nothing reaches stdout before an error
                on_start=(lambda: on_text(0, text)) if stream and echo_prompt else None,
            )
        except KeyboardInterrupt as exc:  # what a batch or --json had made is printed, marked "interrupted"
            partial = getattr(exc, "partial", None)
            if partial is not None and not stream:
                self._render(partial, text, seed, echo_prompt)
            raise
        stats = result.stats
        if result.prompt_dropped:
            self.err.print(f"the prompt is {result.prompt_tokens + result.prompt_dropped:,} tokens, more than the "
                           f"model's context: it went on from the last {result.prompt_tokens:,}")
        if stats.compile_error and "compile" not in self.warned:
            self.warned.add("compile")
            what = "the fused decode kernels failed" if self.settings.get("fused") else "torch.compile unavailable"
            hint = " --no-fused skips them." if self.settings.get("fused") and self.fused_by_default else ""
            self.err.print(f"{what} ({stats.compile_error}): decoded eagerly.{hint}")
        if stats.graph_error and "graphs" not in self.warned:
            self.warned.add("graphs")
            self.err.print(f"CUDA graphs unavailable ({stats.graph_error}): decoded step by step.")
        cuda_graphs = self._render(result, text, seed, echo_prompt)
        if self.verbose:  # asked for: shown under --quiet too
            _stderr_console(quiet=False).print(
                f"{counted(stats.prompt_tokens, 'prompt token')} · {counted(stats.new_tokens, 'new token')} × "
                f"{stats.batch_size} · "
                f"first token after {stats.time_to_first_token_s * 1000:.0f} ms · "
                f"{stats.decode_tokens_per_s:,.1f} tokens/s decoding ({stats.tokens_per_s:,.1f} overall) · "
                f"{stats.seconds:.2f} s{' · compiled' if stats.compiled else ''}"
                f"{' · CUDA graphs' if cuda_graphs else ''}"
                f"{f' (captured in {stats.capture_s * 1000:.0f} ms)' if stats.graphed else ''}"
                + (f" · look-ahead: {stats.model_passes} passes, {stats.accepted_tokens} of {stats.guessed_tokens} "
                   "guessed tokens taken" if stats.model_passes else ""),
            )

    def _render(self, result, text: str, seed: int, echo_prompt: bool) -> bool:
        """Print `result` to stdout as --json, sample blocks, or the end of a streamed line; whether CUDA graphs
        (ours, or torch.compile's "reduce-overhead") replayed its steps."""
        stats = result.stats
        param = next(self.loaded.model.parameters())
        cuda_graphs = stats.graphed or (stats.compiled and param.device.type == "cuda")
        if self.as_json:
            print(
                json.dumps(
                    {
                        "checkpoint": str(self.loaded.path),
                        "step": self.loaded.state.get("step"),
                        "prompt": text,
                        "prompt_tokens": result.prompt_tokens,
                        "prompt_tokens_dropped": result.prompt_dropped,
                        "samples": [vars(sample) for sample in result.samples],
                        "settings": {**self.settings, "seed": seed, "lookahead": stats.lookahead},
                        "stats": {
                            "new_tokens": stats.new_tokens,
                            "num_samples": stats.batch_size,
                            "time_to_first_token_s": stats.time_to_first_token_s,
                            "seconds": stats.seconds,
                            "tokens_per_s": stats.tokens_per_s,
                            "decode_tokens_per_s": stats.decode_tokens_per_s,
                            "window_slides": stats.window_slides,
                            "device": str(param.device),
                            "dtype": str(param.dtype).split(".")[-1],
                            "compiled": stats.compiled,
                            "fused": stats.fused,
                            "cuda_graphs": cuda_graphs,
                            "graph_capture_s": stats.capture_s,
                            "model_passes": stats.model_passes,
                            "guessed_tokens": stats.guessed_tokens,
                            "accepted_tokens": stats.accepted_tokens,
                        },
                    }
                )
            )
        elif self.streams:
            sys.stdout.write("\n")
            sys.stdout.flush()
        else:
            for index, sample in enumerate(result.samples):  # each one headed: a script splits on the headers
                print(f"{chr(10) if index else ''}--- sample {index + 1} ---")
                print((text if echo_prompt else "") + sample.text)
        return cuda_graphs


# ----------------------------------------------------------------------------------------- eval
@app.command(
    "eval",
    cls=_Command,
    epilog="Examples:  tinygpt eval  ·  tinygpt eval my-run --data owt --tokens 200000  ·  "
    "tinygpt eval --task hellaswag --limit 500  ·  tinygpt eval --task lambada_openai  ·  tinygpt eval --task "
    "arc_easy,arc_challenge  ·  tinygpt eval --task all --limit 500  ·  "
    "tinygpt eval --task hellaswag --task-data hs_val.jsonl",
)
def eval_command(
    run: Annotated[
        str | None, typer.Argument(help="Run name or folder, or a checkpoint folder (default: the latest run).",
                                   autocompletion=_completion(_run_names))
    ] = None,
    model: Annotated[
        str | None, typer.Option("--model", help="Instead of RUN: a Hugging Face GPT-2 folder or gpt2[-medium|…].",
                                 autocompletion=_completion(_model_names))
    ] = None,
    data_name: Annotated[
        str | None, typer.Option("--data", help="Tokenized dataset name or folder (default: the run's).",
                                 autocompletion=_completion(_dataset_names))
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Split to score: val (or validation) | train (default: val).")] = None,
    tokens: Annotated[
        int | None,
        typer.Option(help="Tokens to score, in evenly spaced windows of the context, rounded up to whole ones "
                          "(default 1,048,576; the whole split if smaller)."),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="A zero-shot benchmark instead of the loss: hellaswag | lambada_openai | "
                                      "arc_easy | arc_challenge; several comma-separated, or all.",
                                 autocompletion=_task_names)
    ] = None,
    task_data: Annotated[
        Path | None,
        typer.Option("--task-data", readable=False,
                     help="The task's examples from a local .jsonl/.json/.parquet instead of the hub."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Score only the first N examples of the task (of each).")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per forward pass; with --task, examples "
                                                        "(HellaSwag's of 4 sequences each, ARC's of 3-5). Default: "
                                                        "~16K tokens.")
                          ] = None,
    device: ModelDeviceOpt = None,
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast; auto: bf16 on CUDA).")] = "auto",
    record: Annotated[
        bool, typer.Option("--record/--no-record", help="Append the result to the run's eval.jsonl and report.md.")
    ] = True,
    as_json: JsonOpt = False,
) -> None:
    """Measure a run: loss, perplexity and bits per byte on a split, or zero-shot HellaSwag, ARC or LAMBADA."""
    if model is not None and run is not None:
        raise TinyGPTError("give either RUN or --model, not both")
    _refuse_blank(run, "RUN", _LATEST_RUN_HINT)
    _refuse_blank(model, "--model", _LATEST_RUN_HINT)
    _refuse_blank(split, "--split", "name val or train (left out: val)")
    run = model if model is not None else run
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from tinygpt_cli import evaluation as ev

    if task is None and (task_data is not None or limit is not None):
        raise TinyGPTError(f"--task-data and --limit go with --task ({' | '.join(ev.TASKS)})")
    if task is not None and (data_name is not None or tokens is not None or split is not None):
        raise TinyGPTError("--data, --split and --tokens are for the loss; a --task reads its own examples "
                           "(--task-data)")
    from tinygpt_cli.config import task_names

    tasks = task_names(task) if task is not None else []
    err = _stderr_console()
    progress = Progress(
        TextColumn("[bold]eval[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
    bar = None
    clock = _PlainClock()

    def on_event(event: ev.EvalEvent) -> None:
        nonlocal bar
        if event.kind == "info":
            err.print(event.message)
        elif event.kind == "start" and _animated(err):  # a log gets a plain line now and then, not a bar
            bar = progress.add_task("eval", total=max(1, event.total), unit=event.unit)
            progress.start()
        elif event.kind == "progress" and bar is not None:
            progress.update(bar, completed=event.done)
        elif event.kind == "progress" and event.done < event.total and clock.due():
            err.print(f"eval: {event.done:,}/{event.total:,} {event.unit} ({event.done / event.total:.0%})")

    common = {"batch_size": batch_size, "device": device or "auto", "dtype": dtype, "on_event": on_event,
              "record": record}

    done: list[str] = []  # the tasks scored and recorded before an interrupt

    def stopped(exc: KeyboardInterrupt) -> str:
        recorded = getattr(exc, "recorded_in", None)
        if recorded:
            return f"Interrupted after the result was recorded in {recorded}/eval.jsonl and report.md."
        if done:
            return f"Interrupted: {', '.join(done)} recorded, the task under way not."
        return "Interrupted: nothing was recorded."

    def show(result: Any) -> None:  # each result as it is done (a task's), the next task's bar after it
        nonlocal bar
        if bar is not None:
            progress.stop()
            progress.remove_task(bar)
            bar = None
        _print_eval(result, run, as_json, err, record)
        if result.recorded_in and isinstance(result, ev.TaskResult):
            done.append(result.task)

    try:
        with _interruptible(None, err, stopped):
            if tasks:  # one model load; every task's examples first, then each scored, shown and recorded
                ev.evaluate_tasks(run, tasks=tasks, task_data=task_data, limit=limit, on_result=show, **common)
            else:
                show(ev.evaluate(run, data=data_name, split=split or "val",
                                 tokens=tokens if tokens is not None else ev.DEFAULT_TOKENS, **common))
    finally:
        if bar is not None:
            progress.stop()


def _print_eval(result: Any, run: str | None, as_json: bool, err: Any, record: bool = True) -> None:
    """One evaluation's line (or JSON object) on stdout, and where it was recorded (or why not) on stderr."""
    from tinygpt_cli import evaluation as ev

    if as_json:
        print(json.dumps(ev.json_safe(result), allow_nan=False))
        return
    which = f"step {result.step}" if result.step is not None else str(run)  # a Hugging Face folder, or gpt2
    if isinstance(result, ev.TaskResult):
        from tinygpt_cli.report import task_line

        print(f"{task_line(dataclasses.asdict(result))} (zero-shot, {which})")
    else:
        print(
            f"{result.dataset}/{result.split}: loss {result.loss:.4f} · perplexity {result.perplexity:.2f} · "
            f"{'n/a' if result.bits_per_byte is None else f'{result.bits_per_byte:.4f}'} bits/byte on "
            f"{_fmt_int(result.tokens)} tokens "
            f"({format_bytes(result.text_bytes)} of text, {which})"
        )
    if result.recorded_in:
        err.print(f"Recorded in {result.recorded_in}/eval.jsonl and report.md")
    elif record:  # a model folder or a hub name: no run to keep it
        err.print(f"Not recorded: {run} is no tinygpt run (results go to a run's eval.jsonl and report.md)")


_LATEST_RUN_HINT = "name a run, checkpoint or model folder, or leave it out for the latest run"


def _refuse_blank(value: str | None, param_hint: str, what: str) -> None:
    """A script's empty variable (`--run "$RUN"`) is a mistake, not the latest run or the current folder."""
    if value is not None and not value.strip():
        raise typer.BadParameter(f"is empty: {what}", param_hint=param_hint)


# ----------------------------------------------------------------------------------------- export
@app.command(
    cls=_Command,
    epilog="Examples:  tinygpt export  ·  tinygpt export my-run --format gguf --dtype q8_0  ·  "
    "tinygpt export --format onnx --out model-onnx  ·  tinygpt export gpt2 --format gguf"
)
def export(
    source: Annotated[
        str | None,
        typer.Argument(
            help="Run name or folder, checkpoint folder, Hugging Face GPT-2 folder, or gpt2…gpt2-xl "
            "(default: the latest run).",
            autocompletion=_completion(_model_names),
        ),
    ] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="hf (transformers) | gguf (llama.cpp) | onnx.",
                                     autocompletion=_config_names("EXPORT_FORMATS"))] = "hf",
    out: Annotated[
        str | None,
        typer.Option("--out", "-o", help="Output folder (gguf: a .gguf file or a folder; default: under exports/)."),
    ] = None,
    dtype: Annotated[str, typer.Option(help="fp32 | fp16 | bf16 (hf, gguf) | q8_0 (gguf).",
                                       autocompletion=_completion(_export_dtypes))] = "fp32",
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it is an earlier export.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export a model for Hugging Face transformers, llama.cpp (GGUF) or ONNX Runtime."""
    from tinygpt_cli.export import check_format, export_model

    _refuse_blank(out, "--out", "name a folder (gguf: or a .gguf file), or leave --out out for one under exports/")
    _refuse_blank(source, "SOURCE", _LATEST_RUN_HINT)
    fmt, dtype = fmt.lower(), dtype.lower()
    check_format(fmt, dtype)  # before loading anything
    err = _stderr_console()
    err.print(f"Exporting {source or 'the latest run'} as {fmt} ({dtype})…", soft_wrap=True)
    def stopped(exc: KeyboardInterrupt) -> str:
        written = getattr(exc, "export_written", None)
        return (f"Interrupted after the export was written: {written} is complete." if written else
                "Interrupted: the export stopped and its partial files were removed.")

    with _interruptible(None, err, stopped):
        result = export_model(source, fmt, out, dtype, force=force)
    if as_json:
        print(
            json.dumps(
                {
                    "path": str(result.path),
                    "format": result.format,
                    "dtype": result.dtype,
                    "source": str(result.source),
                    "files": result.files,
                    "bytes": result.total_bytes,
                }
            )
        )
        return
    print(f"Wrote {result.path} ({fmt}, {dtype}, {format_bytes(result.total_bytes)}) from {result.source}")
    if len(result.files) > 1:
        width = max(len(name) for name in result.files)
        for name, size in result.files.items():
            print(f"  {name:<{width}}  {format_bytes(size):>9}")


# ----------------------------------------------------------------------------------------- plan
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _fmt_count(n: float) -> str:
    """1.23T, 4.56B, 7.89M, 1.20k, 12: a count to read at a glance (past 1,000T, in powers of ten)."""
    if abs(n) >= 1e15:
        return f"{n:.2e}"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _plan_table(p) -> Any:
    """The rows of `tinygpt plan`, as a rich Table."""
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    from tinygpt_cli.config import ModelConfig, size_label
    from tinygpt_cli.plan import passes_text

    m, d, mem = p.model, p.data, p.memory
    size = size_label(p.size, ModelConfig(**m))  # as report.md names it
    table.add_row(
        "model",
        f"{size}: {counted(m['n_layer'], 'layer')} × {m['n_embd']}, {counted(m['n_head'], 'head')}, "
        f"context {m['block_size']}, vocabulary {m['vocab_size']}",
    )
    table.add_row("parameters", f"{_fmt_int(p.parameters)} ({_fmt_int(p.non_embedding_parameters)} non-embedding)")
    table.add_row("FLOPs per token", f"{p.flops_per_token / 1e9:.3f} GFLOP (6·N + 12·L·T·C, N with the head)")
    basis = (
        "counted: meta.json"
        if d.origin == "meta.json"
        else f"estimated: {d.fraction:.0%} of the source's ~{_fmt_count(d.source_tokens or 0)} tokens"
    )
    table.add_row(
        "data", f"{d.name}: {_fmt_count(d.train_tokens)} train + {_fmt_count(d.val_tokens)} val tokens ({basis})"
    )
    disk = f"{format_bytes(d.token_file_bytes)} of token files"
    if d.download_bytes:
        disk += f" (+ the download: ~{format_bytes(d.download_bytes)} of text)"
    table.add_row("disk: data", disk)
    table.add_row(
        "disk: checkpoints",
        f"{format_bytes(p.checkpoint_bytes)} each ({p.checkpoint_bytes / p.parameters:.0f} bytes/parameter) × "
        f"{p.checkpoints_on_disk} at most = {format_bytes(p.checkpoint_disk_bytes)}",
    )
    procs = f" × {p.nproc} processes" if p.nproc > 1 else ""
    table.add_row(
        "batch",
        f"{p.batch_size} × {p.grad_accum} accumulation × {m['block_size']} tokens{procs} = "
        f"{_fmt_int(p.tokens_per_step)} tokens/step",
    )
    table.add_row(
        "budget",
        f"{_budget_steps(p)} = {_fmt_count(p.budget_tokens)} tokens "
        f"({passes_text(p.epochs)} epochs); Chinchilla-optimal: {_fmt_count(p.chinchilla_tokens)} "
        f"({p.budget_tokens / p.chinchilla_tokens:.2g}×)",
    )
    device = f"{p.nproc} × {p.device.name}" if p.nproc > 1 else p.device.name
    table.add_row("device", f"{device}, {p.dtype}")
    of = f" of {_gib(mem.device_memory)} (usable {_gib(mem.usable_memory)})" if mem.usable_memory else ""
    fits = {True: ": fits", False: ": does NOT fit", None: ""}[mem.fits]
    table.add_row("memory per device", f"{_gib(mem.total)}{of}{fits}")
    states = mem.weights + mem.gradients + mem.optimizer
    extra = mem.autocast_weight_copies + mem.ddp_buckets + mem.fsdp_gathered + mem.head_gradient + mem.loss_chunk
    runtime = f", the process itself {_gib(mem.runtime)}" if mem.runtime else ""
    table.add_row(
        "  of which",
        f"weights + gradients + {'AdamW' if p.optimizer == 'adamw' else 'AdamW/Muon'} {_gib(states)}, "
        f"activations {_gib(mem.activations)} "
        f"({mem.activations_per_sequence / 2**20:.0f} MiB/sequence), buffers {_gib(extra)}{runtime}",
    )
    if mem.max_batch_size is not None:
        table.add_row("largest micro-batch", str(mem.max_batch_size))
    if p.tokens_per_s:
        how = (
            "measured here"
            if p.time_basis == "measured"
            else f"{(p.peak_flops or 0) / 1e12:.0f} TFLOP/s peak × {p.mfu:.0%} MFU"
        )
        table.add_row("throughput", f"{_fmt_int(p.tokens_per_s)} tokens/s ({how})")
        table.add_row("wall time", f"{_fmt_seconds(p.seconds)} (training + evals)")
    return table


@app.command(
    cls=_Command,
    epilog="Examples:  tinygpt plan --size small --data openwebtext --fraction 0.25 --device h100  ·  "
    "tinygpt plan --size small --device a100 --nproc 8 --grad-accum 4 --json  ·  "
    "tinygpt plan --size micro --measure  ·  tinygpt plan --size small --find-lr"
)
def plan(
    size: Annotated[str | None, typer.Option(help="Preset: micro, tiny, small (124M), medium, large, xl.",
                                             autocompletion=_config_names("PRESETS"))] = None,
    config: Annotated[Path | None, typer.Option("--config", readable=False,
                                                help=_CONFIG_HELP)] = None,
    overrides: Annotated[
        list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=3e-4 (repeatable).")
    ] = None,
    data_name: Annotated[
        str | None,
        typer.Option(
            "--data",
            help="Tokenized dataset, or a known source (openwebtext, tinystories, "
            "fineweb-edu, wikitext-103, shakespeare). Default: what train would use.",
            autocompletion=_completion(lambda: {*_dataset_names(), *_corpus_names()}),
        ),
    ] = None,
    fraction: Annotated[
        float | None, typer.Option(help="Share of a not-yet-tokenized source to use (tokenize --fraction).")
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            help="auto (this machine) | cuda | cpu | mps | h100 | h100-pcie | h100-nvl | h200 | gh200 | a100 "
            "| a100-40 | l40s | l40 | a10g | a10 | l4 | rtx4090 | rtx3090 | v100 | t4."  # plan.DEVICE_CHOICES (tested)
        ),
    ] = "auto",
    nproc: Annotated[int, typer.Option(help="Processes (GPUs) training together.")] = 1,
    batch_size: Annotated[
        str | None, typer.Option(help="Sequences per micro-batch, or 'auto' (the largest that fits).")
    ] = None,
    grad_accum: Annotated[int | None, typer.Option(help="Micro-batches per optimizer step (per process).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps to train in all.")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16 (autocast).")] = None,
    mfu: Annotated[float | None, typer.Option(help="Model FLOPs utilisation assumed on a GPU (default 0.40).")] = None,
    measure: Annotated[
        bool, typer.Option("--measure", help="Time a few real training steps here instead of assuming an MFU.")
    ] = False,
    find_lr: Annotated[
        bool, typer.Option("--find-lr", help="Sweep the LR up over a short trial here (a range test) and suggest "
                           "a peak --lr; no run or checkpoint is written.")
    ] = False,
    find_lr_steps: Annotated[int, typer.Option(help="--find-lr: steps in the sweep.")] = 100,
    start_lr: Annotated[float, typer.Option(help="--find-lr: the LR of its first step.")] = 1e-6,
    end_lr: Annotated[float, typer.Option(help="--find-lr: the LR of its last step.")] = 1.0,
    max_tokens: MaxTokensOpt = None,
    max_minutes: MaxMinutesOpt = None,
    dropout: DropoutOpt = None,
    keep_last: KeepLastOpt = None,
    compile_mode: CompileOpt = None,
    init_from: InitFromOpt = None,
    fsdp: FsdpOpt = None,
    lr: LrOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Estimate a run before spending on it: parameters, FLOPs, data, disk, memory, micro-batch and time."""
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.plan import plan as make_plan
    from tinygpt_cli.plan import plan_to_dict

    flags = _run_flags(batch_size, grad_accum, max_steps, max_tokens, max_minutes, dtype, dropout, keep_last,
                       compile_mode, init_from, fsdp, lr)
    cfg = resolve_config(size=size, config_file=config, overrides=overrides or (), flags=flags)
    if find_lr:
        if mfu is not None or fraction is not None:  # the estimate's: the sweep trains on a tokenized dataset
            raise TinyGPTError(f"{'--mfu' if mfu is not None else '--fraction'} is for the estimate; --find-lr trains "
                               f"here on a tokenized dataset: drop it")
        _find_lr(cfg, data_name, device, nproc, measure, find_lr_steps, start_lr, end_lr, as_json)
        return
    if measure:
        _stderr_console().print("Measuring a few training steps on this machine…")
    result = make_plan(
        cfg,
        data=data_name or cfg.data.dataset or None,
        fraction=fraction,
        device=device,
        nproc=nproc,
        mfu=mfu,
        do_measure=measure,
    )
    if as_json:
        print(json.dumps(plan_to_dict(result)))
        return
    _print_table(_plan_table(result))  # piped: no row folded at 80 columns
    out = _stdout_console()
    for note in result.notes:
        out.print(f"• {note}")


def _find_lr(cfg: Any, data_name: str | None, device: str, nproc: int, measure: bool, steps: int, start_lr: float,
             end_lr: float, as_json: bool) -> None:
    """`tinygpt plan --find-lr`: the range test (`lrfind.find_lr`) with a bar, then its curve and suggestion."""
    from dataclasses import asdict, replace

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tinygpt_cli.lrfind import check_sweep, find_lr
    from tinygpt_cli.plan import check_here

    if measure:
        raise TinyGPTError("--find-lr and --measure are two trials: run one at a time")
    check_here("--find-lr", device)
    if nproc < 1:
        raise TinyGPTError(f"--nproc must be at least 1 (got {nproc})")
    check_sweep(steps, start_lr, end_lr)  # before the data and the model
    chosen = device.strip().lower()  # left at auto: the config's train.device, as train takes it
    tc = replace(cfg.train, device=chosen if chosen != "auto" else cfg.train.device,
                 grad_accum=cfg.train.grad_accum * nproc)
    cfg = replace(cfg, train=tc, data=replace(cfg.data, dataset=data_name or cfg.data.dataset))
    err = _stderr_console()
    if nproc > 1:
        err.print(f"One process here: {nproc}× the micro-batches a step (grad_accum {tc.grad_accum}), so that a "
                  f"step takes as many tokens as on {nproc} processes.")
    progress = Progress(TextColumn("[bold]find-lr[/]"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[now]}"), console=err, transient=True)
    bar = progress.add_task("find-lr", total=steps, now="") if _animated(err) else None
    clock = _PlainClock()

    def on_point(point: Any) -> None:
        now = f"lr {point.lr:.2g} · loss {point.smoothed:.3f}"  # the running loss, as the stop test reads it
        if bar is not None:
            progress.update(bar, completed=point.step + 1, now=now)
        elif clock.due():
            err.print(f"find-lr: {point.step + 1}/{steps} · {now}")

    err.print(f"Sweeping the LR from {start_lr:.2g} to {end_lr:.2g} over {steps} steps on this machine (no run or "
              f"checkpoint is saved)…")
    with _interruptible(None, err, lambda exc: "Interrupted: no run or checkpoint was written."):
        if bar is not None:
            progress.start()
        try:
            sweep = find_lr(cfg, steps=steps, start_lr=start_lr, end_lr=end_lr, on_point=on_point,
                            on_info=lambda message: err.print(message[:1].upper() + message[1:]))
        finally:
            progress.stop()
    if as_json:
        print(json.dumps(asdict(sweep)))
        return
    _print_sweep(sweep)


def _print_sweep(sweep: Any) -> None:
    """A range test's curve at a dozen LRs, then what it suggests."""
    from rich.table import Table

    from tinygpt_cli.lrfind import DIVERGED
    from tinygpt_cli.training import MAX_BAD_STEPS

    out = _stdout_console()
    points = sweep.points
    shown = sorted({round(i * (len(points) - 1) / 11) for i in range(12)}) if len(points) > 12 else \
        list(range(len(points)))
    lowest = min(range(len(points)), key=lambda i: points[i].smoothed) if points else None
    if lowest is not None and lowest not in shown:
        shown = sorted({*shown, lowest})
    table = Table("step", "lr", "loss", "smoothed", title=f"LR sweep: {sweep.device}, {sweep.dtype}, "
                  f"{_fmt_int(sweep.tokens_per_step)} tokens a step, {_fmt_seconds(sweep.seconds)}",
                  title_justify="left")
    for i in shown:
        point = points[i]
        mark = " ← lowest" if i == lowest else ""
        table.add_row(str(point.step + 1), f"{point.lr:.2e}", f"{point.loss:.4f}", f"{point.smoothed:.4f}{mark}")
    _print_table(table)
    if sweep.stopped == "climbed":
        out.print(f"• the sweep stopped at LR {points[-1].lr:.2g}, where the loss climbed back past where it "
                  f"started (or to {DIVERGED:g}× its lowest)")
    elif sweep.stopped == "non-finite" and points:
        out.print(f"• the sweep stopped after LR {points[-1].lr:.2g}: the loss, or its gradients {MAX_BAD_STEPS} steps "
                  f"in a row, were no longer finite")
    for note in sweep.notes:
        out.print(f"• {note}")
    if sweep.suggested_lr is not None:
        muon = f" --set train.muon_lr={sweep.suggested_muon_lr:.2g}" if sweep.suggested_muon_lr else ""
        out.print(f"Suggested peak LR: --lr {sweep.suggested_lr:.2g}{muon} (the smoothed loss fell fastest at "
                  f"{sweep.steepest_lr:.2g} and was lowest at {sweep.lowest_lr:.2g}; the suggestion is the first, kept "
                  f"within a tenth to a half of the second)")


# ----------------------------------------------------------------------------------------- runs, data
runs_app = typer.Typer(
    cls=_Group,
    help="List the runs in the workspace; `tinygpt runs show NAME` prints a run's report, `tinygpt runs compare A B` "
    "sets runs side by side, `tinygpt runs rm NAME` deletes one.",
    no_args_is_help=False,
    rich_markup_mode="rich",
)
app.add_typer(runs_app, name="runs")


def _when(iso: str | None) -> str:
    if not iso:
        return ""
    import datetime as _dt

    try:
        return _dt.datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return iso


def _loss(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"


@runs_app.callback(
    invoke_without_command=True,
    epilog="Examples:  tinygpt runs  ·  tinygpt runs --json  ·  tinygpt runs show  ·  tinygpt runs show my-run",
)
def runs(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the runs in the workspace: name, status (training, finished, interrupted, time limit, token limit,
    failed, killed, starting, no checkpoint), size, steps, tokens, best val loss, date (the last saved first)."""
    if ctx.invoked_subcommand is not None:
        return
    from tinygpt_cli import workspace
    from tinygpt_cli.inventory import list_run_summaries

    def row(s) -> tuple[str, ...]:
        steps = f"{s.steps:,}/{s.max_steps:,}" if s.max_steps else f"{s.steps:,}"
        size = s.size if s.shape is None or not s.shape.startswith("custom") else s.shape  # not "micro" for 2×64
        return (s.name, s.status, size or "?", steps, _fmt_count(s.tokens), _loss(s.best_val_loss),
                _when(s.saved_at))

    problems: list[str] = []
    summaries = list_run_summaries(problems)
    _print_notes(problems)
    _print_listing(summaries, as_json, ("run", "status", "size", "steps", "tokens", "best val loss", "saved"), row,
                   _nothing_in(workspace.runs_dir(), "runs", "train one with `tinygpt train`"))


def _nothing_in(folder: Path, what: str, how: str) -> str:
    """What an empty listing of `folder` says: a TINYGPT_HOME that does not exist (a typo, a disk not mounted) or
    a file where the folder goes is no empty workspace."""
    from tinygpt_cli.workspace import home_setting

    home = home_setting()
    if home and not os.path.exists(home):
        return (f"No workspace at {home} (TINYGPT_HOME): it does not exist. Point TINYGPT_HOME at your workspace, "
                f"or {how} to start one there")
    if folder.exists() and not folder.is_dir():
        return f"{folder} is a file, not the folder of {what}: move it aside"
    return f"No {what} in {folder} yet: {how}"


def _print_notes(problems: list[str]) -> None:
    """`runs` and `data`: what they leave out, one note each on stderr."""
    for problem in problems:
        _stderr_console().print(f"note: {problem}")


def _print_listing(summaries: list, as_json: bool, columns: tuple[str, ...], row: Any, empty: str) -> None:
    """`runs` and `data`: the summaries as JSON, a table (one `row(summary)` each), or `empty` on stderr."""
    from dataclasses import asdict

    from rich.table import Table

    if as_json:
        print(json.dumps([asdict(s) for s in summaries]))
        return
    if not summaries:
        _stderr_console().print(empty)
        return
    from rich.table import Column

    rows = [row(summary) for summary in summaries]
    # no cell is cut to an ellipsis: a narrow terminal folds it onto more lines. The name (what a user copies) keeps
    # a width of its own, and the status its longest word
    widths = [min(max(len(r[0]) for r in rows), 24), max(len(word) for r in rows for word in r[1].split() or [""])]
    table = Table(*(Column(header, overflow="fold", min_width=widths[i] if i < 2 else None)
                    for i, header in enumerate(columns)))
    for cells in rows:
        table.add_row(*cells)
    _print_table(table)


@runs_app.command("show", cls=_Command, epilog="Examples:  tinygpt runs show  ·  tinygpt runs show my-run")
def runs_show(
    run: Annotated[str | None, typer.Argument(
        help="Run name or folder, or a checkpoint folder (default: the latest run).",
        autocompletion=_completion(_run_names))] = None,
) -> None:
    """Print a run's report.md: config, data, hardware, time, losses, a sample, evals.

    A checkpoint outside a run has its own, of the evals run on it."""
    from tinygpt_cli.inventory import run_report

    _, text, note = run_report(run)
    _print_notes([note] if note else [])
    print(text.rstrip("\n"))


@runs_app.command("compare", cls=_Command,
                  epilog="Examples:  tinygpt runs compare adamw-run muon-run  ·  tinygpt runs compare a b c --plot "
                  "val.png  ·  tinygpt runs compare 'lr3e-3-*' 'lr1e-3-*'  ·  tinygpt runs compare a b --json")
def runs_compare(
    names: Annotated[list[str], typer.Argument(metavar="RUN", help="Two runs or more, by the names `tinygpt runs` "
                                                                   "lists (or their folders); a quoted pattern, "
                                                                   "'lr3e-3-*', is one column of the runs it "
                                                                   "matches (mean ± std).",
                                               autocompletion=_completion(_run_names))],
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Also draw their val loss against tokens into this .png file.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Runs side by side: their losses, speed and evals, and the settings in which they differ."""
    from tinygpt_cli.inventory import compare_runs

    if len(names) < 2 and not any(char in names[0] for char in "*?["):  # a pattern may be several
        raise typer.BadParameter("name two runs or more (`tinygpt runs` lists them)", param_hint="RUN")
    if plot is not None and plot.suffix.lower() != ".png":
        raise typer.BadParameter(f"{plot} does not end in .png: name the image file to write, e.g. val.png",
                                 param_hint="--plot")
    comparison = compare_runs(names)
    if plot is not None:
        _write_comparison_plot(comparison, plot)
    if as_json:
        from dataclasses import asdict

        from tinygpt_cli.inventory import val_loss_at
        from tinygpt_cli.workspace import strict_json

        def at_common(run: Any) -> float | None:
            return None if comparison.common_tokens is None else val_loss_at(run, comparison.common_tokens)

        def stats(values: list[float | None]) -> dict[str, Any] | None:
            spread = _spread(values)
            return None if spread is None else dict(zip(("mean", "std", "n"), spread, strict=True))

        print(json.dumps(strict_json({
            "runs": [{**asdict(run), "val_loss_at_common_tokens": at_common(run)} for run in comparison.runs],
            "groups": [{"label": group.label, "runs": [run.summary.name for run in group.runs],
                        "train_loss": stats([run.train_loss for run in group.runs]),
                        "val_loss": stats([run.val_curve[-1][2] if run.val_curve else run.summary.val_loss
                                           for run in group.runs]),
                        "best_val_loss": stats([run.summary.best_val_loss for run in group.runs]),
                        "val_loss_at_common_tokens": stats([at_common(run) for run in group.runs])}
                       for group in comparison.groups],
            "differing": comparison.differing, "same": comparison.same,
            "common_tokens": comparison.common_tokens}), allow_nan=False))
    else:
        from tinygpt_cli.workspace import counted

        _print_table(_comparison_table(comparison))
        sys.stdout.flush()  # the table, then the note under it, where both go to one terminal or file
        same = comparison.same
        _stderr_console().print(f"{counted(same, 'other setting')} {'is' if same == 1 else 'are'} the same in all."
                                if comparison.differing else "Every setting is the same in all.")
    if plot is not None:
        _stderr_console().print(f"Plot written to {plot}")


def _comparison_table(comparison: Any) -> Any:
    """`runs compare`: one column a run, or a pattern's runs (their mean ± sample std); the results, then the
    settings that differ (the best loss in bold)."""
    from collections import Counter

    from rich.table import Column, Table
    from rich.text import Text

    from tinygpt_cli.config import is_count
    from tinygpt_cli.inventory import number_or_none, val_loss_at
    from tinygpt_cli.report import task_line

    groups = comparison.groups
    table = Table(Column("", style="bold"), *(
        Column(group.runs[0].summary.name if len(group.runs) == 1 else f"{group.label} ({len(group.runs)} runs)",
               overflow="fold") for group in groups))

    def losses(label: str, value_of: Callable[[Any], float | None], suffix: Callable[[Any], str] | None = None,
               digits: int = 4, higher_is_better: bool = False) -> None:
        spreads = [_spread([value_of(run) for run in group.runs]) for group in groups]
        present = [spread[0] for spread in spreads if spread is not None]
        best = (max if higher_is_better else min)(present) if len(present) > 1 else None
        cells: list[Any] = []
        for group, spread in zip(groups, spreads, strict=True):
            if spread is None:
                cells.append("n/a")
                continue
            mean, std, count = spread
            extra = suffix(group.runs[0]) if suffix and len(group.runs) == 1 else ""
            if std is not None:
                extra = f" ± {std:.{digits}f}{extra}"
            if count < len(group.runs):
                extra += f" ({count} of {len(group.runs)})"
            cells.append(Text.assemble((f"{mean:.{digits}f}", "bold green" if mean == best else ""), extra))
        table.add_row(label, *cells)

    def row(label: str, text_of: Callable[[Any], str]) -> None:  # the distinct values of a group's runs
        table.add_row(label, *(" · ".join(dict.fromkeys(text_of(run) for run in group.runs)) for group in groups))

    def mean_row(label: str, value_of: Callable[[Any], float | None], shown: Callable[[float], str]) -> None:
        cells = []
        for group in groups:
            values = [value for run in group.runs if (value := value_of(run)) is not None]
            some = f" ({len(values)} of {len(group.runs)})" if 0 < len(values) < len(group.runs) else ""
            cells.append(shown(sum(values) / len(values)) + some if values else "n/a")
        table.add_row(label, *cells)

    table.add_row("status", *(group.runs[0].summary.status if len(group.runs) == 1 else " · ".join(
        f"{count} {status}" for status, count in Counter(run.summary.status for run in group.runs).items())
        for group in groups))
    row("model", lambda run: f"{run.summary.size or '?'} {run.summary.shape or ''} · "
                             f"{_fmt_count(run.summary.parameters) if run.summary.parameters else '?'} parameters")
    row("data", lambda run: run.summary.dataset or "?")
    row("steps", lambda run: f"{run.summary.steps:,}/{run.summary.max_steps:,}" if run.summary.max_steps else
        f"{run.summary.steps:,}")
    row("tokens", lambda run: _fmt_count(run.summary.tokens))
    losses("train loss", lambda run: run.train_loss)
    losses("val loss", lambda run: run.val_curve[-1][2] if run.val_curve else run.summary.val_loss)
    losses("best val loss", lambda run: run.summary.best_val_loss,
           lambda run: f" (step {run.summary.best_step:,})" if run.summary.best_step is not None else "")
    if comparison.common_tokens is not None:
        losses(f"val loss at {_fmt_count(comparison.common_tokens)} tokens",
               lambda run: val_loss_at(run, comparison.common_tokens))
    mean_row("training time", lambda run: run.elapsed_s, _fmt_seconds)
    mean_row("tokens/s", lambda run: run.tokens_per_s, _fmt_count)
    mean_row("MFU", lambda run: run.mfu, lambda mfu: f"{mfu:.1%}")
    for measure in dict.fromkeys(key for run in comparison.runs for key in run.measures):
        if all(len(group.runs) == 1 for group in groups):  # each run's record as `tinygpt eval` prints it
            cells = []
            for group in groups:
                record = group.runs[0].measures.get(measure)
                if record is None:
                    cells.append("")
                    continue
                at = f" (step {record['step']:,})" if is_count(record.get("step")) else ""
                if measure.startswith("loss "):
                    loss, bpb = number_or_none(record.get("loss")), number_or_none(record.get("bits_per_byte"))
                    cells.append(("n/a" if loss is None else f"{loss:.4f}")
                                 + ("" if bpb is None else f" · {bpb:.4f} bits/byte") + at)
                else:
                    cells.append(task_line(record).split(": ", 1)[-1] + at)
            table.add_row(measure, *cells)
        else:  # a pattern's runs: the mean of each one's headline figure (a loss, or an accuracy)
            figure = "loss" if measure.startswith("loss ") else "accuracy_norm" if any(
                "accuracy_norm" in run.measures.get(measure, {}) for run in comparison.runs) else "accuracy"
            losses(f"{measure} {figure.replace('accuracy_norm', 'acc_norm').replace('accuracy', 'acc')}",
                   lambda run: number_or_none(run.measures.get(measure, {}).get(figure)),  # noqa: B023 (used now)
                   higher_is_better=figure != "loss")
    if comparison.differing:
        table.add_section()
        for key in comparison.differing:
            row(key, lambda run: "" if key not in run.config else _setting(run.config[key]))  # noqa: B023
    return table


def _spread(values: list[float | None]) -> tuple[float, float | None, int] | None:
    """(mean, sample standard deviation or None for one value, count) of the values present; None for none."""
    import statistics

    present = [value for value in values if value is not None]
    if not present:
        return None
    return statistics.fmean(present), statistics.stdev(present) if len(present) > 1 else None, len(present)


def _setting(value: Any) -> str:
    """A setting's value as config.yaml writes it ('' for an empty string: none)."""
    if value == "":
        return "''"
    return json.dumps(value) if not isinstance(value, str) else value


def _write_comparison_plot(comparison: Any, path: Path) -> None:
    from tinygpt_cli.report import render_comparison_plot
    from tinygpt_cli.workspace import write_bytes_atomic

    if path.is_dir():
        raise TinyGPTError(f"{path} is a folder: name the .png file to write, e.g. {path / 'val.png'}")
    curves = [(group.runs[0].summary.name if len(group.runs) == 1 else f"{group.label} ({len(group.runs)} runs)",
               [[(tokens, loss) for _, tokens, loss in run.val_curve] for run in group.runs])
              for group in comparison.groups]
    if not any(points for _, lines in curves for points in lines):
        raise TinyGPTError("none of these runs has evaluated yet (no val loss in their metrics.jsonl): nothing to "
                           "plot; compare them without --plot")
    try:
        write_bytes_atomic(path, render_comparison_plot(curves))
    except OSError as exc:
        raise TinyGPTError(f"cannot write {path}: {exc.strerror or exc}: name a .png file in a folder you can "
                           f"write") from None


@runs_app.command("rm", cls=_Command,
                  epilog="Examples:  tinygpt runs rm old-run  ·  tinygpt runs rm try-1 try-2 --yes")
def runs_rm(
    names: Annotated[list[str], typer.Argument(metavar="NAME", help="Runs to delete, by the names `tinygpt runs` "
                                                                    "lists; a quoted pattern, 'sweep-*', names the "
                                                                    "runs it matches.",
                                               autocompletion=_completion(_run_names))],
    yes: YesOpt = False,
) -> None:
    """Delete runs: their checkpoints, logs, reports and evals. One that is training now is refused."""
    from tinygpt_cli.inventory import matching_runs, plan_run_removal

    specs = [spec for name in names for spec in ([run.name for run in matching_runs(name) or []] or [name])]
    _remove([plan_run_removal(spec) for spec in dict.fromkeys(specs)], yes)


def _remove(removals: list, yes: bool) -> None:
    """`runs rm` and `data rm`: say what goes, ask (unless --yes), then delete each; all checked before any goes."""
    from tinygpt_cli.inventory import remove

    err = _stderr_console()
    for removal in removals:
        err.print(f"{removal.what}: {removal.detail}")
        for note in removal.notes:
            err.print(f"  note: {note}")
    if not yes:
        if not _stdin_is_interactive():
            raise TinyGPTError("nothing deleted: pass --yes to delete without being asked (stdin is not a terminal)")
        freed = format_bytes(sum(removal.bytes for removal in removals))
        try:
            confirmed = typer.confirm(f"Delete {'it' if len(removals) == 1 else f'these {len(removals)}'} "
                                      f"({freed})?", default=False, err=True)
        except typer.Abort:  # Ctrl-D, Ctrl-C at the prompt
            confirmed = False
        if not confirmed:
            err.print("Nothing deleted.")
            raise typer.Exit(1)
    done: list[str] = []

    def stopped(exc: KeyboardInterrupt) -> str:  # each deletion runs to its end: the ones after it are kept
        done.extend([exc.removed] if hasattr(exc, "removed") else [])
        kept = [removal.what for removal in removals if removal.what not in done]
        return (f"Interrupted: {'deleted ' + ', '.join(done) if done else 'nothing deleted'}"
                f"{'; kept ' + ', '.join(kept) if kept else ''}.")

    with _interruptible(None, err, stopped):
        for removal in removals:
            remove(removal)
            done.append(removal.what)
            err.print(f"Deleted {removal.what}" + (" (the link)" if removal.link else
                                                    f", {format_bytes(removal.bytes)} freed"))


data_app = typer.Typer(
    cls=_Group,
    help="List the tokenized datasets in the workspace; `tinygpt data show NAME` for one, `tinygpt data rm NAME` "
    "deletes one.",
    no_args_is_help=False,
    rich_markup_mode="rich",
)
app.add_typer(data_app, name="data")


@data_app.callback(
    invoke_without_command=True,
    epilog="Examples:  tinygpt data  ·  tinygpt data --json  ·  tinygpt data show shakespeare",
)
def data_list(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List the tokenized datasets in the workspace with their token and document counts (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    from tinygpt_cli import workspace
    from tinygpt_cli.inventory import list_dataset_summaries

    def row(s) -> tuple[str, ...]:
        fraction = f"{s.fraction:g}" if s.fraction is not None else ""
        return (s.name, _fmt_int(s.train_tokens), _fmt_int(s.val_tokens), _fmt_int(s.documents),
                format_bytes(s.bytes), fraction, _when(s.created))

    problems: list[str] = []
    summaries = list_dataset_summaries(problems)
    _print_notes(problems)
    _print_listing(summaries, as_json,
                   ("dataset", "train tokens", "val tokens", "documents", "on disk", "fraction", "created"), row,
                   _nothing_in(workspace.data_dir(), "tokenized data", "run `tinygpt tokenize`"))


@data_app.command("show", cls=_Command, epilog="Examples:  tinygpt data show  ·  tinygpt data show shakespeare --json")
def data_show(
    name: Annotated[str | None, typer.Argument(help="Dataset name or folder (default: the newest).",
                                               autocompletion=_completion(_dataset_names))] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a tokenized dataset's meta.json: source, tokenizer, split rule, counts and hashes."""
    from tinygpt_cli.inventory import dataset_meta

    path, meta, problem = dataset_meta(name)
    _print_notes([problem] if problem else [])
    if as_json:
        print(json.dumps(meta))
        return
    splits = meta.get("splits", {})
    source = meta.get("source") or {}
    print(f"{path.name}  ({path})")
    print(
        f"  source     {source.get('spec')} ({source.get('kind')}), fraction {meta.get('fraction')}, "
        f"seed {meta.get('seed')}, val fraction {meta.get('val_fraction')}"
    )
    for split in ("train", "val"):
        info = splits.get(split, {})
        print(
            f"  {split:<10} {_fmt_int(info.get('tokens', 0))} tokens, "
            f"{counted(int(info.get('documents', 0)), 'document')}, {format_bytes(info.get('bytes', 0))}, "
            f"sha256 {str(info.get('sha256', ''))[:16]}…"
        )
    tokenizer = meta.get("tokenizer") or {}
    print(
        f"  tokenizer  {tokenizer.get('name')} (vocabulary {tokenizer.get('vocab_size')}), created "
        f"{_when(meta.get('created'))}"
    )


@data_app.command("rm", cls=_Command,
                  epilog="Examples:  tinygpt data rm owt-test  ·  tinygpt data rm a b --yes  ·  "
                  "tinygpt data rm --download openwebtext")
def data_rm(
    names: Annotated[list[str], typer.Argument(metavar="NAME", help="Datasets to delete, by the names `tinygpt "
                                                                    "data` lists.",
                                               autocompletion=_completion(_dataset_names))],
    download: Annotated[bool, typer.Option("--download", help="Delete downloads (data/raw/NAME, as `tinygpt download "
                                                              "--list` shows them) instead.")] = False,
    yes: YesOpt = False,
) -> None:
    """Delete tokenized datasets, with an interrupted tokenize of each; with --download, downloaded corpora.

    One being tokenized or downloaded, or that a run is training on now, is refused."""
    from tinygpt_cli.inventory import plan_dataset_removal, plan_download_removal

    plan = plan_download_removal if download else plan_dataset_removal
    _remove([plan(name) for name in dict.fromkeys(names)], yes)


def _end_of_input() -> str:
    """The keys that end a console's input."""
    return "Ctrl-Z then Enter" if _on_windows() else "Ctrl-D"


def _lossy_encoding(stream: Any) -> str | None:
    """The encoding of `stream` where it is not a UTF (ASCII under LANG=C without Python's UTF-8 mode, latin-1, a
    Windows code page): `_encodable_streams` has it replace what it cannot encode. None for UTF-8."""
    encoding = getattr(stream, "encoding", None) or ""
    return None if encoding.lower().replace("-", "").replace("_", "").startswith("utf") else encoding or None


def _encodable_streams() -> None:
    """Let stdout and stderr take any text. Redirected to a file or a pipe on Windows they use the ANSI code page
    (cp1252, ...), strictly on stdout, which has no → or ≈ nor most of what a model writes: `tinygpt --help > f`
    and `tinygpt generate ... | more` failed with UnicodeEncodeError. There they write UTF-8, as in Python's UTF-8
    mode; elsewhere a stream whose encoding is not UTF-8 replaces what it cannot encode. (A Windows console is
    UTF-8 already.)"""
    for stream in (sys.stdout, sys.stderr):
        if not _lossy_encoding(stream) or not callable(getattr(stream, "reconfigure", None)):
            continue
        with contextlib.suppress(ValueError, OSError):  # a stream that cannot change now: leave it as it is
            if sys.platform == "win32":
                stream.reconfigure(encoding="utf-8", errors="replace")
            else:
                stream.reconfigure(errors="replace")


def _closed_streams_as_null() -> None:
    """A standard stream the command was started without (`<&-`, `>&-`: Python's sys.stdin/stdout/stderr are
    then None) reads as empty or discards, as /dev/null, instead of an AttributeError on None."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode, encoding="utf-8"))


def main() -> None:
    """Console-script entry point."""
    _closed_streams_as_null()
    _encodable_streams()
    global _STDOUT_PIPE
    _STDOUT_PIPE = _fd_identity(1, pipe=True)
    try:
        try:
            app()
        except KeyboardInterrupt as exc:  # one outside a command (Typer makes one inside it Exit(130))
            raise SystemExit(130) from exc
    except SystemExit as exc:
        code = _exit_status(exc.code)
        if code == 130:  # a stop that escaped the command, perhaps by SIGTERM or SIGHUP: 128 + its signal
            code = 128 + _stop_signal_of(exc)
        if _is_stop_code(code):  # a second signal during the teardown ends it at once with this code, not by
            _exit_on_stop_signals(code)  # the signal (-2 to a subprocess caller), and a hung teardown still ends
        if _streams_opened():
            _exit_now(code)
        raise SystemExit(code) from None
    except BaseException:  # an error of ours that escaped: its traceback, then the same way out
        if _streams_opened():
            import traceback

            traceback.print_exc()
            _exit_now(1)
        raise


def _stop_signal_of(exc: BaseException) -> int:
    """The signal of the stop (launch.Stopped: SIGTERM, SIGHUP) an exit of 130 came from, else SIGINT (Ctrl-C)."""
    import signal

    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, KeyboardInterrupt):
            return getattr(cause, "signal", None) or signal.SIGINT
        cause = cause.__cause__ or cause.__context__
    return signal.SIGINT


def _is_stop_code(code: object) -> bool:
    """Whether an exit status is 128 + a stop signal (Ctrl-C, SIGTERM, SIGHUP): not 141, a reader gone."""
    from tinygpt_cli.launch import STOP_SIGNALS

    return isinstance(code, int) and code - 128 in STOP_SIGNALS


def _exit_on_stop_signals(code: int) -> None:
    """From here the process only exits: Ctrl-C, SIGTERM and SIGHUP end it at once with `code`. A handler, not
    SIG_IGN, which the processes this one starts would inherit (and a hung exit could not be stopped)."""
    import signal

    from tinygpt_cli.launch import STOP_SIGNALS

    for signum in STOP_SIGNALS:
        with contextlib.suppress(ValueError, OSError):  # off the main thread, or a platform without it
            signal.signal(signum, lambda *_: _exit_at_once(code))


def _streams_opened() -> bool:
    """Whether a `datasets` stream was opened, whose Arrow threads can hang the interpreter's teardown (see
    download.STREAMS_OPENED): the process then ends with `_exit_now`, skipping it."""
    return "tinygpt_cli.download" in sys.modules and sys.modules["tinygpt_cli.download"].STREAMS_OPENED


def _exit_status(code: object) -> int | object:
    """The exit status, with 141 (128 + SIGPIPE, as `yes | head` gives) where the reader of stdout went away
    (`tinygpt generate ... | head`): Typer (and click) then swap in a PacifyFlushWrapper and exit 1, an error's code.
    (By the class's name: Typer vendors its own click, and click's is private from 8.2.)"""
    if code == 1 and (type(sys.stdout).__name__.lstrip("_") == "PacifyFlushWrapper" or _stdout_went_to_null()):
        return 128 + 13
    return code


_STDOUT_PIPE: tuple[int, int] | None = None  # the pipe stdout was when the command started (device, inode)


def _fd_identity(fd: int, pipe: bool = False) -> tuple[int, int] | None:
    """(device, inode) of what descriptor `fd` is open on (only a pipe, with `pipe`); None if it is not open."""
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return (info.st_dev, info.st_ino) if not pipe or stat.S_ISFIFO(info.st_mode) else None


def _stdout_went_to_null() -> bool:
    """Whether rich, printing help into a pipe whose reader went away, pointed stdout at the null device and exited 1
    (rich's own broken-pipe handling, in Typer's console). Not where ours did (`_drop_output_like`): such a command
    goes on without its output (a training), and an error it ends with keeps its code."""
    if _STDOUT_PIPE is None or os.name != "posix" or _OUTPUT_DROPPED:
        return False
    with contextlib.suppress(OSError):
        null = os.stat(os.devnull)
        return _fd_identity(1) == (null.st_dev, null.st_ino)
    return False


def _exit_now(code: object) -> None:
    """End the process with `code` at once, its output flushed, skipping the interpreter's teardown."""
    import logging

    if code is not None and not isinstance(code, int):  # sys.exit("text") prints the text and exits 1
        with contextlib.suppress(Exception):
            print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    _exit_at_once(code or 0)


def _exit_at_once(code: int) -> None:
    """Flush what was printed and end the process with `code`, skipping the interpreter's teardown."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
