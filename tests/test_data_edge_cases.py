"""Data pipeline edge cases: what `download`, `tokenize` and `data` do with folders, links, odd columns and records."""

import codecs
import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error
from tinygpt_cli import data, sources
from tinygpt_cli import download as dl
from tinygpt_cli.cli import app
from tinygpt_cli.errors import DataError
from tinygpt_cli.tokenizer import get_encoding

runner = CliRunner()


def _jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_tokenizing_a_folder_under_data_never_deletes_it(workspace):
    """`tinygpt tokenize data/books` published data/books over the source and deleted the user's files."""
    books = workspace / "data" / "books"
    books.mkdir(parents=True)
    (books / "a.txt").write_text("All the world's a stage.\nAnd all the men and women merely players.\n" * 50)
    (books / "notes.md").write_text("my notes")
    for extra in ([], ["--force"]):
        assert_one_line_error(runner.invoke(app, ["tokenize", str(books), *extra]), "is inside data/books")
    assert sorted(p.name for p in books.iterdir()) == ["a.txt", "notes.md"]
    assert not list((workspace / "data").glob(".books*"))


def test_a_folder_that_is_not_a_dataset_is_not_replaced(workspace, tmp_path):
    mine = workspace / "data" / "mine"
    mine.mkdir(parents=True)
    (mine / "keep.bin").write_bytes(b"precious")
    rows = _jsonl(tmp_path / "rows.jsonl", [f"document {i}" for i in range(10)])
    assert_one_line_error(runner.invoke(app, ["tokenize", str(rows), "--name", "mine", "--force"]),
                          "is not a tokenized dataset (no meta.json)")
    assert (mine / "keep.bin").read_bytes() == b"precious"
    assert runner.invoke(app, ["tokenize", str(rows), "--name", "rows"]).exit_code == 0
    assert runner.invoke(app, ["tokenize", str(rows), "--name", "rows", "--seed", "1"]).exit_code == 0  # a dataset


def test_an_empty_source_is_an_error_not_the_current_folder(workspace):
    assert_one_line_error(runner.invoke(app, ["tokenize", ""]), "SOURCE is empty")
    assert not (workspace / "data").exists() or not any((workspace / "data").iterdir())


