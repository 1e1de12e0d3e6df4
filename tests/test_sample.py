"""Generation at the token level: the KV cache (sliced and static), sampling, windows, stop rules, text streams."""

import copy
import threading

import pytest
import torch

from tinygpt_cli import sample
from tinygpt_cli.config import ModelConfig
from tinygpt_cli.errors import GenerationError
from tinygpt_cli.model import GPT
from tinygpt_cli.sample import (
    GenerationStats,
    KVCache,
    PromptLookup,
    TextStream,
    apply_repetition_penalty,
    decode_layout,
    generate,
    sample_next_token,
    sample_text,
)
from tinygpt_cli.tokenizer import EOT_ID, get_encoding

BLOCK = 24


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=BLOCK)).eval()


@pytest.fixture(scope="module")
def eot_model(model):
    """A model whose greedy choice is always <|endoftext|>: ln_f outputs that token's embedding, made the longest."""
    torch.manual_seed(0)
    biased = GPT(model.config).eval()
    with torch.no_grad():
        biased.transformer.wte.weight[EOT_ID] *= 20
        biased.transformer.ln_f.weight.zero_()
        biased.transformer.ln_f.bias.copy_(biased.transformer.wte.weight[EOT_ID])
    return biased


def _run(model, prompt, n, **kwargs):
    return torch.stack(list(generate(model, prompt, n, **kwargs)), dim=1)  # (B, n)


# ------------------------------------------------------------------------------------------------ the cache
@pytest.mark.parametrize(("prompt_len", "batch", "new"), [(1, 1, 23), (5, 2, 19), (12, 3, 12), (7, 2, 60), (24, 1, 30)])
def test_cached_and_uncached_greedy_agree(model, prompt_len, batch, new):
    """Within the context and past it (the window slides the same way in both paths)."""
    prompt = list(range(100, 100 + prompt_len))
    cached = _run(model, prompt, new, temperature=0, num_samples=batch)
    uncached = _run(model, prompt, new, temperature=0, num_samples=batch, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, cached[:1].expand_as(cached))  # greedy: every sample is the same


@pytest.mark.parametrize("flush_every", [2, 5, 16, 40])
def test_tokens_flushed_in_chunks_are_the_same_tokens(model, eot_model, flush_every):
    """CUDA hands tokens to the host in chunks: the same tokens, the same early end at <|endoftext|>, the same stats
    (sampled, past the window, with the static cache), whatever the chunk."""
    settings = dict(temperature=0.9, top_k=50, num_samples=3, seed=7, static_cache=True)
    each = [t.clone() for t in generate(model, [5, 6, 7], 150, flush_every=1, **settings)]
    stats = GenerationStats()
    chunked = list(generate(model, [5, 6, 7], 150, flush_every=flush_every, stats=stats, **settings))
    assert torch.equal(torch.stack(each), torch.stack(chunked))
    assert stats.new_tokens == 150 and stats.window_slides >= 10 and 0 < stats.time_to_first_token_s <= stats.seconds
    mixed = dict(temperature=0.35, top_k=0, seed=1, num_samples=8, stop_at_eot=True)  # rows end at different steps
    each = list(generate(eot_model, [1, 2], 40, flush_every=1, **mixed))
    chunked = list(generate(eot_model, [1, 2], 40, flush_every=flush_every, **mixed))
    assert 2 < len(each) < 40 and torch.equal(torch.stack(each), torch.stack(chunked))
    with pytest.raises(ValueError, match="flush_every"):
        next(generate(model, [1], 3, flush_every=0))


@pytest.mark.parametrize("use_cache", [True, False])
def test_memory_does_not_grow_with_max_new_tokens(model, use_cache):
    """A generator asked for a trillion tokens holds a window's worth: the first 80 are those of a short run."""
    endless = generate(model, [5, 6], 10**12, temperature=0.8, seed=2, use_cache=use_cache, flush_every=7)
    first = torch.stack([next(endless) for _ in range(80)], dim=1)
    assert torch.equal(first, _run(model, [5, 6], 80, temperature=0.8, seed=2, use_cache=use_cache, flush_every=7))


def test_too_many_samples_for_memory(model, monkeypatch):
    """Checked against free memory before anything is allocated; an allocation that fails anyway (memory the
    estimate did not see) gets the same message instead of a traceback."""
    with pytest.raises(GenerationError, match=r"--num-samples 1000000000 needs about .* GiB .*ask for fewer samples"):
        next(generate(model, [1, 2], 5, num_samples=10**9))
    monkeypatch.setattr(sample, "free_memory", lambda device: None)

    for refusal in ("can't allocate memory", "not enough memory"):  # Linux and macOS; Windows

        def fail(*args, refusal=refusal, **kwargs):
            raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: {refusal}: ...")

        monkeypatch.setattr(sample.KVCache, "__init__", fail)
        with pytest.raises(GenerationError, match="--num-samples 3 needs about .* more than cpu could allocate"):
            next(generate(model, [1, 2], 5, num_samples=3))
    monkeypatch.setattr(sample.KVCache, "__init__", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("other")))
    with pytest.raises(RuntimeError, match="other"):  # not an allocation failure: not hidden
        next(generate(model, [1, 2], 5, num_samples=3))


def test_on_start_comes_only_once_generation_is_under_way(model):
    """`on_start` (the CLI echoes the prompt there) ran before `generate` checked anything: a refused setting still
    put the prompt on stdout before its error (code review)."""
    started = []
    with pytest.raises(GenerationError, match="--num-samples 1000000000 needs about"):
        sample.sample_text(model, "hi", 5, num_samples=10**9, on_start=lambda: started.append(True))
    assert started == []
    sample.sample_text(model, "hi", 2, on_start=lambda: started.append(True))
    assert started == [True]


def test_static_cache_matches_the_sliced_cache(model):
    stats = GenerationStats()
    sliced = _run(model, [3, 1, 4, 1, 5], 50, temperature=0, num_samples=2)
    static = _run(model, [3, 1, 4, 1, 5], 50, temperature=0, num_samples=2, static_cache=True, stats=stats)
    assert torch.equal(sliced, static)
    assert stats.window_slides >= 2 and not stats.compiled


@pytest.mark.parametrize(("prompt_len", "batch", "new", "flush"), [(1, 1, 23, 4), (5, 2, 50, 4), (3, 3, 61, 5),
                                                                   (2, 1, 7, 8), (20, 2, 30, 3)])
