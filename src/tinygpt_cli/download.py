"""`download()`: stream a named corpus from the Hugging Face hub into `data/raw/<name>/`, ready for `tokenize`.

Layout: `data/raw/<name>/part-00000.parquet, part-00001.parquet, ...` (one `text` column, zstd, written in
download order) and `download.json`, the record: where the data came from, its license, the selection
(fraction, max-docs, seed, the rule) and how far the download got. `tinygpt tokenize <name>` reads the parts
in order; `tinygpt tokenize` without a SOURCE takes the last finished download.

Streaming: rows come through `datasets.load_dataset(..., streaming=True)`, which fetches over HTTP and keeps
no cache, so the disk holds only what is kept (zstd parquet, about a third of the text). Memory holds one part
(`PIECE_TEXT_BYTES` of text) at a time.

Which rows (deterministic, recorded): the dataset's shards (its data files) are visited in the order of
splitmix64(seed, 3, shard), rows in file order within each; the download stops after `round(fraction * rows)`
rows or `max_docs` documents. So `--fraction 0.1` fetches about a tenth of the bytes and never the rest, and a
larger fraction with the same seed extends a smaller one (its rows are a prefix of the larger selection).

Resumable: each part is written to a temp file, fsynced and renamed, then `download.json` records the position
after it (shard, rows into it). An interrupted download continues from the last part; a finished one is not
fetched again (its record says so, and no network is touched).

Offline: with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, or when the hub does not answer a single probe within
`TINYGPT_HUB_TIMEOUT` seconds (default 5), the error is immediate and says how to use local files instead.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
import shutil
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tinygpt_cli import __version__, workspace
from tinygpt_cli.data import check_seed, keyed_hash, write_json_atomic
from tinygpt_cli.errors import FULL, DataError, first_line, os_problem
from tinygpt_cli.sources import (
    DEFAULT_DOWNLOAD,
    DOWNLOAD_RECORD,
    EMBEDDED_NAME,
    RAW_DIR_NAME,
    REGISTRY,
    NamedSource,
    downloads,
    raw_dir,
    read_download_record,
)

RECORD_FORMAT = "tinygpt-download"
RECORD_VERSION = 1
PIECE_DOCUMENTS = 100_000  # documents per part file
PIECE_TEXT_BYTES = 64 * 1024 * 1024  # text per part file: what bounds memory
STREAM_BATCH_ROWS = 1000
DEFAULT_HUB_TIMEOUT_S = 5.0
SELECTION_RULE = (
    "the dataset's shards in the order of splitmix64(seed, 3, shard), rows in order within each; stop after "
    "round(fraction * rows) rows or max_docs documents"
)
_TRUE = {"1", "on", "yes", "true"}


@dataclass(frozen=True)
class DownloadEvent:
    """`kind`: "info" (a `message`), "plan" (before fetching), "progress" or "done"."""

    kind: str
    message: str = ""
    name: str = ""
    where: str = ""  # hub id (config)
    license: str = ""
    documents: int = 0  # documents kept so far (plan: documents already there)
    target_documents: int | None = None  # about how many there will be (None: the whole split, size unknown)
    text_bytes: int = 0
    total_text_bytes: int | None = None  # estimated
    shards: int = 0
    shards_done: int = 0
    seconds: float = 0.0
    documents_per_s: float = 0.0
    bytes_per_s: float = 0.0
    eta_s: float | None = None


@dataclass
class DownloadResult:
    name: str
    path: Path
    record: dict[str, Any]
    already: bool = False  # finished before this call: nothing was fetched
    fetched_documents: int = 0  # by this call
    seconds: float = 0.0

    @property
    def documents(self) -> int:
        return int(self.record.get("progress", {}).get("documents", 0))

    @property
    def disk_bytes(self) -> int:
        return sum(int(f.get("bytes", 0)) for f in self.record.get("files", []))


# ----------------------------------------------------------------------------------------------- catalog
def catalog() -> list[dict[str, Any]]:
    """The named sources with their approximate sizes and what the workspace holds of each (for --list)."""
    have = {r.get("name"): r for r in downloads()}

    def status_of(record: dict[str, Any] | None) -> str:
        if record is None:
            return ""
        progress = record.get("progress") if isinstance(record.get("progress"), dict) else {}
        documents = progress.get("documents")
        count = f": {documents:,} docs" if isinstance(documents, int) else ""
        return ("downloaded" if record.get("complete") else "partial") + count

    rows = []
    for entry in REGISTRY.values():
        rows.append({"name": entry.name, "title": entry.title, "where": entry.where, "license": entry.license,
                     "documents": entry.documents, "text_bytes": entry.text_bytes, "tokens": entry.tokens,
                     "status": "embedded" if entry.kind == "embedded" else status_of(have.get(entry.name))})
    for name, record in have.items():  # downloads of other hub datasets (`download owner/name`): sizes unknown
        if name not in REGISTRY and isinstance(name, str):
            rows.append({"name": name, "title": record.get("title") or name,
                         "where": record.get("where") or record.get("hub_id") or "?",
                         "license": record.get("license") or "see its card", "documents": None,
                         "text_bytes": None, "tokens": None, "status": status_of(record)})
    return rows


# ----------------------------------------------------------------------------------------------- download
def download(
    name: str | None = None,
    *,
    fraction: float = 1.0,
    max_docs: int | None = None,
    seed: int = 0,
    config: str | None = None,
    split: str | None = None,
    text_field: str | None = None,
    force: bool = False,
    on_event: Callable[[DownloadEvent], None] | None = None,
) -> DownloadResult:
    """Download `name` (a registry name, default openwebtext, or a hub id "owner/name") into `data/raw/<name>/`.

    See the module docstring for the layout, the selection rule, resuming and offline behaviour.
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"--fraction must be in (0, 1] (got {fraction})")
    if max_docs is not None and max_docs < 1:
        raise DataError(f"--max-docs must be at least 1 (got {max_docs})")
    check_seed(seed)
    emit = on_event or (lambda event: None)
    started = time.perf_counter()
    entry = _entry_for(name or DEFAULT_DOWNLOAD, config, split, text_field)
    folder = raw_dir() / entry.name
    if entry.kind == "embedded":
        return _record_embedded(entry, folder, started)
    identity = _identity(entry, seed)
    record = None if force else _usable_record(folder, identity)
    if record is not None and record.get("complete"):
        target = _target(fraction, max_docs, record["selection"]["total_rows"])
        if record.get("exhausted") or _reached(record["progress"], target):
            return _already(entry, folder, record, target, started, emit)  # no network needed
    check_hub(entry)  # fail fast, before anything is written
    folder.parent.mkdir(parents=True, exist_ok=True)
    with workspace.exclusive(workspace.lock_of(folder), f"data/{RAW_DIR_NAME}/{entry.name}"):
        if force and folder.exists():
            shutil.rmtree(folder)
        for left in folder.glob(".*.tmp-*"):  # a part or record a killed download was writing (atomic_path)
            left.unlink(missing_ok=True)
        record = _usable_record(folder, identity)
        return _fetch(entry, folder, record, identity, fraction, max_docs, seed, started, emit)