def test_non_latin_text_files_are_streamed_in_pieces_with_identical_tokens(workspace, monkeypatch):
    """Lines of Cyrillic (or CJK) text had no cut point (neighbours had to be ASCII): the whole file was held in
    memory and every piece rescanned all of it, quadratic time."""
    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 300)
    text = "".join(f"Строка номер {i}: привет, мир.\n日本語のテキスト\u3000\n\u00a0отступ\n" for i in range(400))
    path = workspace / "ru.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = list(sources.TextFile(path, path.stat().st_size, None)._pieces(0, path.stat().st_size))
    assert len(pieces) > 50
    assert "".join(p for p, _ in pieces) == text
    enc = get_encoding()
    assert [i for p, _ in pieces for i in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


def test_safe_cut_only_looks_past_its_floor():
    data_ = b"x" * 100 + b"a\nb" + b"y" * 100
    assert sources._safe_cut(data_, len(data_) - 1) == 102
    assert sources._safe_cut(data_, len(data_) - 1, floor=150) == -1


@pytest.mark.parametrize("column", [
    pa.array(["first text", "second text", "third"], type=pa.dictionary(pa.int32(), pa.string())),
    pytest.param(pa.array(["first text", "second text", "third"], type=getattr(pa, "string_view", pa.string)()),
                 id="string_view"),
])
def test_categorical_and_view_text_columns_are_text(workspace, column):
    path = workspace / "cat.parquet"
    pq.write_table(pa.table({"text": column}), path)
    result = data.tokenize(str(path))
    assert result.meta["documents"]["selected"] == 3 and result.meta["splits"]["train"]["tokens"] > 0


def test_a_hub_dataset_named_like_a_registry_entry_gets_its_own_folder(workspace, tmp_path, monkeypatch):
    """`download someone/shakespeare` wrote data/raw/shakespeare/: `tokenize` then silently took the embedded
    corpus, and `download shakespeare` overwrote the record of the download."""
    import datasets

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": [f"my own document {i} " * 10 for i in range(20)]}), path)
    monkeypatch.setattr(dl, "check_hub", lambda entry: None)
    monkeypatch.setattr(dl, "_open_stream", lambda entry: datasets.load_dataset(
        "parquet", data_files=[str(path)], split="train", streaming=True))
    result = dl.download("someone/shakespeare")
    assert result.path.name != "shakespeare"
    spec, _ = sources.default_source_spec()
    assert sources.resolve_source(spec).kind == "download"
    # a folder written that way by an earlier version is not overwritten by the embedded corpus's record
    other = sources.raw_dir() / "shakespeare"
    result.path.rename(other)
    with pytest.raises(DataError, match="holds another download"):
        dl.download("shakespeare")
    assert json.loads((other / "download.json").read_text())["kind"] == "hub"


@pytest.mark.parametrize("record", [
    {"format": "tinygpt-download", "name": "tinystories", "complete": True},
    {"format": "tinygpt-download", "name": "tinystories", "complete": False, "progress": 5},
    {"format": "tinygpt-download", "name": "tinystories", "complete": True, "files": "x",
     "progress": {"documents": 1, "rows": 1, "text_bytes": 1, "shards_done": 1, "shard_rows": 0}},
])
def test_a_damaged_download_record_is_no_traceback(workspace, record):
    folder = workspace / "data" / "raw" / "tinystories"
    folder.mkdir(parents=True)
    (folder / "download.json").write_text(json.dumps(record))
    listed = runner.invoke(app, ["download", "--list"])
    assert listed.exit_code == 0 and "Traceback" not in listed.output, listed.output
    assert_one_line_error(runner.invoke(app, ["tokenize", "tinystories"]), "tinystories is not downloaded")
    assert_one_line_error(runner.invoke(app, ["download", "tinystories"]), "")


def test_an_unreadable_meta_json_leaves_one_dataset_out_not_the_listing(workspace, tmp_path, monkeypatch):
    for name in ("good", "locked"):
        assert runner.invoke(app, ["tokenize", str(_jsonl(tmp_path / f"{name}.jsonl", ["a b", "c d", "e f"])),
                                   "--name", name]).exit_code == 0
    read_text = pathlib.Path.read_text

    def unreadable(self, *args, **kwargs):
        if self.name == "meta.json" and self.parent.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "read_text", unreadable)
    listed = runner.invoke(app, ["data", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [d["name"] for d in json.loads(listed.stdout)] == ["good"]
    assert "locked is left out" in listed.stderr and "cannot be read" in listed.stderr


def test_a_renamed_dataset_is_listed_and_shown_by_its_folder_name(workspace, tmp_path):
    assert runner.invoke(app, ["tokenize", str(_jsonl(tmp_path / "r.jsonl", ["a b", "c d", "e f"])),
                               "--name", "old"]).exit_code == 0
    (workspace / "data" / "old").rename(workspace / "data" / "new")
    shown = runner.invoke(app, ["data", "show", "new"])
    assert shown.exit_code == 0 and shown.stdout.startswith("new  ("), shown.output
    assert data.find_dataset("new").name == "new"


def test_a_val_fraction_that_takes_every_document_is_refused_up_front(workspace, tmp_path):
    rows = _jsonl(tmp_path / "rows.jsonl", [f"document {i}" for i in range(10)])
    assert_one_line_error(runner.invoke(app, ["tokenize", str(rows), "--val-fraction", "0.99"]),
                          "lower --val-fraction")


def test_a_folder_source_follows_symlinked_subfolders_like_a_glob(workspace, tmp_path):
    """`Path.rglob` skipped symlinked folders silently (a `**` glob follows them): shards linked in from
    another disk were left out of the dataset."""
    corpus, elsewhere = tmp_path / "corpus", tmp_path / "elsewhere"
    corpus.mkdir()
    elsewhere.mkdir()
    _jsonl(corpus / "a.jsonl", [f"here {i}" for i in range(5)])
    _jsonl(elsewhere / "b.jsonl", [f"there {i}" for i in range(7)])
    (corpus / "linked").symlink_to(elsewhere, target_is_directory=True)
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)  # visited once, not forever
    assert sources.local_source(str(corpus)).documents == 12
    assert sources.local_source(str(corpus / "**" / "*.jsonl")).documents == 12


def test_a_recursive_glob_over_two_link_loops_ends(workspace, tmp_path):
    """QA: `tokenize '**/*.jsonl'` in a tree with two links back up it (`a/up -> ..`, `self -> .`) ran at full CPU
    for 10 minutes and more, printing nothing: Python's glob follows every link. It is walked as a folder is now,
    each real folder once, and matched as glob matches (`*` within a name, `[0-9]` a range, hidden ones left out)."""
    import subprocess
    import sys

    tree = tmp_path / "tree"
    (tree / "a" / "b").mkdir(parents=True)
    (tree / ".hidden").mkdir()
    for name in ("a/x.jsonl", "a/b/y.jsonl", "z.jsonl", ".hidden/h.jsonl", "a/b/n5.txt", "a/b/nA.txt"):
        _jsonl(tree / name, [f"text of {name}"])
    (tree / "a" / "up").symlink_to("..", target_is_directory=True)
    (tree / "self").symlink_to(".", target_is_directory=True)
    script = ("import sys; from tinygpt_cli import sources; "
              "print(sorted(d.path.relative_to(sys.argv[1]).as_posix() for d in "
              "sources.local_source(sys.argv[1] + '/' + sys.argv[2]).files))")
    for pattern, expected in (("**/*.jsonl", ["a/b/y.jsonl", "a/x.jsonl", "z.jsonl"]),
                              ("a/**/n[0-9].txt", ["a/b/n5.txt"]), ("**/n[!0-9].txt", ["a/b/nA.txt"]),
                              ("a/*/y.jsonl", ["a/b/y.jsonl"])):
        listed = subprocess.run([sys.executable, "-c", script, str(tree), pattern], capture_output=True, text=True,
                                timeout=120)
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.strip() == repr(expected), pattern
    # review: a folder reached by a link matched only under the name the walk met first; a set backwards ([z-a]) was
    # a traceback; a wildcard before the ** walked everything from the current folder
    (tmp_path / "shards" / "v2").mkdir(parents=True)
    _jsonl(tmp_path / "shards" / "v2" / "s.jsonl", ["a shard"])
    (tree / "train").symlink_to(tmp_path / "shards" / "v2", target_is_directory=True)
    (tree / "v2").symlink_to(tmp_path / "shards" / "v2", target_is_directory=True)
    for pattern in ("**/v2/*.jsonl", "**/train/*.jsonl"):
        assert [f.path.name for f in sources.local_source(str(tree / pattern)).files] == ["s.jsonl"], pattern
    with pytest.raises(DataError, match="no file matches"):
        sources.local_source(str(tree / "**" / "[z-a].jsonl"))
    assert sorted(f.path.name for f in sources.local_source(str(tmp_path / "tr*" / "**" / "*.jsonl")).files) == [
        "s.jsonl", "x.jsonl", "y.jsonl", "z.jsonl"]


def test_a_folder_a_glob_matches_is_named_not_silently_dropped(workspace, tmp_path):
    """`tokenize 'corpus/*'` dropped a matched subfolder without a word (audit). A glob reads the files it matches
    (reading the folders too would change what an existing command reads: a project's venv/ of LICENSE.txt
    files); the folders are named, as files of other types are."""
    corpus = tmp_path / "corpus"
    (corpus / "more").mkdir(parents=True)
    _jsonl(corpus / "a.jsonl", [f"here {i}" for i in range(5)])
    _jsonl(corpus / "more" / "b.jsonl", [f"there {i}" for i in range(7)])
    (corpus / "notes.md").write_text("mine")
    matched = sources.local_source(str(corpus / "*"))
    assert matched.documents == 5
    assert matched.left_out == (str(corpus / "notes.md"),) and matched.left_out_folders == (str(corpus / "more"),)
    result = runner.invoke(app, ["tokenize", str(corpus / "*")])
    assert result.exit_code == 0, result.output
    assert f"Left out 1 folder the pattern matched ({corpus / 'more'})" in result.stderr
    assert "pass the folder itself" in result.stderr
    assert sources.local_source(str(corpus / "**" / "*.jsonl")).documents == 12
    assert sources.local_source(str(corpus)).documents == 12


def test_a_path_with_glob_characters_that_exists_is_taken_as_it_is(workspace, tmp_path):
    """`tokenize 'Books [2023]/c.jsonl'` was taken for a pattern ([2023]: one of four characters) that matched
    nothing: the command `train --resume` prints to make a dataset again failed for such a folder (review)."""
    books = tmp_path / "Books [2023]"
    books.mkdir()
    _jsonl(books / "c.jsonl", [f"line {i}" for i in range(4)])
    assert sources.local_source(str(books / "c.jsonl")).documents == 4
    assert sources.local_source(str(books)).documents == 4
    assert sources.local_source(str(tmp_path / "Books [[]2023]" / "*.jsonl")).documents == 4  # a pattern still


def test_a_link_with_a_usable_name_to_a_file_left_out_is_read(workspace, tmp_path):
    """A .json.gz shard linked as .jsonl.gz (the advice for JSON lines in .json files) was read before the dedup of
    files reached twice counted the link as the left-out original (review): a file is read once, and named as left
    out only where no usable name reads it."""
    corpus = tmp_path / "c4"
    corpus.mkdir()
    for i in range(2):
        _jsonl(corpus / f"c4-{i}.json", [f"page {i} {j}" for j in range(3)])
        (corpus / f"c4-{i}.jsonl").symlink_to(corpus / f"c4-{i}.json")
    (corpus / "README.md").write_text("card")
    for spec in (corpus, corpus / "*"):
        source = sources.local_source(str(spec))
        assert source.documents == 6 and source.left_out == (str(corpus / "README.md"),)


def test_a_folder_source_leaves_out_hidden_files_and_folders_as_a_glob_does(workspace, tmp_path):
    """.git/ was read, and the copies Jupyter keeps in .ipynb_checkpoints/ put documents in twice (audit)."""
    corpus = tmp_path / "notes"
    for where in ("", ".git", ".ipynb_checkpoints", "sub"):
        (corpus / where).mkdir(parents=True, exist_ok=True)
    _jsonl(corpus / "a.jsonl", [f"note {i}" for i in range(5)])
    _jsonl(corpus / "sub" / "b.jsonl", [f"more {i}" for i in range(3)])
    _jsonl(corpus / ".ipynb_checkpoints" / "a-checkpoint.jsonl", [f"note {i}" for i in range(5)])
    (corpus / ".git" / "description.txt").write_text("Unnamed repository\n")
    _jsonl(corpus / ".draft.jsonl", ["unfinished"])
    assert sources.local_source(str(corpus)).documents == 8
    assert sources.local_source(str(corpus / "**" / "*")).documents == 8  # the same as the glob


def test_files_of_other_types_in_a_folder_are_named_not_silently_left_out(workspace, tmp_path):
    """A folder of .json.gz shards plus a README.txt was tokenized as the README alone, without a word."""
    corpus = tmp_path / "c4"
    (corpus / "en").mkdir(parents=True)
    _jsonl(corpus / "en" / "c4-train.00000.json", [f"page {i}" for i in range(50)])
    (corpus / "README.txt").write_text("The C4 corpus, see its card.\nThree lines.\nOf text.\n")
    result = runner.invoke(app, ["tokenize", str(corpus)])
    assert result.exit_code == 0, result.output
    assert "Left out 1 file(s)" in result.stderr and "c4-train.00000.json" in result.stderr


def test_an_interrupt_that_kept_nothing_leaves_nothing(workspace, tmp_path, monkeypatch):
    """'nothing was kept', yet data/.NAME.partial/ stayed with its .bin files (on a full disk, the space needed)."""
    rows = _jsonl(tmp_path / "rows.jsonl", [f"document {i}" for i in range(50)])

    def interrupting_write(self, encoded):
        raise KeyboardInterrupt

    monkeypatch.setattr(data._Partial, "write", interrupting_write)
    result = runner.invoke(app, ["tokenize", str(rows)])
    assert result.exit_code == 130 and "nothing was kept" in result.stderr
    assert not (workspace / "data" / ".rows.partial").exists()


def test_a_download_of_a_column_that_is_not_text_is_refused_not_kept_empty(workspace, tmp_path, monkeypatch):
    """A list column was stored as empty documents; only tokenize said, much later, 'holds no text'."""
    path = tmp_path / "chat.parquet"
    pq.write_table(pa.table({"text": [[f"turn {i}", "reply"] for i in range(30)]}), path)
    monkeypatch.setitem(sources.REGISTRY, "chat", sources.NamedSource(
        "chat", "a chat corpus", builder="parquet", data_files=(str(path),), documents=30))
    with pytest.raises(DataError, match="holds list values, not text: pass --text-field"):
        dl.download("chat")


def test_an_interrupt_while_planning_does_not_promise_to_continue(workspace, tmp_path, monkeypatch):
    """Ctrl-C while a large corpus was being counted said 'run the same command again to continue where it
    stopped': nothing had started."""
    rows = _jsonl(tmp_path / "rows.jsonl", [f"document {i}" for i in range(10)])

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_sample_bytes_per_token", interrupted)
    result = runner.invoke(app, ["tokenize", str(rows)])
    assert result.exit_code == 130
    assert "continue where it stopped" not in result.stderr and "nothing was kept" in result.stderr


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_text_marked_as_utf16_or_utf32_is_read(workspace, encoding):
    """Windows PowerShell's `>` writes UTF-16 with a byte-order mark: such a file was skipped as 'not UTF-8' with
    advice to convert from latin1. A marked UTF-16/32 file now reads as the same text in UTF-8 does."""
    text = "".join(f"Ligne {i}: café, crème brûlée — ünïcödé.\n" for i in range(300))
    bom = {"utf-16": b"", "utf-16-be": codecs.BOM_UTF16_BE, "utf-32": b""}[encoding]
    (workspace / "wide.txt").write_bytes(bom + text.encode(encoding))
    (workspace / "plain.txt").write_bytes(text.encode("utf-8"))
    plans = []

    def planned(event):
        if event.kind == "plan":
            plans.append(event)

    wide = data.tokenize(str(workspace / "wide.txt"), name="wide", on_event=planned)
    plain = data.tokenize(str(workspace / "plain.txt"), name="plain", on_event=planned)
    assert wide.skipped_undecodable == []
    for split in ("train", "val"):
        assert (wide.path / f"{split}.bin").read_bytes() == (plain.path / f"{split}.bin").read_bytes()
    # the plan counts the text as UTF-8, as it is encoded: the token estimate (which sizes the disk check) and the
    # progress total were the UTF-16/32 bytes, up to 4x the text
    (wide_plan, plain_plan) = plans
    assert abs(wide_plan.total_text_bytes - plain_plan.total_text_bytes) <= 0.01 * plain_plan.total_text_bytes
    assert abs(wide_plan.estimated_tokens - plain_plan.estimated_tokens) <= 0.01 * plain_plan.estimated_tokens


def test_a_large_utf16_file_is_named_with_the_right_conversion(workspace, monkeypatch):
    """Too large to read whole, a UTF-16 file is skipped; the advice converts from UTF-16, not from latin1."""
    monkeypatch.setattr(sources, "TXT_WHOLE_BYTES", 64)
    path = workspace / "wide.txt"
    path.write_bytes("Line of the book.\n".join("" for _ in range(80)).encode("utf-16"))
    with pytest.raises(DataError, match=r"wide\.txt is not UTF-8 text .*iconv -f utf-16 -t utf-8"):
        data.tokenize(str(path), name="wide")


@pytest.mark.parametrize("whole_bytes", [None, 64])
def test_utf16_without_its_mark_is_named_not_tokenized_as_text(workspace, monkeypatch, whole_bytes):
    """QA: a UTF-16LE .txt without a byte-order mark is valid UTF-8 (each ASCII letter then a NUL), so it went in as
    'h\\x00e\\x00l\\x00…', once as the whole val split. A NUL is no text: the file is skipped and named, with the
    iconv line for its byte order; read whole or streamed."""
    if whole_bytes:
        monkeypatch.setattr(sources, "TXT_WHOLE_BYTES", whole_bytes)
    for name, codec, source in (("le.txt", "utf-16-le", "utf-16le"), ("be.txt", "utf-16-be", "utf-16be")):
        path = workspace / name
        path.write_bytes(" ".join(f"Line {i} of the book." for i in range(40)).encode(codec))
        with pytest.raises(DataError, match=rf"{name.replace('.', r'[.]')} is not UTF-8 text .*iconv -f {source} -t"):
            data.tokenize(str(path), name=name.split(".")[0])
    # review: a few NULs in UTF-8 text (padding a crash left) are no UTF-16: the text is kept, as before
    padded = workspace / "padded.txt"
    padded.write_bytes(" ".join(f"Line {i} of the log." for i in range(40)).encode() + b"\0" * 64)
    assert data.tokenize(str(padded), name="padded").skipped_undecodable == []


def test_a_linked_dataset_folder_is_tokenized_where_it_points(workspace, tmp_path):
    """`data/big -> /mnt/disk/big` (a dataset kept on a larger disk): tokenizing it again wrote the new dataset
    beside the link, on the workspace's disk, and put a real folder in the link's place."""
    elsewhere = tmp_path / "disk"
    elsewhere.mkdir()
    (workspace / "a.txt").write_text(_docs_text(40))
    data.tokenize(str(workspace / "a.txt"), name="big")
    (workspace / "data" / "big").rename(elsewhere / "big")
    (workspace / "data" / "big").symlink_to(elsewhere / "big", target_is_directory=True)
    (workspace / "a.txt").write_text(_docs_text(60))
    result = data.tokenize(str(workspace / "a.txt"), name="big", force=True)
    link = workspace / "data" / "big"
    assert link.is_symlink() and link.resolve() == (elsewhere / "big").resolve()
    assert result.meta["text_bytes"] == len(_docs_text(60).encode())
    assert data.find_dataset("big").meta["text_bytes"] == result.meta["text_bytes"]
    assert sorted(p.name for p in elsewhere.iterdir()) == ["big"]  # no partial or old folder left there
    assert sorted(p.name for p in (workspace / "data").iterdir() if not p.name.startswith(".")) == ["big"]


def test_a_dangling_dataset_link_is_named(workspace, tmp_path):
    """A link to an unmounted disk: nothing is created at the missing mount point."""
    (workspace / "a.txt").write_text(_docs_text(40))
    (workspace / "data").mkdir()
    (workspace / "data" / "big").symlink_to(tmp_path / "unmounted" / "big", target_is_directory=True)
    with pytest.raises(DataError, match=r"data/big links to .*unmounted/big, whose folder does not exist"):
        data.tokenize(str(workspace / "a.txt"), name="big")
    assert not (tmp_path / "unmounted").exists()
    (tmp_path / "unmounted").mkdir()  # mounted, and the dataset not there yet: it is made where the link points
    data.tokenize(str(workspace / "a.txt"), name="big")
    assert (workspace / "data" / "big").is_symlink() and (tmp_path / "unmounted" / "big" / "meta.json").is_file()


def _docs_text(lines: int) -> str:
    return "".join(f"Line {i} of a book that is long enough to cut.\n" for i in range(lines))


def test_a_link_to_another_dataset_of_the_workspace_is_not_replaced_under_its_name(workspace):
    """`data/latest -> books`: `tokenize --name latest --force` wrote the new data into data/books (its meta
    naming it `latest`), under the lock of `latest` alone, sharing `.books.partial` with a tokenize of books."""
    (workspace / "a.txt").write_text("".join(f"Line {i} of a book that is long enough.\n" for i in range(300)))
    (workspace / "b.txt").write_text("".join(f"Other {i} text, a different book here.\n" for i in range(300)))
    data.tokenize(str(workspace / "a.txt"), name="books")
    before = (workspace / "data" / "books" / "train.bin").read_bytes()
    (workspace / "data" / "latest").symlink_to("books", target_is_directory=True)
    with pytest.raises(DataError, match="data/latest links to data/books, another dataset of this workspace"):
        data.tokenize(str(workspace / "b.txt"), name="latest", force=True)
    assert (workspace / "data" / "books" / "train.bin").read_bytes() == before


def test_a_link_that_loops_is_one_error(workspace):
    (workspace / "a.txt").write_text("".join(f"Line {i} of a book that is long enough.\n" for i in range(300)))
    (workspace / "data").mkdir()
    (workspace / "data" / "x").symlink_to("y")
    (workspace / "data" / "y").symlink_to("x")
    with pytest.raises(DataError, match="data/x is a link that loops"):
        data.tokenize(str(workspace / "a.txt"), name="x")


@pytest.mark.parametrize("token", [50257, 50300, 65535])  # past the vocabulary, in the model's padding, the top
def test_a_split_with_a_token_past_the_vocabulary_is_refused(with_shakespeare, workspace, token):
    """Token files made by hand with ids GPT-2 does not have gave an index error deep in the model (on CUDA a
    device-side assert), or were trained on as the model's padding rows (audit)."""
    from conftest import hand_made_dataset

    hand_made_dataset(with_shakespeare, workspace / "data" / "mine", "val", 7, token)
    dataset = data.find_dataset("mine")
    assert len(dataset.split("train")) > 0  # the other split is fine
    expected = rf"token id {token} at token 7, past the end of GPT-2.s vocabulary \(ids 0 to 50,256\).*tokenize`"
    with pytest.raises(DataError, match=expected):
        dataset.split("val")


def test_unreadable_inputs_are_called_unreadable(workspace, tmp_path, monkeypatch):
    """A folder that could not be read was passed over in silence (a tokenize of it said it held no text file),
    and an unreadable .jsonl was blamed on a truncated .gz (bad-input audit)."""
    import os

    from tinygpt_cli import sources

    books = tmp_path / "books"
    (books / "locked").mkdir(parents=True)
    (books / "a.txt").write_text("some text\n" * 50)
    (books / "locked" / "b.txt").write_text("more text\n" * 50)
    real_scandir = os.scandir

    def scandir(path="."):  # as chmod 000 would, for any user root included
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    source = sources.local_source(str(books))  # the rest is read, and the locked folder named
    assert [f.path.name for f in source.files] == ["a.txt"]
    assert source.unreadable_folders == (f"{books / 'locked'} (Permission denied)",)
    events = []
    data.tokenize(str(books), name="books", on_event=events.append)
    assert any("left out 1 folder it cannot read" in e.message and "locked (Permission denied)" in e.message
               for e in events if e.kind == "info")
    only = tmp_path / "only"
    (only / "locked").mkdir(parents=True)
    (only / "locked" / "c.txt").write_text("text\n")
    with pytest.raises(DataError, match=r"holds no .* file it can read \(it cannot read .*locked \(Permission"):
        sources.local_source(str(only))  # all of it locked
    monkeypatch.setattr(os, "scandir", lambda path=".": scandir(path) if not str(path).endswith("books")
                        else (_ for _ in ()).throw(PermissionError(13, "Permission denied", str(path))))
    with pytest.raises(DataError, match=r"cannot read the folder .*books \(Permission denied\): check its perm"):
        sources.local_source(str(books))  # the folder given itself
    monkeypatch.setattr(os, "scandir", real_scandir)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "hello"}\n')

    def refused(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sources, "_open_binary", refused)
    with pytest.raises(DataError, match=r"rows.jsonl could not be read \(Permission denied\): check its permissions"):
        sources.local_source(str(rows))


