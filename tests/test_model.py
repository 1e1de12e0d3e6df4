import math

import pytest
import torch
import torch.nn.functional as F

from tinygpt_cli import model as model_module
from tinygpt_cli.config import ModelConfig
from tinygpt_cli.model import GPT, chunked_cross_entropy


def test_small_matches_gpt2_124m_parameter_count():
    cfg = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params() == 124_439_808  # OpenAI's GPT-2 small, tied head counted once
    with torch.device("meta"):
        padded = GPT(ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024))
    assert padded.num_params() == 124_439_808 + (50304 - 50257) * 768


def test_hugging_face_parameter_names():
    names = set(GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).state_dict())
    for expected in ("transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.ln_1.weight",
                     "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.bias",
                     "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_proj.weight",
                     "transformer.ln_f.bias", "lm_head.weight"):
        assert expected in names


def test_tied_embeddings_and_scaled_residual_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    proj = model.transformer.h[0].attn.c_proj.weight
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert fc.std().item() == pytest.approx(0.02, rel=0.05)


def test_loss_at_init_is_log_vocab():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64))
    idx = torch.randint(0, 50257, (4, 64))
    targets = torch.randint(0, 50257, (4, 64))
    _, loss = model(idx, targets)
    assert loss.item() == pytest.approx(math.log(50257), abs=0.15)


