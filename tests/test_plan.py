"""`tinygpt plan`: the arithmetic against hand-computed GPT-2 124M figures, the formulas against the model,
the JSON output and the error paths."""

import json
import math
import re
import subprocess
import sys
from dataclasses import replace

import pytest
from test_cli import assert_one_line_error
from typer.testing import CliRunner

from conftest import TINY_SETTINGS, tiny_config
from tinygpt_cli import plan as P
from tinygpt_cli.cli import app
from tinygpt_cli.config import ModelConfig, resolve_config
from tinygpt_cli.errors import ConfigError, DataError, TinyGPTError

runner = CliRunner()
GPT2 = ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257)
GPT2_PADDED = replace(GPT2, vocab_size=50304)  # what `--size small` builds


def invoke(*args: str):
    return runner.invoke(app, list(args))


# ----------------------------------------------------------------------------------------------- by hand
# One block: c_attn 768·2304 + 2304, attn.c_proj 768·768 + 768, c_fc 768·3072 + 3072, mlp.c_proj 3072·768 + 768,
# two LayerNorms 2·(768 + 768): 7,087,872. Twelve blocks + ln_f (1,536) = 85,056,000 non-embedding parameters.
BLOCK = 768 * 2304 + 2304 + 768 * 768 + 768 + 768 * 3072 + 3072 + 3072 * 768 + 768 + 2 * (768 + 768)


def test_gpt2_124m_parameters_by_hand():
    assert BLOCK == 7_087_872
    assert P.count_parameters(GPT2, non_embedding=True) == 12 * BLOCK + 1536 == 85_056_000
    assert P.count_parameters(GPT2) == 85_056_000 + 50257 * 768 + 1024 * 768 == 124_439_808
    assert P.count_parameters(GPT2_PADDED) == 124_475_904
    assert resolve_config(size="small").model == GPT2_PADDED


def test_gpt2_124m_flops_checkpoint_and_chinchilla_by_hand():
    # 6 × (non-embedding + head 50304·768) + 12 · 12 layers · 1024 · 768
    assert P.training_flops_per_token(GPT2_PADDED) == 6 * (85_056_000 + 38_633_472) + 113_246_208 == 855_383_040
    assert P.checkpoint_bytes(GPT2_PADDED) == 12 * 124_475_904 + P.CHECKPOINT_OVERHEAD_BYTES
    plan = P.plan(resolve_config(size="small"), data="openwebtext", device="h100")
    assert plan.chinchilla_tokens == 20 * 124_475_904


def test_gpt2_124m_memory_by_hand():
    est = P.estimate_memory(GPT2_PADDED, 16, P.DEVICES["h100"], half=True)
    per_token = 12 * (36 * 768 + 4 * 12 + 16) + 8 * 768 + 16  # bf16 autocast, fused attention
    assert per_token == 338_704
    assert est.activations_per_sequence == 1024 * per_token
    assert (est.weights, est.gradients, est.optimizer) == (4 * 124_475_904, 4 * 124_475_904, 8 * 124_475_904)
    assert est.autocast_weight_copies == 2 * 12 * 12 * 768 * 768
    assert est.head_gradient == 4 * 50304 * 768
    assert est.loss_chunk == 2048 * 50304 * 6
    assert est.ddp_buckets == 0 and est.fsdp_gathered == 0
    total = 16 * 124_475_904 + 169_869_312 + 154_533_888 + 618_135_552 + 16 * 1024 * per_token
    assert est.total == total == 8_483_479_552
    usable = int(80 * 2**30 * 0.95) - 2**30
    assert est.usable_memory == usable and est.fits
    fixed = total - 16 * 1024 * per_token
    assert est.max_batch_size == (usable - fixed) // (1024 * per_token)
    ddp = P.estimate_memory(GPT2_PADDED, 16, P.DEVICES["h100"], half=True, nproc=8)
    assert ddp.total - est.total == 4 * 124_475_904
    fsdp = P.estimate_memory(GPT2_PADDED, 16, P.DEVICES["h100"], half=True, nproc=8, fsdp=True)
    assert fsdp.weights == 4 * 124_475_904 // 8 and fsdp.total < est.total
    fp32 = P.estimate_memory(GPT2_PADDED, 16, P.DEVICES["h100"], half=False)
    assert fp32.activations_per_sequence == 1024 * (12 * (64 * 768 + 4 * 12 + 16) + 8 * 768 + 16)


