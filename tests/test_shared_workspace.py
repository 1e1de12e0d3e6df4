"""A workspace that several users share (a lab's GPU box): one user's command on another's run or dataset is refused
before anything changes, with a message that says whose it is. These run a second user for real (as `nobody`,
through setpriv), so they need root; elsewhere they are skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error


def _nobody_can_run_tinygpt() -> bool:
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return False
    try:
        probe = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                                "-c", "import tinygpt_cli.cli"], capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(not _nobody_can_run_tinygpt(),
                                reason="needs root, setpriv and a tinygpt that the user nobody can import")


@pytest.fixture
def shared(monkeypatch):
    """A workspace in /tmp that another user can reach, its runs/ and data/ sticky and writable by all (as /tmp)."""
    home = Path(tempfile.mkdtemp(prefix="tinygpt-shared-"))
    os.chmod(home, 0o755)
    for folder in ("runs", "data"):
        (home / folder).mkdir()
        os.chmod(home / folder, 0o1777)
    monkeypatch.setenv("TINYGPT_HOME", str(home))
    monkeypatch.chdir(home)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def as_nobody(*args: str) -> SimpleNamespace:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("COLUMNS", "FORCE_COLOR"))}
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-m",
                           "tinygpt_cli", *args], capture_output=True, text=True, env={**env, "HOME": "/tmp"},
                          timeout=600)
    return SimpleNamespace(exit_code=done.returncode, stderr=done.stderr, output=done.stdout + done.stderr)


def own_run(home: Path, name: str) -> Path:
    """A run folder as root's training leaves it (not writable by others)."""
    run = home / "runs" / name
    (run / "checkpoints" / "step_1").mkdir(parents=True)
    (run / "config.yaml").write_text("train: {max_steps: 1}\n")
    (run / "checkpoints" / "step_1" / "model.safetensors").write_bytes(b"weights")
    return run


def listed(folder: Path) -> list[str]:
    return sorted(entry.name for entry in folder.iterdir())


def test_rm_of_another_users_run_deletes_nothing_and_hides_nothing(shared):
    """Security QA: in a group-writable runs/, bob's `runs rm alice-run` renamed it out of the listing, failed to
    delete its files, and left it hidden; alice's next `rm` swept it away for good. In a sticky runs/ the refusal
    read "open in another program". Now both are refused before anything moves, naming the owner."""
    run = own_run(shared, "alice-run")
    assert_one_line_error(as_nobody("runs", "rm", "alice-run", "--yes"),
                          "runs/alice-run cannot be deleted by you (alice-run is root's, in a folder where only an "
                          "entry's owner may move it), so nothing was deleted")
    os.chmod(shared / "runs", 0o777)  # writable by all, not sticky: the run's own folders are root's
    assert_one_line_error(as_nobody("runs", "rm", "alice-run", "--yes"),
                          f"runs/alice-run cannot be deleted by you ({run} is root's and not writable by you)")
    assert listed(shared / "runs") == ["alice-run"] and (run / "checkpoints" / "step_1" / "model.safetensors").is_file()
    # a dataset, and its interrupted tokenize: the same
    dataset = shared / "data" / "mine"
    dataset.mkdir()
    (dataset / "meta.json").write_text("{}")
    assert_one_line_error(as_nobody("data", "rm", "mine", "--yes"), "data/mine cannot be deleted by you")
    assert listed(shared / "data") == ["mine"]


def test_another_users_lock_is_a_lock_not_an_unwritable_workspace(shared):
    """Security QA: a lock file another user left (0644) in a shared runs/ read "cannot write to runs: choose a
    writable TINYGPT_HOME"; a lock takes a file opened to read, so nobody's own run goes on."""
    lock = shared / "runs" / ".bob.lock"
    lock.write_text("")
    os.chmod(lock, 0o644)
    empty = shared / "runs" / "bob"
    empty.mkdir()
    import pwd

    os.chown(empty, pwd.getpwnam("nobody").pw_uid, -1)  # nobody's own (empty) run folder
    done = as_nobody("runs", "rm", "bob", "--yes")
    assert done.exit_code == 0, done.output
    assert not empty.exists() and lock.is_file()  # root's lock stays (the folder is sticky), unheld