@pytest.mark.parametrize("graph_steps", [1, 4])
def test_decode_chunks_give_the_tokens_of_single_steps(model, monkeypatch, prompt_len, batch, new, flush,
                                                       graph_steps):
    """`graphs`: steps run as chunks (a CUDA graph on CUDA, eagerly here). Greedy tokens are those of single
    steps, for any flush, ends inside a chunk, window slides and samples that stop at <|endoftext|>."""
    monkeypatch.setattr(sample, "GRAPH_STEPS", graph_steps)
    prompt = list(range(200, 200 + prompt_len))
    settings = dict(temperature=0, num_samples=batch, static_cache=True, flush_every=flush)
    stats = GenerationStats()
    chunked = _run(model, prompt, new, graphs=True, stats=stats, **settings)
    assert torch.equal(chunked, _run(model, prompt, new, graphs=False, **settings))
    assert stats.new_tokens == new and not stats.graphed  # nothing is captured off CUDA
    penalised = dict(settings, repetition_penalty=1.3)
    assert torch.equal(_run(model, prompt, new, graphs=True, **penalised),
                       _run(model, prompt, new, graphs=False, **penalised))
    mixed = dict(settings, temperature=0.7, top_k=5, seed=1, stop_at_eot=True)
    assert torch.equal(_run(model, prompt, new, graphs=True, **mixed), _run(model, prompt, new, graphs=True, **mixed))


def test_decode_chunks_sample_reproducibly_and_stop_at_eot(model, eot_model, monkeypatch):
    monkeypatch.setattr(sample, "GRAPH_STEPS", 3)
    settings = dict(temperature=1.0, top_k=0, top_p=0.9, num_samples=2, static_cache=True, flush_every=4,
                    graphs=True)
    first = _run(model, [7, 8], 40, seed=3, **settings)
    assert torch.equal(first, _run(model, [7, 8], 40, seed=3, **settings))
    assert not torch.equal(first, _run(model, [7, 8], 40, seed=4, **settings))
    ended = list(generate(eot_model, [1, 2], 40, temperature=0, stop_at_eot=True, static_cache=True, flush_every=4,
                          graphs=True))
    assert len(ended) == 1 and ended[0].tolist() == [EOT_ID]
    with pytest.raises(ValueError, match="static cache"):
        next(generate(model, [1], 3, graphs=True))


def test_decode_chunks_hand_out_a_flush_once_the_next_is_queued(model, monkeypatch):
    """Between chunks a flush is copied out and handed out at the next flush, so the device has a flush's steps
    queued while the caller takes the tokens; the first token comes at once and the last flush with the rest. The
    tokens are those of immediate flushes."""
    monkeypatch.setattr(sample, "GRAPH_STEPS", 1)
    real, steps = sample._static_step, []

    def counted(*args, **kwargs):
        steps.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(sample, "_static_step", counted)
    settings = dict(temperature=0, static_cache=True, flush_every=4)
    queued = []  # steps taken when each token reached the caller
    got = []
    for tokens in generate(model, [1, 2], 17, graphs=True, **settings):
        queued.append(len(steps))
        got.append(tokens)
    assert torch.equal(torch.stack(got, dim=1), _run(model, [1, 2], 17, graphs=False, **settings))
    # token 1 after the prefill alone; tokens 2-5 (the flush of step 5) once the flush of step 9 is queued, ...
    assert queued == [0] + [9] * 4 + [13] * 4 + [17] * 8


def test_a_flush_copied_from_a_second_gpu_waits_for_that_gpus_stream(monkeypatch):
    """The copies of a flush are queued on the current stream of the tokens' GPU; the event that `wait` waits
    for must be recorded there, not on the current device's stream (cuda:0 for a model on cuda:1), or the host
    reads the pinned tokens before they have arrived."""
    recorded = []

    def current_stream(device=None):  # as torch: no device means the current one (cuda:0 here)
        return ("stream", torch.device("cuda", 0) if device is None else torch.device(device))

    class Event:
        def record(self, stream=None):  # torch.cuda.Event.record: current_stream() when no stream is given
            recorded.append(stream if stream is not None else current_stream())

        def synchronize(self):
            pass

    class OnSecondGpu:
        device = torch.device("cuda", 1)

        def __init__(self, value):
            self.value = value

        def to(self, *args, **kwargs):
            return self.value

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    copied = sample._HostCopy(OnSecondGpu(torch.tensor([[7, 8]])), OnSecondGpu(torch.tensor([sample.NEVER])))
    assert recorded == [("stream", torch.device("cuda", 1))]
    tokens, bad_step = copied.wait()
    assert tokens.tolist() == [[7, 8]] and bad_step == sample.NEVER


def test_decode_chunks_leave_the_counter_and_position_to_the_chunk_before(model, monkeypatch):
    """A chunk that follows another one does not set its step counter and cache position again (two kernels a
    chunk): the chunk before left them where they should be. After a window jump they are set."""
    monkeypatch.setattr(sample, "GRAPH_STEPS", 2)
    fills, real = [], torch.Tensor.fill_

    def counted(self, value):
        fills.append(value)
        return real(self, value)

    monkeypatch.setattr(torch.Tensor, "fill_", counted)
    run, chunk_fills = sample._DecodeChunk.run, []

    def run_counted(self, logits, produced, position):
        before = len(fills)
        run(self, logits, produced, position)
        chunk_fills.append(len(fills) - before)

    monkeypatch.setattr(sample._DecodeChunk, "run", run_counted)
    stats = GenerationStats()
    settings = dict(temperature=0, static_cache=True, flush_every=4)
    chunked = _run(model, [3, 4, 5], 40, graphs=True, stats=stats, **settings)
    assert torch.equal(chunked, _run(model, [3, 4, 5], 40, graphs=False, **settings))
    assert stats.window_slides >= 1
    assert chunk_fills[0] == 2 and chunk_fills.count(2) == 1 + stats.window_slides
    assert chunk_fills.count(0) == len(chunk_fills) - chunk_fills.count(2)


