"""Where things live: `$TINYGPT_HOME` (else the current directory) holds `data/<name>/` and `runs/<name>/`."""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from tinygpt_cli.errors import DataError, TinyGPTError


def home_setting() -> str | None:
    """$TINYGPT_HOME with a leading `~` expanded (a value quoted in a shell, or set in a Dockerfile, systemd unit or
    .env file, arrives unexpanded and made a folder named `~`), or None where it is unset or empty."""
    home = os.environ.get("TINYGPT_HOME")
    return os.path.expanduser(home) if home else None


def root() -> Path:
    """The workspace: $TINYGPT_HOME, else the current folder. A TINYGPT_HOME that is a file is an error (every
    listing read it as an empty workspace, "No runs yet")."""
    home = home_setting()
    if home and os.path.exists(home) and not os.path.isdir(home):
        raise TinyGPTError(f"TINYGPT_HOME={home} is a file, not a folder: point it at a folder (made if missing)")
    return Path(home or Path.cwd())


def close_names(spec: str, folder: Path) -> str:
    """` (did you mean A or B?)` where `folder` holds names close to a mistyped `spec`, else ""."""
    import difflib

    try:
        names = [child.name for child in folder.iterdir() if not child.name.startswith(".")]
    except OSError:
        return ""
    close = difflib.get_close_matches(Path(spec).name, names, n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


def data_dir() -> Path:
    return root() / "data"


def runs_dir() -> Path:
    return root() / "runs"


def is_bare_name(spec: str) -> bool:
    """Whether `spec` is a bare name, which means a run's or a dataset's in the workspace before a folder that
    happens to sit in the current directory; `.`, `./m1` and any other path are paths."""
    return spec not in (".", "..") and not any(sep and sep in spec for sep in (os.sep, os.altsep))


def lock_of(folder: Path) -> Path:
    """The lock a command writing `folder` holds (`exclusive`): `.<name>.lock` beside it, e.g. `runs/.<name>.lock`
    while a run trains, `data/.<name>.lock` while a dataset is tokenized. A link to another entry of the same
    folder takes that entry's: two names of one run (`runs/alias -> r`) share the lock that keeps two writers of it
    apart. (A link elsewhere, a run kept on another disk, keeps its lock here, where the workspace is writable.)"""
    folder = sibling_target(folder) or folder
    return folder.with_name(f".{folder.name}.lock")


def sibling_target(path: Path) -> Path | None:
    """The entry of its own folder that a link `path` names under another name (`runs/alias -> r`: the same run
    twice); None for anything else (no link, a link elsewhere, a link that is broken or loops)."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve()
    except (OSError, RuntimeError):  # a loop (RuntimeError before Python 3.13)
        return None
    return target if target.parent == path.parent.resolve() and target.name != path.name else None


class Busy(DataError):
    """Another process holds the lock at `lock_path` (`exclusive`): it is writing what the lock guards."""

    def __init__(self, message: str, lock_path: Path) -> None:
        super().__init__(message)
        self.lock_path = lock_path


def wait_until_free(lock_path: Path) -> None:
    """Wait while a process holds `lock_path` (however long its work takes: it ends, or its process does)."""
    while held(lock_path):
        time.sleep(0.2)


# How long taking a lock waits out a holder that only looks (`held` locks for an instant) before it is "busy".
LOOK_GRACE_S = 1.0


@contextlib.contextmanager
def exclusive(lock_path: Path, what: str, busy: TinyGPTError | None = None,
              patience_s: float = LOOK_GRACE_S) -> Iterator[None]:
    """Hold an advisory lock so two runs never write the same output, else raise `busy` (by default: another
    process is writing `what`) once it has been held for `patience_s`. fcntl's flock on POSIX, a byte-range lock
    (msvcrt) on Windows; a no-op on a shared filesystem mounted without locks (NFS with no lock daemon, Lustre
    without -o flock)."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            handle = open(lock_path, "a+")
        except PermissionError as exc:  # another user's lock (a shared workspace): a lock takes a file open to read
            try:
                handle = open(lock_path)
            except OSError:
                raise DataError(f"cannot write to {lock_path.parent} ({exc.strerror or exc}): "
                                f"choose a writable TINYGPT_HOME") from None
        except OSError as exc:
            raise DataError(f"cannot write to {lock_path.parent} ({exc.strerror or exc}): "
                            f"choose a writable TINYGPT_HOME") from None
        try:
            locked = _try_lock(handle)
        except OSError:  # EBADF: NFS locks only a file open to write, and this is another user's lock file
            handle.close()
            raise DataError(f"cannot lock {lock_path}: it is {owner_of(lock_path)}'s, and locks on this filesystem "
                            f"need it writable: ask them to delete it if no tinygpt of theirs is running") from None
        if locked is False:  # held: by a writer, or for an instant by `held`
            handle.close()
            if time.monotonic() >= deadline:
                raise busy or Busy(f"another tinygpt process is writing {what}: wait for it to finish",
                                   lock_path) from None
            time.sleep(0.02)
            continue
        if locked is None:  # no locks here: go on unguarded
            break
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        _unlock(handle)
        handle.close()
    try:
        yield
    finally:
        if _posix_locks():  # removed while still held: a newcomer that opened it sees the inode change
            with contextlib.suppress(PermissionError):  # another user's, in a sticky folder: it stays, unheld
                lock_path.unlink(missing_ok=True)
            handle.close()
        else:  # Windows removes no open file: release, close, then remove it unless another has it open already
            if locked:
                with contextlib.suppress(OSError):
                    _unlock(handle)
            handle.close()
            with contextlib.suppress(OSError):
                lock_path.unlink(missing_ok=True)


def held(lock_path: Path) -> bool:
    """Whether a process holds `lock_path` (an `exclusive` lock) now; False where there are no locks."""
    try:
        handle = open(lock_path, "rb")
    except OSError:  # none: nothing holds it
        return False
    with handle:
        try:
            locked = _try_lock(handle, shared=True)
        except OSError:  # EBADF (see `_try_lock`): none that this can see
            return False
        if locked:
            _unlock(handle)
        return locked is False


def _posix_locks() -> bool:
    try:
        import fcntl  # noqa: F401
    except ImportError:  # Windows
        return False
    return True


def _try_lock(handle: Any, shared: bool = False) -> bool | None:
    """Lock `handle`'s file without waiting: True when locked, False when another holds it, None where there are no
    locks (a filesystem without them, a platform with neither fcntl nor msvcrt). Windows has no shared lock: a
    look takes byte 0 for an instant too."""
    if _posix_locks():
        import fcntl

        try:
            fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:  # ENOLCK, EOPNOTSUPP: no locks here. EBADF: NFS, whose exclusive lock needs a file
            if exc.errno == errno.EBADF:  # open to write (`exclusive` says so)
                raise
            return None
        return True
    try:
        import msvcrt
    except ImportError:
        return None
    handle.seek(0)  # a lock covers bytes from the file position: byte 0, whether or not the file has it
    try:
        msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError as exc:
        return False if exc.errno == errno.EACCES else None
    return True


def _unlock(handle: Any) -> None:
    if _posix_locks():
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_UN)
        return
    import msvcrt

    handle.seek(0)
    msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)


