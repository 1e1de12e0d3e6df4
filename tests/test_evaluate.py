"""`tinygpt eval`: loss / perplexity / bits per byte on token files, and HellaSwag on a local fixture."""

import errno
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_generate_cli import cli_invoke, make_run

from conftest import assert_one_line_error
from tinygpt_cli.config import ModelConfig
from tinygpt_cli.errors import TinyGPTError
from tinygpt_cli.evaluation import Example, score_examples, score_tokens, token_nats, window_starts
from tinygpt_cli.model import GPT
from tinygpt_cli.tokenizer import EOT_ID, get_encoding

# Made-up examples in HellaSwag's schema (the hub's copy stores the label as a string).
HELLASWAG_ROWS = [
    {"ind": 1, "activity_label": "Baking", "ctx_a": "A man puts flour in a bowl.", "ctx_b": "he",
     "ctx": "A man puts flour in a bowl. He", "endings": [
         "adds two eggs and stirs.", "drives the bowl to work.", "sings to the flour loudly.", "paints the oven."],
     "source_id": "made-up~1", "split": "val", "split_type": "indomain", "label": "0"},
    {"ind": 2, "activity_label": "Running", "ctx_a": "A woman ties her shoes.", "ctx_b": "she",
     "ctx": "A woman ties her shoes. She", "endings": [
         "eats the shoes.", "starts to run along the river.", "falls asleep on the laces.", "buys a boat."],
     "source_id": "made-up~2", "split": "val", "split_type": "indomain", "label": "1"},
    {"ind": 3, "activity_label": "Painting", "ctx_a": "Two kids open a can of paint.", "ctx_b": "they",
     "ctx": "Two kids open a can of paint. They", "endings": [
         "drink it.", "throw it at the moon.", "dip brushes in it and paint a fence.", "lock it in a safe."],
     "source_id": "made-up~3", "split": "val", "split_type": "zeroshot", "label": 2},
    {"ind": 4, "activity_label": "Cooking", "ctx_a": "The cook heats oil in a pan.", "ctx_b": "",
     "ctx": "The cook heats oil in a pan.", "endings": [
         "The pan flies away.", "He reads the oil a story.", "The oil freezes solid.", "He adds sliced onions."],
     "source_id": "made-up~4", "split": "val", "split_type": "zeroshot", "label": "3"},
]


# Passages in LAMBADA's schema (the hub's copy: one `text` each, its last word the target).
LAMBADA_ROWS = [
    {"text": "She opened the door and called for the dog. After a minute the dog came running to the"},
    {"text": "He poured the tea and said that the tea was too hot to drink, so she waited for the tea"},
    {"text": "The ship left the harbour at dawn. By noon the sailors could no longer see the harbour"},
    {"text": "Ça va? She said it again, smiling: ça va, ça va, naïve"},
]


# Made-up questions in AI2 ARC's schema: labels A-E or 1-4, three to five choices.
ARC_ROWS = [
    {"id": "q1", "question": "Which of these is a source of light?",
     "choices": {"text": ["a rock", "the Sun", "a shadow", "a puddle"], "label": ["A", "B", "C", "D"]},
     "answerKey": "B"},
    {"id": "q2", "question": "What do plants need to make food?",
     "choices": {"text": ["sunlight", "sand", "noise"], "label": ["A", "B", "C"]}, "answerKey": "A"},
    {"id": "q3", "question": "Water freezes at what temperature in degrees Celsius?",
     "choices": {"text": ["100", "50", "0", "-40"], "label": ["1", "2", "3", "4"]}, "answerKey": "3"},
    {"id": "q4", "question": "Which tool measures mass?",
     "choices": {"text": ["a ruler", "a balance", "a thermometer", "a clock", "a compass"],
                 "label": ["A", "B", "C", "D", "E"]}, "answerKey": "B"},
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()


@pytest.fixture
def hellaswag_file(tmp_path):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS), encoding="utf-8")
    return path


@pytest.fixture
def arc_file(tmp_path):
    path = tmp_path / "arc_easy_test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ARC_ROWS), encoding="utf-8")
    return path


@pytest.fixture
def lambada_file(tmp_path):
    path = tmp_path / "lambada_test.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in LAMBADA_ROWS), encoding="utf-8")
    return path


def evaluate(*args):
    return cli_invoke("eval", *args)


# ------------------------------------------------------------------------------------------------ the math
def test_window_starts():
    assert window_starts(10, 4, None) == [(0, 4), (4, 4), (8, 1)]  # the whole split: every token but the first
    assert window_starts(9, 4, None) == [(0, 4), (4, 4)]
    assert window_starts(101, 10, 30) == [(0, 10), (30, 10), (60, 10)]  # evenly spaced, deterministic
    assert window_starts(3, 8, 1000) == [(0, 2)]


