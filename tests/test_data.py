import json
import shutil

import numpy as np
import pytest

from conftest import assert_one_line_error, tiny_config
from tinygpt_cli import data
from tinygpt_cli.errors import DataError
from tinygpt_cli.tokenizer import EOT_ID, get_encoding


def _docs(n: int) -> list[str]:
    return [f"Document number {i}. " + "All the world's a stage. " * (i % 5 + 1) for i in range(n)]


def _read(path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint16)


def test_embedded_corpus(with_shakespeare):
    dataset = data.find_dataset(None)
    meta = dataset.meta
    assert dataset.name == "shakespeare" and meta["documents"]["in_source"] == 42
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    assert train["documents"] == 41 and val["documents"] == 1  # max(1, round(42 * 0.005))
    assert 1_500_000 < train["tokens"] + val["tokens"] < 1_650_000  # ~1.57M tokens per the data README
    tokens = dataset.split("train")
    assert tokens.dtype == np.uint16 and len(tokens) == train["tokens"]
    assert int((tokens == EOT_ID).sum()) == 41 and tokens[-1] == EOT_ID
    assert meta["tokenizer"]["name"] == "gpt2"


def test_text_round_trips_with_eot_separators(workspace):
    folder = workspace / "docs"
    folder.mkdir()
    texts = _docs(30)
    for i, text in enumerate(texts):
        (folder / f"{i:02d}.txt").write_text(text, encoding="utf-8")
    result = data.tokenize(str(folder), val_fraction=0.1)
    enc = get_encoding()
    decoded = []
    for split in ("train", "val"):
        ids = _read(result.path / f"{split}.bin").tolist()
        decoded += enc.decode(ids).split("<|endoftext|>")[:-1]
    assert sorted(decoded) == sorted(texts)
    assert result.meta["splits"]["val"]["documents"] == 3


def test_deterministic_whatever_the_workers(workspace, monkeypatch):
    path = workspace / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(200)))
    monkeypatch.setattr(data, "TASK_TEXT_BYTES", 500)  # many tasks, so that several workers finish out of order
    first = data.tokenize(str(path), name="a", workers=1, seed=3, fraction=0.5)
    second = data.tokenize(str(path), name="b", workers=4, seed=3, fraction=0.5)
    for split in ("train", "val"):
        assert (first.path / f"{split}.bin").read_bytes() == (second.path / f"{split}.bin").read_bytes()
    other_seed = data.tokenize(str(path), name="c", seed=4, fraction=0.5)
    assert (other_seed.path / "val.bin").read_bytes() != (first.path / "val.bin").read_bytes()


def test_fraction_picks_that_share_of_documents(workspace):
    path = workspace / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(400)))
    result = data.tokenize(str(path), fraction=0.25)
    documents = result.meta["documents"]
    assert documents["selected"] == 100
    splits = result.meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 100
    assert splits["val"]["documents"] == 1


def test_jsonl_text_field_and_parquet(workspace):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _docs(50)
    (workspace / "a.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(rows)))
    with pytest.raises(DataError, match="has no 'text' field .*--text-field"):
        data.tokenize(str(workspace / "a.jsonl"))
    via_jsonl = data.tokenize(str(workspace / "a.jsonl"), text_field="body", name="j")
    pq.write_table(pa.table({"body": rows}), workspace / "a.parquet")
    via_parquet = data.tokenize(str(workspace / "a.parquet"), text_field="body", name="p")
    for split in ("train", "val"):
        assert (via_jsonl.path / f"{split}.bin").read_bytes() == (via_parquet.path / f"{split}.bin").read_bytes()
    with pytest.raises(DataError, match="no column 'text'"):
        data.tokenize(str(workspace / "a.parquet"))


@pytest.mark.parametrize(("changed", "change"), [("a.jsonl", "grow"), ("b.jsonl", "grow"), ("a.jsonl", "shrink")])
def test_a_source_that_changes_while_it_is_read_is_one_error(workspace, monkeypatch, changed, change):
    """Lines added to or removed from a .jsonl after it was counted: one line that says so (growing the last
    file was an IndexError traceback; growing or cutting another shifted every later document's split)."""
    folder = workspace / "corpus"
    folder.mkdir()
    for name, start in (("a.jsonl", 0), ("b.jsonl", 20)):
        (folder / name).write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(20)[start % 20 :]))
    real = data.resolve_source

    def counted_then_changed(*args, **kwargs):
        src = real(*args, **kwargs)
        path = folder / changed
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines * 2 if change == "grow" else lines[:-3]))
        return src

    monkeypatch.setattr(data, "resolve_source", counted_then_changed)
    with pytest.raises(DataError, match=f"{changed} changed while it was being tokenized .*: run tokenize again"):
        data.tokenize(str(folder), name="changing")


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_data_leaves_out_a_dataset_whose_bins_do_not_match_its_meta(with_shakespeare, damage):
    """A cut or deleted .bin was listed (and shown) as healthy, its size read from meta.json (found by an audit);
    `train --data` already refused it."""
    import shutil

    from test_cli import invoke

    copy = with_shakespeare.parent / "copy"
    shutil.copytree(with_shakespeare, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "created": "2099-01-01T00:00:00+00:00"}))  # the newest
    bin_path = copy / ("train.bin" if damage == "truncated" else "val.bin")
    if damage == "truncated":
        bin_path.write_bytes(bin_path.read_bytes()[:100])
    else:
        bin_path.unlink()
    listed = invoke("data")
    assert listed.exit_code == 0 and "shakespeare" in listed.stdout and "copy" not in listed.stdout
    assert f"note: copy is left out: {bin_path}" in listed.stderr
    shown = invoke("data", "show", "copy")  # its meta.json still says where it came from, and how to remake it
    assert shown.exit_code == 0 and shown.stdout.startswith("copy  (")
    assert f"note: {bin_path}" in shown.stderr
    assert "make it again with `tinygpt tokenize shakespeare --name copy --fraction 1.0" in shown.stderr
    assert data.find_dataset(None).path == copy  # still the default, so that using it says what is wrong


@pytest.mark.parametrize(("name", "message"), [
    ("ünï", r"--name 'ünï' is not a plain folder name under data/: .*\(e\.g\. --name uni\)"),
    ("../escape", r"--name '\.\./escape' is not a plain folder name"),
    ("a/b", r"--name 'a/b' is not a plain folder name .*--name a-b"),
    ("..", r"--name '\.\.' is not a plain folder name .*--name my-data"),
    ("名前", r"--name '名前' is not a plain folder name .*--name my-data"),  # QA: it suggested "dataset"
    ("", r"--name '' is not a plain folder name"),
    ("RAW", r"--name RAW is reserved"),
    ("x" * 101, r"--name is 101 characters long"),
])
def test_a_dataset_name_is_used_as_given_or_refused(workspace, name, message):
    """--name was rewritten without a word ('ünï' -> data/n, '..' -> data/dataset), and '' meant no name, which
    replaced the source's dataset (found by an audit). Nothing is written for a refused name."""
    (workspace / "a.txt").write_text("Some text to tokenize.\n" * 50)
    with pytest.raises(DataError, match=message):
        data.tokenize(str(workspace / "a.txt"), name=name)
    assert not (workspace / "data").exists() or not list((workspace / "data").iterdir())
    assert data.tokenize(str(workspace / "a.txt"), name="my.data_1").path.name == "my.data_1"


