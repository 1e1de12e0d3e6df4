"""Run configuration: frozen dataclasses, size presets, YAML files and `--set` overrides.

Precedence: preset < YAML file (`--config`) < `--set section.key=value` < named CLI flags.
This module never imports torch, so the CLI's `--help` stays instant.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tinygpt_cli.errors import ConfigError, first_line
from tinygpt_cli.trackers import parse as parse_trackers

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
_TORCH_DTYPE_NAMES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def task_names(spec: str, option: str = "--task") -> list[str]:
    """The zero-shot tasks `spec` names: one, several comma-separated, or `all`; an unknown name is an error."""
    names = [name.strip().lower() for name in spec.split(",") if name.strip()]
    if "all" in names:
        return list(EVAL_TASKS)
    unknown = [name for name in names if name not in EVAL_TASKS]
    if unknown or not names:
        raise ConfigError(f"{'' if option == '--task' else f'{option}: '}unknown task "
                          f"{(unknown[0] if unknown else spec)!r}: choose one of {', '.join(EVAL_TASKS)}, several "
                          f"comma-separated, or all")
    return list(dict.fromkeys(names))


def dtype_choice(value: object) -> str:
    """A dtype as DTYPES names it, from that name, torch's ("bfloat16") or a torch.dtype; anything else as it is,
    for the caller's check to refuse."""
    text = str(value).removeprefix("torch.")
    return _TORCH_DTYPE_NAMES.get(text, text)


def dtype_refusal(dtype: str, device_kind: str, training: bool) -> str | None:
    """Why `dtype` (as DTYPES names it) cannot run on a `device_kind` ("cpu", "cuda", "mps") device, else None.
    Without torch: `plan` asks too."""
    if dtype == "fp16" and device_kind == "cpu":
        return "--dtype fp16 is not supported on CPU: use fp32 or bf16"
    if dtype == "fp16" and device_kind == "mps" and training:  # GradScaler("cuda") would disable itself
        return "--dtype fp16 trains with a CUDA gradient scaler, which MPS has not: use fp32 (or bf16) on MPS"
    return None


SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
COMPILE_MODES = ("auto", "on", "off")
EVAL_TASKS = ("hellaswag", "lambada_openai", "arc_easy", "arc_challenge")  # evaluation.TASKS, without torch
# export.py's names, here so that naming them imports no torch (shell completion lists them):
# the dtypes each export format can hold; onnxruntime has no bf16 kernels for GPT-2's ops on CPU, so ONNX stops at fp16
FORMAT_DTYPES: dict[str, tuple[str, ...]] = {
    "hf": ("fp32", "fp16", "bf16"),
    "gguf": ("fp32", "fp16", "bf16", "q8_0"),
    "onnx": ("fp32", "fp16"),
}
EXPORT_FORMATS = tuple(FORMAT_DTYPES)
# OpenAI's GPT-2 checkpoints on the Hugging Face hub, by the names --init-from, --model and export take
HUB_MODELS = {
    "gpt2": "openai-community/gpt2",  # 124M
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1.5B
}


# The hottest temperature a sample takes: the distribution is flat to within float32 rounding long before it
MAX_TEMPERATURE = 1e6
# train.eval_batches micro-batches are drawn up front (their start offsets held for the whole run): a bound keeps
# a typo such as 1e9 from filling the RAM before the first step (the OOM killer, not an error)
MAX_EVAL_BATCHES = 100_000
# train.lr over train.min_lr in every preset, and where a config gives lr alone (nanoGPT's and Chinchilla's floor)
MIN_LR_DIVISOR = 10

# Seeds go to torch.manual_seed (64-bit) after small additions (a rank, a prompt's turn): 2**62 leaves room.
MAX_SEED = 2**62