def test_a_later_call_takes_the_decoder_an_earlier_one_built(monkeypatch):
    """With `graphs`, the cache, the draw's state and the chunk (on CUDA its captured graph) are kept on the model
    for its next call with the same settings, reset, not built again: the same tokens as calls that build their
    own, whatever the prompt and length (a window jump too). Other settings, weights changed in place, or a call
    while another is running build anew; an idle decoder holds no reference to the model, which can be freed."""
    import gc
    import weakref

    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK)).eval()
    gc.collect()  # (another test's model that only a cycle held would go at the end's collect, not counted)
    others = len(sample._KEPT)  # the decoders of the other tests' models
    made, real = [], sample._DecodeChunk.__init__

    def counted(self, *args, **kwargs):
        made.append(self)
        real(self, *args, **kwargs)

    monkeypatch.setattr(sample._DecodeChunk, "__init__", counted)
    runs, real_run = [], sample._DecodeChunk.run

    def run(self, logits, produced, position):
        runs.append(produced)
        real_run(self, logits, produced, position)

    monkeypatch.setattr(sample._DecodeChunk, "run", run)
    settings = dict(temperature=0.9, top_k=20, repetition_penalty=1.3, stop_at_eot=True, num_samples=2,
                    static_cache=True, flush_every=3)
    # a kept decoder's chunk takes the first step too (no step outside a chunk), and the first token comes at once
    tokens = generate(model, [4], 8, graphs=True, seed=0, **settings)
    next(tokens)
    assert runs == []  # a first call: drawn before any chunk, and the step after it is not a chunk's
    assert len(list(tokens)) == 7 and runs == list(range(1, 8))
    tokens = generate(model, [4], 8, graphs=True, seed=0, **settings)
    next(tokens)
    assert runs[7:] == [0]
    tokens.close()
    runs.clear()
    assert len(made) == 1

    def both(net, prompt, n, **extra):  # (kept decoder, built for the call)
        return (_run(net, prompt, n, graphs=True, **{**settings, **extra}),
                _run(net, prompt, n, graphs=False, **{**settings, **extra}))

    for prompt, n, seed in (([5, 6, 7], 20, 4), ([9], 45, 5), ([5, 6, 7], 20, 4)):
        kept, fresh = both(model, prompt, n, seed=seed)
        assert torch.equal(kept, fresh)
    assert len(made) == 1 and runs.count(0) == 3
    decoder = sample._KEPT[model]
    assert not decoder.busy and decoder.chunk.model is None
    with torch.inference_mode():  # as a call whose samples all ended, or went non-finite at once, leaves them
        decoder.chunk.draw.finished.fill_(True)
        decoder.chunk.draw.first_bad.fill_(0)
    kept, fresh = both(model, [5, 6, 7], 20, seed=4)
    assert torch.equal(kept, fresh) and len(made) == 1
    kept, fresh = both(model, [1, 2], 10, seed=1, temperature=0.5)  # another temperature: another decoder
    assert torch.equal(kept, fresh) and len(made) == 2 and sample._KEPT[model] is not decoder
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(3.0)  # trained, say: the weights' version moves on
    kept, fresh = both(model, [1, 2], 10, seed=1, temperature=0.5)
    assert torch.equal(kept, fresh) and len(made) == 3
    # a call while another is running on the kept decoder builds its own, and leaves the kept one where it is
    running = generate(model, [3, 4], 12, graphs=True, seed=2, **settings)
    first = next(running)  # (the first temperature again: a decoder built anew)
    decoder = sample._KEPT[model]
    assert decoder.busy and len(made) == 4
    inner, fresh = both(model, [8], 15, seed=3)
    assert torch.equal(inner, fresh) and len(made) == 5 and sample._KEPT[model] is decoder
    rest = torch.stack([first, *running], dim=1)
    assert torch.equal(rest, _run(model, [3, 4], 12, graphs=False, seed=2, **settings))
    assert not decoder.busy
    alive = weakref.ref(model)
    del model, decoder, made[:]  # (the chunks of the calls that built their own hold the model)
    gc.collect()
    assert alive() is None and len(sample._KEPT) == others


def test_two_threads_never_take_the_same_kept_decoder(monkeypatch):
    """Two calls on one model from two threads: the kept decoder is checked (idle) and taken in two steps, and
    torch releases the GIL in between; both must not take it (they would share the cache and the draw state)."""
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK)).eval()
    settings = dict(temperature=0.9, top_k=20, num_samples=2, static_cache=True, graphs=True)
    _run(model, [5, 6], 4, seed=0, **settings)  # builds the decoder, kept idle
    barrier = threading.Barrier(2, timeout=20)
    real_memory, waiting = sample.generation_memory, [2]

    def meeting(*args, **kwargs):  # both calls have looked at the kept decoder before either goes on
        if waiting[0] > 0:
            waiting[0] -= 1
            barrier.wait()
        return real_memory(*args, **kwargs)

    monkeypatch.setattr(sample, "generation_memory", meeting)
    used: dict[int, set[int]] = {}
    real_run = sample._DecodeChunk.run

    def run(self, *args):
        used.setdefault(threading.get_ident(), set()).add(id(self))
        real_run(self, *args)

    monkeypatch.setattr(sample._DecodeChunk, "run", run)
    results, errors = {}, []

    def call(seed):
        try:
            results[seed] = _run(model, [5, 6, 7], 20, seed=seed, **settings)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len(used) == 2 and not set.intersection(*used.values())
    for seed in (1, 2):
        assert torch.equal(results[seed], _run(model, [5, 6, 7], 20, seed=seed, **{**settings, "graphs": False}))
    assert not sample._KEPT[model].busy


def test_weights_made_in_inference_mode_can_be_kept():
    """A model built (or moved, or converted) under torch.inference_mode has inference tensors as weights, which
    track no version: `_decoder_key` must not ask for one (on CUDA `generate` crashed with graphs, its default)."""
    with torch.inference_mode():
        torch.manual_seed(1)
        model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=BLOCK)).eval()
    settings = dict(temperature=0.9, top_k=20, num_samples=2, static_cache=True)
    sample._decoder_key(model, 1, fused=False, compile=False)
    kept = _run(model, [5, 6, 7], 10, seed=3, graphs=True, **settings)
    assert torch.equal(_run(model, [5, 6, 7], 10, seed=3, graphs=True, **settings), kept)
    assert torch.equal(_run(model, [5, 6, 7], 10, seed=3, graphs=False, **settings), kept)


def test_decode_chunks_stop_at_the_first_non_finite_step(model, monkeypatch):
    """Logits turn NaN at the 7th step, inside a chunk: the tokens before it are yielded, then the error."""
    monkeypatch.setattr(sample, "GRAPH_STEPS", 4)
    _nan_from_call(monkeypatch, "_last_logits", 7)
    got = []
    with pytest.raises(GenerationError, match="non-finite logits"):
        for tokens in generate(model, [1, 2], 20, temperature=0.8, seed=0, flush_every=4, static_cache=True,
                               graphs=True):
            got.append(tokens)
    assert len(got) == 6