def test_token_nats_is_cross_entropy(model):
    x = torch.randint(0, 50257, (2, 20))
    y = torch.randint(0, 50257, (2, 20))
    y[1, :5] = -1
    logits, _ = model(x)
    logits = logits[..., :50257]  # over GPT-2's vocabulary: the padded rows are never sampled nor exported
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="none").view(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(token_nats(model, x, y), expected, rtol=1e-5, atol=1e-5)
        padded = GPT(model.config).eval()
        padded.load_state_dict(model.state_dict())
        padded.lm_head.weight[50257:] = padded.lm_head.weight[:47] * 3  # rows that would take probability
        torch.testing.assert_close(token_nats(padded, x, y), expected, rtol=1e-5, atol=1e-5)


def test_score_tokens_loss_and_bits_per_byte(model):
    encoding = get_encoding()
    ids = encoding.encode_ordinary("To be, or not to be: that is the question. Ça va? 日本語 😀 ") * 6
    tokens = np.array([*ids[:40], EOT_ID, *ids[40:]], dtype=np.uint16)
    score = score_tokens(model, tokens, max_tokens=None)
    assert score.tokens == len(tokens) - 1 and score.windows == math.ceil((len(tokens) - 1) / 32)
    targets = [int(t) for t in tokens[1:]]
    text = [t for t in targets if t != EOT_ID]
    assert score.text_bytes == len(encoding.decode_bytes(text))
    nats = []
    with torch.no_grad():
        for start, length in window_starts(len(tokens), 32, None):
            window = torch.from_numpy(tokens[start : start + length + 1].astype(np.int64))[None]
            logits, _ = model(window[:, :-1])
            nats += F.cross_entropy(logits[0, :, :50257], window[0, 1:], reduction="none").tolist()
    assert score.nats == pytest.approx(sum(nats), rel=1e-5)
    text_nats = sum(n for n, t in zip(nats, targets, strict=True) if t != EOT_ID)
    assert score.text_nats == pytest.approx(text_nats, rel=1e-5)
    budget = score_tokens(model, tokens, max_tokens=64)
    assert budget.tokens == 64 and budget.windows == 2


def _reference_hellaswag(model, examples, per_character=False):
    """Straightforward: one full forward per ending, log-softmax, sum / mean over the ending's tokens (or, as
    lm-evaluation-harness's acc_norm, over its characters)."""
    encoding = get_encoding()
    correct = correct_norm = 0
    for example in examples:
        totals, means = [], []
        for ending in example.endings:
            context, tail = encoding.encode_ordinary(example.context), encoding.encode_ordinary(" " + ending)
            sequence = torch.tensor(context + tail)[None, -(model.config.block_size + 1):]  # cut from the left
            scored = min(len(tail), sequence.shape[1] - 1)
            with torch.no_grad():
                logits, _ = model(sequence[:, :-1])
            log_probs = torch.log_softmax(logits[0], dim=-1).gather(1, sequence[0, 1:, None]).squeeze(1)
            nats = -log_probs[-scored:].sum().item()
            totals.append(nats)
            means.append(nats / (len(ending) if per_character else scored))
        correct += int(np.argmin(totals) == example.label)
        correct_norm += int(np.argmin(means) == example.label)
    return correct / len(examples), correct_norm / len(examples)


def test_hellaswag_scoring_matches_a_reference(model):
    from tinygpt_cli.evaluation import _hellaswag_example

    examples = [_hellaswag_example(row, "test") for row in HELLASWAG_ROWS] * 3
    examples += [Example("Some words", ("one", "two two", "three three three"), label) for label in range(3)]
    assert score_examples(model, examples, batch_size=3) == pytest.approx(_reference_hellaswag(model, examples))
    # longer than the context (32): cut from the left, so that the endings are what is scored (a test that took any
    # accuracy let a cut from the right pass, which scores the context alike for every ending)
    words = get_encoding().decode(list(range(1000, 1400))).split()
    long = [Example(" ".join(words[i * 9 : i * 9 + 40]), tuple(" ".join(words[i * 7 + j * 3 : i * 7 + j * 3 + 2 + j])
                                                              for j in range(4)), i % 4) for i in range(12)]
    reference = _reference_hellaswag(model, long)
    assert score_examples(model, long, batch_size=5) == pytest.approx(reference)
    assert reference != (0.25, 0.25)  # where every ending scored alike, the first (label 0) would be chosen


# ------------------------------------------------------------------------------------------------ the command
def test_eval_loss_records_and_is_deterministic(with_shakespeare, workspace):
    make_run(workspace)
    result = evaluate("--tokens", "2000")
    assert result.exit_code == 0, result.output
    assert "shakespeare/val: loss" in result.stdout and "bits/byte on 2,016 tokens" in result.stdout
    assert "Evaluating" in result.stderr and "Recorded in" in result.stderr
    payload = json.loads(evaluate("tiny", "--tokens", "2000", "--json").stdout)
    assert payload["tokens"] == 2016 and payload["windows"] == 63 and payload["window_tokens"] == 32
    assert payload["loss"] == pytest.approx(math.log(payload["perplexity"]))
    assert 8 < payload["loss"] < 13 and 0 < payload["bits_per_byte"] < 10  # a random model: about ln(50304)
    run_dir = workspace / "runs" / "tiny"
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert len(records) == 2 and records[0]["loss"] == records[1]["loss"] == payload["loss"]
    assert records[0]["kind"] == "loss" and records[0]["step"] == 1 and records[0]["dataset"] == "shakespeare"
    report = (run_dir / "report.md").read_text()
    assert report.startswith("# Run tiny") and report.count("## Evaluation: loss on shakespeare/val") == 2
    train_split = json.loads(evaluate("--split", "train", "--tokens", "100", "--json").stdout)
    assert train_split["split"] == "train" and train_split["tokens"] == 128


def test_two_evals_racing_to_make_a_report_title_it_once(tmp_path, monkeypatch):
    """Two evals of one run that finish together both found no report.md and both wrote its title. The title now
    goes with the write that creates the file (an exclusive create); the other appends its section only."""
    from pathlib import Path

    from tinygpt_cli import evaluation as module

    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoints" / "step_000001").mkdir(parents=True)
    result = module.LossResult(checkpoint=str(run_dir / "checkpoints" / "step_000001"), step=1, dataset="d",
                               split="val", tokens=10, text_bytes=40, windows=1, window_tokens=32, loss=1.0,
                               perplexity=math.e, bits_per_byte=0.5, seconds=1.0, device="cpu", dtype="fp32")
    report = run_dir / "report.md"
    real_exists = Path.exists
    # the other eval makes the file after this one looked for it (as if looking came first)
    monkeypatch.setattr(Path, "exists", lambda self: False if self == report else real_exists(self))
    for _ in range(2):
        module.record_result(run_dir / "checkpoints" / "step_000001", result)
    text = report.read_text()
    assert text.startswith("# Run tiny\n") and text.count("# Run tiny") == 1
    assert text.count("## Evaluation: loss on d/val") == 2


def test_a_stop_while_recording_waits_for_both_files(tmp_path, monkeypatch):
    """A stop between the eval.jsonl append and the report.md one left a result in one and not the other (audit):
    the stop now waits for both, and the finished evaluation is not lost."""
    import os
    import signal

    from tinygpt_cli import evaluation as module

    run_dir = tmp_path / "runs" / "tiny"
    (run_dir / "checkpoints" / "step_000001").mkdir(parents=True)
    result = module.LossResult(checkpoint=str(run_dir / "checkpoints" / "step_000001"), step=1, dataset="d",
                               split="val", tokens=10, text_bytes=40, windows=1, window_tokens=32, loss=1.0,
                               perplexity=math.e, bits_per_byte=0.5, seconds=1.0, device="cpu", dtype="fp32")
    real = module._append

    def append_then_stop(path, text, **kwargs):
        real(path, text, **kwargs)
        if path.name == "eval.jsonl":
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C right between the two

    monkeypatch.setattr(module, "_append", append_then_stop)
    # Ctrl-C as an interactive Python takes it (a process started in the background of a shell ignores SIGINT)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:  # then the stop: a caller's loop of evaluations ends
            module.record_result(run_dir / "checkpoints" / "step_000001", result)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.recorded_in == run_dir
    assert len((run_dir / "eval.jsonl").read_text().splitlines()) == 1
    assert (run_dir / "report.md").read_text().count("## Evaluation: loss on d/val") == 1


def test_eval_that_cannot_be_recorded_stops_before_scoring(with_shakespeare, workspace, hellaswag_file):
    """A run folder eval cannot append to was found out only after scoring, and the result was lost (audit);
    --no-record scores without writing."""
    make_run(workspace)
    run_dir = workspace / "runs" / "tiny"
    (run_dir / "eval.jsonl").mkdir()  # unwritable as a file, whoever runs the test
    for args in (("--tokens", "64"), ("--task", "hellaswag", "--task-data", str(hellaswag_file))):
        result = evaluate(*args)
        assert_one_line_error(result, "cannot record the result in")
        assert "--no-record" in result.stderr and "Evaluating" not in result.stderr
        quiet = evaluate(*args, "--no-record", "--json")
        assert quiet.exit_code == 0, quiet.output
        assert json.loads(quiet.stdout)["recorded_in"] is None
    assert not (run_dir / "report.md").exists() and list((run_dir / "eval.jsonl").iterdir()) == []


def test_eval_into_a_read_only_run_folder_stops_before_scoring(with_shakespeare, workspace, monkeypatch):
    """With eval.jsonl and report.md writable but their folder not, the check passed and the record failed after
    scoring: report.md's lock is a file made in the folder (a root user bypasses chmod, so os.access is faked)."""
    make_run(workspace)
    run_dir = workspace / "runs" / "tiny"
    evaluate("--tokens", "64")  # both files exist now
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: False if Path(path) == run_dir else real(path, mode))
    result = evaluate("--tokens", "64")
    assert_one_line_error(result, "cannot record the result in")
    assert "the folder is not writable" in result.stderr and "--no-record" in result.stderr
    assert len((run_dir / "eval.jsonl").read_text().splitlines()) == 1