def is_count(value: Any) -> bool:
    """Whether a value read from a JSON file (state.json, meta.json, download.json) is a count: an int >= 0, not a
    bool. Such files are read as tinygpt wrote them, but a damaged or hand-edited one must not give a traceback."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def seed_problem(name: str, seed: int) -> str | None:
    """The error message for a seed out of range, naming its flag or key; None if it is in range."""
    if kind_problem(name, seed, whole=True):
        return f"{name} must be a whole number 0 to {MAX_SEED} (got {seed!r})"
    return None if 0 <= seed <= MAX_SEED else f"{name} must be 0 to {MAX_SEED} (got {seed})"


def kind_problem(name: str, value: Any, whole: bool = False) -> str | None:
    """The error message for a value of the library's API that is not a number (with `whole`, not an int), as a
    notebook passes "0.5" or 2.0: the CLI's flags are typed already (numpy's numbers are numbers). None where it is
    one."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral if whole else numbers.Real):
        return f"{name} must be {'a whole number' if whole else 'a number'} (got {value!r})"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """GPT-2 shape. `vocab_size` is padded past GPT-2's 50257 to a multiple of 64 for fast matmuls."""

    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block; must divide n_embd
    n_embd: int = 128  # width of the residual stream (the embedding size)
    block_size: int = 128  # context length in tokens
    vocab_size: int = 50304  # embedding rows: GPT-2's 50257 tokens padded to a multiple of 64
    dropout: float = 0.0  # 0 to pretrain; ~0.1 to fine-tune on little data
    bias: bool = True  # biases in the Linear layers and LayerNorms, as GPT-2 has

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be at least 1 (got {getattr(self, name)})")
        if self.n_embd % self.n_head:
            raise ConfigError(
                f"model.n_embd ({self.n_embd}) must be divisible by model.n_head ({self.n_head})"
            )
        if self.vocab_size < 50257:
            raise ConfigError(f"model.vocab_size must be at least 50257, GPT-2's vocabulary (got {self.vocab_size})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1) (got {self.dropout})")