def test_a_dataset_that_is_not_there_by_a_name_no_dataset_can_have(with_shakespeare, workspace):
    """QA: `data show raw` said to make it with `tokenize SOURCE --name raw`, which is refused (data/raw holds the
    downloads); `data show ..` read data/.. and said to run tokenize; a path said to make it with --name PATH."""
    from test_cli import invoke

    from conftest import assert_one_line_error

    (workspace / "data" / "raw").mkdir()
    assert_one_line_error(invoke("data", "show", "raw"), "data/raw holds downloads, not a tokenized dataset "
                                                         "(known: shakespeare): tokenize a download with `tinygpt "
                                                         "tokenize NAME`")
    for spec in ("..", "./nope/x"):
        assert_one_line_error(invoke("data", "show", spec), f"no tokenized dataset at {spec} (known: shakespeare): "
                                                            f"name a dataset of `tinygpt data`, or a folder")
    assert_one_line_error(invoke("data", "show", "nope"), "make it with `tinygpt tokenize SOURCE --name nope`")
    # review: a trailing slash, and a folder named by hand that `tinygpt data` lists, are still found
    shutil.copytree(workspace / "data" / "shakespeare", workspace / "data" / "my data")
    for spec in ("shakespeare/", "my data"):
        assert invoke("data", "show", spec).exit_code == 0, spec


@pytest.mark.parametrize("streamed", [False, True])
def test_a_byte_order_mark_is_not_text(workspace, monkeypatch, streamed):
    """A UTF-8 .txt that starts with a byte-order mark gave a U+FEFF token; a .jsonl's was already dropped."""
    if streamed:  # a file large enough to be read in pieces
        monkeypatch.setattr(sources, "TXT_WHOLE_BYTES", 64)
        monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 128)
    (workspace / "bom.txt").write_bytes(b"\xef\xbb\xbf" + "Line of the book.\n".join("" for _ in range(80)).encode())
    result = data.tokenize(str(workspace / "bom.txt"), name="bom")
    text = "".join(get_encoding().decode(_read(result.path / f"{split}.bin").tolist()) for split in ("train", "val"))
    assert "\ufeff" not in text and text.startswith("Line of the book.")


def test_single_text_file_is_cut_inside(workspace):
    path = workspace / "book.txt"
    lines = [f"Line {i} of the only book." for i in range(1000)]
    path.write_text("\n".join(lines) + "\n")
    result = data.tokenize(str(path))
    enc = get_encoding()
    train = enc.decode(_read(result.path / "train.bin").tolist()).replace("<|endoftext|>", "")
    val = enc.decode(_read(result.path / "val.bin").tolist()).replace("<|endoftext|>", "")
    assert train + val == path.read_text()
    assert val.startswith("Line ") and 0.08 < len(val) / len(train + val) < 0.12


def test_non_utf8_files_are_skipped_and_counted(workspace):
    folder = workspace / "mixed"
    folder.mkdir()
    for i, text in enumerate(_docs(10)):
        (folder / f"{i}.txt").write_text(text)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    result = data.tokenize(str(folder), val_fraction=0.2)
    assert result.skipped_undecodable == [str(folder / "latin1.txt")]
    assert result.meta["documents"]["skipped_undecodable"] == 1


def test_only_non_utf8_is_a_clear_error(workspace):
    path = workspace / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20)
    with pytest.raises(DataError, match=r"latin1\.txt is not UTF-8 text"):
        data.tokenize(str(path))
    assert not (workspace / "data" / "latin1").exists()
    assert not [p for p in (workspace / "data").iterdir()]  # no partial folder left


def test_a_split_emptied_by_non_utf8_files_names_them(workspace):
    """It said only 'change --seed or --val-fraction', hiding the skipped file (audit)."""
    folder = workspace / "ten"  # enough documents to split whole ones: the good one is in one split alone
    folder.mkdir()
    (folder / "good.txt").write_text(_docs(1)[0])
    for i in range(9):
        (folder / f"latin1-{i}.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1") * 20)
    with pytest.raises(DataError, match=r"split came out empty: 9 document\(s\) were skipped as not UTF-8 text "
                                        r"\(first: .*latin1-0\.txt\): convert them"):
        data.tokenize(str(folder))


def test_fraction_of_a_single_document_is_refused(workspace):
    """It tokenized the whole file and recorded the fraction asked for (audit)."""
    path = workspace / "one.txt"
    path.write_text("\n".join(_docs(20)))
    with pytest.raises(DataError, match="--fraction keeps whole documents, and .*one.txt.* is a single document"):
        data.tokenize(str(path), fraction=0.5)
    assert not (workspace / "data").exists() or not list((workspace / "data").iterdir())
    assert data.tokenize(str(path)).meta["fraction"] == 1.0