def test_eval_whose_report_lock_stays_held_says_what_to_do(with_shakespeare, workspace, monkeypatch):
    """A lock that could not be taken lost the finished score with "choose a writable TINYGPT_HOME" (review)."""
    from tinygpt_cli import report
    from tinygpt_cli import workspace as ws

    make_run(workspace)
    monkeypatch.setattr(report, "REPORT_PATIENCE_S", 0.1)
    with ws.exclusive(ws.lock_of(workspace / "runs" / "tiny" / "report.md"), "report.md"):
        result = evaluate("--tokens", "64")
    assert_one_line_error(result, "cannot record the result in")
    assert "is writing tiny/report.md" in result.stderr and "--no-record" in result.stderr


def test_eval_that_meets_a_full_disk_says_to_free_space(with_shakespeare, workspace, monkeypatch):
    """A full disk while recording said "make the run folder writable" (code review)."""
    import errno

    from tinygpt_cli import evaluation

    make_run(workspace)

    def full(path, text, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(evaluation, "_append", full)
    result = evaluate("--tokens", "64")
    assert_one_line_error(result, "cannot record the result in")
    assert "No space left on device" in result.stderr and "free some space" in result.stderr
    assert "writable" not in result.stderr


def test_eval_stopped_while_scoring_exits_130_and_records_nothing(with_shakespeare, workspace, monkeypatch):
    """Ctrl-C (or SIGTERM) during the scoring: nothing half-recorded, and the exit says so (test audit: never run)."""
    from tinygpt_cli import evaluation

    make_run(workspace)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluation, "score_tokens", interrupted)
    result = evaluate("--tokens", "64")
    assert result.exit_code == 130 and "Interrupted: nothing was recorded." in result.stderr
    assert "Traceback" not in result.output
    assert not (workspace / "runs" / "tiny" / "eval.jsonl").exists()
    assert not (workspace / "runs" / "tiny" / "report.md").exists()


def test_eval_of_a_run_whose_dataset_is_gone_or_damaged(with_shakespeare, workspace):
    """It used to score the newest other dataset and record that as the run's result (audit)."""
    make_run(workspace, dataset="shakespeare")
    other = workspace / "data" / "other"
    shutil.copytree(with_shakespeare, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "name": "other", "created": "2099-01-01T00:00:00+00:00"}))
    os.utime(other, (4e9, 4e9))  # the newest dataset, by either key `list_datasets` sorts on
    (with_shakespeare / "meta.json").write_text("{")
    assert_one_line_error(evaluate("--tokens", "64"), "meta.json")
    shutil.rmtree(with_shakespeare)
    assert_one_line_error(evaluate("--tokens", "64"), "the run trained on data/shakespeare, which is not in this "
                                                      "workspace: tokenize it again")
    assert not (workspace / "runs" / "tiny" / "eval.jsonl").exists()
    result = evaluate("--tokens", "64", "--data", "other", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["dataset"] == "other", result.output


def test_eval_records_after_a_cut_last_line(with_shakespeare, workspace):
    make_run(workspace)
    records = workspace / "runs" / "tiny" / "eval.jsonl"
    records.write_text('{"cut')
    assert evaluate("--tokens", "64").exit_code == 0
    lines = records.read_text().splitlines()
    assert lines[0] == '{"cut' and json.loads(lines[1])["kind"] == "loss"


def test_eval_keeps_a_redirected_stderr_to_its_lines(with_shakespeare, workspace):
    """The progress bar's stop wrote a blank line to a stderr that is not a terminal, before an error too."""
    make_run(workspace)
    assert_one_line_error(evaluate("--split", "test"), "--split must be one of")
    result = evaluate("--tokens", "64")
    assert result.exit_code == 0 and "" not in result.stderr.splitlines(), repr(result.stderr)


def _reference_lambada(model, examples):
    """Straightforward: one full forward per passage; the word's nats, and whether each of its tokens is the
    argmax over GPT-2's vocabulary. Tokenized as lm-evaluation-harness's `_encode_pair`: the context's closing
    whitespace goes with the word, whose tokens are the whole text's past the context's."""
    encoding = get_encoding()
    correct, nats = 0, 0.0
    for example in examples:
        text, target = example.context, " " + example.endings[0]
        trailing = len(text) - len(text.rstrip())
        if trailing:
            text, target = text[:-trailing], text[-trailing:] + target
        context = encoding.encode_ordinary(text)
        word = encoding.encode_ordinary(text + target)[len(context):]
        sequence = torch.tensor(context + word)[None, -(model.config.block_size + 1):]
        scored = min(len(word), sequence.shape[1] - 1)
        with torch.no_grad():
            logits, _ = model(sequence[:, :-1])
        logits = logits[0, -scored:, :50257]
        targets = sequence[0, -scored:]
        nats += -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).sum().item()
        correct += int(bool((logits.argmax(dim=-1) == targets).all()))
    return correct / len(examples), math.exp(nats / len(examples))


