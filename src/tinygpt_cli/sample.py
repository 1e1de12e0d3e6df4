"""Generation: a preallocated KV cache, a pure `sample_next_token`, and `generate` yielding token ids.

`generate` works in token ids only. Turning ids into text is the caller's side: `TextStream` releases text that is
safe to show (whole UTF-8 characters, never the start of a stop string) and `sample_text` puts the two together
for the CLI and for notebooks.

How a sample is produced: the prompt is prefilled in one pass (once, however many samples are drawn), then one
token per step reads the cached keys and values. Only the last position goes through the 50304-wide head. When the
context window is full it jumps: the newest half-window is re-encoded in one pass and decoding goes on, so
`max_new_tokens` may exceed the context. The uncached path (`use_cache=False`) re-runs the whole window at every
step with the same window rule, which is why cached and uncached greedy decoding agree token for token.
"""

from __future__ import annotations

import codecs
import copy
import itertools
import math
import operator
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tinygpt_cli.config import MAX_TEMPERATURE, kind_problem, seed_problem
from tinygpt_cli.errors import GenerationError, allocation_failed, compile_failure, described
from tinygpt_cli.model import GPT
from tinygpt_cli.plan import cgroup_memory
from tinygpt_cli.sources import conversion_advice, decode_text
from tinygpt_cli.tokenizer import EOT_ID, EOT_TOKEN, VOCAB_SIZE

if TYPE_CHECKING:
    from tinygpt_cli.checkpoint import LoadedCheckpoint
    from tinygpt_cli.kernels import DrawScratch


