"""train.optimizer=muon: Newton-Schulz, the groups, Muon's step and its skips, resume, the config and the plan."""

from dataclasses import replace

import pytest
import torch

from conftest import tiny_config
from tinygpt_cli import checkpoint as ckpt
from tinygpt_cli import optim
from tinygpt_cli.config import ModelConfig, resolve_config, start_from
from tinygpt_cli.errors import ConfigError, TrainingError
from tinygpt_cli.model import GPT
from tinygpt_cli.optim import MuonAdamW, make_optimizer, muon_schedule, orthogonalize, set_learning_rate
from tinygpt_cli.plan import checkpoint_bytes, optimizer_state_bytes
from tinygpt_cli.training import StopFlag, learning_rate, train


def _with_singular_values(rows, cols, values, seed):
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(values), generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, len(values), generator=generator))
    return u @ torch.diag(torch.tensor(values)) @ v.T, u @ v.T


@pytest.mark.parametrize("rows, cols", [(16, 48), (48, 16), (32, 32)])
def test_orthogonalize_keeps_the_directions_and_evens_the_singular_values(rows, cols):
    """A matrix U S V^T with singular values from 3 down to 0.05 comes out near U V^T: every value in [0.6, 1.2]."""
    values = torch.linspace(3.0, 0.05, min(rows, cols)).tolist()
    matrix, polar = _with_singular_values(rows, cols, values, seed=rows)
    result = orthogonalize(matrix)
    singular = torch.linalg.svdvals(result)
    assert singular.min() > 0.6 and singular.max() < 1.2
    assert torch.linalg.svdvals(matrix).max() / torch.linalg.svdvals(matrix).min() > 50  # it was far from that
    cosine = (result * polar).sum() / (result.norm() * polar.norm())
    assert cosine > 0.97


def test_orthogonalize_takes_a_stack_of_matrices_apart():
    first, _ = _with_singular_values(8, 8, [2.0] * 8, seed=1)
    second, _ = _with_singular_values(8, 8, [0.01] * 8, seed=2)  # its scale must not reach the first's
    stacked = orthogonalize(torch.stack([first, second]))
    assert torch.allclose(stacked[0], orthogonalize(first), atol=1e-6)
    assert torch.allclose(stacked[1], orthogonalize(second), atol=1e-6)


def _muon_model(**train):
    config = tiny_config(optimizer="muon", **train)
    torch.manual_seed(0)
    model = GPT(config.model)
    return model, make_optimizer(model, config.train), config.train


