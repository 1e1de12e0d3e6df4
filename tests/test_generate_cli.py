"""`tinygpt generate` end to end through CliRunner, on a tiny checkpoint written directly (no training)."""

import json

import pytest
import torch
from test_cli import invoke

from conftest import assert_one_line_error
from tinygpt_cli import cli
from tinygpt_cli.checkpoint import save_checkpoint
from tinygpt_cli.config import ModelConfig, config_to_dict, resolve_config
from tinygpt_cli.model import GPT
from tinygpt_cli.tokenizer import EOT_ID

BLOCK = 32


def make_run(workspace, name="tiny", eot=False, dataset=""):
    """runs/<name>/checkpoints/step_1 holding a random tiny model (one that always says <|endoftext|> with eot),
    trained on `dataset` (default: none named, so eval takes the newest)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK))
    if eot:  # ln_f outputs <|endoftext|>'s embedding, made the longest: greedy picks it every time
        with torch.no_grad():
            model.transformer.wte.weight[EOT_ID] *= 20
            model.transformer.ln_f.weight.zero_()
            model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[EOT_ID])
    cfg = resolve_config(size="micro", overrides=["sample.temperature=0", "sample.max_new_tokens=12",
                                                  f"data.dataset={dataset}"])
    run_dir = workspace / "runs" / name
    return save_checkpoint(run_dir, 1, model, None, {"run_config": config_to_dict(cfg)})


@pytest.fixture
def run(workspace):
    return make_run(workspace)


def _typed_at_the_prompt(monkeypatch, *answers):
    """The prompt loop (stdin a terminal) reads `answers` in turn, as if typed; an exception is raised where one is
    (EOFError: Ctrl-D)."""
    import builtins

    said = iter(answers)

    def typed(prompt=""):
        answer = next(said)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(cli, "_stdin_is_interactive", lambda: True)
    monkeypatch.setattr(builtins, "input", typed)


def generate(*args, input=None):
    return cli_invoke("generate", *args, input=input)


def cli_invoke(*args, input=None):
    from typer.testing import CliRunner

    return CliRunner().invoke(cli.app, list(args), input=input)


def test_streams_the_prompt_and_its_continuation(run):
    result = generate("To be, or not to be", "--max-new-tokens", "12", "--seed", "3", "--temperature", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("To be, or not to be") and result.stdout.endswith("\n")
    assert "Sampling from" in result.stderr and "step 1" in result.stderr
    again = generate("To be, or not to be", "--max-new-tokens", "12", "--seed", "3", "--temperature", "1")
    assert again.stdout == result.stdout
    other = generate("To be, or not to be", "--max-new-tokens", "12", "--seed", "4", "--temperature", "1")
    assert other.stdout != result.stdout


def test_defaults_come_from_the_run_config(run):
    """sample.temperature=0 in the run's config: greedy, the same output whatever the seed."""
    first = generate("ROMEO:", "--seed", "1")
    assert first.exit_code == 0, first.output
    assert first.stdout == generate("ROMEO:", "--seed", "2").stdout


