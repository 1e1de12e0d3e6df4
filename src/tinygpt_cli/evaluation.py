"""Evaluation: loss, perplexity and bits per byte on token files, and zero-shot HellaSwag, ARC and LAMBADA.

Loss (`evaluate`): the split is cut into consecutive windows of the model's context; every window scores each of
its tokens given the ones before it in the window. With `tokens` below the split's size, that many tokens' worth
of windows are taken evenly spaced over the split (no randomness: the same checkpoint always gives the same
number). loss = mean negative log-likelihood in nats of every scored token (the `<|endoftext|>` separators
included, as in training's val loss); perplexity = exp(loss); bits per byte = the nats of the text tokens
(separators left out) / ln 2 / the UTF-8 bytes those tokens decode to. Bits per byte does not depend on the
tokenizer, so it compares models that do not share one.

Zero-shot tasks (`evaluate_task`) score continuations: the log-likelihood of a continuation's tokens after its
context (contexts cut from the left to fit the window).
- HellaSwag: each example is a context and four endings (`" " + ending`); `accuracy` picks the ending with the
  highest total, `accuracy_norm` the highest mean per token - the number nanoGPT and llm.c report (GPT-2 124M:
  about 0.29).
- ARC-Easy and ARC-Challenge (`arc_easy`, `arc_challenge`, AI2's grade-school science questions, test splits):
  the context is `"Question: " + question + "\nAnswer:"`, each of the 3-5 choices `" " + choice`, as
  lm-evaluation-harness asks them; `accuracy_norm` is its `acc_norm`, the highest log-likelihood per character of
  the choice.
- LAMBADA (OpenAI's version, `lambada_openai`): each example is a passage whose last word is to be predicted;
  the context is the text before the last space, the continuation `" " + word`, tokenized as the harness does
  (`_encode_pair`). `accuracy` counts the words whose
  every token is the model's first choice (greedy), `perplexity` is exp of the mean over examples of the word's
  nats - the definitions of EleutherAI's lm-evaluation-harness (GPT-2 124M: 0.3256 and 40.06 there).

Results are appended to the run's `eval.jsonl` (one JSON object each) and `report.md`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tinygpt_cli import workspace
from tinygpt_cli.checkpoint import LoadedCheckpoint, record_folder
from tinygpt_cli.config import kind_problem
from tinygpt_cli.data import Dataset, find_dataset, token_window
from tinygpt_cli.errors import FULL, DataError, TinyGPTError, os_problem
from tinygpt_cli.launch import Stopped, stops_held
from tinygpt_cli.model import GPT
from tinygpt_cli.report import report_lock
from tinygpt_cli.tokenizer import EOT_ID, VOCAB_SIZE

DEFAULT_TOKENS = 1 << 20  # tokens scored by default: 1,048,576, or the whole split if it is smaller
BATCH_TOKENS = 16384  # tokens per forward pass by default
HEAD_CHUNK = 512  # rows of (rows x vocab) fp32 logits held at once: 100 MB
SPLITS = ("val", "train")


@dataclass(frozen=True)
class EvalEvent:
    """What the evaluations report. `kind`: info (a line to show) | start | progress."""

    kind: str
    done: int = 0
    total: int = 0
    unit: str = "tokens"
    message: str = ""


@dataclass
class LossResult:
    """What `evaluate` measured: the checkpoint and data scored, the mean loss (nats a token), perplexity and bits
    per byte (comparable across tokenizers), how much was scored and how fast; `recorded_in` is the run folder
    whose report.md and eval.jsonl got the result (None: not recorded)."""

    checkpoint: str
    step: int | None
    dataset: str
    split: str
    tokens: int  # targets scored
    text_bytes: int  # UTF-8 bytes of the scored text tokens
    windows: int
    window_tokens: int  # the model's context
    loss: float
    perplexity: float
    bits_per_byte: float | None  # None where no text byte was scored (only <|endoftext|> targets)
    seconds: float
    device: str
    dtype: str
    kind: str = "loss"
    recorded_in: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


@dataclass
class TaskResult:
    """What `evaluate_task` measured: the zero-shot accuracy on a task, with its standard error. HellaSwag and ARC
    add the length-normalised accuracy (and its standard error), LAMBADA the perplexity of the last word; a figure a
    task does not have is None."""

    checkpoint: str
    step: int | None
    task: str
    source: str  # where the examples came from (a hub id or a file)
    examples: int
    accuracy: float  # the ending of highest total log-likelihood; LAMBADA: the word greedy decoding gives
    accuracy_stderr: float
    accuracy_norm: float | None  # the ending of highest log-likelihood per token (HellaSwag), per character (ARC)
    accuracy_norm_stderr: float | None
    perplexity: float | None  # LAMBADA: exp(mean nats of the last word)
    seconds: float
    device: str
    dtype: str
    kind: str = "task"
    recorded_in: str | None = None


@dataclass(frozen=True)
class Example:
    """A task's example: `context` followed by one of `endings`; `label` is the right one (a completion task such
    as LAMBADA has one ending, the right one)."""

    context: str
    endings: tuple[str, ...]
    label: int


@dataclass
class TokenScore:
    """Sums over the scored tokens of a token array."""

    nats: float = 0.0
    tokens: int = 0
    text_nats: float = 0.0  # nats of the tokens that are text (not <|endoftext|>)
    text_bytes: int = 0
    windows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- scoring
@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> np.ndarray:
    """UTF-8 bytes of every token id (65536,) int64; <|endoftext|> and ids past the vocabulary count 0."""
    from tinygpt_cli.tokenizer import get_encoding

    encoding = get_encoding()
    lengths = np.zeros(1 << 16, dtype=np.int64)
    for token in range(VOCAB_SIZE):
        if token != EOT_ID:
            lengths[token] = len(encoding.decode_single_token_bytes(token))
    return lengths


def token_nats(model: GPT, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood in nats (B, T) fp32 of targets y (B, T) after inputs x (B, T); 0 where y is -1.

    The head runs a chunk of positions at a time, so the (B*T, vocab) logits are never held whole. The softmax
    is over GPT-2's 50,257 tokens: the rows that pad the embedding to 50304 are never sampled nor exported, so
    a loss that gave them probability would not be the loss of the model people use (or of its exports).
    """
    return _head_scores(model, x, y, greedy=False)[0]