def test_muon_trains_the_blocks_matrices_and_adamw_the_rest():
    model, optimizer, _ = _muon_model()
    assert isinstance(optimizer, MuonAdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    seen = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(names.values())  # every parameter once
    muon = {names[id(p)]: group.get("split", 1) for group in optimizer.param_groups if group.get("muon")
            for p in group["params"]}
    assert muon == {f"transformer.h.{i}.{name}": 3 if name == "attn.c_attn.weight" else 1 for i in range(2)
                    for name in ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")}
    decayed, undecayed = optimizer.param_groups[:2]
    assert {names[id(p)] for p in decayed["params"]} == {"transformer.wte.weight", "transformer.wpe.weight"}
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in undecayed["params"])
    plain = make_optimizer(model, tiny_config().train)
    assert type(plain) is torch.optim.AdamW and len(plain.param_groups) == 2


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_muons_schedule_is_train_lrs_scaled_to_muon_lr(schedule):
    _, optimizer, tc = _muon_model(lr=1e-3, min_lr=2e-4, muon_lr=0.05, schedule=schedule, max_steps=40,
                                   warmup_steps=5)
    for step in (0, 3, 5, 20, 33, 39, 45):
        assert learning_rate(step, muon_schedule(tc)) == pytest.approx(learning_rate(step, tc) * 50, rel=1e-9)
    set_learning_rate(optimizer, 5e-4, 0.025)
    assert [group["lr"] for group in optimizer.param_groups] == [5e-4, 5e-4, 0.025, 0.025]


def _reference_muon(weight, grads, lr, momentum, decay, split):
    """Muon by hand: Nesterov momentum, each of `split` row blocks orthogonalized, scaled by sqrt(rows/cols)."""
    weight, buffer = weight.clone(), torch.zeros_like(weight)
    rows, cols = weight.shape
    for grad in grads:
        buffer = momentum * buffer + grad
        direction = grad + momentum * buffer
        blocks = torch.cat([orthogonalize(block) for block in direction.chunk(split)])
        weight = weight * (1 - lr * decay) - lr * max(1.0, rows / split / cols) ** 0.5 * blocks
    return weight, buffer


@pytest.mark.parametrize("stack", [1, 8])
def test_a_muon_step_is_nesterov_momentum_orthogonalized_per_block(stack, monkeypatch):
    """Per matrix, whether the layers' matrices of a shape are orthogonalized one by one or stacked."""
    monkeypatch.setattr(optim, "MUON_STACK", stack)
    model, optimizer, tc = _muon_model()
    set_learning_rate(optimizer, tc.lr, tc.muon_lr)
    fc, qkv = model.transformer.h[0].mlp.c_fc.weight, model.transformer.h[0].attn.c_attn.weight
    start = {"fc": fc.detach().clone(), "qkv": qkv.detach().clone()}
    generator = torch.Generator().manual_seed(3)
    grads = {"fc": [], "qkv": []}
    for _ in range(3):
        for parameter in model.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator)
        grads["fc"].append(fc.grad.clone())
        grads["qkv"].append(qkv.grad.clone())
        optimizer.step()
    for name, parameter, split in (("fc", fc, 1), ("qkv", qkv, 3)):
        weight, buffer = _reference_muon(start[name], grads[name], tc.muon_lr, tc.muon_momentum, tc.weight_decay,
                                         split)
        assert torch.allclose(parameter.detach(), weight, atol=1e-6)
        assert torch.allclose(optimizer.state[parameter]["momentum_buffer"], buffer, atol=1e-6)
    assert fc.shape[0] == 4 * fc.shape[1]  # scaled by 2: a slip in the scale shows


def test_a_skipped_step_leaves_weights_and_momenta_as_they_were():
    """The loop's found_inf (or GradScaler's) skips the step on the device: a NaN gradient reaches nothing."""
    model, optimizer, _ = _muon_model()
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()  # momenta exist
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    momenta = {id(p): s["momentum_buffer"].clone() for p, s in optimizer.state.items() if "momentum_buffer" in s}
    for parameter in model.parameters():
        parameter.grad = torch.full_like(parameter, float("nan"))
    optimizer.found_inf = torch.ones(())
    optimizer.step()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert all(torch.equal(optimizer.state[p]["momentum_buffer"], momenta[id(p)])
               for p in optimizer.state if id(p) in momenta)
    assert {float(state["step"]) for state in optimizer.state.values()} == {1.0}  # AdamW's and Muon's counts alike
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.found_inf = torch.zeros(())
    optimizer.step()
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before["transformer.h.0.mlp.c_fc.weight"])


def test_step_hooks_run_once_a_step():
    """torch wraps AdamW.step for hooks once a plain AdamW exists: Muon's step must not run them a second time."""
    model, optimizer, _ = _muon_model()
    make_optimizer(model, tiny_config().train)  # a plain AdamW: AdamW.step is wrapped from now on
    calls = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append(len(opt.param_groups)))
    for parameter in model.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    assert calls == [4]


def test_gradients_still_scaled_by_gradscaler_are_unscaled_first():
    results = []
    for scale in (None, 1024.0):
        model, optimizer, _ = _muon_model()
        for parameter in model.parameters():
            parameter.grad = torch.linspace(-1, 1, parameter.numel()).reshape(parameter.shape) * (scale or 1.0)
        optimizer.grad_scale = None if scale is None else torch.tensor(scale)
        optimizer.step()  # AdamW's groups too: fused AdamW divides by grad_scale
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*results, strict=True))