def test_repetition_penalty_defaults_from_the_run_config(workspace):
    """sample.repetition_penalty is a run default like temperature; the flag still wins."""
    from tinygpt_cli.errors import ConfigError

    path = make_run(workspace)
    state = json.loads((path / "state.json").read_text())
    state["run_config"]["sample"]["repetition_penalty"] = 1.3
    (path / "state.json").write_text(json.dumps(state))
    result = generate("ROMEO:", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["settings"]["repetition_penalty"] == 1.3
    flagged = generate("ROMEO:", "--json", "--repetition-penalty", "1")
    assert json.loads(flagged.stdout)["settings"]["repetition_penalty"] == 1.0
    with pytest.raises(ConfigError, match="sample.repetition_penalty must be a finite number more than 0"):
        resolve_config(overrides=["sample.repetition_penalty=0"])


def test_json_verbose_and_batches(run):
    result = generate("ROMEO:", "--max-new-tokens", "40", "--num-samples", "3", "--temperature", "1",
                      "--json", "--verbose", "--ignore-eot")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["prompt"] == "ROMEO:" and payload["prompt_tokens"] == 3 and payload["step"] == 1
    assert len(payload["samples"]) == 3 and {s["stop_reason"] for s in payload["samples"]} == {"length"}
    assert payload["stats"]["new_tokens"] == 40 and payload["stats"]["num_samples"] == 3
    assert payload["stats"]["window_slides"] >= 1  # 3 + 40 tokens in a 32-token context
    assert payload["stats"]["cuda_graphs"] is False and payload["stats"]["compiled"] is False
    assert payload["stats"]["graph_capture_s"] == 0
    assert payload["settings"]["stop_at_eot"] is False and payload["stats"]["tokens_per_s"] > 0
    assert "tokens/s decoding" in result.stderr and "first token after" in result.stderr
    greedy = [json.loads(generate("ROMEO: ROMEO: ROMEO:", "--max-new-tokens", "60", "--temperature", "0", "--json",
                                  "--verbose", flag).stdout) for flag in ("--lookahead", "--no-lookahead")]
    assert greedy[0]["samples"] == greedy[1]["samples"] and greedy[1]["stats"]["model_passes"] == 0
    assert 0 < greedy[0]["stats"]["model_passes"] <= 60 and greedy[0]["settings"]["lookahead"] is True
    # the mode that ran, not the flag as given (audit: null where it was left to the default)
    assert payload["settings"]["lookahead"] is False and greedy[1]["settings"]["lookahead"] is False
    default = json.loads(generate("ROMEO:", "--max-new-tokens", "5", "--json").stdout)
    assert default["settings"]["lookahead"] is True  # one sample on a CPU
    blocks = generate("ROMEO:", "--max-new-tokens", "5", "--num-samples", "3", "--temperature", "1")
    assert blocks.stdout.count("ROMEO:") == 3 and "--- sample 3 ---" in blocks.stdout


def test_stop_strings_and_end_of_text(workspace, run):
    full = json.loads(generate("ROMEO:", "--max-new-tokens", "30", "--temperature", "1", "--json").stdout)
    text = full["samples"][0]["text"]
    stop = text[4:7]
    cut = json.loads(generate("ROMEO:", "--max-new-tokens", "30", "--temperature", "1", "--json",
                              "--stop", "never-there", "--stop", stop).stdout)
    assert cut["samples"][0] == {"text": text[: text.index(stop)], "tokens": cut["samples"][0]["tokens"],
                                 "stop_reason": "stop"}
    plain = generate("ROMEO:", "--max-new-tokens", "30", "--temperature", "1", "--stop", stop)
    assert plain.stdout == "ROMEO:" + text[: text.index(stop)] + "\n"
    make_run(workspace, "eot", eot=True)
    ended = generate("Hi", "--run", "eot")
    assert ended.exit_code == 0 and ended.stdout == "Hi\n"
    going_on = generate("Hi", "--run", "eot", "--ignore-eot", "--max-new-tokens", "2")
    assert going_on.stdout == "Hi<|endoftext|><|endoftext|>\n"


def test_prompt_from_a_file_stdin_or_nothing(run, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("JULIET:\nO Romeo", encoding="utf-8")
    from_file = generate("--prompt-file", str(prompt))
    assert from_file.exit_code == 0, from_file.output
    assert from_file.stdout.startswith("JULIET:\nO Romeo")
    assert generate("--prompt-file", "-", input="JULIET:\nO Romeo").stdout == from_file.stdout
    assert generate(input="JULIET:\nO Romeo").stdout == from_file.stdout  # piped stdin is the prompt
    fresh = generate(input="")
    assert fresh.exit_code == 0 and len(fresh.stdout) > 1  # nothing piped: a fresh document
    assert generate("").stdout == fresh.stdout


def test_interactive_prompt_loop(run, monkeypatch):
    """stdout here is not a terminal (`> out.jsonl`): it gets the answers only, the "> " prompts go to stderr. A
    prompt that fails is an error line, and the loop goes on; one longer than the context goes on from its end."""
    from tinygpt_cli import sample
    from tinygpt_cli.errors import GenerationError

    monkeypatch.setattr(cli, "_stdin_is_interactive", lambda: True)
    real = sample.sample_text

    def failing(model, prompt, *args, **kwargs):
        if prompt == "FAIL":
            raise GenerationError("that prompt failed")
        return real(model, prompt, *args, **kwargs)

    monkeypatch.setattr(sample, "sample_text", failing)
    result = generate("--max-new-tokens", "4", "--json", input="ROMEO:\n\nFAIL\n" + "word " * 40 + "\nJULIET:\n")
    assert result.exit_code == 0, result.output
    assert "Ctrl-D leaves" in result.stderr and result.stderr.count("> ") >= 5
    answers = [json.loads(line) for line in result.stdout.splitlines()]  # every line is JSON
    assert [answer["prompt"] for answer in answers] == ["ROMEO:", "word " * 40, "JULIET:"]  # no empty line
    assert answers[2]["settings"]["seed"] == answers[0]["settings"]["seed"] + 3  # the failed prompt had a turn
    assert "error: that prompt failed" in result.stderr
    assert (answers[1]["prompt_tokens"], answers[1]["prompt_tokens_dropped"]) == (32, 9)  # "word", 39 " word", " "
    assert "the prompt is 41 tokens, more than the model's context: it went on from the last 32" in result.stderr
    # stdout a file: each sample goes there after its prompt (audit: the file held bare continuations, run together
    # with nothing to tell which prompt they answered); the "> " prompts stay on the terminal
    text = generate("--max-new-tokens", "4", input="ROMEO:\nJULIET:\n")
    assert text.exit_code == 0 and "> " not in text.stdout
    assert text.stdout.startswith("ROMEO:") and "\nJULIET:" in text.stdout


def test_a_sample_cut_short_ends_its_line_in_the_output(run, monkeypatch):
    """With stdout redirected, Ctrl-C's line break went to stderr and the next sample ran into the cut one."""
    import sys

    monkeypatch.setattr(cli, "_stdin_is_interactive", lambda: True)
    calls = {"n": 0}

    def once(self, text, seed, echo_prompt):
        calls["n"] += 1
        sys.stdout.write(f"sample-{calls['n']}")
        if calls["n"] == 1:
            raise KeyboardInterrupt  # the user cuts the first sample short
        sys.stdout.write("\n")

    monkeypatch.setattr(cli._GenerateView, "once", once)
    result = generate(input="first\nsecond\n")
    assert result.exit_code == 0 and result.stdout == "sample-1\nsample-2\n"


def test_from_a_checkpoint_folder_past_the_context_and_in_bf16(run):
    result = generate("ROMEO:", "--run", str(run), "--max-new-tokens", "80", "--dtype", "bf16", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["stats"]["dtype"] == "bfloat16" and payload["stats"]["new_tokens"] == 80
    assert payload["checkpoint"] == str(run)
    from tinygpt_cli.sample import load_model

    loaded = load_model(str(run), "cpu", "fp32")  # on CPU the weights are laid out for decoding
    assert not loaded.model.training and loaded.model.transformer.h[0].attn.c_attn.weight.stride() == (1, 96)


def test_compile_on_cpu_falls_back_or_compiles(run, monkeypatch):
    from tinygpt_cli import sample

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setitem(sample._COMPILED_STEPS, "default", broken)
    result = generate("ROMEO:", "--compile", "on", "--max-new-tokens", "5")
    assert result.exit_code == 0, result.output
    assert "torch.compile unavailable (RuntimeError: no C++ compiler; install a C and C++ compiler " \
           "(gcc/g++, clang), or point CC/CXX at one): decoded eagerly." in result.stderr


@pytest.mark.parametrize("asked", [["--fused"], [], ["--no-fused"]])
def test_fused_kernels_that_fail_fall_back_with_a_warning(run, monkeypatch, asked):
    """As on a GPU whose Triton cannot build the kernels: the first step falls back to eager PyTorch, said once.
    Where they would run, they are the default; --no-fused leaves them out."""
    from tinygpt_cli import kernels, sample

    def broken(*args):
        raise RuntimeError("PTX for sm_70 is not supported")

    monkeypatch.setattr(sample, "check_fused", lambda *args, **kwargs: None)  # let it try on this CPU
    monkeypatch.setattr(sample, "fused_by_default", lambda device, compile=False, lookahead=None: True)  # a GPU
    monkeypatch.setattr(kernels, "unavailable", lambda device: None)
    monkeypatch.setattr(kernels.FusedDecodeStep, "__init__", lambda self, model, batch: None)
    monkeypatch.setattr(kernels.FusedDecodeStep, "__call__", broken)
    result = generate("ROMEO:", *asked, "--max-new-tokens", "5", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stats"]["fused"] is False
    tried = asked != ["--no-fused"]
    assert ("fused decode kernels" in result.stderr) == tried
    assert result.stderr.count("the fused decode kernels failed (RuntimeError: PTX for sm_70 is not supported): "
                               "decoded eagerly.") == tried
    assert ("--no-fused skips them." in result.stderr) == (asked == [])  # the way out, where they were not asked for


@pytest.mark.parametrize(("fused", "compile_mode", "lookahead", "tokens", "samples", "plan"), [
    (None, "auto", None, 100, 1, (True, False)),  # the default on a GPU that runs them
    (None, "auto", None, 60_000, 1, (True, False)),  # not compiled as well: the fused step replaces that
    (False, "auto", None, 60_000, 1, (False, True)),  # without them, a long run compiles, as before
    (False, "auto", None, 100, 1, (False, False)),
    (None, "on", None, 100, 1, (False, True)),  # --compile on: the compiled step, and no error
    (None, "off", None, 100, 4, (True, False)),
    (None, "auto", True, 100, 1, (False, False)),  # --lookahead: PyTorch's step, and no error
    (None, "auto", False, 100, 1, (True, False)),
    (True, "off", None, 100, 1, (True, False)),
])
def test_the_decode_plan_on_a_gpu(monkeypatch, fused, compile_mode, lookahead, tokens, samples, plan):
    """Which decode step `generate` takes on CUDA for each combination of --fused, --compile and --lookahead
    (a GPU faked: the decision reads only the device type, its capability and whether Triton runs)."""
    from tinygpt_cli import cli, kernels

    monkeypatch.setattr(kernels, "unavailable", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert cli._decode_plan(torch.device("cuda"), fused, compile_mode, lookahead, tokens, samples) == plan
    on_cpu = (False, compile_mode == "on")  # never the fused kernels; compiled only when asked
    assert cli._decode_plan(torch.device("cpu"), None, compile_mode, lookahead, tokens, samples) == on_cpu
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: PyTorch's step
    assert cli._decode_plan(torch.device("cuda"), None, "auto", None, 100, 1) == (False, False)
    assert cli._decode_plan(torch.device("cuda"), True, "auto", None, 100, 1) == (True, False)  # --fused: tried


def test_both_fallbacks_are_reported(run, monkeypatch):
    """A step that cannot compile and graphs that cannot be captured: each gets its one line on stderr."""
    from tinygpt_cli import sample

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    real = sample.generate

    def failing_graphs(*args, stats=None, **kwargs):
        stats.graph_error = "RuntimeError: capture failed"
        yield from real(*args, stats=stats, **kwargs)

    monkeypatch.setitem(sample._COMPILED_STEPS, "default", broken)
    monkeypatch.setattr(sample, "generate", failing_graphs)
    result = generate("ROMEO:", "--compile", "on", "--max-new-tokens", "5", "-v")
    assert result.exit_code == 0, result.output
    assert "torch.compile unavailable (RuntimeError: no C++ compiler; install a C and C++ compiler " \
           "(gcc/g++, clang), or point CC/CXX at one): decoded eagerly." in result.stderr
    assert "CUDA graphs unavailable (RuntimeError: capture failed): decoded step by step." in result.stderr
    assert "CUDA graphs" not in result.stderr.replace("CUDA graphs unavailable", "")  # -v: none were used


@pytest.mark.parametrize(("args", "fragment"), [
    (["--temperature", "-1"], "--temperature"),
    (["--top-k", "-1"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--num-samples", "0"], "--num-samples"),
    (["--stop", ""], "--stop needs a non-empty text"),
    (["--seed", str(2**64)], "--seed must be 0 to"),  # a traceback after the prompt was echoed (audit)
    (["--seed", "-1"], "--seed must be 0 to"),
    (["--temperature", "inf"], "--temperature must be at most 1e+06"),  # top-k kept every token (audit)
    (["--temperature", "nan"], "--temperature must be a number"),  # QA: "must be 0 or more (got nan)"
    (["--dtype", "fp8"], "--dtype must be one of"),
    (["--dtype", "fp16"], "fp16 is not supported on CPU"),
    (["--compile", "maybe"], "--compile must be one of"),
    (["--prompt-file", "missing.txt"], "missing.txt does not exist"),
    (["--run", "nope"], " at nope"),
    (["--run", "tiny1"], " at tiny1 (did you mean tiny?)"),  # QA: runs rm had the suggestion, generate not
    (["--num-samples", "1000000000"], "ask for fewer samples"),
    (["--lookahead", "--num-samples", "2"], "--lookahead works for one sample: drop --num-samples"),
    (["--lookahead", "--compile", "on"], "--lookahead needs the uncompiled decode step: add --compile off"),
    (["--fused", "--compile", "on"], "--fused replaces the compiled decode step: drop --compile on or --fused"),
    (["--fused", "--lookahead"], "--fused decodes one token a step: drop --lookahead or --fused"),
    (["--fused"], "the fused decode kernels cannot run here ("),  # CPU; or no Triton
    (["--fused"], "): generate without them (drop --fused"),  # QA: it said what, not what to do
])
def test_bad_input_is_one_line(run, args, fragment):
    result = generate("x", *args) if "--prompt-file" not in args else generate(*args)
    assert_one_line_error(result, fragment)
    assert result.stdout == ""  # not even the prompt


def test_the_interactive_loops_seed_wraps_past_the_largest(run, monkeypatch):
    """QA: started at the largest seed, the loop's second prompt failed with a seed the user never typed."""
    from tinygpt_cli.config import MAX_SEED

    monkeypatch.setattr(cli, "_stdin_is_interactive", lambda: True)
    result = generate("--max-new-tokens", "2", "--json", "--seed", str(MAX_SEED), input="ROMEO:\nJULIET:\n")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["settings"]["seed"] for line in result.stdout.splitlines()] == [MAX_SEED, 0]


def test_an_empty_run_is_refused_not_taken_for_the_latest(run):
    """QA: `--run ""` (a script's unset variable) sampled from the latest run without a word; `eval ""` too."""
    assert_one_line_error(generate("x", "--run", ""), "--run", code=2)
    assert_one_line_error(invoke("eval", " "), "is empty: name a run", code=2)
    assert_one_line_error(invoke("eval", "--split", ""), "--split", code=2)  # QA: it meant val without a word


def test_bad_prompt_input(run, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    assert_one_line_error(generate("--prompt-file", str(latin)), "is not UTF-8 text")
    assert_one_line_error(generate("x", "--prompt-file", str(latin)), "not both")
    too_long = generate("word " * 40, "--max-new-tokens", "3", "--temperature", "0")  # continued from its end
    assert too_long.exit_code == 0 and too_long.stdout.startswith("word " * 40), too_long.output
    end = " word" * 31 + " "  # its last 32 tokens, alone
    cut = generate(end, "--max-new-tokens", "3", "--temperature", "0")
    assert too_long.stdout.removeprefix("word " * 40) == cut.stdout.removeprefix(end)
    assert "more than the model's context: it went on from the last 32" in too_long.stderr
    assert_one_line_error(generate(input=b"caf\xe9 au lait"), "standard input is not UTF-8 text")
    assert_one_line_error(generate("--prompt-file", "-", input=b"\xff\xfa"), "standard input is not UTF-8 text")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_a_gpu(run):
    assert_one_line_error(generate("x", "--device", "cuda"), "no CUDA GPU is visible")


def test_no_run_at_all(workspace):
    assert_one_line_error(invoke("generate", "hi"), "no trained run")


def test_a_run_whose_checkpoints_lost_their_weights_is_not_called_untrained(run):
    """Its only checkpoint's model.safetensors deleted (a cleanup, a full disk's copy), a run was said to hold 'no
    checkpoint yet: train it' (audit): it names the incomplete checkpoint and what it lacks."""
    (run / "model.safetensors").unlink()
    assert_one_line_error(generate("hi", "--run", "tiny"),
                          "no complete checkpoint: checkpoints/step_1 lacks model.safetensors")


@pytest.mark.gpu
def test_generate_on_cuda_with_the_fused_kernels(run):
    """The default on CUDA: the tokens of the PyTorch step in fp32, greedy and sampled."""
    for sampling in (("--temperature", "0"), ("--temperature", "0.9", "--top-k", "20", "--seed", "3")):
        asked = ("ROMEO:", "--device", "cuda", "--dtype", "fp32", "--max-new-tokens", "40", "--json", *sampling)
        result = generate(*asked)
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert payload["stats"]["fused"] and payload["stats"]["cuda_graphs"] and not payload["stats"]["compiled"]
        assert 0 < payload["stats"]["graph_capture_s"] < 30
        assert "fused decode kernels" in result.stderr and "failed" not in result.stderr
        plain = generate(*asked, "--no-fused")
        assert not json.loads(plain.stdout)["stats"]["fused"] and "fused" not in plain.stderr
        assert payload["samples"] == json.loads(plain.stdout)["samples"]


@pytest.mark.gpu
def test_generate_on_cuda_compiled_in_bf16(run):
    """--compile on compiles (and leaves the fused kernels out); auto does not, but uses the fused kernels; either
    way steps replay as CUDA graphs."""
    for mode in ("on", "auto"):
        result = generate("ROMEO:", "--device", "cuda", "--max-new-tokens", "50", "--json", "--temperature", "0",
                          "--compile", mode)
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert payload["stats"]["compiled"] == (mode == "on") and payload["stats"]["dtype"] in ("bfloat16", "float16")
        assert payload["stats"]["fused"] == (mode == "auto")
        assert payload["stats"]["cuda_graphs"]


def test_piped_stdin_is_read_before_the_model_is_loaded(workspace):
    """Bad stdin is said at once, not after loading a model (minutes for a large one): here there is none."""
    result = generate(input=b"caf\xe9")
    assert_one_line_error(result, "standard input is not UTF-8 text")
    assert "Sampling from" not in result.output


def test_prompts_that_are_not_utf8_are_one_line_each(run, monkeypatch):
    """Audit: a prompt argument with bytes that are not UTF-8 (kept by Python as lone surrogates) reached stdout
    as the raw bytes, or failed with a traceback writing them; in the prompt loop such a line ended the session
    with a traceback. An argument is refused before the model loads; in the loop the line is, and the loop goes
    on. So does a Ctrl-C at the prompt, as at Python's own (Ctrl-D leaves)."""

    assert_one_line_error(generate("ab\udcffcd", "--run", "nosuch"), "the prompt is not UTF-8 text: set the "
                          "terminal to UTF-8, or convert the text (iconv -t utf-8) into a --prompt-file")
    assert_one_line_error(generate("ab", "--stop", "\udcff", "--run", "nosuch"), "--stop is not UTF-8 text")
    _typed_at_the_prompt(monkeypatch, KeyboardInterrupt(),
                         UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), "ab\udcff", "ROMEO:",
                         EOFError())
    result = generate("--max-new-tokens", "4", "--json")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["prompt"] for line in result.stdout.splitlines()] == ["ROMEO:"]
    assert result.stderr.count("error: that line is not UTF-8 text: set the terminal to UTF-8") == 2


def test_a_sample_cut_short_leaves_json_lines_whole(run, monkeypatch):
    """Audit: Ctrl-C during a sample in the loop wrote a bare line break to stdout, so `--json > out.jsonl` got a
    blank line among its JSON ones. Only a streamed sample's line is ended there."""
    monkeypatch.setattr(cli, "_stdin_is_interactive", lambda: True)
    calls = {"n": 0}

    def once(self, text, seed, echo_prompt):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt  # cut short before its JSON line was printed
        print(json.dumps({"prompt": text}))

    monkeypatch.setattr(cli._GenerateView, "once", once)
    result = generate("--json", input="first\nsecond\n")
    assert result.exit_code == 0 and result.stdout == '{"prompt": "second"}\n'


def test_settings_are_checked_before_the_model_loads_and_stats_show_under_quiet(run):
    """Audit: a bad --temperature waited for the checkpoint to load (minutes for a large one) before it was said;
    `--quiet generate -v` printed no stats, which -v asks for."""
    assert_one_line_error(generate("hi", "--temperature", "-1", "--run", "nosuch"), "--temperature must be 0")
    quiet = cli_invoke("--quiet", "generate", "ROMEO:", "--max-new-tokens", "3", "-v")
    assert quiet.exit_code == 0 and "tokens/s decoding" in quiet.stderr and "Sampling from" not in quiet.stderr


def test_closed_standard_streams_are_no_traceback(run, workspace):
    """Audit: `generate <&-` (no prompt, stdin closed) and `generate "Hi" >&-` failed with AttributeError on None.
    A closed stdin reads as empty (a fresh document, as </dev/null), a closed stdout discards."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TINYGPT_HOME": str(workspace)}
    for args, closed in (([], 0), (["Hi"], 1)):
        done = subprocess.run([sys.executable, "-m", "tinygpt_cli", "generate", *args, "--max-new-tokens", "3"],
                              env=env, capture_output=closed == 0, text=True, timeout=120,
                              pass_fds=(), preexec_fn=lambda fd=closed: os.close(fd))
        assert done.returncode == 0, done.stderr


def test_a_reader_that_goes_away_ends_generate_as_sigpipe_would_not_as_an_error(run, workspace):
    """Audit: `generate ... | head -c 10` exited 1, the code of an error, so `set -o pipefail` scripts took it for
    one. It now exits 141 (128 + SIGPIPE, as `yes | head` does), quietly."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TINYGPT_HOME": str(workspace)}
    process = subprocess.Popen([sys.executable, "-m", "tinygpt_cli", "generate", "Hi", "--max-new-tokens", "400",
                                "--ignore-eot", "--temperature", "1", "--num-samples", "40"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.read(5)
    process.stdout.close()  # the reader goes away with most of the text still to come
    _, err = process.communicate(timeout=300)
    assert process.returncode == 141, err
    assert "Traceback" not in err and "error" not in err.lower()


def test_ctrl_c_prints_what_a_batch_or_json_had_made_marked_interrupted(run, monkeypatch):
    """Audit: Ctrl-C with --json or --num-samples 2 printed nothing at all, where a streamed sample keeps what it
    showed: what the samples had is printed, each not ended then marked "interrupted", and the exit is 130."""
    from tinygpt_cli import sample

    original, pushes = sample.TextStream.push, []

    def push(self, data):
        pushes.append(1)
        if len(pushes) == 9:
            raise KeyboardInterrupt
        return original(self, data)

    monkeypatch.setattr(sample.TextStream, "push", push)
    args = ("ROMEO:", "--max-new-tokens", "30", "--num-samples", "2", "--ignore-eot", "--temperature", "0")
    result = generate(*args, "--json")
    assert result.exit_code == 130, result.output
    payload = json.loads(result.stdout)
    assert [s["stop_reason"] for s in payload["samples"]] == ["interrupted", "interrupted"]
    assert [s["tokens"] for s in payload["samples"]] == [5, 4] and payload["samples"][0]["text"]
    pushes.clear()
    blocks = generate(*args)
    assert blocks.exit_code == 130
    assert blocks.stdout.startswith("--- sample 1 ---\nROMEO:") and "\n--- sample 2 ---\nROMEO:" in blocks.stdout
    with pytest.raises(KeyboardInterrupt) as caught:  # the library still raises it, with the result so far
        pushes.clear()
        sample.sample_text(sample.load_model(str(run), "cpu", "fp32").model, "ROMEO:", 30, num_samples=2,
                           stop_at_eot=False, temperature=0)
    assert [s.stop_reason for s in caught.value.partial.samples] == ["interrupted", "interrupted"]


def test_utf8_prompts_read_under_a_c_locale_are_recovered(run, monkeypatch):
    """Terminal audit: under LANG=C (a bare ssh or cron environment; PYTHONUTF8=0) Python keeps a UTF-8 argument's
    bytes as lone surrogates, and `generate "café"` was refused as "not UTF-8 text", which it was. The bytes are
    the UTF-8 they were, in the argument, in --stop and in the prompt loop."""

    result = generate("caf\udcc3\udca9", "--stop", "\udce2\udc9c\udc93", "--max-new-tokens", "2", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["prompt"] == "café"
    _typed_at_the_prompt(monkeypatch, "na\udcc3\udcafve", EOFError())
    looped = generate("--max-new-tokens", "2", "--json")
    assert looped.exit_code == 0, looped.output
    assert [json.loads(line)["prompt"] for line in looped.stdout.splitlines()] == ["naïve"]


def test_a_stdout_that_cannot_write_the_text_is_said(run):
    """Terminal audit: under an ASCII or latin-1 stdout the samples' other characters printed as '?' without a
    word. It is said once, on stderr; --json (ASCII-escaped) is not lossy and gets no note."""
    from typer.testing import CliRunner

    ascii_out = CliRunner(charset="ascii").invoke(cli.app, ["generate", "ab", "--max-new-tokens", "2"])
    assert ascii_out.exit_code == 0, ascii_out.output
    assert "note: stdout writes ascii, which lacks most of what a model can write" in ascii_out.stderr
    as_json = CliRunner(charset="ascii").invoke(cli.app, ["generate", "ab", "--max-new-tokens", "2", "--json"])
    assert as_json.exit_code == 0 and "note: stdout" not in as_json.stderr
    assert "note: stdout" not in generate("ab", "--max-new-tokens", "2").stderr


def test_run_and_model_together_are_refused(workspace):
    """HF QA: `generate --run r1 --model DIR` sampled from DIR in silence (one option of two names: the last won);
    `eval` refuses both."""
    assert_one_line_error(invoke("generate", "hi", "--run", "r1", "--model", "gpt2"),
                          "--run (or --model) given 2 times (r1, gpt2): name one model")