def _usable_record(folder: Path, identity: dict[str, Any]) -> dict[str, Any] | None:
    """The record of an earlier download of the same thing (to continue or reuse), None if there is none."""
    record = read_download_record(folder)
    if record is not None and record.get("identity") != identity:
        raise DataError(
            f"data/{RAW_DIR_NAME}/{folder.name} holds a download with other settings ({_describe(record)}): "
            f"pass --force to replace it, or repeat those settings"
        )
    if record is None and folder.exists() and any(folder.iterdir()):
        raise DataError(f"{folder} exists but is not a tinygpt download (or its {DOWNLOAD_RECORD} is damaged): "
                        f"move it away or pass --force")
    return record


def _entry_for(name: str, config: str | None, split: str | None, text_field: str | None) -> NamedSource:
    entry = REGISTRY.get(name)
    if entry is None:
        if Path(name).expanduser().exists():
            raise DataError(f"{name} is a local path: local files need no download, run `tinygpt tokenize {name}`")
        owner, _, repo = name.partition("/")
        hub_part = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # the hub's owner and repository names
        if name.count("/") != 1 or not hub_part.fullmatch(owner) or not hub_part.fullmatch(repo) or ".." in name:
            raise DataError(
                f"unknown dataset {name!r}: pick one of {', '.join(REGISTRY)} (see `tinygpt download --list`), "
                f"or give a Hugging Face dataset id such as owner/name"
            )
        folder_name = workspace.safe_name(name.split("/")[1] + (f"-{config}" if config else ""))
        if folder_name in REGISTRY or folder_name.lower() == RAW_DIR_NAME:
            # `tokenize shakespeare` is the embedded corpus and data/raw/<registry name>/ that corpus's download:
            # a hub dataset of that name gets the owner in its folder name instead of silently sharing it
            folder_name = workspace.safe_name(name.replace("/", "--") + (f"-{config}" if config else ""))
        return NamedSource(folder_name, name, hub_id=name, config=config, split=split or "train",
                           text_field=text_field or "text")
    changes = {k: v for k, v in {"config": config, "split": split, "text_field": text_field}.items() if v}
    return replace(entry, **changes) if changes else entry