def test_an_atomic_json_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    """meta.json's and download.json's writer used a fixed `.tmp` name and left it behind when the disk filled
    (code review); it now shares the checkpoints' writer, as download's parquet parts do."""
    import errno
    import json
    import os

    from tinygpt_cli import data, download

    folder = tmp_path / "w"
    folder.mkdir()
    path = folder / "meta.json"
    data.write_json_atomic(path, {"v": 1})

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        data.write_json_atomic(path, {"v": 2})
    with pytest.raises(OSError):
        download._write_part(folder / "part-00000.parquet", ["some text"])
    assert json.loads(path.read_text()) == {"v": 1}
    assert sorted(p.name for p in folder.iterdir()) == ["meta.json"]


def test_a_source_that_fails_to_read_part_way_keeps_the_progress_made(workspace, monkeypatch):
    """Audit: an I/O error reading the source (an NFS or USB hiccup) deleted every checkpoint, as bad input does,
    though the same command could go on: it now keeps them, says so, and the rerun continues to the same data."""
    import errno
    import json

    from typer.testing import CliRunner

    from tinygpt_cli import data, sources
    from tinygpt_cli.cli import app

    path = workspace / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "word " * 40}) + "\n" for i in range(400)))
    monkeypatch.setattr(data, "CHECKPOINT_SECONDS", 0.0)
    monkeypatch.setattr(data, "TASK_TEXT_BYTES", 2_000)
    original, calls = sources._jsonl_documents, []

    def failing(*args, **kwargs):
        calls.append(1)  # the first read is tokenize's sample of the text (its tokens per byte)
        for count, item in enumerate(original(*args, **kwargs)):
            if count == 300 and len(calls) > 1:
                raise OSError(errno.EIO, "Input/output error")
            yield item

    monkeypatch.setattr(sources, "_jsonl_documents", failing)
    result = CliRunner().invoke(app, ["tokenize", str(path), "--name", "rows"])
    assert_one_line_error(result, "cannot read")
    assert "(Input/output error): check the file and rerun the same command, it continues where it stopped" in \
        result.stderr
    assert (workspace / "data" / ".rows.partial" / "progress.json").is_file()
    monkeypatch.setattr(sources, "_jsonl_documents", original)
    again = data.tokenize(str(path), name="rows")
    assert again.resumed_documents > 0
    whole = data.tokenize(str(path), name="whole")
    for split in ("train", "val"):
        assert (again.path / f"{split}.bin").read_bytes() == (whole.path / f"{split}.bin").read_bytes()


