"""Where text comes from: the registry of named corpora, downloads in `data/raw/<name>/`, local files, and the
embedded Shakespeare corpus; and how a corpus is read as a numbered sequence of documents.

A *source* is an ordered list of files whose documents are numbered 0..n-1 in that order: files in sorted
path order; a `.txt` file is one document, a non-blank line of a `.jsonl`(.gz) file is one, a row of a
`.parquet` file is one. A download is a folder of `.parquet` files written in download order.

Undecodable text, the policy `tinygpt tokenize` documents:

* a `.txt` file is UTF-8, or UTF-16/32 that begins with a byte-order mark (read whole, so up to
  `TXT_WHOLE_BYTES`); one that is neither is skipped whole and named (it is one document);
* a `.jsonl` line that is not valid UTF-8 is skipped and named `file:line` (the other lines are kept);
* `.parquet` string columns are UTF-8 by construction; a binary column is decoded as UTF-8, row by row, with
  the same rule;
* lone surrogates that JSON escapes such as `"\\ud800"` can produce are replaced by U+FFFD when encoding,
  as tiktoken does.

Skipped documents keep their number, so the split of the others does not move.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob
import gzip
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tinygpt_cli import workspace
from tinygpt_cli.config import is_count
from tinygpt_cli.errors import DataError

EMBEDDED_NAME = "shakespeare"
DEFAULT_DOWNLOAD = "openwebtext"
RAW_DIR_NAME = "raw"  # downloads live in data/raw/<name>/, next to the tokenized data/<name>/
DOWNLOAD_RECORD = "download.json"
TEXT_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
TXT_WHOLE_BYTES = 32 * 1024 * 1024  # .txt files up to this size are read at once; larger ones are streamed
TXT_PIECE_BYTES = 4 * 1024 * 1024  # the pieces a large .txt file is streamed in
PARQUET_BATCH_ROWS = 1024

# Byte-order marks a text file may begin with and the codec each names, UTF-32's first (its little-endian mark
# begins with UTF-16's). Windows tools write them: Notepad's "Unicode" and PowerShell's `>` mean marked UTF-16.
_BYTE_ORDER_MARKS = (
    (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"),
)


class SourceUnreadable(DataError):
    """A source file that could not be read part way (an I/O error, a file deleted or cut short since it was
    counted): the same command may succeed later, so the progress made is kept. A file changed since is found
    out by the resume (its fingerprint), which then starts over."""


def text_codec(head: bytes) -> str:
    """The codec of text that begins with `head` (its first 4 bytes will do): UTF-8 unless a byte-order mark says
    otherwise. Each codec named drops the mark, which is no text."""
    return next((codec for mark, codec in _BYTE_ORDER_MARKS if head.startswith(mark)), "utf-8")


def decode_text(raw: bytes) -> str:
    """The text of a file's bytes: UTF-8, or UTF-16/32 where a byte-order mark says so. Raises UnicodeDecodeError."""
    return raw.decode(text_codec(raw[:4]))


def other_files_advice(files: list[Path]) -> str:
    """What makes files tokenize cannot read readable, for the kinds corpora ship in (C4's .json.gz, The Pile's
    and SlimPajama's .jsonl.zst); "" for others. Said where a folder holds only such files, and beside usable ones."""
    names = [path.name.lower() for path in files]
    advice = []
    if any(name.endswith((".json", ".json.gz")) for name in names):
        advice.append("rename JSON lines files .json(.gz) to .jsonl(.gz)")
    packed = sorted({name.rsplit(".", 1)[-1] for name in names if name.endswith((".zst", ".xz", ".bz2", ".lz4"))})
    if packed:
        advice.append(f"unpack the .{', .'.join(packed)} files (e.g. `zstd -d`, `xz -d`) or pack them as .jsonl.gz")
    return "; ".join(advice)


def conversion_advice(where: str) -> str:
    """How to make the file named in `where` (a path, or `path:line`) UTF-8: iconv from the codec its mark names,
    else from latin1 (the likeliest unmarked one)."""
    try:
        with open(where, "rb") as handle:
            head = handle.read(4096)
    except OSError:  # `path:line` of a .jsonl, or gone
        head = b""
    codec = text_codec(head)
    source = codec if codec in ("utf-16", "utf-32") else unmarked_utf16(head) or "latin1"
    return f"iconv -f {source} -t utf-8"


def unmarked_utf16(head: bytes) -> str | None:
    """"utf-16le" or "utf-16be" where the bytes a file begins with are UTF-16 without a byte-order mark (mostly
    ASCII text, so every other byte is NUL, at odd or even offsets): valid UTF-8 too, which would put
    'h\\x00e\\x00l\\x00…' in a dataset. None for text (a few NULs, say padding after a crash, do not count)."""
    odd, even = head[1::2].count(0), head[0::2].count(0)
    pairs = len(head) // 2
    if pairs < 2 or max(odd, even) < 0.4 * pairs or min(odd, even) > 0.1 * pairs:
        return None
    return "utf-16le" if odd > even else "utf-16be"


