"""Export a model to formats the rest of the ecosystem loads, and load GPT-2 weights from them.

Formats (`export_model`):
  hf    a Hugging Face transformers folder (GPT2LMHeadModel: config.json, model.safetensors,
        generation_config.json and the GPT-2 tokenizer files), loadable offline with `from_pretrained`.
  gguf  one GGUF file for llama.cpp's `gpt2` architecture, tokenizer inside (the `gguf` package).
  onnx  an ONNX graph `input_ids (batch, sequence) int64 -> logits (batch, sequence, 50257) float32`
        (torch.onnx.export, dynamo exporter), with the tokenizer files beside it.

Import (`load_pretrained`, `load_model`): a Hugging Face GPT-2 folder (one tinygpt exported included),
a tinygpt run or checkpoint, or OpenAI's `gpt2`/`gpt2-medium`/`gpt2-large`/`gpt2-xl` from the Hugging Face Hub.

tinygpt's parameter names are Hugging Face's; its linear layers are `nn.Linear` (weight (out, in)) where
transformers' GPT-2 uses Conv1D (weight (in, out)), so those four weights per block are transposed on the way
out and back in. The embedding is padded to 50304 rows in tinygpt and trimmed to GPT-2's 50257 in every export.
The tokenizer files (vocab, merges) are derived from the bundled BPE ranks, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from tinygpt_cli import __version__, workspace
from tinygpt_cli.checkpoint import (
    STATE_FILE,
    LoadedCheckpoint,
    checkpoint_model_config,
    latest_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    run_candidates,
    save_safetensors,
    step_folders,
    version_key,
)
from tinygpt_cli.config import EXPORT_FORMATS as FORMATS
from tinygpt_cli.config import FORMAT_DTYPES, HUB_MODELS, ModelConfig
from tinygpt_cli.errors import FULL, TinyGPTError, described, first_line, install_advice, os_problem
from tinygpt_cli.model import GPT, gpt_to_load, load_weights
from tinygpt_cli.tokenizer import EOT_ID, EOT_TOKEN, VOCAB_SIZE, load_ranks
from tinygpt_cli.workspace import fsync_dir, fsync_file

HUB_SHAPES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
              "gpt2-xl": (48, 25, 1600)}  # (n_layer, n_head, n_embd) of each, context 1024
EXPORT_EXTRA = "pip install 'tinygpt[export]'"
LAYER_NORM_EPS = 1e-5  # model.py's LayerNorms
# weights that are nn.Linear (out, in) in tinygpt and Conv1D (in, out) in transformers
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HF_DTYPE_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
_HF_WEIGHTS = "model.safetensors"
_HF_INDEX = "model.safetensors.index.json"
_HF_BIN = "pytorch_model.bin"
_HF_BIN_INDEX = "pytorch_model.bin.index.json"


class ExportError(TinyGPTError):
    """An export or import cannot be done: bad format/dtype, a missing optional package, a foreign model."""


@dataclass
class ExportResult:
    """What `export_model` wrote: `path` (a folder, or the .gguf file) and each file's size in bytes."""

    path: Path
    format: str
    dtype: str
    source: Path | str
    files: dict[str, int] = field(default_factory=dict)  # name in the output folder (or the .gguf file's) -> bytes

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


# ----------------------------------------------------------------------------------------- tokenizer
@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by its byte-level BPE files.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen, ...) are mapped
    in byte order onto the characters from U+0100 up, so every token is a visible, whitespace-free string.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in keep}
    shifted = 0
    for byte in range(256):
        if byte not in mapping:
            mapping[byte] = chr(256 + shifted)
            shifted += 1
    return mapping


def _token_text(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[byte] for byte in token)


@functools.lru_cache(maxsize=1)
def token_strings() -> tuple[str, ...]:
    """GPT-2's 50257 tokens in id order, as the byte-level strings of vocab.json (the last is <|endoftext|>)."""
    by_rank = sorted(load_ranks().items(), key=lambda item: item[1])
    if [rank for _, rank in by_rank] != list(range(EOT_ID)):
        raise TinyGPTError("the bundled GPT-2 ranks are not the ids 0..50255: reinstall tinygpt")
    return (*(_token_text(token) for token, _ in by_rank), EOT_TOKEN)


def _split_by_lower_ranks(token: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """BPE of `token`'s bytes using only merges ranked below the token itself (the merge that makes it is last)."""
    limit = ranks[token]
    # The answer is two lower-ranked tokens that concatenate to `token`; when only one split point gives such a
    # pair it must be the answer, and running BPE is needed only to choose between several (about 1 in 4 tokens).
    splits = [
        i for i in range(1, len(token))
        if ranks.get(token[:i], limit) < limit and ranks.get(token[i:], limit) < limit
    ]
    if len(splits) == 1:
        return [token[: splits[0]], token[splits[0] :]]
    parts = [bytes([byte]) for byte in token]
    while True:
        best_rank, best_at = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_at = rank, i
        if best_at < 0:
            return parts
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]


@functools.lru_cache(maxsize=1)
def bpe_merges() -> tuple[tuple[str, str], ...]:
    """GPT-2's 50000 merges in priority order, as pairs of byte-level strings (merges.txt without its header).

    tiktoken keeps only ranks: token t (rank r >= 256) is made by merging the two tokens that BPE with the
    merges ranked below r leaves of t's bytes, so the merge list is recovered in rank order.
    """
    ranks = load_ranks()
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) == 1:
            continue
        parts = _split_by_lower_ranks(token, ranks)
        if len(parts) != 2:
            raise TinyGPTError(f"the bundled GPT-2 ranks cannot be turned into merges at {token!r}: reinstall tinygpt")
        merges.append((_token_text(parts[0]), _token_text(parts[1])))
    return tuple(merges)


TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tokenizer_files(model_max_length: int) -> dict[str, str]:
    """The Hugging Face GPT-2 tokenizer files (name -> text): vocab.json, merges.txt, tokenizer.json,
    tokenizer_config.json, special_tokens_map.json. Ids are those of tinygpt's tokenizer."""
    vocab = {text: index for index, text in enumerate(token_strings())}
    merges = [f"{left} {right}" for left, right in bpe_merges()]
    eot = {
        "id": EOT_ID, "content": EOT_TOKEN, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": True, "special": True,
    }
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [eot],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": vocab, "merges": merges,
        },
    }
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode(encode(text)) == text
        "errors": "replace",
        "added_tokens_decoder": {str(EOT_ID): {key: value for key, value in eot.items() if key != "id"}},
        **special,
    }
    return dict(zip(TOKENIZER_FILES, (
        json.dumps(vocab, ensure_ascii=False),
        "#version: 0.2\n" + "\n".join(merges) + "\n",
        json.dumps(tokenizer_json, ensure_ascii=False),
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
        json.dumps(special, indent=2) + "\n",
    ), strict=True))