def test_a_long_document_cut_for_val_keeps_the_val_fraction_asked(workspace, monkeypatch):
    """Audit: one file (or a few) put at least a tenth of its text in val whatever --val-fraction said: a 5 GB
    input.txt lost 500 MB of training text. The floor is now a tenth or CUT_MIN_VAL_BYTES, whichever is less:
    enough to measure a loss on, and a short book still keeps its tenth."""
    monkeypatch.setattr(data, "CUT_MIN_VAL_BYTES", 20_000)
    line = "the quick brown fox jumps over the lazy dog, and then it sleeps.\n"
    long = workspace / "long.txt"
    long.write_text(line * 8_000)  # 520 kB: 20 kB of it is 3.8%
    short = workspace / "short.txt"
    short.write_text(line * 300)  # 20 kB: a tenth
    for path, val_fraction, share in ((long, 0.005, 0.038), (long, 0.2, 0.2), (short, 0.005, 0.1)):
        result = data.tokenize(str(path), name=f"{path.stem}-{val_fraction}", val_fraction=val_fraction)
        splits = result.meta["splits"]
        got = splits["val"]["tokens"] / (splits["train"]["tokens"] + splits["val"]["tokens"])
        assert got == pytest.approx(share, rel=0.1), (path.name, val_fraction)