@dataclass(frozen=True)
class DataConfig:
    """Which tokenized dataset to train on: a name under `data/`, a dataset folder, or "" for the last one."""

    dataset: str = ""  # tokenized dataset: a name under data/ or a folder; "" = the newest one


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and bookkeeping. Batch sizes are in sequences of `model.block_size` tokens."""

    batch_size: int = 16  # sequences per micro-batch (per process)
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps in all; the LR schedule spans them
    max_tokens: int = 0  # stop (with a checkpoint) after this many tokens; 0 = no limit
    max_minutes: float = 0.0  # stop (with a checkpoint) after this long training in one invocation; 0 = none
    auto_batch: bool = False  # shrink the micro-batch to what fits (CUDA: trial steps; CPU/MPS: the estimate)
    fsdp: bool = False  # under torchrun: shard parameters, gradients and optimizer state (FSDP2)
    init_from: str = ""  # start from these weights: gpt2[-medium|-large|-xl], a HF folder or a tinygpt run
    lr: float = 2e-3  # peak learning rate; not given with init_from: the weights' preset's over 20 (small: 3e-5)
    min_lr: float = 2e-4  # the schedule's floor; lr / 10 where lr is given alone (so on a resume, if it was lr / 10)
    warmup_steps: int = 50  # steps of linear LR warmup up to lr
    schedule: str = "cosine"  # cosine | wsd (warmup-stable-decay)
    decay_fraction: float = 0.2  # wsd: share of the steps spent decaying
    optimizer: str = "adamw"  # adamw | muon (Muon for the blocks' weight matrices, AdamW for the rest)
    muon_lr: float = 0.02  # muon: the matrices' peak LR, on the schedule lr follows (min_lr scales alike)
    muon_momentum: float = 0.95  # muon: momentum (Nesterov) of the matrices' updates
    weight_decay: float = 0.1  # decoupled decay of 2-D weights, by LR × this a step; not biases and LayerNorms
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 100  # steps between val-loss evaluations (and checkpoints)
    eval_batches: int = 20  # micro-batches in the fixed val sample (its windows grow with the micro-batch)
    eval_task: str = ""  # zero-shot tasks scored at each evaluation, as `tinygpt eval --task` (a,b or all); "" = none
    eval_task_limit: int = 0  # each task's first N examples; 0 = all (HellaSwag 10,042, LAMBADA 5,153, ARC 2,376/1,172)
    eval_task_data: str = ""  # one task's examples from a local .jsonl/.json/.parquet instead of the hub
    log_interval: int = 10  # steps between loss readings (each costs a host sync)
    keep_last: int = 3  # checkpoints kept; older ones are pruned after a new one is complete; 0 = keep all
    keep_best: bool = True  # keep the checkpoint of the best val loss too, however old (keep_last prunes by step)
    seed: int = 1337  # initialisation and dropout (each rank adds its rank), and batches unless data_seed; 0 or more
    data_seed: int = -1  # the order of the training batches; -1 = train.seed (set it to vary one without the other)
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast compute dtype; weights stay fp32)
    compile: str = "auto"  # auto | on | off (auto: on for CUDA)
    log_to: str = ""  # mirror metrics.jsonl to tensorboard, wandb, or both (comma-separated); "" = neither

    @property
    def batch_seed(self) -> int:
        """The seed of the training batches' order: train.data_seed, or train.seed where it is unset."""
        return self.seed if self.data_seed == -1 else self.data_seed

    def __post_init__(self) -> None:
        for name in ("device", "dtype", "schedule", "optimizer", "compile"):  # BF16, Muon: as --device CPU is read
            value = getattr(self, name)
            if isinstance(value, str) and value != value.strip().lower():
                object.__setattr__(self, name, value.strip().lower())
        if self.eval_task.strip():  # as `tinygpt eval --task` reads it: a,b or all, kept as the names it means
            object.__setattr__(self, "eval_task", ",".join(task_names(self.eval_task, "train.eval_task")))
        else:
            object.__setattr__(self, "eval_task", "")
        parse_trackers(self.log_to)
        for name in ("max_minutes", "lr", "min_lr", "decay_fraction", "weight_decay", "beta1", "beta2", "grad_clip",
                     "muon_lr", "muon_momentum"):
            if not math.isfinite(getattr(self, name)):  # NaN passes every comparison below
                raise ConfigError(f"train.{name} must be a finite number (got {getattr(self, name)})")
        if problem := seed_problem("train.seed", self.seed):
            raise ConfigError(problem)
        if self.data_seed != -1 and seed_problem("train.data_seed", self.data_seed):
            raise ConfigError(f"train.data_seed must be -1 (train.seed) or 0 to {MAX_SEED} (got {self.data_seed})")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1) (got {getattr(self, name)})")
        for name in ("batch_size", "grad_accum", "max_steps", "eval_interval", "eval_batches", "log_interval"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1 (got {getattr(self, name)})")
        if self.eval_batches > MAX_EVAL_BATCHES:
            raise ConfigError(f"train.eval_batches must be at most {MAX_EVAL_BATCHES:,} (got {self.eval_batches:,}): "
                              f"the val sample is drawn up front; a few dozen micro-batches give a steady val loss")
        for name in ("warmup_steps", "keep_last", "max_tokens", "eval_task_limit"):  # before what they go with
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more (got {getattr(self, name)})")
        if (self.eval_task_limit or self.eval_task_data) and not self.eval_task:
            raise ConfigError("train.eval_task_limit and train.eval_task_data go with train.eval_task: name the task "
                              f"({' | '.join(EVAL_TASKS)})")
        if self.eval_task_data and "," in self.eval_task:
            raise ConfigError(f"train.eval_task_data is one task's examples, and train.eval_task names several "
                              f"({self.eval_task}): name one task with its file, or drop train.eval_task_data to "
                              f"read each from the hub")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"train.lr must be a positive number (got {self.lr})")
        if self.min_lr < 0:
            raise ConfigError(f"train.min_lr must be 0 or more (got {self.min_lr})")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr:g}) must be at most train.lr ({self.lr:g}): lower it "
                              f"too, e.g. --set train.min_lr={self.lr / MIN_LR_DIVISOR:g}")
        if not 0.0 < self.decay_fraction <= 1.0:
            raise ConfigError(f"train.decay_fraction must be in (0, 1] (got {self.decay_fraction})")
        if self.max_minutes < 0:
            raise ConfigError(f"train.max_minutes must be 0 (no limit) or more (got {self.max_minutes})")
        for name in ("grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be 0 or more (got {getattr(self, name):g}; 0 turns it off)")
        _check_choice("train.device", self.device, DEVICES)
        _check_choice("train.dtype", self.dtype, DTYPES)
        _check_choice("train.schedule", self.schedule, SCHEDULES)
        _check_choice("train.optimizer", self.optimizer, OPTIMIZERS)
        if self.muon_lr <= 0:
            raise ConfigError(f"train.muon_lr must be a positive number (got {self.muon_lr})")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("train.optimizer=muon does not run under --fsdp (Newton-Schulz needs each matrix whole, "
                              "and FSDP shards them): drop --fsdp to train with DDP, or use train.optimizer=adamw")
        _check_choice("train.compile", self.compile, COMPILE_MODES)


