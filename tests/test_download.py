"""`tinygpt download` (issue #3), offline: local parquet/jsonl/text shards stand in for the hub through the same
`datasets` streaming loaders, and the hub path itself is exercised up to the network call."""

import json
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from conftest import assert_one_line_error
from tinygpt_cli import data, sources
from tinygpt_cli import download as dl
from tinygpt_cli.cli import app
from tinygpt_cli.errors import DataError

runner = CliRunner()
SHARDS, ROWS = 4, 50


_one_line_error = assert_one_line_error


def _row(shard: int, row: int) -> str:
    return f"Shard {shard}, document {row}: " + "the quick brown fox jumps over the lazy dog. " * (row % 4 + 1)


@pytest.fixture
def fixture_source(tmp_path, monkeypatch):
    """A named source of 4 local parquet shards x 50 rows (plus an unused column), read by `datasets`."""
    files = []
    for shard in range(SHARDS):
        path = tmp_path / "hub" / f"train-{shard:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"id": list(range(ROWS)), "text": [_row(shard, r) for r in range(ROWS)]}), path)
        files.append(str(path))
    entry = sources.NamedSource("fixture", "a test corpus", builder="parquet", data_files=tuple(files),
                                license="CC0-1.0", documents=SHARDS * ROWS, text_bytes=SHARDS * ROWS * 100)
    monkeypatch.setitem(sources.REGISTRY, "fixture", entry)
    return entry


def _texts(result) -> list[str]:
    return [t for f in result.record["files"] for t in pq.read_table(result.path / f["file"])["text"].to_pylist()]


def _shards_opened(monkeypatch) -> list[int]:
    opened: list[int] = []
    original = dl._shard_stream

    def spy(dataset, shards, index):
        opened.append(index)
        return original(dataset, shards, index)

    monkeypatch.setattr(dl, "_shard_stream", spy)
    return opened


def test_list_shows_the_named_sources(workspace):
    result = runner.invoke(app, ["download", "--list"])
    assert result.exit_code == 0, result.output
    for name, where in [("openwebtext", "Skylion007/openwebtext"), ("tinystories", "roneneldan/TinyStories"),
                        ("fineweb-edu", "HuggingFaceFW/fineweb-edu (sample-10BT)"),
                        ("wikitext-103", "Salesforce/wikitext (wikitext-103-raw-v1)"), ("shakespeare", "embedded")]:
        assert name in result.stdout and where in result.stdout
    assert "39.77 GB" in result.stdout and "CC0-1.0" in result.stdout
    rows = json.loads(runner.invoke(app, ["download", "--list", "--json"]).stdout)
    assert {r["name"] for r in rows} >= {"openwebtext", "tinystories", "fineweb-edu", "wikitext-103", "shakespeare"}
    assert all(r["license"] and r["documents"] and r["text_bytes"] for r in rows)