def _unmarked_utf16_text(head: bytes) -> bool:
    """Whether a .txt that begins with `head` is UTF-16 without its byte-order mark (no mark, NULs every other byte)."""
    return text_codec(head[:4]) == "utf-8" and unmarked_utf16(head[:4096]) is not None


# ----------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class NamedSource:
    """A corpus `tinygpt download NAME` knows. Sizes are approximate and describe the whole split."""

    name: str
    title: str
    hub_id: str | None = None  # Hugging Face dataset id; None for the embedded corpus or a `builder`
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    license: str = ""
    documents: int = 0
    text_bytes: int = 0
    tokens: int = 0  # GPT-2 tokens
    join: str | None = None  # "wikitext": the rows are lines; they are joined into whole articles
    builder: str | None = None  # a `datasets` builder ("parquet", "json", "text") reading `data_files`
    data_files: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        if self.hub_id is not None:
            return "hub"
        return "files" if self.builder is not None else "embedded"

    @property
    def where(self) -> str:
        """Hub id with its config, for messages: "HuggingFaceFW/fineweb-edu (sample-10BT)"."""
        if self.kind == "embedded":
            return "embedded"
        base = self.hub_id if self.hub_id is not None else f"{self.builder} files"
        return f"{base} ({self.config})" if self.config else base


REGISTRY: dict[str, NamedSource] = {
    entry.name: entry
    for entry in (
        NamedSource(
            "openwebtext", "OpenWebText: web pages linked from Reddit, GPT-2's WebText recreated",
            hub_id="Skylion007/openwebtext", license="CC0-1.0",
            documents=8_013_769, text_bytes=39_769_494_896, tokens=9_040_000_000,
        ),
        NamedSource(
            "tinystories", "TinyStories: short stories in a 3-4 year old's vocabulary (GPT-3.5/4 written)",
            hub_id="roneneldan/TinyStories", license="CDLA-Sharing-1.0",
            documents=2_119_719, text_bytes=1_900_000_000, tokens=470_000_000,
        ),
        NamedSource(
            "fineweb-edu", "FineWeb-Edu, its 10B-token sample: educational web pages filtered from CommonCrawl",
            hub_id="HuggingFaceFW/fineweb-edu", config="sample-10BT", license="ODC-By-1.0",
            documents=9_672_101, text_bytes=46_000_000_000, tokens=10_000_000_000,
        ),
        NamedSource(
            "wikitext-103", "WikiText-103: 28k good and featured English Wikipedia articles (raw text)",
            hub_id="Salesforce/wikitext", config="wikitext-103-raw-v1", license="CC-BY-SA-3.0",
            documents=1_801_350, text_bytes=540_000_000, tokens=120_000_000, join="wikitext",
        ),
        NamedSource(
            EMBEDDED_NAME, "Shakespeare: 42 plays and poems, shipped inside tinygpt (no network)",
            license="public domain",
            documents=42, text_bytes=5_060_000, tokens=1_570_000,
        ),
    )
}


# ----------------------------------------------------------------------------------------------- sources
@dataclass(frozen=True)
class DocumentFile:
    """One input file and how it splits into documents."""

    path: Path
    kind: str  # "txt" | "jsonl" | "parquet"
    documents: int  # documents it holds (rows, non-blank lines, or 1)
    size_bytes: int
    text_bytes: int = 0  # about how much text it holds (uncompressed), for the plan


@dataclass(frozen=True)
class Source:
    """An ordered list of files whose documents are numbered 0..n-1 in that order."""

    name: str  # default dataset name
    description: str  # what the CLI prints ("the embedded Shakespeare corpus", a path)
    kind: str  # "embedded" | "local" | "download"
    files: tuple[DocumentFile, ...]
    text_field: str = "text"
    provenance: dict[str, Any] = field(default_factory=dict)  # a download's record, for meta.json
    left_out: tuple[str, ...] = ()  # files of a folder or glob that are none of TEXT_SUFFIXES (`tokenize` says so)
    left_out_folders: tuple[str, ...] = ()  # folders a glob matches, which it does not read (`tokenize` says so)
    unreadable_folders: tuple[str, ...] = ()  # folders under a folder source it may not read (`tokenize` says so)
    other_splits: tuple[str, ...] = ()  # a snapshot folder's validation/test files, not read (`tokenize` says so)

    @property
    def documents(self) -> int:
        return sum(f.documents for f in self.files)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.files)

    @property
    def text_bytes(self) -> int:
        return sum(f.text_bytes or f.size_bytes for f in self.files)


def _kind_of(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".txt"):
        return "txt"
    if name.endswith(".jsonl") or name.endswith(".jsonl.gz"):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    return None


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


JSONL_SHARE_SAMPLES = 4096  # lines parsed, spread through a .jsonl, to estimate how much of a line is its text