def _identity(entry: NamedSource, seed: int) -> dict[str, Any]:
    """What must match for an existing download to be continued or reused."""
    return {"kind": entry.kind, "hub_id": entry.hub_id, "builder": entry.builder,
            "data_files": list(entry.data_files) if entry.data_files else None, "config": entry.config,
            "split": entry.split, "text_field": entry.text_field, "join": entry.join, "seed": seed}


def _describe(record: dict[str, Any]) -> str:
    identity = record.get("identity", {})
    selection = record.get("selection", {})
    return (f"{record.get('where')}, split {identity.get('split')}, seed {identity.get('seed')}, "
            f"fraction {selection.get('fraction')}, max-docs {selection.get('max_docs')}")


def _target(fraction: float, max_docs: int | None, total_rows: int | None) -> dict[str, int | None]:
    rows = None if fraction >= 1.0 or total_rows is None else max(1, round(fraction * total_rows))
    return {"rows": rows, "documents": max_docs}


def _reached(progress: dict[str, Any], target: dict[str, int | None]) -> bool:
    return (target["rows"] is not None and progress["rows"] >= target["rows"]) or (
        target["documents"] is not None and progress["documents"] >= target["documents"])


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")  # orders downloads


def _record_embedded(entry: NamedSource, folder: Path, started: float) -> DownloadResult:
    """The embedded corpus needs no network; recording it makes it the last download (what tokenize picks)."""
    old = read_download_record(folder)
    if (old is not None and old.get("kind") != "embedded") or \
            (old is None and folder.is_dir() and any(p.name != DOWNLOAD_RECORD for p in folder.iterdir())):
        raise DataError(f"{folder} holds another download, not the embedded corpus: move it away (the embedded "
                        f"corpus needs no download: `tinygpt tokenize {entry.name}` uses it)")
    folder.mkdir(parents=True, exist_ok=True)
    record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "name": entry.name, "kind": "embedded",
              "where": entry.where, "title": entry.title, "license": entry.license, "complete": True,
              "exhausted": True,
              "progress": {"documents": entry.documents, "rows": entry.documents, "text_bytes": entry.text_bytes},
              "files": [], "started": _now(), "completed": _now(), "tinygpt_version": __version__}
    write_json_atomic(folder / DOWNLOAD_RECORD, record)
    return DownloadResult(entry.name, folder, record, already=True, seconds=time.perf_counter() - started)


def _already(entry: NamedSource, folder: Path, record: dict[str, Any], target: dict[str, int | None],
             started: float, emit: Callable[[DownloadEvent], None]) -> DownloadResult:
    have = record["progress"]["documents"]
    more = (target["rows"] is not None and record["progress"]["rows"] > target["rows"]) or (
        target["documents"] is not None and have > target["documents"])
    note = f"already downloaded: data/{RAW_DIR_NAME}/{entry.name} holds {have:,} documents"
    if more:
        note += f" (more than asked: use `tinygpt tokenize {entry.name} --fraction F` to use part of them)"
    emit(DownloadEvent("info", message=note, name=entry.name))
    record["completed"] = _now()  # it becomes the last download again, so `tokenize` picks it
    write_json_atomic(folder / DOWNLOAD_RECORD, record)
    return DownloadResult(entry.name, folder, record, already=True, seconds=time.perf_counter() - started)


