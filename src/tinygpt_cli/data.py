"""Corpora in, token files out: `tokenize()` writes `data/<name>/{train,val}.bin` + `meta.json`.

Token files are raw little-endian uint16 GPT-2 ids, each document followed by `<|endoftext|>` (50256).
The train/val split is by whole document (inside each, for a source of few) and depends only on the source,
`--fraction`, `--val-fraction` and `--seed`:

* every document has a position `i` in the source (files in sorted order; lines of a .jsonl; rows of a
  .parquet; see `sources.py`) and two keyed hashes of `(seed, i)`;
* `--fraction f` keeps the `max(1, round(n*f))` documents with the lowest *selection* hash;
* of those, the `max(1, round(m*val_fraction))` with the lowest *split* hash form the val split;
* a source of fewer than `FEW_DOCUMENTS` documents used (one .txt file, a folder of a few books) is split
  inside each instead: the last `cut_share` of every document, cut at a line break, is the val split:
  --val-fraction, or enough text to measure a loss on where that is more (a tenth of a short document, 1 MiB of a
  long one). A whole document in val would be a quarter of 4 books' text, whatever --val-fraction asked.

The hashes are splitmix64, a bijection, so no two documents tie and "the k lowest" is "at most the k-th lowest
value": the pipeline finds that threshold in two streaming passes and then decides each document on its own,
so memory does not grow with the corpus.

Streaming and memory: documents are read in order, grouped into tasks of about `TASK_TEXT_BYTES` of text and
encoded by `workers` threads (tiktoken's Rust encoder releases the GIL), at most `2 * workers` tasks in flight;
results are appended in task order, so the output is byte-identical whatever the number of workers.

Atomic and resumable: everything is written to `data/.<name>.partial/`, and at the first document boundary
every `CHECKPOINT_SECONDS` the pipeline drains, fsyncs the .bin files and records the position reached in
`progress.json` (a checkpoint falls between documents: one long .txt file is a single document, read whole).
A killed run leaves only that hidden folder; rerunning the same command truncates the .bin files to the
recorded point and continues; other settings (or `restart=True`) start over. The folder is renamed to
`data/<name>/` only when complete, with `meta.json` holding a sha256 per file so `train` refuses a truncated or
foreign `.bin`.

Empty documents are skipped and counted; undecodable text is handled as `sources.py` documents.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import glob
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tinygpt_cli import __version__, workspace
from tinygpt_cli.config import is_count, kind_problem, seed_problem
from tinygpt_cli.errors import DataError
from tinygpt_cli.launch import Stopped, stops_held
from tinygpt_cli.sources import (  # noqa: F401  (re-exported: the data API of earlier versions)
    EMBEDDED_NAME,
    RAW_DIR_NAME,
    TEXT_SUFFIXES,
    DocumentFile,
    Source,
    SourceUnreadable,
    TextFile,
    available_cpus,
    conversion_advice,
    cut_tail,
    default_source_spec,
    embedded_source,
    iter_documents,
    local_source,
    other_files_advice,
    resolve_source,
    source_fingerprint,
)
from tinygpt_cli.tokenizer import EOT_ID, RANKS_SHA256, TOKENIZER_NAME, VOCAB_SIZE

META_FORMAT = "tinygpt-tokens"
META_VERSION = 1
FULL_HASH_LIMIT = 256 * 1024 * 1024  # files up to this size are fully re-hashed before training
EDGE_BYTES = 1024 * 1024  # larger files: size + sha256 of their first and last MiB
FEW_DOCUMENTS = 10  # fewer used: each document is cut for val instead of whole documents going to val
CUT_MIN_VAL = 0.1  # the least share of a cut document's text in val (of one under CUT_MIN_VAL_BYTES / 0.1) ...
CUT_MIN_VAL_BYTES = 1024 * 1024  # ... or this much of it, where that is more than --val-fraction: enough to measure
THIN_VAL_TOKENS = 8192  # a val split under this many tokens gets a note: a loss on it says little
LOPSIDED_VAL_SHARE = 0.2  # whole documents that put more of the tokens in val than this get a note
TASK_TEXT_BYTES = 1024 * 1024  # text per encoding task: what bounds memory, with 2 tasks in flight per worker
CHECKPOINT_SECONDS = 30.0  # how much work a killed run can lose
SAMPLE_TEXT_BYTES = 256 * 1024  # text encoded up front to estimate the token count
BYTES_PER_TOKEN_GUESS = 3.8  # when there is nothing to sample
HASH_BLOCK = 1 << 20  # documents hashed at once when planning the split
PROGRESS_FILE = "progress.json"
MAX_NAMED_UNDECODABLE = 20


# ----------------------------------------------------------------------------------------------- split
def check_seed(seed: int) -> None:
    """A document-choice seed of `tokenize` or `download` (past 64 bits it wrapped silently)."""
    if problem := seed_problem("--seed", seed):
        raise DataError(problem)


def keyed_hash(seed: int, stream: int, start: int, count: int) -> np.ndarray:
    """splitmix64 of (seed, stream, i) for i in start..start+count-1: a fixed pseudo-random number per document."""
    with np.errstate(over="ignore"):
        x = np.arange(start, start + count, dtype=np.uint64)
        x += np.uint64((seed * 0x9E3779B97F4A7C15 + stream) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _kth_smallest(values: Callable[[int, int], np.ndarray], n: int, k: int) -> int:
    """The k-th smallest (1-based) of the distinct uint64 values `values(lo, hi)` yields over 0..n-1.

    Small inputs are sorted; large ones take two streaming passes: a histogram of the top 16 bits picks the
    bucket holding the answer, the second pass keeps only that bucket (~n/65536 values, hashes being uniform).
    """
    if n <= HASH_BLOCK:
        everything = values(0, n)
        return int(np.partition(everything, k - 1)[k - 1])
    top = np.uint64(48)
    histogram = np.zeros(1 << 16, dtype=np.int64)
    for lo in range(0, n, HASH_BLOCK):
        histogram += np.bincount((values(lo, min(n, lo + HASH_BLOCK)) >> top).astype(np.intp), minlength=1 << 16)
    cumulative = np.cumsum(histogram)
    bucket = int(np.searchsorted(cumulative, k))
    k -= int(cumulative[bucket - 1]) if bucket else 0
    kept = []
    for lo in range(0, n, HASH_BLOCK):
        block = values(lo, min(n, lo + HASH_BLOCK))
        kept.append(block[(block >> top) == np.uint64(bucket)])
    return int(np.sort(np.concatenate(kept))[k - 1])


@dataclass(frozen=True)
class SplitPlan:
    """Which documents are used and which of them are val: a code per position (0 skip, 1 train, 2 val)."""

    n_documents: int
    selected_count: int
    val_count: int
    seed: int
    select_below: int  # a document is used iff its selection hash <= this
    val_below: int  # a used document is val iff its split hash <= this

    @classmethod
    def build(cls, n_documents: int, fraction: float, val_fraction: float, seed: int) -> SplitPlan:
        selected_count, val_count = split_counts(n_documents, fraction, val_fraction)
        top = 2**64 - 1
        select_below = top
        if selected_count < n_documents:
            select_below = _kth_smallest(lambda lo, hi: keyed_hash(seed, 1, lo, hi - lo), n_documents,
                                         selected_count)
        val_below = -1
        if val_count:

            def selected_split_hashes(lo: int, hi: int) -> np.ndarray:
                keep = keyed_hash(seed, 1, lo, hi - lo) <= np.uint64(select_below)
                return keyed_hash(seed, 2, lo, hi - lo)[keep]

            val_below = _kth_smallest(selected_split_hashes, n_documents, val_count) if val_count < selected_count \
                else top
        return cls(n_documents, selected_count, val_count, seed, select_below, val_below)

    @property
    def cuts_documents(self) -> bool:
        """Whether each document is cut for val (few of them) rather than whole documents going to val."""
        return self.selected_count < FEW_DOCUMENTS

    def codes(self, lo: int, hi: int) -> np.ndarray:
        """int8 codes of the documents lo..hi-1."""
        count = hi - lo
        selected = keyed_hash(self.seed, 1, lo, count) <= np.uint64(self.select_below)
        codes = selected.astype(np.int8)
        if self.val_count:
            codes[selected & (keyed_hash(self.seed, 2, lo, count) <= np.uint64(self.val_below))] = 2
        return codes


def cuts_documents(meta: dict[str, Any]) -> bool:
    """Whether a dataset's val split was cut inside its documents (fewer than FEW_DOCUMENTS used): the part of
    SPLIT_RULE earlier versions applied otherwise."""
    selected = (meta.get("documents") or {}).get("selected")
    return isinstance(selected, int) and selected < FEW_DOCUMENTS


def split_counts(n_documents: int, fraction: float, val_fraction: float) -> tuple[int, int]:
    """(documents kept, of those in val) by SPLIT_RULE; val 0 where each kept document is cut for val instead."""
    selected = min(n_documents, max(1, round(n_documents * fraction)))
    return selected, max(1, round(selected * val_fraction)) if selected >= FEW_DOCUMENTS else 0


def cut_share(val_fraction: float, text_bytes: int) -> float:
    """The share of a document that a cut puts in val (`SplitPlan.cuts_documents`): --val-fraction, raised to
    enough text to measure a loss on, CUT_MIN_VAL of a short document or CUT_MIN_VAL_BYTES of a long one (a 5 GB
    file keeps --val-fraction 0.005 of itself for val, not a tenth)."""
    return max(val_fraction, min(CUT_MIN_VAL, CUT_MIN_VAL_BYTES / max(1, text_bytes)))


def plan_split(n_documents: int, fraction: float, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selected, in_val) boolean masks over the source's documents. See the module docstring."""
    codes = SplitPlan.build(n_documents, fraction, val_fraction, seed).codes(0, n_documents)
    return codes > 0, codes == 2


