"""A prototype, not part of tinygpt: GPT-2's batch-1 decode step as ONE persistent Triton kernel whose programs
meet at grid-wide barriers in memory instead of at 62 kernel boundaries (`kernels.FusedDecodeStep`).

Why: the fused step reads the weights at 34% of an H100's bandwidth, and what is left is latency per dependent
link (docs/performance.md). If a barrier costs less than a kernel boundary (`bench/link_latency.py` measures
both), this shape of step is the way to the issue's 50%. Each stage's programs request their first weights
before they wait at the barrier, so the weights stream while the previous stage finishes, and each program
requests its next item's weights before it works on the current one (two tiles in flight: the head is 48 items
a program for GPT-2 on 132 multiprocessors).

Stages per layer: LN1 + QKV (the key and value into the cache) | attention partials over blocks of cached slots |
the partials combined, the output projection, bias and residual | LN2 + FC + GELU | the MLP's projection, bias
and residual; then LN_f + the vocabulary head. Work items (blocks of output rows, or a head's block of slots) are
dealt to the programs round-robin.

The barrier needs every program resident at once: the grid is sized from the multiprocessor count (nothing else
may occupy the GPU; a stage times out in bench/gpu_checks.sh rather than hang). With TRITON_INTERPRET=1 (CPU),
where programs run one after another and a barrier could never be passed, each stage is launched on its own
instead (`staged`), which checks what the kernel computes:

    TRITON_INTERPRET=1 python bench/persistent_decode.py --device cpu --layers 2 --width 128 --steps 5 --block-s 2
    python bench/persistent_decode.py                       # GPU: checked against the eager step, then timed
"""

import argparse
import sys

import torch
import triton
import triton.language as tl
from decode_profile import replay_times  # bench/ is on sys.path when run as a script
from fused_check import build

from tinygpt_cli import kernels, sample
from tinygpt_cli.model import GPT
from tinygpt_cli.sample import KVCache, StaticDecodeView

STAGES_PER_LAYER = 5


@triton.jit
def _arrive(counter, GRID_SYNC: tl.constexpr):
    """Arrive at the grid barrier, once every thread of this program has stored its part of the stage before: one
    release add. Programs arrive before they request the next stage's weights, as the release (MEMBAR.ALL.GPU +
    RED in the SASS for sm_90) orders the program's earlier loads too, and so may hold the arrival until a tile
    requested before it has landed; requested after it, the tile streams while the program spins in `_wait`."""
    if GRID_SYNC:
        tl.debug_barrier()
        tl.atomic_add(counter, 1, sem="release", scope="gpu")


@triton.jit
def _wait(counter, target, GRID_SYNC: tl.constexpr):
    """Wait until `target` arrivals were counted; what the others stored before arriving is then visible."""
    if GRID_SYNC:
        seen = tl.load(counter, volatile=True)
        while seen < target:
            seen = tl.load(counter, volatile=True)
        tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()


@triton.jit
def _layer_norm(xk, col_ok, cols, ln_w, ln_b, eps, C, dtype):
    mean = tl.sum(xk, axis=0) / C
    centred = tl.where(col_ok, xk - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / C + eps)
    return kernels._normalized(xk, col_ok, cols, mean, rstd, ln_w, ln_b, dtype, True)


@triton.jit
def _rows_of(item, n_rows, ROWS: tl.constexpr):
    """Work item `item` of a product over `n_rows` rows: (its rows, which are real)."""
    rows = item * ROWS + tl.arange(0, ROWS)
    return rows, rows < n_rows