# ----------------------------------------------------------------------------------------------- the hub
def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _local_hint(entry: NamedSource) -> str:
    return (f"fetch its files on a connected machine (https://huggingface.co/datasets/{entry.hub_id}) and run "
            f"`tinygpt tokenize PATH` on them (a .txt/.jsonl/.parquet file, folder or glob)")


def check_hub(entry: NamedSource) -> None:
    """Fail fast, in one line, when the hub cannot be used: offline mode, or no answer to one quick probe."""
    if entry.kind != "hub":
        return
    if hub_offline():
        raise DataError(
            f"cannot download {entry.name} ({entry.where}): the Hugging Face hub is switched off here "
            f"(HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set); {_local_hint(entry)}"
        )
    silence = hub_silence(entry.hub_id)
    if silence:
        raise DataError(f"cannot download {entry.name} ({entry.where}): {silence}; {_local_hint(entry)}")


def hub_timeout() -> float:
    """Seconds to wait for the hub: TINYGPT_HUB_TIMEOUT, else DEFAULT_HUB_TIMEOUT_S."""
    text = os.environ.get("TINYGPT_HUB_TIMEOUT") or ""
    if not text.strip():
        return DEFAULT_HUB_TIMEOUT_S
    try:
        timeout = float(text)
    except ValueError:
        timeout = float("nan")
    if not 0 < timeout < float("inf"):
        raise DataError(f"TINYGPT_HUB_TIMEOUT must be a number of seconds above 0 (got {text!r}): fix or unset it")
    return timeout


def hub_silence(hub_id: str) -> str | None:
    """None if the hub answers one quick probe for dataset `hub_id` (within `TINYGPT_HUB_TIMEOUT` seconds), else
    why not, in words. `datasets` itself retries for about a minute before it gives up on an unreachable hub."""
    timeout = hub_timeout()
    endpoint = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    request = urllib.request.Request(f"{endpoint}/api/datasets/{hub_id}", method="HEAD")
    try:
        urllib.request.urlopen(request, timeout=timeout, context=_tls_context()).close()
    except urllib.error.HTTPError:
        return None  # the hub answered (a 401/404 is for `datasets` to explain)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLCertVerificationError):  # the hub answered, with a certificate that only
            return None  # `datasets`, with its own, can judge (a python.org Mac Python has none installed)
        return f"no answer from the Hugging Face hub at {endpoint} ({reason}; waited at most {timeout:g}s)"
    return None


def _tls_context() -> ssl.SSLContext:
    """The certificates the hub's own client trusts (certifi's, which `datasets` installs), else the system's."""
    try:
        import certifi
    except ImportError:
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


# Whether this process opened a `datasets` stream. Arrow reads one on threads of its own that call back into
# Python, and a stream left mid-file (--max-docs, an error) made the interpreter's exit abort ("terminate called
# without an active exception") or hang for good waiting on them: the CLI's `main` then ends the process once its
# output is flushed, without that teardown.
STREAMS_OPENED = False


def _open_stream(entry: NamedSource):
    """The split as a streaming `datasets.IterableDataset` (for the hub, this is the network call)."""
    import datasets

    global STREAMS_OPENED
    STREAMS_OPENED = True
    try:
        if entry.kind == "hub":
            return datasets.load_dataset(entry.hub_id, entry.config, split=entry.split, streaming=True)
        return datasets.load_dataset(entry.builder, data_files=list(entry.data_files or ()), split=entry.split,
                                     streaming=True)
    except Exception as exc:
        reason = first_line(exc)
        if "scripts are no longer supported" in reason:
            reason = "it still needs a loading script, which datasets>=4 cannot run"
        raise DataError(f"cannot open {entry.where} with `datasets` ({reason}); "
                        + (_local_hint(entry) if entry.kind == "hub" else "check the files")) from exc


def _shard_stream(dataset, shards: int, index: int):
    """One data file of the split, as its own stream."""
    return dataset.shard(num_shards=shards, index=index, contiguous=True)


def _total_rows(dataset, entry: NamedSource) -> tuple[int | None, str | None]:
    splits = getattr(getattr(dataset, "info", None), "splits", None)
    try:
        info = splits[entry.split] if splits else None
    except KeyError:
        info = None
    if info is not None and getattr(info, "num_examples", None):
        return int(info.num_examples), "dataset info"
    if entry.documents:
        return entry.documents, "tinygpt's registry (approximate)"
    return None, None