def test_the_plan_counts_a_jsonl_text_field_not_its_other_fields(workspace):
    """A .jsonl with a short text and a large other field was planned at its file size: 78 times too much text,
    and a disk check that could refuse for no reason (audit)."""
    path = workspace / "heavy.jsonl"
    rows = [{"text": text[:200], "html": "<p>" + "x" * 5000 + "</p>"} for text in _docs(100)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    events = []
    result = data.tokenize(str(path), on_event=events.append)
    planned = next(event for event in events if event.kind == "plan").total_text_bytes
    assert planned == pytest.approx(result.meta["text_bytes"], rel=0.05) and planned < path.stat().st_size / 10
    # first lines unlike the rest (empty texts): the lines sampled further on still see the text (review)
    rows = [{"text": "", "meta": "m" * 1000}] * 1100 + [{"text": "t" * 100_000}] * 100
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    documents, text_bytes = sources._jsonl_stats(path)
    assert documents == 1200 and text_bytes > 1_000_000


def test_a_source_name_keeps_its_letters_without_accents(workspace):
    from tinygpt_cli.workspace import safe_name

    assert safe_name("über Bücher") == "uber-Bucher" and safe_name("数据") == "dataset"
    assert safe_name("2023\u20132024 report") == "2023-2024-report" and safe_name("data\u4e2d\u6587set") == "data-set"
    (workspace / "über.txt").write_text("Some text to tokenize.\n" * 50)
    assert data.tokenize(str(workspace / "über.txt")).path.name == "uber"  # was "ber" (audit)


def test_missing_and_empty_inputs(workspace):
    with pytest.raises(DataError, match="does not exist"):
        data.tokenize(str(workspace / "nope"))
    with pytest.raises(DataError, match="/dev/null is not a regular file"):  # it said "does not exist" (audit)
        data.tokenize("/dev/null")
    (workspace / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        data.tokenize(str(workspace / "empty"))
    (workspace / "blank.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="is empty"):
        data.tokenize(str(workspace / "blank.jsonl"))
    (workspace / "spaces").mkdir()
    for i in range(3):
        (workspace / "spaces" / f"{i}.txt").write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        data.tokenize(str(workspace / "spaces"))
    assert not (workspace / "data").exists() or not list((workspace / "data").iterdir())


def test_bad_fractions():
    with pytest.raises(DataError, match="--fraction"):
        data.tokenize(None, fraction=0)
    with pytest.raises(DataError, match="--val-fraction"):
        data.tokenize(None, val_fraction=1.5)


def test_truncated_or_foreign_token_files_are_refused(with_shakespeare):
    dataset = data.find_dataset("shakespeare")
    val = with_shakespeare / "val.bin"
    original = val.read_bytes()
    val.write_bytes(original[:-10])
    with pytest.raises(DataError, match="truncated or replaced"):
        dataset.split("val")
    val.write_bytes(original[:-2] + b"\x00\x00")
    with pytest.raises(DataError, match="does not match its meta.json hash"):
        dataset.split("val")
    meta = json.loads((with_shakespeare / "meta.json").read_text())
    meta["tokenizer"]["ranks_sha256"] = "0" * 64
    (with_shakespeare / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="not written by tinygpt"):
        data.load_dataset(with_shakespeare)


@pytest.mark.parametrize("damage", ["null", "[1, 2]", "splits", "tokens", "tokenizer", "name"])
def test_a_meta_json_of_the_wrong_shape_is_refused_not_a_crash(with_shakespeare, workspace, damage):
    """Valid JSON that is not a meta.json's object (null, a list, a count as text) crashed `data`, `data show`,
    `plan`, `eval` and `train` with a traceback (found by an audit)."""
    from test_cli import invoke

    bad = workspace / "data" / "bad"
    bad.mkdir()
    meta = json.loads((with_shakespeare / "meta.json").read_text())
    text = {"null": "null", "[1, 2]": "[1, 2]"}.get(damage)
    if text is None:
        if damage == "splits":
            meta["splits"] = "both"
        elif damage == "tokens":
            meta["splits"]["train"]["tokens"] = "many"
        elif damage == "tokenizer":
            meta["tokenizer"] = "gpt2"
        else:
            meta["name"] = 7
        text = json.dumps(meta)
    (bad / "meta.json").write_text(text)
    with pytest.raises(DataError, match="bad"):
        data.load_dataset(bad)
    listed = invoke("data")
    assert listed.exit_code == 0 and "shakespeare" in listed.stdout, listed.output
    assert "note: bad is left out: " in listed.stderr and "re-run `tinygpt tokenize`" in listed.stderr  # audit
    shown = invoke("data", "show", "shakespeare")
    assert shown.exit_code == 0 and " tokens, 1 document, " in shown.stdout, shown.output  # val: was "1 documents"
    assert_one_line_error(invoke("data", "show", str(bad)), "re-run `tinygpt tokenize`")
    assert invoke("plan", "--size", "micro", "--data", "shakespeare").exit_code == 0


def test_retokenizing_replaces_the_dataset_whole(workspace):
    path = workspace / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(40)))
    first = data.tokenize(str(path), name="same")
    second = data.tokenize(str(path), name="same", fraction=0.5)
    assert second.meta["documents"]["selected"] == 20 != first.meta["documents"]["selected"]
    assert sorted(p.name for p in (workspace / "data").iterdir()) == ["same"]
    assert data.find_dataset(None).meta["fraction"] == 0.5


def test_unknown_dataset_name(with_shakespeare):
    with pytest.raises(DataError, match="no tokenized dataset named 'owt'.*shakespeare"):
        data.find_dataset("owt")


# ------------------------------------------------------------------------------------------- issue #3: at scale
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from tinygpt_cli import sources  # noqa: E402
from tinygpt_cli.cli import app  # noqa: E402

runner = CliRunner()


_one_line_error = assert_one_line_error


def _no_output(workspace) -> None:
    """Nothing that looks like (or is part of) a dataset was left behind."""
    root = workspace / "data"
    assert not root.exists() or not [p for p in root.iterdir() if p.name != sources.RAW_DIR_NAME], list(root.iterdir())


def _write_jsonl(path, texts) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")


def _reference_split(n: int, fraction: float, val_fraction: float, seed: int):
    """The split rule written the obvious way (sort all hashes), to check the streaming thresholds against."""
    h1 = data.keyed_hash(seed, 1, 0, n)
    k = min(n, max(1, round(n * fraction)))
    selected = np.zeros(n, dtype=bool)
    selected[np.argsort(h1, kind="stable")[:k]] = True
    v = max(1, round(k * val_fraction)) if k >= data.FEW_DOCUMENTS else 0  # fewer: each is cut instead
    candidates = np.flatnonzero(selected)
    in_val = np.zeros(n, dtype=bool)
    in_val[candidates[np.argsort(data.keyed_hash(seed, 2, 0, n)[candidates], kind="stable")[:v]]] = True
    return selected, in_val


@pytest.mark.parametrize("n,fraction,val_fraction,seed", [
    (1, 1.0, 0.005, 0), (7, 0.5, 0.3, 1), (5000, 0.25, 0.01, 3), (5000, 1.0, 0.2, 9), (4999, 0.001, 0.5, 2),
])
def test_streaming_split_thresholds_match_sorting(monkeypatch, n, fraction, val_fraction, seed):
    monkeypatch.setattr(data, "HASH_BLOCK", 512)  # force the two-pass (histogram) path on small inputs
    selected, in_val = data.plan_split(n, fraction, val_fraction, seed)
    expected_selected, expected_val = _reference_split(n, fraction, val_fraction, seed)
    assert (selected == expected_selected).all() and (in_val == expected_val).all()
    plan = data.SplitPlan.build(n, fraction, val_fraction, seed)
    pieces = np.concatenate([plan.codes(lo, min(n, lo + 333)) for lo in range(0, n, 333)])
    assert (pieces == plan.codes(0, n)).all()


def test_numpy_encoding_path_equals_encode_ordinary():
    enc = get_encoding()
    texts = ["plain text", "a <|endoftext|> inside", "<|endoftext|>", "", "caf\u00e9 \U0001f600\n\n  x"]
    for text in texts:
        assert enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=()).tolist() == \
            enc.encode_ordinary(text)
    encoded = data._encode_items(enc, [(t, data.TRAIN, True) for t in texts] + [("a\ud800b", data.VAL, True)], 6, 6)
    expected = [i for t in texts for i in [*enc.encode_ordinary(t), EOT_ID]]
    assert encoded.tokens[data.TRAIN].tolist() == expected
    assert encoded.tokens[data.VAL].tolist() == [*enc.encode_ordinary("a\ufffdb"), EOT_ID]  # lone surrogate
    assert encoded.documents == {data.TRAIN: 5, data.VAL: 1}


def test_safe_cuts_never_change_tokens(workspace, monkeypatch):
    """A large .txt file is encoded in pieces cut at safe line breaks: the tokens are those of the whole text."""
    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 200)
    enc = get_encoding()
    rng = np.random.default_rng(0)
    words = ["word", "  spaced", "\n", "\n\n", " \n", "\n ", "\t", "caf\u00e9", "42", "!?", "'s", "x\ny", "\r\n", "."]
    text = "".join(rng.choice(words, size=6000)) + "".join(
        f.path.read_text()[:20000] for f in sources.embedded_source().files[:3])
    path = workspace / "mixed.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = list(sources.TextFile(path, path.stat().st_size, None)._pieces(0, path.stat().st_size))
    assert len(pieces) > 100 and [last for _, last in pieces].count(True) == 1 and pieces[-1][1]
    assert "".join(p for p, _ in pieces) == text
    assert [i for p, _ in pieces for i in enc.encode_ordinary(p)] == enc.encode_ordinary(text)


def test_a_file_of_one_long_line_is_streamed_in_pieces_with_identical_tokens(workspace, monkeypatch):
    """Without line breaks it was held whole (a 100 MB line took 400 MB, audit): it is cut before a space that
    starts a word, which cannot change the tokens."""
    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 200)
    enc = get_encoding()
    rng = np.random.default_rng(1)
    words = [" word", "  spaced", " Word", "caf\u00e9", " 42", "!?", "'s", " x", ".", " \u00dcber", "\t", " 's",
             " \u00e9t\u00e9"]
    text = "".join(rng.choice(words, size=8000))
    path = workspace / "line.txt"
    path.write_bytes(text.encode("utf-8"))
    pieces = list(sources.TextFile(path, path.stat().st_size, None)._pieces(0, path.stat().st_size))
    assert len(pieces) > 100 and max(len(p.encode()) for p, _ in pieces) <= 400
    assert "".join(p for p, _ in pieces) == text
    assert [i for p, _ in pieces for i in enc.encode_ordinary(p)] == enc.encode_ordinary(text)
    assert sources.TextFile(path, path.stat().st_size, None)._tail_cut(0.1) in \
        [i + 1 for i, byte in enumerate(text.encode()) if byte == 0x20]


