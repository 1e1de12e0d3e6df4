"""GPT-2 in PyTorch: learned positions, pre-LayerNorm blocks, GELU MLP, tied embeddings.

Parameter names follow Hugging Face's GPT2LMHeadModel (`transformer.wte`, `transformer.h.0.attn.c_attn`, ...),
so exporting is a transpose of the Conv1D weights and nothing else. Linear layers are `nn.Linear`
(weight shape (out, in)); HF's Conv1D stores (in, out).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from tinygpt_cli.config import ModelConfig
from tinygpt_cli.tokenizer import VOCAB_SIZE


class KVCacheLike(Protocol):
    """What attention needs from a KV cache (see `sample.KVCache` and `sample.StaticDecodeView`)."""

    def positions(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        """Absolute positions (T,) of the next `n_tokens` tokens; raises ValueError past the cache's room."""
        ...

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store k, v (B, nh, T, hd); return the keys and values to attend over (B, nh, S, hd) and a boolean
        mask (T, S) of the keys each query may see, or None where plain attention is right: causal when
        S == T (the new tokens are all there is), every key when T == 1."""
        ...

    def advance(self, n_tokens: int) -> None: ...


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_head = cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, kv_cache: KVCacheLike | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        mask = None
        is_causal = True
        if kv_cache is not None:
            k, v, mask = kv_cache.update(self.layer, k, v)  # (B, nh, S, hd), mask (T, S) or None
            is_causal = mask is None and T > 1
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers)
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg, layer)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, kv_cache: KVCacheLike | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """GPT-2: learned positions, pre-LayerNorm blocks, tanh-GELU MLPs and a head tied to the token embedding, with
    Hugging Face's parameter names. `forward(idx, targets=None, kv_cache=None)` -> (logits, loss)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        # The loss with targets: the fused chunked head (eager: fastest, least memory) or, when the model runs
        # under torch.compile, plain logits + cross-entropy, which inductor fuses into its own kernels
        # (on an H100 that beats the chunked head's extra fp32 passes; docs/performance.md has the figures).
        self.fused_loss = True
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance
        # does not grow with depth (two residual additions per block).
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, param in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(param, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters, counting the tied head once; `non_embedding` leaves out wte and wpe."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.transformer.wte.weight.numel() + self.transformer.wpe.weight.numel()
        return total

    def hidden_states(self, idx: torch.Tensor, kv_cache: KVCacheLike | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C) after ln_f, for token ids `idx` (B, T)."""
        T = idx.size(1)
        if kv_cache is not None:
            pos = kv_cache.positions(T, idx.device)  # (T,) absolute positions, after the cached ones
        elif self.config.block_size < T:
            raise ValueError(f"sequence of {T} tokens exceeds block_size {self.config.block_size}")
        else:
            pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = block(x, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.transformer.ln_f(x)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Returns (logits, loss).

        With `targets` (B, T): the mean cross-entropy over positions whose target is not -1, and no logits
        (with `fused_loss` the (B, T, vocab) fp32 logits are never kept whole; see `chunked_cross_entropy`).
        The softmax is over GPT-2's 50257 ids, as in evaluation and sampling: the rows that pad the embedding
        take no probability (zero rows, as a Hugging Face GPT-2 is padded on loading, would take nearly all of it
        from its logits of about -60).
        Without: logits (B, T, vocab) — the caller slices `[:, -1]` when it only needs the last position.
        """
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        if targets is None:
            return self.lm_head(x), None
        # traced by torch.compile, the whole-logits loss below, which inductor fuses; the fused one is a Python loop
        # of large matmuls for eager runs (is_compiling is cheap: no torch._dynamo import for eager use)
        # (fp32 weights, as training keeps them: a model cast to bf16 or fp64 whole takes the plain loss below)
        if self.fused_loss and self.lm_head.weight.dtype == torch.float32 and not torch.compiler.is_compiling():
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)  # (B, T, V): bf16 under autocast; compiled, the upcast below fuses into the loss
        return None, F.cross_entropy(logits[..., :VOCAB_SIZE].flatten(0, 1).float(), targets.flatten(),
                                     ignore_index=-1)