def _is_article_start(row: str) -> bool:
    """A WikiText top-level heading row: " = Title = " (second-level ones are " = = Part = = ")."""
    stripped = row.strip()
    return stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")


def _shard_documents(stream, entry: NamedSource, skip: int) -> Iterator[tuple[str, int]]:
    """`(document, rows of the shard consumed through it)`.

    WikiText rows are the lines of its articles, "" for a blank line; they are joined back into whole articles,
    each starting at a top-level heading row, so a document is an article rather than a paragraph.
    """
    rows = skip
    article: list[str] = []
    for batch in stream.iter(batch_size=STREAM_BATCH_ROWS):
        for value in batch[entry.text_field]:
            if value is not None and not isinstance(value, str):  # it was kept as "": hours of empty documents
                raise DataError(f"column {entry.text_field!r} of {entry.where} holds {type(value).__name__} values, "
                                f"not text: pass --text-field NAME (a column of text)")
            text = value if isinstance(value, str) else ""
            if entry.join != "wikitext":
                rows += 1
                yield text, rows
                continue
            if article and _is_article_start(text):
                joined = "".join(article)
                if joined.strip():  # (blank rows before the first heading are dropped)
                    yield joined, rows  # the heading row starts the next article
                article = []
            article.append(text or "\n")  # an empty row is a blank line of the article
            rows += 1
    if article:
        yield "".join(article), rows


def _write_part(path: Path, texts: list[str]) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with workspace.atomic_path(path) as tmp:
        pq.write_table(pa.table({"text": pa.array(texts, type=pa.large_string())}), tmp, compression="zstd")
    return path.stat().st_size


