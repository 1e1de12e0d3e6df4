import json

import numpy as np
import pytest

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


def test_deterministic_whatever_the_workers(workspace):
    path = workspace / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(200)))
    first = data.tokenize(str(path), name="a", workers=1, seed=3, fraction=0.5)
    second = data.tokenize(str(path), name="b", workers=2, seed=3, fraction=0.5)
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


def test_missing_and_empty_inputs(workspace):
    with pytest.raises(DataError, match="does not exist"):
        data.tokenize(str(workspace / "nope"))
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
