"""The fused Triton decode step (`kernels.FusedDecodeStep`).

On the CPU the kernels run through Triton's interpreter, which checks what they compute; they are also compiled
ahead of time for NVIDIA GPUs (no GPU needed), which checks that Triton's compiler takes them. The `gpu` tests run
them for real on a lent GPU.
"""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import fused_test_model, generated
from tinygpt_cli import sample
from tinygpt_cli.errors import GenerationError
from tinygpt_cli.sample import GenerationStats, KVCache, StaticDecodeView, generate

triton = pytest.importorskip("triton", reason="Triton is not installed (pip install triton)")


def test_interpreted_kernels():
    """tests/interpreted in a process of its own, with Triton's interpreter switched on before Triton's import."""
    folder = Path(__file__).parent / "interpreted"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and " skipped" not in done.stdout, done.stdout[-2000:]


def test_fused_generate_refuses_what_it_cannot_do(monkeypatch):
    from tinygpt_cli import kernels

    model = fused_test_model(n_layer=1, n_embd=32, n_head=2)
    for kwargs, message in [(dict(compile=True), "replace torch.compile's"), (dict(use_cache=False), "KV cache"),
                            (dict(lookahead=True), "without look-ahead")]:
        with pytest.raises(GenerationError, match=message):
            next(generate(model, [1, 2], 3, fused=True, **kwargs))
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    with pytest.raises(GenerationError, match=r"cannot run here \(they run on NVIDIA CUDA GPUs, not cpu\): "
                                              r"generate without them \(drop --fused"):
        next(generate(model, [1, 2], 3, fused=True))
    assert kernels.unavailable(torch.device("cuda")) is None
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert "on ROCm they are untested" in kernels.unavailable(torch.device("cuda"))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(kernels, "triton", None)
    assert "Triton is not installed" in kernels.unavailable(torch.device("cuda"))
    # a CPU build of torch has no Triton either: that there is no GPU is the reason to give (audit)
    with pytest.raises(GenerationError, match="run on NVIDIA CUDA GPUs, not cpu"):
        next(generate(model, [1, 2], 3, fused=True))


def test_fused_step_launches_on_the_weights_gpu(monkeypatch):
    """Triton launches on the current CUDA device: a model on cuda:1 must make cuda:1 current for the launches."""
    import contextlib
    from types import SimpleNamespace

    from tinygpt_cli import kernels

    entered = []

    @contextlib.contextmanager
    def device(which):
        entered.append(which)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(kernels.FusedDecodeStep, "_launch", lambda self, model, current, view: entered.append("ran"))
    step = object.__new__(kernels.FusedDecodeStep)
    model = object()
    step.model, step.batch, step.x = model, 1, SimpleNamespace(device=torch.device("cuda", 1))
    step.advance, step.built_advancing = None, False
    step(model, torch.zeros((1, 1), dtype=torch.long), None)
    assert entered == [torch.device("cuda", 1), "ran"]


def test_programmatic_dependent_launch_needs_hopper_and_a_triton_that_has_it(monkeypatch):
    from tinygpt_cli import kernels

    monkeypatch.setattr(kernels, "INTERPRETED", False)
    monkeypatch.setattr(kernels, "PDL_SUPPORTED", True)
    assert kernels.uses_pdl((9, 0)) and kernels.uses_pdl((10, 0))
    assert not kernels.uses_pdl((8, 9)) and not kernels.uses_pdl((8, 0))
    monkeypatch.setattr(kernels, "PDL_SUPPORTED", False)
    assert not kernels.uses_pdl((9, 0))
    monkeypatch.setattr(kernels, "PDL_SUPPORTED", True)
    monkeypatch.setattr(kernels, "INTERPRETED", True)  # the interpreter has no grid dependency control
    assert not kernels.uses_pdl((9, 0))


def test_gemv_blocks_cover_the_gpu():
    from tinygpt_cli.kernels import gemv_blocks

    assert gemv_blocks(2304, 264, 8) == 8  # GPT-2 small's QKV on 132 multiprocessors: 288 blocks
    assert gemv_blocks(768, 264, 8) == 2
    assert gemv_blocks(50304, 264, 8) == 8  # the head has rows to spare: as many as a tile holds
    assert gemv_blocks(50304, 264, 12) == 8 and gemv_blocks(50304, 264, 0) == 1
    assert gemv_blocks(5, 264) == 1


@pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION")
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_kernels_compile_for_hopper_and_ampere(dtype):
    """Triton's compiler (to PTX and through ptxas) takes every kernel variant the step launches for GPT-2 small,
    specialised as Triton's JIT specialises them at run time (a stride of 1 a constant, pointers and sizes that are
    multiples of 16 marked so, which is what lets it vectorise the loads); no GPU needed."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget

    from tinygpt_cli import kernels as module

    if module.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter")
    if "constexprs" not in inspect.signature(compiler.ASTSource).parameters:
        pytest.skip(f"Triton {triton.__version__}'s ahead-of-time API predates 3.3")
    types = {"tokens": "*i64", "pos_ptr": "*i64", "counts": "*i32", "part_acc": "*fp32", "part_best": "*fp32",
             "part_total": "*fp32", "eps": "fp32", "scale": "fp32", "picked": "*i64", "step_ptr": "*i64",
             "finished": "*u8", "first_bad": "*i64", "seen": "*u8", "current": "*i64", "never": "i64",
             "counter": "*i64", "column": "i32", "uniform_at": "i32",  # not specialised (do_not_specialize)
             "uniform": "*fp64", "temperature": "fp32", "part_mass": "*fp64", "part_at": "*i32", "part_bad": "*i32"}

    def build(kernel, values, constants, capability, pdl=False, warps=4):
        """values: an int argument's value (specialised like the JIT), or nothing for a pointer of `dtype`."""
        constants = {**constants, "PDL": pdl}
        signature, attrs = {}, {}
        for index, name in enumerate(kernel.arg_names):
            value = values.get(name)
            if name in constants or value == 1:
                signature[name] = "constexpr"
                constants = {**constants, name: constants.get(name, value)}
                continue
            kind = signature[name] = "i32" if isinstance(value, int) else types.get(name, f"*{dtype}")
            if kind.startswith("*") or (kind == "i32" and value is not None and value % 16 == 0):
                attrs[(index,)] = [["tt.divisibility", 16]]
        source = compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
        options = {"num_warps": warps, **({"launch_pdl": True} if pdl else {})}
        return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)

    C, heads, slots, vocab = 768, 12, 1024, 50304
    for capability in (90, 80):
        splits = triton.cdiv(slots, module.TUNING["block_s"])  # as FusedDecodeStep launches it
        build(module._attend, {"n_head": heads, "S": slots, "n_split": splits},
              {"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_S": module.TUNING["block_s"],
               "SPLITS": triton.next_power_of_2(splits)}, capability)
        products = [(3 * C, C, True, False, False, True, True), (3 * C, C, True, False, False, True, False),
                    (C, C, False, False, True, False, False), (4 * C, C, True, True, False, False, False),
                    (C, 4 * C, False, False, True, False, False), (vocab, C, True, False, False, False, False)]
        for N, K, norm, gelu, residual, qkv, embed in products:
            # several samples a block (kernels.TUNING["samples_per_program"]) for bf16 in one pass
            for one_pass, samples in ((True, 1), (False, 1), *([(True, 4)] if dtype == "bf16" else [])):
                block_k = triton.next_power_of_2(K) if one_pass else 256
                constants = dict(HEAD_DIM=64, LN=norm, LN_BIAS=norm, HAS_BIAS=vocab != N, GELU=gelu,
                                 RESIDUAL=residual, QKV=qkv, BLOCK_N=max(1, 8192 // block_k), BLOCK_K=block_k,
                                 ONE_PASS=one_pass, ADVANCE=vocab == N, EMBED=embed, SAMPLES=samples)
                values = {"N": N, "K": K, "stride_wn": K, "stride_wk": 1, "n_head": heads, "S": slots if qkv else 1}
                kernel = build(module._gemv, values, constants, capability)
                if one_pass and dtype != "fp32":  # the weights come in 16-byte loads
                    assert "ld.global.v4" in kernel.asm["ptx"] or "ld.global.L1::evict_first.v4" in kernel.asm["ptx"]
                if capability == 90 and module.PDL_SUPPORTED:
                    ptx = build(module._gemv, values, constants, capability, pdl=True).asm["ptx"]
                    assert_waits_after_the_weights(ptx, one_pass)
        for mode, top_k in ((0, False), (1, False), (2, True), (2, False)):  # greedy, picked, sampled
            draw = dict(values={"stride_logits": vocab, "V": 50257, "width": vocab, "stride_seen": vocab,
                                "stride_tokens": 16, "eot": 50256, "stride_uniform": 16, "stride_bounds": 200,
                                "n_bounds": 200},
                        constants={"MODE": mode, "TOP_K": top_k, "DIVIDE": False, "STOP_AT_EOT": True, "SEEN": True,
                                   "BLOCK_V": module.TUNING["draw_block"], "BOUNDS": 256, "PARTS": 32},
                        warps=module.TUNING["draw_warps"])
            built = build(module._draw, **draw, capability=capability)
            if mode != 1 and dtype != "fp32":  # the logits come in 16-byte loads (the padded width: a multiple of 16)
                assert ".v4" in built.asm["ptx"]
            if capability == 90 and module.PDL_SUPPORTED:
                assert_waits_after_the_weights(build(module._draw, **draw, capability=90, pdl=True).asm["ptx"], False)
        if capability == 90 and module.PDL_SUPPORTED:
            attend = build(module._attend, {"n_head": heads, "S": slots, "n_split": 16},
                           {"HEAD_DIM": 64, "BLOCK_D": 64, "BLOCK_S": 64, "SPLITS": 16}, 90, pdl=True).asm["ptx"]
            assert_waits_after_the_weights(attend, False)


def assert_waits_after_the_weights(ptx: str, one_pass: bool) -> None:
    """A kernel built for programmatic dependent launch lets the next kernel launch at once and waits for the one
    before it ahead of its first read of what that one wrote; only constant weights (loaded evict_first) may be read
    before, and a one-pass product requests all of its weights there."""
    launch, wait = ptx.find("griddepcontrol.launch_dependents"), ptx.find("griddepcontrol.wait")
    assert 0 < launch < wait, "the kernel must signal its dependents and then wait for its predecessor"
    before = [line for line in ptx[:wait].splitlines() if "ld.global" in line]
    assert all("evict_first" in line for line in before), before
    weights = [line for line in ptx.splitlines() if "ld.global" in line and "evict_first" in line]
    assert len(before) == (len(weights) if one_pass else 0)


@pytest.mark.gpu
def test_fused_decode_on_cuda_matches_eager():
    """Real kernels, captured as CUDA graphs: fp32 gives the eager greedy and seeded sampled tokens across a window
    jump (sampled by PyTorch's sampler, and by the draw kernel itself); bf16 and fp16 give logits within their
    rounding of the eager step's, and GPT-2 small's shape runs."""
    model = fused_test_model(block_size=24).cuda()
    stats = GenerationStats()
    greedy = dict(temperature=0, num_samples=2, flush_every=4)
    fused = generated(model, [5, 6, 7], 40, fused=True, stats=stats, **greedy)
    assert stats.fused and stats.graphed and stats.compile_error is None and stats.graph_error is None
    assert torch.equal(fused, generated(model, [5, 6, 7], 40, **greedy))
    # a second call with the same settings (right after the first: a call with others builds its own decoder)
    # replays the graph the first captured, from another prompt, its first step included
    first, again = GenerationStats(), GenerationStats()
    before = generated(model, [8, 9], 30, fused=True, stats=first, **greedy)
    after = generated(model, [8, 9], 30, fused=True, stats=again, **greedy)
    assert first.capture_s > 0 and again.capture_s == 0 and again.fused and again.graphed
    assert torch.equal(before, after) and torch.equal(after, generated(model, [8, 9], 30, **greedy))
    sampled = dict(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=5, num_samples=3)
    assert torch.equal(generated(model, [5, 6, 7], 40, fused=True, **sampled),
                       generated(model, [5, 6, 7], 40, **sampled))
    # sampled by the draw kernel itself (no top-p), as `tinygpt generate` samples by default, and with top-k off
    for top_k in (200, 0):
        sampled = dict(temperature=0.8, top_k=top_k, seed=6, num_samples=3)
        stats = GenerationStats()
        assert torch.equal(generated(model, [5, 6, 7], 40, fused=True, stats=stats, **sampled),
                           generated(model, [5, 6, 7], 40, **sampled))
        assert stats.graphed and stats.graph_error is None  # (an eager fallback would give the same tokens)
    from tinygpt_cli import kernels
    from tinygpt_cli.kernels import FusedDecodeStep

    for dtype in (torch.bfloat16, torch.float16):
        small = fused_test_model(dtype, n_layer=2, n_head=12, n_embd=768, block_size=1024).cuda()
        caches = [StaticDecodeView(KVCache(small, 1)) for _ in range(2)]
        current = torch.tensor([[464]], device="cuda")
        with torch.inference_mode():
            for view in caches:
                view.input_pos.fill_(0)
            got = FusedDecodeStep(small, 1)(small, current, caches[0]).float()
            want = sample._last_logits(small, current, caches[1]).float()
            with pytest.MonkeyPatch.context() as patch:  # the same kernels without programmatic dependent launch
                patch.setitem(kernels.TUNING, "pdl", False)
                caches[0].input_pos.fill_(0)
                plain = FusedDecodeStep(small, 1)
                assert not plain.pdl
                again = plain(small, current, caches[0]).float()
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert int(got.argmax()) == int(want.argmax())
        assert torch.equal(got, again)
