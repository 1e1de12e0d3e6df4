"""Corpora in, token files out: `tokenize()` writes `data/<name>/{train,val}.bin` + `meta.json`.

Token files are raw little-endian uint16 GPT-2 ids, each document followed by `<|endoftext|>` (50256).
The train/val split is by whole document and depends only on the source, `--fraction` and `--seed`:

* every document has a position `i` in the source (files in sorted order; lines of a .jsonl; rows of a
  .parquet) and two keyed hashes of `(seed, i)`;
* `--fraction f` keeps the `max(1, round(n*f))` documents with the lowest *selection* hash;
* of those, the `max(1, round(m*val_fraction))` with the lowest *split* hash form the val split;
* a source that holds a single document (one .txt file) is split inside it instead: its last
  `max(val_fraction, 0.1)` share, cut at a line break, is the val split.

Undecodable text: a .txt file that is not valid UTF-8 is skipped and counted (the result names it);
if nothing is left the command fails naming the file. Empty documents are skipped and counted.
"""

from __future__ import annotations

import datetime as _dt
import glob
import gzip
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tinygpt_cli import __version__, workspace
from tinygpt_cli.errors import DataError
from tinygpt_cli.tokenizer import EOT_ID, RANKS_SHA256, TOKENIZER_NAME, VOCAB_SIZE

EMBEDDED_NAME = "shakespeare"
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
META_FORMAT = "tinygpt-tokens"
META_VERSION = 1
FULL_HASH_LIMIT = 256 * 1024 * 1024  # files up to this size are fully re-hashed before training
EDGE_BYTES = 1024 * 1024  # larger files: size + sha256 of their first and last MiB
SINGLE_DOC_MIN_VAL = 0.1
BATCH_TEXT_BYTES = 8 * 1024 * 1024  # text handed to the tokenizer at once: bounds memory
BYTES_PER_TOKEN_GUESS = 3.8  # for the plan only; GPT-2 BPE gives 3.2 on Shakespeare, ~4.5 on web text


# ----------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class DocumentFile:
    """One input file and how it splits into documents."""

    path: Path
    kind: str  # "txt" | "jsonl" | "parquet"
    documents: int  # documents it holds (rows, lines, or 1)
    size_bytes: int


@dataclass(frozen=True)
class Source:
    """An ordered list of files whose documents are numbered 0..n-1 in that order."""

    name: str  # default dataset name
    description: str  # what the CLI prints ("embedded Shakespeare corpus", a path)
    kind: str  # "embedded" | "local"
    files: tuple[DocumentFile, ...]
    text_field: str = "text"

    @property
    def documents(self) -> int:
        return sum(f.documents for f in self.files)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".txt"):
        return "txt"
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _count_documents(path: Path, kind: str) -> int:
    if kind == "txt":
        return 1
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:
            raise DataError(f"{path} is not a readable parquet file ({exc}): check the file") from None
    count = 0
    try:
        with _open_text(path) as handle:
            for line in handle:
                if line.strip():
                    count += 1
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{path} could not be read as UTF-8 JSON lines ({exc}): check the file") from None
    return count


def _document_file(path: Path) -> DocumentFile:
    kind = _kind_of(path)
    assert kind is not None
    return DocumentFile(path, kind, _count_documents(path, kind), path.stat().st_size)


def embedded_source() -> Source:
    """The 42 works of Shakespeare shipped inside the package (public domain; see assets/LICENSE-*)."""
    folder = resources.files("tinygpt_cli").joinpath("assets", "shakespeare")
    paths = sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".txt"))
    files = tuple(DocumentFile(p, "txt", 1, p.stat().st_size) for p in paths)
    return Source(EMBEDDED_NAME, "the embedded Shakespeare corpus (42 works)", "embedded", files)