SPLIT_RULE = (
    "documents numbered in source order; keep the max(1, round(n*fraction)) with the lowest "
    "splitmix64(seed, 1, i); of those the max(1, round(m*val_fraction)) with the lowest splitmix64(seed, 2, i) "
    "are val; with fewer than 10 kept, none is, and each is cut at the line break before its last "
    "max(val_fraction, min(0.1, 1 MiB / its bytes)), that tail val"
)


# ----------------------------------------------------------------------------------------------- encoding
_EOT = np.array([EOT_ID], dtype=np.uint32)
TRAIN, VAL = 1, 2
SPLITS = {TRAIN: "train", VAL: "val"}


@dataclass
class _Encoded:
    """What one task produced: tokens per split (EOT-terminated documents) and what went in."""

    tokens: dict[int, np.ndarray]
    documents: dict[int, int]
    text_bytes: int
    documents_done: int  # documents whose last piece is in this task
    end_position: int  # every document before this position is fully in this or an earlier task


def _encode_items(encoding, items: list[tuple[str, int, bool]], documents_done: int, end_position: int) -> _Encoded:
    """Encode `(text, split, ends_document)` items in order; runs in a worker thread (the encoder drops the GIL)."""
    parts: dict[int, list[np.ndarray]] = {TRAIN: [], VAL: []}
    documents = {TRAIN: 0, VAL: 0}
    text_bytes = 0
    for text, split, ends_document in items:
        try:
            ids = encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: replaced by U+FFFD, as tiktoken's encode_ordinary does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            ids = encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        text_bytes += len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))
        parts[split].append(ids)
        if ends_document:
            parts[split].append(_EOT)
            documents[split] += 1
    tokens = {split: np.concatenate(arrays).astype(np.uint16) for split, arrays in parts.items() if arrays}
    return _Encoded(tokens, documents, text_bytes, documents_done, end_position)


def _sample_bytes_per_token(src: Source, encoding) -> float:
    """Bytes per token over the first `SAMPLE_TEXT_BYTES` of the source: the plan's token estimate."""
    texts, size = [], 0
    for _, _, document in iter_documents(src, lambda lo, hi: np.ones(hi - lo, dtype=np.int8)):
        text = document if isinstance(document, str) else next(document.segments(None))[0]
        texts.append(text[: SAMPLE_TEXT_BYTES - size])
        size += len(texts[-1])
        if size >= SAMPLE_TEXT_BYTES:
            break
    tokens = sum(len(ids) for ids in encoding.encode_ordinary_batch(texts, num_threads=1)) if texts else 0
    text_bytes = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
    return text_bytes / tokens if tokens else BYTES_PER_TOKEN_GUESS


# ----------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """Appends uint16 tokens to a .bin file while hashing them; can reopen a file at a recorded length."""

    def __init__(self, path: Path, resume: dict[str, int] | None = None) -> None:
        self.path = path
        self.sha256 = hashlib.sha256()
        self.tokens = self.documents = 0
        if resume is None:
            self.handle = open(path, "wb")
            return
        self.handle = open(path, "r+b")
        self.handle.truncate(resume["bytes"])  # drop whatever was written after the checkpoint
        for block in iter(lambda: self.handle.read(8 * 1024 * 1024), b""):
            self.sha256.update(block)
        self.tokens, self.documents = resume["tokens"], resume["documents"]

    def write(self, tokens: np.ndarray, documents: int) -> None:
        data = tokens.astype("<u2", copy=False).tobytes()
        self.handle.write(data)
        self.sha256.update(data)
        self.tokens += int(tokens.size)
        self.documents += documents

    def sync(self) -> dict[str, int]:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        return {"bytes": self.tokens * 2, "tokens": self.tokens, "documents": self.documents}

    def close(self) -> dict[str, Any]:
        self.sync()
        self.handle.close()
        return {
            "file": self.path.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.tokens * 2,
            "sha256": self.sha256.hexdigest(),
            "edge_sha256": _edge_hash(self.path),
        }