@dataclass(frozen=True)
class SampleConfig:
    """Defaults for `tinygpt generate`."""

    max_new_tokens: int = 200  # tokens generated per sample
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 200  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; 1.1-1.3 breaks loops
    seed: int = 1337  # same seed, same text

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"sample.max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:  # NaN too: it passes `< 0`, and generate refuses it
            raise ConfigError(
                f"sample.temperature must be 0 (greedy) to {MAX_TEMPERATURE:g} (got {self.temperature})"
            )
        if problem := seed_problem("sample.seed", self.seed):
            raise ConfigError(problem)
        if self.top_k < 0:
            raise ConfigError(f"sample.top_k must be 0 or more (got {self.top_k})")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sample.top_p must be in (0, 1] (got {self.top_p})")
        if not 0 < self.repetition_penalty < math.inf:  # inf turns a logit of exactly 0 into NaN (0 * inf)
            raise ConfigError(
                f"sample.repetition_penalty must be a finite number more than 0; 1 is off "
                f"(got {self.repetition_penalty})"
            )


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is made of: the preset's name and the model, data, train and sample sections. Build one
    with `resolve_config`; docs/configuration.md lists every key."""

    size: str = "micro"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # the "section.key"s --set or a flag gave, where `resolve_config` built a new run's config (see `_given`);
    # None where unknown (built by hand, or a run's saved config). Not part of config.yaml.
    given: frozenset[str] | None = field(default=None, compare=False, repr=False)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}

# GPT-2 shapes from the paper / OpenAI's release; training budgets in the spirit of nanoGPT and llm.c.
# `micro` is sized so its default budget finishes on a 2-core laptop CPU in about 10 minutes
# (measured: 6 min 8 s to 11 min 11 s, the hour's load deciding).
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "micro": {
        "model": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128},
        "train": {
            "batch_size": 16, "grad_accum": 1, "max_steps": 500, "lr": 2e-3, "min_lr": 2e-4,
            "warmup_steps": 30, "eval_interval": 100, "eval_batches": 10, "log_interval": 10,
        },
    },
    "tiny": {
        "model": {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256},
        "train": {
            "batch_size": 32, "grad_accum": 1, "max_steps": 5000, "lr": 1e-3, "min_lr": 1e-4,
            "warmup_steps": 200, "eval_interval": 250, "eval_batches": 40, "log_interval": 10,
        },
    },
    "small": {  # GPT-2 124M; ~0.5M tokens per step, 10B tokens in all (llm.c's recipe). Micro-batch 32: 45% MFU
        # on an H200 vs 42% at 16 (docs/performance.md); ~17 GB, so a 24 GB card fits it, smaller ones use auto
        "model": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},
        "train": {
            "batch_size": 32, "grad_accum": 16, "max_steps": 19073, "lr": 6e-4, "min_lr": 6e-5,
            "warmup_steps": 700, "eval_interval": 250, "eval_batches": 20, "log_interval": 10,
        },
    },
    "medium": {  # GPT-2 350M
        "model": {"n_layer": 24, "n_head": 16, "n_embd": 1024, "block_size": 1024},
        "train": {
            "batch_size": 8, "grad_accum": 64, "max_steps": 60000, "lr": 3e-4, "min_lr": 3e-5,
            "warmup_steps": 700, "eval_interval": 250, "eval_batches": 20, "log_interval": 10,
        },
    },
    "large": {  # GPT-2 774M
        "model": {"n_layer": 36, "n_head": 20, "n_embd": 1280, "block_size": 1024},
        "train": {
            "batch_size": 4, "grad_accum": 128, "max_steps": 60000, "lr": 2.5e-4, "min_lr": 2.5e-5,
            "warmup_steps": 700, "eval_interval": 250, "eval_batches": 20, "log_interval": 10,
        },
    },
    "xl": {  # GPT-2 1.5B
        "model": {"n_layer": 48, "n_head": 25, "n_embd": 1600, "block_size": 1024},
        "train": {
            "batch_size": 2, "grad_accum": 256, "max_steps": 60000, "lr": 2e-4, "min_lr": 2e-5,
            "warmup_steps": 700, "eval_interval": 250, "eval_batches": 20, "log_interval": 10,
        },
    },
}


def compile_wanted(mode: str, device_type: str) -> bool:
    """train.compile: `auto` compiles on CUDA only, `on` wherever torch.compile works, `off` never."""
    return mode == "on" or (mode == "auto" and device_type == "cuda")


def trains_compiled(mode: str, device_type: str) -> bool:
    """Whether `train` runs the model compiled: as `compile_wanted` says, except on MPS, which it runs eagerly."""
    return compile_wanted(mode, device_type) and device_type != "mps"


def _shown(value: Any) -> str:
    """`value` as an error message quotes it: cut short, so that a config's alias bomb (a few lines of YAML that
    expand to a billion items) is no gigabyte-long message."""
    import reprlib

    shown = reprlib.Repr()  # its limits as arguments are Python 3.12's
    shown.maxlevel, shown.maxdict, shown.maxlist, shown.maxstring, shown.maxother = 2, 4, 4, 80, 80
    return shown.repr(value)


def _check_choice(key: str, value: str, choices: Iterable[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)} (got {_shown(value)})")


def _coerce(key: str, value: Any, kind: type) -> Any:
    """Convert a YAML/`--set` value to the field's type, or raise a ConfigError naming the key."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = math.nan
            if number.is_integer():
                return int(number)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    elif kind is str and isinstance(value, bool) and key.endswith(".compile"):
        return "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
    elif key == "train.log_to" and isinstance(value, list) and all(isinstance(item, str) for item in value):
        return ",".join(value)  # log_to: [tensorboard, wandb]
    elif key == "train.log_to" and value is False:
        return "none"  # log_to: no
    raise ConfigError(f"{key} must be {kind.__name__} (got {_shown(value)})")