def _always_predicting(token: int) -> GPT:
    """A model whose first choice is `token` after any context: ln_f outputs a constant that only that token's
    (tied) embedding row points along."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[token] = 0.0
        model.transformer.wte.weight[token, 0] = 10.0
    return model


def test_lambada_scoring_matches_a_reference(model):
    from tinygpt_cli.evaluation import _lambada_example, score_last_words

    examples = [_lambada_example(row, "test") for row in LAMBADA_ROWS] * 2
    words = get_encoding().decode(list(range(1000, 1400))).split()  # passages longer than the window: cut left
    examples += [Example(" ".join(words[i * 9 : i * 9 + 40]), (words[i * 9 + 40],), 0) for i in range(5)]
    # review: whitespace that ends the context goes with the word, as lm-evaluation-harness tokenizes it
    examples += [_lambada_example({"text": text}, "test") for text in ("It was  hot", "line one\n second")]
    accuracy, perplexity = score_last_words(model, examples, batch_size=3)
    assert (accuracy, perplexity) == pytest.approx(_reference_lambada(model, examples))
    # the accuracy counts words every token of which is the first choice: " the" is, " thethe" (" the" + "the")
    # is not, though its first token is
    the = get_encoding().encode_ordinary(" the")
    assert len(the) == 1 and len(get_encoding().encode_ordinary(" thethe")) == 2
    picks = [Example("We walked to", (word,), 0) for word in ("the", "thethe", "a", "the", "The")]
    always = _always_predicting(the[0])
    assert score_last_words(always, picks, batch_size=2)[0] == pytest.approx(0.4)
    assert _reference_lambada(always, picks)[0] == pytest.approx(0.4)


def test_lambada_rows():
    from tinygpt_cli.evaluation import _lambada_example

    example = _lambada_example({"text": "The cat sat on the  mat"}, "test")  # as the harness splits it
    assert (example.context, example.endings, example.label) == ("The cat sat on the ", ("mat",), 0)
    for row, fragment in (({"text": 5}, "needs a text 'text' field"), ("a passage", "needs a text 'text' field"),
                          ({"text": "alone"}, "has no last word"), ({"text": "   "}, "has no last word"),
                          ({"text": "ends with a space "}, "has no last word")):
        with pytest.raises(TinyGPTError, match=fragment):
            _lambada_example(row, "example 1")


def test_eval_lambada_from_local_files(workspace, lambada_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tinygpt_cli.evaluation import load_task

    payload, expected, examples = _eval_task_json(workspace, "lambada_openai", lambada_file, _reference_lambada)
    assert (payload["accuracy"], payload["perplexity"]) == pytest.approx(expected)
    assert payload["accuracy_norm"] is None and payload["accuracy_norm_stderr"] is None
    assert payload["examples"] == 4 and payload["task"] == "lambada_openai"
    text = evaluate("--task", "LAMBADA_OpenAI", "--task-data", str(lambada_file), "--limit", "2")
    assert text.exit_code == 0, text.output
    assert "lambada_openai: acc 0.0000 ± 0.0000 · perplexity " in text.stdout and "on 2 examples" in text.stdout
    parquet = tmp_path / "lambada.parquet"
    pq.write_table(pa.Table.from_pylist(LAMBADA_ROWS), parquet)
    assert load_task("lambada_openai", parquet)[0] == examples
    records = [json.loads(line) for line in (workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()]
    assert [(r["task"], r["examples"]) for r in records] == [("lambada_openai", 4), ("lambada_openai", 2)]
    assert records[0]["perplexity"] == pytest.approx(expected[1])
    report = (workspace / "runs" / "tiny" / "report.md").read_text()
    assert "## Evaluation: lambada_openai (zero-shot)" in report and "| perplexity (of the last word) |" in report


def test_lambada_offline_without_a_local_copy(workspace, lambada_file, tmp_path):
    make_run(workspace)
    result = evaluate("--task", "lambada_openai", "--limit", "5")
    assert_one_line_error(result, "could not load LAMBADA (OpenAI's version) from the Hugging Face hub")
    assert "with text (the passage, its last word the target)" in result.stderr
    hellaswag_shaped = tmp_path / "hs.jsonl"
    hellaswag_shaped.write_text(json.dumps(HELLASWAG_ROWS[0]) + "\n", encoding="utf-8")
    assert_one_line_error(evaluate("--task", "lambada_openai", "--task-data", str(hellaswag_shaped)),
                          "needs a text 'text' field (LAMBADA's schema")
    assert not (workspace / "runs" / "tiny" / "eval.jsonl").exists()


def _eval_task_json(workspace, task, path, reference):
    """`tinygpt eval --task TASK --task-data PATH --json` of make_run's model: (its JSON, `reference` of the same
    model on the same examples, the examples)."""
    from tinygpt_cli.evaluation import load_task

    make_run(workspace)
    result = evaluate("--task", task, "--task-data", str(path), "--json")
    assert result.exit_code == 0, result.output
    examples, _ = load_task(task, path)
    torch.manual_seed(0)  # make_run's weights are the fixture's
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)).eval()
    return json.loads(result.stdout), reference(model, examples), examples


def test_eval_a_checkpoint_folder_and_a_dataset_path(with_shakespeare, workspace):
    checkpoint = make_run(workspace)
    result = evaluate(str(checkpoint), "--data", str(with_shakespeare), "--tokens", "64", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["checkpoint"] == str(checkpoint)
    assert (workspace / "runs" / "tiny" / "eval.jsonl").is_file()


def test_eval_hellaswag_from_local_files(workspace, hellaswag_file, model, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tinygpt_cli.evaluation import load_task

    payload, expected, examples = _eval_task_json(workspace, "hellaswag", hellaswag_file, _reference_hellaswag)
    assert (payload["accuracy"], payload["accuracy_norm"]) == pytest.approx(expected)
    assert payload["examples"] == 4 and payload["task"] == "hellaswag" and payload["source"] == str(hellaswag_file)
    text = evaluate("--task", "hellaswag", "--task-data", str(hellaswag_file), "--limit", "2")
    assert "hellaswag: acc_norm" in text.stdout and "on 2 examples" in text.stdout
    parquet = tmp_path / "hs.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "ctx"} | {"label": str(row["label"])}
                                         for row in HELLASWAG_ROWS]), parquet)
    assert load_task("hellaswag", parquet)[0] == examples  # ctx rebuilt from ctx_a + ctx_b
    records = (workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in records] == ["task", "task"]
    assert "## Evaluation: hellaswag (zero-shot)" in (workspace / "runs" / "tiny" / "report.md").read_text()


@pytest.mark.parametrize(("args", "fragment"), [
    (["--split", "test"], "--split must be one of val, train"),
    (["--tokens", "0"], "--tokens must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--data", "owt"], "no tokenized dataset named 'owt'"),
    (["--dtype", "fp8"], "--dtype must be one of"),
    (["--task", "mmlu"], "unknown task 'mmlu'"),
    (["--task", "hellaswag", "--limit", "0"], "--limit must be at least 1"),
    (["--task", "hellaswag", "--task-data", "nope.jsonl"], "nope.jsonl does not exist"),
    (["--task", "hellaswag", "--data", "shakespeare"], "--data, --split and --tokens are for the loss"),
    (["--task", "hellaswag", "--split", "train"], "--data, --split and --tokens are for the loss"),  # was ignored
    (["--limit", "3"], "go with --task (hellaswag | lambada_openai | arc_easy | arc_challenge)"),
    (["--task", "lambada"], "unknown task 'lambada': choose one of hellaswag, lambada_openai, arc_easy, arc_challenge"),
    (["no-such-run"], " at no-such-run"),
])
def test_bad_input_is_one_line_and_writes_nothing(with_shakespeare, workspace, args, fragment):
    make_run(workspace)
    assert_one_line_error(evaluate(*args), fragment)
    assert not (workspace / "runs" / "tiny" / "eval.jsonl").exists()


@pytest.mark.parametrize(("content", "fragment"), [
    ('{"ctx": "a", "endings": ["b", "c"], "label": ""}\n', "has no usable label"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 1.7}\n', "has no usable label (1.7)"),  # was read as 1
    ('{"ctx": "a", "endings": ["b", "c"], "label": true}\n', "has no usable label (True)"),
    ('{"ctx": "a", "endings": ["b", "c"], "label": 5}\n', "has label 5 but 2 endings"),
    ('{"context": "a", "label": 0}\n', "needs a text 'ctx' and a list of text 'endings'"),
    ('{"ctx": "a", ', "line 1 of"),
    ("", "holds no examples"),
])
def test_bad_task_data(workspace, tmp_path, content, fragment):
    make_run(workspace)
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    assert_one_line_error(evaluate("--task", "hellaswag", "--task-data", str(path)), fragment)
    other = tmp_path / "data.csv"
    other.write_text("ctx,endings\n", encoding="utf-8")
    assert_one_line_error(evaluate("--task", "hellaswag", "--task-data", str(other)), "not .jsonl, .json or .parquet")


def test_task_data_with_a_byte_order_mark_or_its_examples_under_a_key(workspace, tmp_path):
    """QA: a .jsonl starting with a UTF-8 byte-order mark (which tokenize reads) failed with json's "Unexpected UTF-8
    BOM"; a .json of {"data": [...]} said "example 1 needs a text 'ctx'" rather than what was wrong."""
    make_run(workspace)
    marked = tmp_path / "marked.jsonl"
    marked.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(row) + "\n" for row in HELLASWAG_ROWS).encode())
    result = evaluate("--task", "hellaswag", "--task-data", str(marked), "--no-record")
    assert result.exit_code == 0, result.output
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": HELLASWAG_ROWS}), encoding="utf-8")
    assert_one_line_error(evaluate("--task", "hellaswag", "--task-data", str(wrapped)),
                          "is an object holding its examples under 'data': give a list of examples, e.g. `jq '.data'")


