"""Where things live: `$TINYGPT_HOME` (else the current directory) holds `data/<name>/` and `runs/<name>/`."""

from __future__ import annotations

import os
import re
from pathlib import Path


def root() -> Path:
    return Path(os.environ.get("TINYGPT_HOME") or Path.cwd())


def data_dir() -> Path:
    return root() / "data"


def runs_dir() -> Path:
    return root() / "runs"


def safe_name(text: str) -> str:
    """A folder name made of letters, digits, '.', '_' and '-' from any user string."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "dataset"
