"""GPT-2 BPE (r50k_base) built offline from the ranks shipped in the package.

The ranks file is verified by sha256 at load, so the ids are those of `tiktoken.get_encoding("gpt2")`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources

from tinygpt_cli.errors import DataError

TOKENIZER_NAME = "gpt2"
RANKS_FILE = "r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
VOCAB_SIZE = 50257  # real GPT-2 vocabulary; the model pads its embedding to 50304
# tiktoken_ext.openai_public.r50k_pat_str
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def ranks_bytes() -> bytes:
    """The raw bytes of the bundled ranks file."""
    return resources.files("tinygpt_cli").joinpath("assets", RANKS_FILE).read_bytes()


@functools.lru_cache(maxsize=1)
def load_ranks() -> dict[bytes, int]:
    """token bytes -> rank, after checking the file's sha256."""
    raw = ranks_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != RANKS_SHA256 and b"\r\n" in raw:  # an install built from a checkout with CRLF line ends
        raw = raw.replace(b"\r\n", b"\n")
        digest = hashlib.sha256(raw).hexdigest()
    if digest != RANKS_SHA256:
        raise DataError(
            f"the bundled GPT-2 ranks file is corrupted (sha256 {digest[:12]}…): reinstall tinygpt"
        )
    ranks: dict[bytes, int] = {}
    for line in raw.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The GPT-2 `tiktoken.Encoding`, identical to `tiktoken.get_encoding("gpt2")`, with no network."""
    import tiktoken

    return tiktoken.Encoding(
        name=TOKENIZER_NAME,
        pat_str=PAT_STR,
        mergeable_ranks=load_ranks(),
        special_tokens={EOT_TOKEN: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )
