import pytest
import torch

from tinygpt_cli.config import ModelConfig
from tinygpt_cli.errors import GenerationError
from tinygpt_cli.model import GPT
from tinygpt_cli.sample import generate, sample_next_token


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=24)).eval()


def _run(model, prompt, n, **kwargs):
    return torch.stack(list(generate(model, prompt, n, **kwargs)), dim=1)  # (B, n)


@pytest.mark.parametrize(("prompt_len", "batch"), [(1, 1), (5, 2), (12, 3)])
def test_cached_and_uncached_greedy_agree(model, prompt_len, batch):
    prompt = list(range(100, 100 + prompt_len))
    n = 24 - prompt_len
    cached = _run(model, prompt, n, temperature=0, num_samples=batch)
    uncached = _run(model, prompt, n, temperature=0, num_samples=batch, use_cache=False)
    assert torch.equal(cached, uncached)


def test_same_seed_same_tokens(model):
    a = _run(model, [1, 2, 3], 10, temperature=1.0, seed=5, num_samples=2)
    b = _run(model, [1, 2, 3], 10, temperature=1.0, seed=5, num_samples=2)
    c = _run(model, [1, 2, 3], 10, temperature=1.0, seed=6, num_samples=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generation_slides_past_the_context(model):
    out = _run(model, [1, 2, 3], 60, temperature=1.0, seed=0)
    assert out.shape == (1, 60)


def test_prompt_longer_than_context(model):
    with pytest.raises(GenerationError, match="prompt is 30 tokens but the model's context is 24"):
        next(generate(model, list(range(30)), 5))


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