def test_decode_compile_options_reach_inductor_instead_of_a_mode(model, monkeypatch):
    """`sample.DECODE_COMPILE_OPTIONS` (the bench's coordinate-descent variant) compiles the step with those
    inductor options, its own entry beside the plain one; torch.compile refuses a mode with options."""
    calls = []

    def recording_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", recording_compile)
    monkeypatch.setattr(sample, "_COMPILED_STEPS", {})
    monkeypatch.setattr(sample, "DECODE_COMPILE_OPTIONS", {"coordinate_descent_tuning": True})
    eager = _run(model, [5, 6, 7], 12, temperature=0)
    assert torch.equal(_run(model, [5, 6, 7], 12, temperature=0, compile=True), eager)
    (call,) = calls
    assert "mode" not in call and call["options"] == {"triton.cudagraphs": False, "coordinate_descent_tuning": True}
    monkeypatch.setattr(sample, "DECODE_COMPILE_OPTIONS", {})
    _run(model, [5, 6, 7], 4, temperature=0, compile=True)
    assert calls[1]["mode"] == "default" and "options" not in calls[1] and len(sample._COMPILED_STEPS) == 2


def test_compiled_decode_step_is_captured_once(model, monkeypatch):
    """Static shapes: torch.compile traces the decode step as one graph and never again, across window slides
    and across calls with a fresh cache (CUDA graphs need exactly this). The backend only counts captures."""
    captures = []

    def counting_backend(graph_module, example_inputs):
        captures.append(graph_module)
        return graph_module.forward

    compiled = torch.compile(sample._last_logits, backend=counting_backend, fullgraph=True, dynamic=False)
    monkeypatch.setitem(sample._COMPILED_STEPS, "default", compiled)
    eager = _run(model, [5, 6, 7], 40, temperature=0, num_samples=2)
    stats = GenerationStats()
    assert torch.equal(_run(model, [5, 6, 7], 40, temperature=0, num_samples=2, compile=True, stats=stats), eager)
    assert stats.compiled and stats.window_slides >= 1
    _run(model, [9, 8], 30, temperature=0, num_samples=2, compile=True)  # a new cache, the same graph
    assert len(captures) == 1


def test_a_failing_compile_falls_back_to_eager(model, monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler here\nmore detail")

    monkeypatch.setitem(sample._COMPILED_STEPS, "default", broken)
    stats = GenerationStats()
    tokens = _run(model, [5, 6, 7], 10, temperature=0, compile=True, stats=stats)
    assert torch.equal(tokens, _run(model, [5, 6, 7], 10, temperature=0))
    assert not stats.compiled and stats.compile_error == "RuntimeError: no compiler here"


def test_decode_layout_changes_memory_order_only(model):
    relaid = GPT(model.config).eval()
    relaid.load_state_dict(model.state_dict())
    params = list(relaid.parameters())
    decode_layout(relaid)
    assert all(a is b for a, b in zip(params, relaid.parameters(), strict=True))
    assert relaid.lm_head.weight is relaid.transformer.wte.weight and relaid.lm_head.weight.stride() == (1, 50304)
    assert relaid.transformer.h[0].mlp.c_fc.weight.stride() == (1, 128)
    assert sample._cpu_head(relaid).data_ptr() == relaid.lm_head.weight.data_ptr()  # a view, no copy
    x = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(relaid(x)[0], model(x)[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(_run(relaid, [1, 2, 3], 30, temperature=0), _run(model, [1, 2, 3], 30, temperature=0))



def test_the_cpu_head_copy_follows_a_change_through_data(model):
    """Audit: a head changed through `.data` (an EMA, an initialisation) moves no version, and the next call
    sampled with the old head's copy against the new embeddings."""
    model = copy.deepcopy(model)  # (the module's model is shared)
    before = _run(model, [1, 2, 3], 8, temperature=0)
    with torch.no_grad():
        model.lm_head.weight.data.mul_(-1)
    fresh = GPT(model.config).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(_run(model, [1, 2, 3], 8, temperature=0), _run(fresh, [1, 2, 3], 8, temperature=0))
    assert not torch.equal(_run(model, [1, 2, 3], 8, temperature=0), before)

@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("vocab", [50304, 50257, 3 * sample.HEAD_BLOCK, sample.HEAD_BLOCK + 7])
def test_cpu_head_product_in_blocks_matches_one_product(rows, vocab):
    """The blocked product covers every column once, for any row count and a vocabulary that blocks don't divide
    (below two blocks it is the one product)."""
    torch.manual_seed(0)
    head_t = torch.randn(32, vocab)
    hidden = torch.randn(rows, 3, 32)[:, -1]  # a strided view, as `_last_logits` passes it
    logits = sample.head_product(hidden, head_t)
    assert logits.shape == (rows, vocab) and logits.is_contiguous()
    torch.testing.assert_close(logits, hidden @ head_t, rtol=1e-5, atol=1e-5)


def test_cache_update_masks_a_chunk_after_a_prefix(model):
    cache = KVCache(model, batch_size=2, max_tokens=10)
    k = torch.randn(1, 2, 3, 16)
    keys, _, mask = cache.update(0, k, k)
    assert keys is k and mask is None  # a prefill attends over its own keys
    assert torch.equal(cache.k[0][1, :, :3], k[0])  # a batch of 1 fills every row
    cache.advance(3)
    keys, _, mask = cache.update(0, torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16))
    assert keys.shape == (2, 2, 5, 16)
    assert mask.tolist() == [[True] * 4 + [False], [True] * 5]
    cache.advance(2)
    with pytest.raises(ValueError, match="exceeds block_size"):
        cache.positions(6, torch.device("cpu"))


# ------------------------------------------------------------------------------------------------ sampling
def test_same_seed_same_tokens(model):
    a = _run(model, [1, 2, 3], 10, temperature=1.0, seed=5, num_samples=2)
    b = _run(model, [1, 2, 3], 10, temperature=1.0, seed=5, num_samples=2)
    c = _run(model, [1, 2, 3], 10, temperature=1.0, seed=6, num_samples=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # one batch, independent samples


def test_generation_slides_past_the_context(model):
    stats = GenerationStats()
    out = _run(model, [1, 2, 3], 60, temperature=1.0, seed=0, stats=stats)
    assert out.shape == (1, 60)
    assert stats.new_tokens == 60 and stats.window_slides == 3 and stats.prompt_tokens == 3
    assert 0 < stats.time_to_first_token_s <= stats.seconds and stats.tokens_per_s > 0


def test_prompt_longer_than_context(model):
    with pytest.raises(GenerationError, match="prompt is 30 tokens but the model's context is 24"):
        next(generate(model, list(range(30)), 5))
    with pytest.raises(GenerationError, match="outside GPT-2's vocabulary"):
        next(generate(model, [60000], 5))
    with pytest.raises(GenerationError, match=r"outside GPT-2's vocabulary \(0..50256\)"):
        next(generate(model, [50300], 5))  # ML QA: a padded row, never trained as an input, was taken


def test_extreme_temperatures_and_penalties_are_not_non_finite_logits(model):
    """A temperature that is 0 in float32 (1e-50) is greedy, and a repetition penalty that overflows float32
    saturates: neither is the "damaged checkpoint" error (found by an audit)."""
    greedy = _run(model, [5, 6, 7], 20, temperature=0)
    assert torch.equal(_run(model, [5, 6, 7], 20, temperature=1e-50, top_k=0, seed=1), greedy)
    for penalty in (1e-45, 1e-300, 1e300):
        assert _run(model, [5, 6, 7], 20, temperature=0.8, repetition_penalty=penalty, seed=1).shape == (1, 20)
        assert _run(model, [5, 6, 7], 20, temperature=0, repetition_penalty=penalty).shape == (1, 20)
    dead = torch.full((1, 50304), float("-inf"))  # non-finite logits stay an error under any penalty
    assert sample_next_token(apply_repetition_penalty(dead, torch.ones_like(dead, dtype=torch.bool), 1e-45),
                             0.0).tolist() == [-1]


def test_a_stop_string_completed_by_the_held_back_end_is_a_stop(model, monkeypatch):
    """A sample ending in half a UTF-8 character: `finish` releases it as U+FFFD, which completes the stop string
    U+FFFD, so the sample ends "stop", not "length" (found by an audit)."""
    encoding = get_encoding()
    tokens = [encoding.encode_single_token(piece) for piece in (b"ab", b"\xe2", b"\x80")]
    monkeypatch.setattr(sample, "generate", lambda *a, **k: (torch.tensor([t]) for t in tokens))
    result = sample_text(model, "x", 3, temperature=0, stop=["\ufffd"])
    assert result.samples[0].text == "ab" and result.samples[0].stop_reason == "stop"


@pytest.mark.parametrize(("kwargs", "flag"), [
    ({"temperature": -1.0}, "--temperature"), ({"temperature": float("inf")}, "--temperature"),
    ({"top_k": -1}, "--top-k"), ({"top_p": 0.0}, "--top-p"),
    ({"repetition_penalty": 0.0}, "--repetition-penalty"), ({"num_samples": 0}, "--num-samples"),
])
def test_bad_settings(model, kwargs, flag):
    with pytest.raises(GenerationError, match=flag):
        next(generate(model, [1], 5, **kwargs))
    with pytest.raises(GenerationError, match="--max-new-tokens"):
        next(generate(model, [1], 0))


def test_sampling_filters():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0] + [-100.0] * 50300])
    generator = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, temperature=0).item() == 1
    picks = {sample_next_token(logits, 1.0, top_k=2, generator=generator).item() for _ in range(200)}
    assert picks == {1, 2}
    picks = {sample_next_token(logits, 1.0, top_p=0.5, generator=generator).item() for _ in range(50)}
    assert picks == {1}
    padded = torch.full((1, 50304), -100.0)
    padded[0, 50300] = 100.0  # a padding id can never be sampled
    assert sample_next_token(padded, temperature=0).item() < 50257


