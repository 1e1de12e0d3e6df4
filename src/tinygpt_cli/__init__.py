"""tinygpt: train a GPT-2 from scratch.

The command line is `tinygpt`; the same functions are the Python API::

    from tinygpt_cli import evaluate, load_checkpoint, resolve_config, sample_text, tokenize, train

    tokenize()                                    # the embedded corpus -> data/shakespeare/
    result = train(resolve_config(size="micro", overrides=["train.max_steps=100"]), run_name="notebook")
    model = load_checkpoint("notebook").model
    print(sample_text(model, "ROMEO:", 40).samples[0].text)
    print(evaluate("notebook").loss)

Heavy modules (torch) load on first use, so `import tinygpt_cli` stays cheap. `train` and `evaluate` live in the
modules `tinygpt_cli.training` and `tinygpt_cli.evaluation`: a module named like its function would take the
function's place in the package once imported.
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
    "train": "training",
    "run_config_of": "training",
    "generate": "sample",
    "sample_text": "sample",
    "evaluate": "evaluation",
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

