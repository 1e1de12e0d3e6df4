"""The fused Triton decode step (`kernels.FusedDecodeStep`).

On the CPU the kernels run through Triton's interpreter, which checks what they compute; they are also compiled
ahead of time for NVIDIA GPUs (no GPU needed), which checks that Triton's compiler takes them. The `gpu` tests run
them for real on a lent GPU.
"""

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
    with pytest.raises(GenerationError, match="cannot run here: the fused decode kernels run on NVIDIA CUDA GPUs, "
                                              "not cpu"):
        next(generate(model, [1, 2], 3, fused=True))
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(GenerationError, match="Triton is not installed"):
        next(generate(model, [1, 2], 3, fused=True))


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
    """Triton's compiler (to PTX and through ptxas) takes every kernel variant the step launches; no GPU needed."""
    compiler = pytest.importorskip("triton.compiler")
    from triton.backends.compiler import GPUTarget

    from tinygpt_cli import kernels as module

    if module.INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the kernels were built for the interpreter")
    pointer = f"*{dtype}"

    def build(kernel, ints, floats, pointers, constants, capability):
        signature = {name: pointer for name in pointers}
        signature.update({name: "*i64" for name in ("tokens", "pos_ptr") if name in kernel.arg_names})
        signature.update({name: "*fp32" for name in ("part_acc", "part_best", "part_total") if name in signature})
        signature.update({"counts": "*i32"} if "counts" in signature else {})
        signature.update({name: "i32" for name in ints})
        signature.update({name: "fp32" for name in floats})
        signature.update({name: "constexpr" for name in constants})
        assert set(signature) == set(kernel.arg_names)
        source = compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants)
        return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": 4})

    for capability in (90, 80):
        build(module._embed, ["C"], [], ["wte", "wpe", "x"], {"BLOCK_C": 1024}, capability)
        build(module._attend, ["n_head", "head_dim", "S", "n_split"], ["scale"],
              ["q", "k_cache", "v_cache", "y", "part_acc", "part_best", "part_total", "counts"],
              {"BLOCK_D": 64, "BLOCK_S": module.TUNING["block_s"], "SPLITS": 16}, capability)
        gemv_pointers = ["x", "w", "bias", "ln_w", "ln_b", "out", "q_out", "k_cache", "v_cache"]
        gemv_ints = ["N", "K", "stride_wn", "stride_wk", "n_head", "head_dim", "S"]
        for flags in [(True, True, True, False, False, True), (False, False, True, False, True, False),
                      (True, True, True, True, False, False), (True, False, False, False, False, False)]:
            constants = dict(zip(["LN", "LN_BIAS", "HAS_BIAS", "GELU", "RESIDUAL", "QKV"], flags, strict=True))
            for one_pass in (True, False):
                constants.update(BLOCK_N=8, BLOCK_K=1024, ONE_PASS=one_pass)
                build(module._gemv, gemv_ints, ["eps"], gemv_pointers, constants, capability)


@pytest.mark.gpu
def test_fused_decode_on_cuda_matches_eager():
    """Real kernels, captured as CUDA graphs: fp32 gives the eager greedy tokens across a window jump; bf16 gives
    logits within bf16 rounding of the eager step's, and GPT-2 small's shape runs."""
    model = fused_test_model(block_size=24).cuda()
    stats = GenerationStats()
    greedy = dict(temperature=0, num_samples=2, flush_every=4)
    fused = generated(model, [5, 6, 7], 40, fused=True, stats=stats, **greedy)
    assert stats.fused and stats.graphed and stats.compile_error is None and stats.graph_error is None
    assert torch.equal(fused, generated(model, [5, 6, 7], 40, **greedy))
    from tinygpt_cli.kernels import FusedDecodeStep

    small = fused_test_model(torch.bfloat16, n_layer=2, n_head=12, n_embd=768, block_size=1024).cuda()
    caches = [StaticDecodeView(KVCache(small, 1)) for _ in range(2)]
    current = torch.tensor([[464]], device="cuda")
    with torch.inference_mode():
        for view in caches:
            view.input_pos.fill_(0)
        got = FusedDecodeStep(small, 1)(small, current, caches[0]).float()
        want = sample._last_logits(small, current, caches[1]).float()
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert int(got.argmax()) == int(want.argmax())
