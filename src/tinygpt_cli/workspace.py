"""Where things live: `$TINYGPT_HOME` (else the current directory) holds `data/<name>/` and `runs/<name>/`."""

from __future__ import annotations

import os
import re
import shutil
import unicodedata
from pathlib import Path

from tinygpt_cli.errors import DataError


def root() -> Path:
    return Path(os.environ.get("TINYGPT_HOME") or Path.cwd())


def data_dir() -> Path:
    return root() / "data"


def runs_dir() -> Path:
    return root() / "runs"


def safe_name(text: str) -> str:
    """A folder name made of letters, digits, '.', '_' and '-' from any user string: accents dropped (über ->
    uber, not ber), anything else outside those a '-' (2023–2024 -> 2023-2024)."""
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "dataset"


def name_problem(name: str, under: str, example: str) -> str | None:
    """Why `name` is not one plain folder name to make under `under` (no `..`, no slash, nothing hidden, at most
    100 characters), as an error message naming --name; None if it is one."""
    if len(name) > 100:
        return f"--name is {len(name)} characters long: use at most 100"
    if safe_name(name) != name:
        suggestion = safe_name(name) if name.strip("-. ") else example
        return (f"--name {name!r} is not a plain folder name under {under}: use letters, digits, '.', '_' and '-' "
                f"(e.g. --name {suggestion})")
    return None


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds `path` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


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