def _head_scores(model: GPT, x: torch.Tensor, y: torch.Tensor, greedy: bool
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_nats`, and with `greedy` whether each target is the model's first choice (B, T) bool (False where
    y is -1). The head runs on the scored positions only: a task scores a few tokens after a long context, and the
    (positions x 50,257) logits of the context were most of its time."""
    hidden = model.hidden_states(x).flatten(0, 1)  # (N, C)
    targets = y.flatten()  # (N,)
    nats = torch.zeros(targets.numel(), dtype=torch.float32, device=x.device)
    hits = torch.zeros(targets.numel(), dtype=torch.bool, device=x.device) if greedy else None
    scored = (targets >= 0).nonzero().squeeze(1)
    hidden, targets = hidden[scored], targets[scored]
    weight = model.lm_head.weight[:VOCAB_SIZE]
    for begin in range(0, targets.numel(), HEAD_CHUNK):
        rows = slice(begin, begin + HEAD_CHUNK)
        logits = F.linear(hidden[rows], weight).float()  # (n, V)
        target = targets[rows]
        where = scored[rows]
        nats[where] = torch.logsumexp(logits, dim=-1) - logits.gather(1, target[:, None]).squeeze(1)
        if hits is not None:
            hits[where] = logits.argmax(dim=-1) == target
    return nats.view_as(y), None if hits is None else hits.view_as(y)


def window_starts(n_tokens: int, block: int, max_tokens: int | None) -> list[tuple[int, int]]:
    """(start, length) of the windows to score in a split of `n_tokens`: a window scores tokens start+1 ..
    start+length. Consecutive full windows tile the split; with `max_tokens` below it, ceil(max_tokens / block)
    of them are taken evenly spaced. Scoring the whole split, a last shorter window takes the remainder."""
    full = (n_tokens - 1) // block
    wanted = math.ceil(max_tokens / block) if max_tokens else None
    if wanted is not None and wanted < full:
        return [((i * full // wanted) * block, block) for i in range(wanted)]
    windows = [(i * block, block) for i in range(full)]
    remainder = n_tokens - 1 - full * block
    if remainder > 0:
        windows.append((full * block, remainder))
    return windows


@torch.inference_mode()
def score_tokens(
    model: GPT,
    tokens: np.ndarray,
    *,
    max_tokens: int | None = DEFAULT_TOKENS,
    batch_size: int | None = None,
    autocast: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> TokenScore:
    """Score `tokens` (a 1-D array of ids) in windows of the model's context; see `window_starts`."""
    block = model.config.block_size
    windows = window_starts(len(tokens), block, max_tokens)
    total = sum(length for _, length in windows)
    batch_size = batch_size or max(1, BATCH_TOKENS // block)
    device = next(model.parameters()).device
    byte_lengths = token_byte_lengths()
    score = TokenScore(windows=len(windows))
    for first in range(0, len(windows), batch_size):
        group = windows[first : first + batch_size]
        width = max(length for _, length in group)
        x = np.zeros((len(group), width), dtype=np.int64)
        y = np.full((len(group), width), -1, dtype=np.int64)
        for row, (start, length) in enumerate(group):
            chunk = token_window(tokens, start, start + length + 1)
            x[row, :length] = chunk[:-1]
            y[row, :length] = chunk[1:]
        with autocast or contextlib.nullcontext():
            nats = token_nats(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))
        nats = nats.cpu().double().numpy()
        scored = y >= 0
        text = scored & (byte_lengths[np.maximum(y, 0)] > 0)
        score.nats += float(nats[scored].sum())
        score.tokens += int(scored.sum())
        score.text_nats += float(nats[text].sum())
        score.text_bytes += int(byte_lengths[y[text]].sum())
        if on_progress is not None:
            on_progress(score.tokens, total)
    return score


def _encode(text: str) -> list[int]:
    from tinygpt_cli.tokenizer import get_encoding

    return get_encoding().encode_ordinary(text)


def _encode_pair(context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness makes them, so that LAMBADA's figures are its
    figures: whitespace that ends the context moves to the continuation, whose ids are those of the whole text
    past the context's; an empty context is <|endoftext|>. (HellaSwag encodes the ending apart, as nanoGPT and
    llm.c do.)"""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    context_ids = _encode(context)
    if not context_ids:
        return [EOT_ID], _encode(continuation)
    return context_ids, _encode(context + continuation)[len(context_ids) :]


def _score_continuations(model: GPT, rows: Sequence[tuple[list[int], list[int]]], autocast: Any, greedy: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Score (context ids, continuation ids) pairs in one forward pass: each continuation's total nats (float64,
    on the host: MPS has no float64), its scored token count, and with `greedy` whether every one of its tokens
    was the model's first choice. A pair longer than the window loses tokens from the left, so that what is
    scored is the continuation."""
    block = model.config.block_size
    device = next(model.parameters()).device
    cut = [((context + continuation)[-(block + 1) :], len(continuation)) for context, continuation in rows]
    width = max(len(sequence) - 1 for sequence, _ in cut)
    x = np.zeros((len(cut), width), dtype=np.int64)
    y = np.full((len(cut), width), -1, dtype=np.int64)
    for row, (sequence, wanted) in enumerate(cut):
        n = len(sequence) - 1
        scored = min(wanted, n)
        x[row, :n] = sequence[:-1]
        y[row, n - scored : n] = sequence[-scored:] if scored else []
    with autocast or contextlib.nullcontext():
        nats, hits = _head_scores(model, torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), greedy)
    scored_tokens = torch.from_numpy((y >= 0).sum(axis=1))
    all_hit = None if hits is None else hits.cpu().sum(dim=1) == scored_tokens
    return nats.cpu().double().sum(dim=1), scored_tokens, all_hit


def _choice_sums(model: GPT, examples: Sequence[Example], batch_size: int | None, autocast: Any,
                 on_progress: Callable[[int, int], None] | None, per_character: bool = False) -> tuple[float, float]:
    """Multiple choice (HellaSwag, ARC): how many examples the ending of highest total log-likelihood gets right,
    and how many the one of highest mean per token (`per_character`: per character of the ending, as
    lm-evaluation-harness normalises); NaN, NaN where a score is not finite."""
    batch_size = batch_size or max(1, BATCH_TOKENS // (4 * model.config.block_size))
    correct = correct_norm = 0
    finite = True
    for first in range(0, len(examples), batch_size):
        group = examples[first : first + batch_size]
        rows = [(context, _encode(" " + ending)) for example in group
                for context in [_encode(example.context) or [EOT_ID]] for ending in example.endings]  # once each
        totals, counts, _ = _score_continuations(model, rows, autocast, greedy=False)
        finite &= bool(torch.isfinite(totals).all())  # argmin over NaN picks ending 0: a made-up accuracy
        if per_character:  # an empty choice: nats / 0 = inf, never picked (the harness's log-likelihood / 0 = -inf)
            counts = torch.tensor([float(len(ending)) for example in group for ending in example.endings],
                                  dtype=totals.dtype)
        else:
            counts = counts.clamp(min=1)
        offset = 0
        for example in group:
            choices = slice(offset, offset + len(example.endings))
            offset += len(example.endings)
            correct += int(int(totals[choices].argmin()) == example.label)
            correct_norm += int(int((totals[choices] / counts[choices]).argmin()) == example.label)
        if on_progress is not None:
            on_progress(min(first + batch_size, len(examples)), len(examples))
    if not finite:  # a damaged or diverged model: no accuracy, as its loss is NaN (`evaluate`)
        return math.nan, math.nan
    return float(correct), float(correct_norm)


def _last_word_sums(model: GPT, examples: Sequence[Example], batch_size: int | None, autocast: Any,
                    on_progress: Callable[[int, int], None] | None) -> tuple[float, float]:
    """Completion (LAMBADA: each example's one ending is the word to predict): how many words greedy decoding gets
    whole, and the nats of the words in all; NaN, NaN where a score is not finite."""
    batch_size = batch_size or max(1, BATCH_TOKENS // model.config.block_size)
    correct = 0
    nats = 0.0
    for first in range(0, len(examples), batch_size):
        group = examples[first : first + batch_size]
        rows = [_encode_pair(example.context, " " + example.endings[0]) for example in group]
        totals, _, all_hit = _score_continuations(model, rows, autocast, greedy=True)
        assert all_hit is not None
        nats += float(totals.sum())
        correct += int(all_hit.sum())
        if on_progress is not None:
            on_progress(min(first + batch_size, len(examples)), len(examples))
    if not math.isfinite(nats):  # a damaged or diverged model: its greedy picks are argmax over NaN
        return math.nan, math.nan
    return float(correct), nats


@torch.inference_mode()
def task_sums(
    task: Task,
    model: GPT,
    examples: Sequence[Example],
    *,
    batch_size: int | None = None,
    autocast: Any = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float]:
    """A task's two sums over `examples` zero-shot (HellaSwag, ARC: right by total, right by mean per token or per
    character; LAMBADA: words right, nats of the words), NaN where the model's scores are not: sums of shards add
    up, so that several processes can each score a share (`task_figures` turns them into the figures). See the
    module docstring."""
    if task.completion:
        return _last_word_sums(model, examples, batch_size, autocast, on_progress)
    return _choice_sums(model, examples, batch_size, autocast, on_progress, task.per_character)


def task_figures(task: Task, sums: Sequence[float], n: int) -> dict[str, float | None]:
    """A task's figures (TaskResult's accuracy, accuracy_stderr, accuracy_norm, accuracy_norm_stderr and
    perplexity; None where the task has no such figure) from `task_sums` over `n` examples."""
    n = max(1, n)

    def stderr(p: float) -> float:  # of the mean of n 0/1 scores, with the sample variance, as the harness has it
        return math.sqrt(p * (1 - p) / max(1, n - 1))

    accuracy = sums[0] / n
    figures: dict[str, float | None] = {"accuracy": accuracy, "accuracy_stderr": stderr(accuracy),
                                        "accuracy_norm": None, "accuracy_norm_stderr": None, "perplexity": None}
    if task.completion:
        figures["perplexity"] = math.exp(min(sums[1] / n, 700.0))
    else:
        figures["accuracy_norm"] = sums[1] / n
        figures["accuracy_norm_stderr"] = stderr(sums[1] / n)
    return figures


def score_examples(model: GPT, examples: Sequence[Example], *, batch_size: int | None = None, autocast: Any = None,
                   on_progress: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """(accuracy, accuracy_norm) of multiple-choice `examples` (HellaSwag) zero-shot."""
    figures = task_figures(TASKS["hellaswag"], task_sums(TASKS["hellaswag"], model, examples, batch_size=batch_size,
                                                         autocast=autocast, on_progress=on_progress), len(examples))
    return figures["accuracy"], figures["accuracy_norm"]  # type: ignore[return-value]


def score_last_words(model: GPT, examples: Sequence[Example], *, batch_size: int | None = None, autocast: Any = None,
                     on_progress: Callable[[int, int], None] | None = None) -> tuple[float, float]:
    """(accuracy, perplexity) of completion `examples` (LAMBADA) zero-shot."""
    task = TASKS["lambada_openai"]
    figures = task_figures(task, task_sums(task, model, examples, batch_size=batch_size, autocast=autocast,
                                           on_progress=on_progress), len(examples))
    return figures["accuracy"], figures["perplexity"]  # type: ignore[return-value]


def _say_if_non_finite(figure: float, emit: Callable[[EvalEvent], None]) -> None:
    """An info line saying why a figure is NaN (it is recorded so: null in the JSON)."""
    if not math.isfinite(figure):
        from tinygpt_cli.sample import NON_FINITE

        emit(EvalEvent("info", message=f"{NON_FINITE[0].upper()}{NON_FINITE[1:]}; its figures are NaN"))


# ----------------------------------------------------------------------------------------------- task data
def _hellaswag_example(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where} is not an object with ctx, endings and label: check the file")
    context = row.get("ctx")
    if context is None and "ctx_a" in row:  # the original release: ctx = ctx_a + " " + ctx_b capitalised
        context = (str(row["ctx_a"]) + " " + str(row.get("ctx_b") or "").capitalize()).strip()
    endings = row.get("endings")
    if not isinstance(context, str) or not isinstance(endings, (list, tuple)) or len(endings) < 2 \
            or not all(isinstance(e, str) for e in endings):
        raise DataError(f"{where} needs a text 'ctx' and a list of text 'endings' (HellaSwag's schema)")
    raw = row.get("label")  # the hub stores "0".."3"; local files may hold 0..3 or 2.0
    whole = (isinstance(raw, int) and not isinstance(raw, bool)) or (isinstance(raw, float) and raw.is_integer()) \
        or (isinstance(raw, str) and raw.strip().isdecimal())
    if not whole:
        raise DataError(f"{where} has no usable label ({raw!r}): use HellaSwag's validation split, which is labelled")
    label = int(raw)
    if not 0 <= label < len(endings):
        raise DataError(f"{where} has label {label} but {len(endings)} endings: the label is the right ending's "
                        f"index, 0 to {len(endings) - 1}; fix it, or leave the example out")
    return Example(context, tuple(endings), label)


def _arc_example(row: Any, where: str) -> Example:
    """An AI2 ARC question as lm-evaluation-harness asks it: "Question: ...\nAnswer:", each choice after a space."""
    question = row.get("question") if isinstance(row, dict) else None
    choices = row.get("choices") if isinstance(row, dict) else None
    texts = choices.get("text") if isinstance(choices, dict) else None
    labels = choices.get("label") if isinstance(choices, dict) else None
    if not isinstance(question, str) or not isinstance(texts, (list, tuple)) or not isinstance(labels, (list, tuple)):
        raise DataError(f"{where} needs a text 'question' and 'choices' with lists 'text' and 'label' (ARC's schema)")
    if len(texts) != len(labels):
        raise DataError(f"{where} has {len(texts)} choice texts but {len(labels)} labels: check the file")
    if len(texts) < 2:
        raise DataError(f"{where} has {len(texts)} choice(s): a question needs 2 or more (ARC's have 3 to 5)")
    for number, (text, label) in enumerate(zip(texts, labels, strict=True), 1):
        if not isinstance(text, str) or not _label_like(label):
            raise DataError(f"{where}: choice {number} needs a text and a label (got {text!r}, {label!r})")
    key = row.get("answerKey")
    if not _label_like(key):
        raise DataError(f"{where} has no usable answerKey ({key!r}): ARC's test split is answered")
    names = [str(label) for label in labels]  # "A".."E" or "1".."5"; a local file may hold numbers
    if str(key) not in names:
        raise DataError(f"{where} has answerKey {key!r}, not one of its choices' labels ({', '.join(names)})")
    return Example(f"Question: {question}\nAnswer:", tuple(texts), names.index(str(key)))


def _label_like(value: Any) -> bool:
    """A choice's label or an answer key: a text, or a whole number (not a bool)."""
    return (isinstance(value, str) and bool(value.strip())) or (isinstance(value, int) and not isinstance(value, bool))


def _lambada_example(row: Any, where: str) -> Example:
    text = row.get("text") if isinstance(row, dict) else None
    if not isinstance(text, str):
        raise DataError(f"{where} needs a text 'text' field (LAMBADA's schema: the passage, its last word the target)")
    words = text.split(" ")  # as lm-evaluation-harness splits it: the context is the text before the last space
    context, word = " ".join(words[:-1]), words[-1]
    if not context.strip() or not word.strip():
        raise DataError(f"{where} has no last word after a passage to predict it from: check the file")
    return Example(context, (word,), 0)


ARC_SCHEMA = "question, choices (text and label lists) and answerKey"


@dataclass(frozen=True)
class Task:
    """A zero-shot benchmark: the copies of it on the Hugging Face hub (id, config) tried in turn, the split
    scored and its size (a copy of another size is not the benchmark), the fields a local file needs, how a row
    becomes an Example, and how examples are scored."""

    name: str
    title: str
    hub: tuple[tuple[str, str | None], ...]
    split: str
    size: int
    schema: str
    example: Callable[[Any, str], Example]
    completion: bool  # one ending, the right one (scored by `score_last_words`), not multiple choice
    per_character: bool = False  # accuracy_norm by the mean per character of the ending, not per token


TASKS = {
    task.name: task
    for task in (
        Task("hellaswag", "HellaSwag", (("Rowan/hellaswag", None), ("hellaswag", None)), "validation", 10042,
             "ctx (or ctx_a/ctx_b), endings and label", _hellaswag_example, completion=False),
        Task("lambada_openai", "LAMBADA (OpenAI's version)", (("EleutherAI/lambada_openai", "default"),), "test",
             5153, "text (the passage, its last word the target)", _lambada_example, completion=True),
        Task("arc_easy", "ARC-Easy", (("allenai/ai2_arc", "ARC-Easy"), ("ai2_arc", "ARC-Easy")), "test", 2376,
             ARC_SCHEMA, _arc_example, completion=False, per_character=True),
        Task("arc_challenge", "ARC-Challenge", (("allenai/ai2_arc", "ARC-Challenge"), ("ai2_arc", "ARC-Challenge")),
             "test", 1172, ARC_SCHEMA, _arc_example, completion=False, per_character=True),
    )
}


def find_task(name: str) -> Task:
    task = TASKS.get(name.strip().lower())
    if task is None:
        raise DataError(f"unknown task {name!r}: choose one of {', '.join(TASKS)}")
    return task


def _read_rows(path: Path, option: str = "--task-data") -> list[Any]:
    name = path.name.lower()
    if path.is_dir():
        raise DataError(f"task data {path} is a folder: pass the file (.jsonl, .json or .parquet) with {option}")
    if not path.is_file():
        raise DataError(f"task data {path} does not exist: check the {option} path")
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows tools write one) is no JSON
        if name.endswith(".jsonl"):
            rows = []
            for line_no, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(f"line {line_no} of {path} is not valid JSON ({exc.msg}): fix it") from None
            return rows
        if name.endswith(".json"):
            loaded = json.loads(text)
            if isinstance(loaded, dict):  # one example, or the examples under a key ({"data": [...]})
                key = next((key for key, value in loaded.items() if isinstance(value, list) and value
                            and all(isinstance(item, dict) for item in value)), None)
                if key is not None:
                    raise DataError(f"task data {path} is an object holding its examples under {key!r}: give a list "
                                    f"of examples, e.g. `jq '.{key}' {path.name} > examples.json`")
            return loaded if isinstance(loaded, list) else [loaded]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"task data {path} could not be read ({type(exc).__name__}): check the file") from None
    except OSError as exc:
        raise DataError(f"task data {path} could not be read ({exc}): check the file") from None
    except DataError:
        raise
    except Exception as exc:  # pyarrow raises its own kinds for a damaged file
        raise DataError(f"task data {path} could not be read ({type(exc).__name__}): check the file") from None
    raise DataError(f"task data {path} is not .jsonl, .json or .parquet: convert it to one of those")


def _hub_rows(task: Task, limit: int | None, option: str = "--task-data") -> tuple[list[Any], str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"the `datasets` package is missing: pip install datasets, or {_local_copy(option)}") from None
    from tinygpt_cli.download import hub_offline, hub_silence

    silence = None if hub_offline() else hub_silence(task.hub[0][0])
    problems = [silence] if silence else []
    with _cache_only(silence is not None):  # no answer: a cached copy, at once, instead of a minute of retries
        for hub_id, config in task.hub:
            if Path(hub_id).exists():  # `datasets` would read a local folder of that name instead of the hub
                problems.append(f"{hub_id}: a local folder of that name shadows the hub id")
                continue
            try:
                table = datasets.load_dataset(hub_id, config, split=task.split)
            except Exception as exc:  # offline, a renamed repo, a script-based copy: try the next id
                problems.append(f"{hub_id}: {type(exc).__name__}")
                continue
            if len(table) != task.size:  # a local folder `datasets` read once under that name and cached
                problems.append(f"{hub_id}: {len(table):,} examples, not {task.title}'s {task.size:,}")
                continue
            if limit is not None:
                table = table.select(range(min(limit, len(table))))
            return list(table), f"{hub_id} ({task.split})"
    raise DataError(
        f"could not load {task.title} from the Hugging Face hub ({'; '.join(problems)}): go online once to cache "
        f"it, or {_local_copy(option)} to a local .jsonl/.json/.parquet with {task.schema}"
    )


def _local_copy(option: str) -> str:
    """How to name a local copy of a task's examples: the command's option or the config key."""
    return f"pass {option} PATH" if option.startswith("--") else f"set {option}=PATH"


@contextlib.contextmanager
def _cache_only(active: bool) -> Iterator[None]:
    """While `active`, `datasets` and `huggingface_hub` run in offline mode (their cache only), as if
    HF_HUB_OFFLINE had been set before they were imported; their settings are restored after."""
    if not active:
        yield
        return
    import datasets
    import huggingface_hub

    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_task(task: str | Task, path: str | Path | None = None, limit: int | None = None,
              option: str = "--task-data") -> tuple[list[Example], str]:
    """A task's examples (the first `limit`) and where they came from (a file by its absolute path).

    `path`: a local .jsonl/.json/.parquet in the task's schema (`Task.schema`: HellaSwag's ctx or ctx_a/ctx_b,
    endings, label; LAMBADA's text; ARC's question, choices, answerKey), given by `option` (named by its errors);
    None: the Hugging Face hub through `datasets` (cached after the first download).
    """
    task = task if isinstance(task, Task) else find_task(task)
    if path is not None:
        path = Path(path).expanduser()
        rows, source = _read_rows(path, option), str(path.resolve())  # eval.jsonl names it from any folder
        if limit is not None:
            rows = rows[:limit]
    else:
        rows, source = _hub_rows(task, limit, option)
    if not rows:
        raise DataError(f"{source} holds no examples: check the file")
    return [task.example(row, f"example {i + 1} of {source}") for i, row in enumerate(rows)], source


# ----------------------------------------------------------------------------------------------- commands
def _setup(checkpoint: str | Path | None, device: str, dtype: str | torch.dtype, record: bool
           ) -> tuple[LoadedCheckpoint, Any, str]:
    """The model to score (on `device`), its autocast and the dtype's name; with `record`, checked to be one
    whose results can be recorded."""
    from tinygpt_cli.training import autocast_context, resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    from tinygpt_cli.export import load_model as load_any  # runs, checkpoints, HF GPT-2 folders, hub names

    loaded = load_any(checkpoint, device=torch_device)
    if record:
        _check_recordable(loaded)
    return loaded, autocast_context(torch_device, torch_dtype), str(torch_dtype).split(".")[-1]


def _run_dataset(loaded: LoadedCheckpoint, data: str | None, emit: Callable[[EvalEvent], None]) -> Dataset:
    """--data, else the dataset the run trained on (an error if it is gone or damaged: figures on other text
    would be recorded as the run's), else (a model with no run, such as gpt2) the newest one."""
    if data:
        dataset = find_dataset(data)
        assert dataset is not None
        return dataset
    state_data = loaded.state.get("data")
    candidates = [loaded.run_config.data.dataset if loaded.run_config else None,
                  state_data.get("dataset") if isinstance(state_data, dict) else None]
    trained_on = [name for name in candidates if name]
    damaged: DataError | None = None
    for name in trained_on:
        try:
            dataset = find_dataset(name)
        except DataError as exc:
            if (workspace.data_dir() / name).is_dir():
                damaged = exc
            continue
        recorded = state_data.get("train_sha256") if isinstance(state_data, dict) else None
        current = dataset.meta["splits"]["train"].get("sha256")  # type: ignore[union-attr]
        if recorded and current and recorded != current and state_data.get("dataset") == name:
            emit(EvalEvent("info", message=f"data/{name} was tokenized again from other text after this run trained "
                                           f"on it: these figures are on the new text."))
        return dataset  # type: ignore[return-value]
    if damaged is not None:
        raise damaged
    if trained_on:
        where = trained_on[0] if any(sep in trained_on[0] for sep in "/\\") else f"data/{trained_on[0]}"
        raise DataError(f"the run trained on {where}, which is not in this workspace: tokenize it again "
                        f"with `tinygpt tokenize`, or pass --data NAME|PATH to evaluate on other text")
    dataset = find_dataset(None)
    if dataset is None:
        raise DataError("no tokenized dataset to evaluate on: run `tinygpt tokenize` or pass --data NAME|PATH")
    from tinygpt_cli.config import HUB_MODELS

    source = loaded.state.get("source")  # gpt2 (its path is the hub cache's snapshot, a commit hash)
    named = source if source in HUB_MODELS else loaded.path.name
    emit(EvalEvent("info", message=f"{named} names no dataset it trained on: evaluating on the last "
                                   f"tokenized, data/{dataset.path.name} (--data picks another)"))
    return dataset


def evaluate(
    checkpoint: str | Path | None = None,
    *,
    data: str | None = None,
    split: str = "val",
    tokens: int | None = DEFAULT_TOKENS,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    on_event: Callable[[EvalEvent], None] | None = None,
    record: bool = True,
) -> LossResult:
    """Loss, perplexity and bits per byte of a checkpoint (a run's latest; the latest run's by default) on a
    tokenized dataset's split. `data`: a dataset name or folder (default: the one the run trained on)."""
    emit = on_event or (lambda event: None)
    split = {"validation": "val"}.get(split, split)  # Hugging Face's name of it
    if split not in SPLITS:
        raise DataError(f"--split must be one of {', '.join(SPLITS)} (got {split!r})")
    tokens, batch_size = _counts(("--tokens", tokens), ("--batch-size", batch_size))
    loaded, autocast, dtype_name = _setup(checkpoint, device, dtype, record)
    dataset = _run_dataset(loaded, data, emit)
    split_tokens = dataset.split(split)
    if len(split_tokens) < 2:
        raise DataError(f"the {split} split of {dataset.name} has fewer than 2 tokens: tokenize more text")
    model: GPT = loaded.model  # type: ignore[assignment]
    windows = window_starts(len(split_tokens), model.config.block_size, tokens)
    total = sum(length for _, length in windows)
    emit(EvalEvent("info", message=f"Evaluating {loaded.path} on {dataset.name}/{split}: {total:,} tokens in "
                                   f"{workspace.counted(len(windows), 'window')} of {model.config.block_size}"))
    emit(EvalEvent("start", total=total))
    started = time.perf_counter()
    score = score_tokens(model, split_tokens, max_tokens=tokens, batch_size=batch_size, autocast=autocast,
                         on_progress=lambda done, all_: emit(EvalEvent("progress", done=done, total=all_)))
    loss = score.nats / max(1, score.tokens)
    _say_if_non_finite(loss, emit)
    result = LossResult(
        checkpoint=str(loaded.path), step=loaded.state.get("step"), dataset=dataset.name, split=split,
        tokens=score.tokens, text_bytes=score.text_bytes, windows=score.windows,
        window_tokens=model.config.block_size, loss=loss, perplexity=math.exp(min(loss, 700.0)),
        bits_per_byte=score.text_nats / math.log(2) / score.text_bytes if score.text_bytes else None,
        seconds=time.perf_counter() - started, device=str(next(model.parameters()).device), dtype=dtype_name,
    )
    if record and _recorded(loaded):
        result.recorded_in = str(record_result(loaded.path, result))
    return result


def _counts(*given: tuple[str, int | None]) -> list[int | None]:
    """Each (flag, value) whole and at least 1, or None; as Python ints (numpy's too). A one-line error names the
    flag of the first that is not (API QA: `evaluate(tokens="256")` was a TypeError from deep inside)."""
    counts = []
    for flag, value in given:
        if value is not None and (problem := kind_problem(flag, value, whole=True)):
            raise DataError(problem)
        if value is not None and value < 1:
            raise DataError(f"{flag} must be at least 1 (got {value})")
        counts.append(None if value is None else int(value))
    return counts


def evaluate_task(checkpoint: str | Path | None = None, *, task: str = "hellaswag", **options: Any) -> TaskResult:
    """Zero-shot accuracy of a checkpoint on a benchmark (`task`: a name in TASKS), on the first `limit` examples;
    `task_data`: a local copy of them instead of the hub's. `options`: those of `evaluate_tasks`."""
    return evaluate_tasks(checkpoint, tasks=[task], **options)[0]


def evaluate_tasks(
    checkpoint: str | Path | None = None,
    *,
    tasks: Sequence[str],
    task_data: str | Path | None = None,
    limit: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    on_event: Callable[[EvalEvent], None] | None = None,
    record: bool = True,
    on_result: Callable[[TaskResult], None] | None = None,
) -> list[TaskResult]:
    """`evaluate_task` of several tasks with one load of the model: every task's examples are loaded first (a
    missing copy stops it before anything is scored), then each is scored and recorded in turn, `on_result`
    called with each as it is done (an interrupt keeps the ones before). `task_data` goes with one task."""
    emit = on_event or (lambda event: None)
    specs = [find_task(task) for task in tasks]
    limit, batch_size = _counts(("--limit", limit), ("--batch-size", batch_size))
    if task_data is not None and len(specs) > 1:
        raise DataError(f"--task-data is one task's examples: give it with one --task, not {len(specs)}")
    loaded_tasks = [load_task(spec, task_data, limit) for spec in specs]
    loaded, autocast, dtype_name = _setup(checkpoint, device, dtype, record)
    model: GPT = loaded.model  # type: ignore[assignment]
    results = []
    for spec, (examples, source) in zip(specs, loaded_tasks, strict=True):
        emit(EvalEvent("info", message=f"Evaluating {loaded.path} on {spec.name}: "
                                       f"{workspace.counted(len(examples), 'example')} from {source}"))
        emit(EvalEvent("start", total=len(examples), unit="examples"))
        started = time.perf_counter()
        sums = task_sums(
            spec, model, examples, batch_size=batch_size, autocast=autocast,
            on_progress=lambda done, all_: emit(EvalEvent("progress", done=done, total=all_, unit="examples")),
        )
        figures = task_figures(spec, sums, len(examples))
        _say_if_non_finite(sums[0], emit)
        result = TaskResult(
            checkpoint=str(loaded.path), step=loaded.state.get("step"), task=spec.name, source=source,
            examples=len(examples), **figures,  # type: ignore[arg-type]
            seconds=time.perf_counter() - started, device=str(next(model.parameters()).device), dtype=dtype_name,
        )
        if record and _recorded(loaded):
            result.recorded_in = str(record_result(loaded.path, result))
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


# ----------------------------------------------------------------------------------------------- records
def _append(path: Path, text: str, title: str = "") -> int | None:
    """Append `text` in one write, flushed to disk: a crash leaves the file as it was or with the whole record,
    and a write that fails (a full disk) is taken back. A file whose last line was cut (an earlier crash, an
    editor) gets a line break first, so the record stays a line of its own. `title` starts the file where this
    write makes it: the file is made by an exclusive create, so of two processes appending at once one writes the
    title. Returns the file's size before (None: this write made it), for `_undo_append`."""
    made = None
    if title:
        try:
            made = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                                     | getattr(os, "O_BINARY", 0), 0o666), "wb")
            text = title + text
        except FileExistsError:
            pass
    existed = made is None and path.exists()
    with made or open(path, "a+b") as handle:
        before = handle.seek(0, os.SEEK_END)
        if before > 0:
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                text = "\n" + text
        try:
            handle.write(text.encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())
        except OSError:
            with contextlib.suppress(OSError):  # what is left in its buffer fails to go again
                handle.close()
            _undo_append(path, before if existed else None)
            raise
    return before if existed else None


def _undo_append(path: Path, before: int | None) -> None:
    """Take back an `_append` that returned `before`."""
    with contextlib.suppress(OSError):
        if before is None:
            path.unlink()
        else:
            os.truncate(path, before)


def _report_section(result: LossResult | TaskResult, when: str) -> str:
    if isinstance(result, LossResult):
        title = f"loss on {result.dataset}/{result.split}"
        rows = [
            ("loss", f"{result.loss:.4f}"), ("perplexity", f"{result.perplexity:.2f}"),
            ("bits per byte", f"{result.bits_per_byte:.4f}" if result.bits_per_byte is not None else "n/a"),
            ("scored", f"{result.tokens:,} tokens ({result.text_bytes:,} bytes of text) in "
                       f"{workspace.counted(result.windows, 'window')} of {result.window_tokens}"),
        ]
    elif result.perplexity is not None:
        title = f"{result.task} (zero-shot)"
        rows = [
            ("accuracy (last word, greedy)", f"{result.accuracy:.4f} ± {result.accuracy_stderr:.4f}"),
            ("perplexity (of the last word)", f"{result.perplexity:.2f}"),
            ("examples", f"{workspace.counted(result.examples, 'example')} from {result.source}"),
        ]
    else:
        title = f"{result.task} (zero-shot)"
        rows = [
            ("accuracy (length-normalised)", f"{result.accuracy_norm:.4f} ± {result.accuracy_norm_stderr:.4f}"),
            ("accuracy", f"{result.accuracy:.4f} ± {result.accuracy_stderr:.4f}"),
            ("examples", f"{workspace.counted(result.examples, 'example')} from {result.source}"),
        ]
    rows += [("checkpoint", f"`{result.checkpoint}` (step {result.step})"),
             ("device", f"{result.device} {result.dtype}, {result.seconds:.1f} s")]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"\n## Evaluation: {title} · {when}\n\n| | |\n|---|---|\n{table}\n"


def _recorded(loaded: LoadedCheckpoint) -> bool:
    """Whether results of this model are recorded: never into a Hugging Face folder or the hub cache."""
    return loaded.state.get("format") != "huggingface"


_UNRECORDABLE = "make the run folder writable, or pass --no-record"


def _check_recordable(loaded: LoadedCheckpoint) -> None:
    """Refuse up front, not after minutes of scoring, a run folder the result could not be appended to."""
    if not _recorded(loaded):
        return
    folder = record_folder(loaded.path)
    for path in (folder / "eval.jsonl", folder / "report.md"):
        if path.is_dir() or (path.exists() and not os.access(path, os.W_OK)):
            raise TinyGPTError(f"cannot record the result in {folder} ({path.name} is not writable): {_UNRECORDABLE}")
    if not os.access(folder, os.W_OK):  # where a first record, and report.md's lock, are made
        raise TinyGPTError(f"cannot record the result in {folder} (the folder is not writable): {_UNRECORDABLE}")


def json_safe(result: LossResult | TaskResult) -> dict[str, Any]:
    """The result's fields with a non-finite number (the NaN loss of a damaged checkpoint) as None: strict JSON
    has no NaN or Infinity, and parsers other than Python's reject them."""
    return workspace.strict_json(asdict(result))


def record_result(checkpoint: Path | str, result: LossResult | TaskResult) -> Path:
    """Append `result` to `eval.jsonl` and `report.md` of the checkpoint's run; returns the run folder."""
    checkpoint = Path(checkpoint)
    folder = record_folder(checkpoint)
    when = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {"time": when, **{k: v for k, v in json_safe(result).items() if k != "recorded_in"}}
    try:
        # a stop waits for both: cut in two, eval.jsonl would hold a result report.md lacks
        with stops_held() as stops, report_lock(folder):
            before = _append(folder / "eval.jsonl", json.dumps(record, allow_nan=False) + "\n")
            try:
                _append(folder / "report.md", _report_section(result, when), title=f"# Run {folder.name}\n")
            except OSError:
                _undo_append(folder / "eval.jsonl", before)
                raise
    except OSError as exc:
        advice = "free some space, or pass --no-record" if os_problem(exc) == FULL else _UNRECORDABLE
        raise TinyGPTError(f"cannot record the result in {folder} ({exc.strerror}): {advice}") from None
    except DataError as exc:  # report.md's lock: not made (an inode quota), or held past its patience
        raise TinyGPTError(f"cannot record the result in {folder} ({exc}): {_UNRECORDABLE}") from None
    if stops:  # then the stop (a caller's loop of evaluations ends there), saying where the result went
        stopped = Stopped(stops[0])
        stopped.recorded_in = folder  # type: ignore[attr-defined]
        raise stopped
    return folder