def test_a_host_estimate_counts_the_process_itself():
    """On a CPU plan's total was 34-48% under the run's peak RSS (audit): torch and tinygpt take ~0.37 GiB before
    the first tensor, and the allocator keeps what it freed. A CPU or MPS estimate counts HOST_RUNTIME_BYTES; a
    CUDA one does not (its device holds none of that; the reserve covers the CUDA context)."""
    cpu = P.DeviceSpec("cpu", "a CPU", "cpu", 24 * P.GIB, None)
    host = P.estimate_memory(GPT2_PADDED, 4, cpu, half=False)
    device = P.estimate_memory(GPT2_PADDED, 4, P.DEVICES["h100"], half=False)
    assert host.runtime == P.HOST_RUNTIME_BYTES and device.runtime == 0
    assert host.total - device.total == P.HOST_RUNTIME_BYTES
    dropout = P.estimate_memory(replace(GPT2_PADDED, dropout=0.1), 4, cpu, half=False)
    unfused = P.activation_bytes_per_token(replace(GPT2_PADDED, dropout=0.1), False, fused_attention=False)
    assert dropout.activations_per_sequence == math.ceil(1024 * unfused)


def test_gpt2_124m_time_on_8_h100s_by_hand():
    cfg = resolve_config(size="small", overrides=["train.grad_accum=2"])
    plan = P.plan(cfg, data="openwebtext", fraction=0.25, device="h100", nproc=8)
    assert plan.tokens_per_step == 32 * 2 * 1024 * 8 == 524_288
    assert plan.budget_tokens == 19073 * 524_288
    assert plan.tokens_per_s == pytest.approx(989e12 * 0.40 * 8 / 855_383_040)
    evals = -(-19073 // 250)
    eval_tokens = evals * 20 * 32 * 1024
    assert plan.seconds == pytest.approx((plan.budget_tokens + eval_tokens / 3) / plan.tokens_per_s)
    assert plan.data.origin == "registry" and plan.data.train_tokens + plan.data.val_tokens == 2_260_000_000
    assert plan.data.token_file_bytes == 2 * 2_260_000_000
    assert plan.checkpoints_on_disk == 3 + 1 + 1  # keep_last, one more while a new one is written, the best's
    short = P.plan(resolve_config(size="micro", overrides=["train.max_steps=200"]), data="shakespeare", device="cpu")
    assert short.checkpoints_on_disk == 2  # two evaluations, nothing pruned


# ----------------------------------------------------------------------------------------------- vs the code
@pytest.mark.parametrize("bias", [True, False])
def test_counts_match_the_model_and_train_flops(bias):
    from tinygpt_cli.model import GPT
    from tinygpt_cli.training import flops_per_token

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=48, bias=bias)
    model = GPT(cfg)
    assert P.count_parameters(cfg) == model.num_params()
    assert P.count_parameters(cfg, non_embedding=True) == model.num_params(non_embedding=True)
    assert flops_per_token(model) == P.training_flops_per_token(cfg)


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize(("shape", "dropout"), [((4, 64, 64), 0.0), ((4, 64, 64), 0.1), ((3, 48, 40), 0.1)])
def test_activation_formula_matches_what_autograd_saves(half, shape, dropout):
    """Bytes of the distinct tensors autograd keeps for backward in one forward of the real model (CPU). With
    dropout, the CPU's attention takes PyTorch's unfused path, which keeps its T×T probabilities: 2.3× the memory
    plan said (audit)."""
    import torch

    from tinygpt_cli.model import GPT

    n_head, n_embd, block_size = shape
    cfg = ModelConfig(n_layer=2, n_head=n_head, n_embd=n_embd, block_size=block_size, dropout=dropout)
    model = GPT(cfg)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    B = 3
    idx = torch.randint(0, 50257, (B, cfg.block_size))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=half)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        model(idx, idx)
    fused = P.fused_attention(cfg, "cpu")
    assert fused == (dropout == 0)
    expected = B * cfg.block_size * P.activation_bytes_per_token(cfg, half, fused_attention=fused)
    expected += 4 * cfg.vocab_size * cfg.n_embd  # the fused loss's head gradient
    expected += 2 * 12 * cfg.n_layer * cfg.n_embd**2 if half else 0  # autocast's bf16 weight copies
    expected += 8 * cfg.block_size  # the position ids
    assert sum(saved.values()) == expected