def _field_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _merge_section(base: dict[str, dict[str, Any]], section: str, values: Any, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section {section!r} in {origin}: use one of {', '.join(SECTIONS)}")
    if not isinstance(values, Mapping):
        raise ConfigError(f"config section {section!r} in {origin} must be a mapping of key: value")
    types = _field_types(SECTIONS[section])
    for key, value in values.items():
        if key not in types:
            raise ConfigError(
                f"unknown config key {section}.{key} in {origin}: known keys are {', '.join(types)}"
            )
        base[section][key] = _coerce(f"{section}.{key}", value, types[key])


def _given(cfg: RunConfig, dotted: str) -> bool:
    """Whether `cfg`'s "section.key" was chosen rather than left to the preset: given by --set or a flag (even as
    the preset's value), or different from the preset's value (a file's, which may be a run's config.yaml that
    lists every key; an edit made with dataclasses.replace)."""
    if cfg.given is not None and dotted in cfg.given:
        return True
    section, key = dotted.split(".")
    preset = SECTIONS[section](**PRESETS.get(cfg.size, {}).get(section, {}))
    return getattr(getattr(cfg, section), key) != getattr(preset, key)


def init_from_block_size(cfg: RunConfig) -> int | None:
    """The context a run started from other weights (train.init_from) crops them to: the config's
    model.block_size where it was given, else None (the weights' own context)."""
    return cfg.model.block_size if _given(cfg, "model.block_size") else None


def preset_of(model: ModelConfig) -> str | None:
    """The preset whose shape (layers, heads, width) `model` has, else None."""
    shape = (model.n_layer, model.n_head, model.n_embd)
    return next((name for name, preset in PRESETS.items()
                 if shape == tuple(preset["model"].get(key) for key in ("n_layer", "n_head", "n_embd"))), None)


def size_label(size: str, model: ModelConfig) -> str:
    """How a model is named beside its config's preset `size`: the preset's name where it has that preset's shape,
    else "custom (from SIZE)" (a run of --set model.*, or of a file's model section)."""
    return size if preset_of(model) == size else f"custom (from {size})"


def init_from_conflict(cfg: RunConfig, weights: ModelConfig) -> str | None:
    """Why a run cannot start from weights of shape `weights` (train.init_from): a model key the config gave
    (a file, --set) another value than the weights have. They would train as they are, the setting ignored. None
    if there is none."""
    changed = [f"model.{key}={getattr(cfg.model, key)}" for key in ("n_layer", "n_head", "n_embd", "vocab_size", "bias")
               if _given(cfg, f"model.{key}") and getattr(cfg.model, key) != getattr(weights, key)]
    if not changed:
        return None
    return (f"--init-from {cfg.train.init_from} trains its weights' shape ({weights.n_layer} layers, {weights.n_head} "
            f"heads, {weights.n_embd} wide), not {', '.join(changed)}: drop those settings, or train a new model "
            f"without --init-from")


# A run started from trained weights (train.init_from) without a train.lr of its own peaks at its weights' preset's
# lr over this: GPT-2 small's 6e-4 gives 3e-5, the rate nanoGPT fine-tunes GPT-2 at. A pretraining rate (micro's
# 2e-3 is the default size's) overwrites what the weights know within a few hundred steps.
FINE_TUNE_LR_DIVISOR = 20


def start_from(cfg: RunConfig, weights: ModelConfig) -> tuple[RunConfig, list[str]]:
    """The config a run trains with when it starts from weights of shape `weights` (train.init_from), and notes on
    what that changed: the weights' shape, labelled with their preset's size (else the size that chose the
    training settings, so that config.yaml stays a --config), and a fine-tuning lr unless train.lr was given.
    A ConfigError where the config gave a shape the weights do not have (`init_from_conflict`)."""
    conflict = init_from_conflict(cfg, weights)
    if conflict:
        raise ConfigError(conflict)
    label = preset_of(weights)
    notes = []
    if label != cfg.size:
        own = "" if label is None else f"; --size {label} for its own"
        notes.append(f"the weights of {cfg.train.init_from} are {weights.n_layer} layers × {weights.n_embd} "
                     f"({'no preset size' if label is None else label + ' size'}): the training settings are the "
                     f"{cfg.size} preset's (--size chooses them{own})")
    tc = cfg.train
    if not _given(cfg, "train.lr"):
        size = label or cfg.size
        pretraining = PRESETS[size]["train"]["lr"]
        lr = float(f"{pretraining / FINE_TUNE_LR_DIVISOR:.12g}")
        min_lr = tc.min_lr if _given(cfg, "train.min_lr") else _following_min_lr(lr)
        if min_lr > lr:  # a floor given above the fine-tuning rate: the rate is the floor, constant
            tc = replace(tc, lr=min_lr, min_lr=min_lr)
            notes.append(f"fine-tuning at a constant lr {min_lr:g}, the train.min_lr given (above the "
                         f"{size} preset's {pretraining:g} over {FINE_TUNE_LR_DIVISOR}): --lr sets the peak")
        else:
            tc = replace(tc, lr=lr, min_lr=min_lr)
            notes.append(f"fine-tuning at lr {lr:g}, the {size} preset's {pretraining:g} over "
                         f"{FINE_TUNE_LR_DIVISOR}, so that the weights are nudged rather than overwritten: --lr "
                         f"sets another")
    if tc.optimizer == "muon" and not _given(cfg, "train.muon_lr"):
        muon_lr = float(f"{tc.muon_lr / FINE_TUNE_LR_DIVISOR:.12g}")
        tc = replace(tc, muon_lr=muon_lr)
        notes.append(f"Muon's matrices fine-tune at train.muon_lr {muon_lr:g}, its pretraining rate over "
                     f"{FINE_TUNE_LR_DIVISOR}: --set train.muon_lr=... sets another")
    return replace(cfg, size=label or cfg.size, model=weights, train=tc), notes


def parse_override(text: str) -> tuple[str, str, Any]:
    """`"train.lr=3e-4"` -> ("train", "lr", parsed value).

    Values are parsed as YAML, except for string-typed keys, which keep the text as written (so that
    `--set train.compile=off` is "off", not YAML's boolean false).
    """
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r} is not section.key=value (e.g. --set train.lr=3e-4)")
    dotted, raw = text.split("=", 1)
    section, _, key = dotted.strip().partition(".")
    if not key:
        raise ConfigError(f"--set {text!r} needs a section and a key, e.g. train.lr=3e-4")
    cls = SECTIONS.get(section)
    if cls is not None and _field_types(cls).get(key) is str:
        text = raw.strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":  # quoted as YAML quotes a string
            try:
                unquoted = yaml.safe_load(text)
            except yaml.YAMLError:
                unquoted = None
            if isinstance(unquoted, str):
                return section, key, unquoted
        return section, key, text
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return section, key, value


