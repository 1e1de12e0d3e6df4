"""Generation: a preallocated KV cache, a pure `sample_next_token`, and `generate` yielding token ids.

Decoding ids to text is the caller's job (the CLI streams it with an incremental UTF-8 decoder).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from tinygpt_cli.errors import GenerationError
from tinygpt_cli.model import GPT
from tinygpt_cli.tokenizer import EOT_ID, VOCAB_SIZE


class KVCache:
    """Keys and values of every layer for up to `max_tokens` positions, allocated once.

    k, v: (n_layer, B, n_head, max_tokens, head_dim). `pos` counts the positions filled so far.
    """

    def __init__(self, model: GPT, batch_size: int, max_tokens: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        cfg = model.config
        max_tokens = max_tokens or cfg.block_size
        param = next(model.parameters())
        shape = (cfg.n_layer, batch_size, cfg.n_head, max_tokens, cfg.n_embd // cfg.n_head)
        self.k = torch.zeros(shape, dtype=dtype or param.dtype, device=param.device)
        self.v = torch.zeros_like(self.k)
        self.pos = 0
        self.max_tokens = max_tokens

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, nh, T, hd) at positions pos..pos+T; return all keys/values so far (B, nh, pos+T, hd)."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_tokens: int) -> None:
        self.pos += n_tokens

    def reset(self) -> None:
        self.pos = 0


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token for each row of `logits` (B, V) -> (B,) int64.

    temperature 0 is greedy; top_k 0 and top_p 1 disable those filters. Pure: no state but `generator`.
    """
    logits = logits[:, :VOCAB_SIZE].float()  # the padded ids past GPT-2's vocabulary are never sampled
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        remove = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses p
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    if probs.device.type != "cpu" and generator is not None and generator.device != probs.device:
        probs = probs.cpu()
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(
    model: GPT,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.8,
    top_k: int = 200,
    top_p: float = 1.0,
    num_samples: int = 1,
    seed: int | None = None,
    use_cache: bool = True,
    stop_at_eot: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample, (num_samples,) int64 on CPU, `max_new_tokens` times.

    The prompt is prefilled in one pass, then one token per step through the KV cache. When the context
    fills up the window slides: the cache is rebuilt from the last half-context of tokens.
    With `stop_at_eot`, stops once every sample has produced `<|endoftext|>`.
    """
    block = model.config.block_size
    if not prompt:
        prompt = [EOT_ID]  # an empty prompt starts a fresh document
    if len(prompt) > block:
        raise GenerationError(
            f"the prompt is {len(prompt)} tokens but the model's context is {block}: shorten the prompt"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    tokens = torch.tensor([list(prompt)] * num_samples, dtype=torch.long, device=device)  # (B, T)
    cache = KVCache(model, num_samples) if use_cache else None
    logits, _ = model(tokens, kv_cache=cache)  # (B, T, V)
    finished = torch.zeros(num_samples, dtype=torch.bool)
    for produced in range(max_new_tokens):
        next_token = sample_next_token(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        yield next_token.cpu()
        finished |= next_token.cpu() == EOT_ID
        if (stop_at_eot and bool(finished.all())) or produced == max_new_tokens - 1:
            return
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        if cache is None:
            logits, _ = model(tokens[:, -block:])
        elif cache.pos < block:
            logits, _ = model(next_token[:, None], kv_cache=cache)
        else:  # context full: slide the window, keeping the last half-context as the new prefix
            cache.reset()
            logits, _ = model(tokens[:, -(block // 2 + 1):], kv_cache=cache)
