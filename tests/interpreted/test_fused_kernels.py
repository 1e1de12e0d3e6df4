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


@pytest.mark.parametrize(("dtype", "batch", "bias", "block_s", "block_k", "samples"),
                         [(torch.float32, 1, True, 64, 0, 1), (torch.float32, 3, False, 4, 0, 1),
                          (torch.float32, 2, True, 8, 32, 1), (torch.float16, 2, True, 8, 0, 1),
                          (torch.float32, 4, True, 8, 0, 4), (torch.float32, 3, False, 4, 32, 3),
                          (torch.float16, 6, True, 8, 0, 4)])
def test_fused_step_gives_the_eager_logits_and_cache(monkeypatch, dtype, batch, bias, block_s, block_k, samples):
    """Head size 12 (not a power of two: masked lanes), a prefix of cached slots and stale memory past it, the
    slots in one block or split over several (attention's partial softmaxes combined), the rows of the products
    read in one pass or in blocks of 32 columns (48 and 192 wide: the last block partly masked), a block of rows
    a sample or several samples a block (6 samples, up to 4 a block: 3)."""
    monkeypatch.setitem(kernels.TUNING, "block_s", block_s)
    monkeypatch.setitem(kernels.TUNING, "force_block_k", block_k)
    monkeypatch.setitem(kernels.TUNING, "samples_per_program", samples)
    model = fused_test_model(dtype, bias)
    prompt = torch.randint(0, 50257, (1, 6))
    caches = []
    for _ in range(2):
        cache = KVCache(model, batch)
        sample._last_logits(model, prompt, cache)  # prefill, as generate does: the batch of 1 fills every row
        caches.append(StaticDecodeView(cache))
    fused, eager = caches
    step = kernels.FusedDecodeStep(model, batch)
    assert step.samples == min(samples, 3 if batch == 6 else batch)
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


def test_fused_step_under_the_default_tuning():
    """The settings a GPU runs (kernels.TUNING as shipped: attention in blocks of 128 slots) over a context of three
    blocks, the last one partly used: the eager logits and cache at slots in the first, the second and the last.
    Attention works only on the blocks that hold filled slots: in the first block alone it writes no partial
    softmax (the partials, poisoned with NaN first, are left as they were), in the second the third's are left."""
    model = fused_test_model(block_size=300)
    prompt = torch.randint(0, 50257, (1, 6))
    caches = []
    for _ in range(2):
        cache = KVCache(model, 1)
        sample._last_logits(model, prompt, cache)
        caches.append(StaticDecodeView(cache))
    fused, eager = caches
    step = kernels.FusedDecodeStep(model, 1)
    assert step.n_split == 3
    with torch.inference_mode():
        for position, blocks in ((6, 1), (200, 2), (299, 3)):
            current = torch.randint(0, 50257, (1, 1))
            fused.input_pos.fill_(position)
            eager.input_pos.fill_(position)
            for partial in (step.part_acc, step.part_best, step.part_total):
                partial.fill_(float("nan"))
            got, want = step(model, current, fused), sample._last_logits(model, current, eager)
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
            written = step.part_total[0, 0].isfinite()  # (splits,) for the last layer's first head
            assert written.tolist() == [blocks > 1 and i < blocks for i in range(3)], written
            assert not step.counts.any()
    for layer in range(model.config.n_layer):
        assert torch.allclose(fused.k[layer], eager.k[layer], atol=1e-5)
        assert torch.allclose(fused.v[layer], eager.v[layer], atol=1e-5)