def test_device_peaks_agree_with_train(monkeypatch):
    import torch

    from tinygpt_cli.training import device_peak_flops

    for spec in P.DEVICES.values():
        if spec.cuda_name:
            gpu_name = f"NVIDIA {spec.cuda_name}"
            monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=gpu_name: name)
            assert device_peak_flops(torch.device("cuda"), torch.bfloat16) == spec.peak_flops, spec.key
            assert device_peak_flops(torch.device("cuda"), torch.float32) == spec.peak(False), spec.key
    # fp32 is TF32, half the bf16 rate, from Ampere on; a V100 or a T4 has no TF32 (ML review: 62.5 TF read)
    assert P.DEVICES["a100"].peak(False) == 156e12 and P.DEVICES["v100"].peak(False) == 15.7e12
    assert P.gpu_spec("NVIDIA L40", 0).key == "l40" and P.gpu_spec("NVIDIA L40S", 0).key == "l40s"  # not the L4
    assert P.gpu_spec("NVIDIA H100 PCIe", 80 * 2**30).key == "h100-pcie"
    assert P.gpu_spec("NVIDIA H100 80GB HBM3", 79 * 2**30).key == "h100"
    assert P.gpu_spec("NVIDIA A10G", 24 * 2**30).key == "a10g" and P.gpu_spec("NVIDIA GH200 480GB", 0).key == "gh200"
    assert P.gpu_spec("Some Future GPU", 2**30).peak_flops is None