def test_a_muon_run_learns_and_resumes_exactly(with_shakespeare):
    config = tiny_config(max_steps=8, eval_interval=4, optimizer="muon")
    straight = train(config, run_name="straight")
    adamw = train(replace(config, train=replace(config.train, optimizer="adamw")), run_name="adamw")
    assert straight.final_val_loss < 10.7  # from ln(50304) = 10.83 at the start
    assert straight.final_val_loss != adamw.final_val_loss  # Muon did train the matrices
    stop = StopFlag()

    def stop_at_3(event):
        if event.kind == "step" and event.step == 3:
            stop.reason = "interrupted"

    first = train(config, run_name="split", on_event=stop_at_3, stop=stop)
    assert first.steps == 3
    resumed = train(config, run_name="split", resume=True)
    assert resumed.steps == 8

    def losses(run):
        return [(r["kind"], r["step"], r.get("loss", r.get("val_loss")))
                for r in map(__import__("json").loads, (run / "metrics.jsonl").read_text().splitlines())]

    assert losses(straight.run_dir) == losses(resumed.run_dir)
    saved = torch.load(ckpt.latest_checkpoint(resumed.run_dir) / "optimizer.pt", weights_only=True)
    assert [bool(group.get("muon")) for group in saved["param_groups"]] == [False, False, True, True]
    assert ("| optimizer | Muon for the blocks' matrices (lr 0.02 on the same schedule) + AdamW, cosine from lr "
            "0.002 to 0.0002 |") in (resumed.run_dir / "report.md").read_text()
    assert "| optimizer | AdamW, cosine from lr 0.002 to 0.0002 |" in (adamw.run_dir / "report.md").read_text()


def test_a_resume_cannot_change_the_optimizer(with_shakespeare):
    config = tiny_config(max_steps=2, eval_interval=2)
    run = train(config, run_name="r").run_dir
    before = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    more = replace(config.train, max_steps=4, optimizer="muon")
    with pytest.raises(TrainingError, match=r"train\.optimizer cannot change run r on resume: its checkpoint holds "
                                            r"adamw's state; .*--init-from r --set train\.optimizer=muon"):
        train(replace(config, train=more), run_name="r", resume=True)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == before
    assert train(replace(config, train=replace(more, optimizer="adamw")), run_name="r", resume=True).steps == 4


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=sgd", r"train.optimizer must be one of adamw, muon \(got 'sgd'\)"),
    ("train.muon_lr=0", "train.muon_lr must be a positive number"),
    ("train.muon_momentum=1", r"train.muon_momentum must be in \[0, 1\)"),
    ("train.muon_lr=nan", "train.muon_lr must be a finite number"),
])
def test_bad_muon_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=["train.optimizer=muon", override])


def test_muon_settings_without_muon_are_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"^train.muon_lr goes with train.optimizer=muon, which this run does not "
                                          r"use: add --set train.optimizer=muon, or drop it$"):
        resolve_config(overrides=["train.muon_lr=0.01"])
    with pytest.raises(ConfigError, match="train.muon_lr and train.muon_momentum go with"):
        resolve_config(overrides=["train.muon_momentum=0.9", "train.muon_lr=0.01"])
    assert resolve_config(overrides=["train.muon_lr=0.01", "train.optimizer=muon"]).train.muon_lr == 0.01


def test_muon_is_refused_under_fsdp():
    with pytest.raises(ConfigError, match="train.optimizer=muon does not run under --fsdp .*drop --fsdp"):
        resolve_config(overrides=["train.optimizer=muon", "train.fsdp=true"])


def test_a_fine_tune_with_muon_lowers_its_rate_as_it_lowers_lr():
    gpt2 = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    cfg, notes = start_from(resolve_config(size="small", overrides=["train.init_from=gpt2",
                                                                    "train.optimizer=muon"]), gpt2)
    assert cfg.train.muon_lr == pytest.approx(0.001) and any("train.muon_lr 0.001" in note for note in notes)
    given = start_from(resolve_config(size="small", overrides=["train.init_from=gpt2", "train.optimizer=muon",
                                                               "train.muon_lr=0.005"]), gpt2)[0]
    assert given.train.muon_lr == 0.005