def _repeated_key(root: Any) -> tuple[str, int] | None:
    """The first key given twice in one mapping of a composed YAML document, and its line (PyYAML keeps the last
    one without a word: a second `train:` section would drop every key of the first). A merge (`<<: *anchor`)
    may repeat the keys it brings in."""
    import yaml

    pending, seen_nodes = [root], set()
    while pending:
        node = pending.pop()
        if node is None or id(node) in seen_nodes:  # an alias is the node it names: look once
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            keys = set()
            for key, value in node.value:
                pending += [key, value]
                if key.tag == "tag:yaml.org,2002:merge" or not isinstance(key, yaml.ScalarNode):
                    continue
                if (key.tag, key.value) in keys:
                    return key.value, key.start_mark.line + 1
                keys.add((key.tag, key.value))
        elif isinstance(node, yaml.SequenceNode):
            pending += node.value
    return None


def shipped_examples() -> dict[str, Path]:
    """The example configs that come with tinygpt, by file name: the wheel's tinygpt_cli/examples (examples/ of the
    repository, installed there), else examples/ beside src/ in a clone (an editable install, or src on the path)."""
    package = Path(__file__).resolve().parent
    folder = next((folder for folder in (package / "examples", package.parents[1] / "examples") if folder.is_dir()),
                  None)
    try:
        return {path.name: path for path in sorted(folder.glob("*.yaml"))} if folder is not None else {}
    except OSError:
        return {}