def test_a_val_split_too_small_to_measure_is_said_at_tokenize_and_train_names_the_fix(workspace):
    """Audit: 200 short documents made a val split of one document (11 tokens here) without a word; `train` then
    refused it advising a smaller context or more text, when --val-fraction is what fixes it."""
    from tinygpt_cli.config import resolve_config
    from tinygpt_cli.training import train

    path = workspace / "short.jsonl"
    path.write_text("".join(json.dumps({"text": f"Note {i}: the fox ran home at dusk."}) + "\n" for i in range(200)))
    events = []
    result = data.tokenize(str(path), name="short", on_event=events.append)
    val = result.meta["splits"]["val"]["tokens"]
    notes = [event.message for event in events if event.kind == "info"]
    assert [note for note in notes if note.startswith(f"val holds only {val:,} of ")] == [
        f"val holds only {val:,} of {val + result.meta['splits']['train']['tokens']:,} tokens (1 document): too few "
        "for a steady val loss, fewer than a context of 1,024 (GPT-2's) needs; raise --val-fraction (e.g. "
        "--val-fraction 0.25) or give more text"]
    with pytest.raises(DataError, match=r"the val split of short has \d+ tokens, fewer than the 130 a context "
                                            r"of 128 needs: re-tokenize with a larger --val-fraction"):
        train(resolve_config(size="micro", overrides=["data.dataset=short", "train.max_steps=1"]))
    shakespeare = []
    data.tokenize(None, on_event=shakespeare.append)  # the embedded corpus: 42,757 val tokens, nothing to say
    assert not any("val holds only" in event.message for event in shakespeare if event.kind == "info")