# DOS device names: Windows opens the device for a file or folder so named, with any extension (nul.txt)
_WINDOWS_DEVICES = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\.|$)", re.IGNORECASE)


# Windows refuses to replace or rename what another process holds open, and a virus scanner or the search indexer
# opens each file just written, for a moment: a rename is tried again for up to this long there.
REPLACE_PATIENCE_S = 2.0


def replace(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """`os.replace`, tried again for REPLACE_PATIENCE_S on Windows while the file or folder is briefly held open."""
    waited, pause = 0.0, 0.05
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError:
            if sys.platform != "win32" or waited >= REPLACE_PATIENCE_S:
                raise
        time.sleep(pause)
        waited += pause
        pause = min(2 * pause, 0.5)


def fsync_file(path: Path) -> None:
    """Flush `path` to the disk, through a writable handle (Windows flushes no read-only one: EBADF)."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the platform can (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` for the caller to write. Then it is flushed and renamed over `path`, so that
    readers see the old file or the new one, never a mix; on a failure (a full disk, a signal) it is removed and
    `path` is as it was."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)
        replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk's write names no file: name the one
            exc.filename = str(path)
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def safe_name(text: str) -> str:
    """A folder name made of letters, digits, '.', '_' and '-' from any user string: accents dropped (über ->
    uber, not ber), anything else outside those a '-' (2023–2024 -> 2023-2024); a Windows device name (nul, aux.txt)
    gets a '_' after its stem, on every platform, so that a workspace can move between them."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    name = _WINDOWS_DEVICES.sub(lambda m: m.group(1) + "_" + m.group(2), name)
    return name or "dataset"


def name_problem(name: str, under: str, example: str) -> str | None:
    """Why `name` is not one plain folder name to make under `under` (no `..`, no slash, nothing hidden, at most
    100 characters), as an error message naming --name; None if it is one."""
    if len(name) > 100:
        return f"--name is {len(name)} characters long: use at most 100"
    if _WINDOWS_DEVICES.match(name):
        return (f"--name {name} is a device name on Windows (CON, PRN, AUX, NUL, COM1-9, LPT1-9, with any extension), "
                f"no folder name there: pick another (e.g. --name {safe_name(name)})")
    if safe_name(name) != name:
        plain = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.")  # what is left of it (名前: nothing)
        suggestion = safe_name(name) if plain else example
        return (f"--name {name!r} is not a plain folder name under {under}: use letters, digits, '.', '_' and '-' "
                f"(e.g. --name {suggestion})")
    return None


def pid_alive(pid: int) -> bool:
    """Whether process `pid` runs now; True when that cannot be told (someone else's process, an unknown
    platform): what it left is then left alone. Used to tidy after exports and deletions that were killed."""
    if sys.platform == "win32":  # os.kill(pid, 0) terminates the process there
        return _windows_pid_alive(pid)
    if os.name != "posix":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # someone else's process, or cannot tell: leave its files alone
    return True


def _windows_pid_alive(pid: int) -> bool:
    """Whether process `pid` runs, asked of Windows without touching it; True when it cannot tell."""
    import ctypes

    try:
        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return True
    kernel32.OpenProcess.restype = ctypes.c_void_p  # a HANDLE is pointer-sized: the default int would cut it
    kernel32.OpenProcess.argtypes = (ctypes.c_uint32, ctypes.c_int, ctypes.c_uint32)
    kernel32.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
    kernel32.CloseHandle.argtypes = (ctypes.c_void_p,)
    handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
    if not handle:
        return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process (else denied: it runs)
    try:
        code = ctypes.c_ulong()
        return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
    finally:
        kernel32.CloseHandle(handle)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path`, links not followed (what deleting it frees, what a run's checkpoints hold)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def owner_of(path: Path) -> str:
    """The user name of who owns `path` (its uid where the name is unknown; "another user" where it cannot tell)."""
    try:
        uid = os.lstat(path).st_uid
    except OSError:
        return "another user"
    try:
        import pwd

        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return f"uid {uid}"


class Blocked(NamedTuple):
    """Why this user may not move or delete something: `reason`, and whether what blocks it is the user's own."""

    reason: str
    yours: bool


def cannot_move(path: Path) -> Blocked | None:
    """Why this user may not rename or delete the entry `path` of its folder (the POSIX permissions of a workspace
    that several users share: a folder they may not write, or a sticky one where only an entry's owner may), or
    None where it may, or where it cannot tell (Windows, root, a path that is gone, a read-only disk: the write
    itself then says so, before anything is moved)."""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return None
    try:
        parent, entry = os.stat(path.parent), os.lstat(path)
    except OSError:
        return None
    unwritable = _unwritable(path.parent, parent.st_uid)
    if unwritable is not None:
        return unwritable
    if parent.st_mode & 0o1000 and os.geteuid() not in (entry.st_uid, parent.st_uid):  # sticky, as /tmp
        return _sticky(path)
    return None


def _unwritable(folder: Path, uid: int, access: int = os.W_OK | os.X_OK, what: str = "writable") -> Blocked | None:
    """Why the folder `folder` (owned by `uid`) is not `what` by this user, or None where it is, or where it is on
    a read-only disk."""
    if os.access(folder, access):
        return None
    with contextlib.suppress(OSError, AttributeError):  # Windows has no statvfs
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return None
    if uid == os.geteuid():
        return Blocked(f"{folder} is not {what}, though it is yours", True)
    return Blocked(f"{folder} is {owner_of(folder)}'s and not {what} by you", False)


def folder_unwritable(folder: Path) -> Blocked | None:
    """Why this user may not write in `folder` (`_unwritable`), or None where it may or where it cannot tell."""
    if not hasattr(os, "geteuid") or os.geteuid() == 0:
        return None
    try:
        return _unwritable(folder, os.stat(folder).st_uid)
    except OSError:
        return None


def cannot_delete(path: Path) -> Blocked | None:
    """Why this user may not delete `path` whole (`cannot_move`, or a folder inside it that it may not read or
    change, its own too), or None; checked before anything goes, so that nothing is left half deleted. Each folder
    is checked once, as its parent's entry (os.walk leaves out what it cannot list: said rather than left behind)."""
    blocked = cannot_move(path)
    if blocked is not None or not hasattr(os, "geteuid") or os.geteuid() == 0 or path.is_symlink():
        return blocked
    me = os.geteuid()
    for folder, subfolders, files in os.walk(path, onerror=lambda exc: None):
        here = Path(folder)
        try:
            stat = os.stat(here)
            if here == path and (subfolders or files):  # its entries go: it is changed
                blocked = _unwritable(here, stat.st_uid)
            sticky = stat.st_mode & 0o1000 and stat.st_uid != me
            for index, name in enumerate((*subfolders, *files)):
                entry = here / name
                owner = os.lstat(entry).st_uid
                if blocked is None and sticky and owner != me:
                    blocked = _sticky(entry)
                if blocked is None and index < len(subfolders) and not entry.is_symlink():
                    blocked = _unwritable(entry, owner, os.R_OK | os.W_OK | os.X_OK, "readable and writable")
        except OSError:  # gone meanwhile: the deletion says what it meets
            continue
        if blocked is not None:
            return blocked
    return None


def _sticky(entry: Path) -> Blocked:
    return Blocked(f"{entry.name} is {owner_of(entry)}'s, in a folder where only an entry's owner may move it", False)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def strict_json(value: Any) -> Any:
    """`value` (dicts, lists, tuples of JSON values) with each non-finite float as None, for `json.dumps(...,
    allow_nan=False)`: strict JSON has no NaN or Infinity, and parsers other than Python's reject them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def counted(n: int, noun: str, plural: str = "") -> str:
    """'1 window', '2 windows', '1,024 windows'; `plural` where it is not the noun and an s ('processes')."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def format_bytes(n: int) -> str:
    """1.2 GB, 3.4 MB, 5.6 kB or 78 B."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def check_disk(folder: Path, need: int, what: str, hint: str) -> None:
    """Raise DataError before `what` starts writing `need` bytes under `folder` when they cannot fit."""
    free = free_bytes(folder)
    if need > free:
        raise DataError(f"{what} needs about {format_bytes(need)} of disk, {format_bytes(free)} free on {folder}: "
                        f"{hint}")