def test_plan_module_does_not_import_torch():
    code = ("import sys; from tinygpt_cli.plan import plan; from tinygpt_cli.config import resolve_config; "
            "plan(resolve_config(size='small'), data='openwebtext', device='a100', nproc=4); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------- data
def test_data_from_meta_json_and_defaults(with_shakespeare):
    meta = json.loads((with_shakespeare / "meta.json").read_text())
    plan = P.plan(resolve_config(size="micro"), device="cpu")  # default data: the newest tokenized dataset
    assert plan.data.origin == "meta.json" and plan.data.name == "shakespeare"
    assert plan.data.train_tokens == meta["splits"]["train"]["tokens"]
    assert plan.data.token_file_bytes == (with_shakespeare / "train.bin").stat().st_size + \
        (with_shakespeare / "val.bin").stat().st_size
    noted = P.plan(resolve_config(size="micro"), data="shakespeare", fraction=0.5, device="cpu")
    assert any("already tokenized" in note for note in noted.notes)
    assert not any("a context of" in note for note in noted.notes)
    val = meta["splits"]["val"]["tokens"]  # a context longer than the val split: train refuses it, plan says so
    long = P.plan(resolve_config(size="micro", overrides=[f"model.block_size={val}"]), device="cpu")
    assert any(f"the val split of shakespeare has {val:,} tokens, fewer than the {val + 2:,} a context of {val:,} "
               "needs: `tinygpt train` will refuse it" in note for note in long.notes)
    # one token more than a context and its targets is what the sampler needs: train refuses it, plan says so
    edge = P.plan(resolve_config(size="micro", overrides=[f"model.block_size={val - 1}"]), device="cpu")
    assert any("fewer than the" in note for note in edge.notes)
    assert P.too_little_data("d", "val", val, val - 2) is None


def test_data_errors(workspace):
    with pytest.raises(DataError, match="unknown data 'nosuch'"):
        P.estimate_data("nosuch")
    with pytest.raises(DataError, match="--fraction"):
        P.estimate_data("openwebtext", fraction=1.5)
    assert P.estimate_data(None).name == "shakespeare"  # nothing tokenized: the embedded corpus
    assert P.estimate_data("openwebtext").download_bytes and P.estimate_data("shakespeare").download_bytes is None


def test_batch_auto_and_overflow_notes():
    cfg = resolve_config(size="small", overrides=["train.batch_size=512", "train.grad_accum=1"])
    plan = P.plan(cfg, data="openwebtext", device="t4")
    assert plan.memory.fits is False and plan.dtype == "fp16"
    assert any("--batch-size auto" in note for note in plan.notes)
    auto = P.plan(replace(cfg, train=replace(cfg.train, auto_batch=True)), data="openwebtext", device="t4")
    assert auto.memory.fits and auto.batch_size * auto.grad_accum == 512 and 512 % auto.batch_size == 0
    with pytest.raises(ConfigError, match="unknown device"):
        P.plan(cfg, device="h1000")


def test_an_evaluation_heavier_than_training_is_noted():
    for size in ("micro", "small"):  # the presets spend little on evaluation
        assert not [n for n in P.plan(resolve_config(size=size), data="openwebtext", device="h100").notes
                    if "evaluation" in n]
    heavy = P.plan(resolve_config(size="micro", overrides=["train.eval_batches=100000"]), data="openwebtext",
                   device="h100")
    assert any(n.startswith("evaluation (train.eval_batches=100,000 every 100 steps) is about 100%") for n in
               heavy.notes)


# ----------------------------------------------------------------------------------------------- command line
def test_plan_command_table_and_json():
    result = invoke("plan", "--size", "small", "--data", "openwebtext", "--fraction", "0.25", "--device", "h100",
                    "--nproc", "8")
    assert result.exit_code == 0, result.output
    for fragment in ("124,475,904", "85,056,000", "memory per device", "largest micro-batch", "wall time",
                     "Chinchilla"):
        assert fragment in result.stdout
    assert "model                small: 12 layers × 768" in result.stdout
    # QA: a shape that is not the preset's (here from --set; a run's config.yaml beside --size alike) was labelled
    # with the preset's name, as if the model were tiny
    custom = invoke("plan", "--size", "tiny", "--set", "model.n_layer=4", "--device", "h100")
    assert custom.exit_code == 0 and "model                custom (from tiny): 4 layers × 384" in custom.stdout
    result = invoke("plan", "--size", "small", "--data", "openwebtext", "--device", "a100", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["parameters"] == 124_475_904 and data["flops_per_token"] == 855_383_040
    assert data["device"]["key"] == "a100" and data["memory"]["fits"] is True
    assert data["tokens_per_s"] == pytest.approx(312e12 * 0.4 / 855_383_040)
    # audit: small's budget over the embedded corpus read "30414.88 epochs", the one count without separators
    result = invoke("plan", "--size", "small", "--data", "shakespeare")
    assert result.exit_code == 0 and re.search(r"\(\d{1,3},\d{3} epochs\)", result.stdout), result.stdout
    # and without a decimal that says nothing in thousands of passes ("210,167.0 passes")
    assert re.search(r"the budget is \d{1,3},\d{3} passes", result.stdout)


def test_plan_command_errors(workspace):
    assert_one_line_error(invoke("plan", "--device", "h1000"), "unknown device 'h1000'")
    assert_one_line_error(invoke("plan", "--nproc", "0"), "--nproc must be at least 1")
    assert_one_line_error(invoke("plan", "--data", "nosuch"), "unknown data 'nosuch'")
    assert_one_line_error(invoke("plan", "--data", "openwebtext", "--fraction", "2"), "--fraction must be in")
    assert_one_line_error(invoke("plan", "--mfu", "1.5", "--device", "h100"), "--mfu must be in")
    assert_one_line_error(invoke("plan", "--mfu", "1e-300", "--device", "h100"), "--mfu must be in [0.001, 1]")  # QA
    assert_one_line_error(invoke("plan", "--mfu", "0.5", "--measure"), "give one of them")
    assert_one_line_error(invoke("plan", "--measure", "--device", "h100"), "--measure runs on this machine")
    assert_one_line_error(invoke("plan", "--size", "huge"), "unknown size 'huge'")


def test_plan_measure_on_cpu(workspace):
    result = invoke("plan", "--size", "micro", *TINY_SETTINGS, "--device", "cpu", "--measure", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["time_basis"] == "measured" and data["measurement"]["device"] == "cpu"
    assert data["tokens_per_s"] > 0 and data["seconds"] > 0
    assert not (workspace / "runs").exists()  # measuring writes nothing


def test_plan_help_names_every_device():
    """The --device help is written out (the --help path imports no plan module); it must list the table's keys."""
    import re

    import typer

    from tinygpt_cli import cli

    plan_command = typer.main.get_command(cli.app).commands["plan"]
    device_help = next(param.help for param in plan_command.params if param.name == "device")
    assert set(P.DEVICE_CHOICES) <= set(re.findall(r"[a-z0-9-]+", device_help))


def test_host_memory_on_windows(monkeypatch):
    """Windows has no os.sysconf: its RAM was unknown, so plan could not say whether a run fits and train skipped
    its RAM check (portability review). It comes from GlobalMemoryStatusEx."""
    import ctypes
    import sys
    from types import SimpleNamespace

    def status(reference):
        memory = reference._obj
        assert memory.dwLength == ctypes.sizeof(memory) == 64  # what Windows checks before filling it in
        memory.ullTotalPhys = 16 * 2**30
        return 1

    monkeypatch.delattr(P.os, "sysconf")
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(P, "cgroup_memory", lambda: None)
    monkeypatch.setattr(ctypes, "windll", SimpleNamespace(kernel32=SimpleNamespace(GlobalMemoryStatusEx=status)),
                        raising=False)
    assert P._host_memory() == 16 * 2**30
    monkeypatch.setattr(ctypes.windll.kernel32, "GlobalMemoryStatusEx", lambda reference: 0)  # the call failed
    assert P._host_memory() is None


def test_host_memory_respects_a_container_limit(tmp_path, monkeypatch):
    """In a container the cgroup's limit, not the host's RAM, is what a run can use (v2 and v1 layouts)."""
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text("1073741824\n")
    (v2 / "memory.current").write_text("268435456\n")
    assert P.cgroup_memory(v2) == (2**30, 2**28)
    (v2 / "memory.stat").write_text("anon 1000\ninactive_file 134217728\nactive_file 5\n")
    assert P.cgroup_memory(v2) == (2**30, 2**27)  # reclaimable page cache is not counted as used
    (v2 / "memory.max").write_text("max\n")
    assert P.cgroup_memory(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2 * 2**30))
    (v1 / "memory" / "memory.usage_in_bytes").write_text(str(2**30))
    assert P.cgroup_memory(v1) == (2 * 2**30, 2**30)
    (v1 / "memory" / "memory.stat").write_text("cache 9\ntotal_inactive_file 1073741824\n")
    assert P.cgroup_memory(v1) == (2 * 2**30, 0)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**63 - 4096))  # v1's "no limit"
    assert P.cgroup_memory(v1) is None
    assert P.cgroup_memory(tmp_path / "none") is None
    monkeypatch.setattr(P, "CGROUP_ROOT", v1)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(str(2**20))
    assert P._host_memory() == 2**20
    from tinygpt_cli import sample

    (v1 / "memory" / "memory.stat").unlink()
    assert sample.free_memory(__import__("torch").device("cpu")) == 0  # 1 GiB used of a 1 MiB limit