def gpt_to_load(cfg: ModelConfig) -> GPT:
    """A GPT whose weights a checkpoint or a folder is about to give it (`load_weights`), built on the meta device:
    nothing is allocated nor initialised only to be overwritten (initialising a 1.5B model takes seconds), and
    nothing is drawn from the caller's random stream (a notebook's seeded draws stay). Its parameters are fp32
    whatever the caller's default dtype."""
    with fp32_default(), torch.random.fork_rng(devices=[]), torch.device("meta"):
        return GPT(cfg)


@contextlib.contextmanager
def fp32_default() -> Iterator[None]:
    """fp32 as torch's default dtype inside, whatever the caller's (a notebook's `set_default_dtype(float64)`)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(default)


def load_weights(model: GPT, tensors: dict[str, torch.Tensor]) -> GPT:
    """Give `model`, a `gpt_to_load` model, the weights `tensors` (every parameter but the tied head, their names
    and shapes checked by the caller), copied into fp32 parameters of its own: no tensor of a file's memory map
    outlives the load (Windows deletes no mapped file, and a run prunes its old checkpoints)."""
    model.lm_head.weight = None  # no storage of its own, even for a moment: it is wte's
    model.to_empty(device="cpu")
    model.lm_head.weight = model.transformer.wte.weight  # tied, as GPT() ties them
    model.load_state_dict(tensors, strict=False)
    return model


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` that never holds all (N, V) logits and needs no backward pass
    over them: each chunk's softmax is turned into its gradient in place, right after the loss is read.

    This is the largest cost of a small GPT (the vocabulary is 50304 wide); done this way it is more than 2x
    faster on CPU than logits + F.cross_entropy and peak memory holds one chunk of logits. Per chunk the only
    pass over the (n, V) logits besides the matmuls is one softmax kernel, which works a row at a time in cache;
    the one-hot is subtracted at n positions and the 1/count scale is applied to the (n, C) products instead.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_tokens, grad_enabled):  # type: ignore[override]
        n_tokens = hidden.size(0)
        valid = targets != -1  # (N,)
        count = valid.sum().clamp(min=1)
        inv_count = 1.0 / count.float()
        # needs_input_grad stays True under no_grad (an evaluation would compute the gradients too), and forward
        # itself always runs without grad: the caller's grad mode comes as `grad_enabled`
        need_grad = grad_enabled and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1])
        # fp16 autocast would run the gradient matmuls in fp16, where a rare token's row, scaled by 1/count before
        # the GradScaler's factor comes in, underflows to zero: they run in fp32 then (bf16 has fp32's range)
        exact_grads = torch.autocast(hidden.device.type, enabled=False) if _autocast_fp16(hidden.device.type) \
            else contextlib.nullcontext()
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        on_cpu = hidden.device.type == "cpu"
        workspace = _cpu_workspace(min(chunk_tokens, n_tokens), weight) if on_cpu else None
        for begin in range(0, n_tokens, chunk_tokens):
            h = hidden[begin : begin + chunk_tokens]  # (n, C)
            keep = valid[begin : begin + chunk_tokens]  # (n,)
            safe_targets = targets[begin : begin + chunk_tokens].clamp(min=0)[:, None]  # (n, 1)
            logits = _chunk_logits(h, weight, workspace)  # (n, V) fp32
            logits[:, VOCAB_SIZE:] = float("-inf")  # the padding rows: no probability, so no gradient
            probs, nll = _softmax_and_nll_(logits, safe_targets, h, weight, sync_free=not on_cpu)
            total = total + (nll * keep).sum()
            if need_grad:
                # d(mean loss)/d(logits) = (softmax - onehot(target)) * keep / count, row by row
                probs.scatter_add_(1, safe_targets, torch.full_like(safe_targets, -1, dtype=probs.dtype))
                scale = (keep * inv_count)[:, None]  # (n, 1)
                grad_logits = probs.to(weight.dtype)
                with exact_grads:
                    grad_hidden[begin : begin + chunk_tokens] = ((grad_logits @ weight) * scale).to(hidden.dtype)
                    if on_cpu:  # in place: no second vocabulary × width fp32 array, which counts against the RAM
                        grad_weight.addmm_(grad_logits.t(), h.to(weight.dtype) * scale)
                    else:  # under autocast, a half-precision product (addmm_ in place would run in fp32)
                        grad_weight.add_(grad_logits.t() @ (h.to(weight.dtype) * scale))
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total / count

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output, (grad_weight * grad_output).to(grad_weight.dtype), None, None, None


def _softmax_and_nll_(logits: torch.Tensor, targets: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                      sync_free: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax of `logits` (n, V) in place, and each row's negative log-likelihood of `targets` (n, 1), exactly.

    One pass: the loss is read from the target's probability, and a row where that falls below fp32's normal
    range (a target ~87 nats below the best) gets its loss recomputed from `hidden` (n, C) @ `weight`.T, which
    needs a look at the host. `sync_free` (CUDA) takes two passes instead, log-softmax then exp, and never waits
    for the device.
    """
    if sync_free:
        log_probs = torch.log_softmax(logits, dim=1, out=logits)
        nll = -log_probs.gather(1, targets).squeeze(1)
        return log_probs.exp_(), nll
    probs = torch.softmax(logits, dim=1, out=logits)
    target_probs = probs.gather(1, targets).squeeze(1)
    nll = -target_probs.log()
    lost = (target_probs < torch.finfo(torch.float32).tiny).nonzero().squeeze(1)  # 0 or subnormal: imprecise
    if lost.numel():
        exact = (hidden[lost] @ weight[:VOCAB_SIZE].t()).float()
        nll[lost] = torch.logsumexp(exact, 1) - exact.gather(1, targets[lost]).squeeze(1)
    return probs, nll