def config_path(path: Path) -> Path:
    """`--config PATH` as given, or, where no such file is here, the shipped example it names (`examples/NAME.yaml`,
    `NAME.yaml` or `NAME`): the docs' commands run from a pipx install, which has no examples/ folder."""
    if path.exists() or path.is_absolute() or path.parent not in (Path("."), Path("examples")):
        return path
    examples = shipped_examples()
    return examples.get(path.name) or examples.get(f"{path.name}.yaml") or path


def load_yaml(path: Path) -> dict[str, Any]:
    import yaml

    path = config_path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a folder: pass the YAML file itself to --config")
    if path.exists() and not path.is_file():  # a device (/dev/zero), a pipe: no file to read a config from
        raise ConfigError(f"config file {path} is not a regular file: save the YAML to a file and pass that")
    if not path.is_file():
        shipped = ", ".join(f"examples/{name}" for name in shipped_examples())
        raise ConfigError(f"config file {path} does not exist: check the --config path"
                          + (f" (the examples that come with tinygpt: {shipped})" if shipped else ""))
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise ConfigError(f"config file {path} cannot be read (Permission denied): make it readable (chmod +r) or "
                          f"copy it somewhere you can read") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({first_line(exc)}): fix it or drop --config") \
            from None
    try:
        loader = yaml.SafeLoader(text)
        try:  # one parse: the node tree is checked for repeated keys, then built into Python values
            node = loader.get_single_node()
            repeated = _repeated_key(node)
            loaded = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML ({first_line(exc)}): fix it or drop --config") \
            from None
    if repeated:
        raise ConfigError(f"config file {path} repeats the key {repeated[0]!r} (line {repeated[1]}): keep one of "
                          f"them, since only the last would count")
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path} must be a mapping with sections {', '.join(SECTIONS)}")
    return loaded