def test_processes_on_one_host_share_its_ram_as_train_counts_it(monkeypatch):
    """`train --nproc N` on a CPU gives each process 1/N of the RAM (`_fit_host_memory`); plan must agree, not
    call a micro-batch that only fits N times over a fit."""
    monkeypatch.setattr(P, "_host_memory", lambda: 8 * 2**30)
    cfg = resolve_config(size="micro")
    one, four = P.plan(cfg, data="shakespeare", device="cpu"), P.plan(cfg, data="shakespeare", device="cpu", nproc=4)
    assert four.memory.device_memory == 2 * 2**30 and four.memory.max_batch_size < one.memory.max_batch_size
    big = replace(cfg, train=replace(cfg.train, batch_size=one.memory.max_batch_size))
    assert P.plan(big, data="shakespeare", device="cpu").memory.fits
    assert P.plan(big, data="shakespeare", device="cpu", nproc=4).memory.fits is False


def test_plan_takes_the_shape_of_the_weights_train_init_from_starts_from(with_shakespeare, workspace):
    """Audit: plan planned the --size preset's model while train trains the source's shape; the source is read
    without loading its weights (a run's checkpoint header, a folder's config.json, a hub name's known shape)."""
    from tinygpt_cli.export import export_model, pretrained_config
    from tinygpt_cli.training import train

    train(tiny_config(max_steps=1, eval_interval=1), run_name="base")  # 2 layers × 32, context 32
    base = P.plan(resolve_config(size="small", overrides=["train.init_from=base"]), data="shakespeare", device="cpu")
    assert base.model == {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 50304}
    assert any("starting from base: its shape, 2 layers × 32, context 32" in note for note in base.notes)
    folder = export_model("base", "hf", workspace / "hf-base").path
    assert pretrained_config(str(folder)) == pretrained_config("base")
    gpt2 = P.plan(resolve_config(size="micro", overrides=["train.init_from=gpt2-medium", "model.block_size=256"]),
                  data="shakespeare", device="cpu")  # offline: the hub name's shape, not a download
    assert (gpt2.model["n_layer"], gpt2.model["n_embd"], gpt2.model["block_size"]) == (24, 1024, 256)
    assert gpt2.parameters > 300e6
    with pytest.raises(TinyGPTError, match="longer than the model's context of 32"):
        P.plan(resolve_config(size="micro", overrides=["train.init_from=base", "model.block_size=64"]),
               data="shakespeare", device="cpu")
    with pytest.raises(TinyGPTError, match="no run, checkpoint or Hugging Face GPT-2 folder at nosuch"):
        P.plan(resolve_config(size="micro", overrides=["train.init_from=nosuch"]), device="cpu")


