"""generate and eval edge cases: long streams, CRLF prompt files, non-finite settings and results, strict JSON."""

from __future__ import annotations

import json

import pytest
from test_generate_cli import cli_invoke, make_run

from conftest import assert_one_line_error
from tinygpt_cli.sample import TextStream, read_prompt


def test_text_stream_is_linear_in_the_text_length():
    """Each push used to copy everything decoded so far (`self._buffer += ...`): long samples were quadratic. Now a
    push touches only its own piece and the held-back text, which never grows past a stop string's length."""
    stream = TextStream(["\n\nTHE END"])
    for _ in range(20_000):
        stream.push(b" abc")
        assert len(stream._pending) < stream._longest  # all that a push searches and copies
    assert stream.text == " abc" * 20_000
    assert stream.push(b"\n\n") == "" and stream.finish() == "\n\n"  # held: it could start the stop string


def test_text_stream_stop_strings_across_pushes():
    stream = TextStream(["aab", "xyz"])
    out = [stream.push(piece) for piece in (b"a", b"a", b"a", b"b", b"c")]
    assert "".join(out) == "a" and stream.stopped and stream.text == "a"
    other = TextStream(["abc", "x"])
    assert other.push(b"..ab") == ".." and other.push(b"x") == "ab" and other.stopped


def test_prompt_file_keeps_crlf_as_stdin_does(tmp_path, monkeypatch):
    path = tmp_path / "p.txt"
    path.write_bytes(b"ROMEO:\r\nJULIET:\r\n")
    assert read_prompt(path) == "ROMEO:\r\nJULIET:\r\n"


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-32"])
def test_a_prompt_file_with_a_byte_order_mark_is_its_text(tmp_path, encoding):
    """A UTF-8 mark became a U+FEFF token at the head of the prompt, and a UTF-16 file (Notepad's "Unicode",
    PowerShell's `>`) was refused as not UTF-8."""
    path = tmp_path / "p.txt"
    path.write_bytes("ROMEO: café\n".encode(encoding))
    assert read_prompt(path) == "ROMEO: café\n"


def test_infinite_repetition_penalty_is_refused(workspace):
    make_run(workspace)
    result = cli_invoke("generate", "x", "--repetition-penalty", "inf")
    assert_one_line_error(result, "--repetition-penalty must be a finite number")


def _tiny_dataset(workspace, name: str) -> None:
    """A one-line source: its val split is one token then <|endoftext|>, so only the separator is scored."""
    from tinygpt_cli.data import tokenize

    source = workspace / f"{name}.txt"
    source.write_text("Hi\n", encoding="utf-8")
    tokenize(str(source), name=name)