def test_task_data_that_is_a_folder(workspace, tmp_path):
    make_run(workspace)
    assert_one_line_error(evaluate("--task", "hellaswag", "--task-data", str(tmp_path)), "is a folder: pass the file")


def test_hellaswag_offline_without_a_local_copy(workspace):
    make_run(workspace)
    assert_one_line_error(evaluate("--task", "hellaswag", "--limit", "5"), "could not load HellaSwag")


def test_hellaswag_with_an_unreachable_hub_fails_fast(workspace, monkeypatch):
    """Not in offline mode but without a network, `datasets` retried for ~55 s before the error (audit)."""
    import time

    import datasets
    import huggingface_hub

    make_run(workspace)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # as if imported online (the tests set offline)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("TINYGPT_HUB_TIMEOUT", "1")
    started = time.perf_counter()
    result = evaluate("--task", "hellaswag", "--limit", "5")
    assert_one_line_error(result, "no answer from the Hugging Face hub at http://127.0.0.1:9")
    assert "--task-data PATH" in result.stderr and time.perf_counter() - started < 30  # not minutes of retries


def test_nothing_to_evaluate(workspace):
    assert_one_line_error(evaluate(), "no trained run")
    make_run(workspace)
    assert_one_line_error(evaluate(), "no tokenized dataset to evaluate on")


@pytest.mark.gpu
def test_eval_on_cuda(with_shakespeare, workspace, hellaswag_file, lambada_file, arc_file):
    make_run(workspace)
    cpu = json.loads(evaluate("--tokens", "1000", "--json", "--device", "cpu").stdout)
    gpu = json.loads(evaluate("--tokens", "1000", "--json", "--device", "cuda", "--dtype", "fp32").stdout)
    assert gpu["loss"] == pytest.approx(cpu["loss"], rel=1e-3)
    bf16 = evaluate("--task", "hellaswag", "--task-data", str(hellaswag_file), "--device", "cuda")
    assert bf16.exit_code == 0, bf16.output
    lambada = [evaluate("--task", "lambada_openai", "--task-data", str(lambada_file), "--json", *args)
               for args in (("--device", "cpu"), ("--device", "cuda", "--dtype", "fp32"))]
    assert json.loads(lambada[1].stdout)["perplexity"] == pytest.approx(json.loads(lambada[0].stdout)["perplexity"],
                                                                        rel=1e-3)
    arc = [json.loads(evaluate("--task", "arc_easy", "--task-data", str(arc_file), "--json", *args).stdout)
           for args in (("--device", "cpu"), ("--device", "cuda", "--dtype", "fp32"))]
    assert (arc[1]["accuracy"], arc[1]["accuracy_norm"]) == (arc[0]["accuracy"], arc[0]["accuracy_norm"])