def _reference_distribution(logits, temperature, top_k, top_p):
    """The filters as full-vocabulary masks: what `sample_next_token` must draw from. (B, V) -> probabilities."""
    logits = logits[:, :50257].float() / temperature
    if top_k:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        remove = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    return torch.softmax(logits, dim=-1)


SAMPLER_SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 6, 0.9), (0.5, 50257, 1.0)]


def _check_draws(device, temperature, top_k, top_p, ties=False, calls=60):
    """Two distributions, 100 x `calls` draws each: every token's frequency is within 5 standard errors of its
    probability under the filters, and a token the filters remove is never drawn. With `ties`, values tie at
    the k-th place: all of them are kept, as masking the vocabulary keeps them."""
    generator = torch.Generator(device=device).manual_seed(0)
    logits = torch.full((2, 50304), -30.0)
    logits[0, :8] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0])
    logits[1, 50000:50006] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    logits[1, 50300:] = 50.0  # padding ids past GPT-2's vocabulary never count
    if ties:
        logits[0, :8] = torch.tensor([3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0])
        logits[1, 40000:40100] = 0.5  # a hundred tied at the top
    expected = _reference_distribution(logits, temperature, top_k, top_p)
    rows = 100  # a batch of 2 x 100 rows per call
    draws = rows * calls
    batch = logits.repeat_interleave(rows, dim=0).to(device)
    picks = torch.cat([sample_next_token(batch, temperature, top_k, top_p, generator).view(2, rows).cpu()
                       for _ in range(calls)], dim=1)  # (2, draws)
    for row in range(2):
        counts = torch.bincount(picks[row], minlength=50257).double()
        assert counts.size(0) == 50257
        assert not counts[expected[row] == 0].any()
        p = expected[row].double()
        sigma = (p * (1 - p) / draws).sqrt()
        assert ((counts / draws - p).abs() <= 5 * sigma + 1e-4).all()


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), SAMPLER_SETTINGS)
def test_sampling_draws_from_the_filtered_distribution(temperature, top_k, top_p):
    _check_draws("cpu", temperature, top_k, top_p)


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 0.999), (40, 1.0)])
def test_top_k_keeps_every_token_tied_at_the_kth_value(top_k, top_p):
    """(Where top-p's boundary falls inside a tie, which of the tied tokens stay is the sort's choice, in the
    old code too: p is set so that the boundary does not split one here.)"""
    _check_draws("cpu", 1.0, top_k, top_p, ties=True, calls=30)


def test_top_k_with_more_ties_than_the_candidates_hold():
    """All 50,257 logits equal: top-k 5 keeps them all, as a mask would."""
    ids, candidates = sample._candidates(torch.zeros(1, 50257), 5, 1.0)
    kept = candidates > float("-inf")
    assert (ids is None and kept.all()) or (ids is not None and kept.sum() == 50257)
    picks = sample_next_token(torch.zeros(2000, 50304), 1.0, 5, 1.0, torch.Generator().manual_seed(0))
    assert len(set(picks.tolist())) > 1500


def test_the_cdf_keeps_tiny_probabilities_in_reach():
    """A token of probability 1e-9 beside 0.6 has its own slice of the cumulative sum (fp32 would round it away)."""
    probs = torch.tensor([[0.6, 1e-9, 0.4]])
    p = probs.double()[0]
    uniform = (p[0] + p[1] / 2) / p.sum()  # the middle of the tiny token's slice
    assert sample.draw_from(probs, uniform.view(1, 1)).item() == 1