def test_fused_step_takes_weights_laid_out_for_cpu_decoding():
    """`sample.decode_layout` stores every Linear weight column-major, the head's too, and so the embedding table
    tied to it; a model laid out so and then moved to a GPU keeps those strides. The products read any strides,
    and the embedding is read from a row-major copy: the eager logits."""
    model = sample.decode_layout(fused_test_model(block_size=12))
    assert model.transformer.wte.weight.stride(1) != 1
    caches = [StaticDecodeView(KVCache(model, 1)) for _ in range(2)]
    step = kernels.FusedDecodeStep(model, 1)
    current = torch.tensor([[1000]])
    with torch.inference_mode():
        for view in caches:
            view.input_pos.fill_(3)
        got, want = step(model, current, caches[0]), sample._last_logits(model, current, caches[1])
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("samples", [1, 2])
def test_fused_generate_gives_the_eager_tokens(monkeypatch, samples):
    """Greedy past a window jump, and sampled with a seed: the eager static step's tokens; in chunks of steps too,
    where the fused step's tokens are drawn by `kernels.draw_token` (sampling as on a GPU: the whole vocabulary);
    a block of the products a sample, or two samples a block."""
    monkeypatch.setattr(sample, "CPU_SHORTLISTS", False)
    monkeypatch.setitem(kernels.TUNING, "block_s", 4)
    monkeypatch.setitem(kernels.TUNING, "samples_per_program", samples)
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2, block_size=12)
    stats = GenerationStats()
    greedy = dict(temperature=0, num_samples=2)
    assert torch.equal(generated(model, [5, 6, 7], 11, fused=True, stats=stats, **greedy),
                       generated(model, [5, 6, 7], 11, static_cache=True, **greedy))
    assert stats.fused and stats.compile_error is None and stats.window_slides == 1
    sampled = dict(temperature=0.9, top_k=40, repetition_penalty=1.3, seed=3)
    assert torch.equal(generated(model, [9], 8, fused=True, **sampled),
                       generated(model, [9], 8, static_cache=True, **sampled))
    # chunks of 3 steps as on CUDA (run eagerly here), the step's own logits buffer read in place
    monkeypatch.setattr(sample, "GRAPH_STEPS", 3)
    stats = GenerationStats()
    assert torch.equal(generated(model, [5, 6, 7], 11, fused=True, graphs=True, flush_every=4, stats=stats, **greedy),
                       generated(model, [5, 6, 7], 11, static_cache=True, **greedy))
    assert stats.fused and stats.compile_error is None
    # and sampled: the chunks' tokens drawn through the fused draw, the same uniform numbers as the eager chunks'
    assert torch.equal(generated(model, [9], 8, fused=True, graphs=True, num_samples=2, **sampled),
                       generated(model, [9], 8, static_cache=True, graphs=True, num_samples=2, **sampled))


def test_fused_step_falls_back_to_eager_when_its_kernels_fail(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no kernel image for this GPU\nmore detail")

    monkeypatch.setattr(kernels.FusedDecodeStep, "__call__", broken)
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2)
    stats = GenerationStats()
    tokens = generated(model, [5, 6, 7], 6, temperature=0, fused=True, stats=stats)
    assert torch.equal(tokens, generated(model, [5, 6, 7], 6, temperature=0))
    assert not stats.fused and stats.compile_error == "RuntimeError: no kernel image for this GPU"




@pytest.mark.parametrize("stop_at_eot", [True, False])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_fused_draw_does_what_the_pytorch_draw_does(stop_at_eot, penalty, temperature):
    """`_Draw.next_into` (one kernel) against `_Draw.next` + the writes of the token, from the same state: tokens,
    the fed token, `finished`, `first_bad` and `seen`, over rows that are plain, tied, NaN, +inf or all -inf, and
    samples already finished or already bad."""
    batch, vocab = 8, 50304
    torch.manual_seed(1)
    logits = torch.randn(batch, vocab).to(torch.bfloat16)
    logits[1, [10, 4000, 50000]] = 9.0  # a tie: the first one wins
    logits[2, 77] = float("nan")
    logits[3, 123] = float("inf")
    logits[4] = float("-inf")
    logits[5, 50256] = 20.0  # <|endoftext|>
    logits[6, 50300] = 99.0  # past GPT-2's vocabulary: never drawn
    logits[7, 5] = float("nan")  # in a sample that has finished: not recorded as bad
    uniform = torch.rand(batch, 1, dtype=torch.float64)
    results = []
    for fused in (True, False):
        finished = torch.tensor([False, True, False, False, False, False, False, True])
        first_bad = torch.full((batch,), sample.NEVER, dtype=torch.long)
        first_bad[3] = 2  # already bad: kept
        seen = torch.zeros((batch, vocab), dtype=torch.bool) if penalty != 1.0 else None
        if seen is not None:
            seen[:, :300] = True
        generator = torch.Generator().manual_seed(0)
        draw = sample._Draw(temperature, 20, 1.0, penalty, seen, finished, first_bad, stop_at_eot, generator)
        tokens = torch.full((batch, 3), -5, dtype=torch.long)
        current = torch.full((batch, 1), -5, dtype=torch.long)
        step = torch.tensor(4)
        if fused:
            draw.next_into(logits, step, uniform, tokens, 1, current)
        else:
            token = draw.next(logits, step, uniform)
            tokens[:, 1] = token
            current.copy_(token[:, None])
        results.append((tokens, current, finished, first_bad, seen))
    for got, want in zip(*results, strict=True):
        assert (got is None and want is None) or torch.equal(got, want), (got, want)
    tokens = results[0][0]
    if temperature == 0 and penalty == 1.0:
        assert tokens[0, 1] == logits[0, :50257].float().argmax() and tokens[6, 1] != 50300
        assert tokens[1, 1] == (50256 if stop_at_eot else 10) and tokens[2, 1] == 0 and tokens[4, 1] == 0
        never = sample.NEVER
        assert results[0][3].tolist() == [never, never, 4, 2, 4, never, never, never]