# ------------------------------------------------------------------------------------------------ audit (eval)
def test_eval_of_an_empty_split_is_one_line(with_shakespeare, workspace):
    """numpy cannot map an empty file: eval of an empty split was a ValueError traceback (audit)."""
    import hashlib

    make_run(workspace)
    empty = workspace / "data" / "empty"
    shutil.copytree(with_shakespeare, empty)
    (empty / "val.bin").write_bytes(b"")
    meta = json.loads((empty / "meta.json").read_text())
    meta["splits"]["val"].update(tokens=0, bytes=0, sha256=hashlib.sha256(b"").hexdigest())
    (empty / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(evaluate("--data", "empty", "--tokens", "64"), "the val split of empty has fewer than 2")
    assert not (workspace / "runs" / "tiny" / "eval.jsonl").exists()


def test_eval_of_a_checkpoint_by_a_relative_path_records_in_its_run(with_shakespeare, workspace, monkeypatch):
    """`tinygpt eval step_1` from inside checkpoints/ (or `.` from inside the checkpoint) recorded into the
    checkpoint folder, which pruning deletes, under a relative checkpoint path (audit)."""
    checkpoint = make_run(workspace)
    run_dir = workspace / "runs" / "tiny"
    for cwd, spec in ((checkpoint.parent, checkpoint.name), (checkpoint, ".")):
        monkeypatch.chdir(cwd)
        result = evaluate(spec, "--tokens", "64", "--json")
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert payload["checkpoint"] == str(checkpoint) and payload["recorded_in"] == str(run_dir)
    assert not (checkpoint / "eval.jsonl").exists() and not (checkpoint / "report.md").exists()
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == [str(checkpoint)] * 2


def test_hellaswag_hub_id_is_not_read_from_a_local_folder(workspace, hellaswag_file, tmp_path, monkeypatch,
                                                          request):
    """`datasets.load_dataset("hellaswag")` reads ./hellaswag/ when there is one: offline, any folder of that name
    in the working directory was scored and recorded as "hellaswag (validation)" (audit)."""
    import datasets

    make_run(workspace)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")  # not the user's cache
    verbosity = datasets.logging.get_verbosity()  # its "using the cached version" warnings: an earlier test's stderr
    datasets.logging.set_verbosity_error()
    request.addfinalizer(lambda: datasets.logging.set_verbosity(verbosity))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "validation.jsonl").write_text(  # labels as text, as the hub stores them: datasets
        "".join(json.dumps({**row, "label": str(row["label"])}) + "\n" for row in HELLASWAG_ROWS),  # < 4.7 reads no
        encoding="utf-8")  # column that mixes "0" and 2
    assert_one_line_error(evaluate("--task", "hellaswag", "--limit", "2"), "could not load HellaSwag")
    # ... nor from the cache `datasets` keeps of such a folder under the name "hellaswag", from anywhere
    assert len(datasets.load_dataset("hellaswag", split="validation")) == 4
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert_one_line_error(evaluate("--task", "hellaswag", "--limit", "2"), "4 examples, not HellaSwag's 10,042")


@pytest.mark.parametrize("scanned", [True, False])
def test_eval_of_token_ids_past_the_vocabulary_is_one_line(with_shakespeare, workspace, monkeypatch, scanned):
    """A hand-made val.bin with an id GPT-2 does not have was an index-error traceback (audit). A file small
    enough to be hashed whole is scanned when opened; a larger one (only its edges hashed) is checked a window at
    a time, before the window reaches the model."""
    from conftest import hand_made_dataset
    from tinygpt_cli import data

    make_run(workspace)
    if not scanned:
        monkeypatch.setattr(data, "FULL_HASH_LIMIT", 0)
    hand_made_dataset(with_shakespeare, workspace / "data" / "mine", "val", 1, 50257)
    assert_one_line_error(evaluate("--data", "mine", "--tokens", "64"), "token id 50257 at token 1, past")
    assert not (workspace / "runs" / "tiny" / "eval.jsonl").exists()


def test_eval_counts_one_window_and_one_example_in_the_singular(with_shakespeare, workspace, hellaswag_file):
    """'in 1 windows of 32', 'on 1 examples' (audit)."""
    make_run(workspace)
    result = evaluate("--tokens", "1")
    assert result.exit_code == 0, result.output
    assert "in 1 window of" in result.stderr
    assert "in 1 window of" in (workspace / "runs" / "tiny" / "report.md").read_text()
    result = evaluate("--task", "hellaswag", "--task-data", str(hellaswag_file), "--limit", "1")
    assert result.exit_code == 0, result.output
    assert "on 1 example (zero-shot" in result.stdout and ": 1 example from" in result.stderr
    assert "| examples | 1 example from" in (workspace / "runs" / "tiny" / "report.md").read_text()