def test_eval_of_only_separators_has_no_bits_per_byte_and_strict_json(workspace):
    make_run(workspace)
    _tiny_dataset(workspace, "eots")
    result = cli_invoke("eval", "--data", "eots", "--json")
    assert result.exit_code == 0, result.output
    strict = lambda c: pytest.fail(f"non-standard JSON {c}")  # noqa: E731
    payload = json.loads(result.stdout, parse_constant=strict)
    assert payload["text_bytes"] == 0 and payload["bits_per_byte"] is None  # was 0.0
    line = (workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()[-1]
    json.loads(line, parse_constant=strict)


def test_eval_of_a_nan_model_writes_strict_json_and_says_why(workspace, with_shakespeare):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    checkpoint = make_run(workspace)
    weights = checkpoint / "model.safetensors"
    with safe_open(str(weights), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(weights))
    tensors["transformer.ln_f.weight"][0] = float("nan")
    save_file(tensors, str(weights), metadata=metadata)
    result = cli_invoke("eval", "--tokens", "64", "--json")
    assert result.exit_code == 0, result.output
    strict = lambda c: pytest.fail(f"non-standard JSON {c}")  # noqa: E731
    assert json.loads(result.stdout, parse_constant=strict)["loss"] is None
    assert "non-finite logits" in result.stderr
    # audit: damaged weights in fp32 (this CPU's dtype) were told to try --dtype fp32 as if they overflowed
    assert "may be damaged (an earlier one may be whole), or in fp16 or bf16 it overflows" in result.stderr
    json.loads((workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()[-1], parse_constant=strict)
    # HellaSwag took argmin over NaN scores, ending 0, and reported a made-up accuracy (1.0 where every label was 0)
    task = workspace / "hellaswag.jsonl"
    task.write_text("".join(json.dumps({"ctx": f"A man puts flour in bowl {i}. He", "label": 0, "endings": [
        "adds eggs.", "drives away.", "sings to it.", "paints."]}) + "\n" for i in range(4)))
    result = cli_invoke("eval", "--task", "hellaswag", "--task-data", str(task), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout, parse_constant=strict)
    assert payload["accuracy"] is None and payload["accuracy_norm"] is None, payload
    assert "non-finite logits" in result.stderr
    json.loads((workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()[-1], parse_constant=strict)
    # LAMBADA's greedy picks over NaN logits would count as misses: an accuracy of 0 that is not one
    task = workspace / "lambada.jsonl"
    task.write_text("".join(json.dumps({"text": f"The baker sold bread {i} to the"}) + "\n" for i in range(3)))
    result = cli_invoke("eval", "--task", "lambada_openai", "--task-data", str(task), "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout, parse_constant=strict)
    assert payload["accuracy"] is None and payload["perplexity"] is None and payload["accuracy_stderr"] is None
    assert "non-finite logits" in result.stderr
    json.loads((workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()[-1], parse_constant=strict)


def test_a_checkpoint_of_a_newer_tinygpt_or_a_damaged_header_says_what_to_do(workspace):
    """Audit: model settings a newer tinygpt added, and a header whose model config does not parse, both said
    "carries no valid model config (...)" and nothing to do."""
    import json

    from safetensors.torch import load_file, safe_open, save_file
    from test_cli import assert_one_line_error, invoke
    from test_generate_cli import make_run

    weights = make_run(workspace) / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(weights))
    newer = {**json.loads(metadata["model_config"]), "rope": True}
    save_file(tensors, str(weights), metadata={**metadata, "model_config": json.dumps(newer),
                                               "tinygpt_version": "99.0.0"})
    for command in (("export", "tiny"), ("generate", "Hi", "--max-new-tokens", "2")):
        assert_one_line_error(invoke(*command), "was written by tinygpt 99.0.0, with model settings this version "
                                                "(")
    assert "(rope): upgrade tinygpt" in invoke("export", "tiny").stderr
    save_file(tensors, str(weights), metadata={**metadata, "model_config": '{"n_layer": 2,'})
    assert_one_line_error(invoke("export", "tiny"), "carries no valid model config (JSONDecodeError: ")
    assert "it has no earlier checkpoint to fall back to: train the run again" in invoke("export", "tiny").stderr


def test_a_loaded_model_owns_tied_fp32_weights_and_no_file_mapping(workspace, tmp_path):
    """Loading builds the model on the meta device (a random initialisation of gpt2-xl took 23 s here, only to be
    overwritten): what it loads must still be fp32 parameters of its own, the head tied to wte, no tensor left on
    the meta device, and no memory map of the weights file alive after the load (Windows deletes no mapped file,
    and a training prunes old checkpoints)."""
    from pathlib import Path

    import torch
    from test_export import hf_folder, random_model
    from test_generate_cli import make_run

    from tinygpt_cli.checkpoint import load_checkpoint
    from tinygpt_cli.export import load_model

    checkpoint = make_run(workspace)
    hf = hf_folder(random_model(), tmp_path / "hf")
    for loaded, weights in ((load_checkpoint(str(checkpoint)), checkpoint / "model.safetensors"),
                            (load_model(str(hf)), hf / "model.safetensors")):
        model = loaded.model
        assert model.lm_head.weight is model.transformer.wte.weight
        assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
        maps = Path("/proc/self/maps")
        if maps.exists():
            assert str(weights.resolve()) not in maps.read_text()
    before = torch.random.get_rng_state()
    load_checkpoint(str(checkpoint))
    assert torch.equal(torch.random.get_rng_state(), before)