def test_a_folder_of_only_unreadable_kinds_says_what_it_found_and_how_to_read_it(workspace):
    """Audit: a folder of C4's .json.gz and The Pile's .jsonl.zst files was refused as holding 'no .txt, .jsonl,
    .jsonl.gz or .parquet file', without the rename hint tokenize gives where one usable file is beside them."""
    folder = workspace / "corpus"
    folder.mkdir()
    (folder / "c4-train.00000-of-01024.json.gz").write_bytes(b"\x1f\x8b")
    (folder / "pile-00.jsonl.zst").write_bytes(b"(\xb5/\xfd")
    result = runner.invoke(app, ["tokenize", str(folder)])
    assert_one_line_error(result, "holds no .txt, .jsonl, .jsonl.gz or .parquet file (it holds 2 other file(s), "
                                  "first: ")
    assert "rename JSON lines files .json(.gz) to .jsonl(.gz); unpack the .zst files (e.g. `zstd -d`, `xz -d`) or " \
           "pack them as .jsonl.gz" in result.stderr
    # QA: one such file was said to hold "no .txt ... file (it holds 1 other file(s), first: bad.csv)", as a folder
    assert_one_line_error(runner.invoke(app, ["tokenize", str(folder / "pile-00.jsonl.zst")]),
                          "pile-00.jsonl.zst is not a .txt, .jsonl, .jsonl.gz or .parquet file: unpack the .zst")
    (folder / "table.csv").write_text("a,b\n")
    assert_one_line_error(runner.invoke(app, ["tokenize", str(folder / "table.csv")]),
                          "table.csv is not a .txt, .jsonl, .jsonl.gz or .parquet file: save the text as one of "
                          "those and give that")


