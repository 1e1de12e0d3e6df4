"""CUDA paths: compile + bf16 autocast, fp16 + GradScaler, fused cross-entropy, --batch-size auto, OOM messages.

Skipped where no CUDA GPU is visible (see conftest.py); CI has none, so these run on a lent GPU machine.
"""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from tinygpt_cli.errors import TrainingError
from tinygpt_cli.model import chunked_cross_entropy
from tinygpt_cli.training import train

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_compiled_autocast_training(with_shakespeare, dtype, optimizer):
    """Muon under fp16 steps through GradScaler's found_inf; its Newton-Schulz runs in bf16 on CUDA."""
    cfg = tiny_config(max_steps=6, eval_interval=3, device="cuda", dtype=dtype, compile="on", optimizer=optimizer)
    events = []
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    result = train(cfg, run_name=f"gpu-{dtype}-{optimizer}", on_event=events.append)
    # TF32 is on while training only: left on, the caller's own fp32 work would run at TF32's precision
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32
    start = next(e for e in events if e.kind == "start")
    assert start.data["device"].startswith("cuda") and start.data["compiled"]
    assert result.stopped == "completed" and result.final_val_loss < 11.0
    assert result.skipped_steps == 0


def test_fp16_resume_goes_on_with_the_loss_scale(with_shakespeare):
    """The GradScaler's scale and growth count are in the checkpoint: a resumed fp16 run is the straight run (it
    restarted at 65536 before, so its skipped steps and losses drifted from the straight run's)."""
    import json

    from tinygpt_cli import checkpoint as ckpt

    cfg = tiny_config(max_steps=6, eval_interval=3, log_interval=1, device="cuda", dtype="fp16", compile="off")
    straight = train(cfg, run_name="straight")
    train(replace(cfg, train=replace(cfg.train, max_steps=3)), run_name="cut")
    resumed = train(cfg, run_name="cut", resume=True)

    def saved(run):
        state = json.loads((ckpt.latest_checkpoint(run.run_dir) / "state.json").read_text())
        return state["grad_scaler"]

    assert saved(resumed) == saved(straight) and saved(straight)["scale"] > 0
    rows = [(run.run_dir / "metrics.jsonl").read_text().splitlines() for run in (straight, resumed)]
    losses = [[json.loads(line).get("loss") for line in lines if '"train"' in line] for lines in rows]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)  # attention's backward may sum in another order


def test_fused_cross_entropy_on_cuda_matches_reference():
    torch.manual_seed(0)
    hidden = torch.randn(4, 300, 64, device="cuda", requires_grad=True)
    weight = (torch.randn(50304, 64, device="cuda") * 0.05).requires_grad_()
    targets = torch.randint(0, 50257, (4, 300), device="cuda")
    # the softmax is over GPT-2's 50257 ids: the 47 rows that pad the head take no probability
    ref = F.cross_entropy((hidden @ weight[:50257].t()).view(-1, 50257), targets.view(-1))
    ref.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    got = chunked_cross_entropy(hidden, weight, targets, chunk_tokens=256)
    got.backward()
    assert got.item() == pytest.approx(ref.item(), rel=1e-4)
    torch.testing.assert_close(hidden.grad, grads[0], rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(weight.grad, grads[1], rtol=1e-3, atol=1e-5)


def _huge_batch_config(**train_keys):
    cfg = tiny_config(device="cuda", compile="off", max_steps=2, eval_interval=2, **train_keys)
    model = replace(cfg.model, n_layer=4, n_head=8, n_embd=512, block_size=1024)
    total = torch.cuda.get_device_properties(0).total_memory
    # far more than fits: eager, a token of this model keeps ~75 KB of activations, so this asks for 4-9x the card
    # (a 143 GB H200 fits a micro-batch of 1024 sequences; the first version of this test asked for just that)
    batch = 1 << max(6, int(total / (1024 * 1024 * 16)).bit_length())
    return replace(cfg, model=model, train=replace(cfg.train, batch_size=batch, grad_accum=1)), batch


def test_auto_batch_fits_and_keeps_the_global_batch(with_shakespeare):
    cfg, batch = _huge_batch_config(auto_batch=True)
    events = []
    result = train(cfg, run_name="auto", on_event=events.append)
    start = next(e for e in events if e.kind == "start")
    assert start.data["batch_size"] < batch
    assert start.data["batch_size"] * start.data["grad_accum"] == batch
    assert result.stopped == "completed"


def test_the_batch_found_is_the_largest_that_fits_on_its_own():
    """A failed trial's ballast and input stayed alive through the next trial, which could then fail for memory
    the failed one still held (code review): the batch found must be one whose double does not fit even alone."""
    from tinygpt_cli.model import GPT
    from tinygpt_cli.training import _batch_fits, largest_fitting_batch

    cfg, batch = _huge_batch_config()
    model = GPT(cfg.model).cuda()
    ballast = 4 * cfg.model.vocab_size  # the compiled loss's fp32 logits, as `train` holds them
    fits = largest_fitting_batch(model, batch, 1024, torch.device("cuda"), torch.bfloat16, ballast)
    assert 1 <= fits < batch
    torch.cuda.empty_cache()
    assert not _batch_fits(model, 2 * fits, 1024, torch.device("cuda"), torch.bfloat16, ballast)


def test_explicit_batch_that_does_not_fit_names_the_largest_that_does(with_shakespeare):
    cfg, _ = _huge_batch_config()
    with pytest.raises(TrainingError, match=r"does not fit in cuda memory; the largest that fits is \d+"):
        train(cfg, run_name="oom")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_find_lr_on_cuda_compiled(with_shakespeare, dtype, monkeypatch):
    """plan --find-lr's sweep on CUDA: compiled, under autocast (fp16 through GradScaler), --batch-size auto (a
    micro-batch of 24 fitting: 16 × 4 keeps the 64); TF32 and the caller's CUDA random state put back, and its
    memory given back."""
    from tinygpt_cli import training
    from tinygpt_cli.lrfind import find_lr

    monkeypatch.setattr(training, "largest_step_batch", lambda *args: 24)
    before = torch.cuda.memory_allocated()
    state = torch.cuda.get_rng_state()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    cfg = tiny_config(device="cuda", dtype=dtype, compile="on", batch_size=64, auto_batch="true")
    sweep = find_lr(cfg, steps=30, start_lr=1e-5, end_lr=10.0)
    assert sweep.device.startswith("cuda") and len(sweep.points) >= 10
    assert sweep.tokens_per_step == 64 * cfg.model.block_size
    assert sweep.suggested_lr is not None and 1e-5 < sweep.suggested_lr < 10.0
    assert torch.equal(torch.cuda.get_rng_state(), state) and torch.backends.cuda.matmul.allow_tf32 == tf32
    assert torch.cuda.memory_allocated() <= before + (1 << 20)
