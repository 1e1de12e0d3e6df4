"""tinygpt: train a GPT-2 from scratch.

The command line is `tinygpt`; the same functions are the Python API::

    from tinygpt_cli import evaluate, load_checkpoint, resolve_config, sample_text, tokenize, train

    tokenize()                                    # the embedded corpus -> data/shakespeare/
    result = train(resolve_config(size="micro", overrides=["train.max_steps=100"]), run_name="notebook")
    model = load_checkpoint("notebook").model
    print(sample_text(model, "ROMEO:", 40).samples[0].text)
    print(evaluate("notebook").loss)

Heavy modules (torch) load on first use, so `import tinygpt_cli` stays cheap. The modules named like their
functions (`tinygpt_cli.train`, `tinygpt_cli.evaluate`) are `importlib.import_module("tinygpt_cli.train")`.
"""

from __future__ import annotations

import importlib
import sys
import types
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
    "sample_text": "sample",
    "evaluate": "evaluate",
    "export_model": "export",
    "load_checkpoint": "checkpoint",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tinygpt_cli' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tinygpt_cli.{module}"), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """The package, whose public names stay its functions. Importing a submodule binds it as an attribute of its
    package, so the module `tinygpt_cli.train`, once anything imported it, took the place of the function `train`
    (`from tinygpt_cli import train` gave the function or the module, by what ran before)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == name and value.__name__ == f"{__name__}.{name}":
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