def local_source(spec: str, text_field: str = "text") -> Source:
    """A file, a folder (searched recursively) or a glob of .txt / .jsonl(.gz) / .parquet files."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        candidates = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]
        if not candidates:
            raise DataError(f"no file matches {spec}: check the pattern")
        name = workspace.safe_name(Path(spec.split("*")[0]).name or "glob")
    elif path.is_dir():
        candidates = sorted(p for p in path.rglob("*") if p.is_file())
        name = workspace.safe_name(path.resolve().name)
    elif path.is_file():
        candidates = [path]
        name = workspace.safe_name(path.name.split(".")[0])
    else:
        raise DataError(f"{spec} does not exist: give a file, a folder or a glob of .txt/.jsonl/.parquet files")
    usable = [p for p in candidates if p.is_file() and _kind_of(p) is not None]
    if not usable:
        raise DataError(
            f"{spec} holds no .txt, .jsonl, .jsonl.gz or .parquet file: point tokenize at your text files"
        )
    files = tuple(_document_file(p) for p in usable)
    if sum(f.documents for f in files) == 0:
        raise DataError(f"{spec} is empty: it holds no documents to tokenize")
    return Source(name, str(spec), "local", files, text_field)


def resolve_source(spec: str | None, text_field: str = "text") -> Source:
    """`None` or "shakespeare" -> the embedded corpus; anything else is a local path or glob."""
    if spec is None or spec == EMBEDDED_NAME:
        return embedded_source()
    return local_source(spec, text_field)


def _iter_file_documents(
    doc_file: DocumentFile, text_field: str, on_undecodable: Callable[[Path], None]
) -> Iterator[str]:
    """The documents of one file in order; exactly `doc_file.documents` items ("" for skipped ones)."""
    path = doc_file.path
    if doc_file.kind == "txt":
        try:
            yield path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            on_undecodable(path)
            yield ""
        return
    if doc_file.kind == "jsonl":
        with _open_text(path) as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(
                        f"line {line_no} of {path} is not valid JSON ({exc.msg}): fix or remove it"
                    ) from None
                yield _text_of(row, text_field, f"line {line_no} of {path}")
        return
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    if text_field not in parquet.schema_arrow.names:
        raise DataError(
            f"{path} has no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}): "
            f"pass --text-field NAME"
        )
    for batch in parquet.iter_batches(columns=[text_field], batch_size=4096):
        for value in batch.column(0).to_pylist():
            yield value if isinstance(value, str) else ""


def _text_of(row: Any, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where} has no {text_field!r} field (found: {fields}): pass --text-field NAME")
    value = row[text_field]
    return value if isinstance(value, str) else ""


# ----------------------------------------------------------------------------------------------- split
def _keyed_hash(seed: int, stream: int, n: int) -> np.ndarray:
    """splitmix64 of (seed, stream, i) for i in 0..n-1: a fixed pseudo-random number per document."""
    with np.errstate(over="ignore"):
        x = np.arange(n, dtype=np.uint64) + np.uint64((seed * 0x9E3779B97F4A7C15 + stream) % 2**64)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _lowest(hashes: np.ndarray, count: int, among: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the `count` entries with the lowest hash (restricted to `among` if given)."""
    mask = np.zeros(hashes.shape[0], dtype=bool)
    candidates = np.flatnonzero(among) if among is not None else np.arange(hashes.shape[0])
    if count >= candidates.size:
        mask[candidates] = True
    elif count > 0:
        order = np.argsort(hashes[candidates], kind="stable")[:count]
        mask[candidates[order]] = True
    return mask


def plan_split(n_documents: int, fraction: float, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selected, in_val) boolean masks over the source's documents. See the module docstring."""
    selected_count = max(1, round(n_documents * fraction))
    selected = _lowest(_keyed_hash(seed, 1, n_documents), selected_count)
    val_count = max(1, round(selected_count * val_fraction)) if selected_count > 1 else 0
    in_val = _lowest(_keyed_hash(seed, 2, n_documents), val_count, among=selected)
    return selected, in_val


SPLIT_RULE = (
    "documents numbered in source order; keep the max(1, round(n*fraction)) with the lowest "
    "splitmix64(seed, 1, i); of those the max(1, round(m*val_fraction)) with the lowest splitmix64(seed, 2, i) "
    "are val; a single-document source is cut at the line break before its last max(val_fraction, 0.1)"
)