def _edge_hash(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            handle.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            digest.update(handle.read(EDGE_BYTES))
    return digest.hexdigest()


@dataclass
class _Counters:
    """How far a run got; saved at each checkpoint, so a resumed run reports the whole job."""

    position: int = 0  # documents before this position are done
    documents: int = 0  # selected documents done (written or skipped)
    text_bytes: int = 0
    skipped_empty: int = 0
    skipped_undecodable: int = 0
    undecodable: list[str] = field(default_factory=list)  # the first few, named

    def note_undecodable(self, where: str) -> None:
        self.skipped_undecodable += 1
        if len(self.undecodable) < MAX_NAMED_UNDECODABLE:
            self.undecodable.append(where)


class TokenizeInterrupted(Stopped):
    """Ctrl-C (or the CLI's SIGTERM, `signal`) during `tokenize`; `saved`: whether a checkpoint lets the same
    command continue; `written`: the dataset, complete, where the stop came as it was put in place."""

    def __init__(self, saved: bool, signum: int | None = None, written: Path | None = None) -> None:
        super().__init__(signum)
        self.saved = saved
        self.written = written


class _Partial:
    """`data/.<name>.partial/`: the .bin files being written and `progress.json`, the last consistent point."""

    def __init__(self, folder: Path, job: dict[str, Any]) -> None:
        self.folder = folder
        self.job = job
        self.writers: dict[int, _SplitWriter] = {}

    def open(self, restart: bool) -> tuple[_Counters, str]:
        """Open the .bin files, resuming a matching earlier run unless `restart`. Returns (counters, note)."""
        saved, why = (None, "--restart") if restart else self._saved_progress()
        note = ""
        if saved is None:
            if self.folder.exists():
                note = f"starting over: discarded the unfinished output of an earlier run ({why})"
            if self.folder.is_file():  # its own hidden name: a file there is debris
                self.folder.unlink()
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
            self.writers = {split: _SplitWriter(self.folder / f"{name}.bin") for split, name in SPLITS.items()}
            return _Counters(), note
        counters = _Counters(**saved["counters"])
        self.writers = {
            split: _SplitWriter(self.folder / f"{name}.bin", resume=saved["splits"][name])
            for split, name in SPLITS.items()
        }
        return counters, f"resuming an interrupted run at document {counters.documents:,}"

    def _saved_progress(self) -> tuple[dict[str, Any] | None, str]:
        """The earlier run's checkpoint if it can be continued, else None and why not."""
        try:
            saved = json.loads((self.folder / PROGRESS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, "it stopped before its first checkpoint"
        job = saved.get("job") if isinstance(saved, dict) else None
        if job != self.job:
            upgraded = isinstance(job, dict) and any(job.get(key) != self.job[key] for key in
                                                     ("format", "split_rule", "tokenizer"))
            return None, ("made by another version of tinygpt, which splits or stores it otherwise" if upgraded else
                          "other settings or changed input files")
        try:
            _Counters(**saved["counters"])
            for name in SPLITS.values():
                file = self.folder / f"{name}.bin"
                if not file.is_file() or file.stat().st_size < int(saved["splits"][name]["bytes"]):
                    return None, f"its {name}.bin is shorter than its checkpoint"
        except (KeyError, TypeError, ValueError):
            return None, "its progress.json is unreadable"
        return saved, ""

    def write(self, encoded: _Encoded) -> None:
        for split, tokens in encoded.tokens.items():
            self.writers[split].write(tokens, encoded.documents[split])

    @property
    def tokens(self) -> int:
        return sum(w.tokens for w in self.writers.values())

    def checkpoint(self, counters: _Counters) -> None:
        splits = {SPLITS[split]: writer.sync() for split, writer in self.writers.items()}
        write_json_atomic(self.folder / PROGRESS_FILE, {"job": self.job, "splits": splits,
                                                          "counters": asdict(counters)})

    def close(self) -> dict[str, dict[str, Any]]:
        """Close the finished .bin files. `progress.json` stays until the dataset is published (`_publish`): a
        process killed before then leaves a checkpoint at the end, which the same command publishes."""
        return {SPLITS[split]: writer.close() for split, writer in self.writers.items()}

    @property
    def saved(self) -> bool:
        """Whether a checkpoint of this job is on disk (the same command continues from it)."""
        return (self.folder / PROGRESS_FILE).is_file()

    def release(self) -> None:
        """Close the writers' files, finished or not (an error or a stop)."""
        for writer in self.writers.values():
            with contextlib.suppress(OSError):
                writer.handle.close()

    def abandon(self, keep_progress: bool = True) -> None:
        """Close the writers and remove the folder, unless it holds progress the same command continues from
        (and `keep_progress`): "nothing was kept" leaves nothing on disk, nor holds the space a full disk needs."""
        self.release()
        if not (keep_progress and self.saved):
            shutil.rmtree(self.folder, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- tokenize
@dataclass
class TokenizeResult:
    """What `tokenize` wrote: the dataset's name, its folder (`train.bin`, `val.bin`) and its `meta.json`, which
    holds the counts; the documents it skipped; its time and threads; what an interrupted earlier call had done."""

    name: str
    path: Path
    meta: dict[str, Any]
    skipped_empty: int = 0
    skipped_undecodable: list[str] = field(default_factory=list)  # the first few, named (meta has the count)
    seconds: float = 0.0
    resumed_documents: int = 0  # documents an interrupted earlier run had already done
    workers: int = 0
    resumed_tokens: int = 0  # tokens it had written (not this run's work)
    unchanged: bool = False  # the dataset was already this tokenization (same files, unchanged, same settings)


@dataclass(frozen=True)
class TokenizeEvent:
    """`kind`: "info" (a `message`), "plan" (before work), "progress" (after each task) or "done".

    Counts cover the whole job (a resumed run includes what was done before); rates cover this run.
    """

    kind: str
    message: str = ""
    source: str = ""  # what is tokenized, in words
    documents: int = 0  # selected documents done so far (plan: documents to do)
    total_documents: int = 0  # plan: documents in the source; progress: documents to do
    tokens: int = 0
    text_bytes: int = 0
    total_text_bytes: int = 0  # estimated
    estimated_tokens: int = 0
    resumed_documents: int = 0
    workers: int = 0
    seconds: float = 0.0
    documents_per_s: float = 0.0
    tokens_per_s: float = 0.0
    bytes_per_s: float = 0.0
    eta_s: float | None = None


def tokenize(
    source: str | os.PathLike | None = None,
    *,
    name: str | None = None,
    fraction: float = 1.0,
    val_fraction: float = 0.005,
    seed: int = 0,
    text_field: str = "text",
    workers: int | None = None,
    restart: bool = False,
    force: bool = False,
    on_event: Callable[[TokenizeEvent], None] | None = None,
) -> TokenizeResult:
    """Tokenize a corpus into `data/<name>/`, streaming, in parallel, resumably. See the module docstring.

    `source`: None or "shakespeare" (the embedded corpus), a downloaded dataset's name, or a file, folder or glob
    of .txt/.jsonl(.gz)/.parquet files. `workers`: encoding threads (default: every core this process may use).
    An interrupted run is continued by the next call with the same arguments unless `restart`. A dataset of
    that name made from another source is replaced only with `force` (runs trained on it would read new data).
    """
    from tinygpt_cli.tokenizer import get_encoding

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if source is not None and not isinstance(source, str):  # a list of files, say
        raise DataError(f"tokenize takes one source, not a {type(source).__name__}: a file, a folder, a glob "
                        f"('corpus/*.txt') or a dataset name; put several files in one folder")
    for flag, value in (("--fraction", fraction), ("--val-fraction", val_fraction)):
        if problem := kind_problem(flag, value):
            raise DataError(problem)
    check_seed(seed)
    fraction, val_fraction, seed = float(fraction), float(val_fraction), int(seed)  # numpy's as Python's (JSON)
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1] (got {fraction})")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    if workers is not None and workers < 1:
        raise DataError(f"--workers must be at least 1 (got {workers})")
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    src = resolve_source(source, text_field)
    if src.left_out_folders:  # `corpus/*` read corpus/'s files and dropped its subfolders without a word
        emit(TokenizeEvent("info", message=f"left out {_folders(src.left_out_folders, 'the pattern matched')}: a "
                           f"glob reads the files it matches; pass the folder itself to read everything under it"))
    if src.unreadable_folders:  # os.walk passed over them without a word (lost+found at a disk's root, say)
        emit(TokenizeEvent("info", message=f"left out {_folders(src.unreadable_folders, 'it cannot read')}: check "
                           f"the permissions to include them"))
    if src.other_splits:  # a snapshot's test split silently trained on (audit)
        emit(TokenizeEvent("info", message=f"left out {len(src.other_splits):,} file(s) of the corpus's other "
                           f"splits (first: {src.other_splits[0]}): a folder with train files is tokenized from "
                           f"those; name a file or a glob to read others"))
    if src.left_out:  # a folder of .json.gz shards plus a README.txt was the README alone, silently
        advice = other_files_advice([Path(path) for path in src.left_out])
        emit(TokenizeEvent("info", message=f"left out {len(src.left_out):,} file(s) that are not .txt, .jsonl, "
                           f".jsonl.gz or .parquet (first: {src.left_out[0]}){'; ' + advice if advice else ''}"))
    dataset_name = _output_name(name, src)
    encoding = get_encoding()
    cores = available_cpus()
    if workers is not None and workers > 4 * cores:  # each holds two tasks of text, and none runs faster for it
        raise DataError(f"--workers {workers} is more than {cores} cores can use (encoding is CPU-bound): use at "
                        f"most {4 * cores}, or leave it out for {cores}")
    workers = workers or cores

    if src.documents == 1 and fraction < 1.0:  # it would keep the whole document and record the fraction
        raise DataError(f"--fraction keeps whole documents, and {src.description} is a single document: drop "
                        f"--fraction to tokenize all of it, or split it into several files")
    plan = SplitPlan.build(src.documents, fraction, val_fraction, seed)
    if plan.val_count >= plan.selected_count and not plan.cuts_documents:  # no seed can help: say so first
        raise DataError(f"--val-fraction {val_fraction:g} puts all {plan.selected_count:,} documents used in the val "
                        f"split, leaving none to train on: lower --val-fraction, or add documents")
    total_bytes = int(src.text_bytes * plan.selected_count / max(1, src.documents))
    estimated_tokens = int(total_bytes / _sample_bytes_per_token(src, encoding))

    out_root = workspace.data_dir()
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create {out_root} ({exc.strerror or exc}): choose a writable TINYGPT_HOME") from None
    final_dir = out_root / dataset_name
    home = where_published(final_dir)
    partial_dir = _partial_of(home)  # an earlier run's files there count as written
    written = sum(f.stat().st_size for f in partial_dir.glob("*.bin")) if partial_dir.is_dir() else 0
    job = {"format": META_VERSION, "source": source_fingerprint(src), "text_field": src.text_field,
           "fraction": fraction, "val_fraction": val_fraction, "seed": seed, "tokenizer": RANKS_SHA256,
           "split_rule": SPLIT_RULE}  # a partial of another version's rule starts over: no dataset of two rules
    def up_to_date(done: Dataset) -> TokenizeResult:  # `tokenize && train` in a script: the second time
        # ... it is "the last tokenized" again, as the work would have made it: train and plan take it
        done.meta["confirmed"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with contextlib.suppress(OSError):  # another user's, a read-only disk: used as it is
            write_json_atomic(final_dir / "meta.json", done.meta)
        emit(TokenizeEvent("info", message=f"nothing to do: data/{dataset_name} is already {src.description} "
                                           f"tokenized with these settings, its files unchanged since (--restart "
                                           f"tokenizes it again)"))
        return TokenizeResult(dataset_name, final_dir, done.meta, seconds=time.perf_counter() - started,
                              workers=workers, unchanged=True)

    done = None if restart or os.access(home.parent, os.W_OK) else _already_tokenized(final_dir, job)
    if done is not None:  # a read-only data/ (a shared mount): no lock can be made there, and none is needed
        return up_to_date(done)
    # the lock goes beside the folder written (a link's target): another name or workspace linked there shares it
    with workspace.exclusive(workspace.lock_of(home), f"data/{dataset_name}"):
        _check_replaceable(final_dir, src)  # even with --force: what is there may be the user's own files
        _finish_killed_publish(home, partial_dir)
        done = None if restart else _already_tokenized(final_dir, job)
        if done is not None:  # nothing to redo
            return up_to_date(done)
        _check_ours_to_change(dataset_name, home, partial_dir)
        workspace.check_disk(home.parent, 2 * estimated_tokens - written,
                             f"data/{dataset_name} (~{estimated_tokens:,} tokens)",
                             "free some space, set TINYGPT_HOME to a larger disk, or tokenize a part with --fraction")
        # a run reads it now, or trained on it: it would change under them
        _check_not_in_use(final_dir, src, {"fraction": fraction, "val_fraction": val_fraction, "seed": seed}, force)
        if not force:  # under the lock: another tokenize cannot publish in between
            _check_not_another_source(final_dir, src)
        partial = _Partial(partial_dir, job)
        try:
            counters, note = partial.open(restart)
            if note and counters.documents >= plan.selected_count:  # one that waited for a run's end, or --force
                note = "an earlier run of this command finished it: putting it in place"
            if note:
                emit(TokenizeEvent("info", message=note))
            resumed_documents, resumed_tokens = counters.documents, partial.tokens
            emit(TokenizeEvent("plan", source=src.description, documents=plan.selected_count,
                               total_documents=src.documents, total_text_bytes=total_bytes,
                               estimated_tokens=estimated_tokens, resumed_documents=resumed_documents,
                               workers=workers))
            _run_pipeline(src, plan, partial, counters, encoding, workers, val_fraction, emit, total_bytes)
            partial.checkpoint(counters)  # the end is a checkpoint too: a process killed from here on loses nothing
            # a stop from here on waits for the dataset to be published: cut in two, it would leave neither the old
            # dataset nor the new one in place (audit)
            with stops_held() as stops:
                splits = partial.close()
                _check_result(src, splits, counters)
                for note in (_lopsided_val(splits, plan, val_fraction), _thin_val(splits, plan, val_fraction)):
                    if note:
                        emit(TokenizeEvent("info", message=note))
                meta = _meta(dataset_name, src, plan, fraction, val_fraction, seed, counters, splits)
                meta["job_sha256"] = _job_digest(job)  # what made it: the same job again finds it up to date
                write_json_atomic(partial.folder / "meta.json", meta)
                changed = _check_publishable(final_dir, meta, force)
                _publish(partial.folder, home)
                if changed:
                    emit(TokenizeEvent("info", message=changed))
        except SplitRuleChanged as exc:  # finished, it waits for --force
            partial.abandon()
            raise DataError(str(exc)) from None
        except SourceUnreadable as exc:  # an NFS or USB hiccup at hour 9 must not cost the first 9 hours
            partial.abandon()
            again = "it continues where it stopped" if partial.saved else "it starts over (nothing was saved yet)"
            raise DataError(f"{exc} the same command, {again}") from None
        except DataError:
            partial.abandon(keep_progress=False)  # bad input: retrying cannot help; leave nothing
            raise
        except OSError as exc:
            partial.abandon()
            again = "it continues where it stopped" if partial.saved else "it starts over (nothing was saved yet)"
            raise DataError(
                f"cannot write {partial.folder} ({exc.strerror or exc}): fix that and rerun the same command, {again}"
            ) from exc
        except KeyboardInterrupt as exc:
            partial.abandon()  # a checkpoint stays, and the same command continues from it
            raise TokenizeInterrupted(partial.saved, getattr(exc, "signal", None)) from None
        except BaseException:
            partial.release()
            raise
        if stops:  # the stop, now that it cannot cut the dataset in two (`tokenize && train` must not go on)
            raise TokenizeInterrupted(False, stops[0], written=final_dir)
    seconds = time.perf_counter() - started
    tokens = splits["train"]["tokens"] + splits["val"]["tokens"]
    emit(TokenizeEvent("done", source=src.description, documents=plan.selected_count,
                       total_documents=plan.selected_count, tokens=tokens, text_bytes=counters.text_bytes,
                       total_text_bytes=total_bytes, resumed_documents=resumed_documents, workers=workers,
                       seconds=seconds))
    return TokenizeResult(dataset_name, final_dir, meta, counters.skipped_empty, list(counters.undecodable),
                          seconds, resumed_documents, workers, resumed_tokens)


def _already_tokenized(final_dir: Path, job: dict[str, Any]) -> Dataset | None:
    """The dataset in `final_dir` where this same job made it (the same source files, by path, size and
    modification time, and the same settings) and its token files are whole; None otherwise."""
    if not (final_dir / "meta.json").is_file():
        return None
    try:
        dataset = load_dataset(final_dir)
        if dataset.meta.get("job_sha256") != _job_digest(job):
            return None
        dataset.check_files()
    except (DataError, OSError, ValueError):
        return None
    return dataset


def _job_digest(job: dict[str, Any]) -> str:
    """sha256 of a tokenize job (every source file's path, size, time and documents, and the settings): a
    corpus of thousands of shards records 64 characters, not a line per shard."""
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()


def _folders(folders: tuple[str, ...], which: str) -> str:
    """`N folder(s) <which> (the first, ...)` for a note."""
    return f"{workspace.counted(len(folders), 'folder')} {which} ({folders[0]}{', ...' if len(folders) > 1 else ''})"


def _output_name(name: str | None, src: Source) -> str:
    """The dataset's folder name: `--name` as given (a plain folder name, else an error), or the source's."""
    if name is not None:
        problem = workspace.name_problem(name, "data/", "my-data")
        if problem:
            raise DataError(problem)
        if name.lower() == RAW_DIR_NAME:  # also on a filesystem that ignores case
            raise DataError(f"--name {name} is reserved: data/{RAW_DIR_NAME}/ holds downloads; pick another")
        return name
    return src.name if src.name != RAW_DIR_NAME else f"{RAW_DIR_NAME}-text"


def _run_pipeline(
    src: Source,
    plan: SplitPlan,
    partial: _Partial,
    counters: _Counters,
    encoding,
    workers: int,
    val_fraction: float,
    emit: Callable[[TokenizeEvent], None],
    total_bytes: int,
) -> None:
    """Read → encode in `workers` threads → append in order, checkpointing every `CHECKPOINT_SECONDS`."""
    session_start = time.perf_counter()
    base = (counters.documents, partial.tokens, counters.text_bytes)
    last_checkpoint = session_start
    in_flight: deque[Future[_Encoded]] = deque()
    items: list[tuple[str, int, bool]] = []
    item_bytes = 0
    documents_ended = 0  # documents whose last piece is in `items`
    undecodable: list[str] = []  # reported by the reader since the last task was submitted

    def progress() -> None:
        elapsed = max(time.perf_counter() - session_start, 1e-9)
        done_bytes = counters.text_bytes - base[2]
        bytes_per_s = done_bytes / elapsed
        eta = max(0.0, total_bytes - counters.text_bytes) / bytes_per_s if bytes_per_s > 0 else None
        if counters.documents >= plan.selected_count:
            eta = 0.0  # the total was an estimate
        emit(TokenizeEvent(
            "progress", source=src.description, documents=counters.documents, total_documents=plan.selected_count,
            tokens=partial.tokens, text_bytes=counters.text_bytes, total_text_bytes=total_bytes, workers=workers,
            resumed_documents=base[0], seconds=elapsed, documents_per_s=(counters.documents - base[0]) / elapsed,
            tokens_per_s=(partial.tokens - base[1]) / elapsed, bytes_per_s=bytes_per_s, eta_s=eta,
        ))

    def write(encoded: _Encoded) -> None:
        partial.write(encoded)
        counters.documents += encoded.documents_done
        counters.text_bytes += encoded.text_bytes
        counters.position = encoded.end_position
        progress()

    def submit(end_position: int) -> None:
        nonlocal items, item_bytes, documents_ended
        if items:
            in_flight.append(pool.submit(_encode_items, encoding, items, documents_ended, end_position))
            items, item_bytes, documents_ended = [], 0, 0
        while len(in_flight) > 2 * workers:
            write(in_flight.popleft().result())

    def drain() -> None:
        while in_flight:
            write(in_flight.popleft().result())

    def add(text: str, split: int, eot: bool, finishes_document: bool, position: int) -> None:
        nonlocal item_bytes, documents_ended
        items.append((text, split, eot))
        item_bytes += len(text)
        documents_ended += finishes_document
        if item_bytes >= TASK_TEXT_BYTES:
            submit(position + 1 if finishes_document else position)

    cuts = plan.cuts_documents
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tinygpt-encode") as pool:
        try:
            for position, code, document in iter_documents(src, plan.codes, counters.position,
                                                           undecodable.append):
                if time.perf_counter() - last_checkpoint >= CHECKPOINT_SECONDS:
                    # a consistent point: everything before `position` is read; write it all, then record it
                    submit(position)
                    drain()
                    _account(counters, undecodable, position)
                    partial.checkpoint(counters)
                    last_checkpoint = time.perf_counter()
                _account(counters, undecodable, None)
                if isinstance(document, TextFile):
                    if document.is_blank:
                        counters.skipped_empty += 1
                        counters.documents += 1
                        continue
                    tail_share = cut_share(val_fraction, document.size) if cuts else None
                    for piece, segment, last in document.segments(tail_share):
                        finishes = last and (tail_share is None or segment == 1)
                        add(piece, VAL if segment or code == VAL else TRAIN, last, finishes, position)
                elif not document.strip():
                    counters.skipped_empty += 1
                    counters.documents += 1
                elif cuts:
                    head, tail = cut_tail(document, cut_share(val_fraction, len(document.encode("utf-8", "replace"))))
                    add(head, TRAIN, True, False, position)
                    add(tail, VAL, True, True, position)
                else:
                    add(document, code, True, True, position)
            submit(plan.n_documents)
            drain()
            _account(counters, undecodable, plan.n_documents)
        finally:
            for future in in_flight:
                future.cancel()


def _account(counters: _Counters, undecodable: list[str], position: int | None) -> None:
    """Fold the reader's undecodable reports into the counters (each one is a selected document done)."""
    for where in undecodable:
        counters.note_undecodable(where)
        counters.documents += 1
    undecodable.clear()
    if position is not None:
        counters.position = position


def _meta(
    dataset_name: str,
    src: Source,
    plan: SplitPlan,
    fraction: float,
    val_fraction: float,
    seed: int,
    counters: _Counters,
    splits: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    source = _source_of(src)
    if src.provenance:
        source["download"] = src.provenance
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "name": dataset_name,
        "source": source,
        "tokenizer": {"name": TOKENIZER_NAME, "ranks_sha256": RANKS_SHA256, "vocab_size": VOCAB_SIZE,
                      "eot_id": EOT_ID},
        "dtype": "uint16",
        "fraction": fraction,
        "val_fraction": val_fraction,
        "seed": seed,
        "split_rule": SPLIT_RULE,
        "documents": {"in_source": plan.n_documents, "selected": plan.selected_count,
                      "skipped_empty": counters.skipped_empty,
                      "skipped_undecodable": counters.skipped_undecodable},
        "text_bytes": counters.text_bytes,
        "splits": splits,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tinygpt_version": __version__,
    }


def _check_result(src: Source, splits: dict[str, dict[str, Any]], counters: _Counters) -> None:
    if splits["train"]["tokens"] == 0 and splits["val"]["tokens"] == 0:
        if counters.skipped_undecodable:
            first = counters.undecodable[0]
            raise DataError(
                f"{first} is not UTF-8 text ({counters.skipped_undecodable} document(s) skipped): "
                f"convert it, e.g. {conversion_advice(first)}"
            )
        raise DataError(f"{src.description} holds no text (all documents are empty): check the input")
    text_tokens = {name: split["tokens"] - split["documents"] for name, split in splits.items()}  # less the EOTs
    if text_tokens["train"] == 0 or text_tokens["val"] == 0:  # (tails cut from one-letter documents: EOTs alone)
        empty = "train" if text_tokens["train"] == 0 else "val"
        if counters.skipped_undecodable:  # the likely cause: say it, as when everything was skipped
            raise DataError(
                f"the {empty} split came out empty: {counters.skipped_undecodable} document(s) were skipped as not "
                f"UTF-8 text (first: {counters.undecodable[0]}): convert them, e.g. "
                f"{conversion_advice(counters.undecodable[0])}"
            )
        raise DataError(
            f"the {empty} split came out empty (its documents were empty or skipped): "
            f"change --seed or --val-fraction, or add documents"
        )


def _lopsided_val(splits: dict[str, dict[str, Any]], plan: SplitPlan, val_fraction: float) -> str | None:
    """A note where whole documents put far more in val than --val-fraction asked (one long document among short
    ones): the loss would be measured on most of the text, trained on little of it. None where the share is fair."""
    val, total = splits["val"]["tokens"], splits["train"]["tokens"] + splits["val"]["tokens"]
    share = val / max(1, total)
    if share <= max(LOPSIDED_VAL_SHARE, 4 * val_fraction):
        return None
    why = ("its documents are too short to cut finely: give more text" if plan.cuts_documents else
           "a long document fell in val. Cut long documents into several files, or try another --seed")
    return (f"val holds {share:.0%} of the tokens ({workspace.counted(splits['val']['documents'], 'document')} of "
            f"{plan.selected_count:,}), for --val-fraction {val_fraction:g}: {why}")


def _thin_val(splits: dict[str, dict[str, Any]], plan: SplitPlan, val_fraction: float) -> str | None:
    """A note where val is too small to measure a loss on (a few short documents of a few hundred: one whole
    document is val), said now rather than by `train`, which needs a context and its targets from it."""
    val, total = splits["val"]["tokens"], splits["train"]["tokens"] + splits["val"]["tokens"]
    if val >= THIN_VAL_TOKENS or not val:
        return None
    context = ", fewer than a context of 1,024 (GPT-2's) needs" if val < 1024 + 2 else ""
    # the share val holds now: --val-fraction of the documents, or where they are cut, what `cut_share` raised it to
    share = val / total if plan.cuts_documents else val_fraction
    larger = min(0.25, share * 2 * THIN_VAL_TOKENS / val)
    more = f"raise --val-fraction (e.g. --val-fraction {larger:.2g}) or give more text" if larger > share * 1.1 \
        else "give more text"
    what = "the end of each document" if plan.cuts_documents else \
        workspace.counted(splits["val"]["documents"], "document")
    return f"val holds only {val:,} of {total:,} tokens ({what}): too few for a steady val loss{context}; {more}"


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    workspace.write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def _source_of(src: Source) -> dict[str, Any]:
    """What meta.json records as the source (its `download` provenance aside); `location`: a local source's
    absolute path (or glob), whatever folder it was typed from."""
    local = src.kind == "local"
    return {"kind": src.kind, "spec": src.description if local else src.name,
            "location": str(Path(src.description).expanduser().resolve()) if local else None,
            "text_field": src.text_field if src.kind != "embedded" else None}


def _check_not_in_use(folder: Path, src: Source, settings: dict[str, Any], force: bool) -> None:
    """Refuse to replace a dataset a run is training on now (even with --force, as `data rm` refuses to delete
    it: the run would go on reading the old files, deleted, and could not resume on the new ones), and, without
    --force, to make other data of one that runs trained on (`settings`: --fraction, --val-fraction, --seed and
    --text-field asked for now, which differ from the ones it was made with): resuming one would need it tokenized
    again as it was. The same settings over a source that changed go ahead: `_check_publishable` says so, and
    holds back the data an earlier version's split rule made otherwise."""
    from tinygpt_cli.inventory import runs_on_dataset

    if not (folder / "meta.json").is_file():
        return
    users = runs_on_dataset(folder)
    training = [summary.name for summary in users if summary.training]
    if training:
        raise DataError(f"run {training[0]} is training on data/{folder.name} now: wait for it to end or stop it "
                        f"before tokenizing it again, or pick another --name")
    if not users or force:
        return
    meta = _meta_of(folder)
    old = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    differ = [f"{flag} {settings[key]} (it was made with {meta.get(key)})" for key, flag in
              (("fraction", "--fraction"), ("val_fraction", "--val-fraction"), ("seed", "--seed"))
              if meta.get(key) is not None and meta.get(key) != settings[key]]
    fields = any(document.kind != "txt" for document in src.files)  # a .txt has no field to name
    if fields and old.get("text_field") not in (None, src.text_field):
        differ.append(f"--text-field {src.text_field} (it was made with {old.get('text_field')})")
    if differ:
        raise DataError(f"{workspace.counted(len(users), 'run')} trained on data/{folder.name} "
                        f"({run_names(users)}), and {'; '.join(differ)} makes other data of it (resuming one "
                        f"would need it tokenized again as it was): pick another --name, or pass --force to replace "
                        f"it")


def _check_publishable(folder: Path, meta: dict[str, Any], force: bool) -> str | None:
    """Before the finished dataset (`meta`: its) replaces `folder`'s with other text: refuse where a run started
    training on that one since the tokenize began (`_check_not_in_use` saw none then; QA: `tokenize --force` and a
    `train` started a moment later, which could not resume): the new one waits, finished, and the same command puts
    it in place once the run ends. Without --force, refuse too where the old one was cut by an earlier version's
    SPLIT_RULE, which cut a source of fewer than 10 documents otherwise (upgrade QA): the same command made other
    data, and --force puts it in place. Else what to say of the runs that trained on the old text (its source
    changed since, or --force made it with other settings): they cannot resume on it."""
    from tinygpt_cli.inventory import dataset_users

    if not (folder / "meta.json").is_file():
        return None
    old = _meta_of(folder)
    hashed = dataset_users(folder, old)
    users = [summary for summary, _ in hashed]
    if not users or train_hash(old) == meta["splits"]["train"].get("sha256"):
        return None
    training = [summary.name for summary in users if summary.training]
    if training:
        raise DatasetInUse(f"run {training[0]} started training on data/{folder.name} while it was tokenized again, "
                           f"and the new text would change under it: the new dataset is finished and waits; once "
                           f"that run ends, rerun")
    if not force and cuts_documents(meta) and old.get("split_rule") != meta["split_rule"]:
        raise SplitRuleChanged(
            f"{workspace.counted(len(users), 'run')} trained on data/{folder.name} ({run_names(users)}), and this "
            f"version of tinygpt cuts a source of so few documents into train and val otherwise than the one that "
            f"made it (meta.json's split_rule), so the same command made other data of it (or its text changed "
            f"since): the new dataset is finished and waits; rerun with --force to put it in place (those runs then "
            f"go on only from their weights: `tinygpt train --init-from RUN --name NEW`), or pick another --name")
    recorded = [summary for summary, recorded_hash in hashed if recorded_hash]
    unrecorded = [summary for summary, recorded_hash in hashed if not recorded_hash]
    notes = [f"{workspace.counted(len(recorded), 'run')} trained on data/{folder.name} as it was "
             f"({run_names(recorded)}): it holds other text now, so resuming one is refused; `tinygpt train "
             f"--init-from RUN` goes on from its weights"] if recorded else []
    if unrecorded:  # saved by an earlier tinygpt: a resume cannot tell, and goes on with the new text (it says so)
        notes.append(f"{workspace.counted(len(unrecorded), 'run')} trained on data/{folder.name} as it was, saved by "
                     f"an earlier tinygpt that recorded no hash of the text ({run_names(unrecorded)}): resuming one "
                     f"goes on with the new text; `tinygpt train --init-from RUN --name NEW` starts anew from its "
                     f"weights")
    return "; ".join(notes)


def train_sha256(folder: Path) -> str | None:
    """The train split's hash in the meta.json of dataset `folder`; None where there is none to read."""
    return train_hash(_meta_of(folder))


def train_hash(meta: dict[str, Any]) -> str | None:
    """The train split's hash in a dataset's meta.json (None where it holds none)."""
    try:
        return meta["splits"]["train"].get("sha256")
    except (KeyError, TypeError, AttributeError):
        return None


def _meta_of(folder: Path) -> dict[str, Any]:
    """The meta.json of dataset `folder` as it is ({} where there is none to read)."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def run_names(runs: list[Any]) -> str:
    """'a, b, c, …': the first three of `runs` (RunSummary) by name."""
    return ", ".join(summary.name for summary in runs[:3]) + (", …" if len(runs) > 3 else "")


def _check_not_another_source(folder: Path, src: Source) -> None:
    """Refuse to replace a dataset tokenized from another source: runs that trained on it would go on silently
    with other data. The same source (other settings, `--text-field` included, or a re-run) may replace it."""
    old = _meta_of(folder).get("source")
    if not isinstance(old, dict):
        return  # nothing there, or nothing readable to protect
    new = _source_of(src)
    where = "location" if old.get("location") else "spec"  # datasets from before `location` was recorded
    if old.get("kind") != new["kind"] or old.get(where) != new[where]:
        raise DataError(
            f"data/{folder.name} already holds a dataset tokenized from {old.get('spec')}: pick another --name, "
            f"or pass --force to replace it (runs trained on it would then read the new data)"
        )


def _check_replaceable(folder: Path, src: Source) -> None:
    """Refuse to publish over what is not a tokenized dataset: `_publish` deletes the folder it replaces, and
    `data/<name>/` may hold the user's own files, even the text being tokenized (`tinygpt tokenize data/books`)."""
    if not folder.exists():  # nothing there, or a link to a dataset still to be made
        return
    if not folder.is_dir():
        raise DataError(f"data/{folder.name} exists and is not a folder: move it away or pick another --name")
    inside = folder.resolve()
    for doc_file in src.files:
        if inside in doc_file.path.resolve().parents:
            raise DataError(
                f"{doc_file.path} is inside data/{folder.name}, which this tokenize would replace: "
                f"pick another --name, or move the text out of data/{folder.name}"
            )
    if not (folder / "meta.json").is_file() and any(folder.iterdir()):
        raise DataError(
            f"data/{folder.name} exists and is not a tokenized dataset (no meta.json), so it is not replaced: "
            f"pick another --name, or move that folder away"
        )


def where_published(folder: Path) -> Path:
    """The real folder a dataset is written to: `data/<name>` itself, or where it links (a dataset kept on another
    disk), so that the new dataset is written on that disk and the link stays."""
    if not folder.is_symlink():
        return folder
    try:
        target = folder.resolve()
    except (OSError, RuntimeError):  # a link that loops (RuntimeError before Python 3.13)
        raise DataError(f"data/{folder.name} is a link that loops: remove it, or point it at a folder") from None
    if workspace.sibling_target(folder) is not None:  # another name for a dataset here
        raise DataError(f"data/{folder.name} links to data/{target.name}, another dataset of this workspace, which "
                        f"this tokenize would replace: pass --name {target.name}, or remove the link")
    if not target.parent.is_dir():  # an unmounted disk: make nothing at its mount point
        raise DataError(f"data/{folder.name} links to {target}, whose folder does not exist: mount that disk, or "
                        f"remove the link to tokenize into the workspace")
    return target


def _partial_of(home: Path) -> Path:
    """Where a tokenize of the dataset folder `home` (`where_published`) writes until it is done."""
    return home.with_name(f".{home.name}.partial")


def _old_copies(final: Path) -> list[Path]:
    """The datasets that publishing in `final`'s place set aside (`_publish`), oldest first."""
    def written(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed since the glob saw it
            return 0.0

    return sorted(final.parent.glob(glob.escape(f".{final.name}") + ".old-*"), key=written)


class SplitRuleChanged(SourceUnreadable):
    """The finished dataset is other data than the one runs trained on, by an earlier version's split rule: it
    waits, finished, for the same command with --force (`_check_publishable`)."""


class DatasetInUse(SourceUnreadable):
    """Windows renames no folder holding a file another process has open (a `train` or `eval` reading its
    train.bin): the finished dataset stays where it was written, and the same command publishes it later."""


def _check_ours_to_change(name: str, final: Path, partial: Path) -> None:
    """Before any work: refuse a dataset this user may not replace, or an interrupted tokenize of it it may not
    continue (another user's, in a workspace several share), rather than fail to publish after the work."""
    blocked = workspace.cannot_move(final) if final.exists() else None
    if blocked is not None and not blocked.yours:  # one's own unwritable folder: the write says so, as it did
        raise DataError(f"data/{name} cannot be replaced by you ({blocked.reason}): tokenize under another name with "
                        f"--name NAME")
    blocked = (workspace.cannot_move(partial) or workspace.folder_unwritable(partial)) if partial.is_dir() else None
    if blocked is not None and not blocked.yours:
        raise DataError(f"an interrupted tokenize of data/{name} by {workspace.owner_of(partial)} is in the way "
                        f"({partial} is not yours to change): ask them to finish or delete it (`tinygpt data rm "
                        f"{name}`), or tokenize under another name with --name NAME")


def _publish(new: Path, final: Path) -> None:
    """Move a completed dataset folder into place, replacing an older one only after the new one is whole; the
    checkpoint it was written under goes last."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        try:
            workspace.replace(final, old)
        except PermissionError as exc:
            if sys.platform != "win32":  # another user's, in a shared workspace: no rerun helps (the partial goes)
                raise DataError(f"data/{final.name} cannot be replaced by you ({exc.strerror}; it is "
                                f"{workspace.owner_of(final)}'s): tokenize under another name with --name NAME") \
                    from None
            raise DatasetInUse(f"data/{final.name} is open in another program (a `tinygpt train` or `eval` reading "
                               f"it?), and Windows replaces no folder in use: when that ends, rerun") from exc
    workspace.replace(new, final)
    _drop_set_aside(final, _old_copies(final))  # its own copy, and a killed publish's (another process id)


def _drop_set_aside(final: Path, olds: list[Path]) -> None:
    """With a dataset in place at `final`: remove the copies publishing set aside (`olds`), then the checkpoint it
    was written under."""
    for copy in olds:
        shutil.rmtree(copy, ignore_errors=True)
    (final / PROGRESS_FILE).unlink(missing_ok=True)


def _finish_killed_publish(final: Path, partial: Path) -> None:
    """Put right what a tokenize killed while publishing (SIGKILL, a power cut) left: the dataset it was replacing
    set aside as `.NAME.old-PID` with none in its place goes back, unless the finished new one waits in `partial`
    (this tokenize resumes and publishes it); once a dataset is in place, the copies set aside go."""
    olds = _old_copies(final)
    if not final.exists() and olds and not partial.is_dir():
        workspace.replace(olds.pop(), final)
    if final.exists():
        _drop_set_aside(final, olds)


# ----------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Dataset:
    """A tokenized dataset folder, checked against its meta.json."""

    name: str
    path: Path
    meta: dict[str, Any]

    def check_sizes(self, split: str) -> Path:
        """The split's file, which must exist with the size meta.json gives (a stat, no reading)."""
        info = self.meta["splits"][split]
        file = self.path / info["file"]
        if not file.is_file():
            raise DataError(f"{file} is missing: {self.remake_advice()}")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise DataError(
                f"{file} is {size} bytes but meta.json says {info['bytes']} (truncated or replaced): "
                f"{self.remake_advice()}"
            )
        return file

    def remake_advice(self, restart: bool = False) -> str:
        """What to run to make this dataset again: the command that made it, where its meta.json records one
        (`remake_command`; with --restart where its files look whole and are not); `restart` for files whose sizes
        are right and contents are not, which a plain tokenize takes for up to date."""
        command = remake_command(self)
        if command is None:
            return f"re-run `tinygpt tokenize` for {self.name}"
        return f"make it again with `{command}{' --restart' if restart else ''}`"

    def check_files(self) -> None:
        """Both splits' files exist with the sizes meta.json gives (`check_sizes`)."""
        for split in ("train", "val"):
            self.check_sizes(split)

    def split(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only uint16 memmap, verified against meta.json."""
        info = self.meta["splits"][split]
        file = self.check_sizes(split)
        size = info["bytes"]  # what the file measures (checked)
        check = info["sha256"] if size <= FULL_HASH_LIMIT else info["edge_sha256"]
        actual = _file_sha256(file) if size <= FULL_HASH_LIMIT else _edge_hash(file)
        if actual != check:
            raise DataError(
                f"{file} does not match its meta.json hash (corrupted or from another dataset): "
                f"{self.remake_advice(restart=True)}"
            )
        if size == 0:  # numpy cannot map an empty file ("cannot mmap an empty file"): callers check the length
            return np.zeros(0, dtype=np.uint16)
        tokens = np.memmap(file, dtype=np.uint16, mode="r")
        if size <= FULL_HASH_LIMIT:  # read whole for the hash just now: a scan costs little more. Larger files
            check_vocabulary(tokens)  # are checked a window at a time as they are read (`check_vocabulary`)
        return tokens

    def summary(self) -> dict[str, Any]:
        splits = self.meta["splits"]
        return {"name": self.name, "path": str(self.path),
                "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"]}


def check_vocabulary(tokens: np.ndarray, first: int = 0) -> None:
    """A DataError unless every id in `tokens` (a split's memmap, or a slice of one from token `first`) is one of
    GPT-2's. `tinygpt tokenize` writes no other; a file made by hand or by another tool may, and an id past the
    vocabulary is an index error deep in the model (on CUDA a device-side assert that ends the process), or one
    of the embedding's padding rows, trained on without a word."""
    if len(tokens) == 0 or int(tokens.max()) < VOCAB_SIZE:
        return
    index = int(np.argmax(np.asarray(tokens) >= VOCAB_SIZE))
    where = getattr(tokens, "filename", None) or "the token file"
    raise DataError(f"{where} holds token id {int(tokens[index])} at token {first + index}, past the end of "
                    f"GPT-2's vocabulary (ids 0 to {VOCAB_SIZE - 1:,}), so it was not written by `tinygpt tokenize`: "
                    f"tokenize the text again with `tinygpt tokenize`")


def token_window(tokens: np.ndarray, start: int, stop: int) -> np.ndarray:
    """tokens[start:stop] as int64, checked against the vocabulary as it is read (`check_vocabulary`): how training
    and eval read a split too large to be scanned when opened (`Dataset.split`)."""
    window = np.asarray(tokens[start:stop], dtype=np.int64)
    if len(window) and window.max() >= VOCAB_SIZE:
        check_vocabulary(tokens[start:stop], start)
    return window


def remake_source(dataset: Dataset) -> str | None:
    """What `dataset` was tokenized from, as `tinygpt tokenize` takes it (a path, or a download's name)."""
    source = dataset.meta.get("source")
    spec = (source.get("location") or source.get("spec")) if isinstance(source, dict) else None
    return spec if isinstance(spec, str) else None


def remake_command(dataset: Dataset) -> str | None:
    """The `tinygpt tokenize` command that makes `dataset` again byte for byte (tokenizing is deterministic given
    the source and these settings: a dataset replaced by other settings can be made again), or None where its
    meta.json does not record them."""
    source, settings = dataset.meta.get("source"), [dataset.meta.get(k) for k in ("fraction", "val_fraction", "seed")]
    spec = remake_source(dataset)
    if spec is None or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in settings):
        return None
    fraction, val_fraction, seed = settings
    words = ["tinygpt", "tokenize", spec, "--name", dataset.name, "--fraction", repr(float(fraction)),
             "--val-fraction", repr(float(val_fraction)), "--seed", str(int(seed))]
    text_field = source.get("text_field")
    if isinstance(text_field, str) and text_field != "text":
        words += ["--text-field", text_field]
    return command_line(words)


def command_line(words: list[str]) -> str:
    """`words` as one command line to copy into this platform's shell: POSIX quoting ('C:\\x' would reach a
    Windows program with its quotes), or on Windows the double quotes that cmd and PowerShell take."""
    return subprocess.list2cmdline(words) if sys.platform == "win32" else shlex.join(words)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def load_dataset(path: Path) -> Dataset:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DataError(f"{path} is not a tokenized dataset (no meta.json): run `tinygpt tokenize` first")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{meta_path} is corrupted: re-run `tinygpt tokenize`") from None
    except OSError as exc:  # unreadable (permissions, I/O error): one dataset, not the whole listing
        raise DataError(f"{meta_path} cannot be read ({exc.strerror or exc}): check its permissions") from None
    if not isinstance(meta, dict):
        raise DataError(f"{meta_path} is corrupted (not a JSON object): re-run `tinygpt tokenize`")
    tokenizer = meta.get("tokenizer")
    if meta.get("format") != META_FORMAT or not isinstance(tokenizer, dict) or \
            tokenizer.get("ranks_sha256") != RANKS_SHA256:
        raise DataError(f"{path} was not written by tinygpt's GPT-2 tokenizer: re-run `tinygpt tokenize`")
    problem = _meta_problem(meta)
    if problem:
        raise DataError(f"{meta_path} is corrupted ({problem}): re-run `tinygpt tokenize`")
    return Dataset(path.name, path, meta)  # the folder's name: what `data show`, `train --data` and `eval` take


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a meta.json that commands read, or None."""
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "no splits"
    for split in ("train", "val"):
        info = splits.get(split)
        if not isinstance(info, dict) or not isinstance(info.get("file"), str):
            return f"no {split} split"
        for key in ("tokens", "bytes", "documents"):
            if not is_count(info.get(key)):
                return f"splits.{split}.{key} is not a count"
    kinds = {"name": str, "source": dict, "documents": dict, "created": str, "fraction": (int, float),
             "val_fraction": (int, float)}
    for key, kind in kinds.items():
        if key in meta and meta[key] is not None and not isinstance(meta[key], kind):
            return f"{key} has the wrong type"
    if "text_bytes" in meta and not is_count(meta["text_bytes"]):
        return "text_bytes is not a count"
    return None


def list_datasets(problems: list[str] | None = None, check_files: bool = False) -> list[Dataset]:
    """Complete datasets in the workspace, newest first. One whose meta.json is damaged (with `check_files`, or
    whose files are missing or not of the sizes it gives: the listing) is left out, and what is wrong with it
    appended to `problems`, as is each interrupted tokenize that waits to be finished. Without `check_files` a
    damaged newest dataset stays the default, so that using it says what is wrong rather than falling back to an
    older one."""
    root = workspace.data_dir()
    if not root.is_dir():
        return []
    if problems is not None:
        for partial in sorted(root.glob(".*.partial")):
            name = partial.name[1:].removesuffix(".partial")
            try:
                written = workspace.format_bytes(sum(f.stat().st_size for f in partial.glob("*.bin")))
            except OSError:  # published (or removed) just now
                continue
            if workspace.held(workspace.lock_of(partial.with_name(name))):
                problems.append(f"{name} is being tokenized now ({written} written so far, in data/{partial.name})")
            else:
                problems.append(f"an interrupted tokenize of {name} waits in data/{partial.name} ({written} "
                                f"written): run the same `tinygpt tokenize ... --name {name}` again to finish it, or "
                                f"delete that folder")
    found = []
    for meta in root.glob("*/meta.json"):
        if meta.parent.name.startswith("."):
            continue
        try:
            dataset = load_dataset(meta.parent)
            if check_files:
                dataset.check_files()
        except DataError as exc:
            if problems is not None:
                problems.append(f"{meta.parent.name} is left out: {exc}")
            continue
        found.append(dataset)
    # "the last tokenized": made, or found up to date by a tokenize (`confirmed`), last
    return sorted(found, key=lambda d: (max(d.meta.get("created") or "", d.meta.get("confirmed") or ""),
                                        d.path.stat().st_mtime), reverse=True)


def find_dataset(spec: str | None) -> Dataset | None:
    """A dataset by name (the workspace's, before a folder of that name here) or folder path; `None`/"" -> the newest
    one, or None if there is none."""
    if not spec:
        datasets = list_datasets()
        return datasets[0] if datasets else None
    candidate = Path(spec).expanduser()
    named = workspace.data_dir() / spec
    plain = workspace.name_problem(spec, "data/", spec) is None  # a name `tokenize --name` could make
    # `..` is a folder of data/ and no dataset; `shakespeare/`, or a folder named by hand (`my data`), still are
    bare = spec.rstrip("/\\")
    in_workspace = named.is_dir() and bare not in (RAW_DIR_NAME, ".", "..", "")
    if in_workspace and workspace.is_bare_name(spec):  # as runs: the workspace's before a folder here of that name
        return load_dataset(named)
    if (candidate / "meta.json").is_file():
        return load_dataset(candidate)
    if in_workspace:
        return load_dataset(named)
    if plain and _old_copies(where_published(named)):
        raise DataError(f"data/{spec} was being replaced when a tokenize was killed: run that `tinygpt tokenize "
                        f"... --name {spec}` again to finish it (the dataset it replaced is kept until then)")
    if candidate.is_file() and candidate.suffix == ".bin" and (candidate.parent / "meta.json").is_file():
        raise DataError(f"{spec} is one split of a tokenized dataset: name the dataset, its folder "
                        f"{candidate.parent}")
    if candidate.is_file():
        raise DataError(f"{spec} is a file, not a tokenized dataset: tokenize it first (`tinygpt tokenize {spec} "
                        f"--name NAME`), then name NAME")
    partial = None
    if workspace.is_bare_name(spec) and plain:
        with contextlib.suppress(DataError):  # a link that loops, or to a disk not mounted: no partial there
            partial = _partial_of(where_published(named))
    if partial is not None and partial.is_dir():
        raise DataError(f"data/{spec} is not finished: an interrupted tokenize of it waits in {partial}: run that "
                        f"`tinygpt tokenize ... --name {spec}` again to finish it")
    names = [d.path.name for d in list_datasets()]
    listed = f" (known: {', '.join(names[:8])}{', …' if len(names) > 8 else ''})" if names else " (none yet)"
    close = workspace.close_names(spec, workspace.data_dir()) if spec != RAW_DIR_NAME else ""  # raw: data/raw
    known = close or listed
    from tinygpt_cli.sources import REGISTRY, downloads

    if bare == RAW_DIR_NAME:  # `tokenize ... --name raw` is refused: that folder holds the downloads
        raise DataError(f"data/{RAW_DIR_NAME} holds downloads, not a tokenized dataset{known}: tokenize a download "
                        f"with `tinygpt tokenize NAME` and name its dataset")
    if not plain:  # a path that is no dataset folder, or a name no dataset can have: no command makes it
        raise DataError(f"no tokenized dataset at {spec}{known}: name a dataset of `tinygpt data`, or a folder "
                        f"holding a meta.json")
    downloaded = {record.get("name") for record in downloads() if record.get("complete")}
    if spec in downloaded:  # downloaded, not tokenized yet
        make = f"`tinygpt tokenize {spec}`"
    elif spec in REGISTRY and REGISTRY[spec].kind != "embedded":  # a named corpus: it is fetched first
        make = f"`tinygpt download {spec} && tinygpt tokenize {spec}`"
    else:
        make = f"`tinygpt tokenize SOURCE --name {spec}`"
    raise DataError(f"no tokenized dataset named {spec!r}{known}: make it with {make}")


