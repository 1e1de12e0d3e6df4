"""`tinygpt train --nproc N`: N processes on this machine, through torch's elastic agent run in this process.

The agent is what `torchrun --standalone` runs, so the workers see the same environment (RANK, WORLD_SIZE, the
rendezvous). Running it here rather than exec'ing torchrun lets tinygpt speak for the group: a worker's error is
one line, said once however many ranks hit it, instead of every rank's line and torchrun's traceback; a Ctrl-C or
SIGTERM exits 130/143 once the workers have saved, instead of exit 1 and a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tinygpt_cli.errors import TinyGPTError, described

# The signals training stops on with a checkpoint (training._stop_on_signals), exiting 128 + the signal; no SIGHUP
# on Windows, where Ctrl+Break is SIGBREAK (its default action ends the process at once, checkpoint or not).
STOP_SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")


def stop_signals() -> tuple[int, ...]:
    """The signals of STOP_SIGNAL_NAMES this platform has."""
    return tuple(getattr(signal, name) for name in STOP_SIGNAL_NAMES if hasattr(signal, name))


STOP_SIGNALS = stop_signals()


class Stopped(KeyboardInterrupt):
    """A stop by signal `signal` (None: Ctrl-C as Python raises it), taking Ctrl-C's path; the process then exits
    128 + the signal."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__(*(() if signum is None else (signum,)))
        self.signal = signum


