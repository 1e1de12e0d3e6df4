"""Shared fixtures: every test gets its own empty workspace ($TINYGPT_HOME) and the hub stays offline."""

from __future__ import annotations

import atexit
import io
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # assigned: a shell that exported 0 must not send the tests online
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.pop("HF_ENDPOINT", None)
# Hugging Face's caches of their own, empty: a copy of a dataset the user has cached (HellaSwag) must not reach
# the tests, and the tests' loads of local fixtures must not fill the user's cache.
_HF_HOME = tempfile.mkdtemp(prefix="tinygpt-tests-hf-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)
os.environ["HF_HOME"] = _HF_HOME
for _cache in ("HF_DATASETS_CACHE", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_cache, None)
# The tests' local servers are reached directly: through a proxy that a CI machine sets, its answer (a 502) would
# count as the server's.
for _var in ("NO_PROXY", "no_proxy"):
    os.environ[_var] = ",".join(filter(None, [os.environ.get(_var), "127.0.0.1", "localhost"]))

# tests/interpreted runs Triton kernels through Triton's interpreter, which must be switched on before Triton is
# imported: test_kernels.py runs that folder in a process of its own with TRITON_INTERPRET=1.
collect_ignore = [] if os.environ.get("TRITON_INTERPRET") == "1" else ["interpreted"]

# A model small enough to train in seconds on a 2-core CPU, with the real 50304-wide vocabulary.
TINY_SETTINGS = [
    "--set", "model.n_layer=2", "--set", "model.n_head=2", "--set", "model.n_embd=32",
    "--set", "model.block_size=32", "--set", "train.batch_size=4", "--set", "train.eval_interval=2",
    "--set", "train.eval_batches=2", "--set", "train.log_interval=1", "--set", "train.warmup_steps=2",
]
TINY_OVERRIDES = TINY_SETTINGS[1::2]  # the same, as resolve_config's overrides


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


# How long a test waits for a process it started to reach a state (a checkpoint, a logged step). Generous: the
# wait ends as soon as the state is reached, and a loaded 2-core machine takes a while to import torch.
WAIT_S = 300.0


def wait_for(process: subprocess.Popen, reached: Callable[[], object], what: str, timeout: float = WAIT_S) -> None:
    """Poll `reached()` until it is true. The test fails here, saying so, if `process` ends first or the time runs
    out, rather than going on to signal a process still importing or to read a checkpoint that is not there."""
    deadline = time.monotonic() + timeout
    while not reached():
        if process.poll() is not None:
            if reached():  # just before it ended
                return
            _, err = process.communicate()
            pytest.fail(f"the process ended (exit {process.returncode}) before {what}: {err or ''}"[-4000:])
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s")
        time.sleep(0.05)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _signal_handlers_kept() -> Iterator[None]:
    """A test that runs `cli.main()` in this process may leave its exit's handlers for the stop signals (review:
    the tests after it could not stop the processes they start): each test's are undone after it."""
    import signal

    from tinygpt_cli.launch import STOP_SIGNALS

    kept = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    yield
    for signum, handler in kept.items():
        if signal.getsignal(signum) is not handler and handler is not None:
            signal.signal(signum, handler)


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


def hand_made_dataset(source: Path, folder: Path, split: str, position: int | slice, token: int) -> Path:
    """A copy of the tokenized dataset `source` at `folder` whose `split` holds `token` at `position` (or at each
    position of a slice), with meta.json's hashes made to match: a dataset made by hand (or by another tool),
    which no hash check catches."""
    import hashlib
    import json

    import numpy as np

    from tinygpt_cli.data import _edge_hash

    shutil.copytree(source, folder)
    meta = json.loads((folder / "meta.json").read_text())
    file = folder / meta["splits"][split]["file"]
    tokens = np.fromfile(file, dtype=np.uint16)
    tokens[position] = token
    tokens.tofile(file)
    meta["splits"][split].update(sha256=hashlib.sha256(file.read_bytes()).hexdigest(), edge_sha256=_edge_hash(file))
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def tiny_config(**train: object):
    """A RunConfig for the tiny test model; keyword arguments override train.* keys."""
    from tinygpt_cli.config import resolve_config

    overrides = [*TINY_OVERRIDES, *(f"train.{key}={value}" for key, value in train.items())]
    return resolve_config(size="micro", overrides=overrides)


def fused_test_model(dtype=None, bias: bool = True, **shape):
    """A small GPT for the decode kernels' tests, its layer norms and biases moved away from 1 and 0 so that a slip
    in them shows; `shape` overrides ModelConfig fields (by default heads of 12: not a power of two)."""
    import torch

    from tinygpt_cli.config import ModelConfig
    from tinygpt_cli.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(**{"n_layer": 2, "n_head": 4, "n_embd": 48, "block_size": 20, "bias": bias, **shape})
    model = GPT(cfg).eval().to(dtype or torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "ln_" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model


def generated(model, prompt, n, **kwargs):
    """`sample.generate`'s tokens as one (B, n) tensor."""
    import torch

    from tinygpt_cli.sample import generate

    return torch.stack(list(generate(model, prompt, n, **kwargs)), dim=1)


class FakeTerminal(io.StringIO):
    """A file that rich, and tinygpt's own check, take for a terminal (it says isatty), for a Console to print to."""

    def isatty(self) -> bool:
        return True