@triton.jit
def _tile_of(w, item, n_rows, width, cols, col_ok, ROWS: tl.constexpr):
    """The weights of work item `item` (ROWS rows of `width` columns); nothing is read for an item past the
    last, so a program requests its next item's tile without checking (two tiles in flight: see `_step`)."""
    rows, row_ok = _rows_of(item, n_rows, ROWS)
    return tl.load(w + rows[:, None] * width + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _add_to_stream(y, bias, x, rows, row_ok, dtype):
    """x[rows] += y + bias, rounded to the model's dtype after each add as torch's step rounds it."""
    y = (y + tl.load(bias + rows, mask=row_ok, other=0.0).to(tl.float32)).to(dtype)
    y = (y.to(tl.float32) + tl.load(x + rows, mask=row_ok, other=0.0, cache_modifier=".cg").to(tl.float32)).to(dtype)
    tl.store(x + rows, y, mask=row_ok)


@triton.jit
def _step(token_ptr, pos_ptr, wte, wpe, w_qkv, b_qkv, w_o, b_o, w_fc, b_fc, w_pr, b_pr, ln1_w, ln1_b, ln2_w,
          ln2_b, lnf_w, lnf_b, head_w, k_cache, v_cache, x, q, hidden, logits, part_acc, part_best, part_total,
          counter, n_layer, S, V, eps, scale, n_split, first_stage, last_stage,
          C: tl.constexpr, H: tl.constexpr, D: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_4C: tl.constexpr,
          BLOCK_H: tl.constexpr, ROWS: tl.constexpr, ROWS_PR: tl.constexpr, BLOCK_S: tl.constexpr,
          SPLITS: tl.constexpr, GRID_SYNC: tl.constexpr):
    """Stages first_stage .. last_stage - 1 of one decode step (all of them: 5 * n_layer + 1, with GRID_SYNC)."""
    p = tl.program_id(0)
    P = tl.num_programs(0)
    dtype = x.dtype.element_ty
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < C
    cols4 = tl.arange(0, BLOCK_4C)
    col4_ok = cols4 < 4 * C
    pos = tl.load(pos_ptr)
    heads = tl.arange(0, BLOCK_H)
    head_ok = heads < H
    dims = tl.arange(0, D)
    splits = tl.arange(0, SPLITS)
    split_ok = splits < n_split
    for layer in range(n_layer):
        g = layer * 5
        # ---- LN1 + QKV: 3C rows; the key and value go to this layer's cache slot
        if (g >= first_stage) & (g < last_stage):
            n_items = tl.cdiv(3 * C, ROWS)
            w = w_qkv + layer * 3 * C * C
            if g > 0:
                _arrive(counter, GRID_SYNC)
            tile = _tile_of(w, p, 3 * C, C, cols, col_ok, ROWS)
            if g > 0:
                _wait(counter, g * P, GRID_SYNC)
            for item in range(p, n_items, P):
                rows, row_ok = _rows_of(item, 3 * C, ROWS)
                following = _tile_of(w, item + P, 3 * C, C, cols, col_ok, ROWS)  # requested before this one's work
                if layer == 0:
                    token = tl.load(token_ptr)
                    xk = (tl.load(wte + token * C + cols, mask=col_ok, other=0.0).to(tl.float32)
                          + tl.load(wpe + pos * C + cols, mask=col_ok, other=0.0).to(tl.float32))
                    xk = tl.where(col_ok, xk.to(dtype).to(tl.float32), 0.0)
                    if item == 0:  # the residual stream starts here
                        tl.store(x + cols, xk.to(dtype), mask=col_ok)
                else:
                    xk = tl.load(x + cols, mask=col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                xn = _layer_norm(xk, col_ok, cols, ln1_w + layer * C, ln1_b + layer * C, eps, C, dtype)
                y = tl.sum(tile.to(tl.float32) * xn[None, :], axis=1)
                y = (y + tl.load(b_qkv + layer * 3 * C + rows, mask=row_ok, other=0.0).to(tl.float32)).to(dtype)
                tl.store(q + rows, y, mask=row_ok & (rows < C))
                kv = rows % C
                slot = ((layer * H + kv // D) * S + pos) * D + kv % D
                tl.store(k_cache + slot, y, mask=row_ok & (rows >= C) & (rows < 2 * C))
                tl.store(v_cache + slot, y, mask=row_ok & (rows >= 2 * C))
                tile = following
        # ---- attention: a partial softmax per (head, block of slots)
        if (g + 1 >= first_stage) & (g + 1 < last_stage):
            n_items = H * n_split
            _arrive(counter, GRID_SYNC)
            _wait(counter, (g + 1) * P, GRID_SYNC)  # no weights to request first
            for item in range(p, n_items, P):
                h = item // n_split
                split = item % n_split
                query = tl.load(q + h * D + dims, cache_modifier=".cg").to(tl.float32)
                slots = split * BLOCK_S + tl.arange(0, BLOCK_S)
                filled = slots <= pos
                where = ((layer * H + h) * S + slots[:, None]) * D + dims[None, :]
                keys = tl.load(k_cache + where, mask=filled[:, None], other=0.0, cache_modifier=".cg")
                values = tl.load(v_cache + where, mask=filled[:, None], other=0.0, cache_modifier=".cg")
                scores = tl.where(filled, tl.sum(keys.to(tl.float32) * query[None, :], axis=1) * scale,
                                  float("-inf"))
                best = tl.max(scores, axis=0)
                e = tl.exp(scores - tl.where(best == float("-inf"), 0.0, best))
                tl.store(part_acc + item * D + dims, tl.sum(e[:, None] * values.to(tl.float32), axis=0))
                tl.store(part_best + item, best)
                tl.store(part_total + item, tl.sum(e, axis=0))
        # ---- the partials combined (every item recomputes all heads: 24 KB from L2), projection + residual
        if (g + 2 >= first_stage) & (g + 2 < last_stage):
            n_items = tl.cdiv(C, ROWS)
            _arrive(counter, GRID_SYNC)
            wcols = heads[None, :, None] * D + dims[None, None, :]
            rows, row_ok = _rows_of(p, C, ROWS)
            tile = tl.load(w_o + layer * C * C + rows[:, None, None] * C + wcols,
                           mask=row_ok[:, None, None] & head_ok[None, :, None], other=0.0)
            _wait(counter, (g + 2) * P, GRID_SYNC)
            for item in range(p, n_items, P):
                rows, row_ok = _rows_of(item, C, ROWS)
                next_rows, next_ok = _rows_of(item + P, C, ROWS)
                following = tl.load(w_o + layer * C * C + next_rows[:, None, None] * C + wcols,
                                    mask=next_ok[:, None, None] & head_ok[None, :, None], other=0.0)
                part = heads[:, None] * n_split + splits[None, :]
                part_ok = head_ok[:, None] & split_ok[None, :]
                bests = tl.load(part_best + part, mask=part_ok, other=float("-inf"), cache_modifier=".cg")
                weights = tl.exp(bests - tl.max(bests, axis=1)[:, None])
                weights = tl.where(part_ok, weights, 0.0)
                totals = tl.load(part_total + part, mask=part_ok, other=0.0, cache_modifier=".cg")
                accs = tl.load(part_acc + part[:, :, None] * D + dims[None, None, :], mask=part_ok[:, :, None],
                               other=0.0, cache_modifier=".cg")
                denominator = tl.sum(weights * totals, axis=1)
                att = tl.sum(weights[:, :, None] * accs, axis=1) / tl.where(head_ok, denominator, 1.0)[:, None]
                att = tl.where(head_ok[:, None], att.to(dtype).to(tl.float32), 0.0)  # (BLOCK_H, D)
                y = tl.sum(tl.sum(tile.to(tl.float32) * att[None, :, :], axis=2), axis=1)
                _add_to_stream(y, b_o + layer * C, x, rows, row_ok, dtype)
                tile = following
        # ---- LN2 + FC + GELU
        if (g + 3 >= first_stage) & (g + 3 < last_stage):
            n_items = tl.cdiv(4 * C, ROWS)
            w = w_fc + layer * 4 * C * C
            _arrive(counter, GRID_SYNC)
            tile = _tile_of(w, p, 4 * C, C, cols, col_ok, ROWS)
            _wait(counter, (g + 3) * P, GRID_SYNC)
            for item in range(p, n_items, P):
                rows, row_ok = _rows_of(item, 4 * C, ROWS)
                following = _tile_of(w, item + P, 4 * C, C, cols, col_ok, ROWS)
                xk = tl.load(x + cols, mask=col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                xn = _layer_norm(xk, col_ok, cols, ln2_w + layer * C, ln2_b + layer * C, eps, C, dtype)
                y = tl.sum(tile.to(tl.float32) * xn[None, :], axis=1)
                y = (y + tl.load(b_fc + layer * 4 * C + rows, mask=row_ok, other=0.0).to(tl.float32)).to(dtype)
                y = kernels._gelu_tanh(y.to(tl.float32)).to(dtype)
                tl.store(hidden + rows, y, mask=row_ok)
                tile = following
        # ---- the MLP's projection + residual
        if (g + 4 >= first_stage) & (g + 4 < last_stage):
            n_items = tl.cdiv(C, ROWS_PR)
            w = w_pr + layer * 4 * C * C
            _arrive(counter, GRID_SYNC)
            tile = _tile_of(w, p, C, 4 * C, cols4, col4_ok, ROWS_PR)
            _wait(counter, (g + 4) * P, GRID_SYNC)
            for item in range(p, n_items, P):
                rows, row_ok = _rows_of(item, C, ROWS_PR)
                following = _tile_of(w, item + P, C, 4 * C, cols4, col4_ok, ROWS_PR)
                hk = tl.load(hidden + cols4, mask=col4_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
                _add_to_stream(tl.sum(tile.to(tl.float32) * hk[None, :], axis=1), b_pr + layer * C, x, rows, row_ok,
                               dtype)
                tile = following
    # ---- LN_f + the head
    g = n_layer * 5
    if (g >= first_stage) & (g < last_stage):
        n_items = tl.cdiv(V, ROWS)
        _arrive(counter, GRID_SYNC)
        tile = _tile_of(head_w, p, V, C, cols, col_ok, ROWS)
        _wait(counter, g * P, GRID_SYNC)
        xk = tl.load(x + cols, mask=col_ok, other=0.0, cache_modifier=".cg").to(tl.float32)
        xn = _layer_norm(xk, col_ok, cols, lnf_w, lnf_b, eps, C, dtype)  # once: 48 items a program for GPT-2
        for item in range(p, n_items, P):
            rows, row_ok = _rows_of(item, V, ROWS)
            following = _tile_of(head_w, item + P, V, C, cols, col_ok, ROWS)
            y = tl.sum(tile.to(tl.float32) * xn[None, :], axis=1).to(dtype)
            tl.store(logits + rows, y, mask=row_ok)
            tile = following


class PersistentStep:
    """The prototype's decode step for a batch of 1: `step(token (1, 1), pos (1,))` -> logits (1, V), with its own
    stacked copies of the weights and its own cache (L, H, S, D)."""

    def __init__(self, model: GPT, programs: int, staged: bool, block_s: int = 128) -> None:
        cfg, t = model.config, model.transformer
        blocks = list(t.h)
        self.model, self.programs, self.staged = model, programs, staged
        self.cooperative = not staged  # cleared where a CUDA graph cannot capture a cooperative launch
        self.C, self.H = cfg.n_embd, cfg.n_head
        self.D = cfg.n_embd // cfg.n_head

        def stack(get):
            return torch.stack([get(block).detach() for block in blocks]).contiguous()

        self.w = dict(w_qkv=stack(lambda b: b.attn.c_attn.weight), b_qkv=stack(lambda b: b.attn.c_attn.bias),
                      w_o=stack(lambda b: b.attn.c_proj.weight), b_o=stack(lambda b: b.attn.c_proj.bias),
                      w_fc=stack(lambda b: b.mlp.c_fc.weight), b_fc=stack(lambda b: b.mlp.c_fc.bias),
                      w_pr=stack(lambda b: b.mlp.c_proj.weight), b_pr=stack(lambda b: b.mlp.c_proj.bias),
                      ln1_w=stack(lambda b: b.ln_1.weight), ln1_b=stack(lambda b: b.ln_1.bias),
                      ln2_w=stack(lambda b: b.ln_2.weight), ln2_b=stack(lambda b: b.ln_2.bias))
        param = t.wte.weight
        self.S = cfg.block_size
        self.block_s = min(block_s, triton.next_power_of_2(self.S))
        self.n_split = triton.cdiv(self.S, self.block_s)
        self.k = torch.zeros((cfg.n_layer, self.H, self.S, self.D), dtype=param.dtype, device=param.device)
        self.v = torch.zeros_like(self.k)

        def buffer(n, dtype=param.dtype):
            return torch.zeros(n, dtype=dtype, device=param.device)

        self.x, self.q, self.hidden = buffer(self.C), buffer(self.C), buffer(4 * self.C)
        self.logits = buffer(cfg.vocab_size)
        parts = self.H * self.n_split
        self.part_acc = buffer(parts * self.D, torch.float32)
        self.part_best, self.part_total = buffer(parts, torch.float32), buffer(parts, torch.float32)
        self.counter = buffer(1, torch.int32)
        self.eps = float(blocks[0].ln_1.eps)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        t, cfg = self.model.transformer, self.model.config
        n_stages = STAGES_PER_LAYER * cfg.n_layer + 1
        ranges = [(g, g + 1) for g in range(n_stages)] if self.staged else [(0, n_stages)]
        for first, last in ranges:
            if not self.staged:
                self.counter.zero_()
            _step[(self.programs,)](
                token, pos, t.wte.weight, t.wpe.weight, *self.w.values(), t.ln_f.weight, t.ln_f.bias,
                self.model.lm_head.weight, self.k, self.v, self.x, self.q, self.hidden, self.logits,
                self.part_acc, self.part_best, self.part_total, self.counter, cfg.n_layer, self.S, cfg.vocab_size,
                self.eps, 1.0 / self.D ** 0.5, self.n_split, first, last,
                C=self.C, H=self.H, D=self.D, BLOCK_C=triton.next_power_of_2(self.C),
                BLOCK_4C=triton.next_power_of_2(4 * self.C), BLOCK_H=triton.next_power_of_2(self.H), ROWS=8,
                ROWS_PR=2, BLOCK_S=self.block_s, SPLITS=triton.next_power_of_2(self.n_split),
                GRID_SYNC=not self.staged, num_warps=4,
                # a cooperative launch: the driver refuses a grid that cannot be resident all at once (a hang at
                # the first barrier otherwise), e.g. --programs-per-sm 3 or more at ~254 registers a thread
                **({"launch_cooperative_grid": True} if self.cooperative else {}),
            )
        return self.logits[None, :]


def check(model: GPT, step: PersistentStep, steps: int, tolerance: float, device: torch.device) -> list[str]:
    """Teacher-forced steps beside the eager step: the problems found."""
    eager = StaticDecodeView(KVCache(model, 1))
    token = torch.tensor([[464]], device=device)
    pos = torch.zeros(1, dtype=torch.long, device=device)
    problems, worst = [], 0.0
    with torch.inference_mode():
        for position in range(steps):
            pos.fill_(position)
            eager.input_pos.fill_(position)
            got = step(token, pos).float()
            want = sample._last_logits(model, token, eager).float()
            arrivals, expected = int(step.counter[0]), STAGES_PER_LAYER * model.config.n_layer * step.programs
            if not step.staged and arrivals != expected:  # every program arrives once at each stage after the first
                problems.append(f"step {position}: {arrivals} arrivals at the grid barriers, not {expected}")
            if not torch.isfinite(got).all():
                problems.append(f"step {position}: logits not finite")
                break
            worst = max(worst, float((got - want).abs().max() / want.abs().max()))
            token = want.argmax(dim=-1, keepdim=True)
        for layer in range(model.config.n_layer):
            for name, mine, theirs in (("keys", step.k[layer], eager.k[layer][0]),
                                       ("values", step.v[layer], eager.v[layer][0])):
                error = float((mine[:, :steps].float() - theirs[:, :steps].float()).abs().max())
                if error > tolerance * max(float(theirs[:, :steps].abs().max()), 1e-6):
                    problems.append(f"layer {layer} {name} differ by {error:.3g}")
    if worst > tolerance:
        problems.append(f"logits differ by up to {worst:.2e} of the largest")
    print(f"  {steps} steps, {next(model.parameters()).dtype}: largest logit difference {worst:.2e}"
          f"{'; ' + '; '.join(problems) if problems else ''}", flush=True)
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768, help="n_embd (heads of 64)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--programs-per-sm", type=int, default=1)
    parser.add_argument("--block-s", type=int, default=128, help="cached slots per attention item")
    parser.add_argument("--positions", default="0,512",
                        help="cache slots to time the steps at, comma-separated (attention reads the slots up to it)")
    args = parser.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count if gpu else 4
    problems = []
    for dtype, tolerance in ((torch.float32, 2e-3), (torch.bfloat16, 0.05)) if gpu else ((torch.float32, 2e-3),):
        model = build(dtype, args.layers, args.width, 1024 if gpu else 64, device)
        problems += check(model, PersistentStep(model, sms * args.programs_per_sm, not gpu, args.block_s),
                          args.steps, tolerance, device)
    if problems:
        print(f"persistent check: FAILED ({len(problems)} problems)")
        sys.exit(1)
    print("persistent check: OK", flush=True)
    if gpu:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        persistent = PersistentStep(model, sms * args.programs_per_sm, staged=False)
        with torch.inference_mode():
            for position in (int(p) for p in args.positions.split(",")):
                for label, step in (("fused kernels (the default)", kernels.FusedDecodeStep(model, 1)),
                                    ("persistent prototype", lambda m, current, view, head_t=None:
                                     persistent(current, view.input_pos))):
                    try:
                        _, us = replay_times(step, model, 1, replays=50, position=position)
                    except RuntimeError as exc:  # a capture that refuses the cooperative launch: without it
                        if not persistent.cooperative or label.startswith("fused"):
                            raise
                        print(f"  (a graph with the cooperative launch failed: {str(exc).splitlines()[0][:100]}; "
                              "timed without it)", flush=True)
                        persistent.cooperative = False
                        _, us = replay_times(step, model, 1, replays=50, position=position)
                    print(f"  {label}, slot {position}: {us:.1f} us per token, {weight_bytes / us / 1e3:.0f} GB/s "
                          f"(the weights' bytes only)", flush=True)


if __name__ == "__main__":
    main()