def test_eval_records_a_task_file_by_its_absolute_path_and_takes_hf_split_and_file_names(
        with_shakespeare, workspace, hellaswag_file, monkeypatch):
    """Audit: --task-data typed relative was recorded so in eval.jsonl (meaningless from another folder);
    --split validation (Hugging Face's name) was refused; --data naming a text file or a split's .bin said 'no
    tokenized dataset named ...: run tinygpt tokenize first', naming neither the file nor the command."""
    make_run(workspace)
    monkeypatch.chdir(hellaswag_file.parent)
    result = evaluate("--task", "hellaswag", "--task-data", hellaswag_file.name, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["source"] == str(hellaswag_file.resolve())
    record = json.loads((workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()[-1])
    assert record["source"] == str(hellaswag_file.resolve())
    named = evaluate("--split", "validation", "--tokens", "64", "--json")
    assert named.exit_code == 0, named.output
    assert json.loads(named.stdout)["split"] == "val"
    name = hellaswag_file.name
    assert_one_line_error(evaluate("--data", name), f"{name} is a file, not a tokenized dataset: tokenize it first "
                          f"(`tinygpt tokenize {name} --name NAME`)")
    assert_one_line_error(evaluate("--data", str(with_shakespeare / "val.bin")),
                          f"is one split of a tokenized dataset: name the dataset, its folder {with_shakespeare}")


def test_the_config_names_the_tasks_evaluation_has():
    """config.EVAL_TASKS (checked by TrainConfig, which must not import torch) is evaluation.TASKS' names."""
    from tinygpt_cli.config import EVAL_TASKS
    from tinygpt_cli.evaluation import TASKS

    assert tuple(TASKS) == EVAL_TASKS


def test_the_head_runs_on_the_scored_positions_only(model, monkeypatch):
    """A task scores a few tokens after a long context; the (positions x 50,257) logits of the context were most of
    its time (LAMBADA 6x, HellaSwag 4x slower on CPU). Only the scored positions reach the head now."""
    from tinygpt_cli import evaluation

    rows_seen = []
    real = evaluation.F.linear

    def counting(hidden, weight, *args):
        if weight.shape[0] == 50257:
            rows_seen.append(hidden.shape[0])
        return real(hidden, weight, *args)

    monkeypatch.setattr(evaluation.F, "linear", counting)
    x = torch.randint(0, 50257, (2, 20))
    y = torch.full((2, 20), -1)
    y[0, -2:] = torch.tensor([11, 12])
    y[1, 5] = 13
    with torch.no_grad():
        nats = token_nats(model, x, y)
        assert sum(rows_seen) == 3
        logits, _ = model(x)
    reference = F.cross_entropy(logits[..., :50257].flatten(0, 1), y.flatten(), ignore_index=-1,
                                reduction="none").view(2, 20)
    torch.testing.assert_close(nats, reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ ARC
def test_arc_rows():
    from tinygpt_cli.evaluation import _arc_example

    examples = [_arc_example(row, "test") for row in ARC_ROWS]
    assert examples[0] == Example("Question: Which of these is a source of light?\nAnswer:",
                                  ("a rock", "the Sun", "a shadow", "a puddle"), 1)
    assert [(len(e.endings), e.label) for e in examples] == [(4, 1), (3, 0), (4, 2), (5, 1)]
    assert _arc_example({**ARC_ROWS[2], "answerKey": 3}, "test").label == 2  # a local file's number
    two = {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}}
    for row, fragment in (({**ARC_ROWS[0], "answerKey": "E"}, "has answerKey 'E', not one of its choices' labels "
                                                                "(A, B, C, D)"),
                          ({"question": "Q?", "choices": ["a", "b"], "answerKey": "A"}, "(ARC's schema)"),
                          ({**two, "choices": {"text": ["a"], "label": ["A"]}, "answerKey": "A"},
                           "has 1 choice(s): a question needs 2 or more"),
                          ({**two, "choices": {"text": ["a", "b", "c"], "label": ["A", "B"]}, "answerKey": "A"},
                           "has 3 choice texts but 2 labels"),
                          # review: a missing answerKey matched a null label ("None" == "None")
                          ({**two, "choices": {"text": ["a", "b"], "label": ["A", None]}},
                           "choice 2 needs a text and a label (got 'b', None)"),
                          (two, "has no usable answerKey (None)"),
                          ({**two, "answerKey": True}, "has no usable answerKey (True)"),
                          ({**two, "choices": {"text": ["a", None], "label": ["A", "B"]}, "answerKey": "A"},
                           "choice 2 needs a text and a label (got None, 'B')"),
                          ("a question", "needs a text 'question'")):
        with pytest.raises(TinyGPTError, match=re.escape(fragment)):
            _arc_example(row, "example 1")


def test_arc_scoring_normalises_by_characters_as_the_harness_does(model):
    from tinygpt_cli.evaluation import TASKS, task_figures, task_sums

    task = TASKS["arc_easy"]
    examples = [_arc_example_of(row) for row in ARC_ROWS] * 2
    # endings whose token and character counts rank differently: the two normalisations pick differently
    examples += [Example("Question: Pick one.\nAnswer:", ("aaaaaaaaaaaaaaaa", "a b c d", "zzzzzzzz zzzz"), label)
                 for label in range(3)]
    figures = task_figures(task, task_sums(task, model, examples, batch_size=3), len(examples))
    expected = _reference_hellaswag(model, examples, per_character=True)
    assert (figures["accuracy"], figures["accuracy_norm"]) == pytest.approx(expected)
    assert figures["accuracy_norm"] != pytest.approx(_reference_hellaswag(model, examples)[1])
    assert figures["perplexity"] is None and figures["accuracy_norm_stderr"] is not None
    # review: an empty choice is never the per-character pick, as the harness's log-likelihood / 0 = -inf has it
    empty = [Example("Question: Pick one.\nAnswer:", ("", ending), 1) for ending in ("😀", "中", "Ω", "x")]
    assert task_figures(task, task_sums(task, model, empty), len(empty))["accuracy_norm"] == 1.0


def _arc_example_of(row):
    from tinygpt_cli.evaluation import _arc_example

    return _arc_example(row, "test")


def test_eval_arc_from_local_files(workspace, arc_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tinygpt_cli.evaluation import load_task

    payload, expected, examples = _eval_task_json(
        workspace, "arc_easy", arc_file, lambda model, examples: _reference_hellaswag(model, examples, True))
    assert (payload["accuracy"], payload["accuracy_norm"]) == pytest.approx(expected)
    assert payload["examples"] == 4 and payload["task"] == "arc_easy" and payload["perplexity"] is None
    text = evaluate("--task", "ARC_Challenge", "--task-data", str(arc_file), "--limit", "2")
    assert text.exit_code == 0, text.output
    assert "arc_challenge: acc_norm" in text.stdout and "on 2 examples" in text.stdout
    parquet = tmp_path / "arc.parquet"  # the hub's layout: choices a struct of two lists
    pq.write_table(pa.Table.from_pylist(ARC_ROWS), parquet)
    assert load_task("arc_challenge", parquet)[0] == examples
    records = [json.loads(line) for line in (workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()]
    assert [(r["task"], r["examples"]) for r in records] == [("arc_easy", 4), ("arc_challenge", 2)]
    assert "## Evaluation: arc_easy (zero-shot)" in (workspace / "runs" / "tiny" / "report.md").read_text()


def test_arc_offline_without_a_local_copy(workspace):
    make_run(workspace)
    result = evaluate("--task", "arc_easy", "--limit", "5")
    assert_one_line_error(result, "could not load ARC-Easy from the Hugging Face hub (allenai/ai2_arc: ")
    assert "; ai2_arc: " in result.stderr  # the older id, as older harness versions cached it, is tried too
    assert "with question, choices (text and label lists) and answerKey" in result.stderr


def test_task_standard_errors_are_the_harness_sample_ones():
    """lm-evaluation-harness's stderr of a mean of 0/1 scores uses the sample variance: √(p(1 - p) / (n - 1))."""
    from tinygpt_cli.evaluation import TASKS, task_figures

    figures = task_figures(TASKS["arc_easy"], (3.0, 1.0), 4)
    assert figures["accuracy_stderr"] == pytest.approx(math.sqrt(0.75 * 0.25 / 3))
    assert figures["accuracy_norm_stderr"] == pytest.approx(math.sqrt(0.25 * 0.75 / 3))
    assert task_figures(TASKS["hellaswag"], (1.0, 1.0), 1)["accuracy_stderr"] == 0.0


def test_several_tasks_in_one_eval(workspace, monkeypatch):
    """`--task arc_easy,hellaswag` (or `all`) scores each in turn: a line (or a JSON object) and a record each."""
    from tinygpt_cli import evaluation as ev

    rows = {"hellaswag": HELLASWAG_ROWS, "lambada_openai": LAMBADA_ROWS, "arc_easy": ARC_ROWS,
            "arc_challenge": ARC_ROWS[:3]}
    monkeypatch.setattr(ev, "_hub_rows", lambda task, limit, option="--task-data": (
        rows[task.name][:limit], f"hub/{task.name}"))
    setups = []
    real_setup = ev._setup
    monkeypatch.setattr(ev, "_setup", lambda *args: setups.append(args) or real_setup(*args))
    make_run(workspace)
    result = evaluate("--task", "ARC_Easy, hellaswag", "--json")
    assert len(setups) == 1  # the model is loaded once for both (review)
    assert result.exit_code == 0, result.output
    payloads = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(p["task"], p["examples"], p["source"]) for p in payloads] == [("arc_easy", 4, "hub/arc_easy"),
                                                                           ("hellaswag", 4, "hub/hellaswag")]
    text = evaluate("--task", "all", "--limit", "2")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == list(ev.TASKS) and all("on 2 examples" in line for line in lines)
    assert text.stderr.count("Recorded in") == 4
    records = [json.loads(line) for line in (workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["arc_easy", "hellaswag", *ev.TASKS]
    assert [json.loads(line)["task"] for line in evaluate("--task", "arc_easy,all", "--json", "--limit", "1",
                                                            "--no-record").stdout.splitlines()] == list(ev.TASKS)
    for args, fragment in ((["--task", "arc_easy,mmlu"], "unknown task 'mmlu': choose one of hellaswag"),
                           (["--task", ","], "unknown task ','"),
                           (["--task", "arc_easy,hellaswag", "--task-data", "x.jsonl"],
                            "--task-data is one task's examples: give it with one --task, not 2")):
        assert_one_line_error(evaluate(*args), fragment)
    assert len((workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()) == 6  # nothing more


def test_several_tasks_on_a_terminal_draw_a_bar_each(workspace, monkeypatch):
    from rich.console import Console

    from conftest import FakeTerminal
    from tinygpt_cli import cli
    from tinygpt_cli import evaluation as ev

    monkeypatch.setattr(ev, "_hub_rows", lambda task, limit, option="--task-data": (ARC_ROWS[:limit], "hub"))
    screen = FakeTerminal()
    monkeypatch.setattr(cli, "_stderr_console", lambda quiet=None: Console(
        file=screen, width=80, force_terminal=True, markup=False, highlight=False))
    make_run(workspace)
    result = evaluate("--task", "arc_easy,arc_challenge", "--limit", "3")
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["arc_easy", "arc_challenge"]
    assert screen.getvalue().count("Recorded in") == 2 and "━" in screen.getvalue()  # the bars were drawn


def test_an_interrupt_between_tasks_says_which_were_recorded(workspace, monkeypatch):
    """Review: a Ctrl-C during the second task said "nothing was recorded" though the first one was."""
    from tinygpt_cli import evaluation as ev

    scored = []

    def rows(task, limit, option="--task-data"):
        return (HELLASWAG_ROWS if task.name == "hellaswag" else ARC_ROWS)[:limit], "hub"

    real_sums = ev.task_sums

    def interrupt_the_second(task, *args, **kwargs):
        scored.append(task.name)
        if len(scored) == 2:
            raise KeyboardInterrupt
        return real_sums(task, *args, **kwargs)

    monkeypatch.setattr(ev, "_hub_rows", rows)
    monkeypatch.setattr(ev, "task_sums", interrupt_the_second)
    make_run(workspace)
    result = evaluate("--task", "arc_easy,arc_challenge,hellaswag", "--limit", "2")
    assert result.exit_code == 130
    assert result.stdout.splitlines()[0].startswith("arc_easy: acc_norm")
    assert "Interrupted: arc_easy recorded, the task under way not." in result.stderr
    records = [json.loads(line) for line in (workspace / "runs" / "tiny" / "eval.jsonl").read_text().splitlines()]
    assert [r["task"] for r in records] == ["arc_easy"]


def test_every_tasks_examples_load_before_any_is_scored(workspace, monkeypatch):
    """Review: offline, `--task arc_easy,hellaswag` scored and recorded ARC, then stopped at HellaSwag's copy."""
    from tinygpt_cli import evaluation as ev

    real = ev._hub_rows
    monkeypatch.setattr(ev, "_hub_rows", lambda task, limit, option="--task-data": (
        (ARC_ROWS[:limit], "hub") if task.name == "arc_easy" else real(task, limit, option)))
    make_run(workspace)
    assert_one_line_error(evaluate("--task", "arc_easy,hellaswag"), "could not load HellaSwag")
    assert not (workspace / "runs" / "tiny" / "eval.jsonl").exists()


@pytest.mark.parametrize("there", [("eval.jsonl", "report.md"), ("eval.jsonl",), ()])
def test_a_record_cut_by_a_full_disk_is_taken_back_from_both_files(with_shakespeare, workspace, monkeypatch, there):
    """Resource QA: on a full disk, report.md kept a section cut mid-table (the next one was written after it) and
    eval.jsonl a result that said it was not recorded; both files are now as they were."""
    from tinygpt_cli import evaluation

    make_run(workspace)
    run_dir = workspace / "runs" / "tiny"
    assert evaluate("--tokens", "64").exit_code == 0
    for name in {"eval.jsonl", "report.md"} - set(there):  # review: a new eval.jsonl was left empty
        (run_dir / name).unlink()
    before = {name: (run_dir / name).read_bytes() for name in ("eval.jsonl", "report.md") if (run_dir / name).exists()}
    real_fsync, calls = os.fsync, []

    def full_at_report(fd):
        calls.append(fd)
        if len(calls) == 2:  # eval.jsonl's went through; report.md's write meets the full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(evaluation.os, "fsync", full_at_report)
    assert_one_line_error(evaluate("--tokens", "64"), "cannot record the result in")
    monkeypatch.setattr(evaluation.os, "fsync", real_fsync)
    after = {name: (run_dir / name).read_bytes() for name in ("eval.jsonl", "report.md") if (run_dir / name).exists()}
    assert after == before
    assert evaluate("--tokens", "64").exit_code == 0
    assert (run_dir / "report.md").read_text().startswith("# Run tiny\n")