def test_the_budget_row_counts_the_steps_max_tokens_leaves(workspace):
    """Audit: `plan --max-tokens 100000` said "500 steps = 100.35k tokens", where the run stops after 49."""
    result = invoke("plan", "--size", "micro", "--device", "cpu", "--max-tokens", "100000")
    assert result.exit_code == 0, result.output
    assert "49 of 500 steps (train.max_tokens) = 100.35k tokens" in " ".join(result.stdout.split())
    assert "500 steps = 1.02M tokens" in " ".join(invoke("plan", "--size", "micro", "--device", "cpu").stdout.split())


def test_plan_says_when_the_checkpoints_will_not_fit_on_the_disk(workspace, monkeypatch):
    """Audit: `tinygpt plan --size large` printed 46.4 GB of checkpoints with 45.2 GB free, and said nothing of it;
    `train` then refused to start."""
    from tinygpt_cli import workspace as ws

    monkeypatch.setattr(ws, "free_bytes", lambda path: 10**15)  # (whatever this machine has free)
    planned = json.loads(invoke("plan", "--size", "large", "--device", "h100", "--json").stdout)
    assert not any(note.startswith("its checkpoints need") for note in planned["notes"])
    monkeypatch.setattr(ws, "free_bytes", lambda path: planned["checkpoint_disk_bytes"] - 1)
    tight = json.loads(invoke("plan", "--size", "large", "--device", "h100", "--json").stdout)
    assert any(note.startswith("its checkpoints need about ") and "`tinygpt train` will refuse it" in note
               for note in tight["notes"])