@pytest.mark.parametrize(("dtype", "block", "vocab"), [(torch.bfloat16, 2048, 50304), (torch.float32, 256, 4096)])
def test_the_fused_draw_samples_as_pytorch_samples_on_a_gpu(monkeypatch, dtype, block, vocab):
    """`kernels.draw_token` sampling itself (temperature, top-k, no top-p) against `sample_next_token` as it
    samples on a GPU (the whole vocabulary masked, CPU_SHORTLISTS off), from the same uniform numbers: the same
    token, over top-k off, 1, 20, 1024 and the whole vocabulary, temperatures from 0.05 to 3, ties at the k-th
    largest, -inf logits and a vocabulary (GPT-2's, or 4096 tokens) split into slices of `block` (the programs of
    a sample). Settings it does not sample with (top-p, k > 1024) take the PyTorch sampler's token."""
    monkeypatch.setattr(sample, "CPU_SHORTLISTS", False)
    monkeypatch.setitem(kernels.TUNING, "draw_block", block)
    batch = 6
    torch.manual_seed(2)
    logits = (torch.randn(batch, vocab) * 2).to(dtype)
    logits[1, 1000:1040] = logits[1].float().max()  # 40 tied at the top: top-20 keeps all of them
    logits[2, ::3] = float("-inf")
    logits[3, 7] = 12.0  # nearly certain
    logits[4] = logits[4].float().round().to(dtype)  # thousands of ties everywhere
    draws = 0
    for top_k, top_p, temperature in ((0, 1.0, 1.0), (1, 1.0, 0.8), (20, 1.0, 0.8), (20, 1.0, 0.05), (1024, 1.0, 3.0),
                                      (60000, 1.0, 0.7), (20, 0.9, 0.8), (2000, 1.0, 0.8)):
        for seed in range(2):
            uniform = torch.rand(batch, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            want = sample.sample_next_token(logits, temperature, top_k, top_p, None, uniform)
            finished = torch.zeros(batch, dtype=torch.bool)
            draw = sample._Draw(temperature, top_k, top_p, 1.0, None, finished, torch.full((batch,), sample.NEVER),
                                False, torch.Generator())
            tokens, current = torch.zeros((batch, 1), dtype=torch.long), torch.zeros((batch, 1), dtype=torch.long)
            draw.next_into(logits, torch.tensor(0), uniform, tokens, 0, current)
            assert torch.equal(tokens[:, 0], want), (top_k, top_p, temperature, seed, tokens[:, 0], want)
            draws += batch
    assert draws == 8 * 2 * batch
    assert kernels.samples_in_kernel(0.8, 20, 1.0, 50257) and not kernels.samples_in_kernel(0.8, 20, 0.9, 50257)
    assert not kernels.samples_in_kernel(0.8, 2000, 1.0, 50257) and kernels.samples_in_kernel(0.8, 0, 1.0, 50257)


def test_the_draw_kernel_is_built_on_copies_before_capture_and_skipped_if_it_fails(monkeypatch):
    """`_DecodeChunk._warm_up_draw` (run before a CUDA graph is captured) leaves the draw's state as it was, and
    a draw kernel that fails to build means the PyTorch draw, not an error."""
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2)
    view = StaticDecodeView(KVCache(model, 2))
    stats = GenerationStats(fused=True)
    finished, first_bad = torch.tensor([False, True]), torch.full((2,), sample.NEVER)
    seen = torch.zeros((2, model.config.vocab_size), dtype=torch.bool)
    draw = sample._Draw(0.0, 0, 1.0, 1.2, seen, finished, first_bad, True, torch.Generator())
    current = torch.zeros((2, 1), dtype=torch.long)
    chunk = sample._DecodeChunk(kernels.FusedDecodeStep(model, 2), model, view, current, 2, draw, stats)
    chunk.logits.copy_(torch.randn_like(chunk.logits))
    chunk._warm_up_draw()
    assert chunk.fused_draw
    assert not finished[0] and not seen.any() and not current.any() and not chunk.tokens.any()

    def broken(*args, **kwargs):
        raise RuntimeError("cannot build")

    monkeypatch.setattr(kernels, "draw_token", broken)
    chunk._warm_up_draw()
    assert not chunk.fused_draw


