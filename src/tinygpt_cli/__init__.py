"""tinygpt: train a GPT-2 from scratch.

The command line is `tinygpt`; the same functions are the Python API::

    from tinygpt_cli import generate, tokenize
    from tinygpt_cli.train import train  # `from tinygpt_cli import train` is the module tinygpt_cli.train

Heavy modules (torch) load on first use, so `import tinygpt_cli` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it; resolved lazily so importing the package never imports torch.
_LAZY = {
    "RunConfig": "config",
    "ModelConfig": "config",
    "DataConfig": "config",
    "TrainConfig": "config",
    "SampleConfig": "config",
    "resolve_config": "config",
    "TinyGPTError": "errors",
    "get_encoding": "tokenizer",
    "tokenize": "data",
    "GPT": "model",
    "train": "train",
    "generate": "sample",
    "load_checkpoint": "checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tinygpt_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tinygpt_cli.{module}"), name)