# Tokens per chunk of the fused loss: 2048 × 50304 fp32 logits are 412 MB. Larger chunks mean fewer passes
# over the head's weight and its gradient; 2048 was fastest on the 2-core CI CPU (vs 256, 512, 1024).
LOSS_CHUNK_TOKENS = 2048

class _ThreadBuffers(threading.local):
    """One thread's reused CPU logits buffer: threads computing losses at once must not share one."""

    def __init__(self) -> None:
        self.by_shape: dict[tuple, torch.Tensor] = {}


_CPU_WORKSPACE = _ThreadBuffers()


def _cpu_workspace(rows: int, weight: torch.Tensor) -> torch.Tensor | None:
    """A reused (rows, V) fp32 buffer for CPU logits.

    A fresh 200 MB tensor per chunk costs more in page faults than the matmul that fills it (measured:
    73 vs 126 GFLOP/s on a 2-core EPYC), so CPU training keeps one buffer per shape alive.
    """
    if weight.dtype != torch.float32:
        return None
    key = (rows, weight.size(0))
    held = _CPU_WORKSPACE.by_shape
    buffer = held.get(key)
    if buffer is None:
        held.clear()
        buffer = held[key] = torch.empty(key, dtype=torch.float32)
    return buffer


def release_cpu_workspace() -> None:
    """Drop the buffer `_cpu_workspace` keeps for this thread between chunks and steps (at a run's end)."""
    _CPU_WORKSPACE.by_shape.clear()


def _autocast_fp16(device_type: str) -> bool:
    """Whether autocast is on for `device_type` with fp16 as its dtype (False where torch has no autocast for that
    device: MPS before torch 2.5 raises on the question)."""
    try:
        return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16
    except RuntimeError:
        return False


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, workspace: torch.Tensor | None) -> torch.Tensor:
    if workspace is not None and h.dtype == torch.float32:
        return torch.mm(h, weight.t(), out=workspace[: h.size(0)])
    return (h @ weight.t()).float()


def chunked_cross_entropy(
    hidden: torch.Tensor, head_weight: torch.Tensor, targets: torch.Tensor, chunk_tokens: int = LOSS_CHUNK_TOKENS
) -> torch.Tensor:
    """Mean cross-entropy of `hidden @ head_weight.T` against `targets` (-1 = ignore).

    hidden (B, T, C), head_weight (V, C), targets (B, T). Returns a scalar fp32 tensor.
    """
    flat_hidden = hidden.reshape(-1, hidden.size(-1))  # (N, C)
    return _FusedLinearCrossEntropy.apply(flat_hidden, head_weight, targets.reshape(-1), chunk_tokens,
                                          torch.is_grad_enabled())