def test_a_captured_chunk_builds_its_kernels_before_capture_and_starts_where_it_should(monkeypatch):
    """`_DecodeChunk._capture` on stand-ins for CUDA's streams and graphs (the capture records the steps, a replay
    runs them): every kernel the captured steps launch has run before (a kernel first launched inside a capture
    fails: Triton loads it then), by the step before the first chunk, which already uses the options of the
    captured steps, so no warm-up step is spent; the tokens are the eager chunks'."""
    import contextlib

    monkeypatch.setitem(kernels.TUNING, "block_s", 4)
    monkeypatch.setattr(sample, "GRAPH_STEPS", 3)
    monkeypatch.setattr(sample, "CPU_SHORTLISTS", False)  # sample as on a GPU, as the fused draw does
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2, block_size=12)
    sampled = dict(temperature=0.9, top_k=40, seed=3, num_samples=2, graphs=True)
    want = generated(model, [9, 4], 10, static_cache=True, **sampled)

    class Stream:
        device = torch.device("cpu")

        def wait_stream(self, other):
            pass

    chunks, calls = [], []

    class Graph:
        def replay(self):
            chunks[-1]._take_steps()

    @contextlib.contextmanager
    def capture(graph, stream=None):
        chunk = chunks[-1]
        chunk._take_steps = lambda: None  # recorded, not run
        yield
        del chunk._take_steps

    original_init, original_call = sample._DecodeChunk.__init__, kernels.FusedDecodeStep.__call__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.stream = Stream()
        chunks.append(self)

    original_capture, capturing = sample._DecodeChunk._capture, []

    def capture_chunk(self):
        capturing.append(True)
        original_capture(self)
        capturing.clear()

    def call(self, *args, **kwargs):
        calls.append((bool(capturing), self.advance is not None))
        return original_call(self, *args, **kwargs)

    monkeypatch.setattr(sample._DecodeChunk, "__init__", init)
    monkeypatch.setattr(sample._DecodeChunk, "_capture", capture_chunk)
    monkeypatch.setattr(kernels.FusedDecodeStep, "__call__", call)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    stats = GenerationStats()
    got = generated(model, [9, 4], 10, fused=True, stats=stats, **sampled)
    assert stats.graphed and stats.fused and stats.graph_error is None and chunks[-1].fused_draw
    # the step before the first chunk already runs the kernels as the chunk's steps do (the head moves the position
    # and counter on): the capture then needs no warm-up step
    assert calls[0] == (False, True) and not any(warm_up for warm_up, advance in calls)
    assert 0 < stats.capture_s < 60
    assert torch.equal(got, want)