def test_a_large_file_of_a_title_and_one_long_line_keeps_val_near_its_share(workspace, monkeypatch):
    """The first line break before the cut won however far back: a title line put almost all the text in val."""
    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 64)
    text = "Title\n" + "word " * 2000
    path = workspace / "titled.txt"
    path.write_text(text)
    cut = sources.TextFile(path, path.stat().st_size, None)._tail_cut(0.1)
    assert 0.08 < 1 - cut / len(text) < 0.12 and text[cut - 1] == " "
    assert cut == len(sources.cut_tail(text, 0.1)[0])  # as a text cut in memory


def test_large_text_files_are_streamed_with_identical_tokens(workspace, monkeypatch):
    monkeypatch.setattr(sources, "TXT_WHOLE_BYTES", 10_000)
    monkeypatch.setattr(sources, "TXT_PIECE_BYTES", 3_000)
    monkeypatch.setattr(data, "TASK_TEXT_BYTES", 2_000)
    works = [f.path.read_text()[:60_000] for f in sources.embedded_source().files[:2]]
    folder = workspace / "big"
    folder.mkdir()
    for i, text in enumerate(works):
        (folder / f"{i}.txt").write_text(text)
    result = data.tokenize(str(folder), val_fraction=0.5)  # two documents: each is cut, its last half val
    enc = get_encoding()
    heads, tails = (enc.decode(_read(result.path / f"{s}.bin").tolist()).split("<|endoftext|>")[:-1]
                    for s in ("train", "val"))
    assert [head + tail for head, tail in zip(heads, tails, strict=True)] == works
    assert all(0.4 < len(tail) / len(work) < 0.6 for tail, work in zip(tails, works, strict=True))
    assert _read(result.path / "train.bin").tolist() == [i for h in heads for i in [*enc.encode_ordinary(h), EOT_ID]]
    single = data.tokenize(str(folder / "0.txt"))  # one large document: the val tail is cut while streaming
    train = enc.decode(_read(single.path / "train.bin").tolist())
    val = enc.decode(_read(single.path / "val.bin").tolist())
    assert train.endswith("<|endoftext|>") and val.endswith("<|endoftext|>")
    assert (train + val).replace("<|endoftext|>", "") == works[0]
    assert 0.08 < len(val) / len(works[0]) < 0.12 and train[-len("<|endoftext|>") - 1] == "\n"


def test_a_few_long_documents_are_each_cut_for_val(workspace):
    """A folder of 4 books put one whole book in val, a quarter of the text for --val-fraction 0.005; 9 files of
    which one was most of the text put 97% in val (audit). With fewer than 10 documents each is cut instead."""
    works = [f.path.read_text()[:30_000] for f in sources.embedded_source().files[:4]]
    folder = workspace / "books"
    folder.mkdir()
    for i, text in enumerate(works):
        (folder / f"{i}.txt").write_text(text)
    result = data.tokenize(str(folder), name="books")
    splits = result.meta["splits"]
    share = splits["val"]["tokens"] / (splits["train"]["tokens"] + splits["val"]["tokens"])
    assert 0.08 < share < 0.12 and splits["val"]["documents"] == splits["train"]["documents"] == 4
    assert "fewer than 10" in result.meta["split_rule"]
    enc = get_encoding()
    heads, tails = (enc.decode(_read(result.path / f"{s}.bin").tolist()).split("<|endoftext|>")[:-1]
                    for s in ("train", "val"))
    assert sorted(head + tail for head, tail in zip(heads, tails, strict=True)) == sorted(works)
    assert all(head.endswith("\n") for head in heads)  # cut at line breaks


def test_a_long_document_that_falls_in_val_gets_a_note(workspace):
    """With 10 documents or more whole ones go to val: where the one drawn is most of the text, tokenize says so."""
    _, in_val = data.plan_split(12, 1.0, 0.005, 5)
    long_one = int(np.flatnonzero(in_val)[0])
    folder = workspace / "notes"
    folder.mkdir()
    for i in range(12):
        (folder / f"{i:02d}.txt").write_text("A line of text.\n" * (2000 if i == long_one else 20))
    events = []
    data.tokenize(str(folder), seed=5, on_event=events.append)
    notes = [e.message for e in events if e.kind == "info"]
    assert any(n.startswith("val holds 90% of the tokens (1 document of 12), for --val-fraction 0.005: a long "
                            "document fell in val") for n in notes), notes
    events.clear()
    data.tokenize(str(folder), seed=6, name="fair", on_event=events.append)  # a short one drawn: not lopsided
    assert [e.message[:22] for e in events if e.kind == "info"] == ["val holds only 121 of "]  # (but thin)


def test_documents_too_short_to_cut_leave_no_empty_val(workspace):
    """Three one-letter documents, each cut for val, left a val split of end-of-text tokens alone (review)."""
    path = workspace / "tiny.jsonl"
    _write_jsonl(path, ["a", "b", "c"])
    with pytest.raises(DataError, match="the val split came out empty"):
        data.tokenize(str(path))
    _write_jsonl(path, [f"A sentence of text, number {i}." for i in range(9)])  # cut at a word: a note says so
    events = []
    data.tokenize(str(path), on_event=events.append)
    assert any("too short to cut finely" in e.message for e in events if e.kind == "info")


def test_undecodable_lines_surrogates_and_empty_documents(workspace):
    path = workspace / "mixed.jsonl"
    good = [json.dumps({"text": t}).encode() for t in _docs(20)]
    odd = [b'{"text": "bad \xff\xfe bytes"}', json.dumps({"text": "   "}).encode(),
           b'{"text": "lone \\ud800 surrogate"}', b'{"text": null}']
    lines = [*good[:5], *odd, *good[5:]]
    path.write_bytes(b"\n".join(lines) + b"\n")
    result = data.tokenize(str(path), val_fraction=0.2)
    documents = result.meta["documents"]
    assert documents["in_source"] == 24 and documents["skipped_undecodable"] == 1
    assert result.skipped_undecodable == [f"{path}:6"] and documents["skipped_empty"] == 2
    splits = result.meta["splits"]
    assert splits["train"]["documents"] + splits["val"]["documents"] == 21
    text = get_encoding().decode(np.concatenate([_read(result.path / f"{s}.bin") for s in ("train", "val")]).tolist())
    assert "lone \ufffd surrogate" in text and "bad" not in text


def test_plan_progress_and_exact_counts(workspace, monkeypatch):
    monkeypatch.setattr(data, "TASK_TEXT_BYTES", 4_000)
    path = workspace / "rows.jsonl"
    _write_jsonl(path, _docs(600))
    events = []
    result = data.tokenize(str(path), fraction=0.5, workers=2, on_event=events.append)
    plan = next(e for e in events if e.kind == "plan")
    progress = [e for e in events if e.kind == "progress"]
    done = events[-1]
    tokens = result.meta["splits"]["train"]["tokens"] + result.meta["splits"]["val"]["tokens"]
    assert plan.documents == 300 and plan.total_documents == 600 and plan.workers == 2
    assert 0.8 < plan.estimated_tokens / tokens < 1.25  # the estimate samples the corpus
    assert len(progress) > 5 and progress[-1].documents == 300 and progress[-1].tokens == tokens
    assert all(e.tokens_per_s > 0 and e.bytes_per_s > 0 and e.documents_per_s > 0 for e in progress)
    assert progress[-1].eta_s == 0.0
    assert done.kind == "done" and done.tokens == tokens and done.text_bytes == result.meta["text_bytes"]


