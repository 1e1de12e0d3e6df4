"""Shared fixtures: every test gets its own empty workspace ($TINYGPT_HOME) and the hub stays offline."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# A model small enough to train in seconds on a 2-core CPU, with the real 50304-wide vocabulary.
TINY_SETTINGS = [
    "--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=32",
    "--set", "model.block_size=32", "--set", "train.batch_size=4", "--set", "train.eval_interval=2",
    "--set", "train.eval_batches=2", "--set", "train.log_interval=1", "--set", "train.warmup_steps=2",
]


def assert_one_line_error(result, fragment: str, code: int = 1) -> None:
    """Exit code, and exactly one error line (the last on stderr) that holds `fragment`; no traceback."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    raw = result.stderr.splitlines()
    assert raw.index(errors[0]) == 0 or raw[raw.index(errors[0]) - 1].strip(), "a blank line before the error"
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in result.output


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TINYGPT_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


@pytest.fixture(scope="session")
def shakespeare_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded corpus tokenized once per session (data/shakespeare of a scratch workspace)."""
    from tinygpt_cli.data import tokenize

    home = tmp_path_factory.mktemp("tokens")
    old = os.environ.get("TINYGPT_HOME")
    os.environ["TINYGPT_HOME"] = str(home)
    try:
        tokenize(None)
    finally:
        if old is None:
            os.environ.pop("TINYGPT_HOME", None)
        else:
            os.environ["TINYGPT_HOME"] = old
    return home / "data" / "shakespeare"


@pytest.fixture
def with_shakespeare(workspace: Path, shakespeare_tokens: Path) -> Path:
    """This test's workspace, holding the tokenized embedded corpus."""
    target = workspace / "data" / "shakespeare"
    shutil.copytree(shakespeare_tokens, target)
    return target


def tiny_config(**train: object):
    """A RunConfig for the tiny test model; keyword arguments override train.* keys."""
    from tinygpt_cli.config import resolve_config

    overrides = [TINY_SETTINGS[i + 1] for i in range(0, len(TINY_SETTINGS), 2)]
    overrides += [f"train.{key}={value}" for key, value in train.items()]
    return resolve_config(size="micro", overrides=overrides)