def test_list_shows_downloads_of_other_hub_datasets_too(workspace, fixture_source, monkeypatch):
    """QA: `download --list`, which the README says shows what is downloaded, listed the named corpora only: a
    `download owner/name` (which `tokenize` takes, and `data rm --download` deletes) was not in it."""
    dl.download("fixture", max_docs=50)
    monkeypatch.delitem(sources.REGISTRY, "fixture")  # as `download owner/name` of a dataset not named here
    rows = {row["name"]: row for row in json.loads(runner.invoke(app, ["download", "--list", "--json"]).stdout)}
    assert rows["fixture"]["status"] == "downloaded: 50 docs" and rows["fixture"]["documents"] is None
    shown = runner.invoke(app, ["download", "--list"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    line = next(line for line in shown.stdout.splitlines() if "fixture" in line)
    assert re.search(r"fixture .*│ +\? │ +\? │ +\? │ CC0-1.0 +│ downloaded: 50 docs", line), line


def test_offline_hub_fails_fast_in_one_line(workspace):
    started = time.perf_counter()
    result = runner.invoke(app, ["download"])  # openwebtext, with HF_HUB_OFFLINE=1 (conftest)
    _one_line_error(result, "cannot download openwebtext (Skylion007/openwebtext)")
    assert "tinygpt tokenize PATH" in result.stderr and "HF_HUB_OFFLINE" in result.stderr
    assert time.perf_counter() - started < 30  # a retry storm takes minutes; slack for a loaded machine
    assert not (workspace / "data").exists()


@pytest.mark.parametrize("hub", ["refuses", "never answers"])
def test_unreachable_hub_fails_fast_in_one_line(workspace, monkeypatch, hub):
    import socket

    silent = socket.socket()  # accepts connections (the kernel's backlog) and never says a word
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    endpoint = "http://127.0.0.1:9" if hub == "refuses" else f"http://127.0.0.1:{silent.getsockname()[1]}"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("TINYGPT_HUB_TIMEOUT", "1")
    started = time.perf_counter()
    try:
        result = runner.invoke(app, ["download", "tinystories", "--max-docs", "10"])
    finally:
        silent.close()
    _one_line_error(result, f"no answer from the Hugging Face hub at {endpoint}")
    assert "roneneldan/TinyStories" in result.stderr and "tinygpt tokenize PATH" in result.stderr
    assert time.perf_counter() - started < 30  # a retry storm takes minutes; slack for a loaded machine
    assert not (workspace / "data").exists()


def test_the_hub_probe_trusts_what_the_hub_client_trusts(monkeypatch):
    """A python.org Mac Python has no certificates until the user installs them: the probe failed the TLS check
    and said the hub did not answer, where `datasets`, with certifi's certificates, would have downloaded (audit)."""
    import ssl
    import urllib.error
    import urllib.request

    seen = []

    def refused(request, timeout, context):
        seen.append(context)
        raise urllib.error.URLError(ssl.SSLCertVerificationError(1, "certificate verify failed"))

    monkeypatch.setattr(urllib.request, "urlopen", refused)
    assert dl.hub_silence("roneneldan/TinyStories") is None  # an answer, which `datasets` goes on to judge
    assert seen[0].cert_store_stats()["x509_ca"] > 0  # certifi's bundle, not an empty system store

    for silence in (ConnectionRefusedError(111, "Connection refused"),
                    ssl.SSLEOFError(8, "EOF occurred in violation of protocol")):  # a middlebox that cuts TLS

        def silent(request, timeout, context, silence=silence):
            raise urllib.error.URLError(silence)

        monkeypatch.setattr(urllib.request, "urlopen", silent)
        assert "no answer from the Hugging Face hub" in dl.hub_silence("roneneldan/TinyStories")


@pytest.mark.parametrize("value", ["abc", "-1", "0", "inf", "nan"])
def test_a_bad_hub_timeout_is_one_line(workspace, monkeypatch, value):
    """It was a traceback (float('abc'), then urllib's 'Timeout value out of range') (audit)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setenv("TINYGPT_HUB_TIMEOUT", value)
    result = runner.invoke(app, ["download", "tinystories", "--max-docs", "10"])
    _one_line_error(result, f"TINYGPT_HUB_TIMEOUT must be a number of seconds above 0 (got {value!r})")
    monkeypatch.setenv("TINYGPT_HUB_TIMEOUT", " ")
    assert dl.hub_timeout() == dl.DEFAULT_HUB_TIMEOUT_S


def test_the_hub_path_runs_up_to_the_network_call(workspace, monkeypatch):
    """Past tinygpt's own check, the real `datasets` hub call still ends in one clear line, not a retry storm."""
    monkeypatch.setattr(dl, "check_hub", lambda entry: None)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"cannot open roneneldan/TinyStories with `datasets` \(.+\); fetch its files"):
        dl.download("tinystories", max_docs=10)
    assert time.perf_counter() - started < 60
    assert not (workspace / "data" / "raw" / "tinystories").exists()


def test_fraction_streams_only_the_shards_it_needs(workspace, fixture_source, monkeypatch):
    opened = _shards_opened(monkeypatch)
    events = []
    result = dl.download("fixture", fraction=0.25, seed=1, on_event=events.append)
    order = result.record["shards"]["order"]
    assert opened == [order[0]] and sorted(order) == list(range(SHARDS))
    assert _texts(result) == [_row(order[0], r) for r in range(ROWS)]
    selection = result.record["selection"]
    assert selection["fraction"] == 0.25 and selection["seed"] == 1 and selection["target_rows"] == 50
    assert "splitmix64(seed, 3, shard)" in selection["rule"] and result.record["complete"]
    assert result.record["license"] == "CC0-1.0" and result.documents == 50
    plan = next(e for e in events if e.kind == "plan")
    assert plan.target_documents == 50 and plan.shards == SHARDS and events[-1].kind == "done"
    orders = {tuple(dl.download("fixture", fraction=0.25, seed=s, force=True).record["shards"]["order"])
              for s in range(6)}
    assert len(orders) > 1  # the seed decides which part is fetched


def test_max_docs_crosses_shards_and_is_deterministic(workspace, fixture_source, monkeypatch):
    monkeypatch.setattr(dl, "PIECE_DOCUMENTS", 30)
    first = dl.download("fixture", max_docs=70, seed=4)
    order = first.record["shards"]["order"]
    assert _texts(first) == [_row(order[0], r) for r in range(ROWS)] + [_row(order[1], r) for r in range(20)]
    assert [f["documents"] for f in first.record["files"]] == [30, 30, 10]
    texts = _texts(first)
    again = dl.download("fixture", max_docs=70, seed=4, force=True)
    assert _texts(again) == texts


def test_interrupted_download_continues_where_it_stopped(workspace, fixture_source, monkeypatch, tmp_path):
    monkeypatch.setattr(dl, "PIECE_DOCUMENTS", 15)
    original = dl._write_part
    calls = []

    def interrupting_write(path, texts):
        calls.append(path.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return original(path, texts)

    monkeypatch.setattr(dl, "_write_part", interrupting_write)
    result = runner.invoke(app, ["download", "fixture", "--max-docs", "120", "--seed", "2"])
    assert result.exit_code == 130 and "Interrupted: run the same command again" in result.stderr
    record = json.loads((workspace / "data" / "raw" / "fixture" / "download.json").read_text())
    assert not record["complete"] and record["progress"]["documents"] == 60 and len(record["files"]) == 4
    _one_line_error(runner.invoke(app, ["tokenize", "fixture"]), "the download of fixture is not finished")
    monkeypatch.setattr(dl, "_write_part", original)
    killed_part = workspace / "data" / "raw" / "fixture" / ".part-00004.parquet.tmp-4242"  # a SIGKILL mid-part
    killed_part.write_bytes(b"\0" * 1000)
    opened = _shards_opened(monkeypatch)
    resumed = dl.download("fixture", max_docs=120, seed=2)
    assert not killed_part.exists()
    order = resumed.record["shards"]["order"]
    assert opened == [order[1], order[2]]  # shard order[0] was done; order[1] continues after its 10th row
    assert resumed.fetched_documents == 60 and resumed.documents == 120
    monkeypatch.setenv("TINYGPT_HOME", str(tmp_path / "other"))
    assert _texts(resumed) == _texts(dl.download("fixture", max_docs=120, seed=2))


def test_a_full_disk_mid_download_says_to_free_space(workspace, fixture_source, monkeypatch):
    """A write that failed for a full disk was reported as the network stopping: "rerun to continue", which fails
    again the same way (code review). The advice now follows the errno, and the rerun still continues."""
    import errno

    monkeypatch.setattr(dl, "PIECE_DOCUMENTS", 15)
    original, calls = dl._write_part, []

    def full_on_the_third(path, texts):
        calls.append(path.name)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(path, texts)

    monkeypatch.setattr(dl, "_write_part", full_on_the_third)
    result = runner.invoke(app, ["download", "fixture", "--max-docs", "120", "--seed", "2"])
    _one_line_error(result, "No space left on device")
    assert "free some space" in result.stderr and "tinygpt download fixture` to continue" in result.stderr


def test_finished_download_is_not_fetched_again(workspace, fixture_source, monkeypatch):
    first = dl.download("fixture", fraction=0.5)
    monkeypatch.setattr(dl, "_open_stream", lambda entry: pytest.fail("fetched again"))
    again = runner.invoke(app, ["download", "fixture", "--fraction", "0.5"])
    assert again.exit_code == 0, again.output
    assert "Already downloaded: fixture, 100 documents" in again.stdout
    smaller = runner.invoke(app, ["download", "fixture", "--fraction", "0.25"])
    assert smaller.exit_code == 0 and "more than asked" in smaller.stderr
    assert _texts(dl.download("fixture", fraction=0.5)) == _texts(first)


def test_a_larger_fraction_extends_the_download(workspace, fixture_source):
    small = dl.download("fixture", fraction=0.25, seed=3)
    files = [(f["file"], (small.path / f["file"]).read_bytes()) for f in small.record["files"]]
    large = dl.download("fixture", fraction=0.75, seed=3)
    assert large.fetched_documents == 100 and large.documents == 150
    assert all((large.path / name).read_bytes() == content for name, content in files)  # a prefix, untouched
    assert _texts(large)[:50] == _texts(small)


def test_other_settings_need_force(workspace, fixture_source):
    dl.download("fixture", max_docs=10, seed=0)
    _one_line_error(runner.invoke(app, ["download", "fixture", "--max-docs", "10", "--seed", "1"]),
                    "holds a download with other settings")
    result = runner.invoke(app, ["download", "fixture", "--max-docs", "10", "--seed", "1", "--force"])
    assert result.exit_code == 0, result.output


def test_tokenize_takes_the_last_download(workspace, fixture_source):
    assert runner.invoke(app, ["download", "fixture", "--fraction", "0.5"]).exit_code == 0
    result = runner.invoke(app, ["tokenize"])
    assert result.exit_code == 0, result.output
    assert "No SOURCE given: tokenizing the last download, fixture (data/raw/fixture)" in result.stderr
    assert "Tokenizing the download fixture (data/raw/fixture: 50% of parquet files)" in result.stderr
    meta = json.loads((workspace / "data" / "fixture" / "meta.json").read_text())
    assert meta["source"]["kind"] == "download" and meta["documents"]["in_source"] == 100
    assert meta["source"]["download"]["selection"]["fraction"] == 0.5
    assert meta["source"]["download"]["license"] == "CC0-1.0"
    assert data.find_dataset(None).name == "fixture"
    # `download shakespeare` (no network) makes the embedded corpus the default again
    embedded = runner.invoke(app, ["download", "shakespeare"])
    assert embedded.exit_code == 0 and "embedded in tinygpt" in embedded.stdout
    assert sources.default_source_spec()[0] == "shakespeare"


@pytest.mark.parametrize("builder", ["json", "text"])
def test_jsonl_and_text_shards_through_the_same_loaders(workspace, tmp_path, monkeypatch, builder):
    files = []
    for shard in range(2):
        path = tmp_path / f"part{shard}.{'jsonl' if builder == 'json' else 'txt'}"
        rows = [_row(shard, r) for r in range(10)]
        path.write_text("".join((json.dumps({"text": r}) if builder == "json" else r) + "\n" for r in rows))
        files.append(str(path))
    entry = sources.NamedSource("local", "test", builder=builder, data_files=tuple(files), documents=20)
    monkeypatch.setitem(sources.REGISTRY, "local", entry)
    result = dl.download("local", max_docs=15, seed=0)
    order = result.record["shards"]["order"]
    assert _texts(result) == [_row(order[0], r) for r in range(10)] + [_row(order[1], r) for r in range(5)]


def test_wikitext_lines_are_joined_into_articles(workspace, tmp_path, monkeypatch):
    lines = ["", " = First = \n", "", " Intro text . \n", " = = Part = = \n", " More . \n",
             " = Second = \n", " Body . \n", " = Third = \n", " End . \n"]
    path = tmp_path / "wiki.parquet"
    pq.write_table(pa.table({"text": lines}), path)
    entry = sources.NamedSource("wiki", "test", builder="parquet", data_files=(str(path),), documents=len(lines),
                                join="wikitext")
    monkeypatch.setitem(sources.REGISTRY, "wiki", entry)
    monkeypatch.setattr(dl, "PIECE_DOCUMENTS", 1)
    original = dl._write_part
    calls = []

    def interrupting_write(path, texts):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(path, texts)

    monkeypatch.setattr(dl, "_write_part", interrupting_write)
    with pytest.raises(KeyboardInterrupt):
        dl.download("wiki")
    monkeypatch.setattr(dl, "_write_part", original)
    result = dl.download("wiki")  # resumes at an article boundary
    assert _texts(result) == [" = First = \n\n Intro text . \n = = Part = = \n More . \n",
                              " = Second = \n Body . \n", " = Third = \n End . \n"]
    assert result.record["progress"]["rows"] == len(lines)


def test_not_enough_disk_is_refused_before_fetching(workspace, fixture_source, monkeypatch):
    from tinygpt_cli import workspace as ws

    monkeypatch.setattr(ws, "free_bytes", lambda path: 1000)  # the fixture's text is ~20 KB, a third on disk
    opened = _shards_opened(monkeypatch)
    with pytest.raises(DataError, match=r"needs about 6.7 kB of disk, 1.0 kB free"):
        dl.download("fixture")
    assert opened == [] and not list((workspace / "data" / "raw" / "fixture").glob("*.parquet"))


def test_download_bad_names_are_one_line_errors(workspace, tmp_path):
    _one_line_error(runner.invoke(app, ["download", "nosuch"]), "unknown dataset 'nosuch': pick one of openwebtext")
    for name in ("../x", "owner/", "/x", "a b/c", "o/-x"):  # QA: the first two went to the hub, as a URL
        _one_line_error(runner.invoke(app, ["download", name]), f"unknown dataset {name!r}: pick one of")
    local = tmp_path / "corpus.jsonl"
    local.write_text('{"text": "hi"}\n')
    _one_line_error(runner.invoke(app, ["download", str(local)]), "is a local path: local files need no download")
    _one_line_error(runner.invoke(app, ["download", "--fraction", "1.5"]), "--fraction must be in (0, 1]")
    _one_line_error(runner.invoke(app, ["download", "--seed", str(2**64)]), "--seed must be 0 to")
    _one_line_error(runner.invoke(app, ["download", "--max-docs", "0"]), "--max-docs must be at least 1")
    assert not (workspace / "data").exists()


@pytest.mark.parametrize("extra", [[], ["--text-field", "id"], ["crash"]])
def test_a_download_that_stops_mid_file_exits(workspace, tmp_path, extra):
    """Audit: a download that left its stream mid-file (a small --max-docs, or an error) aborted at exit
    ("terminate called without an active exception", 134) or hung there for good: Arrow's reading threads wait
    for the interpreter's lock during its teardown. The command exits with its own code, at once."""
    import os
    import subprocess
    import sys

    files = tmp_path / "rowgroups"
    files.mkdir()
    text = [f"document {row} " + "lorem ipsum dolor sit amet " * 75 for row in range(5000)]
    pq.write_table(pa.table({"id": list(range(5000)), "text": text}), files / "train-0.parquet", row_group_size=1000)
    script = tmp_path / "download.py"
    script.write_text(
        "import sys\n"
        "from tinygpt_cli import cli, sources\n"
        f"sources.REGISTRY['rg'] = sources.NamedSource('rg', 'row groups', builder='parquet', data_files=("
        f"{str(files / 'train-0.parquet')!r},), license='CC0-1.0', documents=5000, text_bytes=10_000_000)\n"
        "if sys.argv[-1] == 'crash':  # an error of ours, not a TinyGPTError (review)\n"
        "    from tinygpt_cli import download\n"
        "    def crash(*args, **kwargs): raise RuntimeError('a bug')\n"
        "    download._write_part = crash\n"
        "    sys.argv.pop()\n"
        "sys.argv = ['tinygpt', 'download', 'rg', *sys.argv[1:]]\n"
        "cli.main()\n")
    done = subprocess.run([sys.executable, str(script), "--max-docs", "10", *extra], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "TINYGPT_HOME": str(workspace)})
    assert done.returncode == (1 if extra else 0), done.stderr[-2000:]
    assert "terminate called" not in done.stderr
    if extra == ["crash"]:
        assert "RuntimeError: a bug" in done.stderr  # its traceback, then out
    elif extra:
        assert done.stderr.strip().splitlines()[-1].startswith("error: column 'id'")
    else:
        assert (workspace / "data" / "raw" / "rg" / "download.json").is_file()


def test_data_rm_download_deletes_a_download_and_names_what_was_made_from_it(workspace, fixture_source):
    """A 40 GB download outlives its tokenizing: `tinygpt data rm --download NAME` deletes it (data rm of a dataset
    never touches data/raw, and said to delete it by hand)."""
    from tinygpt_cli import workspace as ws

    assert runner.invoke(app, ["download", "fixture"]).exit_code == 0
    assert runner.invoke(app, ["tokenize", "fixture", "--name", "fx"]).exit_code == 0
    folder = workspace / "data" / "raw" / "fixture"
    with ws.exclusive(ws.lock_of(folder), "data/raw/fixture"):  # what a download of it holds
        _one_line_error(runner.invoke(app, ["data", "rm", "--download", "fixture", "--yes"]),
                        "data/raw/fixture is being downloaded now")
    _one_line_error(runner.invoke(app, ["data", "rm", "--download", "nosuch", "--yes"]),
                    "no download named 'nosuch' (here: fixture)")
    _one_line_error(runner.invoke(app, ["data", "rm", "raw"]), "`tinygpt data rm --download NAME` deletes one")
    result = runner.invoke(app, ["data", "rm", "--download", "fixture", "--yes"])
    assert result.exit_code == 0, result.output
    assert "data/raw/fixture: complete download, " in result.stderr
    assert "data/fx was tokenized from it: it keeps working, but tokenizing again needs the download again" in \
        result.stderr
    assert not folder.exists() and (workspace / "data" / "fx" / "meta.json").is_file()
    assert [p.name for p in folder.parent.iterdir()] == []
