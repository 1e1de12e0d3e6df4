"""One decode step of GPT-2 in five Triton kernels per layer, for batch-1 generation on CUDA.

A step at batch 1 reads every weight once, so it should run at the GPU's memory bandwidth. Kernel by kernel it does
not: PyTorch's step is ~150 small kernels (compiled) or ~220 (eager) and on an H200 it reads the weights at 8-13% of
the bandwidth (docs/performance.md): each layer norm, bias, GELU, residual add and cache write is a kernel of its
own, and cuBLAS tiles a one-row product 64 columns wide, so a 768-wide layer's product keeps a third of the GPU busy.
Here a layer is five kernels, each spread over every multiprocessor:

1. layer norm 1 + the QKV product + bias; the key and value go straight into the cache slot of this step (the
   first layer's also embeds the token, and stores the embedding as the residual stream);
2. attention of the one query over the cached keys (online softmax), every head at once, over only the blocks of
   slots that the context fills (one block: no combine of partial softmaxes);
3. the attention output projection + bias + the residual add;
4. layer norm 2 + the MLP's first product + bias + GELU;
5. the MLP's second product + bias + the residual add;

plus one kernel for the final layer norm + the head (which also moves the cache position
and the caller's step counter on, `FusedDecodeStep.advance`); `draw_token` takes the next token from the logits in
one more, greedy or sampled (temperature and top-k, after one PyTorch top-k for the k-th largest logit), with its
bookkeeping. Every product is a matrix-vector product over blocks of output rows (`gemv_blocks`), with each block
reading its rows whole and recomputing the layer norm of its input row, which is cheaper than a kernel of its own at
this size.

On Hopper and newer GPUs the kernels are programmatic dependent launches (`uses_pdl`): each lets the next launch at
once, and the next requests its weights while the one before finishes, waiting only before it reads what that
one wrote. The memory system then streams weights across kernel boundaries instead of idling at each.

Values are rounded to the model's dtype where PyTorch's step rounds them (after each layer norm, product, GELU and
residual add), so the step gives PyTorch's logits up to float rounding: the order of sums, and on a GPU fast
approximate square roots and exponentials (as PyTorch's own CUDA kernels use). `FusedDecodeStep` reads and writes
the same static cache as `sample.StaticDecodeView`, so `generate` captures it as a CUDA graph like any other step.

Tests run the kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1, set before this module is
imported), which checks what they compute, not how fast.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from typing import TYPE_CHECKING

import torch

try:  # CUDA builds of torch on Linux ship Triton; CPU builds do not
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

try:  # programmatic dependent launch (Triton >= 3.5; the GPU must be a Hopper or newer)
    from triton.backends.nvidia.compiler import CUDAOptions
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    # 3.4.0 has both, but its gdc_* still take `_builder` where its compiler passes `_semantic`: they do not compile
    PDL_SUPPORTED = ("launch_pdl" in CUDAOptions.__dataclass_fields__
                     and "_semantic" in inspect.signature(gdc_wait).parameters)
except (ImportError, AttributeError):  # pragma: no cover - depends on the install
    PDL_SUPPORTED = False
    if triton is not None:  # the kernels name these in branches that such a Triton never compiles

        @triton.jit
        def gdc_wait():
            pass

        @triton.jit
        def gdc_launch_dependents():
            pass

if TYPE_CHECKING:
    from tinygpt_cli.model import GPT
    from tinygpt_cli.sample import StaticDecodeView

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # what `triton.jit` saw when this module was imported


def unavailable(device: torch.device) -> str | None:
    """Why the fused step cannot run on `device`, or None where it can."""
    if INTERPRETED and triton is not None:
        return None  # Triton's interpreter runs the kernels on the CPU (tests)
    if device.type != "cuda":
        return f"they run on NVIDIA CUDA GPUs, not {device.type}"
    if torch.version.hip is not None:
        return "they run on NVIDIA CUDA GPUs; on ROCm they are untested"
    if triton is None:
        return "Triton is not installed (CUDA builds of torch on Linux include it)"
    return None


# How the kernels split their work; bench/decode_profile.py --sweep tries others on a GPU. A product runs in blocks of
# output rows, at least `programs_per_sm` blocks per multiprocessor where the rows allow it, each block reading up to
# `block_k` input columns at a time (all of them in one pass where they fit) and at most `tile` weights at once (a
# larger tile has more loads in flight, and more registers). Attention splits the cached slots into blocks of
# `block_s` (128: on an H100 it beat 32, 64 and 256 at cache positions 0 to 1023, 4% faster than 64 at a full cache;
# on an H200, at position 0 only, 9% faster than 64; docs/performance.md). The product settings were the sweep's best
# on the H200, within 4% of it on the H100. `force_block_k` (tests) sets the columns per pass whatever the rest says.
# `pdl`: launch each kernel as a programmatic dependent launch where the GPU (Hopper or newer) and Triton allow it.
# `draw_block` and `draw_warps`: the logits each program of a draw (`draw_token`) reads, and its warps.
# `samples_per_program`: with several samples (`--num-samples`), a product's block takes up to this many of them
# (the largest number that divides the batch), so that it reads its weights once for them all; 1 (a block a sample)
# until a GPU has timed more.
TUNING = {"programs_per_sm": 2, "block_k": 8192, "tile": 8192, "num_warps": 4, "block_s": 128, "force_block_k": 0,
          "pdl": True, "draw_block": 2048, "draw_warps": 4, "samples_per_program": 1}


def uses_pdl(capability: tuple[int, int]) -> bool:
    """Whether kernels launch as programmatic dependent launches on a GPU of this compute capability: Hopper
    (9.0) and newer run them, and Triton must have them (3.5 and newer; see PDL_SUPPORTED)."""
    return PDL_SUPPORTED and not INTERPRETED and capability >= (9, 0)


def _launch_options(device: torch.device, num_warps: int) -> dict[str, object]:
    """How a kernel is launched on `device`: its warps, and its PDL switch with the matching `launch_pdl` option
    (programmatic dependent launch where TUNING["pdl"] and `uses_pdl` allow it)."""
    pdl = device.type == "cuda" and bool(TUNING["pdl"]) and uses_pdl(torch.cuda.get_device_capability(device))
    return {"num_warps": num_warps, "PDL": pdl, **({"launch_pdl": True} if pdl else {})}


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` made current for the launches: Triton launches on the current CUDA device, not the tensors'."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def gemv_blocks(n_rows: int, n_programs: int, most: int = 64) -> int:
    """Output rows per block for a product with `n_rows` outputs: the largest power of two up to `most` that
    gives at least `n_programs` blocks, else 1."""
    rows = 1 << (max(1, most).bit_length() - 1)
    while rows > 1 and -(-n_rows // rows) < n_programs:
        rows //= 2
    return rows


if triton is not None:

    @triton.jit
    def _input(x_row, cols, col_ok, tokens, b, pos_ptr, wte, wpe, K, dtype, EMBED: tl.constexpr):
        """Columns `cols` of a product's input row (f32): the row at x_row, or with EMBED the model's input,
        wte[tokens[b]] + wpe[pos] rounded to the model's dtype (the first layer's QKV product, which also stores
        it as the residual stream)."""
        if EMBED:
            token = tl.load(tokens + b)
            pos = tl.load(pos_ptr)
            e = (tl.load(wte + token * K + cols, mask=col_ok, other=0.0).to(tl.float32)
                 + tl.load(wpe + pos * K + cols, mask=col_ok, other=0.0).to(tl.float32))
            return e.to(dtype).to(tl.float32)
        else:
            return tl.load(x_row + cols, mask=col_ok, other=0.0).to(tl.float32)

    @triton.jit
    def _gelu_tanh(y):
        # GPT-2's GELU (tanh approximation); tanh(u) = 1 - 2 / (exp(2u) + 1), exact at both ends
        u = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        return 0.5 * y * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))

    @triton.jit
    def _normalized(xk, col_ok, cols, mean, rstd, ln_w, ln_b, dtype, LN_BIAS: tl.constexpr):
        """A layer norm's output for the columns `cols` of a row, rounded to the model's dtype as torch's is."""
        xk = (xk - mean) * rstd * tl.load(ln_w + cols, mask=col_ok, other=0.0).to(tl.float32)
        if LN_BIAS:
            xk += tl.load(ln_b + cols, mask=col_ok, other=0.0).to(tl.float32)
        return tl.where(col_ok, xk.to(dtype).to(tl.float32), 0.0)

    @triton.jit
    def _gemv(x, w, bias, ln_w, ln_b, out, q_out, k_cache, v_cache, pos_ptr, counter, tokens, wte, wpe,
              N, K, stride_wn, stride_wk, eps, n_head, S,
              HEAD_DIM: tl.constexpr, LN: tl.constexpr, LN_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
              GELU: tl.constexpr, RESIDUAL: tl.constexpr, QKV: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr, PDL: tl.constexpr, ADVANCE: tl.constexpr,
              EMBED: tl.constexpr, SAMPLES: tl.constexpr):
        """out[b, n] = f(sum_k g(x[b])[k] * w[n, k] + bias[n]) for the BLOCK_N rows n of this program and its
        SAMPLES samples b (program (i, j) takes samples j * SAMPLES ...: a ONE_PASS program reads its weights once
        for all of them, where a program a sample would read them once a sample).

        g: layer norm of the row (LN), else identity. f: GELU (GELU); `out[b, n] + ...` in place (RESIDUAL).
        QKV: the outputs are the query (to q_out (B, C)), key and value (to the caches (B, nh, S, hd) at slot pos).
        ADVANCE (the head, the step's last kernel, which reads neither): one program adds 1 to the cache position
        and to `counter`, the caller's step counter, for the next step.
        EMBED (the first layer's QKV): the input row is the embedding of tokens[b] at the cache position
        (`_input`), which the first program also stores to x, the residual stream.
        ONE_PASS (BLOCK_K >= K): the weights are requested first, so that reading the row and its layer norm
        happen while they are on their way; else the row is read BLOCK_K columns at a time, its norm first.

        PDL (a programmatic dependent launch): the next kernel may start as soon as every program here has, and
        each program reads what an earlier kernel wrote (its row, the cache position, `out` for the residual) only
        after `gdc_wait`, which returns once the kernel before has finished and its writes are visible. The
        weights are constant, so a ONE_PASS program requests them before it waits: a kernel's weight reads then
        overlap the tail of the one before, instead of the GPU's memory idling at every kernel boundary.
        """
        if PDL:
            gdc_launch_dependents()
        pid = tl.program_id(0)
        dtype = out.dtype.element_ty
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        if ONE_PASS:
            cols = tl.arange(0, BLOCK_K)
            col_ok = cols < K
            tile = tl.load(w + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                           mask=row_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_first")
        if PDL:
            gdc_wait()
        for i in tl.static_range(SAMPLES):  # the samples of this program, one tile of weights for all of them
            b = tl.program_id(1) * SAMPLES + i
            x_row = x + b * K
            if ONE_PASS:
                xk = _input(x_row, cols, col_ok, tokens, b, pos_ptr, wte, wpe, K, dtype, EMBED)
                if EMBED:  # noqa: SIM102 (a test made when the kernel is built, around one made when it runs)
                    if pid == 0:  # the residual stream starts here
                        tl.store(x_row + cols, xk.to(dtype), mask=col_ok)
                if LN:  # as torch's layer norm: the mean, then the variance about it
                    mean = tl.sum(xk, axis=0) / K
                    centred = tl.where(col_ok, xk - mean, 0.0)
                    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / K + eps)
                    xk = _normalized(xk, col_ok, cols, mean, rstd, ln_w, ln_b, dtype, LN_BIAS)
                acc = tile.to(tl.float32) * xk[None, :]
            else:
                mean = 0.0
                rstd = 1.0
                if LN:
                    part = tl.zeros((BLOCK_K,), dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        cols = k0 + tl.arange(0, BLOCK_K)
                        part += _input(x_row, cols, cols < K, tokens, b, pos_ptr, wte, wpe, K, dtype, EMBED)
                    mean = tl.sum(part, axis=0) / K
                    part = tl.zeros((BLOCK_K,), dtype=tl.float32)
                    for k0 in range(0, K, BLOCK_K):
                        cols = k0 + tl.arange(0, BLOCK_K)
                        centred = _input(x_row, cols, cols < K, tokens, b, pos_ptr, wte, wpe, K, dtype, EMBED) - mean
                        part += tl.where(cols < K, centred * centred, 0.0)
                    rstd = 1.0 / tl.sqrt(tl.sum(part, axis=0) / K + eps)
                acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    cols = k0 + tl.arange(0, BLOCK_K)
                    col_ok = cols < K
                    part_tile = tl.load(w + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                                        mask=row_ok[:, None] & col_ok[None, :], other=0.0,
                                        eviction_policy="evict_first")
                    xk = _input(x_row, cols, col_ok, tokens, b, pos_ptr, wte, wpe, K, dtype, EMBED)
                    if EMBED:  # noqa: SIM102 (as above)
                        if pid == 0:
                            tl.store(x_row + cols, xk.to(dtype), mask=col_ok)
                    if LN:
                        xk = _normalized(xk, col_ok, cols, mean, rstd, ln_w, ln_b, dtype, LN_BIAS)
                    acc += part_tile.to(tl.float32) * xk[None, :]
            y = tl.sum(acc, axis=1)
            if HAS_BIAS:
                y += tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)
            y = y.to(dtype)
            if GELU:
                y = _gelu_tanh(y.to(tl.float32)).to(dtype)
            if RESIDUAL:
                y = (y.to(tl.float32) + tl.load(out + b * N + rows, mask=row_ok, other=0.0).to(tl.float32)).to(dtype)
            if QKV:
                C = N // 3
                pos = tl.load(pos_ptr)
                tl.store(q_out + b * C + rows, y, mask=row_ok & (rows < C))
                kv = rows % C  # the column within the key or the value
                slot = ((b * n_head + kv // HEAD_DIM) * S + pos) * HEAD_DIM + kv % HEAD_DIM
                tl.store(k_cache + slot, y, mask=row_ok & (rows >= C) & (rows < 2 * C))
                tl.store(v_cache + slot, y, mask=row_ok & (rows >= 2 * C))
            else:
                tl.store(out + b * N + rows, y, mask=row_ok)
        if ADVANCE:
            first = (pid == 0) & (tl.program_id(1) == 0)
            tl.store(pos_ptr, tl.load(pos_ptr, mask=first, other=0) + 1, mask=first)
            tl.store(counter, tl.load(counter, mask=first, other=0) + 1, mask=first)

    @triton.jit
    def _attend(q, k_cache, v_cache, pos_ptr, y, part_acc, part_best, part_total, counts,
                n_head, S, n_split, scale,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, SPLITS: tl.constexpr,
                PDL: tl.constexpr):
        """y[b, head] = softmax(q k^T * scale) v over the cached slots 0..pos, split over the slots (flash-decoding):
        program (b, head, i) takes slots i * BLOCK_S ... . Only the blocks that hold a filled slot take part (the
        grid is sized for a full cache, as a CUDA graph needs); the others return at once. Where one block holds
        them all, its program writes the result itself. Else each writes its partial softmax, and the program that
        finishes a head last combines the partials in split order (so the result does not depend on which
        finished last) and resets the head's counter for the next step."""
        if PDL:  # (see _gemv)
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        h = tl.program_id(1)
        split = tl.program_id(2)
        pos = tl.load(pos_ptr)
        active = pos // BLOCK_S + 1  # the blocks holding slots 0..pos
        if split < active:
            C = n_head * HEAD_DIM
            dims = tl.arange(0, BLOCK_D)
            dim_ok = dims < HEAD_DIM
            query = tl.load(q + b * C + h * HEAD_DIM + dims, mask=dim_ok, other=0.0).to(tl.float32)
            head = (b * n_head + h).to(tl.int64)  # head * S * HEAD_DIM passes 2**31 for thousands of samples
            slots = split * BLOCK_S + tl.arange(0, BLOCK_S)
            filled = slots <= pos
            where = head * S * HEAD_DIM + slots[:, None] * HEAD_DIM + dims[None, :]
            inside = filled[:, None] & dim_ok[None, :]
            keys = tl.load(k_cache + where, mask=inside, other=0.0).to(tl.float32)
            values = tl.load(v_cache + where, mask=inside, other=0.0).to(tl.float32)
            scores = tl.where(filled, tl.sum(keys * query[None, :], axis=1) * scale, float("-inf"))
            best = tl.max(scores, axis=0)  # finite: the block holds a filled slot
            p = tl.exp(scores - best)
            acc = tl.sum(p[:, None] * values, axis=0)
            total = tl.sum(p, axis=0)
            if active == 1:  # the combine of one partial is this
                tl.store(y + b * C + h * HEAD_DIM + dims, (acc / total).to(y.dtype.element_ty), mask=dim_ok)
            else:
                part = head * n_split + split
                tl.store(part_acc + part * BLOCK_D + dims, acc)
                tl.store(part_best + part, best)
                tl.store(part_total + part, total)
                # every thread's stores above happen before the atomic (one thread's) releases them: Triton puts a
                # barrier there only as a side effect of the reductions, so it is asked for here
                tl.debug_barrier()
                if tl.atomic_add(counts + head, 1, sem="acq_rel") == active - 1:  # every other block has written
                    splits = tl.arange(0, SPLITS)
                    split_ok = splits < active
                    bests = tl.load(part_best + head * n_split + splits, mask=split_ok, other=float("-inf"),
                                    cache_modifier=".cg")
                    weights = tl.exp(bests - tl.max(bests, axis=0))  # 0 for the splits not taking part
                    totals = tl.load(part_total + head * n_split + splits, mask=split_ok, other=0.0,
                                     cache_modifier=".cg")
                    accs = tl.load(part_acc + (head * n_split + splits)[:, None] * BLOCK_D + dims[None, :],
                                   mask=split_ok[:, None], other=0.0, cache_modifier=".cg")
                    out = tl.sum(weights[:, None] * accs, axis=0) / tl.sum(weights * totals, axis=0)
                    tl.store(y + b * C + h * HEAD_DIM + dims, out.to(y.dtype.element_ty), mask=dim_ok)
                    tl.store(counts + head, 0)

    @triton.jit
    def _scaled(x, m, temperature, DIVIDE: tl.constexpr):
        """`sample_next_token`'s logits before its filters: shifted so that the largest is 0, over the temperature
        (as PyTorch divides by a number: on CUDA times its reciprocal (`temperature` is then that), else divided),
        the largest kept at 0."""
        shifted = x - m
        scaled = shifted / temperature if DIVIDE else shifted * temperature
        return tl.where(shifted == 0, shifted, scaled)

    @triton.jit
    def _draw_slice(row, cols, V, width, bounds, n_bounds, temperature, MODE: tl.constexpr, TOP_K: tl.constexpr,
                    DIVIDE: tl.constexpr, BOUNDS: tl.constexpr):
        """The logits of columns `cols` of a row as the draw sees them (f32, -inf past V), whether any is NaN or
        +inf, and for a sampled draw the weight of each, exp(its scaled logit), 0 where top-k filters it out:
        `bounds` holds the row's largest logit and, with TOP_K, its k largest, of which the smallest is the k-th."""
        x = tl.load(row + cols, mask=cols < width, other=float("-inf")).to(tl.float32)
        x = tl.where(cols < V, x, float("-inf"))
        bad = tl.max(((x != x) | (x == float("inf"))).to(tl.int32), axis=0)
        weight = x
        if MODE == 2:
            ends = tl.arange(0, BOUNDS)
            top = tl.load(bounds + ends, mask=ends < n_bounds, other=float("-inf")).to(tl.float32)
            m = tl.max(top, axis=0)
            scaled = _scaled(x, m, temperature, DIVIDE)
            if TOP_K:  # below the k-th largest is out; a monotone scaling keeps the k-th the k-th
                kth = _scaled(tl.min(tl.where(ends < n_bounds, top, float("inf")), axis=0), m, temperature, DIVIDE)
                scaled = tl.where(scaled < kth, float("-inf"), scaled)
            weight = tl.where(m == float("-inf"), 0.0, tl.exp(scaled))
        return x, bad, weight

    # one build for every step of a chunk (see _DecodeChunk._capture): the column and the uniform numbers' offset
    # (their pointer is the base of the chunk's tensor, not step i's column, which is 8-byte aligned at odd i)
    @triton.jit(do_not_specialize=["column", "uniform_at"])
    def _draw(logits, stride_logits, V, width, picked, uniform, uniform_at, stride_uniform, bounds, stride_bounds,
              n_bounds, temperature, part_mass, part_at, part_bad, counts, step_ptr, finished, first_bad, seen,
              stride_seen, tokens, stride_tokens, column, current, never, eot, MODE: tl.constexpr, TOP_K: tl.constexpr,
              DIVIDE: tl.constexpr, STOP_AT_EOT: tl.constexpr, SEEN: tl.constexpr, BLOCK_V: tl.constexpr,
              BOUNDS: tl.constexpr, PARTS: tl.constexpr, PDL: tl.constexpr):
        """The next token of sample b and its bookkeeping, as `sample._Draw.next` does it followed by the writes of
        the token to tokens[b, column] and current[b]. Programs (b, j) take a slice of BLOCK_V logits each; the
        one that finishes a sample's slices last takes its token from theirs (slices in order, so the token does
        not depend on which finished last) and resets the sample's count for the next draw.

        MODE 0, greedy: the first largest of logits[b, :V]; -1 (not finite) where the row holds a NaN or +inf or
        only -inf, which is what torch's argmax then picks.
        MODE 1: the token is read from `picked` (the sampler's; one slice).
        MODE 2, sampled (temperature, top-k, no top-p): as `sample.sample_next_token` samples on CUDA, where the
        whole vocabulary is masked: the token at which the running sum of the weights (`_draw_slice`), in token
        order, passes uniform[b] times their total; -1 where the row holds a NaN or +inf or only -inf. The sums
        are float64 here and PyTorch's are the float32 probabilities summed in float64, so the two part only
        where the uniform number falls within rounding of a token's edge. A token of weight 0 is never drawn.

        The row is read up to its padded `width` (a multiple of 16: 16-byte loads), the columns past V ignored.
        Then: `first_bad[b]` takes the step where the token is -1 (once, and not after the sample finished), the
        token is clamped to 0, a finished sample gets <|endoftext|> again (STOP_AT_EOT) and `seen` marks it.
        `finished` and `seen` are bool tensors read as bytes."""
        if PDL:  # (see _gemv)
            gdc_launch_dependents()
            gdc_wait()
        b = tl.program_id(0)
        n_parts = tl.num_programs(1)
        row = logits + b * stride_logits
        bound = bounds + b * stride_bounds
        last = True
        if MODE == 1:
            token = tl.load(picked + b).to(tl.int64)
        else:
            j = tl.program_id(1)
            cols = j * BLOCK_V + tl.arange(0, BLOCK_V)
            x, bad, weight = _draw_slice(row, cols, V, width, bound, n_bounds, temperature, MODE, TOP_K, DIVIDE,
                                         BOUNDS)
            part = b * n_parts + j
            if MODE == 0:
                best = tl.max(x, axis=0)
                tl.store(part_mass + part, best.to(tl.float64))
                tl.store(part_at + part, tl.min(tl.where(x == best, cols, V), axis=0))  # the first of the largest
            else:
                tl.store(part_mass + part, tl.sum(weight.to(tl.float64), axis=0))
                tl.store(part_at + part, tl.max(tl.where(weight > 0, cols, -1), axis=0))  # the last with weight
            tl.store(part_bad + part, bad)
            tl.debug_barrier()  # (see _attend)
            last = tl.atomic_add(counts + b, 1, sem="acq_rel") == n_parts - 1
        if last:
            if MODE != 1:
                parts = tl.arange(0, PARTS)
                part_ok = parts < n_parts
                masses = tl.load(part_mass + b * n_parts + parts, mask=part_ok, other=0.0, cache_modifier=".cg")
                ats = tl.load(part_at + b * n_parts + parts, mask=part_ok, other=-1, cache_modifier=".cg")
                any_bad = tl.max(tl.load(part_bad + b * n_parts + parts, mask=part_ok, other=0,
                                         cache_modifier=".cg"), axis=0)
                tl.store(counts + b, 0)
                if MODE == 0:
                    bests = tl.where(part_ok, masses, float("-inf"))
                    best_all = tl.max(bests, axis=0)
                    at = tl.min(tl.where(part_ok & (bests == best_all), ats, V), axis=0)
                    token = tl.where((any_bad > 0) | (best_all == float("-inf")), -1, at).to(tl.int64)
                else:
                    total = tl.sum(masses, axis=0)
                    target = tl.load(uniform + uniform_at + b * stride_uniform).to(tl.float64) * total
                    # the first slice whose running sum passes the target, and the sum before it
                    k = tl.min(tl.where(part_ok & (tl.cumsum(masses, axis=0) > target), parts, PARTS), axis=0)
                    k = tl.minimum(k, n_parts - 1)  # none, by rounding: the last slice, and the fallbacks below
                    before = tl.sum(tl.where(parts < k, masses, 0.0), axis=0)
                    within = k * BLOCK_V + tl.arange(0, BLOCK_V)
                    _, _, weights = _draw_slice(row, within, V, width, bound, n_bounds, temperature, MODE, TOP_K,
                                                DIVIDE, BOUNDS)
                    passed = (before + tl.cumsum(weights.to(tl.float64), axis=0) > target) & (weights > 0)
                    at = tl.min(tl.where(passed, within, V), axis=0)
                    at = tl.where(at == V, tl.max(tl.where(weights > 0, within, -1), axis=0), at)  # (rounding)
                    at = tl.where(at < 0, tl.max(ats, axis=0), at)
                    token = tl.where((any_bad > 0) | (total <= 0) | (total != total), -1, at).to(tl.int64)
            step = tl.load(step_ptr)
            done = tl.load(finished + b) != 0
            unseen_bad = (token < 0) & (done == 0) & (tl.load(first_bad + b) == never)
            tl.store(first_bad + b, step, mask=unseen_bad)
            token = tl.maximum(token, 0)
            if STOP_AT_EOT:
                token = tl.where(done, eot, token)
                tl.store(finished + b, (done | (token == eot)).to(tl.uint8))
            if SEEN:
                tl.store(seen + b * stride_seen + token, 1)
            tl.store(tokens + b * stride_tokens + column, token)
            tl.store(current + b, token)


FUSED_TOP_K = 1024  # the largest top-k `draw_token` samples with (it reads the k largest logits in each program)


class DrawScratch:
    """What the programs of `draw_token` leave for the last of a sample's: per (sample, slice of the vocabulary)
    the slice's largest logit or total weight, the column found, whether it held a NaN or +inf; and per sample
    the slices done so far (reset to 0 by the last). Allocated once, for CUDA graphs."""

    def __init__(self, batch: int, vocab: int, device: torch.device) -> None:
        self.block = TUNING["draw_block"]
        self.parts = triton.cdiv(vocab, self.block)
        self.vocab = vocab
        self.mass = torch.zeros((batch, self.parts), dtype=torch.float64, device=device)
        self.at = torch.zeros((batch, self.parts), dtype=torch.int32, device=device)
        self.bad = torch.zeros((batch, self.parts), dtype=torch.int32, device=device)
        self.counts = torch.zeros(batch, dtype=torch.int32, device=device)


def samples_in_kernel(temperature: float, top_k: int, top_p: float, vocab: int) -> bool:
    """Whether `draw_token` samples itself with these settings (else it takes the token PyTorch's sampler picked):
    temperature > 0, no top-p, top-k off or up to FUSED_TOP_K."""
    return temperature > 0 and top_p >= 1.0 and (top_k == 0 or top_k >= vocab or top_k <= FUSED_TOP_K)


def draw_token(logits: torch.Tensor, picked: torch.Tensor | None, step: torch.Tensor, finished: torch.Tensor,
               first_bad: torch.Tensor, seen: torch.Tensor | None, stop_at_eot: bool, tokens: torch.Tensor,
               column: int, current: torch.Tensor, scratch: DrawScratch, *, never: int, eot: int,
               temperature: float = 0.0, top_k: int = 0, uniform: torch.Tensor | None = None) -> None:
    """Take a decode step's token (see `_draw`) where PyTorch takes about twenty small kernels, more to sample:
    greedy from `logits` (B, >= vocab) when `picked` is None and `temperature` is 0; the sampler's `picked` (B,)
    int64; or sampled here from `logits` at `temperature` with `top_k` (see `samples_in_kernel`) and `uniform`
    (B, 1), one number in [0, 1) a sample. `step` is the 0-d step counter, `tokens` (B, n) int64 and `current`
    (B, 1) int64 the buffers the token goes to, `scratch` the programs' (`DrawScratch` for B and the vocabulary)."""
    vocab = scratch.vocab
    unused = finished.view(torch.uint8)  # for the pointers a variant does not read
    mode = 1 if picked is not None else 2 if temperature > 0 else 0
    bounds, top = unused, False
    if mode == 2:
        top = 0 < top_k < vocab
        # the k largest logits (their smallest is the k-th) or the largest alone: one PyTorch op
        bounds = (torch.topk(logits[:, :vocab], top_k, dim=-1, sorted=False).values if top else
                  logits[:, :vocab].amax(dim=-1, keepdim=True))
    divide = logits.device.type != "cuda"  # as PyTorch divides by a number there (see `_scaled`)
    t = temperature if divide else float(torch.tensor(1.0) / torch.tensor(temperature or 1.0))
    # the uniform numbers as the base of their storage and an offset: Triton specialises a pointer on its 16-byte
    # alignment, and a chunk's steps pass the columns of one float64 tensor (see `_draw`)
    uniform_at, uniform_base = 0, scratch.mass
    if mode == 2:
        if uniform is None:
            raise ValueError("draw_token samples from `uniform` numbers: pass them, or the token picked")
        uniform_at = uniform.storage_offset()
        uniform_base = uniform.as_strided((uniform.untyped_storage().nbytes() // uniform.element_size(),), (1,), 0)
    with _on(logits.device):
        _draw[(tokens.size(0), 1 if mode == 1 else scratch.parts)](
            logits, logits.stride(0), vocab, logits.size(1), picked if picked is not None else unused,
            uniform_base, uniform_at, uniform.stride(0) if mode == 2 else 0,
            bounds, bounds.stride(0) if mode == 2 else 0, bounds.size(-1) if mode == 2 else 0, t,
            scratch.mass, scratch.at, scratch.bad, scratch.counts, step, finished.view(torch.uint8), first_bad,
            seen.view(torch.uint8) if seen is not None else unused, seen.stride(0) if seen is not None else 0, tokens,
            tokens.stride(0), column, current, never, eot, MODE=mode, TOP_K=top, DIVIDE=divide,
            STOP_AT_EOT=stop_at_eot, SEEN=seen is not None, BLOCK_V=scratch.block,
            BOUNDS=triton.next_power_of_2(bounds.size(-1)) if mode == 2 else 1,
            PARTS=triton.next_power_of_2(scratch.parts), **_launch_options(logits.device, TUNING["draw_warps"]),
        )


class FusedDecodeStep:
    """A one-token decode step of `model` for `batch` samples through the kernels above: called as
    `step(model, current, view, head_t)` like `sample._last_logits`, it returns the logits (B, V).

    It owns its activations (allocated once, at fixed addresses, as a CUDA graph needs) and returns the same
    logits buffer at every call. `view` is the static cache (`sample.StaticDecodeView`): the step writes the new
    key and value at `view.input_pos` and attends over the slots up to it. With `advance` set to a 0-d int64
    tensor, its last kernel also adds 1 to `view.input_pos` and to `advance` (what `generate`'s chunks of steps
    would otherwise do with two more kernels a step).
    """

    def __init__(self, model: GPT, batch: int) -> None:
        cfg = model.config
        param = model.transformer.wte.weight
        self.model, self.batch = model, batch
        self.advance: torch.Tensor | None = None
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.scale = 1.0 / math.sqrt(self.head_dim)

        def buffer(width: int) -> torch.Tensor:
            return torch.zeros((batch, width), dtype=param.dtype, device=param.device)

        self.x, self.q, self.y = buffer(cfg.n_embd), buffer(cfg.n_embd), buffer(cfg.n_embd)
        # the embedding is read a token's row at a time: a copy where the table is not row-major (the tied
        # table laid out for CPU decoding by `sample.decode_layout`, then moved to the GPU)
        self.wte = param.contiguous()  # itself where it is row-major
        self.hidden, self.logits = buffer(4 * cfg.n_embd), buffer(cfg.vocab_size)
        # attention's partial softmax per (sample, head, split of the cache's slots), and per (sample, head) the
        # splits done so far (see `_attend`)
        self.block_s = TUNING["block_s"]
        self.block_d = triton.next_power_of_2(self.head_dim)
        self.n_split = triton.cdiv(cfg.block_size, self.block_s)
        parts = (batch, cfg.n_head, self.n_split)
        self.part_acc = torch.zeros((*parts, self.block_d), dtype=torch.float32, device=param.device)
        self.part_best = torch.zeros(parts, dtype=torch.float32, device=param.device)
        self.part_total = torch.zeros(parts, dtype=torch.float32, device=param.device)
        self.counts = torch.zeros((batch, cfg.n_head), dtype=torch.int32, device=param.device)
        if INTERPRETED or param.device.type != "cuda":
            self.sms = 1
        else:
            self.sms = torch.cuda.get_device_properties(param.device).multi_processor_count
        self.launch = _launch_options(param.device, TUNING["num_warps"])  # every kernel's
        # the samples a product's block takes: the largest divisor of the batch up to the setting
        self.samples = max(n for n in range(1, max(1, TUNING["samples_per_program"]) + 1) if batch % n == 0)
        self.pdl = bool(self.launch["PDL"])
        self.built_advancing = False  # the kernels of a step with `advance` set have run (are built and loaded)

    def __call__(self, model: GPT, current: torch.Tensor, view: StaticDecodeView,
                 head_t: torch.Tensor | None = None) -> torch.Tensor:
        if model is not self.model or current.size(0) != self.batch:
            raise ValueError("this fused step was built for another model or batch size")
        with _on(self.x.device):
            logits = self._launch(model, current, view)
        self.built_advancing |= self.advance is not None
        return logits

    def _launch(self, model: GPT, current: torch.Tensor, view: StaticDecodeView) -> torch.Tensor:
        t = model.transformer
        pos = view.input_pos
        for i, block in enumerate(t.h):
            attn, mlp = block.attn, block.mlp
            self._product(self.x, attn.c_attn, block.ln_1, None, qkv=(view.k[i], view.v[i], pos),
                          embed=(current, self.wte, t.wpe.weight) if i == 0 else None)
            _attend[(self.batch, self.n_head, self.n_split)](  # the cache holds at most a context of slots
                self.q, view.k[i], view.v[i], pos, self.y, self.part_acc, self.part_best, self.part_total,
                self.counts, self.n_head, view.k[i].size(2), self.n_split, self.scale,
                HEAD_DIM=self.head_dim, BLOCK_D=self.block_d, BLOCK_S=self.block_s,
                SPLITS=triton.next_power_of_2(self.n_split), **self.launch,
            )
            self._product(self.y, attn.c_proj, None, self.x, residual=True)
            self._product(self.x, mlp.c_fc, block.ln_2, self.hidden, gelu=True)
            self._product(self.hidden, mlp.c_proj, None, self.x, residual=True)
        self._product(self.x, model.lm_head, t.ln_f, self.logits,
                      advance=(pos, self.advance) if self.advance is not None else None)
        return self.logits

    def _product(self, x: torch.Tensor, linear: torch.nn.Linear, norm: torch.nn.LayerNorm | None,
                 out: torch.Tensor | None, *, gelu: bool = False, residual: bool = False,
                 qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 advance: tuple[torch.Tensor, torch.Tensor] | None = None,
                 embed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        weight = linear.weight  # (N, K), any strides
        N, K = weight.shape
        if INTERPRETED:  # a few large blocks: the interpreter's cost is per program and per operation
            rows, block_k = min(triton.next_power_of_2(N), 4096), min(triton.next_power_of_2(K), 1024)
        else:
            block_k = min(TUNING["block_k"], triton.next_power_of_2(K))
            rows = gemv_blocks(N, TUNING["programs_per_sm"] * self.sms, TUNING["tile"] // block_k)
        block_k = TUNING["force_block_k"] or block_k
        k_cache, v_cache, pos = qkv if qkv is not None else (x, x, x)
        pos, counter = advance if advance is not None else (pos, x)
        out = out if out is not None else self.q
        tokens, wte, wpe = embed if embed is not None else (counter, weight, weight)
        grid = (triton.cdiv(N, rows), self.batch // self.samples)
        _gemv[grid](
            x, weight, linear.bias if linear.bias is not None else weight,
            norm.weight if norm is not None else weight,
            norm.bias if norm is not None and norm.bias is not None else weight,
            out, self.q, k_cache, v_cache, pos, counter, tokens, wte, wpe,
            N, K, weight.stride(0), weight.stride(1), norm.eps if norm is not None else 0.0,
            self.n_head, k_cache.size(2) if qkv is not None else 1,
            HEAD_DIM=self.head_dim, LN=norm is not None, LN_BIAS=norm is not None and norm.bias is not None,
            HAS_BIAS=linear.bias is not None, GELU=gelu, RESIDUAL=residual, QKV=qkv is not None,
            BLOCK_N=rows, BLOCK_K=block_k, ONE_PASS=block_k >= K, ADVANCE=advance is not None,
            EMBED=embed is not None, SAMPLES=self.samples, **self.launch,
        )