def test_tiny_batch_overfits():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16))
    idx = torch.randint(0, 50257, (2, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert loss.item() < 0.2


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_fused_cross_entropy_matches_reference(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, 16, requires_grad=True)
    weight = (torch.randn(50304, 16) * 0.1).requires_grad_()
    targets = torch.randint(0, 50257, (3, 20))
    targets[0, :5] = -1  # ignored positions
    expected = F.cross_entropy((hidden @ weight[:50257].t()).view(-1, 50257), targets.view(-1), ignore_index=-1)
    expected.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=chunk)
    (got * 2).backward()  # a non-unit upstream gradient must scale through
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(hidden.grad, 2 * grads[0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad, 2 * grads[1], rtol=1e-4, atol=1e-7)


def test_logits_without_targets_and_context_limit():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=8))
    logits, loss = model(torch.zeros(2, 8, dtype=torch.long))
    assert logits.shape == (2, 8, 50304) and loss is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_both_loss_paths_agree():
    """The fused head (eager) and whole logits + cross-entropy (what runs compiled) give the same loss and grads."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))
    x = torch.randint(0, 50257, (2, 16))
    y = torch.randint(0, 50257, (2, 16))
    y[1, :4] = -1
    results = []
    for fused in (True, False):
        model.fused_loss = fused
        model.zero_grad(set_to_none=True)
        _, loss = model(x, y)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-5)
    for fused_grad, logits_grad in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(fused_grad, logits_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("gap", [101.0, 200.0])
def test_fused_cross_entropy_is_exact_when_a_target_probability_underflows(gap):
    """A confidently wrong prediction (target logit `gap` below the best): its softmax probability is subnormal
    (101) or 0 (200) in fp32, and the loss must still be the true ~`gap` nats, not a rounded value, inf or a clamp."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 8)
    weight = torch.randn(50304, 8) * 0.1
    weight[7] = 0.0
    weight[9] = hidden[0, 2] / hidden[0, 2].norm() ** 2 * gap  # logit `gap` for token 9 at (0, 2)
    targets = torch.randint(0, 50257, (2, 5))
    targets[0, 2] = 7  # the target sits ~200 nats below token 9
    expected = F.cross_entropy((hidden @ weight[:50257].t()).view(-1, 50257), targets.view(-1))
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=4)
    assert torch.isfinite(got) and got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert expected.item() > gap / 10 - 1  # the outlier dominates the mean: the case is really exercised
    # both ways of reading the loss (one pass on CPU; sync-free on CUDA), run here on CPU
    flat_hidden, flat_targets = hidden.view(-1, 8), targets.view(-1, 1)
    reference = F.cross_entropy(flat_hidden @ weight.t(), flat_targets.squeeze(1), reduction="none")
    for sync_free in (False, True):
        probs, nll = model_module._softmax_and_nll_(flat_hidden @ weight.t(), flat_targets, flat_hidden, weight,
                                                    sync_free)
        torch.testing.assert_close(nll, reference, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(probs, torch.softmax(flat_hidden @ weight.t(), 1))


# the CPU cases, and on a GPU the compiled model the CUDA trainer runs (the slice of the logits and the fused
# head's masking as inductor traces them)
ON_DEVICES = [("cpu", False), pytest.param("cuda", False, marks=pytest.mark.gpu),
              pytest.param("cuda", True, marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device,compiled", ON_DEVICES)
@pytest.mark.parametrize("fused", [True, False])
def test_the_training_loss_gives_the_padding_rows_no_probability(fused, device, compiled):
    """A GPT-2 loaded from Hugging Face has its embedding padded with zero rows, whose logit 0 is far above GPT-2's
    real logits (about -60): the training loss gave them nearly all the probability, 56 nats where eval said 11,
    and fine-tuning chased that (ML review). Training, evaluation and sampling now share the 50257-way softmax."""
    from tinygpt_cli.evaluation import token_nats

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16)).to(device)
    with torch.no_grad():
        model.lm_head.weight[50257:] = 0.0
        model.transformer.ln_f.bias.fill_(-3.0)  # every real logit far below the padding's 0
        model.lm_head.weight[:50257] = model.lm_head.weight[:50257].abs() * 3
    model.fused_loss = fused
    x, y = (torch.randint(0, 50257, (2, 16), device=device) for _ in range(2))
    _, loss = (torch.compile(model) if compiled else model)(x, y)
    loss.backward()
    assert loss.item() == pytest.approx(token_nats(model, x, y).mean().item(), rel=1e-5)
    assert model.lm_head.weight.grad[50257:].abs().max() == 0  # nothing pulls on rows no token uses


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_fused_loss_gradients_keep_rare_tokens_under_fp16_autocast(device):
    """Under fp16 autocast the head's gradient matmuls ran in fp16 on rows scaled by 1/count: a rare token's row
    underflowed to 0 before the GradScaler's factor came in (ML review). They run in fp32 there."""
    torch.manual_seed(0)
    n, width = 4096, 32
    hidden = torch.randn(n, width, device=device)
    weight = torch.randn(50304, width, device=device) * 0.02
    targets = torch.randint(0, 1000, (n,), device=device)

    def head_grad(autocast: bool) -> torch.Tensor:
        w = weight.clone().requires_grad_()
        with torch.autocast(device, dtype=torch.float16, enabled=autocast):
            loss = chunked_cross_entropy(hidden, w, targets, chunk_tokens=1024)
        (loss * 65536.0).backward()  # as a GradScaler scales it
        return w.grad / 65536.0

    exact, half = head_grad(False), head_grad(True)
    rare = slice(20000, 50257)  # tokens no target uses: their gradient is the softmax mass alone, tiny
    assert (half[rare] == 0).float().mean() < 0.001  # underflowed rows: about 5% before
    # as a whole, not element by element: an element is a sum of terms of both signs, and the forward pass's fp16
    # logits (cuBLAS's fp16 products on CUDA) move the small sums by more than 2% (53x at one, on an H200)
    assert (half[rare] - exact[rare]).norm() / exact[rare].norm() < 0.02


def test_the_fused_loss_computes_no_gradient_under_no_grad(monkeypatch):
    """Evaluations (no_grad) paid for the head's gradients too: needs_input_grad stays True there (ML review)."""
    made = []
    real = torch.zeros_like
    monkeypatch.setattr(torch, "zeros_like", lambda t, *a, **k: made.append(t.shape) or real(t, *a, **k))
    hidden, weight = torch.randn(2, 8, 16, requires_grad=True), torch.randn(50304, 16, requires_grad=True)
    with torch.no_grad():
        chunked_cross_entropy(hidden, weight, torch.randint(0, 50257, (2, 8)))
    assert (50304, 16) not in [tuple(shape) for shape in made]
    chunked_cross_entropy(hidden, weight, torch.randint(0, 50257, (2, 8)))
    assert (50304, 16) in [tuple(shape) for shape in made]  # (the check sees the buffer where there is one)


def test_the_planned_loss_chunk_is_the_models():
    from tinygpt_cli import model, plan

    assert plan.LOSS_CHUNK_TOKENS == model.LOSS_CHUNK_TOKENS


def test_the_fused_loss_on_cpu_makes_no_second_head_sized_array():
    """Each chunk's head gradient was a product of its own (vocabulary × width, fp32) added in: on a 2-core CPU with
    GPT-2 small's width, 147 MiB that `plan` did not count (audit). It is accumulated in place now."""
    from torch.profiler import ProfilerActivity, profile

    vocab, width, tokens = 50304, 64, 300
    hidden = torch.randn(tokens, width, requires_grad=True)
    weight = torch.randn(vocab, width, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        chunked_cross_entropy(hidden, weight, torch.randint(0, 50257, (tokens,)), chunk_tokens=128)
    head_sized = [e.name for e in prof.events()
                  if e.name in ("aten::mm", "aten::matmul") and e.cpu_memory_usage >= vocab * width * 4]
    assert head_sized == []


def test_importing_the_model_leaves_torch_dynamo_unloaded():
    """The fused loss was marked `@torch.compiler.disable`, which imports torch._dynamo with the model: 1.1-1.4 s
    of every `generate`, `eval` and `export` start on the 2-core CPU, which never compile (CPU audit)."""
    import subprocess
    import sys

    code = "import sys, tinygpt_cli.model, tinygpt_cli.sample; print('torch._dynamo' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_a_compiled_model_with_the_fused_loss_traces_the_whole_logits_loss():
    """Traced by torch.compile (here dynamo with the eager backend: no inductor build on CPU), the model takes the
    whole-logits loss, as the compiled trainer does, rather than the fused loss's Python loop: same loss and
    gradients as the eager fused path."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    x, y = (torch.randint(0, 50257, (2, 16)) for _ in range(2))
    _, eager = model(x, y)
    eager.backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    _, traced = torch.compile(model, backend="eager", fullgraph=True)(x, y)
    traced.backward()
    torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-7)


def test_the_fused_loss_in_two_threads_at_once_gives_each_its_own_figure():
    """Library audit: the CPU logits buffer was one per process, so two threads (a notebook widget, a web app)
    computing a loss at once wrote each other's logits: 36 of 60 losses were wrong. Each thread has its own."""
    import threading

    torch.manual_seed(0)
    hidden = [torch.randn(2, 64, 16) for _ in range(2)]
    weight = torch.randn(50304, 16) * 0.1
    targets = [torch.randint(0, 50257, (2, 64)) for _ in range(2)]
    expected = [chunked_cross_entropy(hidden[i], weight, targets[i]).item() for i in range(2)]
    got: list[list[float]] = [[], []]

    def work(i: int) -> None:
        for _ in range(40):
            got[i].append(chunked_cross_entropy(hidden[i], weight, targets[i]).item())

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        assert got[i] == pytest.approx([expected[i]] * 40, rel=1e-6)
    model_module.release_cpu_workspace()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_model_cast_whole_to_another_dtype_backpropagates_its_loss(dtype):
    """ML QA: `GPT(...).to(torch.bfloat16)` (a notebook's habit) or fp64 failed in backward with "mat1 and mat2
    must have the same dtype": the fused loss keeps its gradient in fp32. Such a model takes the plain loss."""
    torch.manual_seed(0)
    fp32 = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16))
    model.load_state_dict(fp32.state_dict())
    model.to(dtype)
    x, y = (torch.randint(0, 50257, (2, 16)) for _ in range(2))
    _, loss = model(x, y)
    loss.backward()
    assert loss.dtype == torch.float32 and model.transformer.wte.weight.grad.dtype == dtype
    assert loss.item() == pytest.approx(fp32(x, y)[1].item(), rel=1e-2 if dtype == torch.bfloat16 else 1e-6)