# ----------------------------------------------------------------------------------------------- the cache
class KVCache:
    """Keys and values of every layer for up to `max_tokens` positions, allocated once.

    k[layer], v[layer]: (B, n_head, max_tokens, head_dim). `pos` counts the positions filled so far.
    A call with T new tokens attends over the filled prefix only (T == 1: every cached key; T > 1 after a prefix:
    a causal mask shifted by `pos`), so a step costs what has been generated, not the cache's size: the fast way
    in eager mode. `StaticDecodeView` reads the same buffers with shapes that never change, for torch.compile.
    """

    def __init__(self, model: GPT, batch_size: int, max_tokens: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        max_tokens = max_tokens or cfg.block_size
        if max_tokens > cfg.block_size:
            raise ValueError(f"a cache of {max_tokens} positions exceeds block_size {cfg.block_size}")
        param = next(model.parameters())
        shape = (batch_size, cfg.n_head, max_tokens, cfg.n_embd // cfg.n_head)
        dtype = dtype or param.dtype
        # never read before written (see update); StaticDecodeView, which does read empty slots, zeroes them
        self.k = [torch.empty(shape, dtype=dtype, device=param.device) for _ in range(cfg.n_layer)]
        self.v = [torch.empty(shape, dtype=dtype, device=param.device) for _ in range(cfg.n_layer)]
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.pos = 0

    def positions(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        if self.pos + n_tokens > self.max_tokens:
            raise ValueError(f"sequence of {self.pos + n_tokens} tokens exceeds block_size {self.max_tokens}")
        return torch.arange(self.pos, self.pos + n_tokens, dtype=torch.long, device=device)  # (T,)

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B or 1, nh, T, hd) at positions pos..pos+T; a batch of 1 fills every row (a shared prompt).

        Returns what attention needs: keys and values (B, nh, S, hd) and a (T, S) mask or None (see KVCacheLike).
        """
        start, end = self.pos, self.pos + k.size(2)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        if start == 0:
            return k, v, None  # nothing cached before: attend causally over the new keys themselves
        keys, values = self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        if k.size(2) == 1:
            return keys, values, None
        # query i sits at absolute position start + i and may see keys 0 .. start + i
        rows = torch.arange(start, end, device=k.device)[:, None]
        return keys, values, torch.arange(end, device=k.device)[None, :] <= rows  # (T, end)

    def advance(self, n_tokens: int) -> None:
        self.pos += n_tokens

    def reset(self) -> None:
        self.pos = 0


def mark_static(tensor: torch.Tensor) -> None:
    """Tell torch.compile that `tensor` keeps its address: CUDA graphs then read and write it in place instead of
    copying it in at every replay. Unguarded, so a new cache of the same shapes reuses the compiled step."""
    torch._dynamo.mark_static_address(tensor, guard=False)


class StaticDecodeView:
    """The buffers of a `KVCache` as a one-token decode step with static shapes sees them.

    The step writes its key and value at the position held in the device tensor `input_pos` (1,) and attends over
    the whole buffer with a mask of the filled slots. Every shape and every address is the same at every step, so
    torch.compile captures the step once and CUDA graphs replay it. Nothing here reads or writes a Python number:
    the owner moves `input_pos` before each step and counts `KVCache.pos` itself (`advance` is a no-op).
    """

    def __init__(self, cache: KVCache) -> None:
        self.k, self.v = cache.k, cache.v
        for buffer in (*self.k, *self.v):  # masked slots get weight 0, and 0 * NaN from stale memory is NaN
            buffer[:, :, cache.pos :].zero_()
        device = cache.k[0].device
        self.input_pos = torch.zeros(1, dtype=torch.long, device=device)  # (1,)
        self.key_positions = torch.arange(cache.max_tokens, device=device)  # (S,)
        for tensor in (*self.k, *self.v, self.input_pos, self.key_positions):
            mark_static(tensor)

    def positions(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        return self.input_pos  # (1,); a static step always takes one token

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        self.k[layer].index_copy_(2, self.input_pos, k)
        self.v[layer].index_copy_(2, self.input_pos, v)
        mask = self.key_positions[None, :] <= self.input_pos[:, None]  # (1, S): the filled slots
        return self.k[layer], self.v[layer], mask

    def advance(self, n_tokens: int) -> None:
        pass


# ----------------------------------------------------------------------------------------------- sampling
def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty: the logit of every token already in the text is divided by `penalty` when
    positive and multiplied by it when negative. logits (B, V) float, seen (B, V) bool -> (B, V).
    An extreme penalty saturates at float32's largest values instead of overflowing; NaN and ±inf stay."""
    if penalty == 1.0:
        return logits
    logits = logits.float()
    largest = torch.finfo(torch.float32).max
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    penalised = torch.where(torch.isfinite(logits), penalised.clamp(-largest, largest), penalised)  # inf stays
    return torch.where(seen[:, : logits.size(1)], penalised, logits)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    uniform: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pick the next token for each row of `logits` (B, V) -> (B,) int64; -1 for a row whose logits are not finite
    (NaN, or overflowing at a vanishing temperature), which `generate` turns into an error at its next flush.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters (top-k keeps every token tied with the k-th,
    as masking the vocabulary does). Pure: no state but `generator`, from which each row takes one uniform number
    (or `uniform` (B, 1), numbers drawn beforehand: then nothing here waits for the host or draws, as a CUDA graph
    needs).
    The filters keep a short list of candidates where they can and the draw is an inverse-CDF lookup (float64):
    on CPU a sixth of the cost of a multinomial over the whole vocabulary (2.1 -> 0.3 ms a token with the
    defaults, top-k 200), the same distribution.
    """
    logits = logits[:, :VOCAB_SIZE].float()  # the padded ids past GPT-2's vocabulary are never sampled
    if temperature == 0:
        if logits.device.type == "cpu":  # torch's CPU argmax takes 130 us over 50,257 logits here, NumPy's 7
            rows = logits.detach().numpy()
            best = rows.argmax(axis=-1).astype(np.int64)  # as torch: the first largest; a NaN counts as largest
            best[~np.isfinite(rows[np.arange(len(best)), best])] = -1
            return torch.from_numpy(best)
        index = logits.argmax(dim=-1, keepdim=True)
        return index.masked_fill(~torch.isfinite(logits.gather(-1, index)), -1).squeeze(-1)
    # shifted so that the largest is 0: a tiny temperature cannot overflow (it tends to greedy; one that is 0 in
    # float32 too makes the rest -inf, and the largest stays 0 rather than 0 / 0); NaN stays NaN
    shifted = logits - logits.amax(dim=-1, keepdim=True)
    scaled = torch.where(shifted == 0, shifted, shifted / temperature)
    ids, candidates = _candidates(scaled, top_k, top_p)
    probs = torch.softmax(candidates, dim=-1)  # (B, n)
    if uniform is None:
        rng_device = generator.device if generator is not None else probs.device
        uniform = torch.rand((probs.size(0), 1), generator=generator, device=rng_device,
                             dtype=_uniform_dtype(rng_device, probs.device))
    pick = draw_from(probs, uniform.to(probs.device))  # (B, 1)
    token = pick if ids is None else ids.gather(-1, pick.clamp(min=0))
    return token.masked_fill(pick < 0, -1).squeeze(-1)


def _uniform_dtype(*devices: torch.device) -> torch.dtype:
    return torch.float32 if any(d.type == "mps" for d in devices) else torch.float64  # MPS has no float64


NUCLEUS_SHORTLIST = 1024  # top-p alone first looks for its nucleus among this many of the likeliest tokens
TIE_ROOM = 64  # top-k's candidates hold this many more than k, for tokens tied with the k-th
# The short lists of candidates on CPU (below). Tests turn them off to sample on CPU as on a GPU, where the fused
# draw (`kernels.draw_token`) samples the same way.
CPU_SHORTLISTS = True


def _candidates(logits: torch.Tensor, top_k: int, top_p: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The tokens the filters keep: (ids (B, n) or None for the whole vocabulary, their logits (B, n)).

    Removed tokens get -inf. top-k leaves the k likeliest and every token tied with the k-th, then top-p the
    smallest prefix of them (likeliest first) whose probability reaches p; the token that crosses p stays.
    On CPU top-k works on its k + `TIE_ROOM` likeliest tokens (the whole vocabulary is masked instead when the ties
    go past them), and top-p alone looks for the nucleus among the `NUCLEUS_SHORTLIST` likeliest, sorting
    everything only when they hold less than p. Elsewhere the whole vocabulary is masked and sorted: a GPU does
    that in microseconds, and checking would make the host wait for the device at every token.
    """
    vocab = logits.size(-1)
    on_cpu = logits.device.type == "cpu" and CPU_SHORTLISTS
    ids = None
    if top_k and top_k < vocab:
        if on_cpu and top_k + TIE_ROOM < vocab:
            values, order = torch.topk(logits, top_k + TIE_ROOM, dim=-1)  # sorted, likeliest first
            kth = values[:, top_k - 1 : top_k]
            if bool((values[:, -1:] < kth).all()):  # no tie reaches past the candidates
                ids, logits = order, values.masked_fill(values < kth, float("-inf"))
        if ids is None:
            kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p >= 1.0:
        return ids, logits
    if ids is not None:  # top-k's candidates, sorted
        probs = torch.softmax(logits, dim=-1)
    else:
        full = torch.softmax(logits, dim=-1)
        shortlist = on_cpu and vocab > NUCLEUS_SHORTLIST
        if shortlist:
            probs, ids = torch.topk(full, NUCLEUS_SHORTLIST, dim=-1)
        if not shortlist or not bool((probs.sum(dim=-1) >= top_p).all()):  # else the nucleus is wider
            probs, ids = torch.sort(full, descending=True, dim=-1)
        logits = logits.gather(-1, ids)
    beyond = probs.cumsum(dim=-1) - probs >= top_p  # the mass before this token already reaches p
    return ids, logits.masked_fill(beyond, float("-inf"))


def draw_from(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: for each row of `probs` (B, n) and number in [0, 1) of `uniform` (B, 1), the index
    (B, 1) whose slice of the cumulative sum holds uniform × total; -1 where the row is not finite. The sum takes
    `uniform`'s dtype, float64 where the device has it, so a token of probability 1e-9 keeps its slice beside
    others near 1; a zero-probability index is never chosen, also where rounding puts the target at the very top
    of the sum (then the last index with mass is)."""
    cdf = probs.to(uniform.dtype).cumsum(dim=-1)  # (B, n), non-decreasing
    total = cdf[:, -1:]
    index = torch.searchsorted(cdf, (uniform * total).contiguous(), right=True)
    last_with_mass = torch.searchsorted(cdf, total.contiguous(), right=False)
    index = torch.minimum(index, last_with_mass).clamp(max=probs.size(-1) - 1)
    return index.masked_fill(~torch.isfinite(total), -1)


def check_settings(
    max_new_tokens: int, temperature: float, top_k: int, top_p: float, repetition_penalty: float, num_samples: int,
    seed: int | None = None,
) -> None:
    """Raise GenerationError naming the flag for a value that cannot work."""
    for name, value, whole in (("--max-new-tokens", max_new_tokens, True), ("--temperature", temperature, False),
                               ("--top-k", top_k, True), ("--top-p", top_p, False),
                               ("--repetition-penalty", repetition_penalty, False),
                               ("--num-samples", num_samples, True)):
        if problem := kind_problem(name, value, whole):
            raise GenerationError(problem)
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    if math.isnan(temperature):
        raise GenerationError("--temperature must be a number: 0 (greedy) or more (got nan)")
    if not temperature >= 0:
        raise GenerationError(f"--temperature must be 0 (greedy) or more (got {temperature})")
    if not temperature <= MAX_TEMPERATURE:  # past it every logit scales to a tie and top-k would keep them all
        raise GenerationError(f"--temperature must be at most {MAX_TEMPERATURE:g} (got {temperature})")
    if seed is not None and (problem := seed_problem("--seed", seed)):
        raise GenerationError(problem)
    if top_k < 0:
        raise GenerationError(f"--top-k must be 0 (off) or more (got {top_k})")
    if not 0.0 < top_p <= 1.0:
        raise GenerationError(f"--top-p must be in (0, 1] (got {top_p})")
    if not 0 < repetition_penalty < float("inf"):  # inf turns a logit of exactly 0 into NaN (0 * inf)
        raise GenerationError(f"--repetition-penalty must be a finite number more than 0; 1 is off "
                              f"(got {repetition_penalty})")
    if num_samples < 1:
        raise GenerationError(f"--num-samples must be at least 1 (got {num_samples})")


# ----------------------------------------------------------------------------------------------- generate
@dataclass
class GenerationStats:
    """Filled in by `generate` as it goes. Times are seconds from the first `next()` on the generator."""

    prompt_tokens: int = 0
    batch_size: int = 0
    new_tokens: int = 0  # steps taken: tokens per sample
    time_to_first_token_s: float = 0.0
    seconds: float = 0.0  # until the last token
    window_slides: int = 0
    compiled: bool = False
    fused: bool = False  # decode steps through tinygpt's Triton kernels (see `kernels.FusedDecodeStep`)
    compile_error: str | None = None  # why the compiled or fused step fell back to eager PyTorch
    graphed: bool = False  # decode steps replayed from CUDA graphs of our own (see `_DecodeChunk`)
    graph_error: str | None = None  # why capturing them failed
    capture_s: float = 0.0  # host time spent capturing them (the GPU's work is queued, not waited for)
    lookahead: bool = False  # whether look-ahead decoded (`generate`'s lookahead, resolved where None)
    model_passes: int = 0  # look-ahead passes (see `generate`'s lookahead); 0 without it
    guessed_tokens: int = 0  # tokens guessed by look-ahead, and how many of them the draws took
    accepted_tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens of all samples per second, the prefill included."""
        return self.new_tokens * self.batch_size / max(self.seconds, 1e-9)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens of all samples per second after the first: the steady decode rate."""
        steady = self.seconds - self.time_to_first_token_s
        return (self.new_tokens - 1) * self.batch_size / steady if self.new_tokens > 1 and steady > 0 else 0.0


def _last_logits(model: GPT, idx: torch.Tensor, cache: KVCache | StaticDecodeView | None,
                 head_t: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, V) of the position after `idx` (B, T): the head runs on the last position only.

    `head_t`: the head's weight transposed, (C, V) contiguous, to multiply with instead (see `_cpu_head`).
    """
    return _head(model, model.hidden_states(idx, cache)[:, -1], head_t)  # (B, C) -> (B, V)


def decode_layout(model: GPT) -> GPT:
    """Store every Linear weight of `model` column-major, in place: same shapes, values and Parameter objects, but
    (in, out) order in memory. Returns the model.

    A decode step multiplies one row by each weight and is bound by reading the weights; the BLAS torch ships on
    x86 streams (in, out)-ordered weights faster for that (measured on the 2-core AMD EPYC, one thread: GPT-2
    small's block weights about 10% faster, its 50304-wide head 1.5x, micro's head 4.7x). `load_model` applies it
    on CPU; results are unchanged up to float rounding, and training such a model still works.
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
                module.weight.data = module.weight.data.t().contiguous().t()
    return model


_HEAD_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _cpu_head(model: GPT) -> torch.Tensor | None:
    """On CPU, the head's (V, C) weight as a (C, V) contiguous tensor, to multiply the last hidden state with.

    The head is most of a small model's bytes, and the BLAS torch ships reads a row-major (V, C) weight several
    times slower for a one-row product than a (C, V) one (see `decode_layout`). After `decode_layout` this is a
    free view; otherwise a copy is made once per model and weight, and kept (one more head's worth of memory) while
    the model lives. The weight is told by its address, version and sum: a change through `.data` (an EMA, an
    initialisation) moves no version (12 ms for small's head, a call). Elsewhere (CUDA, MPS): None.
    """
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return None
    if weight.t().is_contiguous():  # laid out for decoding: the view itself
        return weight.detach().t()
    if weight.is_inference():  # made under torch.inference_mode: no version to tell an in-place change by
        with torch.no_grad():
            return weight.detach().t().contiguous()
    with torch.no_grad():
        key = (weight.data_ptr(), weight._version, weight.dtype, float(weight.detach().sum()))
    held = _HEAD_COPIES.get(model)
    if held is None or held[0] != key:
        with torch.no_grad():
            held = (key, weight.detach().t().contiguous())
        _HEAD_COPIES[model] = held
    return held[1]


class PromptLookup:
    """Guesses of the next tokens from the text so far (prompt lookup): where the newest `MAX_NGRAM`, 2 or 1 tokens
    occurred before, the tokens that followed them then. `generate` checks a guess in one pass of the model over
    the newest token and the guessed ones; each token is still drawn from the model's own distribution, and a guess
    only saves passes where the draw agrees with it, so the tokens are the same with or without guessing, up to
    float rounding (a pass over several rows rounds the logits differently, which can flip a near-tie).

    A match that runs into the newest tokens continues periodically (after `a b a b`, `a b` guesses `a b a b...`),
    which is what repetitive text does. A pass over guessed tokens costs more than a one-token step, so a guess
    is only checked where guesses of its kind have been right: every step scores what the newest n-gram would
    have guessed against the token drawn (free: no model pass), and guesses from an n-gram length whose running
    hit rate is under `MIN_HIT_RATE` stay unchecked. The guess length doubles (up to `MAX_GUESS`) while every
    guessed token is taken and halves when the first is not.
    """

    MAX_NGRAM = 3
    # A pass's fixed cost is spread over more tokens the longer the guess, and the length only gets here after
    # 4, 8 and 16 guessed tokens were all taken. Random-weight greedy (the benchmark, 2-core EPYC): 16 -> 32 took
    # micro from 22 to 16 passes for 256 tokens, 1,243 -> 1,534 tokens/s, small 73 -> 95; a trained micro model's
    # greedy text kept its 30 passes per 100 tokens (18 more guessed tokens checked, no slower).
    MAX_GUESS = 32
    # A pass over 2 rows cost 1.5-2x a one-row step on CPU (micro: the head's product does not stay memory-bound),
    # so a guess must be right most of the time to pay: measured on a trained micro model, 0.5 lost time on
    # sampled text and 0.8 did not, while greedy text kept its gain (docs/performance.md). Re-checked after the
    # blocked head made such passes cheaper: 0.6 and 0.4 were slower than 0.8 on greedy and sampled text alike.
    MIN_HIT_RATE = 0.8
    FIRST_HIT_RATE = 0.9  # before any evidence: one miss stops a kind of guess from being checked
    SMOOTHING = 0.2  # weight of the newest guess in the running hit rate
    KEEP = 4096  # tokens of history searched (older ones are forgotten: memory stays bounded)

    def __init__(self, tokens: Sequence[int]) -> None:
        self.history: list[int] = []
        self.last_end: dict[tuple[int, ...], int] = {}  # n-gram -> index of its last token, newest occurrence
        self.length = 4  # tokens guessed at a time
        self.hit_rate = [self.FIRST_HIT_RATE] * (self.MAX_NGRAM + 1)  # by n-gram length: first guessed token right
        self._scored: tuple[int, int] | None = None  # (n-gram length, first guessed token) awaiting the draw
        for token in tokens:
            self._append(token)

    def push(self, token: int) -> None:
        """Append the token drawn, scoring the last guess against it."""
        if self._scored is not None:
            n, first = self._scored
            self.hit_rate[n] += self.SMOOTHING * ((token == first) - self.hit_rate[n])
            self._scored = None
        if len(self.history) >= 2 * self.KEEP:
            kept = self.history[-self.KEEP :]
            self.history, self.last_end = [], {}
            for old in kept:
                self._append(old)
        self._append(token)

    def _append(self, token: int) -> None:
        history = self.history
        if history:  # index the n-grams that end at the previous token, so a lookup never finds the newest one
            end = len(history) - 1
            for n in range(1, min(self.MAX_NGRAM, end + 1) + 1):
                self.last_end[tuple(history[end - n + 1 : end + 1])] = end
        history.append(token)

    def propose(self, limit: int) -> list[int]:
        """Up to min(the guess length, `limit`) tokens likely to follow the history; [] where nothing matches or
        guesses like this one have mostly been wrong. Call `push` with the next token drawn before proposing again."""
        history = self.history
        for n in range(min(self.MAX_NGRAM, len(history)), 0, -1):
            end = self.last_end.get(tuple(history[-n:]))
            if end is not None:
                self._scored = (n, history[end + 1])
                if self.hit_rate[n] < self.MIN_HIT_RATE or limit <= 0:
                    return []
                period = len(history) - 1 - end  # the guess repeats history[end + 1 :] as often as needed
                return [history[end + 1 + i % period] for i in range(min(self.length, limit))]
        return []

    def taken(self, proposed: int, accepted: int) -> None:
        """Adapt the guess length to how many of `proposed` guessed tokens were `accepted`."""
        if accepted == proposed:
            self.length = min(2 * self.length, self.MAX_GUESS)
        elif accepted == 0:
            self.length = max(1, self.length // 2)


_COMPILED_STEPS: dict[str, Callable] = {}

# Inductor options for the compiled decode step, none by default. bench/generate_throughput.py tries
# {"coordinate_descent_tuning": True}: inductor then turns each one-row matmul of a batch-1 step into a tuned
# Triton reduction that can fuse the bias and what follows, where cuBLAS's kernels read the weights at ~1 TB/s
# (docs/performance.md). It waits for a GPU to be measured before it can be a default.
DECODE_COMPILE_OPTIONS: dict[str, Any] = {}

# Decode steps per CUDA graph (see `_DecodeChunk`). On an H200 a graph of 16 or 64 steps replayed no faster per
# token than a graph of one (GPT-2 small, bf16: 511, 511, 524 us compiled; 711, 720, 746 eager), since the GPU,
# not the host, is the bottleneck once steps are replayed, while capturing took 16 or 64 times longer.
GRAPH_STEPS = 1


def _compiled_step(device: torch.device, graphs: bool = False) -> Callable:
    """`_last_logits` compiled once per process and mode. On CUDA without `graphs` torch.compile makes the CUDA
    graphs itself ("reduce-overhead", one per step); with `graphs` the plain compiled step is captured by
    `_DecodeChunk`, several steps and the sampling in one graph."""
    mode = "reduce-overhead" if device.type == "cuda" and not graphs else "default"
    key, how = mode, {"mode": mode}
    if DECODE_COMPILE_OPTIONS:  # torch.compile takes a mode or options, not both: reduce-overhead is cudagraphs
        key = f"{mode} {sorted(DECODE_COMPILE_OPTIONS.items())}"
        how = {"options": {"triton.cudagraphs": mode == "reduce-overhead", **DECODE_COMPILE_OPTIONS}}
    if key not in _COMPILED_STEPS:
        _COMPILED_STEPS[key] = torch.compile(_last_logits, fullgraph=True, dynamic=False, **how)
    return _COMPILED_STEPS[key]


def _make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    try:
        generator = torch.Generator(device=device)
    except RuntimeError:  # a backend without its own generator: sample on the CPU
        generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    return generator


def generation_memory(model: GPT, num_samples: int, use_cache: bool = True, penalty: bool = False) -> int:
    """Bytes `generate` allocates for `num_samples` samples, roughly: the KV cache (or, uncached, a window of
    activations per sample), a few (B, vocabulary) fp32 buffers of sampling, the repetition mask."""
    cfg = model.config
    element = next(model.parameters()).element_size()
    window = 2 * cfg.n_layer * cfg.n_embd if use_cache else 16 * cfg.n_embd  # per sample and position
    return num_samples * (cfg.block_size * window * element + cfg.vocab_size * (4 * 4 + int(penalty)))


def free_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on `device` (on CPU: MemAvailable, within a container's limit), or None
    where that is not known (MPS, CPU off Linux)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if device.type != "cpu":
        return None
    available = None
    try:
        with open("/proc/meminfo") as meminfo:
            available = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")),
                             None)
    except OSError:
        pass
    container = cgroup_memory()  # a container's limit, less what it already uses
    if container is not None:
        room = max(0, container[0] - container[1])
        available = room if available is None else min(available, room)
    return available


def _memory_error(num_samples: int, need: int, limit: str, use_cache: bool = True) -> GenerationError:
    held = "KV cache" if use_cache else "activations"
    return GenerationError(
        f"--num-samples {num_samples} needs about {need / 2**30:,.1f} GiB (the {held} and logits of every sample), "
        f"more than {limit}: ask for fewer samples"
    )


@dataclass
class _KeptDecoder:
    """What a `generate` call with CUDA graphs (`_DecodeChunk`) builds on the device: the cache, the token fed,
    the draw and its state, the step and the chunk with its captured graph. It is kept for the model's next call
    with the same settings, which then neither allocates them nor captures again: only resets them. One per model,
    held as long as the model is (idle, it keeps no reference to the model); a call while another is running on
    it builds its own. `key`: `_decoder_key`."""

    key: tuple
    cache: KVCache
    chunk: _DecodeChunk  # with the static view, the token fed, the step and the draw (with its state)
    stats: GenerationStats
    busy: bool = True

    def take(self, model: GPT, stats: GenerationStats, generator: torch.Generator, head_t: torch.Tensor | None,
             prompt: torch.Tensor) -> None:
        """Make it this call's, as a call that builds its own would find it: an empty cache, no sample finished
        or non-finite, the `prompt`'s tokens seen, the call's generator and `stats` (told how the steps run)."""
        chunk, draw = self.chunk, self.chunk.draw
        chunk.model = model
        if hasattr(chunk.step, "model"):  # a fused step
            chunk.step.model = model
        self.cache.reset()
        for buffer in (*self.cache.k, *self.cache.v):  # as a new view's: the eager step weighs empty slots by 0
            buffer.zero_()
        draw.finished.zero_()
        draw.first_bad.fill_(NEVER)
        if draw.seen is not None:
            draw.seen.zero_()
            draw.seen[:, prompt] = True
        draw.generator = generator
        chunk.stats, chunk.head_t, chunk.then = stats, head_t, None
        for name in ("compiled", "fused", "compile_error", "graphed", "graph_error"):
            setattr(stats, name, getattr(self.stats, name))
        self.stats = stats

    def let_go(self) -> None:
        self.busy = False
        self.chunk.model = None  # type: ignore[assignment]
        if hasattr(self.chunk.step, "model"):
            self.chunk.step.model = None


_KEPT: weakref.WeakKeyDictionary[GPT, _KeptDecoder] = weakref.WeakKeyDictionary()
_KEPT_LOCK = threading.Lock()  # a decoder is looked at and taken (marked busy) at once: calls in other threads


def _decoder_key(model: GPT, *settings: Any, fused: bool, compile: bool) -> tuple | None:
    """What a captured chunk depends on besides its buffers: the call's settings (the draw's are in the graph), the
    module-level switches it was built under, and where the weights are and their in-place versions (a weight
    replaced, moved or trained since makes a new decoder). None where that cannot be told: weights made under
    torch.inference_mode track no version (such a model's decoder is not kept)."""
    tensors = list(itertools.chain(model.parameters(), model.buffers()))
    if any(t.is_inference() for t in tensors):
        return None
    weights = tuple((t.data_ptr(), t.dtype, t.device, t._version) for t in tensors)
    switches: tuple = (GRAPH_STEPS, CPU_SHORTLISTS, _last_logits)  # (the eager step: tests replace it)
    if fused:
        from tinygpt_cli import kernels

        switches += (kernels.FUSED_TOP_K, tuple(sorted(kernels.TUNING.items())))
    if compile:
        switches += (tuple(sorted(DECODE_COMPILE_OPTIONS.items())),)
    return (*settings, fused, compile, model.training, switches, weights)  # (training: dropout in the graph)


NON_FINITE = ("the model produced non-finite logits (NaN or infinity): the checkpoint may be damaged (an earlier one "
              "may be whole), or in fp16 or bf16 it overflows (try --dtype fp32)")
NEVER = 2**62  # `first_bad` of a sample whose logits stayed finite


def check_model(model: Any, caller: str) -> None:
    """A GenerationError unless `model` is a model to sample from: a GPT, or a module holding one's config (as
    torch.compile's wrapper does)."""
    if isinstance(model, torch.nn.Module) and hasattr(getattr(model, "config", None), "block_size"):
        return
    inner = getattr(model, "module", None)  # DDP and FSDP wrappers
    hint = ": pass its .module" if isinstance(inner, torch.nn.Module) and hasattr(inner, "config") else ""
    raise GenerationError(f"{caller} takes a tinygpt GPT model (load_checkpoint(RUN).model), not a "
                          f"{type(model).__name__}{hint}")


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 200,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    num_samples: int = 1,
    seed: int | None = None,
    use_cache: bool = True,
    stop_at_eot: bool = False,
    compile: bool = False,
    static_cache: bool | None = None,
    stats: GenerationStats | None = None,
    flush_every: int | None = None,
    lookahead: bool | None = None,
    graphs: bool | None = None,
    fused: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample, (num_samples,) int64 on CPU, up to `max_new_tokens` times.

    An empty prompt starts a fresh document (`<|endoftext|>`). With `stop_at_eot`, a sample that produced
    `<|endoftext|>` yields `<|endoftext|>` from then on, and the generator returns once every sample has.
    `compile` runs each one-token step through torch.compile (CUDA graphs on CUDA); it implies `static_cache`,
    the static-shape view of the cache that such a step needs (also usable eagerly, for tests).
    The same `seed` on the same device and dtype gives the same tokens.

    Tokens reach the host `flush_every` steps at a time (default: 16 on CUDA, 1 elsewhere), the first one at
    once: between flushes nothing waits for the device, so the host queues the next steps while the GPU runs
    the current one. Between chunks of steps (`graphs`) a flush's tokens are copied out without waiting, and
    handed out at the next flush: the GPU then has a flush's steps queued while the caller takes them, instead
    of idling. What is yielded, and when the generator returns, is the same for any `flush_every`; at most two
    flushes of steps past the end (`2 * flush_every - 1` with one step a chunk) are computed and dropped.

    `graphs` (default: on NVIDIA CUDA with the static cache, uncompiled) takes `GRAPH_STEPS` steps at a time as
    one `_DecodeChunk`: sampling included, captured once as a CUDA graph and replayed (off CUDA it runs eagerly).
    With one step per graph the tokens are those of the other paths; with several, the random numbers of a chunk
    are drawn together, so sampled tokens differ from theirs (greedy ones do not) and a seed still repeats them.

    `lookahead` (default: on for one sample with the cache, off CUDA; eager only) guesses the tokens that follow
    from earlier text (`PromptLookup`) and runs the model over the newest token and the guesses in one pass. Each
    token is still drawn from its own logits row, in order, with the same random numbers; a guess whose row is
    used only saves a pass, so the tokens are the same with or without it (up to float rounding of the logits).

    `fused` decodes each step with tinygpt's Triton kernels (`kernels.FusedDecodeStep`: five a layer) on the
    static cache, replayed as CUDA graphs like the eager step; NVIDIA CUDA only. Its tokens are the eager step's up
    to float rounding. If its kernels fail to build, decoding goes on eagerly and `stats.compile_error` says why.
    """
    check_model(model, "generate")
    if isinstance(prompt, (str, bytes)):
        raise GenerationError("generate takes the prompt's token ids: for text, sample_text takes it and returns "
                              "text")
    check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, num_samples, seed)
    # numpy's numbers as Python's: torch's generator takes no numpy integer as a seed
    max_new_tokens, top_k, num_samples = int(max_new_tokens), int(top_k), int(num_samples)
    temperature, top_p, repetition_penalty = float(temperature), float(top_p), float(repetition_penalty)
    seed = None if seed is None else int(seed)
    started = time.perf_counter()
    block = model.config.block_size
    if getattr(prompt, "ndim", 1) != 1:  # a tensor or array of (1, N) ids, as a tokenizer returns for one text
        raise GenerationError(f"generate takes one prompt's token ids, 1-D, not {prompt.ndim}-D (for a (1, N) batch "
                              "of one, pass ids[0])")
    given = list(prompt)
    if getattr(prompt, "dtype", None) in (torch.bool, np.bool_) or any(isinstance(t, (bool, np.bool_)) for t in given):
        raise GenerationError("the prompt's token ids must be whole numbers, not True/False")
    try:  # ints, numpy's, or a 1-D tensor's elements
        prompt = [operator.index(token) for token in given] or [EOT_ID]
    except TypeError:
        raise GenerationError("the prompt's token ids must be whole numbers (a list of ints, or a 1-D tensor)") \
            from None
    if flush_every is not None and flush_every < 1:
        raise ValueError(f"flush_every must be at least 1 (got {flush_every})")
    check_prompt_fits(prompt, model)
    if any(not 0 <= token < VOCAB_SIZE for token in prompt):  # the padded rows are no tokens (ML QA)
        raise GenerationError(f"the prompt holds token ids outside GPT-2's vocabulary (0..{VOCAB_SIZE - 1})")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens, stats.batch_size, stats.new_tokens = len(prompt), num_samples, 0
    device = next(model.parameters()).device
    if fused:
        check_fused(device, compile, use_cache, lookahead)
    generator = _make_generator(device, seed)
    keep = max(1, block // 2)  # tokens re-encoded when the window jumps
    # CUDA: the static cache by default, for the CUDA graphs below (look-ahead needs the sliced one)
    static = compile or fused or (static_cache if static_cache is not None else
                         device.type == "cuda" and use_cache and not lookahead)

    flush = flush_every or (16 if device.type == "cuda" else 1)
    # compiled, torch.compile's own CUDA graphs ("reduce-overhead") are as fast (docs/performance.md)
    if graphs is None:  # HIP graphs (ROCm also says "cuda") are untested
        graphs = static and device.type == "cuda" and torch.version.hip is None and not compile
    if graphs and not (static and use_cache):
        raise ValueError("graphs needs the static cache (compile or static_cache)")
    can_look_ahead = use_cache and not static and num_samples == 1
    if lookahead and not can_look_ahead:
        raise GenerationError("lookahead needs the KV cache, an eager (not compiled or static) step and one sample")
    look_ahead = can_look_ahead and device.type != "cuda" if lookahead is None else lookahead
    stats.lookahead = look_ahead
    # the previous call's decoder, where it was built for these settings and no other call is using it
    key = _decoder_key(model, num_samples, temperature, top_k, top_p, repetition_penalty, stop_at_eot,
                       fused=fused, compile=compile) if graphs else None
    need = generation_memory(model, num_samples, use_cache, repetition_penalty != 1.0)
    with _KEPT_LOCK:  # taken here, before another thread's call can look at it (nothing raises until `try`)
        kept = _KEPT.get(model) if key is not None else None
        if kept is not None and not kept.busy and kept.key != key:
            del _KEPT[model]  # other settings: its memory goes before this call's is counted
        if kept is not None and (kept.busy or kept.key != key):
            kept = None
        if kept is not None:
            kept.busy = True
    free = free_memory(device) if kept is None else None
    if free is not None and need > free:
        raise _memory_error(num_samples, need, f"the {free / 2**30:.1f} GiB free on {device.type}", use_cache)
    ahead: _LookAhead | None = None
    try:
        # sequence[:, start:length] is what the model sees (the cache holds all of it but the newest token) and
        # sequence[:, flushed:length] what is not handed out yet. A window jump moves both to the front, so the
        # buffer holds at most a window and a flush however many tokens are asked for.
        steps = GRAPH_STEPS if graphs else 0  # per chunk, which may run past the end
        capacity = min(len(prompt) + max_new_tokens + steps, block + max(flush, steps) + 1)
        sequence = torch.empty((num_samples, capacity), dtype=torch.long, device=device)
        sequence[:, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=device)
        start, length = 0, len(prompt)
        head_t = _cpu_head(model)
        if kept is not None:
            kept.take(model, stats, generator, head_t, sequence[0, :length])
            cache, chunk, draw = kept.cache, kept.chunk, kept.chunk.draw
            view, current, step, first_bad = chunk.view, chunk.current, chunk.step, draw.first_bad
        else:
            seen = None
            if repetition_penalty != 1.0:
                seen = torch.zeros((num_samples, model.config.vocab_size), dtype=torch.bool, device=device)
                seen[:, sequence[0, :length]] = True
            cache = KVCache(model, num_samples) if use_cache else None
            view = StaticDecodeView(cache) if cache is not None and static else None
            step = _last_logits
            if view is not None and compile:
                step = _compiled_step(device, graphs)
                stats.compiled = True
            elif view is not None and fused:
                from tinygpt_cli.kernels import FusedDecodeStep

                step = FusedDecodeStep(model, num_samples)
                stats.fused = True
            current = torch.zeros((num_samples, 1), dtype=torch.long, device=device)  # the token fed, (B, 1)
            if view is not None:
                mark_static(current)
            finished = torch.zeros(num_samples, dtype=torch.bool, device=device)
            first_bad = torch.full((num_samples,), NEVER, dtype=torch.long, device=device)  # non-finite logits' step
            draw = _Draw(temperature, top_k, top_p, repetition_penalty, seen, finished, first_bad, stop_at_eot,
                         generator)
            chunk = _DecodeChunk(step, model, view, current, steps, draw, stats, head_t) if graphs else None
            if chunk is not None and key is not None:
                assert cache is not None and view is not None
                with _KEPT_LOCK:
                    if model not in _KEPT:
                        kept = _KEPT[model] = _KeptDecoder(key, cache, chunk, stats)
        static_steps = 0
        flushed = length  # sequence[:, :flushed] is copied out (the prompt counts as handed out)
        pending: _HostCopy | None = None  # a flush copied out but not handed out yet
        ahead = _LookAhead(prompt, stats) if look_ahead else None
        if cache is not None:  # one prefill for all samples: they share the prompt
            logits = _last_logits(model, sequence[:1, :length], cache, head_t).expand(num_samples, -1)
        else:
            logits = _last_logits(model, sequence[:, :length], None, head_t)
        produced = 0  # tokens drawn per sample
        while True:
            # a whole chunk of steps where the cache has room for all of them (it may run past the end: dropped)
            # the first token too where the chunk has run before (a decoder kept from an earlier call: its graph is
            # captured) and takes one step (more would draw the random numbers in other groups than a first call);
            # else the first is drawn at once, and the step after it builds the kernels the capture needs
            chunked = chunk is not None and (produced > 0 or (chunk.chunks > 0 and steps == 1)) and \
                cache.pos + steps <= cache.max_tokens
            if chunked:
                chunk.step = step
                chunk.run(logits, produced, cache.pos)
                step, logits = chunk.step, chunk.logits
                sequence[:, length : length + steps] = chunk.tokens
                length += steps
                produced += steps
                cache.advance(steps)
            else:
                next_token = draw.next(logits, produced)
                sequence[:, length] = next_token
                length += 1
                produced += 1
                if ahead is not None:
                    token = int(next_token[0])
                    ahead.guesser.push(token)
            last = produced >= max_new_tokens
            if produced == 1 or last or length - flushed >= flush:
                # a chunk's steps past the end are dropped
                copied = _HostCopy(sequence[:, flushed : length - max(0, produced - max_new_tokens)], first_bad)
                flushed = length
                # between chunks, the flush before this one is handed out now and this one at the next: the GPU
                # has this flush's steps to run meanwhile (the wait is for the copy queued a flush ago); the first
                # token is handed out at once
                if chunked and not last and produced > steps:
                    earlier, pending = pending, copied
                    if earlier is not None and (yield from _hand_out(earlier, stats, started, stop_at_eot)):
                        return
                    continue
                for out in (pending, copied):
                    if out is not None and (yield from _hand_out(out, stats, started, stop_at_eot)):
                        return
                pending = None
                if last:
                    return
            if chunked:  # the chunk fed its last token too: `logits` follow it
                continue
            if length - start > block:  # the window is full: jump, re-encoding its newest half
                start = length - keep
                stats.window_slides += 1
                shift = min(start, flushed)  # what neither the window nor the next flush needs
                sequence[:, : length - shift] = sequence[:, shift:length].clone()
                start, flushed, length = start - shift, flushed - shift, length - shift
                if cache is not None:
                    cache.reset()
                    logits = _last_logits(model, sequence[:, start:length], cache, head_t)
                    if ahead is not None:
                        ahead.settle()  # its rows were computed over the old window
                    continue
            if cache is None:
                logits = _last_logits(model, sequence[:, start:length], None, head_t)
            elif ahead is not None:  # room: the window's and the tokens still to come
                logits = ahead.next_logits(model, token, cache, head_t,
                                           min(block - (length - start), max_new_tokens - produced - 1))
            elif view is None:
                logits = _last_logits(model, sequence[:, length - 1 : length], cache, head_t)
            else:
                current.copy_(sequence[:, length - 1 : length])
                view.input_pos.fill_(cache.pos)
                logits, step = _static_step(step, model, current, view, head_t, stats, first=static_steps == 0)
                static_steps += 1
                cache.advance(1)
    except Exception as exc:  # an allocation the estimate did not foresee
        if not allocation_failed(exc):
            raise
        raise _memory_error(num_samples, need, f"{device.type} could allocate", use_cache) from None
    finally:  # however it ends (done, stopped, closed early): count the last look-ahead pass too
        if ahead is not None:
            ahead.settle()
        if kept is not None:  # the next call may take it
            kept.let_go()


class _HostCopy:
    """The tokens of a flush (B, n) and `first_bad` (B,) copied to the host. On CUDA the copies are queued
    without waiting (to pinned memory) and `wait` waits for them alone; elsewhere they are made at once."""

    def __init__(self, tokens: torch.Tensor, first_bad: torch.Tensor) -> None:
        self.event = None
        if tokens.device.type == "cuda":
            self.tokens, self.first_bad = tokens.to("cpu", non_blocking=True), first_bad.to("cpu", non_blocking=True)
            self.event = torch.cuda.Event()
            # on the stream the copies were queued on, the tokens' GPU's: `record()` takes the current device's,
            # which is another GPU for a model on cuda:1 (nothing here makes that GPU current)
            self.event.record(torch.cuda.current_stream(tokens.device))
        else:
            self.tokens, self.first_bad = tokens.to("cpu", copy=True), first_bad.to("cpu", copy=True)

    def wait(self) -> tuple[torch.Tensor, int]:
        """(the tokens (B, n), the first step whose logits were not finite, or NEVER)."""
        if self.event is not None:
            self.event.synchronize()
        return self.tokens, int(self.first_bad.min())


def _hand_out(copied: _HostCopy, stats: GenerationStats, started: float,
              stop_at_eot: bool) -> Generator[torch.Tensor, None, bool]:
    """Yield a flush's tokens one step at a time, counting them in `stats`; raise at the first step whose logits
    were not finite (the tokens before it are yielded, whatever the flush). Returns True when every sample has
    ended (`stop_at_eot`)."""
    unsent, bad_step = copied.wait()
    now = time.perf_counter() - started
    for i in range(unsent.size(1)):
        if stats.new_tokens >= bad_step:
            raise GenerationError(NON_FINITE)
        tokens = unsent[:, i]
        stats.new_tokens += 1
        stats.seconds = now
        if stats.new_tokens == 1:
            stats.time_to_first_token_s = now
        yield tokens
        if stop_at_eot and bool((tokens == EOT_ID).all()):
            return True
    return False


def check_fused(device: torch.device, compile: bool = False, use_cache: bool = True,
                lookahead: bool | None = None) -> None:
    """Raise GenerationError where `generate(fused=True)` cannot run as asked."""
    from tinygpt_cli.kernels import unavailable

    if compile:
        raise GenerationError("the fused decode kernels replace torch.compile's: ask for one of them, not both")
    if not use_cache or lookahead:
        raise GenerationError("the fused decode kernels take one token a step through the KV cache: "
                              "they work without look-ahead and with the cache")
    reason = unavailable(device)
    if reason:
        raise GenerationError(f"the fused decode kernels cannot run here ({reason}): generate without them (drop "
                              f"--fused; fused=False)")


FUSED_FROM_CAPABILITY = (8, 0)  # the oldest GPUs the fused kernels are built for in the tests (Ampere)


def fused_by_default(device: torch.device, compile: bool = False, lookahead: bool | None = None) -> bool:
    """Whether `tinygpt generate` decodes with the fused kernels when neither --fused nor --no-fused is given: on
    an NVIDIA GPU where they run (GPT-2 small in bf16 decoded 2.0-2.7x as many tokens/s as with the compiled step
    on an H100 and an H200; docs/performance.md), unless the compiled step or look-ahead was asked for. Older
    GPUs than the tests build the kernels for (Turing and before) keep PyTorch's step; --fused still tries them."""
    if device.type != "cuda" or compile or lookahead:
        return False
    from tinygpt_cli.kernels import INTERPRETED, unavailable

    if INTERPRETED:  # TRITON_INTERPRET=1: Triton runs kernels on the CPU, far slower than PyTorch's step on the GPU
        return False
    return unavailable(device) is None and torch.cuda.get_device_capability(device) >= FUSED_FROM_CAPABILITY


def _all_logits(model: GPT, idx: torch.Tensor, cache: KVCache, head_t: torch.Tensor | None) -> torch.Tensor:
    """Logits (T, V) of every position of `idx` (1, T), through the cache."""
    return _head(model, model.hidden_states(idx, cache)[0], head_t)  # (T, C) -> (T, V)


HEAD_BLOCK = 4096  # vocabulary columns per block of the CPU head product (see `head_product`)


def _head(model: GPT, hidden: torch.Tensor, head_t: torch.Tensor | None) -> torch.Tensor:
    """The vocabulary head on hidden states (N, C) -> logits (N, V), through `head_t` where given."""
    return model.lm_head(hidden) if head_t is None else head_product(hidden, head_t)


def head_product(hidden: torch.Tensor, head_t: torch.Tensor) -> torch.Tensor:
    """`hidden @ head_t` for a few rows (N, C) and a wide contiguous (C, V) head on CPU -> (N, V), contiguous.

    It runs as one batched product over blocks of HEAD_BLOCK vocabulary columns, plus one for the columns left.
    The BLAS torch ships spreads a product of a few rows with a 50k-wide weight poorly over threads (two threads
    are no faster than one); a batch of blocks is split between them. Measured on the 2-core EPYC, 2 threads
    (median): micro's head 1.43 -> 1.36 ms for one row and 6.66 -> 4.52 ms for four, small's 11.07 -> 8.32 ms for
    one row and 34.19 -> 21.25 ms for four (docs/performance.md). The sums are the same up to float rounding.
    """
    rows, width = hidden.shape
    blocks = head_t.shape[1] // HEAD_BLOCK
    if blocks < 2:
        return hidden @ head_t
    body = blocks * HEAD_BLOCK
    logits = hidden.new_empty(rows, head_t.shape[1])
    per_block = torch.bmm(hidden.expand(blocks, rows, width),
                          head_t[:, :body].view(width, blocks, HEAD_BLOCK).transpose(0, 1))  # (blocks, N, HEAD_BLOCK)
    logits[:, :body].view(rows, blocks, HEAD_BLOCK).copy_(per_block.transpose(0, 1))
    logits[:, body:] = hidden @ head_t[:, body:]
    return logits


class _LookAhead:
    """`generate`'s look-ahead for one sample: the guesser, and the logits rows of the last pass's guesses that the
    draws have not reached yet, with that pass's counts."""

    def __init__(self, prompt: Sequence[int], stats: GenerationStats) -> None:
        self.guesser = PromptLookup(prompt)
        self.stats = stats
        self.rows: list[tuple[int, torch.Tensor]] = []  # (guessed token, logits row (1, V) that follows it)
        self.proposed = self.accepted = 0  # guesses of the last pass, and how many the draws took
        self.start = 0  # the cache position the last pass started at

    def next_logits(self, model: GPT, token: int, cache: KVCache, head_t: torch.Tensor | None,
                    room: int) -> torch.Tensor:
        """Logits (1, V) after `token`, the newest token drawn: the guessed row where the guess was right, else
        from a pass over `token` and up to `room` new guesses (the wrong guesses' cache entries are dropped)."""
        if self.rows and self.rows[0][0] == token:
            self.accepted += 1
            return self.rows.pop(0)[1]
        if self.proposed:
            cache.pos = self.start + 1 + self.accepted
        self.settle()
        guesses = self.guesser.propose(room)
        self.start, self.proposed = cache.pos, len(guesses)
        rows = _all_logits(model, torch.tensor([[token, *guesses]], device=cache.k[0].device), cache, head_t)
        self.rows = [(guess, rows[i + 1 : i + 2]) for i, guess in enumerate(guesses)]
        self.stats.model_passes += 1
        return rows[:1]

    def settle(self) -> None:
        """Close the last pass: count its guesses and those taken, and drop the rows left."""
        if self.proposed:
            self.guesser.taken(self.proposed, self.accepted)
            self.stats.guessed_tokens += self.proposed
            self.stats.accepted_tokens += self.accepted
        self.rows.clear()
        self.proposed = self.accepted = 0


class _Draw:
    """How `generate` draws each sample's next token from logits (B, V) and keeps its per-sample state: the
    repetition penalty and the tokens `seen`, the step of the first non-finite logits (`first_bad`), and the
    samples `finished` at <|endoftext|>. Every update is in place on device tensors, so a CUDA graph can hold it."""

    def __init__(self, temperature: float, top_k: int, top_p: float, penalty: float, seen: torch.Tensor | None,
                 finished: torch.Tensor, first_bad: torch.Tensor, stop_at_eot: bool,
                 generator: torch.Generator) -> None:
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.penalty, self.seen, self.finished = penalty, seen, finished
        self.first_bad, self.stop_at_eot, self.generator = first_bad, stop_at_eot, generator
        self.scratch: DrawScratch | None = None  # `next_into`'s

    def next(self, logits: torch.Tensor, step: int | torch.Tensor,
             uniform: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of every sample (B,); `step` (a number, or a 0-d device tensor) is the token's index,
        recorded in `first_bad` where the logits are not finite. `uniform`: numbers drawn beforehand (B, 1)."""
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        token = sample_next_token(logits, self.temperature, self.top_k, self.top_p, self.generator, uniform)
        # torch.where, not masked_fill_: a 0-d CUDA tensor as masked_fill_'s value may be read on the host
        self.first_bad.copy_(torch.where((token < 0) & ~self.finished & (self.first_bad == NEVER), step,
                                         self.first_bad))
        token = token.clamp(min=0)
        if self.stop_at_eot:
            token = token.masked_fill(self.finished, EOT_ID)
            self.finished |= token == EOT_ID
        if self.seen is not None:
            self.seen.scatter_(1, token[:, None], True)
        return token

    def next_into(self, logits: torch.Tensor, step: torch.Tensor, uniform: torch.Tensor | None,
                  tokens: torch.Tensor, column: int, current: torch.Tensor) -> None:
        """`next`, writing the token to tokens[:, column] and current (B, 1), its bookkeeping and those writes as
        one Triton kernel (`kernels.draw_token`), which also picks the greedy token: for the fused decode step."""
        from tinygpt_cli.kernels import draw_token, samples_in_kernel

        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.penalty)
        scratch = self.scratch_for(logits)
        picked = None
        if self.temperature > 0 and (uniform is None or not samples_in_kernel(self.temperature, self.top_k,
                                                                              self.top_p, scratch.vocab)):
            picked = sample_next_token(logits, self.temperature, self.top_k, self.top_p, self.generator, uniform)
        draw_token(logits, picked, step, self.finished, self.first_bad, self.seen, self.stop_at_eot, tokens, column,
                   current, scratch, never=NEVER, eot=EOT_ID, temperature=self.temperature, top_k=self.top_k,
                   uniform=uniform)

    def scratch_for(self, logits: torch.Tensor) -> DrawScratch:
        """The working memory of `kernels.draw_token` for these logits (B, V), made once."""
        from tinygpt_cli.kernels import DrawScratch

        if self.scratch is None:
            self.scratch = DrawScratch(logits.size(0), min(VOCAB_SIZE, logits.size(1)), logits.device)
        return self.scratch


class _DecodeChunk:
    """`steps` decode steps of `generate` as one unit: each draws the next token of every sample from `logits`
    (`_Draw`), writes it to `tokens[:, i]` and feeds it through the static-shape step, whose logits it keeps.

    Everything a step reads or writes is a tensor at a fixed address (the token fed, the cache position, the step
    counter, the draw's state) and the random numbers are drawn for the whole chunk beforehand, so
    on CUDA the steps are captured once, at the first chunk, as one CUDA graph and each chunk is a single replay:
    the host queues one graph launch instead of hundreds of kernel launches a token. If capturing fails the
    chunks run eagerly and `stats.graph_error` says why. Off CUDA they always run eagerly (the same tokens; tests).
    """

    def __init__(self, step: Callable, model: GPT, view: StaticDecodeView, current: torch.Tensor, steps: int,
                 draw: _Draw, stats: GenerationStats, head_t: torch.Tensor | None = None) -> None:
        self.step, self.model, self.view, self.current, self.steps = step, model, view, current, steps
        self.draw, self.stats, self.head_t = draw, stats, head_t
        device, batch = current.device, current.size(0)
        # a step that returns the same buffer at every call (the fused one) is read in place: no copy a token
        self.logits = getattr(step, "logits", None)
        if self.logits is None:
            self.logits = torch.zeros((batch, model.config.vocab_size), dtype=next(model.parameters()).dtype,
                                      device=device)
        self.tokens = torch.zeros((batch, steps), dtype=torch.long, device=device)
        self.uniform = None
        if draw.temperature > 0:
            rng = draw.generator.device
            self.uniform = torch.zeros((batch, steps), dtype=_uniform_dtype(device, rng), device=rng)
        self.counter = torch.zeros((), dtype=torch.long, device=device)  # `produced` of the step being taken
        self.fused_draw = stats.fused  # the token drawn by a Triton kernel too (`_Draw.next_into`)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.chunks = 0
        self.then: tuple[int, int] | None = None  # (step counter, cache position) where the last chunk left them
        # a fused step moves the position and counter on from its first call, which builds the kernels the
        # chunk's steps use; `generate` refills both before any step outside a chunk
        if getattr(step, "advance", False) is None:
            step.advance = self.counter

    def run(self, logits: torch.Tensor, produced: int, position: int) -> None:
        """Take `steps` steps from `logits` (B, V), the `produced`-th token next, fed at cache slot `position`."""
        if logits is not self.logits:
            self.logits.copy_(logits)
        if (produced, position) != self.then:  # else the chunk before left them there: two kernels fewer a chunk
            self.counter.fill_(produced)
            self.view.input_pos.fill_(position)
        self.then = (produced + self.steps, position + self.steps)
        if self.uniform is not None:
            self.uniform.uniform_(0.0, 1.0, generator=self.draw.generator)
        if self.graph is None and self.stream is not None and self.chunks == 0:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:  # off CUDA, or capturing failed
            self._take_steps()
        self.chunks += 1

    def _capture(self) -> None:
        """Capture the chunk's steps (recorded, not run) on a side stream, after one step there to warm up its
        libraries and build its kernels (Triton loads a kernel at its first launch, which a capture refuses), with
        the options the captured steps use. The warm-up writes the cache slot that the chunk's first step rewrites
        before reading it; the logits (a fused step's own buffer), the step counter and the cache position it
        changes are put back. A fused step whose kernels have run as the chunk runs them (`generate` takes one
        step before the first chunk) needs no warm-up step: only its draw's kernel is built first."""
        began = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        current = torch.cuda.current_stream(self.stream.device)
        warm_up = not (self.stats.fused and getattr(self.step, "built_advancing", False))
        kept = [(buffer, buffer.clone()) for buffer in (self.logits, self.counter, self.view.input_pos)] \
            if warm_up else []
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                if warm_up:  # the step's first call, where it compiles, may fall back
                    _, self.step = _static_step(self.step, self.model, self.current, self.view, self.head_t,
                                                self.stats, first=True)
                    for buffer, value in kept:
                        buffer.copy_(value)
                self._warm_up_draw()
            with torch.cuda.graph(graph, stream=self.stream):
                self._take_steps()
        except Exception as exc:  # any failure means: go on without the graph
            self.stats.graph_error = described(exc)
            graph = None
        current.wait_stream(self.stream)
        self.graph = graph
        self.stats.graphed = graph is not None
        self.stats.capture_s = time.perf_counter() - began

    def _warm_up_draw(self) -> None:
        """Build the draw's kernel before capturing (the first launch compiles it), on copies of its state; if
        that fails, draw as the other steps do (PyTorch's kernels)."""
        self.fused_draw = self.fused_draw and self.stats.fused
        if not self.fused_draw:
            return
        self.draw.scratch_for(self.logits)  # shared with the copy: made outside the capture
        state = copy.copy(self.draw)
        state.finished, state.first_bad = self.draw.finished.clone(), self.draw.first_bad.clone()
        state.seen = self.draw.seen.clone() if self.draw.seen is not None else None
        uniform = self.uniform[:, :1].to(self.logits.device) if self.uniform is not None else None
        try:
            state.next_into(self.logits, self.counter, uniform, self.tokens.clone(), 0, self.current.clone())
        except Exception:  # the step's kernels built: a failure here costs only the draw's speed
            self.fused_draw = False

    def _take_steps(self) -> None:
        uniform = self.uniform.to(self.logits.device) if self.uniform is not None else None
        for i in range(self.steps):
            numbers = None if uniform is None else uniform[:, i : i + 1]  # this step's uniform number per sample
            if self.fused_draw and self.stats.fused:
                self.draw.next_into(self.logits, self.counter, numbers, self.tokens, i, self.current)
            else:
                token = self.draw.next(self.logits, self.counter, numbers)
                self.tokens[:, i] = token
                self.current.copy_(token[:, None])
            logits, self.step = _static_step(self.step, self.model, self.current, self.view, self.head_t,
                                             self.stats, first=self.chunks == 0 and i == 0)
            if logits is not self.logits:
                self.logits.copy_(logits)
            if getattr(self.step, "advance", None) is not self.counter:
                self.view.input_pos.add_(1)
                self.counter.add_(1)


def _static_step(step: Callable, model: GPT, current: torch.Tensor, view: StaticDecodeView,
                 head_t: torch.Tensor | None, stats: GenerationStats, first: bool) -> tuple[torch.Tensor, Callable]:
    """One static decode step -> (logits (B, V), the step to use next time).

    The first call of a compiled or fused step builds its kernels; if that fails (no Triton, no C++ compiler, a
    backend torch.compile does not support, a GPU Triton cannot target) decoding goes on eagerly with the same
    static view, and `stats` says why.
    """
    if step is _last_logits:
        return step(model, current, view, head_t), step
    if current.device.type == "cuda" and not stats.fused:
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs have been consumed
    if not first:
        return step(model, current, view, head_t), step
    try:
        return step(model, current, view, head_t), step
    except Exception as exc:
        stats.compiled = stats.fused = False
        stats.compile_error = compile_failure(exc)
        return _last_logits(model, current, view, head_t), _last_logits


# ----------------------------------------------------------------------------------------------- text
class TextStream:
    """A sample's token bytes in, text that is safe to show out.

    A UTF-8 character split across tokens is held until it is complete (bytes that can never form one become
    U+FFFD), and text that could be the start of a stop string is held until it is known not to be. Once a stop
    string appears, `stopped` is True, the text ends right before it and nothing more is released.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Released text is kept as pieces and what is held back as a short string, so that a push costs the size
        # of the new piece, not of everything so far (`+=` on one growing string made long samples quadratic).
        # A stop string never starts in released text (the held-back tail is the longest that could start one),
        # so only the held-back text is searched.
        self._parts: list[str] = []  # the text released so far, in pieces
        self._pending = ""  # decoded, not released yet: at most the longest stop string and one token's text
        self.stopped = False

    @property
    def text(self) -> str:
        """The text released so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def push(self, data: bytes) -> str:
        """Add one token's bytes; returns the newly released text (possibly empty)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        return self._release(final=False)

    def finish(self) -> str:
        """End of generation: release what is held (an incomplete character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for s in self.stop if (i := self._pending.find(s)) >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self._pending) if final else len(self._pending) - self._held_back()
        out, self._pending = self._pending[:end], self._pending[end:]
        if out:
            self._parts.append(out)
        return out

    def _held_back(self) -> int:
        """Length of the longest held tail that is a proper prefix of a stop string."""
        for size in range(min(self._longest - 1, len(self._pending)), 0, -1):
            tail = self._pending[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


@dataclass
class TextSample:
    """One sample of `sample_text`: its text, its tokens and why it ended."""

    text: str  # the continuation, without the prompt, the stop string or <|endoftext|>
    tokens: int  # tokens generated for it
    stop_reason: str  # "eot" | "stop" | "length"; "interrupted" in a KeyboardInterrupt's `partial`


@dataclass
class SampleResult:
    """What `sample_text` returns: the prompt, its length in tokens, the samples (one per `num_samples`) and the
    generation's timings (`GenerationStats`: tokens/s, time to first token, ...). A prompt longer than the model's
    context is continued from its end: `prompt_dropped` says how many of its first tokens the model did not see."""

    prompt: str
    prompt_tokens: int
    samples: list[TextSample]
    stats: GenerationStats = field(default_factory=GenerationStats)
    prompt_dropped: int = 0


def encode_prompt(prompt: str) -> list[int]:
    """GPT-2 ids of `prompt`; a literal `<|endoftext|>` in it is the document separator."""
    from tinygpt_cli.tokenizer import get_encoding

    return get_encoding().encode(prompt, allowed_special={EOT_TOKEN}, disallowed_special=())


def load_model(spec: str | Path | None = None, device: str = "auto", dtype: str | torch.dtype = "auto"
               ) -> LoadedCheckpoint:
    """Load a checkpoint (a run's latest; the latest run's by default) for generation, in eval mode, its weights
    cast to `dtype` (auto: bf16 on CUDA GPUs that have it, else fp16 there; fp32 elsewhere) on `device`.

    Casting the weights, rather than autocasting, halves what each decode step reads from memory.
    """
    from tinygpt_cli.export import load_model as load_any  # runs, checkpoints, HF GPT-2 folders, hub names
    from tinygpt_cli.training import resolve_device, resolve_dtype

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    loaded = load_any(spec, device=torch_device)
    if torch_dtype != torch.float32:
        loaded.model.to(torch_dtype)
    if torch_device.type == "cpu":
        decode_layout(loaded.model)  # type: ignore[arg-type]
    return loaded


def read_prompt(path: str | Path) -> str:
    """The text of a prompt file ("-": standard input), as it is: a final newline is part of the prompt."""

    if str(path) == "-":
        return read_stdin_prompt()
    path = Path(path).expanduser()
    try:
        with path.open("rb") as handle:  # as it is: no newline translation (\r\n stays), as from stdin
            return decode_text(_bounded_prompt(handle.read(PROMPT_MAX_BYTES + 1), f"prompt file {path}"))
    except FileNotFoundError:
        raise GenerationError(f"prompt file {path} does not exist: check the --prompt-file path") from None
    except UnicodeDecodeError:
        raise GenerationError(f"prompt file {path} is not UTF-8 text: convert it, e.g. "
                              f"{conversion_advice(str(path))}") from None
    except OSError as exc:
        raise GenerationError(f"cannot read prompt file {path} ({exc.strerror}): check the path") from None


def read_stdin_prompt() -> str:
    """All of standard input as the prompt, as it is; bytes that are not UTF-8 are an error, as in a prompt file."""
    import sys

    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # replaced by a text-only stream (tests, notebooks): already decoded
        return sys.stdin.read()
    try:
        return decode_text(_bounded_prompt(stream.read(PROMPT_MAX_BYTES + 1), "standard input"))
    except UnicodeDecodeError:
        raise GenerationError("standard input is not UTF-8 text: convert it, e.g. iconv -t utf-8") from None


# The most of a prompt read: far more than any context holds (the prompt is cropped to its end), and an endless
# input (/dev/zero, `yes |`) stops here instead of filling the memory.
PROMPT_MAX_BYTES = 64 << 20


def _bounded_prompt(data: bytes, what: str) -> bytes:
    if len(data) > PROMPT_MAX_BYTES:
        raise GenerationError(f"{what} holds more than {PROMPT_MAX_BYTES >> 20} MiB (or never ends): a prompt is cut "
                              f"to the model's context anyway, so pass its last part")
    return data


def check_prompt_fits(prompt_ids: Sequence[int], model: GPT) -> None:
    """Raise a GenerationError if the prompt is longer than the model's context."""
    block = model.config.block_size
    if len(prompt_ids) > block:
        raise GenerationError(
            f"the prompt is {len(prompt_ids)} tokens but the model's context is {block}: shorten the prompt"
        )


def sample_text(
    model: GPT,
    prompt: str,
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 200,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    stop: Sequence[str] = (),
    stop_at_eot: bool = True,
    num_samples: int = 1,
    seed: int | None = None,
    compile: bool = False,
    lookahead: bool | None = None,
    fused: bool = False,
    on_text: Callable[[int, str], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> SampleResult:
    """Continue `prompt` `num_samples` times (one batch) and return the texts.

    `on_text(sample_index, text)` receives each sample's text as soon as it is safe to show (see TextStream);
    `on_start()` is called once the settings are checked and the first token is drawn, before any text. A prompt
    longer than the model's context is continued from its last `block_size` tokens, as the window slides during
    generation (nanoGPT crops so too); the result says how many were dropped.
    A sample ends at `<|endoftext|>` (unless `stop_at_eot` is False), at the first of the `stop` strings, or after
    `max_new_tokens`; the batch ends when every sample has. A KeyboardInterrupt (Ctrl-C) is raised as it came, its
    `partial` the result so far, the samples not ended then "interrupted".
    """
    from tinygpt_cli.tokenizer import get_encoding

    check_model(model, "sample_text")
    if not isinstance(prompt, str):
        raise GenerationError(f"sample_text takes the prompt as text, not a {type(prompt).__name__}: generate "
                              "takes token ids")
    stop = [stop] if isinstance(stop, str) else list(stop)  # one text, not its characters
    if any(not s for s in stop):
        raise GenerationError("--stop needs a non-empty text")
    encoding = get_encoding()
    prompt_ids = encode_prompt(prompt)
    dropped = max(0, len(prompt_ids) - model.config.block_size)
    prompt_ids = prompt_ids[dropped:]
    stats = GenerationStats()
    tokens = generate(
        model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, num_samples=num_samples, seed=seed, stop_at_eot=stop_at_eot,
        compile=compile, stats=stats, lookahead=lookahead, fused=fused,
    )
    emit = on_text or (lambda index, text: None)
    streams: list[TextStream] = []  # per sample, made once `generate` has checked num_samples against memory
    reasons: list[str] = []
    counts: list[int] = []
    done: list[bool] = []

    def result(interrupted: bool = False) -> SampleResult:
        for row, stream in enumerate(streams):
            tail = stream.finish()
            if tail and not interrupted:  # (cut short: the caller has stopped showing text)
                emit(row, tail)
            if stream.stopped and reasons[row] == "length":  # a stop string completed by the held-back end
                reasons[row] = "stop"
            elif interrupted and not done[row]:
                reasons[row] = "interrupted"
        samples = [TextSample(s.text, n, r) for s, n, r in zip(streams, counts, reasons, strict=True)]
        return SampleResult(prompt, stats.prompt_tokens or len(prompt_ids), samples, stats, dropped)

    try:
        first = next(tokens)  # the settings are checked and memory allocated before any per-sample state
        if on_start is not None:  # generation is under way: a caller may show the prompt now
            on_start()
        streams = [TextStream(stop) for _ in range(num_samples)]
        reasons[:], counts[:], done[:] = ["length"] * num_samples, [0] * num_samples, [False] * num_samples
        for step_tokens in itertools.chain([first], tokens):
            for row, token in enumerate(step_tokens.tolist()):
                if done[row]:
                    continue
                counts[row] += 1
                if stop_at_eot and token == EOT_ID:
                    done[row], reasons[row] = True, "eot"
                    continue
                piece = streams[row].push(encoding.decode_single_token_bytes(token))
                if piece:
                    emit(row, piece)
                if streams[row].stopped:
                    done[row], reasons[row] = True, "stop"
            if all(done):
                break
    except KeyboardInterrupt as exc:  # Ctrl-C: still raised, with what the samples had (`exc.partial`)
        if streams:
            exc.partial = result(interrupted=True)  # type: ignore[attr-defined]
        raise
    finally:
        tokens.close()
    return result()
