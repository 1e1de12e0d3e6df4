"""The exceptions the library raises. `cli.main()` turns each into one red line and exit code 1.

Every message says what is wrong *and* what to do about it.
"""

from __future__ import annotations

import errno


class TinyGPTError(Exception):
    """Base class of every error tinygpt reports to a user."""


class ConfigError(TinyGPTError):
    """A preset, config file or override is invalid."""


class DataError(TinyGPTError):
    """An input corpus or token file is missing, empty, unreadable or inconsistent."""


class CheckpointError(TinyGPTError):
    """A run or checkpoint is missing, corrupted or not a tinygpt checkpoint."""


class GenerationError(TinyGPTError):
    """A generation request cannot be honoured (e.g. a prompt longer than the context)."""


class TrainingError(TinyGPTError):
    """Training cannot start or cannot continue."""


def install_advice(packages: str) -> str:
    """The command that adds `packages` to the environment tinygpt runs in, with pip or, for a pipx install of
    tinygpt (whose environment has no pip of its own on the PATH), pipx inject."""
    return f"`pip install {packages}` (with pipx: `pipx inject tinygpt {packages}`)"


def first_line(exc: BaseException, most: int = 0) -> str:
    """An exception's own message as one line for a message of ours: its first line (the type's name where it has
    none). With `most`, the first sentence only, cut at a word within `most` characters: a library's long advice
    (such as to pass `local_files_only=False`) is not what a user of ours should do."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    if most:
        line = line[: _sentence_end(line)]
        if len(line) > most:
            cut = line.rfind(" ", 0, most)
            line = line[: cut if cut > 0 else most].rstrip(" ,;:") + "…"
    return line


def described(exc: BaseException, most: int = 0) -> str:
    """'Type: its first line' (`first_line`), or the type alone where the exception has no message."""
    name = type(exc).__name__
    return f"{name}: {first_line(exc, most)}" if str(exc).strip() else name


def compile_failure(exc: BaseException) -> str:
    """Why torch.compile failed, for the note that says the work goes on eagerly: the error's first line, and what
    to do where a compiler is missing (Inductor builds C++ on CPU, Triton a C launcher on CUDA; the note said only
    InductorError)."""
    import re

    text = described(exc, 200)
    if re.search(r"\bC(\+\+)? compiler", str(exc)):
        return f"{text.rstrip('.')}; install a C and C++ compiler (gcc/g++, clang), or point CC/CXX at one"
    return text


def _sentence_end(line: str) -> int:
    """Where the first sentence of `line` ends: after a full stop outside brackets that a space and a capital
    letter follow ("(e.g. a proxy)" and "Error 2. retry" go on), else the whole line."""
    depth = 0
    for i, ch in enumerate(line):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "." and depth <= 0 and line[i + 1 : i + 2] == " " and line[i + 2 : i + 3].isupper():
            return i + 1
    return len(line)


# How the allocators word a refusal: glibc's (Linux) and macOS's errno text, Windows' CPU allocator, and CUDA's
# and MPS's errors.
_REFUSED_ALLOCATION = ("can't allocate memory", "not enough memory", "out of memory")


def allocation_failed(exc: BaseException) -> bool:
    """Whether `exc` is the host's or a device's refusal of an allocation (not some other RuntimeError)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in _REFUSED_ALLOCATION)


# What an OSError's errno says is wrong, for advice each command words for where it met it.
FULL, READ_ONLY, DENIED = "full", "read-only", "denied"
_OS_PROBLEMS = {
    errno.ENOSPC: FULL, errno.EDQUOT: FULL,  # a full disk, a user's quota spent
    errno.EROFS: READ_ONLY,
    errno.EACCES: DENIED, errno.EPERM: DENIED,
}
# A path the file system refuses before any check looks at it: the advice is the same wherever it is met.
PATH_ADVICE = {
    errno.ENAMETOOLONG: "use a shorter name or path",
    errno.ELOOP: "a link in that path points back at itself: fix or remove the link",
    errno.ENOTDIR: "a part of that path is a file, not a folder: check the path",
    errno.EMFILE: "this process may open too few files at once: raise the limit (`ulimit -n 4096`) and run it again",
    errno.ENFILE: "the system has too many files open: close some programs and run it again",
}


def os_problem(exc: BaseException) -> str | None:
    """FULL, READ_ONLY or DENIED for an OSError whose errno says so (else None: another error, or an errno not
    known here)."""
    return _OS_PROBLEMS.get(exc.errno or 0) if isinstance(exc, OSError) else None