def _jsonl_stats(path: Path, text_field: str = "text") -> tuple[int, int]:
    """(non-blank lines, about how many bytes of text they hold) of a .jsonl(.gz) file, read as bytes. The text's
    share of a line (other fields and JSON escapes are no text to tokenize) is the mean over the lines found at
    evenly spaced byte offsets, which weighs each line by its length as the total does."""
    count = line_bytes = 0
    size = path.stat().st_size * (4 if path.name.lower().endswith(".gz") else 1)  # .gz: a guess, for the spacing
    step = max(1, size // JSONL_SHARE_SAMPLES)
    next_at, shares = 0, []
    try:
        with _open_binary(path) as handle:
            for line in handle:
                if line.strip():
                    count += 1
                    line_bytes += len(line)
                    if line_bytes > next_at:  # this line holds the next sampled offset
                        shares.append(_text_bytes_of_line(line, text_field) / len(line))
                        next_at += step * (1 + (line_bytes - next_at) // step)
    except PermissionError as exc:
        raise DataError(f"{path} could not be read ({exc.strerror}): check its permissions") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} could not be read ({exc}): check the file (a truncated .gz?)") from None
    return count, round(line_bytes * sum(shares) / len(shares)) if shares else 0


def _text_bytes_of_line(line: bytes, text_field: str) -> int:
    """Bytes of the text field of one .jsonl line; the whole line where it cannot be read (errors come later)."""
    try:
        value = json.loads(line).get(text_field)
    except (ValueError, AttributeError, RecursionError):
        return len(line)
    return len(value.encode("utf-8", "surrogatepass")) if isinstance(value, str) else 0


def _parquet_stats(path: Path, text_field: str) -> tuple[int, int]:
    """(rows, uncompressed bytes of the text column, else of all columns) from the footer alone."""
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as exc:
        raise DataError(f"{path} is not a readable parquet file ({exc}): check the file") from None
    names = [metadata.schema.column(j).path for j in range(metadata.num_columns)]
    groups = [metadata.row_group(i) for i in range(metadata.num_row_groups)]
    if text_field in names:
        text_bytes = sum(g.column(names.index(text_field)).total_uncompressed_size for g in groups)
    else:
        text_bytes = sum(g.total_byte_size for g in groups)
    return metadata.num_rows, text_bytes


TEXT_BYTES_SAMPLE = 64 * 1024  # the head of a UTF-16/32 .txt file decoded to size its text in UTF-8


def _txt_text_bytes(path: Path, size: int) -> int:
    """About how many bytes of UTF-8 a .txt file's text is, as it is encoded: its size, or for UTF-16/32 (a
    byte-order mark) its size times the UTF-8 bytes per file byte of its head (1/2 to 1/4 for ASCII)."""
    try:
        with open(path, "rb") as handle:
            codec = text_codec(handle.read(4))  # a UTF-8 file (nearly all): nothing more is read
            if codec not in ("utf-16", "utf-32"):
                return size
            handle.seek(0)
            head = handle.read(TEXT_BYTES_SAMPLE)
    except OSError:  # reported when the file is read
        return size
    if len(head) <= 4:
        return size
    text = codecs.getincrementaldecoder(codec)(errors="replace").decode(head)  # a cut character waits: not counted
    return int(size * len(text.encode("utf-8", "surrogatepass")) / len(head))


def _document_file(path: Path, text_field: str = "text") -> DocumentFile:
    kind = _kind_of(path)
    assert kind is not None
    size = path.stat().st_size
    if kind == "txt":
        return DocumentFile(path, kind, 1, size, _txt_text_bytes(path, size))
    documents, text_bytes = _jsonl_stats(path, text_field) if kind == "jsonl" else _parquet_stats(path, text_field)
    return DocumentFile(path, kind, documents, size, text_bytes)


def embedded_source() -> Source:
    """The 42 works of Shakespeare shipped inside the package (public domain; see assets/LICENSE-*)."""
    folder = resources.files("tinygpt_cli").joinpath("assets", "shakespeare")
    paths = sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".txt"))
    files = tuple(DocumentFile(p, "txt", 1, p.stat().st_size, p.stat().st_size) for p in paths)
    return Source(EMBEDDED_NAME, "the embedded Shakespeare corpus (42 works)", "embedded", files)