@pytest.mark.parametrize("top_p", [1.0, 0.9])  # the kernel samples itself; PyTorch's sampler picks
def test_the_chunks_draws_run_the_draw_kernel_built_before_capture(monkeypatch, top_p):
    """Every draw of a chunk's steps launches the draw kernel as Triton's JIT specialised it for the warm-up
    before the capture (a new variant would be built and loaded inside the capture, which fails): in particular
    the uniform numbers of step i, a column of the chunk's (B, steps) float64 tensor, 8-byte aligned at odd i."""
    real = kernels._draw
    skip = set(real.kwargs["do_not_specialize"])  # (the interpreter's function keeps the decorator's arguments)
    keys = []

    def specialised(arg):  # what Triton's JIT specialises a build on: a pointer's 16-byte alignment, an int's
        if isinstance(arg, torch.Tensor):  # being 1 or a multiple of 16, the type of the rest
            return "ptr", str(arg.dtype), arg.data_ptr() % 16 == 0
        if isinstance(arg, bool) or not isinstance(arg, int):
            return type(arg).__name__
        return "int", arg == 1, arg % 16 == 0

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                key = tuple(specialised(arg) if name not in skip else None
                            for name, arg in zip(real.arg_names, args, strict=False))
                keys.append((key, tuple(sorted(kwargs.items()))))
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(kernels, "_draw", Recorder())
    monkeypatch.setattr(sample, "CPU_SHORTLISTS", False)
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2)
    view = StaticDecodeView(KVCache(model, 2))
    view.input_pos.fill_(3)
    stats = GenerationStats(fused=True)
    finished, first_bad = torch.tensor([False, False]), torch.full((2,), sample.NEVER)
    draw = sample._Draw(0.8, 20, top_p, 1.0, None, finished, first_bad, True, torch.Generator().manual_seed(1))
    current = torch.zeros((2, 1), dtype=torch.long)
    chunk = sample._DecodeChunk(kernels.FusedDecodeStep(model, 2), model, view, current, 3, draw, stats)
    chunk.logits.copy_(torch.randn_like(chunk.logits))
    chunk.uniform.uniform_(0.0, 1.0, generator=draw.generator)
    chunk._warm_up_draw()
    assert chunk.fused_draw
    built = set(keys)
    keys.clear()
    chunk._take_steps()
    assert len(keys) == 3 and set(keys) <= built, [k for k in keys if k not in built]


@pytest.mark.parametrize(("num_samples", "samples", "block_k"), [(3, 3, 0), (6, 4, 16)])
def test_fused_generate_several_samples_a_block_gives_the_eager_tokens(monkeypatch, num_samples, samples, block_k):
    """Several samples a block of the products (3; 6 at up to 4 a block: 3), sampled so that the samples part (a
    product that mixed them up would show), past a window jump, in one pass or in blocks of 16 columns."""
    monkeypatch.setattr(sample, "CPU_SHORTLISTS", False)
    monkeypatch.setitem(kernels.TUNING, "block_s", 4)
    monkeypatch.setitem(kernels.TUNING, "force_block_k", block_k)
    monkeypatch.setitem(kernels.TUNING, "samples_per_program", samples)
    model = fused_test_model(n_layer=1, n_embd=32, n_head=2, block_size=12)
    stats = GenerationStats()
    sampled = dict(temperature=1.5, seed=5, num_samples=num_samples)
    got = generated(model, [5, 6, 7], 11, fused=True, stats=stats, **sampled)
    want = generated(model, [5, 6, 7], 11, static_cache=True, **sampled)
    assert stats.fused and stats.compile_error is None and stats.window_slides >= 1
    assert len({tuple(row) for row in want.tolist()}) > 1  # the samples part
    assert torch.equal(got, want), (got, want)
    # in chunks of 3 steps (the last product moves the cache slot and the step counter on: once a step), the
    # tokens drawn by the fused draw
    monkeypatch.setattr(sample, "GRAPH_STEPS", 3)
    stats = GenerationStats()
    got = generated(model, [5, 6, 7], 11, fused=True, graphs=True, flush_every=4, stats=stats, **sampled)
    want = generated(model, [5, 6, 7], 11, static_cache=True, graphs=True, **sampled)
    assert stats.fused and stats.compile_error is None and stats.window_slides >= 1
    assert torch.equal(got, want), (got, want)