# ----------------------------------------------------------------------------------------- Hugging Face
def hf_config(cfg: ModelConfig, dtype: str = "fp32") -> dict[str, Any]:
    """config.json of the GPT2LMHeadModel that computes what `GPT(cfg)` computes."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": VOCAB_SIZE,
        "n_positions": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "use_cache": True,
        "bos_token_id": EOT_ID,
        "eos_token_id": EOT_ID,
        "tie_word_embeddings": True,
        "torch_dtype": _HF_DTYPE_NAMES[dtype],
        "tinygpt_version": __version__,
    }


def _full_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """tinygpt's weights on CPU in fp32, with zero biases filled in for a `bias=False` model.

    GPT-2 always has biases; a LayerNorm or Linear without one computes exactly what it does with a zero one.
    """
    cfg = model.config
    state = {key: value.detach().to("cpu", torch.float32) for key, value in model.state_dict().items()}
    state.pop("lm_head.weight", None)  # tied to transformer.wte.weight
    if not cfg.bias:
        widths = {"ln_1": cfg.n_embd, "ln_2": cfg.n_embd, "attn.c_attn": 3 * cfg.n_embd, "attn.c_proj": cfg.n_embd,
                  "mlp.c_fc": 4 * cfg.n_embd, "mlp.c_proj": cfg.n_embd}
        for layer in range(cfg.n_layer):
            for name, width in widths.items():
                state.setdefault(f"transformer.h.{layer}.{name}.bias", torch.zeros(width))
        state.setdefault("transformer.ln_f.bias", torch.zeros(cfg.n_embd))
    return state


def hf_state_dict(model: GPT, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's state dict: Conv1D weights transposed, the vocabulary trimmed to 50257, no lm_head."""
    out = {}
    for key, value in _full_state_dict(model).items():
        if key == "transformer.wte.weight":
            value = value[:VOCAB_SIZE]
        elif key.endswith(CONV1D_WEIGHTS):
            value = value.t()
        out[key] = value.to(_TORCH_DTYPES[dtype]).contiguous()
    return out


def write_hf(model: GPT, folder: Path, dtype: str = "fp32") -> None:
    """Write a Hugging Face GPT-2 folder (config, weights, generation config, tokenizer) into `folder`."""
    cfg: ModelConfig = model.config
    save_safetensors(hf_state_dict(model, dtype), folder / _HF_WEIGHTS,
                     {"format": "pt", "tinygpt_version": __version__})
    texts = {
        "config.json": json.dumps(hf_config(cfg, dtype), indent=2) + "\n",
        "generation_config.json": json.dumps({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID}, indent=2) + "\n",
        **tokenizer_files(cfg.block_size),
    }
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------- GGUF
def _require(what: str, *modules: str):
    """Import `modules` for `what` and return the last, or an ExportError naming every one that is missing (or the
    one that is installed but does not import, with its error) and the command that installs it."""
    import importlib
    import importlib.util

    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        verb = "are" if len(missing) > 1 else "is"
        raise ExportError(f"{what} needs {' and '.join(missing)}, which {verb} not installed: "
                          f"{install_advice(' '.join(missing))}; every export format's: {EXPORT_EXTRA}")
    imported = None
    for module in modules:
        try:
            imported = importlib.import_module(module)
        except ImportError as exc:  # the package is there, yet one of its own imports fails
            raise ExportError(f"{what}: {module} is installed but does not import ({first_line(exc, 160)}): "
                              f"reinstall it: `pip install --force-reinstall {module}` (with pipx: "
                              f"`pipx runpip tinygpt install --force-reinstall {module}`)") from exc
    return imported


def gguf_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """The fp32 tensors of llama.cpp's `gpt2` architecture, by GGUF name.

    llama.cpp wants (out, in) matrices, which is nn.Linear's layout: nothing is transposed. The head is tied,
    so there is no `output.weight`; llama.cpp then reuses `token_embd.weight`.
    """
    state = _full_state_dict(model)
    names = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
             "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
    tensors = {
        "token_embd.weight": state["transformer.wte.weight"][:VOCAB_SIZE],
        "position_embd.weight": state["transformer.wpe.weight"],
        "output_norm.weight": state["transformer.ln_f.weight"],
        "output_norm.bias": state["transformer.ln_f.bias"],
    }
    for layer in range(model.config.n_layer):
        for ours, theirs in names.items():
            for kind in ("weight", "bias"):
                tensors[f"blk.{layer}.{theirs}.{kind}"] = state[f"transformer.h.{layer}.{ours}.{kind}"]
    return tensors


def gguf_tensor_type(name: str, shape: tuple[int, ...], dtype: str):
    """The GGML type a tensor is stored in: vectors, norms and positions stay f32 (as llama.cpp's converter
    does); q8_0 needs rows that are a multiple of 32 values and falls back to f16 otherwise."""
    import gguf

    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.startswith("position_embd") or dtype == "fp32":
        return types.F32
    if dtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[types.Q8_0][0]
        return types.Q8_0 if shape[-1] % block == 0 else types.F16
    return {"fp16": types.F16, "bf16": types.BF16}[dtype]