def _fetch(entry: NamedSource, folder: Path, record: dict[str, Any] | None, identity: dict[str, Any],
           fraction: float, max_docs: int | None, seed: int, started: float,
           emit: Callable[[DownloadEvent], None]) -> DownloadResult:
    import numpy as np

    dataset = _open_stream(entry)
    if entry.text_field not in (dataset.column_names or [entry.text_field]):
        raise DataError(f"{entry.where} has no column {entry.text_field!r} (columns: "
                        f"{', '.join(dataset.column_names)}): pass --text-field NAME")
    shards = int(getattr(dataset, "num_shards", None) or dataset.n_shards)
    total_rows, basis = _total_rows(dataset, entry)
    if fraction < 1.0 and total_rows is None:
        raise DataError(f"--fraction needs the size of {entry.where}, which it does not publish: use --max-docs N")
    order = [int(i) for i in np.argsort(keyed_hash(seed, 3, 0, shards), kind="stable")]
    if record is not None and record["shards"]["count"] != shards:
        raise DataError(f"{entry.where} has changed since the download started ({record['shards']['count']} "
                        f"shards then, {shards} now): pass --force to download it again")
    if record is None:
        record = {"format": RECORD_FORMAT, "version": RECORD_VERSION, "name": entry.name, "kind": entry.kind,
                  "where": entry.where, "title": entry.title, "hub_id": entry.hub_id, "config": entry.config,
                  "split": entry.split, "license": entry.license, "identity": identity,
                  "shards": {"count": shards, "order": order}, "files": [], "complete": False, "exhausted": False,
                  "progress": {"shards_done": 0, "shard_rows": 0, "rows": 0, "documents": 0, "text_bytes": 0},
                  "started": _now(), "completed": None, "tinygpt_version": __version__}
        folder.mkdir(parents=True, exist_ok=True)
    target = _target(fraction, max_docs, total_rows)
    record["selection"] = {"fraction": fraction, "max_docs": max_docs, "seed": seed, "target_rows": target["rows"],
                           "total_rows": total_rows, "total_rows_from": basis, "rule": SELECTION_RULE}
    record["complete"] = False
    write_json_atomic(folder / DOWNLOAD_RECORD, record)

    saved = dict(record["progress"])
    expected = [target["rows"] or total_rows or 0, target["documents"] or 0]
    target_documents = min(v for v in expected if v) if any(expected) else None
    bytes_per_row = entry.text_bytes / entry.documents if entry.documents else None
    total_text = int(target_documents * bytes_per_row) if target_documents and bytes_per_row else None
    if total_text:  # zstd parquet holds about a third of the text
        workspace.check_disk(folder, (total_text - saved["text_bytes"]) // 3, f"data/raw/{entry.name}",
                             "free some space, set TINYGPT_HOME to a larger disk, or fetch a part with --fraction")
    emit(DownloadEvent("plan", name=entry.name, where=entry.where, license=entry.license,
                       documents=saved["documents"], target_documents=target_documents,
                       text_bytes=saved["text_bytes"], total_text_bytes=total_text, shards=shards,
                       shards_done=saved["shards_done"]))

    position = dict(saved)  # after the last document taken (kept in `pending` or written)
    pending: list[str] = []
    pending_bytes = 0
    session = (time.perf_counter(), saved["documents"], saved["text_bytes"])
    last_event = 0.0

    def progress_event() -> None:
        elapsed = max(time.perf_counter() - session[0], 1e-9)
        bytes_per_s = (position["text_bytes"] - session[2]) / elapsed
        eta = (total_text - position["text_bytes"]) / bytes_per_s if total_text and bytes_per_s > 0 else None
        emit(DownloadEvent("progress", name=entry.name, where=entry.where, documents=position["documents"],
                           target_documents=target_documents, text_bytes=position["text_bytes"],
                           total_text_bytes=total_text, shards=shards, shards_done=position["shards_done"],
                           seconds=elapsed, documents_per_s=(position["documents"] - session[1]) / elapsed,
                           bytes_per_s=bytes_per_s, eta_s=max(0.0, eta) if eta is not None else None))

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            part = folder / f"part-{len(record['files']):05d}.parquet"
            size = _write_part(part, pending)
            record["files"].append({"file": part.name, "documents": len(pending), "text_bytes": pending_bytes,
                                    "bytes": size})
        record["progress"] = dict(position)
        write_json_atomic(folder / DOWNLOAD_RECORD, record)
        pending, pending_bytes = [], 0

    stopped = _reached(position, target)
    try:
        for k in range(position["shards_done"], shards):
            if stopped:
                break
            skip = position["shard_rows"]
            stream = _shard_stream(dataset, shards, order[k])
            if skip:
                stream = stream.skip(skip)
            for text, rows in _shard_documents(stream, entry, skip):
                size = len(text.encode("utf-8", "surrogatepass"))
                pending.append(text)
                pending_bytes += size
                position["rows"] += rows - position["shard_rows"]
                position["shard_rows"] = rows
                position["documents"] += 1
                position["text_bytes"] += size
                if len(pending) >= PIECE_DOCUMENTS or pending_bytes >= PIECE_TEXT_BYTES:
                    flush()
                if time.perf_counter() - last_event >= 0.25:
                    progress_event()
                    last_event = time.perf_counter()
                if _reached(position, target):
                    stopped = True
                    break
            if not stopped:
                position["shards_done"], position["shard_rows"] = k + 1, 0
    except (DataError, KeyboardInterrupt):
        raise
    except Exception as exc:  # the network went away mid-stream, or the disk filled: what is written stays
        first = "free some space (or set TINYGPT_HOME to a larger disk), then " if os_problem(exc) == FULL else ""
        raise DataError(f"the download of {entry.name} stopped ({first_line(exc)}): {first}rerun `tinygpt download "
                        f"{entry.name}` to continue from document {record['progress']['documents']:,}") from exc
    flush()
    record.update(complete=True, exhausted=not stopped, completed=_now())
    write_json_atomic(folder / DOWNLOAD_RECORD, record)
    progress_event()
    seconds = time.perf_counter() - started
    result = DownloadResult(entry.name, folder, record, fetched_documents=position["documents"] - saved["documents"],
                            seconds=seconds)
    emit(DownloadEvent("done", name=entry.name, where=entry.where, license=entry.license,
                       documents=position["documents"], target_documents=position["documents"],
                       text_bytes=position["text_bytes"], total_text_bytes=position["text_bytes"], shards=shards,
                       shards_done=position["shards_done"], seconds=seconds))
    return result


__all__ = ["EMBEDDED_NAME", "DownloadEvent", "DownloadResult", "catalog", "check_hub", "download"]