def test_a_dataset_snapshot_folder_is_tokenized_from_its_train_files(workspace):
    """Audit: a Hugging Face snapshot folder (data/train-*.parquet beside validation-* and test-*), as `download`'s
    offline advice has users fetch, was read whole: its test split went into training, silently."""
    folder = workspace / "snapshot"
    (folder / "data").mkdir(parents=True)
    for split, rows in (("train", 30), ("validation", 5), ("test", 5)):
        pq.write_table(pa.table({"text": [f"{split} document {i}: some words here." for i in range(rows)]}),
                       folder / "data" / f"{split}-00000-of-00001.parquet")
    (folder / "README.md").write_text("# card\n")
    events = []
    result = data.tokenize(str(folder), name="snap", on_event=events.append)
    assert result.meta["documents"]["in_source"] == 30
    notes = [e.message for e in events if e.kind == "info" and "other splits" in e.message]
    assert len(notes) == 1 and notes[0].startswith("left out 2 file(s) of the corpus's other splits (first: ")
    assert sources.local_source(str(folder / "data" / "test-00000-of-00001.parquet")).documents == 5  # named: read
    plain = workspace / "plain"  # no train files: a folder is read whole, whatever its files are called
    plain.mkdir()
    for name in ("test-notes.txt", "dev-log.txt"):
        (plain / name).write_text("Some text.\n")
    assert sources.local_source(str(plain)).documents == 2


def test_tokenizing_the_same_unchanged_source_again_does_nothing(workspace):
    """Audit: `tokenize && train` in a script re-tokenized the whole corpus every time. The same source files,
    unchanged, with the same settings, find the dataset up to date; a changed file, other settings or --restart
    tokenize again."""
    import os

    path = workspace / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "word " * 30}) + "\n" for i in range(50)))
    first = data.tokenize(str(path), name="rows")
    assert not first.unchanged
    events = []
    again = runner.invoke(app, ["tokenize", str(path), "--name", "rows"])
    assert again.exit_code == 0, again.output
    assert "Up to date: " in again.stdout and "Nothing to do: data/rows is already " in again.stderr
    assert "(--restart tokenizes it again)" in again.stderr
    assert data.tokenize(str(path), name="rows", on_event=events.append).unchanged
    assert not any(event.kind == "plan" for event in events)  # no work planned, none done
    other = workspace / "other.jsonl"  # review: the up-to-date one is "the last tokenized" again, for train
    other.write_text(path.read_text())
    data.tokenize(str(other), name="other")
    assert data.find_dataset(None).name == "other"
    assert data.tokenize(str(path), name="rows").unchanged and data.find_dataset(None).name == "rows"
    assert not data.tokenize(str(path), name="rows", seed=1).unchanged  # other settings
    assert not data.tokenize(str(path), name="rows", seed=1, restart=True).unchanged
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the file changed since
    assert not data.tokenize(str(path), name="rows", seed=1).unchanged
    (workspace / "data" / "rows" / "val.bin").write_bytes(b"\0\0")  # a damaged dataset is made again
    assert not data.tokenize(str(path), name="rows", seed=1).unchanged