@contextlib.contextmanager
def signals_handled(handler, signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[None]:
    """Within: `handler(signum, frame)` takes `signals`, except one the process was started ignoring (`nohup`'s
    SIGHUP must not stop it) and except off the main thread, where Python cannot install handlers. The previous
    handlers come back after."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in signals if signal.getsignal(sig) != signal.SIG_IGN}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def stops_held() -> Iterator[list[int]]:
    """Within: Ctrl-C, SIGTERM and SIGHUP are noted, not acted on, so that steps that must not be cut in two
    (publishing a finished folder in place of an old one) run to their end; the list yields the signals received.
    SIGKILL cannot be held: what such steps leave must still be recoverable."""
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)

    with signals_handled(note):
        yield received


# Set by the launcher for its workers: a folder where each writes its one-line error as rank-<RANK>.txt.
RANK_ERRORS_ENV = "TINYGPT_RANK_ERRORS"
# Set by the launcher for its workers: its process id (see `stop_with_launcher`).
LAUNCHER_PID_ENV = "TINYGPT_LAUNCHER_PID"
# How a worker's error starts when one of its collectives failed because another rank left the group (see
# training.train): a knock-on, never the cause when another rank says why it stopped or died.
PEER_LOST = "another process of the group stopped"
# How long a signalled worker may take to finish its step and save before the agent kills it (torch's own
# default, 30 s, can be too short for a large model's checkpoint). torch >= 2.12 takes it; older ones keep 30 s.
SHUTDOWN_TIMEOUT_S = 600


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command line equivalent to `tinygpt <argv>` on `nproc` local processes (--nproc removed)."""
    return ["torchrun", "--standalone", f"--nproc-per-node={nproc}", "-m", "tinygpt_cli", *without_nproc(argv)]


def without_nproc(argv: list[str]) -> list[str]:
    args: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            args.append(arg)
    return args


def report_rank_error(message: str) -> bool:
    """In a worker of `launch`: leave `message` for the launcher to say (once for all ranks) and return True.
    Elsewhere (one process, or the user's own torchrun): False, and the caller prints it."""
    folder, rank = os.environ.get(RANK_ERRORS_ENV), os.environ.get("RANK")
    if not folder or rank is None:
        return False
    try:
        (Path(folder) / f"rank-{int(rank)}.txt").write_text(message, encoding="utf-8")
    except (OSError, ValueError):
        return False
    return True


def stop_with_launcher() -> None:
    """In a worker started by torchrun or `launch`, on Linux: take the death of the process that started it as a
    SIGTERM. A launcher killed at once (SIGKILL, the OOM killer) forwards no signal, and its workers went on
    training, adopted by init, holding the run's lock, with no terminal to stop them; now they finish the step,
    save and exit, as on a scheduler's SIGTERM. Only under an elastic agent (TORCHELASTIC_RUN_ID): a process
    given RANK and the rest by a script of one's own keeps its own parent's fate. Elsewhere nothing happens.
    (A launcher killed while its workers save after its own SIGTERM makes this a second signal: they stop at once,
    keeping the checkpoint before.)"""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG: the parent's death signals this
            return
    except (OSError, AttributeError):  # no C library to ask (a static Python)
        return
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    if launcher.isdigit() and os.getppid() != int(launcher):  # started through a wrapper, or the launcher died
        try:  # before the call above, when nothing would tell
            os.kill(int(launcher), 0)
        except ProcessLookupError:
            os.kill(os.getpid(), signal.SIGTERM)
        except OSError:  # there, but another user's: a pid reused
            pass


def launch(nproc: int, argv: list[str]) -> int:
    """Run `tinygpt <argv>` (--nproc removed) on `nproc` local processes; return the exit code for the group."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    config = launch_config(nproc)
    with tempfile.TemporaryDirectory(prefix="tinygpt-ranks-") as folder, _quiet_agent():
        # the workers inherit this process's environment: as torchrun, N processes share the cores
        defaults = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), RANK_ERRORS_ENV: folder,
                    LAUNCHER_PID_ENV: str(os.getpid())}
        try:
            with _environment(defaults):
                elastic_launch(config, sys.executable)("-m", "tinygpt_cli", *without_nproc(argv))
            return 0
        except SignalException as exc:  # the agent passed it on and waited for the workers to save and exit
            return 128 + int(exc.sigval)
        except ChildFailedError as exc:
            return _failed(exc, nproc, Path(folder))
        except Exception as exc:  # the rendezvous or the agent itself
            if "libuv" in str(exc):  # Windows wheels of torch: TCPStore without libuv, torchrun alike
                raise TinyGPTError(
                    f"could not start {nproc} processes: this PyTorch build has no libuv, which its launcher (and "
                    f"torchrun) needs: train in one process (drop --nproc), or under Linux or WSL"
                ) from None
            raise TinyGPTError(
                f"could not start {nproc} processes ({described(exc)}); try torchrun yourself: "
                f"{' '.join(torchrun_command(nproc, argv))}"
            ) from None


def launch_config(nproc: int):
    """torchrun --standalone's LaunchConfig, with tinygpt's grace for a signalled worker to save (where torch
    takes one), and without SIGHUP when this process was started ignoring it (nohup: outlive the terminal)."""
    from torch.distributed.launcher.api import LaunchConfig

    fields = LaunchConfig.__dataclass_fields__
    extra: dict = {"shutdown_timeout": SHUTDOWN_TIMEOUT_S} if "shutdown_timeout" in fields else {}
    if "signals_to_handle" in fields and getattr(signal, "SIGHUP", None) is not None \
            and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN:
        handled = fields["signals_to_handle"].default.split(",")
        extra["signals_to_handle"] = ",".join(name for name in handled if name != "SIGHUP")
    return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, **extra)


def _failed(exc, nproc: int, folder: Path) -> int:
    """The group's exit code when a worker stopped with one: a signal's, or a TinyGPTError that says why."""
    messages: dict[str, list[int]] = {}
    for rank_of, path in sorted((int(p.stem.split("-")[1]), p) for p in folder.glob("rank-*.txt")):
        messages.setdefault(path.read_text(encoding="utf-8"), []).append(rank_of)
    lost = {r for message, ranks in messages.items() if PEER_LOST in message for r in ranks}
    causes = {message: ranks for message, ranks in messages.items() if PEER_LOST not in message}
    said = {r for ranks in causes.values() for r in ranks}
    # the agent sees the workers' exits in the same poll, in rank order: the "first" failure can be a rank whose
    # collective failed because another one left (a knock-on), so the earliest that is not one is the cause
    failures = sorted(exc.failures.items(), key=lambda item: item[1].timestamp)
    rank, failure = next(((r, f) for r, f in failures if r not in lost), failures[0])
    code = int(failure.exitcode)
    if rank not in said and said and code > 0 and code - 128 not in STOP_SIGNALS:
        # an error of its own with no word (a traceback), while another rank said why it stopped: that is why
        rank = next((r for r, _ in failures if r in said), min(said))
    if causes:
        messages = causes
    if not any(rank in ranks for ranks in messages.values()):  # it died without a word: that is the cause
        if not causes and code - 128 in STOP_SIGNALS:  # it was interrupted, and saved
            return code
        if not causes and -code in STOP_SIGNALS:  # stopped while joining the group: at once, nothing to save yet
            return 128 - code
        what = f"exit code {code}"
        if code < 0:
            with contextlib.suppress(ValueError):
                what = f"killed by {signal.Signals(-code).name}"
        hint = " (the kernel's OOM killer sends it when memory runs out)" \
            if code == -getattr(signal, "SIGKILL", 9) else ""
        raise TinyGPTError(f"rank {rank} of {nproc} failed ({what}{hint}) and the others were stopped (what it "
                           f"printed, if anything, is above); a checkpoint saved before is kept: `tinygpt train "
                           f"--resume --name RUN` goes on from it (a command with --auto-resume: run it again)")
    if len(messages) == 1:  # the workers' own one-line error, the same on every rank that hit it
        raise TinyGPTError(next(iter(messages)))
    raise TinyGPTError(" · ".join(f"rank {', '.join(map(str, ranks))}: {message}"
                                  for message, ranks in messages.items()))


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in os.environ (which the agent hands to the workers) for the block, then put back."""
    before = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """The agent logs the signal it passes on, each worker it stops and each failure, with tracebacks: tinygpt
    says what matters. Its loggers set their own levels, so logging is silenced as a whole in this process (the
    workers are other processes)."""
    before = logging.root.manager.disable  # the caller's own `logging.disable` level, put back after
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(before)
