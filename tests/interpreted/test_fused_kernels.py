"""The fused decode kernels run on CPU tensors through Triton's interpreter: what they compute, not how fast.

Collected only with TRITON_INTERPRET=1 in the environment before Triton is imported (see conftest.py);
tests/test_kernels.py runs this folder so, in a process of its own.
"""

import pytest
import torch

from conftest import fused_test_model, generated
from tinygpt_cli import kernels, sample
from tinygpt_cli.sample import GenerationStats, KVCache, StaticDecodeView

assert kernels.INTERPRETED, "run with TRITON_INTERPRET=1"


@pytest.mark.parametrize(("dtype", "batch", "bias", "block_s", "block_k"), [(torch.float32, 1, True, 64, 0),
                                                                             (torch.float32, 3, False, 4, 0),
                                                                             (torch.float32, 2, True, 8, 32),
                                                                             (torch.float16, 2, True, 8, 0)])
def test_fused_step_gives_the_eager_logits_and_cache(monkeypatch, dtype, batch, bias, block_s, block_k):
    """Head size 12 (not a power of two: masked lanes), a prefix of cached slots and stale memory past it, the
    slots in one block or split over several (attention's partial softmaxes combined), the rows of the products
    read in one pass or in blocks of 32 columns (48 and 192 wide: the last block partly masked)."""
    monkeypatch.setitem(kernels.TUNING, "block_s", block_s)
    monkeypatch.setitem(kernels.TUNING, "force_block_k", block_k)
    model = fused_test_model(dtype, bias)
    prompt = torch.randint(0, 50257, (1, 6))
    caches = []
    for _ in range(2):
        cache = KVCache(model, batch)
        sample._last_logits(model, prompt, cache)  # prefill, as generate does: the batch of 1 fills every row
        caches.append(StaticDecodeView(cache))
    fused, eager = caches
    step = kernels.FusedDecodeStep(model, batch)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-3
    with torch.inference_mode():
        for position in (6, 7, 19):  # 19: the last slot of the context
            current = torch.randint(0, 50257, (batch, 1))
            fused.input_pos.fill_(position)
            eager.input_pos.fill_(position)
            got = step(model, current, fused).float()
            want = sample._last_logits(model, current, eager).float()
            assert got.shape == (batch, model.config.vocab_size)
            assert torch.allclose(got, want, atol=tolerance, rtol=tolerance), (got - want).abs().max()
            assert not step.counts.any()  # every head's count of splits is reset for the next step
            for layer in range(model.config.n_layer):
                assert torch.allclose(fused.k[layer].float(), eager.k[layer].float(), atol=tolerance)
                assert torch.allclose(fused.v[layer].float(), eager.v[layer].float(), atol=tolerance)


def test_fused_generate_gives_the_eager_tokens(monkeypatch):
    """Greedy past a window jump, and sampled with a seed: the eager static step's tokens."""
    monkeypatch.setitem(kernels.TUNING, "block_s", 4)
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2, block_size=12)
    stats = GenerationStats()
    greedy = dict(temperature=0, num_samples=2)
    assert torch.equal(generated(model, [5, 6, 7], 16, fused=True, stats=stats, **greedy),
                       generated(model, [5, 6, 7], 16, static_cache=True, **greedy))
    assert stats.fused and stats.compile_error is None and stats.window_slides == 1
    sampled = dict(temperature=0.9, top_k=40, repetition_penalty=1.3, seed=3)
    assert torch.equal(generated(model, [9], 8, fused=True, **sampled),
                       generated(model, [9], 8, static_cache=True, **sampled))
    # chunks of 3 steps as on CUDA (run eagerly here), the step's own logits buffer read in place
    monkeypatch.setattr(sample, "GRAPH_STEPS", 3)
    stats = GenerationStats()
    assert torch.equal(generated(model, [5, 6, 7], 16, fused=True, graphs=True, flush_every=4, stats=stats, **greedy),
                       generated(model, [5, 6, 7], 16, static_cache=True, **greedy))
    assert stats.fused and stats.compile_error is None


def test_fused_step_falls_back_to_eager_when_its_kernels_fail(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU\nmore detail")

    monkeypatch.setattr(kernels.FusedDecodeStep, "__call__", broken)
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2)
    stats = GenerationStats()
    tokens = generated(model, [5, 6, 7], 6, temperature=0, fused=True, stats=stats)
    assert torch.equal(tokens, generated(model, [5, 6, 7], 6, temperature=0))
    assert not stats.fused and stats.compile_error == "RuntimeError: no kernel image for this GPU"