def test_tokenize_over_another_users_dataset_is_refused_before_the_work(shared, shakespeare_tokens):
    """Security QA: bob's `tokenize shakespeare --restart` over alice's dataset tokenized it all, then failed to put
    it in place with "cannot write .shakespeare.partial", and left that partial in alice's way."""
    shutil.copytree(shakespeare_tokens, shared / "data" / "shakespeare")
    assert_one_line_error(as_nobody("tokenize", "shakespeare", "--restart"),
                          "data/shakespeare cannot be replaced by you (shakespeare is root's, in a folder where only "
                          "an entry's owner may move it): tokenize under another name with --name NAME")
    assert listed(shared / "data") == ["shakespeare"]
    done = as_nobody("tokenize", "shakespeare", "--name", "bobs")
    assert done.exit_code == 0, done.output
    assert listed(shared / "data") == ["bobs", "shakespeare"]


def test_a_folder_it_may_list_but_not_enter_is_left_out_and_named(shared, tmp_path):
    """Security QA: a subfolder of mode 744 (listed, not entered) made `tokenize books` fail with "Permission
    denied (...b.txt): ...to write elsewhere, point TINYGPT_HOME at a folder you can write", as if writing failed."""
    books = shared / "books"
    (books / "sub").mkdir(parents=True)
    (books / "a.txt").write_text("some text for the corpus\n" * 200)
    (books / "sub" / "b.txt").write_text("more text\n" * 200)
    os.chmod(books / "sub", 0o744)
    done = as_nobody("tokenize", str(books), "--name", "bk")
    assert done.exit_code == 0, done.output
    assert "Left out 1 folder it cannot read" in " ".join(done.stderr.split()) and "sub (Permission denied)" in \
        done.stderr.replace("\n", "")


def test_what_is_your_own_or_unwritable_to_all_is_not_blamed_on_an_owner(shared):
    """Review: a workspace nobody may write said "No such file or directory" (the read-only retry of the lock's
    open), and a folder of the user's own that was not writable read "is nobody's ... ask its owner"."""
    import pwd

    os.chmod(shared / "data", 0o755)  # root's: nobody may not write in it
    assert_one_line_error(as_nobody("tokenize"), f"cannot write to {shared / 'data'} (Permission denied)")
    run = own_run(shared, "mine")
    nobody = pwd.getpwnam("nobody").pw_uid
    for path in (run, run / "checkpoints", run / "checkpoints" / "step_1"):
        os.chown(path, nobody, -1)
    os.chmod(run / "checkpoints", 0o555)  # the user's own folder, made read-only by the user
    # re-review: without a refusal before anything went, rm deleted all it could of the run, then put back a shell
    assert_one_line_error(as_nobody("runs", "rm", "mine", "--yes"),
                          f"runs/mine cannot be deleted by you ({run / 'checkpoints'} is not readable and writable, "
                          f"though it is yours), so nothing was deleted: make it writable (`chmod -R u+rwX` it), then "
                          f"delete it")
    assert (run / "config.yaml").is_file() and (run / "checkpoints" / "step_1" / "model.safetensors").is_file()
    os.chmod(run / "checkpoints", 0o755)


_LOCKS_THAT_FAIL = """
import errno, fcntl, sys
real = fcntl.flock
def flock(handle, how):  # as NFS ({code}) does
    if how & fcntl.LOCK_EX:
        raise OSError(errno.{code}, "as NFS")
    return real(handle, how)
fcntl.flock = flock
from tinygpt_cli.cli import main
sys.argv = ["tinygpt", *sys.argv[1:]]
main()
"""


@pytest.mark.parametrize("code", ["EBADF", "ENOLCK"])
def test_another_users_lock_on_nfs(shared, shakespeare_tokens, code):
    """Review: NFS takes an exclusive lock only on a file open to write (EBADF on another user's lock file, opened to
    read): that is refused, not gone on unguarded; a filesystem without locks (ENOLCK) goes on, as it always did."""
    shutil.copytree(shakespeare_tokens, shared / "data" / "shakespeare")
    for path in (shared / "data" / "shakespeare", *(shared / "data" / "shakespeare").iterdir()):
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    (shared / "data" / ".shakespeare.lock").write_text("")  # root's, left by a killed job
    script = shared / "nfs.py"
    script.write_text(_LOCKS_THAT_FAIL.format(code=code))
    os.chmod(script, 0o644)
    done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
                           str(script), "tokenize", "shakespeare"], capture_output=True, text=True,
                          env={**os.environ, "HOME": "/tmp"}, timeout=600)
    result = SimpleNamespace(exit_code=done.returncode, stderr=done.stderr, output=done.stdout + done.stderr)
    if code == "EBADF":
        assert_one_line_error(result, "/.shakespeare.lock: it is root's, and locks on this filesystem need it "
                                      "writable: ask them to delete it if no tinygpt of theirs is running")
    else:
        assert done.returncode == 0 and "Nothing to do: data/shakespeare is already" in done.stderr, done.stderr