def test_the_plan_counts_one_momentum_for_muons_matrices(with_shakespeare):
    """Muon keeps 4 B/param for the blocks' matrices where AdamW keeps 8: the plan's checkpoint size follows, and
    matches what a run writes."""
    model = ModelConfig(n_layer=4, n_head=2, n_embd=64, block_size=32)
    params = model.n_layer * 12 * 64**2
    assert optimizer_state_bytes(model, "adamw") - optimizer_state_bytes(model, "muon") == 4 * params
    config = tiny_config(max_steps=2, optimizer="muon")
    config = replace(config, model=replace(config.model, n_layer=4, n_embd=64))
    run = train(config, run_name="wide").run_dir
    written = sum(f.stat().st_size for f in (run / "checkpoints" / "step_2").iterdir())
    assert abs(written - checkpoint_bytes(config.model, "muon")) < 0.005 * written
    assert abs(written - checkpoint_bytes(config.model, "adamw")) > 0.02 * written


def test_a_resume_applies_new_muon_settings_not_the_checkpoints(with_shakespeare):
    config = tiny_config(max_steps=2, eval_interval=2, optimizer="muon")
    train(config, run_name="r")
    changed = replace(config.train, max_steps=3, muon_momentum=0.8, weight_decay=0.5, beta1=0.7)
    resumed = train(replace(config, train=changed), run_name="r", resume=True)
    saved = torch.load(ckpt.latest_checkpoint(resumed.run_dir) / "optimizer.pt", weights_only=True)
    groups = saved["param_groups"]
    assert [(g["weight_decay"], tuple(g["betas"])) for g in groups[:2]] == [(0.5, (0.7, 0.95)), (0.0, (0.7, 0.95))]
    assert [(g["weight_decay"], g["momentum"]) for g in groups[2:]] == [(0.5, 0.8), (0.5, 0.8)]


def test_the_cli_names_muon_and_refuses_it_on_a_resume_of_an_adamw_run(with_shakespeare, workspace):
    from typer.testing import CliRunner

    from conftest import TINY_SETTINGS, assert_one_line_error
    from tinygpt_cli.cli import app

    def invoke(*args):
        return CliRunner().invoke(app, list(args))

    started = invoke("train", *TINY_SETTINGS, "--max-steps", "2", "--set", "train.optimizer=muon", "--name", "m")
    assert started.exit_code == 0, started.output
    assert "cpu float32 · Muon + AdamW · 128 tokens/step" in started.output
    assert invoke("train", *TINY_SETTINGS, "--max-steps", "2", "--name", "a").exit_code == 0
    refused = invoke("train", "--resume", "--name", "a", "--max-steps", "4", "--set", "train.optimizer=muon")
    assert_one_line_error(refused, "train.optimizer cannot change run a on resume")
    assert (workspace / "runs" / "a" / "checkpoints" / "latest").read_text().strip() == "step_2"
    fsdp = invoke("train", *TINY_SETTINGS, "--fsdp", "--set", "train.optimizer=muon", "--name", "f")
    assert_one_line_error(fsdp, "train.optimizer=muon does not run under --fsdp")
    assert not (workspace / "runs" / "f").exists()


def test_a_longer_schedule_climbs_muons_lr_from_where_it_ended(with_shakespeare):
    """A resume with a larger --max-steps re-warms Muon's LR from its last, as it re-warms AdamW's, instead of
    jumping to the longer schedule's; both are in metrics.jsonl."""
    import json

    config = tiny_config(max_steps=6, eval_interval=6, warmup_steps=2, optimizer="muon")
    events = []
    run = train(config, run_name="r").run_dir
    train(replace(config, train=replace(config.train, max_steps=12)), run_name="r", resume=True,
          on_event=events.append)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    muon = {row["step"]: row["muon_lr"] for row in rows if row["kind"] == "train"}
    lr = {row["step"]: row["lr"] for row in rows if row["kind"] == "train"}
    assert muon[6] == pytest.approx(2e-3)  # the floor: min_lr / lr of muon_lr
    longer = muon_schedule(replace(config.train, max_steps=12))
    assert muon[7] < learning_rate(6, longer) and muon[7] > muon[6]  # climbing, not jumped
    assert muon[8] == pytest.approx(learning_rate(7, longer))  # there after warmup_steps
    assert all(muon[step] == pytest.approx(lr[step] * 10) for step in (6, 8, 9, 12))
    assert any("Muon's learning rate rises from 2.0e-03" in getattr(e, "message", "") for e in events)