def test_memory_stays_bounded_on_a_corpus_far_larger_than_a_task(workspace):
    """Tokenize a 24 MB corpus with 64 KiB tasks in a fresh process: peak RSS grows by far less than the corpus."""
    corpus = workspace / "big.jsonl"
    paragraphs = [p for f in sources.embedded_source().files[:8] for p in f.path.read_text().split("\n\n")]
    rows = [json.dumps({"text": "\n\n".join(paragraphs[i : i + 12])}) + "\n" for i in range(0, len(paragraphs), 12)]
    with open(corpus, "w") as handle:
        size = 0
        while size < 24_000_000:
            handle.writelines(rows)
            size += sum(map(len, rows))
    script = textwrap.dedent("""
        import json, sys
        from tinygpt_cli import data
        data.TASK_TEXT_BYTES = 64 * 1024
        def status_mib(field):  # VmHWM: this address space's peak RSS (ru_maxrss would include the forked parent)
            with open("/proc/self/status") as handle:
                return next(int(l.split()[1]) for l in handle if l.startswith(field)) / 1024
        data.tokenize(sys.argv[1], name="warm-up", fraction=0.002)  # load the tokenizer, threads, pyarrow...
        before = max(status_mib("VmRSS"), status_mib("VmHWM"))
        result = data.tokenize(sys.argv[1], name="big", workers=2)
        peak = status_mib("VmHWM")
        print(json.dumps({"before": before, "peak": peak, "text_bytes": result.meta["text_bytes"]}))
    """)
    out = subprocess.run([sys.executable, "-c", script, str(corpus)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["text_bytes"] > 20_000_000, report
    assert report["peak"] - report["before"] < 12, report  # the corpus held in memory would add > 20 MiB


def test_killed_run_leaves_nothing_complete_and_resumes_identically(workspace, tmp_path):
    path = workspace / "rows.jsonl"
    _write_jsonl(path, _docs(300))
    script = textwrap.dedent("""
        import os, signal, sys
        from tinygpt_cli import data
        data.CHECKPOINT_SECONDS = 0.0  # a checkpoint before every document
        data.TASK_TEXT_BYTES = 2_000
        seen = []
        def on_event(event):
            seen.append(event)
            if sum(e.kind == "progress" for e in seen) == 25:
                os.kill(os.getpid(), signal.SIGKILL)  # no cleanup of any kind, like a crash or the OOM killer
        data.tokenize(sys.argv[1], name="rows", seed=5, val_fraction=0.05, on_event=on_event)
    """)
    killed = subprocess.run([sys.executable, "-c", script, str(path)], env=dict(os.environ), timeout=300)
    assert killed.returncode == -signal.SIGKILL
    root = workspace / "data"
    assert not (root / "rows").exists() and not list(root.glob("*/meta.json"))
    partial = root / ".rows.partial"
    assert (partial / "progress.json").is_file() and not (partial / "meta.json").exists()
    assert data.find_dataset(None) is None  # train would find nothing to use
    events = []
    resumed = data.tokenize(str(path), name="rows", seed=5, val_fraction=0.05, on_event=events.append)
    assert resumed.resumed_documents > 0 and any("resuming" in e.message for e in events if e.kind == "info")
    clean = data.tokenize(str(path), name="clean", seed=5, val_fraction=0.05)
    for split in ("train", "val"):
        assert (resumed.path / f"{split}.bin").read_bytes() == (clean.path / f"{split}.bin").read_bytes()
        assert resumed.meta["splits"][split] == {**clean.meta["splits"][split]}
    assert not partial.exists() and resumed.meta["documents"] == clean.meta["documents"]


def _interrupt_write(monkeypatch, nth: int):
    """Checkpoint after every task, and raise KeyboardInterrupt (Ctrl-C) at the `nth` write; returns the real
    write, to put back for the run that continues."""
    monkeypatch.setattr(data, "CHECKPOINT_SECONDS", 0.0)
    real, calls = data._Partial.write, []

    def interrupting_write(self, encoded):
        calls.append(1)
        if len(calls) == nth:
            raise KeyboardInterrupt
        real(self, encoded)

    monkeypatch.setattr(data._Partial, "write", interrupting_write)
    return real


def test_a_partial_tokenized_under_another_split_rule_starts_over(workspace, tmp_path, monkeypatch):
    """A tokenize killed before an upgrade that changed the split rule resumed under the new one: its dataset held
    documents split by two rules, and meta.json named one (review)."""
    path = workspace / "rows.jsonl"
    _write_jsonl(path, _docs(300))
    monkeypatch.setattr(data, "TASK_TEXT_BYTES", 2_000)
    real = _interrupt_write(monkeypatch, 10)
    with pytest.raises(data.TokenizeInterrupted):
        data.tokenize(str(path), name="rows")
    monkeypatch.setattr(data._Partial, "write", real)
    monkeypatch.setattr(data, "SPLIT_RULE", data.SPLIT_RULE + " (a later version's)")
    assert data.tokenize(str(path), name="rows").resumed_documents == 0


def test_sigterm_stops_tokenize_like_ctrl_c(workspace):
    """It died silently with 143 (audit): now it says what was kept, as for Ctrl-C, and the same command resumes."""
    path = workspace / "rows.jsonl"
    _write_jsonl(path, _docs(300))
    script = textwrap.dedent("""
        import os, signal, sys
        from tinygpt_cli import data
        from tinygpt_cli.cli import main
        data.CHECKPOINT_SECONDS = 0.0
        data.TASK_TEXT_BYTES = 2_000
        original, calls = data._Partial.write, []
        def write(self, encoded):
            calls.append(1)
            if len(calls) == 10:
                os.kill(os.getpid(), signal.SIGTERM)
            original(self, encoded)
        data._Partial.write = write
        sys.argv = ["tinygpt", "tokenize", sys.argv[1], "--name", "rows"]
        main()
    """)
    stopped = subprocess.run([sys.executable, "-c", script, str(path)], env=dict(os.environ), capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr
    assert "Interrupted: run the same command again to continue where it stopped" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert (workspace / "data" / ".rows.partial" / "progress.json").is_file()
    assert not (workspace / "data" / "rows").exists()
    assert data.tokenize(str(path), name="rows").resumed_documents > 0


def test_an_interrupt_before_the_first_checkpoint_says_nothing_was_kept(workspace, monkeypatch):
    """It promised to 'continue where it stopped' with no checkpoint on disk (audit)."""
    path = workspace / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in _docs(50)))

    def interrupting_write(self, encoded):
        raise KeyboardInterrupt

    monkeypatch.setattr(data._Partial, "write", interrupting_write)
    result = runner.invoke(app, ["tokenize", str(path)])
    assert result.exit_code == 130, result.output
    assert "Interrupted before the first checkpoint (after 30 s or so, between documents: a single .txt file is " \
           "one document): nothing was kept" in result.stderr
    assert "continue where it stopped" not in result.stderr


def test_interrupt_in_the_cli_then_continue_or_restart(workspace, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = _docs(200)
    path = workspace / "rows.parquet"
    pq.write_table(pa.table({"text": texts}), path, row_group_size=37)  # resume lands inside row groups
    monkeypatch.setattr(data, "TASK_TEXT_BYTES", 3_000)
    original_write = _interrupt_write(monkeypatch, 12)
    result = runner.invoke(app, ["tokenize", str(path), "--seed", "2"])
    assert result.exit_code == 130, result.output
    assert "Interrupted: run the same command again" in result.stderr
    assert not (workspace / "data" / "rows").exists() and (workspace / "data" / ".rows.partial").is_dir()
    monkeypatch.setattr(data._Partial, "write", original_write)
    monkeypatch.setattr(data, "CHECKPOINT_SECONDS", 30.0)
    again = runner.invoke(app, ["tokenize", str(path), "--seed", "2", "--json"])
    assert again.exit_code == 0, again.output
    resumed = json.loads(again.stdout)
    assert "Resuming an interrupted run" in again.stderr and resumed["resumed_documents"] > 0
    total = resumed["splits"]["train"]["tokens"] + resumed["splits"]["val"]["tokens"]
    assert 0 < resumed["resumed_tokens"] < total  # this run's rate counts only this run's tokens
    clean = data.tokenize(str(path), name="clean", seed=2)
    assert (workspace / "data" / "rows" / "train.bin").read_bytes() == (clean.path / "train.bin").read_bytes()
    # an interrupted run with other settings is discarded, not mixed in
    _interrupt_write(monkeypatch, 12)
    assert runner.invoke(app, ["tokenize", str(path), "--name", "x", "--seed", "2"]).exit_code == 130
    monkeypatch.setattr(data._Partial, "write", original_write)
    monkeypatch.setattr(data, "CHECKPOINT_SECONDS", 30.0)
    other = runner.invoke(app, ["tokenize", str(path), "--name", "x", "--seed", "3"])
    assert other.exit_code == 0 and "Starting over" in other.stderr
    assert "(other settings or changed input files)" in " ".join(other.stderr.split())
    # upgrade QA: one an earlier version left is discarded for that, not for "other settings or changed input files"
    _interrupt_write(monkeypatch, 12)
    assert runner.invoke(app, ["tokenize", str(path), "--name", "v", "--seed", "2"]).exit_code == 130
    progress = workspace / "data" / ".v.partial" / "progress.json"
    saved = json.loads(progress.read_text())
    saved["job"]["split_rule"] = "an earlier version's rule"
    progress.write_text(json.dumps(saved))
    monkeypatch.setattr(data._Partial, "write", original_write)
    upgraded = runner.invoke(app, ["tokenize", str(path), "--name", "v", "--seed", "2"])
    assert upgraded.exit_code == 0 and "made by another version of tinygpt" in " ".join(upgraded.stderr.split())
    assert (workspace / "data" / "x" / "val.bin").read_bytes() == \
        (data.tokenize(str(path), name="y", seed=3).path / "val.bin").read_bytes()


def test_concurrent_runs_on_one_dataset_are_refused(workspace):
    import fcntl

    (workspace / "data").mkdir()
    lock = workspace / "data" / ".shakespeare.lock"
    with open(lock, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another tinygpt process is writing data/shakespeare"):
            data.tokenize(None)
    assert not (workspace / "data" / "shakespeare").exists()


def test_not_enough_disk_is_refused_before_writing(workspace, monkeypatch):
    """The token files' size (2 bytes a token, from the plan's estimate) against the free space, before any file;
    a partial tokenization on disk counts as written, and is kept."""
    from tinygpt_cli import workspace as ws

    monkeypatch.setattr(ws, "free_bytes", lambda path: 100_000)  # the embedded corpus needs ~3.2 MB
    _one_line_error(runner.invoke(app, ["tokenize"]), "needs about 3.2 MB of disk, 100.0 kB free")
    assert not (workspace / "data").exists() or not any((workspace / "data").iterdir())
    partial = workspace / "data" / ".shakespeare.partial"
    partial.mkdir(parents=True)
    (partial / "train.bin").write_bytes(b"\0" * 3_100_000)  # as if an earlier run had written nearly all of it
    monkeypatch.setattr(ws, "free_bytes", lambda path: 1_000_000)
    result = runner.invoke(app, ["tokenize"])
    assert result.exit_code == 0, result.output


def test_tokenize_cli_bad_inputs_are_one_line_errors(workspace, monkeypatch):
    rows = workspace / "rows.jsonl"
    _write_jsonl(rows, _docs(10))
    # an unquoted glob, expanded by the shell: click's boxed "unexpected extra argument" before (audit)
    _one_line_error(runner.invoke(app, ["tokenize", str(rows), str(rows), "--name", "x"]),
                    "tokenize takes one SOURCE: put the files in one folder, or quote a glob", code=2)
    bad = runner.invoke(app, ["tokenize", str(rows), "--fraction", "0"])
    _one_line_error(bad, "--fraction must be in (0, 1]")
    assert bad.stderr.startswith("error:")  # a bar that never started wrote a blank line first (audit)
    for seed in (str(2**64), "-1"):  # 2**64 wrapped to seed 0 and recorded 2**64 (audit)
        _one_line_error(runner.invoke(app, ["tokenize", str(rows), "--seed", seed]), "--seed must be 0 to")
    _one_line_error(runner.invoke(app, ["tokenize", str(rows), "--val-fraction", "1"]), "--val-fraction")
    _one_line_error(runner.invoke(app, ["tokenize", str(rows), "--workers", "0"]), "--workers must be at least 1")
    # audit: 100000 threads, each with two tasks of text in flight, for a CPU-bound encoder on a few cores
    monkeypatch.setattr(data, "available_cpus", lambda: 3)
    _one_line_error(runner.invoke(app, ["tokenize", str(rows), "--workers", "100000"]),
                    "--workers 100000 is more than 3 cores can use (encoding is CPU-bound): use at most 12")
    _one_line_error(runner.invoke(app, ["tokenize", str(rows), "--name", "raw"]), "--name raw is reserved")
    _one_line_error(runner.invoke(app, ["tokenize", "tinystories"]),
                    "tinystories is not downloaded yet: run `tinygpt download tinystories` first")
    _one_line_error(runner.invoke(app, ["tokenize", str(rows), "--text-field", "body"]), "has no 'body' field")
    broken = workspace / "broken.jsonl"
    broken.write_text(rows.read_text() + "{not json\n")
    _one_line_error(runner.invoke(app, ["tokenize", str(broken)]), "line 11 of")
    numbers = workspace / "numbers.parquet"
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": list(range(5))}), numbers)
    _one_line_error(runner.invoke(app, ["tokenize", str(numbers)]), "holds int64, not text")
    truncated = workspace / "cut.jsonl.gz"
    import gzip

    truncated.write_bytes(gzip.compress(rows.read_bytes())[:-30])
    _one_line_error(runner.invoke(app, ["tokenize", str(truncated)]), "could not be read")
    typed = workspace / "typed.jsonl"
    typed.write_text('{"text": "fine"}\n{"text": null}\n{"text": ["a", "b"]}\n')  # null: a missing document
    _one_line_error(runner.invoke(app, ["tokenize", str(typed)]), "line 3 of")
    _one_line_error(runner.invoke(app, ["tokenize", str(typed)]), "'text' holds a list, not text: pass --text-field")
    empty = workspace / "empty.jsonl"
    _write_jsonl(empty, ["", " ", "\n"])
    _one_line_error(runner.invoke(app, ["tokenize", str(empty)]), "holds no text (all documents are empty)")
    _no_output(workspace)


def test_tokenize_cli_prints_plan_and_exact_counts(workspace):
    rows = workspace / "rows.jsonl"
    _write_jsonl(rows, _docs(50))
    result = runner.invoke(app, ["tokenize", str(rows), "--fraction", "0.5", "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "Tokenizing " in result.stderr and "25 of 50 documents (fraction 0.5, seed 0)" in result.stderr
    assert "tokens, ~" in result.stderr and "on disk; 1 worker(s)" in result.stderr
    meta = json.loads((workspace / "data" / "rows" / "meta.json").read_text())
    assert f"{meta['splits']['train']['tokens']:,} train tokens" in result.stdout


def test_a_dataset_from_another_source_is_replaced_only_with_force(workspace):
    """It was replaced silently: a run trained on it then resumed and evaluated on other data."""
    first, second = workspace / "a.jsonl", workspace / "b.jsonl"
    _write_jsonl(first, _docs(40))
    _write_jsonl(second, _docs(60))
    assert runner.invoke(app, ["tokenize", str(first), "--name", "a"]).exit_code == 0
    meta = (workspace / "data" / "a" / "meta.json").read_text()
    _one_line_error(runner.invoke(app, ["tokenize", str(second), "--name", "a"]),
                    "data/a already holds a dataset tokenized from")
    assert (workspace / "data" / "a" / "meta.json").read_text() == meta
    again = runner.invoke(app, ["tokenize", str(first), "--name", "a", "--fraction", "0.5"])  # same source: fine
    assert again.exit_code == 0, again.output
    forced = runner.invoke(app, ["tokenize", str(second), "--name", "a", "--force"])
    assert forced.exit_code == 0, forced.output
    assert str(second) in (workspace / "data" / "a" / "meta.json").read_text()


def test_a_single_document_without_line_breaks_is_cut_at_a_space():
    from tinygpt_cli.sources import cut_tail

    assert cut_tail("only one doc", 0.1) == ("only one ", "doc")  # was "only one do" | "c"
    assert cut_tail("first line\nsecond line", 0.3) == ("first line\n", "second line")
    assert cut_tail("abcdefghij", 0.1) == ("abcdefghi", "j")  # neither: a character
    head, tail = cut_tail("Title\n" + "word " * 2000, 0.1)  # an early title line: not 6 chars against 10,000
    assert len(tail) < 0.15 * len(head) and head.endswith(" ") and tail.startswith("word")


def test_the_same_file_typed_another_way_is_the_same_source(workspace, monkeypatch):
    """The check compared the path as typed: ./a.jsonl was refused, another folder's a.jsonl was taken."""
    (workspace / "one").mkdir()
    (workspace / "two").mkdir()
    _write_jsonl(workspace / "one" / "a.jsonl", _docs(40))
    _write_jsonl(workspace / "two" / "a.jsonl", _docs(50))
    monkeypatch.chdir(workspace / "one")
    assert runner.invoke(app, ["tokenize", "a.jsonl"]).exit_code == 0
    for same in ("./a.jsonl", str(workspace / "one" / "a.jsonl")):
        assert runner.invoke(app, ["tokenize", same]).exit_code == 0, same
    assert runner.invoke(app, ["tokenize", "a.jsonl", "--text-field", "text"]).exit_code == 0
    monkeypatch.chdir(workspace / "two")
    _one_line_error(runner.invoke(app, ["tokenize", "a.jsonl"]), "data/a already holds a dataset tokenized from")


def test_a_dataset_without_a_creation_time_is_listed_not_a_crash(with_shakespeare, workspace):
    """Audit: "created": null (which meta.json may hold) crashed `data`, `data show` and `train`'s default
    dataset when sorting the datasets by creation time."""
    from test_cli import invoke

    copy = workspace / "data" / "s2"
    shutil.copytree(with_shakespeare, copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["created"], meta["name"] = None, "s2"
    (copy / "meta.json").write_text(json.dumps(meta))
    assert {d.path.name for d in data.list_datasets()} == {"shakespeare", "s2"}
    listed = invoke("data")
    assert listed.exit_code == 0 and "s2" in listed.stdout, listed.output


def test_a_stop_while_publishing_waits_for_the_dataset_to_be_in_place(workspace):
    """A stop between setting the old dataset aside and moving the new one in removed the new one as "nothing was
    kept" and left the old one hidden as data/.rows.old-PID, with no data/rows (audit): the stop now waits."""
    old, new = workspace / "old.jsonl", workspace / "new.jsonl"
    _write_jsonl(old, _docs(60))
    _write_jsonl(new, _docs(80))
    data.tokenize(str(old), name="rows")
    script = textwrap.dedent("""
        import os, signal, sys
        from tinygpt_cli import data, workspace
        from tinygpt_cli.cli import main
        real = workspace.replace
        def replace(src, dst):
            real(src, dst)
            if ".old-" in str(dst):  # the old dataset set aside, the new one not yet in its place
                os.kill(os.getpid(), signal.SIGTERM)
        data.workspace.replace = replace
        sys.argv = ["tinygpt", "tokenize", sys.argv[1], "--name", "rows", "--force"]
        main()
    """)
    stopped = subprocess.run([sys.executable, "-c", script, str(new)], env=dict(os.environ), capture_output=True,
                             text=True, timeout=300)
    assert stopped.returncode == 143, stopped.stderr  # stopped: `tokenize && train` does not go on
    assert "it was finished first, and" in stopped.stderr and "rows is complete" in stopped.stderr
    assert "nothing was kept" not in stopped.stderr and "Traceback" not in stopped.stderr
    root = workspace / "data"
    assert data.find_dataset("rows").meta["source"] == data.tokenize(str(new), name="clean").meta["source"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".rows")) == []
    assert sorted(p.name for p in (root / "rows").iterdir()) == ["meta.json", "train.bin", "val.bin"]


class _Killed(BaseException):
    """A process killed at once (SIGKILL, a power cut): no handler of the process runs."""


@pytest.mark.parametrize("killed_at", ["set aside", "meta.json", "published"])
def test_a_tokenize_killed_while_publishing_is_put_right_by_the_same_command(workspace, monkeypatch, killed_at):
    """Killed (1) after setting the old dataset aside, (2) after its work and before publishing, (3) after publishing
    and before the old copy went: the same command finishes the job without tokenizing again, and nothing set
    aside stays behind. Before, (2) lost the whole run (its checkpoint was deleted first) and (1) and (3) left a
    hidden copy of the old dataset for good (audit)."""
    old, new = workspace / "old.jsonl", workspace / "new.jsonl"
    _write_jsonl(old, _docs(60))
    _write_jsonl(new, _docs(80))
    data.tokenize(str(old), name="rows")
    root = workspace / "data"
    real_replace, real_json = data.workspace.replace, data.write_json_atomic

    def replace(src, dst):
        real_replace(src, dst)
        if (killed_at == "set aside" and ".old-" in str(dst)) or (killed_at == "published" and dst.name == "rows"):
            raise _Killed

    def write_json(path, value):
        if killed_at == "meta.json" and path.name == "meta.json":
            raise _Killed
        real_json(path, value)

    monkeypatch.setattr(data.workspace, "replace", replace)
    monkeypatch.setattr(data, "write_json_atomic", write_json)
    with pytest.raises(_Killed):
        data.tokenize(str(new), name="rows", force=True)
    monkeypatch.setattr(data.workspace, "replace", real_replace)
    monkeypatch.setattr(data, "write_json_atomic", real_json)
    monkeypatch.setattr(data.os, "getpid", lambda: 4_000_000)  # the command again is another process
    if killed_at == "set aside":  # train --data rows says what happened and what to do
        with pytest.raises(DataError, match=r"data/rows was being replaced when a tokenize was killed: run that"):
            data.find_dataset("rows")
    again = data.tokenize(str(new), name="rows", force=True)
    if killed_at != "published":
        assert again.resumed_documents == again.meta["documents"]["selected"]  # nothing tokenized twice
    clean = data.tokenize(str(new), name="clean")
    assert (again.path / "train.bin").read_bytes() == (clean.path / "train.bin").read_bytes()
    assert again.meta["splits"] == clean.meta["splits"]
    assert not [p.name for p in root.iterdir() if p.name.startswith(".rows.") and p.name != ".rows.lock"]
    assert sorted(p.name for p in (root / "rows").iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_a_dataset_in_use_on_windows_is_replaced_by_the_same_command_later(workspace, monkeypatch):
    """Windows cannot set data/NAME aside while a train or eval has its train.bin mapped: that was reported as
    "cannot write data/.NAME.partial (Access is denied)", which is not the cause, and the work is kept."""
    old, new = workspace / "old.jsonl", workspace / "new.jsonl"
    _write_jsonl(old, _docs(60))
    _write_jsonl(new, _docs(80))
    before = (data.tokenize(str(old), name="rows").path / "train.bin").read_bytes()
    real_replace = data.workspace.replace

    def in_use(src, dst):
        if src.name == "rows":
            raise PermissionError(13, "Access is denied", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(data.sys, "platform", "win32")
    monkeypatch.setattr(data.workspace, "replace", in_use)
    with pytest.raises(DataError, match=r"^data/rows is open in another program \(a `tinygpt train` or `eval` "
                                        r"reading it\?\), and Windows replaces no folder in use: when that ends, "
                                        r"rerun the same command, it continues where it stopped$"):
        data.tokenize(str(new), name="rows", force=True)
    assert (workspace / "data" / "rows" / "train.bin").read_bytes() == before
    monkeypatch.setattr(data.workspace, "replace", real_replace)
    again = data.tokenize(str(new), name="rows", force=True)
    assert again.resumed_documents == again.meta["documents"]["selected"]  # published, not tokenized again
    assert (again.path / "train.bin").read_bytes() == (data.tokenize(str(new), name="clean").path /
                                                        "train.bin").read_bytes()


def test_a_run_started_on_a_dataset_while_it_is_tokenized_again_keeps_it(workspace, monkeypatch):
    """QA: `tokenize --force` checked for runs training on the dataset at its start only; a `train` started a moment
    later trained on the old text, which the tokenize then replaced: the run could not resume. The finished dataset
    now waits, and the same command puts it in place once the run ends."""
    from types import SimpleNamespace

    from tinygpt_cli import inventory

    old, new = workspace / "old.jsonl", workspace / "new.jsonl"
    _write_jsonl(old, _docs(60))
    _write_jsonl(new, _docs(80))
    before = (data.tokenize(str(old), name="rows").path / "train.bin").read_bytes()
    asked = []

    def users(folder, meta=None):  # none at the tokenize's start; one training by the time it is done
        asked.append(folder)
        return [(SimpleNamespace(name="late", training=True), None)] if len(asked) > 1 else []

    monkeypatch.setattr(inventory, "dataset_users", users)
    with pytest.raises(DataError, match=r"^run late started training on data/rows while it was tokenized again, and "
                                        r"the new text would change under it: the new dataset is finished and waits; "
                                        r"once that run ends, rerun the same command, it continues where it stopped$"):
        data.tokenize(str(new), name="rows", force=True)
    assert (workspace / "data" / "rows" / "train.bin").read_bytes() == before
    monkeypatch.setattr(inventory, "dataset_users", lambda folder, meta=None: [])
    again = data.tokenize(str(new), name="rows", force=True)
    assert again.resumed_documents == again.meta["documents"]["selected"]  # published, not tokenized again


def test_train_waits_for_a_tokenize_of_its_dataset_under_way(with_shakespeare, workspace):
    """The other order: a train started while `tokenize --force` of its dataset runs waits for it, and trains on
    what it leaves."""
    import threading
    import time

    from tinygpt_cli import workspace as ws
    from tinygpt_cli.training import train

    taken, release = threading.Event(), threading.Event()

    def tokenizing():
        with ws.exclusive(ws.lock_of(workspace / "data" / "shakespeare"), "data/shakespeare"):
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=tokenizing)
    holder.start()
    taken.wait(10)
    timer = threading.Timer(1.5, release.set)
    timer.start()
    notes = []
    began = time.monotonic()
    try:
        train(tiny_config(max_steps=1, eval_interval=1000), run_name="waits",
              on_event=lambda event: notes.append(event.message or ""))
    finally:
        release.set()
        holder.join()
    assert time.monotonic() - began >= 1.4
    assert "data/shakespeare is being written by another tinygpt process (a tokenize, or a data rm): waiting for it " \
           "to end." in notes


def test_a_dataset_replaced_while_a_run_starts_is_not_trained_on(workspace, monkeypatch):
    """Review: a `tokenize --force` that looked for runs on the dataset before a starting run's config.yaml named it
    saw none and replaced it; the run trained on the text it had read, and could not resume. It is refused at its
    first step now, and leaves no run behind."""
    from tinygpt_cli import training
    from tinygpt_cli.errors import TrainingError

    old, new = workspace / "old.jsonl", workspace / "new.jsonl"
    _write_jsonl(old, _docs(60))
    _write_jsonl(new, _docs(80))
    data.tokenize(str(old), name="rows")
    real = training._Trainer._loop

    def replaced_first(self):
        data.tokenize(str(new), name="rows", force=True)
        return real(self)

    monkeypatch.setattr(training._Trainer, "_loop", replaced_first)
    with pytest.raises(TrainingError, match=r"data/rows was tokenized again while this run was starting, after it "
                                            r"had read the text: start it again to train on the new text"):
        training.train(tiny_config(max_steps=1, eval_interval=1000), run_name="r")
    assert not (workspace / "runs" / "r").exists()
    monkeypatch.setattr(training._Trainer, "_loop", real)
    assert training.train(tiny_config(max_steps=1, eval_interval=1000), run_name="r").steps == 1


def test_the_dataset_a_killed_publish_set_aside_comes_back(workspace):
    """Only the set-aside copy left (no new dataset waiting): the next tokenize of that name puts it back first."""
    old = workspace / "old.jsonl"
    _write_jsonl(old, _docs(60))
    first = data.tokenize(str(old), name="rows")
    before = (first.path / "train.bin").read_bytes()
    first.path.rename(first.path.with_name(".rows.old-12345"))
    other = workspace / "other.jsonl"
    _write_jsonl(other, _docs(70))
    with pytest.raises(DataError, match="already holds a dataset tokenized from"):  # it is back, and guarded
        data.tokenize(str(other), name="rows")
    assert (first.path / "train.bin").read_bytes() == before
    assert not (workspace / "data" / ".rows.old-12345").exists()


def test_a_bare_name_means_the_workspace_dataset_before_a_folder_here(with_shakespeare, workspace):
    """A folder of the same name in the current directory was taken first (a half-copied dataset, a user's own
    "shakespeare/"), where runs take a bare name as the workspace's (code review); ./NAME still names the folder."""
    here = workspace.parent / "shakespeare"  # the workspace fixture works in the folder above its home
    here.mkdir()
    (here / "meta.json").write_text("{}")
    assert data.find_dataset("shakespeare").path == workspace / "data" / "shakespeare"
    with pytest.raises(DataError):
        data.find_dataset("./shakespeare")
    shutil.rmtree(workspace / "data" / "shakespeare")
    with pytest.raises(DataError):  # no dataset of that name: the folder here, as a path, is what is meant
        data.find_dataset("shakespeare")