@pytest.mark.parametrize("settings", [dict(temperature=0), dict(temperature=0.8, top_k=200),
                                      dict(temperature=1.0, top_k=0, top_p=0.9), dict(temperature=1.0, top_k=0)])
def test_non_finite_logits_are_an_error_not_tokens(model, settings):
    """A NaN in the weights used to give tokens from nowhere (or a multinomial error)."""
    broken = GPT(model.config).eval()
    broken.load_state_dict(model.state_dict())
    with torch.no_grad():
        broken.transformer.ln_f.weight[0] = float("nan")
    with pytest.raises(GenerationError, match="non-finite logits"):
        list(generate(broken, [1, 2], 5, seed=0, stop_at_eot=True, **settings))


def test_a_vanishing_temperature_is_greedy_not_an_overflow(model):
    greedy = _run(model, [1, 2], 8, temperature=0)
    assert torch.equal(_run(model, [1, 2], 8, temperature=1e-45, seed=0), greedy)


def _nan_from_call(monkeypatch, name: str, first: int) -> dict:
    """Make `sample.<name>` return NaN logits from its `first`-th call on; returns the call counter."""
    real = getattr(sample, name)
    calls = {"n": 0}

    def nan_from_then_on(*args, **kwargs):
        calls["n"] += 1
        logits = real(*args, **kwargs)
        return logits.clone().fill_(float("nan")) if calls["n"] >= first else logits

    monkeypatch.setattr(sample, name, nan_from_then_on)
    return calls


@pytest.mark.parametrize("flush_every", [1, 3, 16])
def test_non_finite_logits_stop_at_the_same_token_whatever_the_flush(model, monkeypatch, flush_every):
    """Logits turn NaN at the 6th step: the 5 tokens before it are yielded, then the error, for any chunk size;
    a sample that already ended at <|endoftext|> is not hurt by what its extra steps compute."""
    calls = _nan_from_call(monkeypatch, "_last_logits", 6)
    got = []
    with pytest.raises(GenerationError, match="non-finite logits"):
        for tokens in generate(model, [1, 2], 12, temperature=0.8, seed=0, flush_every=flush_every, lookahead=False):
            got.append(tokens)
    assert len(got) == 5
    calls["n"] = 0
    monkeypatch.setattr(sample, "sample_next_token", lambda logits, *a: torch.where(
        torch.isnan(logits[:, 0]), torch.tensor(-1), torch.tensor(EOT_ID)))
    ended = list(generate(model, [1, 2], 12, temperature=0.8, seed=0, flush_every=flush_every, stop_at_eot=True,
                          lookahead=False))
    assert len(ended) == 1 and ended[0].tolist() == [EOT_ID]


def test_greedy_picks_the_first_largest_as_torch_does():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0], [0.5, 0.25, 0.5, 0.5], [float("nan"), 1.0, float("nan"), 5.0],
                           [float("-inf")] * 4, [-3.0, -1.0, -1.0, float("inf")]])
    assert sample_next_token(logits, 0.0).tolist() == [1, 0, -1, -1, -1]
    wide = torch.randn(3, 50304)
    assert torch.equal(sample_next_token(wide, 0.0), wide[:, :50257].argmax(dim=-1))


def test_sampling_is_reproducible_and_per_row():
    logits = torch.randn(4, 50304)
    a = sample_next_token(logits, 1.0, 0, 0.95, torch.Generator().manual_seed(3))
    b = sample_next_token(logits, 1.0, 0, 0.95, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4,) and a.dtype == torch.long
    same = sample_next_token(logits[:1].expand(64, -1), 1.0, 0, 1.0, torch.Generator().manual_seed(3))
    assert len(set(same.tolist())) > 1  # rows draw independently


@pytest.mark.parametrize("shortlist", [4, 16, 1024])
def test_nucleus_shortlist_or_whole_sort_keep_the_same_tokens(monkeypatch, shortlist):
    """top-p alone looks among a shortlist first and sorts everything when the nucleus is wider."""
    monkeypatch.setattr(sample, "NUCLEUS_SHORTLIST", shortlist)
    logits = torch.full((2, 50304), -40.0)
    logits[0, 100:110] = torch.linspace(3, 0, 10)  # nucleus of 0.9: 7 tokens
    logits[1, :] = torch.linspace(0.0, -1.0, 50304)
    logits[1, 7:9] = 4.0  # nucleus of 0.9: the two, then most of a gentle slope
    ids, candidates = sample._candidates(logits[:, :50257], 0, 0.9)
    kept = torch.zeros(2, 50257, dtype=torch.bool).scatter(1, ids, candidates > float("-inf"))
    expected = _reference_distribution(logits, 1.0, 0, 0.9) > 0
    assert torch.equal(kept, expected) and kept[0].sum() == 7 and kept[1].sum() > 1000


def test_inverse_cdf_never_lands_on_a_removed_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0, 0.0]])
    draw = sample.draw_from
    assert draw(probs, torch.tensor([[0.0]])).item() == 1
    assert draw(probs, torch.tensor([[0.2499]])).item() == 1
    assert draw(probs, torch.tensor([[0.25]])).item() == 3
    assert draw(probs, torch.tensor([[1.0 - 2**-24]])).item() == 3
    assert draw(probs, torch.tensor([[1.0]])).item() == 3  # rounding up to the total: the last kept token
    assert draw(torch.full((1, 4), float("nan")), torch.tensor([[0.5]])).item() == -1  # generate raises


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_repetition_penalty_breaks_greedy_loops(model):
    plain = _run(model, [7, 7, 7], 20, temperature=0)[0].tolist()
    penalised = _run(model, [7, 7, 7], 20, temperature=0, repetition_penalty=1e6)[0].tolist()
    assert len(set(plain)) < 20 and len(set(penalised)) == 20 and 7 not in penalised


def test_stop_at_eot(model, eot_model):
    assert _run(eot_model, [1, 2], 10, temperature=0, num_samples=2, stop_at_eot=True).tolist() == [[EOT_ID]] * 2
    assert _run(eot_model, [1, 2], 10, temperature=0).tolist() == [[EOT_ID] * 10]
    # sampled, samples end at different steps; a finished one yields <|endoftext|> while the others go on
    rows = _run(eot_model, [1, 2], 40, temperature=0.35, top_k=0, seed=1, num_samples=8, stop_at_eot=True).tolist()
    ends = [row.index(EOT_ID) for row in rows]
    assert len(set(ends)) > 1 and len(rows[0]) == max(ends) + 1
    assert all(set(row[end:]) == {EOT_ID} and EOT_ID not in row[:end] for row, end in zip(rows, ends, strict=True))