def test_plan_takes_trains_fsdp_flag(workspace):
    """Docs audit: `train --fsdp` had no `plan --fsdp`; it went through --set alone."""
    def weights(*flags):
        result = invoke("plan", "--size", "small", "--device", "h100", "--nproc", "8", "--json", *flags)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)["memory"]["weights"]

    assert weights("--fsdp") == weights("--set", "train.fsdp=true") == weights() // 8
    sharded = workspace / "sharded.yaml"
    sharded.write_text("train:\n  fsdp: true\n")
    # review: --no-fsdp was a no-op against a config file's fsdp: true
    assert weights("--config", str(sharded), "--no-fsdp") == weights() == 8 * weights("--config", str(sharded))


def test_plan_takes_trains_lr_flag_which_its_fine_tuning_note_names(workspace):
    """Review: plan's fine-tuning note said "--lr sets another", and plan had no --lr."""
    told = invoke("plan", "--init-from", "gpt2", "--device", "cpu", "--lr", "1e-4")
    assert told.exit_code == 0, told.output
    assert "fine-tuning at lr" not in told.stdout
    assert "--lr sets another" in invoke("plan", "--init-from", "gpt2", "--device", "cpu").stdout


def test_a_train_command_line_plans_as_it_is(workspace):
    """`tinygpt plan` refused train's --dropout, --keep-last, --max-tokens, --max-minutes, --compile and
    --init-from (audit), though each changes a plan; and it said "1 layers"."""
    base = json.loads(invoke("plan", "--size", "micro", "--device", "cpu", "--json").stdout)
    flags = ["--dropout", "0.1", "--keep-last", "1", "--max-tokens", "100000", "--max-minutes", "5", "--compile",
             "off"]
    planned = invoke("plan", "--size", "micro", "--device", "cpu", "--json", *flags)
    assert planned.exit_code == 0, planned.output
    got = json.loads(planned.stdout)
    assert got["budget_tokens"] < base["budget_tokens"] and got["checkpoints_on_disk"] == 3  # 1 + new + best
    assert got["memory"]["activations_per_sequence"] > base["memory"]["activations_per_sequence"]
    one = invoke("plan", "--size", "micro", "--set", "model.n_layer=1", "--set", "model.n_head=1", "--device", "cpu")
    assert "custom (from micro): 1 layer × " in one.stdout and ", 1 head, " in one.stdout


def test_a_source_not_tokenized_yet_gets_the_val_split_tokenize_makes(workspace):
    """tokenize splits by document, with at least one val document: the embedded corpus's 42 give one of them to
    val, 42,757 tokens, where plan said 0.5% of the tokens, 7,850 (audit)."""
    shakespeare = P.estimate_data("shakespeare")
    assert shakespeare.val_tokens == round(1_570_000 / 42)  # one document of 42, by their mean size
    assert shakespeare.train_tokens + shakespeare.val_tokens == 1_570_000
    web = P.estimate_data("openwebtext", fraction=0.25)  # ~2M documents: the share of tokens is the share of them
    assert web.val_tokens == pytest.approx(0.005 * round(9_040_000_000 * 0.25), rel=1e-4)


def test_huge_counts_read_at_a_glance():
    """QA: `--batch-size 99999999999` printed a budget of 6400000.00B tokens."""
    from tinygpt_cli.cli import _fmt_count

    assert [_fmt_count(n) for n in (12, 1_200, 7.89e6, 4.56e9, 1.23e12, 6.4e15)] == \
        ["12", "1.20k", "7.89M", "4.56B", "1.23T", "6.40e+15"]