def write_gguf(model: GPT, path: Path, dtype: str = "fp32", name: str = "tinygpt") -> None:
    """Write `model` and the GPT-2 tokenizer as one GGUF file for llama.cpp (`gpt2` architecture)."""
    gguf = _require("--format gguf", "gguf")
    cfg: ModelConfig = model.config
    file_types = {"fp32": gguf.LlamaFileType.ALL_F32, "fp16": gguf.LlamaFileType.MOSTLY_F16,
                  "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer = gguf.GGUFWriter(str(path), "gpt2")
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(int(file_types[dtype]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(LAYER_NORM_EPS)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(list(token_strings()))
        writer.add_token_types([int(gguf.TokenType.NORMAL)] * EOT_ID + [int(gguf.TokenType.CONTROL)])
        writer.add_token_merges([f"{left} {right}" for left, right in bpe_merges()])
        writer.add_bos_token_id(EOT_ID)
        writer.add_eos_token_id(EOT_ID)
        writer.add_add_bos_token(False)
        for tensor_name, tensor in gguf_tensors(model).items():
            array = tensor.numpy()
            kind = gguf_tensor_type(tensor_name, array.shape, dtype)
            writer.add_tensor(tensor_name, gguf.quants.quantize(array, kind), raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


# ----------------------------------------------------------------------------------------- ONNX
class _LogitsModel(nn.Module):
    """input_ids (B, T) int64 -> logits (B, T, 50257) fp32: the graph that ONNX export traces."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_states(input_ids)  # (B, T, C)
        head = self.model.transformer.wte.weight[:VOCAB_SIZE]  # the padded rows are never real tokens
        return nn.functional.linear(hidden, head).float()  # (B, T, 50257)


@contextmanager
def _quiet_torch_onnx() -> Iterator[None]:
    """The exporter warns about optional packages it does not need (torchvision) through logging and warnings."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def write_onnx(model: GPT, folder: Path, dtype: str = "fp32") -> None:
    """Write `model.onnx` (dynamic batch and sequence axes; sequence up to block_size) and the tokenizer files.

    Weights go to `model.onnx.data` beside it when they pass 1 GiB (ONNX's protobuf stops at 2 GiB).
    """
    _require("--format onnx", "onnx", "onnxscript")  # onnxscript: torch's ONNX exporter
    cfg: ModelConfig = model.config
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != _TORCH_DTYPES[dtype] or model.training:
        model = copy.deepcopy(model).to("cpu", _TORCH_DTYPES[dtype])  # the caller's model stays as it is
    graph = _LogitsModel(model).eval()
    example = torch.zeros((2, min(8, cfg.block_size)), dtype=torch.long)
    axes = {0: torch.export.Dim("batch", min=1)}
    if cfg.block_size > 1:  # a Dim cannot have min == max: a one-token context is a static axis
        axes[1] = torch.export.Dim("sequence", min=1, max=cfg.block_size)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with _quiet_torch_onnx(), torch.no_grad():
        try:
            torch.onnx.export(
                graph, (example,), str(folder / "model.onnx"), input_names=["input_ids"], output_names=["logits"],
                dynamic_shapes={"input_ids": axes}, dynamo=True, verbose=False,
                external_data=weight_bytes > 2**30,
            )
        except OSError:
            raise  # a full disk or an unwritable folder: export_model says so
        except Exception as exc:  # the exporter raises many kinds; one line is what a user can act on
            raise ExportError(f"ONNX export failed ({described(exc)}): try --format hf") from None
    for name, text in tokenizer_files(cfg.block_size).items():
        (folder / name).write_text(text, encoding="utf-8")


# ----------------------------------------------------------------------------------------- export
def check_format(fmt: str, dtype: str) -> None:
    """Raise an ExportError unless `fmt` is a known format that can hold `dtype`."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if dtype not in FORMAT_DTYPES[fmt]:
        choices = ", ".join(FORMAT_DTYPES[fmt])
        raise ExportError(f"--format {fmt} cannot hold {dtype!r} weights: choose one of {choices}")
    if fmt == "onnx" and version_key(torch.__version__) < (2, 5):  # torch.onnx.export(dynamo=True, dynamic_shapes)
        raise ExportError(f"--format onnx needs torch 2.5 or newer (this is {torch.__version__}): upgrade torch, or "
                          f"export --format hf")


def _source_name(loaded: LoadedCheckpoint) -> str:
    """The run's name; with the step for a checkpoint other than its latest, which would share the run's path."""
    path = loaded.path  # absolute: `tinygpt export .` in a run or model folder is named after it
    state = loaded.state or {}
    if state.get("format") == "huggingface" and state.get("source") in HUB_MODELS:
        return workspace.safe_name(state["source"])  # not the hub cache's snapshot folder (a commit hash)
    if path.parent.name != "checkpoints":
        return workspace.safe_name(path.name)
    run = path.parent.parent  # runs/<name>/checkpoints/step_<N>
    step = f"-{path.name.replace('_', '')}" if latest_checkpoint(run) != path else ""
    return workspace.safe_name(f"{run.name}{step}")


def default_export_path(name: str, fmt: str, dtype: str) -> Path:
    """exports/<name>-hf[-fp16], exports/<name>-onnx[-fp16], exports/<name>-<dtype>.gguf under the workspace."""
    if fmt == "gguf":
        return workspace.root() / "exports" / f"{name}-{dtype}.gguf"
    suffix = "" if dtype == "fp32" else f"-{dtype}"
    return workspace.root() / "exports" / f"{name}-{fmt}{suffix}"


def _files_under(path: Path) -> dict[str, int]:
    """The files of an export and their sizes (a folder filled in place: not its own hidden entries, a `.git`)."""
    if path.is_file():
        return {path.name: path.stat().st_size}
    # an export is flat (`_not_an_export` refuses a folder in one): a walk of a `.git` beside it would be wasted
    return {child.name: child.stat().st_size for child in sorted(path.iterdir())
            if child.is_file() and not child.name.startswith(".")}


def _fsync_tree(path: Path) -> None:
    for child in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if child.is_file():
            fsync_file(child)
        else:
            fsync_dir(child)


def export_model(
    source: str | Path | None = None,
    fmt: str = "hf",
    out: str | Path | None = None,
    dtype: str = "fp32",
    *,
    force: bool = False,
) -> ExportResult:
    """Export `source` (see `load_model`: a run, checkpoint, Hugging Face GPT-2 folder or hub name; None = the
    latest run) as `fmt` ("hf" | "gguf" | "onnx") with `dtype` weights into `out`.

    `out` is a folder for hf and onnx; for gguf it is the file if it ends in `.gguf`, else a folder that gets
    `model.gguf`. The default is under `exports/` (see `default_export_path`). Everything is written into a hidden
    temp path beside `out` and renamed into place at the end, so a failure leaves nothing behind; an existing
    `out` is an error unless `force`, which replaces it.
    """
    check_format(fmt, dtype)
    if fmt == "gguf":
        _require("--format gguf", "gguf")
    elif fmt == "onnx":
        _require("--format onnx", "onnx", "onnxscript")
    # absolute, so that `--out .` has a parent to put the temp folder in and a name
    target = Path(os.path.abspath(Path(out).expanduser())) if out is not None else None
    if target is not None and fmt == "gguf" and target.suffix.lower() != ".gguf":
        target = target / "model.gguf"  # a folder gets model.gguf; what else it holds stays
    if target is not None and fmt != "gguf" and target.suffix.lower() == ".gguf" and not target.is_dir():
        raise ExportError(f"--format {fmt} writes a folder, and {target.name} names a GGUF file: pass --format gguf, "
                          f"or give --out a folder, e.g. --out {target.with_suffix('')}-{fmt}")
    if target is not None and fmt == "onnx" and target.suffix.lower() == ".onnx" and not target.is_dir():
        raise ExportError(f"--format onnx writes a folder (model.onnx beside the tokenizer files), not the file "
                          f"{target.name}: give --out a folder, e.g. --out {target.with_suffix('')}-onnx")
    if target is not None:  # before the model loads; again after, with the checkpoint it loaded
        _check_out(target, force, _source_folder(source))

    loaded = load_model(source)
    model = loaded.model
    _check_finite(model, loaded.path, dtype)
    name = _source_name(loaded)
    if target is None:
        target = default_export_path(name, fmt, dtype)
    _check_out(target, force, loaded.path)
    single_file = fmt == "gguf"

    parent = target.parent
    # the folders mkdir will make, deepest first: a failed export removes them again (if still empty)
    made = [folder for folder in (parent, *parent.parents) if not folder.exists()]
    # a folder that exists (made by hand, a mount point, the current one, an earlier export in a git clone) is
    # filled in place, its own hidden entries kept: the temp folder is inside it, on its filesystem
    in_place = not single_file and target.is_dir() and not target.is_symlink()
    home, temp_name = (target, IN_PLACE) if in_place else (parent, target.name)
    tmp = home / f".{temp_name}.tmp-{os.getpid()}"
    placed = False  # the new export is at `target`: what follows only tidies up
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        if not in_place:  # (in place, `_undo_killed_fill` takes them, under the lock, after what it must restore)
            _remove_stale_temps(home, temp_name)
        if not single_file:
            tmp.mkdir()
        if fmt == "hf":
            write_hf(model, tmp, dtype)
        elif fmt == "gguf":
            write_gguf(model, tmp, dtype, name=name)
        else:
            write_onnx(model, tmp, dtype)
        _fsync_tree(tmp)
        if in_place:  # one export at a time fills a folder (a second waits a moment, then is refused)
            busy = ExportError(f"another export is writing into {target} now: wait for it to finish, or choose "
                               f"another --out")
            with workspace.exclusive(target / IN_PLACE_LOCK, str(target), busy):
                _check_out(target, force, loaded.path, locked=True)  # again: another may have written it meanwhile
                replaced = _fill(target, tmp)
                placed = True
                fsync_dir(target)
                _remove(replaced)  # (killed here, the next export to this folder removes it)
        elif target.exists() or target.is_symlink():  # force: swap the new one in, then drop the old one
            _check_out(target, force, loaded.path)  # again: another export may have written it since the first look
            old = parent / f".{target.name}.old-{os.getpid()}"
            _remove(old)
            workspace.replace(target, old)
            try:
                workspace.replace(tmp, target)
            except BaseException:
                workspace.replace(old, target)
                raise
            placed = True
            _remove(old)  # (killed here, the next export of this name removes it)
        else:
            _place_new(tmp, target)
            placed = True
        fsync_dir(parent)
    except BaseException as exc:
        if placed and isinstance(exc, KeyboardInterrupt):  # a stop after the export was written: it is complete
            exc.export_written = target
            raise
        if parent.is_dir():
            _remove(tmp)
        for folder in made:  # deepest first; one that mkdir did not get to does not exist
            if not folder.is_dir():
                continue
            if any(folder.iterdir()):
                break
            folder.rmdir()
        if isinstance(exc, (OSError, SafetensorError)):
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
            # numpy's tofile (the gguf writer) reports a full disk as "N requested and M written", with no errno
            full = not isinstance(exc, OSError) or exc.errno is None or os_problem(exc) == FULL
            advice = "free some space, or choose another --out" if full else "choose another --out"
            raise ExportError(f"cannot write {target} ({reason}): {advice}") from None
        raise
    return ExportResult(path=target, format=fmt, dtype=dtype, source=loaded.path, files=_files_under(target))


# In a folder an export is moving its files into (`_fill`): its process id, then their names, until all are there.
FILLING = ".tinygpt-export-filling"
# An export filling a folder in place names its hidden entries `.tinygpt-export.<kind>-<pid>`: `tmp` (the files
# being written), `setaside` (an earlier export's files being moved out of the way) and `old` (all of them, out of
# the way: kept until the new export is complete, then removed); and holds `.tinygpt-export.lock` while it fills.
IN_PLACE = "tinygpt-export"
IN_PLACE_LOCK = f".{IN_PLACE}.lock"


def _fill(folder: Path, tmp: Path) -> Path:
    """Move the files of `tmp` into `folder` (rather than renaming over it, which fails for the current folder and
    mount points, would drop its permissions and its hidden entries, such as a git clone's `.git`), then remove
    `tmp`; the caller holds IN_PLACE_LOCK. An earlier export there (`--force`) is first moved aside, whole, into
    `.tinygpt-export.old-<pid>`, which is returned for the caller to remove once it has the export as complete; on
    failure the new files go and the earlier ones come back (`_restore`). From before the first move until the last
    new file is in, `folder` lists the new files in FILLING: a process killed then (SIGKILL) leaves a folder that
    `_undo_killed_fill` puts back as it found it, and that the loader refuses (transformers would load a part that
    lacks its tokenizer)."""
    names = sorted(child.name for child in tmp.iterdir())
    earlier = sorted(child.name for child in folder.iterdir() if not child.name.startswith("."))
    marker = folder / FILLING
    setting_aside = folder / f".{IN_PLACE}.setaside-{os.getpid()}"
    aside = folder / f".{IN_PLACE}.old-{os.getpid()}"
    listed = False  # until the list is written, nothing has moved: a failure removes what was made, no more
    try:
        if earlier:  # made before the list: beside it, it says the files listed may still be the earlier export's
            setting_aside.mkdir()
        marker.write_text(f"{os.getpid()}\n" + "".join(f"{name}\n" for name in names), encoding="utf-8")
        listed = True
        fsync_file(marker)
        fsync_dir(folder)
        if earlier:  # all of it aside, then renamed as one: the new files move in only after that
            for name in earlier:
                workspace.replace(folder / name, setting_aside / name)
            fsync_dir(setting_aside)
            workspace.replace(setting_aside, aside)
            fsync_dir(folder)
        for name in names:
            workspace.replace(tmp / name, folder / name)
        tmp.rmdir()
        fsync_dir(folder)  # every file is in before the list goes
        marker.unlink()
    except BaseException:
        if listed:
            _restore(folder, str(os.getpid()), names)
        else:  # (the earlier export's files, named like the new ones, are still in place: none is removed)
            _remove(marker)
            _remove(setting_aside)
        raise
    return aside


def _restore(folder: Path, pid: str, names: list[str]) -> None:
    """Put `folder` back as the fill of process `pid`, which listed the new files `names`, found it. Each step can be
    cut (a kill, a second Ctrl-C) and the next call goes on from there: while the earlier export is being moved
    back it sits in `setaside-<pid>`, which says the names listed are its own files, not new ones."""
    setting_aside = folder / f".{IN_PLACE}.setaside-{pid}"
    aside = folder / f".{IN_PLACE}.old-{pid}"
    if not setting_aside.is_dir():  # the earlier export is wholly aside (or there is none): the new files go
        for name in names:
            if name and Path(name).name == name and name not in (".", ".."):
                _remove(folder / name)
        if aside.is_dir():
            workspace.replace(aside, setting_aside)
    _move_back(setting_aside, folder)
    _remove(folder / FILLING)
    _remove(setting_aside)


def _move_back(kept: Path, folder: Path) -> None:
    """Move an earlier export's files, set aside in `kept`, back into `folder` (over a new file of that name)."""
    if not kept.is_dir():
        return
    for child in kept.iterdir():
        if (folder / child.name).is_dir() and not (folder / child.name).is_symlink():
            _remove(folder / child.name)
        workspace.replace(child, folder / child.name)


def _undo_killed_fill(folder: Path) -> None:
    """Put back a folder that an export killed while moving its files in (`_fill`) left part-filled (`_restore`),
    then what else killed exports left (a temp folder; an earlier export set aside with no list beside it, which
    comes back; one replaced by a complete export, which goes): the folder is then as that export found it, and
    this export fills it. The caller holds IN_PLACE_LOCK, so no fill is under way; a list whose writer died before
    it wrote its number (empty) is one too."""

    def leftovers(kind: str) -> list[Path]:  # (this process's own, bar its temp folder, are of an earlier
        return _left_by_dead(folder, IN_PLACE, (kind,), own=kind != "tmp")  # process that had its number: pid 1)

    try:
        pid, *names = (folder / FILLING).read_text(encoding="utf-8").splitlines() or [""]
    except (OSError, UnicodeDecodeError):
        pid, names = None, []  # none (the usual case), or not ours to read
    if pid is not None and (not pid.isdigit() or int(pid) == os.getpid() or not workspace.pid_alive(int(pid))):
        _restore(folder, pid if pid.isdigit() else "", names)
    if not (folder / FILLING).exists():  # (a fill under way keeps what it set aside)
        for child in leftovers("setaside"):
            _move_back(child, folder)
            _remove(child)
        for child in leftovers("old"):  # killed after the new export was complete: the one it replaced
            _remove(child)
    for child in leftovers("tmp"):  # killed while writing its files
        _remove(child)


def _left_by_dead(folder: Path, name: str, kinds: tuple[str, ...], own: bool = False) -> list[Path]:
    """The entries `.<name>.<kind>-<pid>` of `folder` that exports no longer running left; `own`: this process's
    number counts as one of those (an earlier process that had it)."""
    try:
        children = list(folder.iterdir())
    except OSError:
        return []
    found = []
    for child in children:
        kind, _, pid = child.name.removeprefix(f".{name}.").partition("-")
        if kind in kinds and child.name.startswith(f".{name}.") and pid.isdigit() and \
                (own if int(pid) == os.getpid() else not workspace.pid_alive(int(pid))):
            found.append(child)
    return found


def _remove_stale_temps(parent: Path, name: str) -> None:
    """Remove `.<name>.tmp-<pid>` (a partial export) and `.<name>.old-<pid>` (the export a `--force` was replacing)
    left by an export whose process is gone (killed before it could clean up)."""
    for child in _left_by_dead(parent, name, ("tmp", "old")):
        _remove(child)


def _place_new(tmp: Path, target: Path) -> None:
    """Move `tmp` to `target`, found absent, without replacing what another export put there since the look: a
    file is linked in (which fails where one exists) then unlinked, a folder renamed (which fails onto one that
    holds files). A filesystem without hard links gets the rename."""
    try:
        if tmp.is_dir():
            workspace.replace(tmp, target)
            return
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (FAT, some network shares)
            workspace.replace(tmp, target)
            return
    except OSError:
        if _occupied(target):
            raise ExportError(f"{target} already exists: pass --force to replace it, or choose another --out "
                              "(another export wrote it meanwhile)") from None
        raise
    with contextlib.suppress(OSError):  # the export is in place; a temp name left is swept by the next export
        tmp.unlink()


FP16_MAX = 65504.0  # the largest finite float16


def _check_finite(model: GPT, source: Path | None, dtype: str = "fp32") -> None:
    """Refuse weights with NaN or infinite values (a run that diverged, a weights file damaged inside: safetensors
    checks its header, not its data), which would export without a word and load everywhere as a broken model; and
    for fp16, weights beyond its range, which the cast would turn into infinities."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not bool(torch.isfinite(param).all()):
                raise ExportError(f"the weights of {source or 'the model'} hold NaN or infinite values ({name}): "
                                  f"the run diverged or the file is damaged; export an earlier checkpoint")
            largest = float(param.abs().max()) if dtype == "fp16" and param.numel() else 0.0
            if largest > FP16_MAX:
                raise ExportError(f"{name} holds {largest:.4g}, beyond fp16's range (±{FP16_MAX:.0f}), which would "
                                  f"export as infinity: export with --dtype bf16 or fp32")


def _check_out(target: Path, force: bool, source: Path | None = None, locked: bool = False) -> None:
    """Refuse an `--out` that holds something, unless `force` and it is an earlier export (never the source, the
    workspace, the current folder or a folder above them, whatever it looks like). What a killed export left
    filling it goes first (`_undo_killed_fill`), unless another export is filling it now (it holds IN_PLACE_LOCK;
    `locked`: this one does): the folder is then as that export found it."""
    if locked:
        _undo_killed_fill(target)
    elif target.is_dir() and not target.is_symlink():  # under the lock, where no other export holds it now
        # held (a fill under way: left alone), or a folder one cannot write: nothing to undo
        with contextlib.suppress(TinyGPTError), workspace.exclusive(target / IN_PLACE_LOCK, str(target), patience_s=0):
            _undo_killed_fill(target)
    above = next((folder for folder in target.parents if folder.exists()), None)
    if above is not None and not above.is_dir():
        raise ExportError(f"{above} is a file, not a folder: choose another --out")
    if not _occupied(target):
        return
    here = target.resolve()
    guarded = [Path.cwd(), workspace.root(), *([source] if source is not None else [])]
    if any(here == kept or here in kept.parents for kept in (path.resolve() for path in guarded)):
        raise ExportError(f"{target} holds the model being exported, the workspace or the current folder: "
                          "--force only replaces an earlier export; choose another --out")
    problem = _not_an_export(target)
    if problem:
        raise ExportError(f"{target} is not an earlier export ({problem}): --force only replaces a .gguf file or a "
                          "folder of an export's files alone (a tinygpt config.json, model.onnx or model.gguf, and "
                          "the files exported with them); choose another --out")
    if not force:  # (advised only where it would replace the export)
        raise ExportError(f"{target} already exists: pass --force to replace it, or choose another --out")


# every file an export folder may hold: the hf format's, the onnx format's, and model.gguf (an older gguf export)
EXPORT_FILES = frozenset({"config.json", "generation_config.json", "model.safetensors", "model.onnx", "model.onnx.data",
                          "model.gguf", *TOKENIZER_FILES})


def _not_an_export(path: Path) -> str | None:
    """Why `path` is not what `export_model` writes, in a few words; None where it is: a .gguf file, or a folder of
    an export's files alone (EXPORT_FILES): an hf export (its config.json and weights say tinygpt wrote them:
    another tool's model folder is not one, nor one that transformers' `save_pretrained` wrote over an export, which
    copies config.json's keys but not the weights' metadata), an onnx export, or model.gguf alone (an older gguf
    export). Hidden entries (a git clone's `.git`, tools' caches) are the folder's own, kept by an export."""
    if path.is_symlink():
        return None if path.suffix.lower() == ".gguf" else "it is a link"
    if not path.is_dir():
        return None if path.suffix.lower() == ".gguf" else "it is a file"
    names = {child.name for child in path.iterdir() if not child.name.startswith(".")}
    stray = sorted(name for name in names if name not in EXPORT_FILES or (path / name).is_dir())
    if stray:
        more = f" and {workspace.counted(len(stray) - 1, 'more', 'more')}" if len(stray) > 1 else ""
        return f"it holds {stray[0]}{more}"
    if "config.json" in names:
        if not _written_by_tinygpt(path / "config.json"):
            return "its config.json is another tool's"
        if _HF_WEIGHTS in names and not _weights_by_tinygpt(path / _HF_WEIGHTS):
            if _is_lfs_pointer(path / _HF_WEIGHTS):  # a clone made without git-lfs
                return (f"its {_HF_WEIGHTS} is a Git LFS pointer, not weights: `git lfs pull` there to see what it "
                        f"holds, or delete it")
            return f"its {_HF_WEIGHTS} was saved by another tool since, e.g. transformers' save_pretrained"
        return None
    return None if "model.onnx" in names or names == {"model.gguf"} else "it holds no model file"


def _written_by_tinygpt(config: Path) -> bool:
    """Whether an hf config.json is one `hf_config` wrote (it records `tinygpt_version`)."""
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(loaded, dict) and "tinygpt_version" in loaded


def _weights_by_tinygpt(weights: Path) -> bool:
    """Whether a model.safetensors is one `write_hf` wrote (its header's metadata records `tinygpt_version`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), framework="pt") as handle:
            return "tinygpt_version" in (handle.metadata() or {})
    except Exception:  # a damaged or cut file: not known to be ours
        return False


def _is_lfs_pointer(path: Path) -> bool:
    """Whether a file is a Git LFS pointer (what a clone without git-lfs holds in place of a large file)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(24) == b"version https://git-lfs."
    except OSError:
        return False


def _occupied(path: Path) -> bool:
    """Whether writing to `path` would replace something (a folder that holds nothing but hidden entries, e.g.
    made by hand or a git clone of a model repository, is free: an export fills it and keeps them)."""
    if path.is_dir() and not path.is_symlink():
        return any(not child.name.startswith(".") for child in path.iterdir())
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------------------- import
def _is_hf_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file() and not (path / STATE_FILE).is_file()


def download_gpt2(name: str) -> Path:
    """OpenAI's GPT-2 weights (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) from the Hugging Face Hub, or the
    local cache of them; returns the snapshot folder. Raises an ExportError offline with nothing cached."""
    repo = HUB_MODELS.get(name)
    if repo is None:
        raise ExportError(f"unknown pretrained model {name!r}: choose one of {', '.join(HUB_MODELS)}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ExportError(f"downloading {name} needs huggingface_hub: pip install huggingface_hub") from None
    failure: Exception | None = None
    for repo_id in (repo, name):  # `from_pretrained("gpt2")` caches it under its old id, models--gpt2
        try:
            return Path(snapshot_download(repo_id, allow_patterns=["config.json", "generation_config.json",
                                                                    _HF_WEIGHTS]))
        except Exception as exc:  # offline mode, no network, no such file: all mean "not available here"
            failure = failure or exc
    from huggingface_hub import constants

    offline = " and unset HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else ""
    raise ExportError(
        f"cannot download {name} ({repo}) from the Hugging Face Hub ({described(failure, most=160)}): "
        f"connect to the internet{offline}, or on a machine that has it run `tinygpt export {name} --out "
        f"{name}-hf`, copy that folder here and pass it instead of {name}"
    ) from None


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a Hugging Face folder: model.safetensors, or its shards (an index), or pytorch_model.bin, or
    its shards (older large models are saved so). A .bin is unpickled with torch's weights_only loader: no code of
    the file's runs. What cannot be read, or is no flat name -> tensor map, is one line."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    def load_bin(path: Path) -> dict[str, torch.Tensor]:
        return torch.load(path, map_location="cpu", weights_only=True)

    tensors: dict[str, torch.Tensor] | None = None
    try:
        for weights, index, load in ((_HF_WEIGHTS, _HF_INDEX, lambda path: load_file(str(path))),
                                     (_HF_BIN, _HF_BIN_INDEX, load_bin)):
            if (folder / weights).is_file():
                tensors = load(folder / weights)
            elif (folder / index).is_file():
                weight_map = json.loads((folder / index).read_text(encoding="utf-8"))["weight_map"]
                shards = sorted(set(weight_map.values()))
                for shard in shards:
                    if not (folder / shard).is_file():
                        raise ExportError(f"the weights in {folder} cannot be read ({shard}, one of {len(shards)} "
                                          f"shards its {index} names, is missing): download it again")
                tensors = {}
                for shard in shards:
                    tensors.update(load(folder / shard))
            if tensors is not None:
                break
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, EOFError,
            pickle.UnpicklingError) as exc:  # weights_only refusing an object is an UnpicklingError
        pointers = [path.name for path in sorted(folder.iterdir()) if path.suffix in (".safetensors", ".bin")
                    and _is_lfs_pointer(path)]
        if pointers:  # a clone made without git-lfs
            raise ExportError(f"{folder / pointers[0]} is a Git LFS pointer, not the weights: run `git lfs pull` in "
                              f"{folder} (install git-lfs first), or download the model again") from None
        raise ExportError(f"the weights in {folder} cannot be read ({type(exc).__name__}): re-download or re-export "
                          "the model (`save_pretrained` writes model.safetensors)") from None
    if tensors is None:
        raise ExportError(f"{folder} has no {_HF_WEIGHTS} or {_HF_BIN} (nor a sharded one's index): it holds no "
                          f"GPT-2 weights")
    if not isinstance(tensors, dict) or not all(isinstance(value, torch.Tensor) for value in tensors.values()):
        raise ExportError(f"the weights in {folder} are not a model's state dict (names to tensors): a training "
                          f"checkpoint saved whole? Load it and save the model with `save_pretrained`")
    return tensors


def _config_from_hf(folder: Path, config: dict[str, Any]) -> ModelConfig:
    where = folder / "config.json"
    if "model_type" not in config:  # `{}`: a config being written, or emptied
        raise ExportError(f"{where} names no model_type: re-download or re-export the model (GPT-2, 'gpt2')")
    if config.get("model_type") != "gpt2":
        raise ExportError(f"{where} describes a {config.get('model_type')!r} model; tinygpt loads GPT-2 ('gpt2') only")
    nulls = [key for key, value in config.items() if value is None and key in _HF_NUMBERS]
    try:
        if nulls:
            raise ValueError(f"{nulls[0]} is null")
        return _checked_config_from_hf(where, config)
    except (TypeError, ValueError) as exc:  # a string where a number goes
        raise ExportError(f"{where} is not a valid GPT-2 config ({exc}): re-download or re-export the model") from None


# config.json keys that tinygpt reads as numbers (n_inner may be null: 4 × n_embd)
_HF_NUMBERS = ("n_layer", "n_head", "n_embd", "n_positions", "n_ctx", "vocab_size", "layer_norm_epsilon")


def _checked_config_from_hf(where: Path, config: dict[str, Any]) -> ModelConfig:
    n_embd = int(config.get("n_embd", 768))
    checks = [
        (config.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"),
         f"activation {config.get('activation_function')!r} (tinygpt uses GELU with the tanh approximation)"),
        (abs(float(config.get("layer_norm_epsilon", LAYER_NORM_EPS)) - LAYER_NORM_EPS) < 1e-12,
         f"layer_norm_epsilon {config.get('layer_norm_epsilon')} (tinygpt uses 1e-5)"),
        (config.get("n_inner") in (None, 4 * n_embd), f"n_inner {config.get('n_inner')} (tinygpt uses 4 * n_embd)"),
        (not config.get("scale_attn_by_inverse_layer_idx"), "scale_attn_by_inverse_layer_idx"),
        (config.get("scale_attn_weights", True), "scale_attn_weights false"),
        (not config.get("add_cross_attention"), "cross-attention"),
        (config.get("tie_word_embeddings", True), "an untied lm_head"),
        (int(config.get("vocab_size", VOCAB_SIZE)) >= VOCAB_SIZE,
         f"vocab_size {config.get('vocab_size')} (GPT-2's tokenizer has {VOCAB_SIZE} tokens)"),
    ]
    for ok, what in checks:
        if not ok:
            raise ExportError(f"{where} has {what}, which tinygpt's GPT-2 cannot represent")
    vocab = int(config.get("vocab_size", VOCAB_SIZE))
    try:
        return ModelConfig(
            n_layer=int(config.get("n_layer", 12)), n_head=int(config.get("n_head", 12)), n_embd=n_embd,
            block_size=int(config.get("n_positions", config.get("n_ctx", 1024))),
            vocab_size=-(-vocab // 64) * 64,  # padded to a multiple of 64 like tinygpt's own models
            dropout=0.0, bias=True,
        )
    except TinyGPTError as exc:
        raise ExportError(f"{where} is not a valid GPT-2 config ({exc})") from None


def hf_folder_config(folder: Path) -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 folder, from its config.json (the vocabulary padded to 50304)."""
    return _config_from_hf(folder, _read_hf_config(folder))


def _read_hf_config(folder: Path) -> dict[str, Any]:
    """A Hugging Face folder's config.json, as a JSON object (else a one-line ExportError)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError(f"{folder} has no config.json: it is not a Hugging Face model folder") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ExportError(f"{folder / 'config.json'} is not valid JSON: re-download or re-export the model") from None
    if not isinstance(config, dict):
        raise ExportError(f"{folder / 'config.json'} is not a JSON object: re-download or re-export the model")
    return config


def _foreign_tokenizer(folder: Path) -> str | None:
    """The name of a Hugging Face folder's tokenizer file (tokenizer.json, vocab.json) whose vocabulary is not
    GPT-2's: a model trained with a tokenizer of its own, whose ids tinygpt's GPT-2 BPE would misread. None where the
    folder has GPT-2's, or none (a model saved without its tokenizer), or one that cannot be read."""
    ours = token_strings()
    for name in ("tokenizer.json", "vocab.json"):
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        vocab = (data.get("model") or {}).get("vocab") if name == "tokenizer.json" and isinstance(data, dict) \
            else data
        if not isinstance(vocab, dict):  # a Unigram or WordPiece tokenizer's list, say
            return name
        known = {text: index for text, index in vocab.items() if isinstance(index, int) and 0 <= index < len(ours)}
        if len(known) != len(ours) or any(ours[index] != text for text, index in known.items()):
            return name
    return None


def load_hf_folder(folder: str | Path) -> tuple[GPT, ModelConfig]:
    """A `GPT` (fp32, CPU, eval mode) from a Hugging Face GPT-2 folder: config.json and model.safetensors
    (or a sharded index, or pytorch_model.bin loaded with weights_only). The vocabulary is padded to 50304."""
    folder = Path(folder).expanduser()
    if (folder / FILLING).exists():
        raise ExportError(f"{folder} is part of an export that was killed while its files were moved in: run that "
                          "`tinygpt export` again to finish it")
    config = _read_hf_config(folder)
    cfg = _config_from_hf(folder, config)
    foreign = _foreign_tokenizer(folder)
    if foreign is not None:
        raise ExportError(f"{folder} has a tokenizer of its own ({foreign}'s vocabulary is not GPT-2's): tinygpt "
                          f"reads and writes text with GPT-2's BPE only, so this model's token ids would stand for "
                          f"other text; use a model trained with GPT-2's tokenizer")
    tensors, head = {}, None
    for key, value in _read_hf_tensors(folder).items():
        if key == "lm_head.weight":
            head = value  # tied to wte: wte itself where a file holds only the head
            continue
        base = key.removeprefix("transformer.")
        if base == key and not base.startswith(("wte.", "wpe.", "h.", "ln_f.")):
            continue  # a task's head (GPT2DoubleHeadsModel's multiple_choice_head, a classifier's score), unused
        if base.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of old transformers
        value = value.to(torch.float32)
        if base.endswith(CONV1D_WEIGHTS):
            value = value.t()
        tensors[f"transformer.{base}"] = value.contiguous()
    if "transformer.wte.weight" not in tensors and head is not None:
        tensors["transformer.wte.weight"] = head.to(torch.float32).contiguous()
    wte = tensors.get("transformer.wte.weight")
    rows = int(config.get("vocab_size", VOCAB_SIZE))  # as saved, not padded
    if wte is not None and wte.size(0) != rows:  # transformers refuses it too; padding hid it
        raise ExportError(f"the weights in {folder} have {wte.size(0):,} token embeddings, and its config.json says "
                          f"vocab_size {rows:,}: re-download or re-export the model")
    if wte is not None and wte.size(0) < cfg.vocab_size:
        tensors["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(cfg.vocab_size - wte.size(0), wte.size(1))])
    model = gpt_to_load(cfg)
    expected = {key: value.shape for key, value in model.state_dict().items() if key != "lm_head.weight"}
    got = {key: value.shape for key, value in tensors.items()}
    if expected != got:
        wrong = sorted(key for key in expected.keys() | got.keys() if expected.get(key) != got.get(key))
        raise ExportError(f"the weights in {folder} do not match its config.json "
                          f"(missing, extra or misshapen: {', '.join(wrong[:3])})")
    load_weights(model, tensors)  # lm_head.weight is tied to wte
    return model.eval(), cfg


def _resolve(spec: str | Path | None) -> tuple[str, Path | str | None]:
    """("tinygpt", run/checkpoint spec) | ("hf", folder) | ("hub", name)."""
    if spec is None or str(spec) == "":
        return "tinygpt", None
    path = Path(spec).expanduser()
    # a bare name is a run's before it is a folder in the current directory (as for `checkpoint.find_run`): an
    # export written there with `--out NAME` must not stand in for the run it came from
    if workspace.is_bare_name(str(spec)) and (workspace.runs_dir() / str(spec)).is_dir():
        in_runs = workspace.runs_dir() / str(spec)  # an hf export written there loads as one
        return ("hf", in_runs) if _is_hf_folder(in_runs) else ("tinygpt", str(spec))
    written = "gguf" if path.suffix.lower() == ".gguf" and path.is_file() else \
        "onnx" if (path / "model.onnx").is_file() and not (path / "config.json").exists() else None
    if written:
        article = "an" if written == "onnx" else "a"
        raise ExportError(f"{spec} is {article} {written} export, which tinygpt writes but does not load: pass the "
                          "run it came from, or an hf export (`tinygpt export RUN --format hf`)")
    if path.is_dir():  # absolute: `./r` and `r/` as text are "r", a bare name, which is the run r's
        return ("hf", path) if _is_hf_folder(path) else ("tinygpt", Path(os.path.abspath(path)))
    if path.is_file() and path.name == "latest" and path.parent.name == "checkpoints":  # the pointer: its run's
        return "tinygpt", Path(os.path.abspath(path.parent.parent))
    if path.exists():
        raise ExportError(f"{spec} is a file: pass the folder that holds the model (config.json or state.json)")
    if any(candidate.is_dir() for candidate in run_candidates(str(spec))):
        return "tinygpt", str(spec)  # `r/checkpoints/step_N`, `runs/r/...` from outside the workspace: find_run's
    if str(spec) in HUB_MODELS:
        return "hub", str(spec)
    for candidate in run_candidates(str(spec)):  # `RUN/checkpoints/step_7` that is not there: the ones that are
        if candidate.parent.name == "checkpoints" and candidate.parent.is_dir():
            steps = [folder.name for folder in step_folders(candidate.parent.parent)]
            held = f"it holds {', '.join(steps[-6:])}" if steps else "it holds none"
            raise ExportError(f"no checkpoint {candidate.name} in {candidate.parent} ({held}): name one of those, or "
                              f"the run for its latest")
    close = workspace.close_names(str(spec), workspace.runs_dir()) if workspace.is_bare_name(str(spec)) else ""
    raise ExportError(
        f"no run, checkpoint or Hugging Face GPT-2 folder at {spec}{close}, and it is not one of "
        f"{', '.join(HUB_MODELS)}: list runs with `tinygpt runs`"
    )


def source_record(spec: str) -> str:
    """How a run's config.yaml names the weights it started from (train.init_from), so that it names them from any
    folder: a run's name or a hub name as given, a folder by its absolute path; `spec` as given where it names
    nothing."""
    try:
        kind, where = _resolve(spec)
    except ExportError:
        return spec
    return str(where) if kind == "hub" or isinstance(where, str) else os.path.abspath(where)


def same_source(first: str, second: str) -> bool:
    """Whether two --init-from specs name the same weights (a run by its name or its path, a folder relatively or
    not); hub names, none (""), and specs that name nothing here are the same only as text."""
    def where(spec: str) -> str:
        try:
            folder = _source_folder(spec)
        except ExportError:
            return spec
        return spec if folder is None else str(folder.resolve())

    return first == second or where(first) == where(second)


def _source_folder(spec: str | Path | None) -> Path | None:
    """The folder `load_model(spec)` reads from (a run's, for a run's name), where it is known before loading;
    None for the latest run or a hub name."""
    kind, where = _resolve(spec)
    if kind == "hub" or where is None:
        return None
    return where if isinstance(where, Path) else workspace.runs_dir() / where


def _adapted_config(cfg: ModelConfig, block_size: int | None, dropout: float | None) -> ModelConfig:
    """`cfg` with a shorter context and/or another dropout (see `load_pretrained`)."""
    if block_size is not None and block_size > cfg.block_size:
        raise ExportError(f"block_size {block_size} is longer than the model's context of {cfg.block_size} tokens: "
                          f"use {cfg.block_size} or less")
    return replace(cfg, block_size=block_size or cfg.block_size, dropout=cfg.dropout if dropout is None else dropout)


def _adapt(model: GPT, block_size: int | None, dropout: float | None) -> GPT:
    """`model` with a shorter context (positions cropped) and/or another dropout; the same object if neither."""
    cfg: ModelConfig = model.config
    new = _adapted_config(cfg, block_size, dropout)
    if new == cfg:
        return model
    state = model.state_dict()
    state["transformer.wpe.weight"] = state["transformer.wpe.weight"][: new.block_size]
    state.pop("lm_head.weight", None)
    return load_weights(gpt_to_load(new), state).train(model.training)


def load_pretrained(
    spec: str | Path,
    *,
    block_size: int | None = None,
    dropout: float | None = None,
    device: str | torch.device = "cpu",
) -> tuple[GPT, ModelConfig]:
    """Load GPT-2 weights to start training from: returns (model in eval mode on `device`, its ModelConfig).

    `spec`: a Hugging Face GPT-2 folder (one `tinygpt export` wrote included), a tinygpt run name/folder or
    checkpoint folder, or `gpt2` | `gpt2-medium` | `gpt2-large` | `gpt2-xl` (downloaded from the Hugging Face
    Hub, or taken from its cache; an ExportError offline). A local folder or run wins over a hub name.
    The vocabulary is padded to 50304 (zero rows). `block_size` crops the position table to a shorter context;
    `dropout` replaces the model's (Hugging Face folders load with 0.0). Raises a TinyGPTError on any problem.
    """
    kind, where = _resolve(spec)
    if kind == "tinygpt":
        model: GPT = load_checkpoint(where, device="cpu").model  # type: ignore[assignment]
    elif kind == "hf":
        model, _ = load_hf_folder(where)  # type: ignore[arg-type]
    else:
        model, _ = load_hf_folder(download_gpt2(str(where)))
    model = _adapt(model, block_size, dropout).to(device).eval()
    return model, model.config


def pretrained_checkpoint(spec: str | Path) -> Path | None:
    """The checkpoint folder `load_pretrained(spec)` would read for a tinygpt run or checkpoint (a run's latest now),
    absolute, so that a fine-tune records the very weights it started from; None for a Hugging Face folder or a hub
    name. Raises a TinyGPTError where `spec` names nothing."""
    kind, where = _resolve(spec)
    return Path(os.path.abspath(resolve_checkpoint(str(where)))) if kind == "tinygpt" and where is not None else None


def pretrained_config(spec: str | Path, *, block_size: int | None = None,
                      dropout: float | None = None) -> ModelConfig:
    """The ModelConfig that `load_pretrained(spec, block_size=, dropout=)` gives, read without loading (or
    downloading) any weights: for `tinygpt plan --set train.init_from=...`."""
    kind, where = _resolve(spec)
    if kind == "tinygpt":
        cfg = checkpoint_model_config(where)  # type: ignore[arg-type]
    elif kind == "hf":
        cfg = hf_folder_config(Path(where))  # type: ignore[arg-type]
    else:
        n_layer, n_head, n_embd = HUB_SHAPES[str(where)]  # the rest is ModelConfig's GPT-2 defaults
        cfg = ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024)
    return _adapted_config(cfg, block_size, dropout)


def load_model(spec: str | Path | None = None, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Like `checkpoint.load_checkpoint`, but `spec` may also be a Hugging Face GPT-2 folder or a hub name
    (see `load_pretrained`). For those, `.state` is {"format": "huggingface", "step": None, "source": ...} and
    `.run_config` is None; `.path` is the folder the weights came from."""
    kind, where = _resolve(spec)
    if kind == "tinygpt":
        return load_checkpoint(where, device=device)
    folder = Path(where) if kind == "hf" else download_gpt2(str(where))  # type: ignore[arg-type]
    model, cfg = load_hf_folder(folder)
    state = {"format": "huggingface", "step": None, "source": str(spec), "model_config": vars(cfg)}
    return LoadedCheckpoint(folder, model.to(device).eval(), state, None)


__all__ = [
    "FORMATS", "FORMAT_DTYPES", "HUB_MODELS", "ExportError", "ExportResult", "bpe_merges",
    "byte_to_unicode", "check_format", "default_export_path", "download_gpt2", "export_model", "gguf_tensors",
    "hf_config", "hf_state_dict", "load_hf_folder", "load_model", "load_pretrained", "token_strings",
    "tokenizer_files", "write_gguf", "write_hf", "write_onnx",
]