# ------------------------------------------------------------------------------------------------ look-ahead
LOOKAHEAD_SETTINGS = [
    dict(temperature=0), dict(temperature=0.8, top_k=200, seed=3), dict(temperature=1.0, top_k=0, seed=4),
    dict(temperature=0.9, top_k=0, top_p=0.8, seed=5), dict(temperature=0, repetition_penalty=1.3),
    dict(temperature=0.7, top_k=5, repetition_penalty=1.2, seed=6),
]


@pytest.mark.parametrize("settings", LOOKAHEAD_SETTINGS)
@pytest.mark.parametrize("prompt", [[7, 7, 7], [1, 2, 3, 1, 2, 3, 1, 2], list(range(40, 60))])
def test_look_ahead_gives_the_same_tokens(model, settings, prompt):
    """Guessed or not, every token is drawn from its own row with the same random numbers: past the window too."""
    plain = _run(model, prompt, 70, lookahead=False, **settings)
    stats = GenerationStats()
    guessed = _run(model, prompt, 70, lookahead=True, stats=stats, **settings)
    assert torch.equal(plain, guessed)
    assert stats.window_slides > 0 and 0 < stats.model_passes <= 70
    assert 0 <= stats.accepted_tokens <= stats.guessed_tokens


def test_look_ahead_saves_passes_on_repetitive_text(model):
    """Greedy decoding of this random model falls into a loop: the guesses run ahead of it, window jumps and all."""
    stats = GenerationStats()
    tokens = _run(model, [7, 7, 7], 200, temperature=0, stats=stats)  # on by default: CPU, one sample, the cache
    assert torch.equal(tokens, _run(model, [7, 7, 7], 200, temperature=0, use_cache=False))
    assert stats.model_passes < 100 and stats.accepted_tokens > 100 and stats.window_slides > 5
    # every token's logits came from the prefill, a pass, a guess taken or a window's re-encoding: the last pass
    # counts too (its guesses were left out when generation ended)
    assert stats.new_tokens == 200 == 1 + stats.model_passes + stats.accepted_tokens + stats.window_slides


def test_look_ahead_off_where_it_cannot_help(model):
    """Batches (rows would take guesses of different lengths), the uncached path and the static step decode plainly;
    asking for it there is an error."""
    for kwargs in (dict(num_samples=2), dict(use_cache=False), dict(static_cache=True)):
        stats = GenerationStats()
        _run(model, [7, 7, 7], 30, temperature=0, stats=stats, **kwargs)
        assert stats.model_passes == 0 and stats.guessed_tokens == 0
        with pytest.raises(GenerationError, match="lookahead needs"):
            next(generate(model, [7, 7, 7], 30, lookahead=True, **kwargs))


def test_look_ahead_stops_at_eot_and_at_non_finite_logits(model, eot_model, monkeypatch):
    assert _run(eot_model, [EOT_ID, 1, EOT_ID], 10, temperature=0, stop_at_eot=True).tolist() == [[EOT_ID]]
    _nan_from_call(monkeypatch, "_all_logits", 4)
    stats = GenerationStats()
    with pytest.raises(GenerationError, match="non-finite logits"):
        list(generate(model, [7, 7, 7], 100, temperature=0, stats=stats))
    assert stats.model_passes == 4 and 3 <= stats.new_tokens < 100


def test_prompt_lookup_guesses():
    lookup = PromptLookup([5, 1, 2, 3, 9, 1, 2])
    assert lookup.propose(8) == [3, 9, 1, 2]  # "1 2" was followed by "3 9 1 2"; 4 tokens at first
    lookup.push(3)
    assert lookup.propose(2) == [9, 1]  # capped by the caller's limit
    lookup.push(8)
    assert lookup.propose(8) == []  # "8" never occurred before: no guess, and never the newest token itself
    run = PromptLookup([4, 6, 6])
    assert run.propose(8) == [6, 6, 6, 6]  # a match touching the newest token repeats with its period
    periodic = PromptLookup([1, 2, 1, 2])
    assert periodic.propose(3) == [1, 2, 1]


def test_prompt_lookup_adapts_and_stays_bounded():
    lookup = PromptLookup([1, 2, 10])
    lookup.taken(4, 4)
    assert lookup.length == 8
    lookup.taken(8, 0)
    assert lookup.length == 4
    for _ in range(5):  # every guess taken: doubles up to the longest guess, 32
        lookup.taken(lookup.length, lookup.length)
    assert lookup.length == PromptLookup.MAX_GUESS == 32
    lookup.taken(32, 3)  # some taken: the length stays
    assert lookup.length == 32
    lookup.taken(32, 0)
    lookup.taken(16, 0)
    assert lookup.length == 8
    proposed = []
    for following in [11, 12, 13, 14, 15, 15, 15, 15]:  # after "1 2" comes another token each time, then 15 again
        lookup.push(1)
        lookup.propose(8)
        lookup.push(2)
        proposed.append(lookup.propose(8))  # "1 2" guesses what followed it last time: scored, checked or not
        lookup.push(following)
    assert proposed[0][0] == 10  # checked while the bigram's hit rate holds
    assert proposed[1:6] == [[]] * 5  # a miss: the bigram's guesses stay unchecked (still scored)
    assert lookup.hit_rate[2] < PromptLookup.MIN_HIT_RATE < lookup.hit_rate[1]  # while the unigram's kept hitting
    assert proposed[6][0] == proposed[7][0] == 15  # "15 1 2" recurred: the trigram guesses, and is right
    long = PromptLookup([])
    for i in range(3 * PromptLookup.KEEP):
        long.push(i % 1000)
    assert len(long.history) <= 2 * PromptLookup.KEEP and long.propose(2) == [(i + 1) % 1000, (i + 2) % 1000]


# ------------------------------------------------------------------------------------------------ text
def test_text_stream_holds_split_characters():
    encoding = get_encoding()
    text = "😀 héllo € 日本語"
    stream = TextStream()
    pieces = [stream.push(encoding.decode_single_token_bytes(t)) for t in encoding.encode_ordinary(text)]
    assert "".join(pieces) + stream.finish() == text
    assert pieces[0] == ""  # the first token is half of the emoji
    broken = TextStream()
    assert broken.push(b"ab\xff") == "ab\ufffd" and broken.push(b"\xe2\x82") == "" and broken.finish() == "\ufffd"