def test_an_up_to_date_dataset_on_a_read_only_disk_is_used(workspace, monkeypatch):
    """Resource QA: `tokenize && train` on a read-only shared data/ failed at once with "cannot write to data",
    though the dataset was up to date: its lock could not be made. (Root writes anywhere, so the read-only disk
    is faked: data/ not writable, and no lock can be made in it.)"""
    import os

    from tinygpt_cli import workspace as ws
    from tinygpt_cli.errors import DataError

    path = workspace / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "word " * 30}) + "\n" for i in range(50)))
    data.tokenize(str(path), name="rows")
    meta = (workspace / "data" / "rows" / "meta.json").read_bytes()
    real_access, folder = os.access, workspace / "data"
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if pathlib.Path(p) == folder and mode & os.W_OK
                        else real_access(p, mode, **kw))

    def no_lock(*args, **kwargs):
        raise DataError(f"cannot write to {folder} (Read-only file system): choose a writable TINYGPT_HOME")

    monkeypatch.setattr(ws, "exclusive", no_lock)
    monkeypatch.setattr(data, "write_json_atomic", lambda *a: (_ for _ in ()).throw(OSError(30, "Read-only")))
    again = runner.invoke(app, ["tokenize", str(path), "--name", "rows"])
    assert again.exit_code == 0, again.output
    assert "Nothing to do: data/rows is already " in again.stderr
    assert (workspace / "data" / "rows" / "meta.json").read_bytes() == meta
    assert_one_line_error(runner.invoke(app, ["tokenize", str(path), "--name", "rows", "--seed", "2"]),
                          "cannot write to")  # work to do: the same clear refusal as before


def test_a_file_where_the_dataset_or_its_partial_folder_goes(workspace):
    """Audit: a file named data/NAME failed with 'Not a directory (data/NAME/progress.json)' instead of saying
    what is in the way; a file named data/.NAME.partial failed every rerun ('fix that and rerun'), as nothing
    removed it."""
    text = workspace / "a.txt"
    text.write_text("Hello world.\n" * 20)
    (workspace / "data").mkdir()
    (workspace / "data" / "g").write_text("mine")
    assert_one_line_error(runner.invoke(app, ["tokenize", str(text), "--name", "g"]),
                          "data/g exists and is not a folder: move it away or pick another --name")
    assert (workspace / "data" / "g").read_text() == "mine"
    (workspace / "data" / ".h.partial").write_text("")
    assert data.tokenize(str(text), name="h").meta["splits"]["train"]["tokens"] > 0


def test_the_thin_val_note_of_a_cut_document_suggests_a_fraction_that_changes_it(workspace):
    """Review: a 40 kB file's val is the tenth cut from its end whatever a smaller --val-fraction says, yet the note
    suggested 0.07, which changed nothing, and called the tail '1 document'."""
    path = workspace / "small.txt"
    path.write_text("".join(f"line {i} of a small book, with some words.\n" for i in range(900)))
    events = []
    data.tokenize(str(path), name="small", on_event=events.append)
    note = next(e.message for e in events if e.kind == "info" and e.message.startswith("val holds only"))
    assert "(the end of each document)" in note
    suggested = float(note.split("e.g. --val-fraction ")[1].split(")")[0])
    assert suggested > 0.1  # above the tenth the cut already takes
    raised = data.tokenize(str(path), name="raised", val_fraction=suggested).meta["splits"]["val"]["tokens"]
    first = data.find_dataset("small").meta["splits"]["val"]["tokens"]
    assert raised > 1.5 * first


def test_a_tokenize_whose_log_reader_goes_away_still_writes_its_dataset(workspace):
    """Review: a reader of tokenize's output that went away (`tokenize ... 2>&1 | true`) was taken for a failed
    write of the dataset: 'cannot write .NAME.partial', exit 1, and a finished dataset abandoned."""
    import os
    import signal
    import subprocess
    import sys

    text = workspace / "book.txt"
    text.write_text("A line of a long book.\n" * 20_000)
    process = subprocess.Popen([sys.executable, "-m", "tinygpt_cli", "tokenize", str(text), "--name", "book"],
                               env={**os.environ, "TINYGPT_HOME": str(workspace)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGPIPE,
                                                                                         signal.SIG_IGN))
    process.stdout.close()  # gone before the first line
    assert process.wait(timeout=300) == 0  # the work is done; what it would have said is dropped
    assert (workspace / "data" / "book" / "meta.json").is_file()


def test_the_split_a_snapshot_file_names(tmp_path):
    """Review: the file name's first word beat the folder (train/test-results.txt was test), ordinary names were
    caught (Dev-notes.txt), and common ones were missed (TinyStories-valid.txt, c4-validation.*)."""
    cases = {"train/test-results.txt": "train", "Dev-notes.txt": None, "TinyStories-valid.txt": "valid",
             "TinyStories-train.txt": "train", "c4-validation.00000-of-00008.json.gz": "validation",
             "data/train-00000-of-00004.parquet": "train", "test_0.txt": "test", "contest-2019.txt": None,
             "val/part-0.parquet": "val"}
    for name, split in cases.items():
        assert sources._split_of(tmp_path / name, tmp_path) == split, name