def _files_under(folder: Path, loops_only: bool = False) -> tuple[list[Path], list[str]]:
    """Every file under `folder`, sorted, following symlinked folders (a corpus of shards linked in from other
    disks; `Path.rglob` skips them silently, where a `**` glob follows them), each real folder once; with
    `loops_only` (a `**` glob, which matches names) a folder two links reach is listed under both names, a loop (a
    link back up the tree) still once (`local_source` reads each real file once). Hidden files
    and folders are left out, as a glob leaves them: .git/, or the copies in .ipynb_checkpoints/, which would put
    each notebook's text in twice, likely once in each split. Also returned: the folders below it that cannot be
    read (`lost+found` at a disk's root; os.walk passed over them in silence), as "path (why)"."""
    found, reals, unreadable = [], {}, []

    def note(exc: OSError) -> None:
        if Path(exc.filename) == Path(folder):  # the folder given itself
            raise DataError(f"cannot read the folder {folder} ({exc.strerror}): check its permissions")
        unreadable.append(f"{exc.filename} ({exc.strerror})")

    seen: set[str] = set()
    for where, folders, names in os.walk(folder, followlinks=True, onerror=note):
        real = reals[where] = os.path.realpath(where)
        if loops_only:
            above, ancestors = os.path.dirname(where), set()
            while above in reals:  # (os.walk goes top-down: every folder above this one was walked before it)
                ancestors.add(reals[above])
                above = os.path.dirname(above)
            repeated = real in ancestors  # a link back up the tree
        else:
            repeated = real in seen  # a link back up the tree, or a second link to the same folder
            seen.add(real)
        if repeated:
            folders[:] = []
            continue
        folders[:] = [name for name in folders if not name.startswith(".")]
        found.extend(Path(where) / name for name in names if not name.startswith("."))
    files = []
    for path in sorted(found):
        try:
            if path.is_file():
                files.append(path)
        except OSError as exc:  # a folder it may list but not enter (mode 744): its files cannot be read either
            problem = f"{path.parent} ({exc.strerror})"
            unreadable += [] if problem in unreadable else [problem]
    return files, unreadable


def _recursive_glob(pattern: Path) -> tuple[list[Path], list[str]]:
    """The files a `**` glob matches, found by walking each folder the part before its first `**` matches (a plain
    glob) as `_files_under` walks a folder given (a link loop walked once, hidden entries left out, as glob leaves
    them), each file's path below it matched name by name (`**`: any number of folders): Python's glob follows every
    link, so a tree with two links back up it (`a/up -> ..`, `self -> .`) took it forever. Returned as
    `_files_under` returns them."""
    parts = pattern.parts
    cut = parts.index("**")
    prefix = Path(*parts[:cut]) if cut else Path(".")
    bases = [Path(found) for found in sorted(glob.glob(str(prefix)))] if glob.has_magic(str(prefix)) else [prefix]
    files, unreadable = [], []
    for base in (base for base in bases if base.is_dir()):
        found, problems = _files_under(base, loops_only=True)
        files += [path for path in found if _matches(path.relative_to(base).parts, parts[cut:])]
        unreadable += problems
    return files, unreadable