def resolve_config(
    size: str | None = None,
    config_file: str | Path | None = None,
    overrides: Iterable[str] | str = (),
    flags: Mapping[str, Any] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Build a RunConfig: preset < YAML file < `--set` overrides < `flags` ({"train.lr": 3e-4, ...}).

    `size` picks the preset; a YAML file may also name one with a top-level `size:` key (the flag wins).
    `base` (a resumed run's saved config) replaces the preset and the file. `overrides` may be one string.
    """
    if isinstance(overrides, str):  # one override, not its characters
        overrides = [overrides]
    if config_file is not None:
        config_file = Path(config_file)
    if base is not None:
        merged = {name: dict(values) for name, values in config_to_dict(base).items() if name != "size"}
        # a run whose min_lr followed its lr goes on following a new --lr; one that set its own keeps it
        followed = base.train.min_lr == _following_min_lr(base.train.lr)
        return _finish(base.size, merged, overrides, flags, set() if followed else None, new_run=False)
    file_values = load_yaml(config_file) if config_file is not None else {}
    origin = str(config_file) if config_file is not None else ""
    file_size = file_values.pop("size", None)
    if size is not None and not size.strip():  # `--size ""` (an unset shell variable) is no preset
        raise ConfigError(f"--size is empty: choose one of {', '.join(PRESETS)}")
    chosen = size or (str(file_size) if file_size is not None else "micro")
    if chosen not in PRESETS:
        raise ConfigError(f"unknown size {chosen!r}: choose one of {', '.join(PRESETS)}")

    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, values in PRESETS[chosen].items():
        _merge_section(merged, section, values, f"preset {chosen}")
    given: set[str] = set()
    for section, values in file_values.items():
        _merge_section(merged, section, values, origin)
        given.update(f"{section}.{key}" for key in values)
    return _finish(chosen, merged, overrides, flags, given)


def _following_min_lr(lr: float) -> float:
    """train.min_lr where it follows train.lr: a tenth of it, rounded as written (3e-3 / 10 is
    0.00030000000000000003 in binary, which config.yaml would keep)."""
    return float(f"{lr / MIN_LR_DIVISOR:.12g}")


def _finish(
    size: str, merged: dict[str, dict[str, Any]], overrides: Iterable[str], flags: Mapping[str, Any] | None,
    given: set[str] | None = None, new_run: bool = True,
) -> RunConfig:
    """The RunConfig of `merged` with the overrides and flags on top. `given` (the keys a new run's file set; none
    for a resumed run whose min_lr followed its lr; None for one that set its own) lets train.min_lr follow a
    train.lr given without it, as in the presets: a tenth of it."""
    given = set(given) if given is not None else None
    typed: set[str] = set()  # what the command line gave (`RunConfig.given`)
    for text in overrides:
        section, key, value = parse_override(text)
        _merge_section(merged, section, {key: value}, "--set")
        typed.add(f"{section}.{key}")
    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        section, dot, key = str(dotted).partition(".")
        if not dot:
            raise ConfigError(f"flags take dotted keys, section first ({{'train.lr': 3e-4}}), not {dotted!r}")
        known = section in SECTIONS and key in _field_types(SECTIONS[section])  # a flag of the command line
        _merge_section(merged, section, {key: value}, f"--{key.replace('_', '-')}" if known else "flags")
        typed.add(dotted)
    if merged["train"].get("optimizer", "adamw") != "muon":
        unused = sorted(key for key in typed if key in ("train.muon_lr", "train.muon_momentum"))
        if unused:
            raise ConfigError(f"{' and '.join(unused)} go{'es' if len(unused) == 1 else ''} with train.optimizer=muon, "
                              f"which this run does not use: "
                              f"add --set train.optimizer=muon, or drop {'them' if len(unused) > 1 else 'it'}")
    if given is not None:
        given |= typed
    if given is not None and "train.lr" in given and "train.min_lr" not in given:
        merged["train"]["min_lr"] = _following_min_lr(merged["train"]["lr"])
    return RunConfig(size=size, **{name: SECTIONS[name](**values) for name, values in merged.items()},
                     given=frozenset(typed) if new_run else None)


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    values = dataclasses.asdict(cfg)
    del values["given"]
    return values


def flat_config(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A (saved) config's nested sections as one dict of dotted keys: {"train.lr": 0.002, ...}, in its order."""
    items: dict[str, Any] = {}
    for key, value in tree.items():
        items.update(flat_config(value, f"{prefix}{key}.") if isinstance(value, Mapping) else {f"{prefix}{key}": value})
    return items


def config_from_dict(values: Mapping[str, Any], origin: str = "saved config") -> RunConfig:
    """Rebuild a RunConfig from `config_to_dict` output (e.g. a run's config.yaml), type-checked."""
    merged: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for section, section_values in values.items():
        if section == "size":
            continue
        _merge_section(merged, section, section_values, origin)
    size = str(values.get("size", "micro"))
    return RunConfig(size=size, **{name: SECTIONS[name](**v) for name, v in merged.items()})


def dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