# ----------------------------------------------------------------------------------------------- writing
class _SplitWriter:
    """Appends uint16 tokens to a .bin file while hashing them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.tokens = 0
        self.documents = 0

    def write(self, tokens: np.ndarray, documents: int) -> None:
        data = tokens.astype("<u2", copy=False).tobytes()
        self.handle.write(data)
        self.sha256.update(data)
        self.tokens += int(tokens.size)
        self.documents += documents

    def close(self) -> dict[str, Any]:
        self.handle.flush()
        os.fsync(self.handle.fileno())
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


def _encode_with_eot(encoding, texts: list[str], workers: int) -> list[np.ndarray]:
    ids = encoding.encode_ordinary_batch(texts, num_threads=workers)
    return [np.fromiter((*doc, EOT_ID), dtype=np.uint16, count=len(doc) + 1) for doc in ids]


@dataclass
class TokenizeResult:
    name: str
    path: Path
    meta: dict[str, Any]
    skipped_empty: int = 0
    skipped_undecodable: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass(frozen=True)
class TokenizeEvent:
    """`kind` is "plan" (before work), "progress" (after each batch) or "done"."""

    kind: str
    documents: int = 0  # documents processed so far (plan: documents to process)
    total_documents: int = 0
    tokens: int = 0
    text_bytes: int = 0
    total_text_bytes: int = 0
    estimated_tokens: int = 0


def tokenize(
    source: str | None = None,
    *,
    name: str | None = None,
    fraction: float = 1.0,
    val_fraction: float = 0.005,
    seed: int = 0,
    text_field: str = "text",
    workers: int | None = None,
    on_event: Callable[[TokenizeEvent], None] | None = None,
) -> TokenizeResult:
    """Tokenize a corpus into `data/<name>/`. `source`: None/"shakespeare" (embedded) or a path/glob.

    Writes into a hidden temp folder and renames it into place only when complete, so an interrupted run
    never leaves a dataset that looks finished.
    """
    import time

    from tinygpt_cli.tokenizer import get_encoding

    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1] (got {fraction})")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"--val-fraction must be in (0, 1) (got {val_fraction})")
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    src = resolve_source(source, text_field)
    dataset_name = workspace.safe_name(name) if name else src.name
    encoding = get_encoding()
    workers = max(1, workers or os.cpu_count() or 1)

    n_documents = src.documents
    selected, in_val = plan_split(n_documents, fraction, val_fraction, seed)
    selected_count = int(selected.sum())
    total_bytes = int(src.size_bytes * selected_count / max(1, n_documents))
    emit(TokenizeEvent("plan", documents=selected_count, total_documents=n_documents,
                       total_text_bytes=total_bytes,
                       estimated_tokens=int(total_bytes / BYTES_PER_TOKEN_GUESS)))

    out_root = workspace.data_dir()
    final_dir = out_root / dataset_name
    tmp_dir = out_root / f".{dataset_name}.partial-{os.getpid()}"
    out_root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir()
    result = TokenizeResult(dataset_name, final_dir, {})
    try:
        writers = {"train": _SplitWriter(tmp_dir / "train.bin"), "val": _SplitWriter(tmp_dir / "val.bin")}
        single_document = selected_count == 1
        progress = TokenizeEvent("progress", total_documents=selected_count, total_text_bytes=total_bytes)
        batch_texts: list[str] = []
        batch_splits: list[str] = []
        batch_bytes = 0

        def flush() -> None:
            nonlocal progress, batch_bytes
            if not batch_texts:
                return
            for split in ("train", "val"):
                texts = [t for t, s in zip(batch_texts, batch_splits, strict=True) if s == split]
                if texts:
                    arrays = _encode_with_eot(encoding, texts, workers)
                    writers[split].write(np.concatenate(arrays), len(texts))
            progress = TokenizeEvent(
                "progress",
                documents=progress.documents + len(batch_texts),
                total_documents=selected_count,
                tokens=writers["train"].tokens + writers["val"].tokens,
                text_bytes=progress.text_bytes + batch_bytes,
                total_text_bytes=total_bytes,
            )
            emit(progress)
            batch_texts.clear()
            batch_splits.clear()
            batch_bytes = 0

        index = 0
        for doc_file in src.files:
            for text in _iter_file_documents(doc_file, src.text_field,
                                             lambda p: result.skipped_undecodable.append(str(p))):
                position = index
                index += 1
                if not selected[position]:
                    continue
                if not text.strip():
                    result.skipped_empty += 1
                    continue
                if single_document:
                    head, tail = _cut_tail(text, max(val_fraction, SINGLE_DOC_MIN_VAL))
                    pieces = [(head, "train"), (tail, "val")]
                else:
                    pieces = [(text, "val" if in_val[position] else "train")]
                for piece, split in pieces:
                    batch_texts.append(piece)
                    batch_splits.append(split)
                    batch_bytes += len(piece)
                if batch_bytes >= BATCH_TEXT_BYTES:
                    flush()
        flush()
        splits = {split: writer.close() for split, writer in writers.items()}
        _check_result(src, splits, result)
        meta = {
            "format": META_FORMAT,
            "version": META_VERSION,
            "name": dataset_name,
            "source": {"kind": src.kind, "spec": src.description if src.kind != "embedded" else EMBEDDED_NAME,
                       "text_field": src.text_field if src.kind != "embedded" else None},
            "tokenizer": {"name": TOKENIZER_NAME, "ranks_sha256": RANKS_SHA256, "vocab_size": VOCAB_SIZE,
                          "eot_id": EOT_ID},
            "dtype": "uint16",
            "fraction": fraction,
            "val_fraction": val_fraction,
            "seed": seed,
            "split_rule": SPLIT_RULE,
            "documents": {"in_source": n_documents, "selected": selected_count,
                          "skipped_empty": result.skipped_empty,
                          "skipped_undecodable": len(result.skipped_undecodable)},
            "splits": splits,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tinygpt_version": __version__,
        }
        _write_json_atomic(tmp_dir / "meta.json", meta)
        _replace_dir(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    result.meta = meta
    result.seconds = time.perf_counter() - started
    emit(TokenizeEvent("done", documents=selected_count, total_documents=selected_count,
                       tokens=splits["train"]["tokens"] + splits["val"]["tokens"],
                       text_bytes=progress.text_bytes, total_text_bytes=total_bytes))
    return result


def _cut_tail(text: str, share: float) -> tuple[str, str]:
    """Split `text` at the line break nearest before its last `share`; both parts non-empty when possible."""
    cut = int(len(text) * (1.0 - share))
    newline = text.rfind("\n", 0, cut)
    if newline <= 0:
        newline = cut
    return text[: newline + 1], text[newline + 1 :]


def _check_result(src: Source, splits: dict[str, dict[str, Any]], result: TokenizeResult) -> None:
    if splits["train"]["tokens"] == 0 and splits["val"]["tokens"] == 0:
        if result.skipped_undecodable:
            first = result.skipped_undecodable[0]
            raise DataError(
                f"{first} is not UTF-8 text ({len(result.skipped_undecodable)} file(s) skipped): "
                f"convert it, e.g. iconv -f latin1 -t utf-8"
            )
        raise DataError(f"{src.description} holds no text (all documents are empty): check the input")
    if splits["train"]["tokens"] == 0 or splits["val"]["tokens"] == 0:
        empty = "train" if splits["train"]["tokens"] == 0 else "val"
        raise DataError(
            f"the {empty} split came out empty (its documents were empty or skipped): "
            f"change --seed or --val-fraction, or add documents"
        )


def _write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(payload, handle, indent=2)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _replace_dir(new: Path, final: Path) -> None:
    """Move a completed folder into place, replacing an older one only after the new one is whole."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class Dataset:
    """A tokenized dataset folder, checked against its meta.json."""

    name: str
    path: Path
    meta: dict[str, Any]

    def split(self, split: str) -> np.ndarray:
        """The split's tokens as a read-only uint16 memmap, verified against meta.json."""
        info = self.meta["splits"][split]
        file = self.path / info["file"]
        if not file.is_file():
            raise DataError(f"{file} is missing: re-run `tinygpt tokenize` for {self.name}")
        size = file.stat().st_size
        if size != info["bytes"]:
            raise DataError(
                f"{file} is {size} bytes but meta.json says {info['bytes']} (truncated or replaced): "
                f"re-run `tinygpt tokenize` for {self.name}"
            )
        check = info["sha256"] if size <= FULL_HASH_LIMIT else info["edge_sha256"]
        actual = _file_sha256(file) if size <= FULL_HASH_LIMIT else _edge_hash(file)
        if actual != check:
            raise DataError(
                f"{file} does not match its meta.json hash (corrupted or from another dataset): "
                f"re-run `tinygpt tokenize` for {self.name}"
            )
        return np.memmap(file, dtype=np.uint16, mode="r")

    def summary(self) -> dict[str, Any]:
        splits = self.meta["splits"]
        return {"name": self.name, "path": str(self.path),
                "train_tokens": splits["train"]["tokens"], "val_tokens": splits["val"]["tokens"]}


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
    if meta.get("format") != META_FORMAT or meta.get("tokenizer", {}).get("ranks_sha256") != RANKS_SHA256:
        raise DataError(f"{path} was not written by tinygpt's GPT-2 tokenizer: re-run `tinygpt tokenize`")
    return Dataset(meta.get("name", path.name), path, meta)


def list_datasets() -> list[Dataset]:
    """Complete datasets in the workspace, newest first."""
    root = workspace.data_dir()
    if not root.is_dir():
        return []
    found = []
    for meta in root.glob("*/meta.json"):
        if meta.parent.name.startswith("."):
            continue
        try:
            found.append(load_dataset(meta.parent))
        except DataError:
            continue
    return sorted(found, key=lambda d: (d.meta.get("created", ""), d.path.stat().st_mtime), reverse=True)


def find_dataset(spec: str | None) -> Dataset | None:
    """A dataset by name or folder path; `None`/"" -> the newest one, or None if there is none."""
    if not spec:
        datasets = list_datasets()
        return datasets[0] if datasets else None
    candidate = Path(spec).expanduser()
    if (candidate / "meta.json").is_file():
        return load_dataset(candidate)
    named = workspace.data_dir() / spec
    if named.is_dir():
        return load_dataset(named)
    known = ", ".join(d.name for d in list_datasets()) or "none yet"
    raise DataError(f"no tokenized dataset named {spec!r} (known: {known}): run `tinygpt tokenize` first")


def as_dict(result: TokenizeResult) -> dict[str, Any]:
    out = asdict(result)
    out["path"] = str(result.path)
    return out