def _matches(names: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether a relative path's names match a glob's, one by one as glob matches them (`fnmatch`: `*`, `?` and
    `[...]` within a name), where `**` is any number of names, none included."""
    if not pattern:
        return not names
    if pattern[0] == "**":
        return any(_matches(names[start:], pattern[1:]) for start in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], pattern[0]) and _matches(names[1:], pattern[1:])


OTHER_SPLITS = ("validation", "valid", "val", "test")  # a corpus's held-out splits, by their usual names


def _split_of(path: Path, root: Path) -> str | None:
    """The split a file of a dataset snapshot names: the innermost folder below `root` named for one
    (`data/train/part-0.parquet`), else the first word of its name that is one (`train-00000-of-00004.parquet`,
    `TinyStories-valid.txt`, `c4-validation.00000-of-00008.json.gz`, `test_0.txt`); None for others."""
    splits = ("train", *OTHER_SPLITS)
    folders = [part.lower() for part in path.relative_to(root).parts[:-1] if part.lower() in splits]
    if folders:
        return folders[-1]
    words = re.split(r"[-_.]", path.name.lower())
    return next((word for word in words if word in splits), None)


def local_source(spec: str, text_field: str = "text") -> Source:
    """A file, a folder (searched recursively) or a glob of .txt / .jsonl(.gz) / .parquet files."""
    path = Path(spec).expanduser()
    unreadable: list[str] = []
    if any(ch in spec for ch in "*?[") and not path.exists():  # a path that exists is itself, brackets or not
        if "**" in path.parts:  # walked as a folder is: glob's `**` follows link loops without end
            candidates, unreadable = _recursive_glob(path)
        else:
            candidates = [Path(p) for p in sorted(glob.glob(str(path)))]
        if not candidates:
            raise DataError(f"no file matches {spec}: check the pattern")
        name = workspace.safe_name(Path(spec.split("*")[0]).name or "glob")
    elif path.is_dir():
        candidates, unreadable = _files_under(path)
        name = workspace.safe_name(path.resolve().name)
    elif path.is_file():
        candidates = [path]
        name = workspace.safe_name(path.name.split(".")[0])
    elif path.exists():  # a device, a pipe, a socket
        raise DataError(f"{spec} is not a regular file: save the text to a .txt/.jsonl/.parquet file and give that")
    else:
        raise DataError(
            f"{spec} does not exist: give a file, a folder or a glob of .txt/.jsonl/.parquet files, "
            f"or a downloaded dataset (tinygpt download --list)"
        )
    usable, others, read, folders = [], {}, set(), []
    for p in candidates:
        if not p.is_file():
            if p.is_dir():  # a glob reads the files it matches: `tokenize` names the folders it matched
                folders.append(str(p))
            continue
        real = os.path.realpath(p)
        if _kind_of(p) is None:
            others.setdefault(real, p)
        elif real not in read:  # reached twice (a `**` glob, a link loop, links named .jsonl): read once
            read.add(real)
            usable.append(p)
    left_out = [p for real, p in others.items() if real not in read]  # named once, unless read under a usable name
    other_splits: list[Path] = []
    if path.is_dir():  # a Hugging Face snapshot (data/train-*.parquet beside validation-* and test-*): train only
        splits = {p: _split_of(p, path) for p in usable}
        if "train" in splits.values() and any(split in OTHER_SPLITS for split in splits.values()):
            other_splits = [p for p in usable if splits[p] in OTHER_SPLITS]
            usable = [p for p in usable if splits[p] not in OTHER_SPLITS]
    if not usable and path.is_file():  # one file, of another kind
        raise DataError(f"{spec} is not a .txt, .jsonl, .jsonl.gz or .parquet file: "
                        f"{other_files_advice([path]) or 'save the text as one of those and give that'}")
    if not usable:
        locked = f" it can read (it cannot read {unreadable[0]})" if unreadable else ""
        found = f" (it holds {len(left_out):,} other file(s), first: {left_out[0]})" if left_out and not locked else ""
        raise DataError(f"{spec} holds no .txt, .jsonl, .jsonl.gz or .parquet file{locked}{found}: "
                        f"{other_files_advice(left_out) or 'point tokenize at your text files'}")
    files = tuple(_document_file(p, text_field) for p in usable)
    if sum(f.documents for f in files) == 0:
        raise DataError(f"{spec} is empty: it holds no documents to tokenize")
    return Source(name, str(spec), "local", files, text_field, left_out=tuple(map(str, left_out)),
                  left_out_folders=tuple(folders), unreadable_folders=tuple(unreadable),
                  other_splits=tuple(map(str, other_splits)))


# ----------------------------------------------------------------------------------------------- downloads
def raw_dir() -> Path:
    """Where downloads live: `data/raw/` of the workspace."""
    return workspace.data_dir() / RAW_DIR_NAME


def read_download_record(folder: Path) -> dict[str, Any] | None:
    """The `download.json` of a download folder, or None if there is none (or it is unreadable)."""
    try:
        record = json.loads((folder / DOWNLOAD_RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != "tinygpt-download" or _record_problem(record):
        return None
    return record


def _record_problem(record: dict[str, Any]) -> str | None:
    """What is wrong with the fields of a download.json that commands read (a damaged or hand-edited one is
    treated as no record, not a traceback), or None."""
    progress = record.get("progress")
    keys = ("documents",) if record.get("kind") == "embedded" else \
        ("documents", "rows", "text_bytes", "shards_done", "shard_rows")
    if not isinstance(progress, dict) or not all(is_count(progress.get(key)) for key in keys):
        return "progress"
    files = record.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, dict) and isinstance(f.get("file"), str) for f in files):
        return "files"
    selection = record.get("selection", {})
    if not isinstance(selection, dict) or not isinstance(selection.get("fraction", 1.0), (int, float)):
        return "selection"
    if record.get("kind") != "embedded":
        shards = record.get("shards")
        if not isinstance(shards, dict) or not is_count(shards.get("count")) or \
                not isinstance(shards.get("order"), list) or not isinstance(record.get("identity"), dict):
            return "shards"
    return None


def downloads() -> list[dict[str, Any]]:
    """The records of every download folder in the workspace (finished or not), newest first."""
    root = raw_dir()
    if not root.is_dir():
        return []
    found = [r for folder in sorted(root.iterdir()) if folder.is_dir() and (r := read_download_record(folder))]
    return sorted(found, key=lambda r: r.get("completed") or r.get("started") or "", reverse=True)


def latest_download() -> str | None:
    """The name of the most recently finished download, or None."""
    finished = [r for r in downloads() if r.get("complete")]
    return finished[0]["name"] if finished else None


def default_source_spec() -> tuple[str, str]:
    """What `tinygpt tokenize` uses without a SOURCE: (spec, why) — the last download, else the embedded corpus."""
    name = latest_download()
    if name is not None:
        return name, f"the last download, {name} (data/{RAW_DIR_NAME}/{name})"
    return EMBEDDED_NAME, "the embedded Shakespeare corpus (nothing downloaded yet)"


def downloaded_source(name: str) -> Source:
    folder = raw_dir() / name
    record = read_download_record(folder)
    if record is None:
        raise DataError(f"{name} is not downloaded: run `tinygpt download {name}` first")
    if record.get("kind") == "embedded":
        return embedded_source()
    if not record.get("complete"):
        done = record.get("progress", {}).get("documents", 0)
        raise DataError(
            f"the download of {name} is not finished ({done:,} documents so far): "
            f"rerun `tinygpt download {name}` to finish it"
        )
    paths = sorted(folder.glob("part-*.parquet"))
    expected = [f["file"] for f in record.get("files", [])]
    if [p.name for p in paths] != expected:
        raise DataError(
            f"{folder} does not hold the files its {DOWNLOAD_RECORD} lists (moved or deleted?): "
            f"run `tinygpt download {name} --force`"
        )
    files = tuple(_document_file(p) for p in paths)
    selection = record.get("selection", {})
    share = f"{selection['fraction']:.0%} of " if selection.get("fraction", 1.0) < 1.0 else ""
    description = f"the download {name} (data/{RAW_DIR_NAME}/{name}: {share}{record.get('where', name)})"
    provenance = {k: record.get(k) for k in ("name", "hub_id", "config", "split", "license", "selection")}
    return Source(name, description, "download", files, "text", provenance)


def resolve_source(spec: str | None, text_field: str = "text") -> Source:
    """`None` or "shakespeare" -> the embedded corpus; a downloaded name -> its files; else a local path or glob.

    A name of the registry that is not downloaded yet is an error that says how to download it.
    """
    if spec is None or spec == EMBEDDED_NAME:
        return embedded_source()
    if not spec.strip():  # "" is the current folder to pathlib: an unset shell variable would tokenize it
        raise DataError("SOURCE is empty: give a file, folder, glob or downloaded dataset, or leave it out "
                        "to tokenize the last download (else the embedded corpus)")
    if spec == workspace.safe_name(spec) and read_download_record(raw_dir() / spec) is not None:
        return downloaded_source(spec)
    if Path(spec).expanduser().exists() or any(ch in spec for ch in "*?["):
        return local_source(spec, text_field)
    if spec in REGISTRY:
        raise DataError(f"{spec} is not downloaded yet: run `tinygpt download {spec}` first, or give a local path")
    return local_source(spec, text_field)


# ----------------------------------------------------------------------------------------------- reading
CodeBlock = Callable[[int, int], np.ndarray]  # codes(lo, hi) -> int8 array: 0 skip, 1 train, 2 val
UndecodableHook = Callable[[str], None]


class _Codes:
    """Looks up one document's code at a time, fetching them in blocks."""

    BLOCK = 1 << 16

    def __init__(self, codes: CodeBlock, total: int) -> None:
        self.codes = codes
        self.total = total
        self.lo = 0
        self.block = np.zeros(0, dtype=np.int8)

    def __call__(self, position: int) -> int:
        offset = position - self.lo
        if not 0 <= offset < self.block.size:
            self.lo = position
            self.block = self.codes(position, min(self.total, position + self.BLOCK))
            offset = 0
        return int(self.block[offset])


def iter_documents(
    src: Source, codes: CodeBlock, start: int = 0, on_undecodable: UndecodableHook | None = None
) -> Iterator[tuple[int, int, str | TextFile]]:
    """Yield `(position, code, document)` for the documents from `start` on whose code is not 0.

    A document is its text, or a `TextFile` for a .txt file (read only if wanted, streamed if large).
    Unwanted documents are not parsed; undecodable ones are reported to `on_undecodable` and not yielded.
    """
    report = on_undecodable or (lambda where: None)
    code_of = _Codes(codes, src.documents)
    base = 0
    for doc_file in src.files:
        first, base = base, base + doc_file.documents
        if base <= start:
            continue
        try:
            if doc_file.kind == "txt":
                code = code_of(first)
                if code:
                    text_file = TextFile.open(doc_file.path, report)
                    if text_file is not None:
                        yield first, code, text_file
            elif doc_file.kind == "jsonl":
                yield from _jsonl_documents(doc_file.path, src.text_field, first, doc_file.documents, start,
                                            code_of, report)
            else:
                yield from _parquet_documents(doc_file.path, src.text_field, first, start, codes, report)
        except (OSError, EOFError) as exc:  # a file deleted, unreadable or cut short since it was counted
            reason = getattr(exc, "strerror", None) or exc
            raise SourceUnreadable(f"cannot read {doc_file.path} ({reason}): check the file and rerun") from None


def _jsonl_documents(
    path: Path, text_field: str, first: int, count: int, start: int, code_of: _Codes, report: UndecodableHook
) -> Iterator[tuple[int, int, str]]:
    """The documents of the .jsonl at `path`, which held `count` of them (numbered from `first`) when counted."""
    position = first - 1
    with _open_binary(path) as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            position += 1
            if position >= first + count:  # the split of every document was chosen from the counts
                raise _changed(path, f"more than the {count:,} documents counted")
            if position < start:
                continue
            code = code_of(position)
            if not code:
                continue
            try:
                row = json.loads(line)
            except UnicodeDecodeError:
                report(f"{path}:{line_no}")
                continue
            except json.JSONDecodeError as exc:
                raise DataError(f"line {line_no} of {path} is not valid JSON ({exc.msg}): fix or remove it") from None
            yield position, code, _text_of(row, text_field, f"line {line_no} of {path}")
    if position < first + count - 1:
        raise _changed(path, f"{position - first + 1:,} documents, {count:,} when counted")


def _changed(path: Path, how: str) -> DataError:
    return DataError(f"{path} changed while it was being tokenized ({how}): run tokenize again once it no "
                     f"longer changes")


def _text_of(row: Any, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        fields = ", ".join(row) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"{where} has no {text_field!r} field (found: {fields}): pass --text-field NAME")
    value = row[text_field]
    if value is None or isinstance(value, str):  # null: a missing document, skipped as empty
        return value or ""
    kind = {bool: "true/false", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__)
    raise DataError(f"{where}: {text_field!r} holds {kind}, not text: pass --text-field NAME (a field of text)")


def _parquet_documents(
    path: Path, text_field: str, first: int, start: int, codes: CodeBlock, report: UndecodableHook
) -> Iterator[tuple[int, int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    if text_field not in schema.names:
        raise DataError(
            f"{path} has no column {text_field!r} (columns: {', '.join(schema.names)}): pass --text-field NAME"
        )
    column_type = schema.field(text_field).type
    if pa.types.is_dictionary(column_type):  # a categorical column (pandas "category"): its values are the text
        column_type = column_type.value_type
    is_text = pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or \
        getattr(pa.types, "is_string_view", lambda t: False)(column_type)
    is_binary = pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type) or \
        getattr(pa.types, "is_binary_view", lambda t: False)(column_type)
    if not (is_binary or is_text):
        raise DataError(f"column {text_field!r} of {path} holds {column_type}, not text: pass --text-field NAME")
    metadata = parquet.metadata
    position = first
    first_group = 0  # row groups wholly before `start` are not read
    while first_group < metadata.num_row_groups and position + metadata.row_group(first_group).num_rows <= start:
        position += metadata.row_group(first_group).num_rows
        first_group += 1
    groups = list(range(first_group, metadata.num_row_groups))
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=groups, columns=[text_field]):
        lo, position = position, position + batch.num_rows
        if position <= start:
            continue
        skip = max(0, start - lo)
        block = codes(lo + skip, position)
        wanted = np.flatnonzero(block)
        if wanted.size == 0:
            continue
        rows = wanted + skip
        column = batch.column(0)
        values = column.take(pa.array(rows)).to_pylist() if rows.size < batch.num_rows else column.to_pylist()
        for row, code, value in zip(rows.tolist(), block[wanted].tolist(), values, strict=True):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    report(f"{path}:row {lo + row - first}")
                    continue
            yield lo + row, code, value if isinstance(value, str) else ""


# ----------------------------------------------------------------------------------------------- .txt files
def _solid_before(data: bytes, end: int) -> bool:
    """Whether the character that ends at byte `end` of `data` (valid UTF-8) is not whitespace."""
    byte = data[end - 1]
    if byte < 0x80:
        return 0x21 <= byte <= 0x7E
    start = end - 1
    while start > 0 and end - start < 4 and 0x80 <= data[start] < 0xC0:
        start -= 1
    try:
        char = data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return len(char) == 1 and not char.isspace()


def _solid_after(data: bytes, start: int) -> bool:
    """Whether the character that starts at byte `start` of `data` is whole there and not whitespace."""
    if start >= len(data):
        return False
    byte = data[start]
    if byte < 0x80:
        return 0x21 <= byte <= 0x7E
    size = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
    try:
        char = data[start : start + size].decode("utf-8")
    except UnicodeDecodeError:  # cut short by the end of `data`: not known yet
        return False
    return len(char) == 1 and not char.isspace()


def _safe_cut(data: bytes, limit: int, floor: int = 1) -> int:
    """An offset in floor..limit just after a line break with a non-whitespace character on both sides (any
    script: Cyrillic or CJK text has line breaks too), else (a line longer than `data`) just before a single
    space between printable ASCII and an ASCII letter; or -1. Offsets below `floor` are not looked at (the
    caller already did), so that streaming a file that has no cut point costs linear, not quadratic, time.

    Cutting text there cannot change GPT-2 BPE tokens: the break is a pre-token of its own either way
    (no pre-token of the GPT-2 pattern spans a "\\n" between two non-whitespace characters), and a space before a
    letter starts the pre-token " word" whatever came before it; the pattern has no look-behind, so the text
    after the cut is split as before.
    """
    floor = max(1, floor)
    at = limit
    while True:
        newline = data.rfind(b"\n", floor, at)
        if newline < 0:
            break
        if _solid_before(data, newline) and _solid_after(data, newline + 1):
            return newline + 1
        at = newline
    at = limit
    while True:
        space = data.rfind(b" ", floor, at)
        if space < 0 or space + 1 >= len(data):
            return -1
        before, after = data[space - 1], data[space + 1] | 0x20  # lower-cased
        if 0x21 <= before <= 0x7E and 0x61 <= after <= 0x7A:
            return space
        at = space


def cut_tail(text: str, share: float) -> tuple[str, str]:
    """Split `text` at the line break nearest before its last `share` (a space where there is none in the second
    half before it, a character only in text with neither); both parts non-empty when possible."""
    cut = int(len(text) * (1.0 - share))
    newline = text.rfind("\n", 0, cut)
    if newline < cut // 2:  # none, or only far before the cut (a title line): a space nearer it will do
        newline = max(newline, text.rfind(" ", 0, cut))
    if newline <= 0:
        newline = max(cut, 1) - 1  # the last character before the cut ends the first part
    return text[: newline + 1], text[newline + 1 :]


@dataclass
class TextFile:
    """A .txt document: held whole when small, streamed in pieces when large. Only valid UTF-8 gets here."""

    path: Path
    size: int
    text: str | None  # the whole text (small files)

    @classmethod
    def open(cls, path: Path, report: UndecodableHook) -> TextFile | None:
        size = path.stat().st_size
        if size <= TXT_WHOLE_BYTES:
            raw = path.read_bytes()
            try:
                text = None if _unmarked_utf16_text(raw) else decode_text(raw)
            except UnicodeDecodeError:
                text = None
            if text is None:
                report(str(path))
                return None
            return cls(path, size, text)
        decoder = codecs.getincrementaldecoder("utf-8")()  # streamed in UTF-8 pieces: a UTF-16 file is reported
        try:  # validate first, so a bad byte late in the file cannot leave half a document behind
            with open(path, "rb") as handle:
                for index, block in enumerate(iter(lambda: handle.read(TXT_PIECE_BYTES), b"")):
                    if index == 0 and _unmarked_utf16_text(block):
                        raise UnicodeDecodeError("utf-8", block, 0, 1, "UTF-16 without its byte-order mark")
                    decoder.decode(block)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            report(str(path))
            return None
        return cls(path, size, None)

    @property
    def is_blank(self) -> bool:
        return self.text is not None and not self.text.strip()

    def segments(self, val_share: float | None) -> Iterator[tuple[str, int, bool]]:
        """Yield `(piece, segment, last_of_segment)`. With `val_share`, segment 1 is the tail cut for val."""
        if self.text is not None:
            if val_share is None:
                yield self.text, 0, True
            else:
                head, tail = cut_tail(self.text, val_share)
                yield head, 0, True
                yield tail, 1, True
            return
        cut = self._tail_cut(val_share) if val_share is not None else self.size
        for segment, (begin, end) in enumerate(((0, cut), (cut, self.size))[: 1 if val_share is None else 2]):
            for piece, last in self._pieces(begin, end):
                yield piece, segment, last

    def _pieces(self, begin: int, end: int) -> Iterator[tuple[str, bool]]:
        """Bytes begin..end (character boundaries) as decoded pieces cut only at `_safe_cut` points."""
        with open(self.path, "rb") as handle:
            handle.seek(begin)
            remaining, carry = end - begin, b""
            at_start = begin == 0
            while remaining > 0:
                block = handle.read(min(TXT_PIECE_BYTES, remaining))
                if not block:
                    break
                remaining -= len(block)
                if at_start and block.startswith(codecs.BOM_UTF8):  # a byte-order mark is no text
                    block = block[len(codecs.BOM_UTF8) :]
                at_start = False
                floor = len(carry) - 8  # what came before was looked at already (8: a character's bytes each side)
                carry += block
                if remaining > 0:
                    at = _safe_cut(carry, len(carry) - 1, floor)
                    if at > 0:
                        yield carry[:at].decode("utf-8"), False
                        carry = carry[at:]
            yield carry.decode("utf-8"), True

    def _tail_cut(self, share: float) -> int:
        """Byte offset just after the line break before the last `share` of the file, as `cut_tail` cuts a text
        in memory: where there is none in the second half before it (one long line after a title), a space near
        it, else the share itself at a character boundary."""
        target = int(self.size * (1.0 - share))
        with open(self.path, "rb") as handle:
            end = target
            while end > target // 2:
                begin = max(target // 2, end - TXT_PIECE_BYTES)
                handle.seek(begin)
                newline = handle.read(end - begin).rfind(b"\n")
                if newline >= 0:
                    return begin + newline + 1
                end = begin
            begin = max(0, target - TXT_PIECE_BYTES)  # no line break near: a space, else a character boundary
            handle.seek(begin)
            space = handle.read(target - begin).rfind(b" ")
            if space > 0:
                return begin + space + 1
            handle.seek(target)
            while target < self.size and 0x80 <= handle.read(1)[0] < 0xC0:
                target += 1
        return target


def source_fingerprint(src: Source) -> list[list[Any]]:
    """What identifies a source's content cheaply: each file's path, size and modification time."""
    out = []
    for f in src.files:
        stat = f.path.stat()
        out.append([str(f.path.resolve()), stat.st_size, stat.st_mtime_ns, f.documents])
    return out


def available_cpus() -> int:
    """Cores this process may use (its affinity mask, where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)