def test_text_stream_stop_strings():
    stream = TextStream(["\n\n", "END"])
    assert stream.push(b"Hel") == "Hel"
    assert stream.push(b"lo E") == "lo "  # "E" might start "END"
    assert stream.push(b"X\n") == "EX"  # "\n" might start "\n\n"
    assert stream.push(b"\nWorld") == "" and stream.stopped
    assert stream.text == "Hello EX" and stream.finish() == "" and stream.push(b"more") == ""
    tail = TextStream(["END"])
    assert tail.push(b"the EN") == "the " and tail.finish() == "EN" and not tail.stopped


def test_sample_text(model, eot_model):
    chunks: dict[int, list[str]] = {0: [], 1: []}
    result = sample_text(model, "To be", 30, temperature=1.0, seed=3, num_samples=2, stop_at_eot=False,
                         on_text=lambda index, text: chunks[index].append(text))
    assert [s.stop_reason for s in result.samples] == ["length", "length"]
    assert [s.tokens for s in result.samples] == [30, 30]
    assert ["".join(chunks[i]) for i in range(2)] == [s.text for s in result.samples]
    assert result.prompt_tokens == 2 and result.stats.new_tokens == 30
    stop = result.samples[0].text[5:8]
    stopped = sample_text(model, "To be", 30, temperature=1.0, seed=3, num_samples=2, stop=[stop],
                          stop_at_eot=False)
    assert stopped.samples[0].text == result.samples[0].text[: result.samples[0].text.index(stop)]
    assert stopped.samples[0].stop_reason == "stop"
    ended = sample_text(eot_model, "", 10, temperature=0)
    assert ended.samples[0].text == "" and ended.samples[0].stop_reason == "eot" and ended.prompt_tokens == 1
    going_on = sample_text(eot_model, "<|endoftext|>", 3, temperature=0, stop_at_eot=False)
    assert going_on.samples[0].text == "<|endoftext|>" * 3 and going_on.prompt_tokens == 1


def test_fused_kernels_are_the_default_where_they_run(monkeypatch):
    from tinygpt_cli import kernels

    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels, "unavailable", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert sample.fused_by_default(cuda)
    assert not sample.fused_by_default(cuda, compile=True)
    assert not sample.fused_by_default(cuda, lookahead=True)
    assert not sample.fused_by_default(torch.device("cpu"))
    assert not sample.fused_by_default(torch.device("mps"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4: not tested there
    assert not sample.fused_by_default(cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert sample.fused_by_default(cuda)
    monkeypatch.setattr(kernels, "unavailable", lambda device: "Triton is not installed")
    assert not sample.fused_by_default(cuda)


@pytest.mark.gpu
def test_coordinate_descent_tuned_decode_matches_eager(model, monkeypatch):
    """The bench's variant (`sample.DECODE_COMPILE_OPTIONS`): one-row matmuls as tuned Triton reductions."""
    gpu = GPT(model.config).eval()
    gpu.load_state_dict(model.state_dict())
    gpu.cuda()
    eager = _run(gpu, [5, 6, 7], 40, temperature=0)
    monkeypatch.setattr(sample, "DECODE_COMPILE_OPTIONS", {"coordinate_descent_tuning": True})
    for graphs in (False, True):
        stats = GenerationStats()
        tuned = _run(gpu, [5, 6, 7], 40, temperature=0, compile=True, graphs=graphs, stats=stats)
        assert stats.compile_error is None and stats.compiled
        assert torch.equal(eager, tuned)


@pytest.mark.gpu
def test_compiled_cuda_decode_matches_eager(model):
    """CUDA graphs through torch.compile(mode="reduce-overhead"), and cast weights."""
    gpu = GPT(model.config).eval()
    gpu.load_state_dict(model.state_dict())
    gpu.cuda()
    eager = _run(gpu, [5, 6, 7], 60, temperature=0, num_samples=2)
    stats = GenerationStats()
    compiled = _run(gpu, [5, 6, 7], 60, temperature=0, num_samples=2, compile=True, stats=stats)
    assert stats.compile_error is None and stats.compiled
    assert torch.equal(eager, compiled)
    again = _run(gpu, [5, 6, 7], 60, temperature=1.0, seed=4, num_samples=2, compile=True)
    assert torch.equal(again, _run(gpu, [5, 6, 7], 60, temperature=1.0, seed=4, num_samples=2, compile=True))
    gpu.to(torch.bfloat16)
    assert _run(gpu, [5, 6, 7], 40, temperature=0, compile=True).shape == (1, 40)


@pytest.mark.gpu
@pytest.mark.parametrize(("compile", "graph_steps"), [(False, 1), (True, 4)])
def test_cuda_graph_chunks_match_single_steps(model, monkeypatch, compile, graph_steps):
    """Decode steps captured as CUDA graphs (the step eager or compiled, one or several per graph), sampling in
    the graph: the greedy tokens of single steps, across window slides and an end inside a chunk."""
    monkeypatch.setattr(sample, "GRAPH_STEPS", graph_steps)
    gpu = GPT(model.config).eval()
    gpu.load_state_dict(model.state_dict())
    gpu.cuda()
    settings = dict(temperature=0, num_samples=2, static_cache=True, flush_every=4, compile=compile)
    single = _run(gpu, [5, 6, 7], 61, graphs=False, **settings)
    stats = GenerationStats()
    graphed = _run(gpu, [5, 6, 7], 61, graphs=True, stats=stats, **settings)
    assert stats.graph_error is None and stats.graphed and stats.compiled == compile
    assert torch.equal(single, graphed)
    sampled = dict(settings, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2, seed=5, graphs=True)
    assert torch.equal(_run(gpu, [5, 6, 7], 61, **sampled), _run(gpu, [5, 6, 7], 61, **sampled))
    gpu.to(torch.bfloat16)
    stats = GenerationStats()
    assert _run(gpu, [5, 6, 7], 40, temperature=0, compile=compile, flush_every=4, stats=stats).shape == (1, 40)
    assert stats.graphed != compile and stats.graph_error is None  # uncompiled on CUDA: graphs by default


@pytest.mark.gpu
def test_sampling_and_memory_checks_on_cuda(model):
    """The sampler on a CUDA generator (top-p alone sorts there), and the memory check against free GPU memory."""
    for settings in SAMPLER_SETTINGS:
        _check_draws("cuda", *settings)
    _check_draws("cuda", 1.0, 3, 0.999, ties=True)
    device = torch.device("cuda")
    assert 0 < sample.free_memory(device) <= torch.cuda.get_device_properties(device).total_memory
    gpu = GPT(model.config).eval().cuda()
    with pytest.raises(GenerationError, match="GiB free on cuda: ask for fewer samples"):
        next(generate(gpu, [1, 2], 5, num_samples=10**9))
