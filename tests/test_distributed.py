"""DDP through torchrun with 2 CPU processes (gloo): same losses as one process accumulating gradients."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TINY_SETTINGS, tiny_config
from tinygpt_cli.cli import torchrun_command
from tinygpt_cli.train import train


def _train_losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if r["kind"] == "train"]


def _torchrun(workspace, *args):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
               "-m", "tinygpt_cli", "train", *TINY_SETTINGS, *args]
    env = {**os.environ, "TINYGPT_HOME": str(workspace), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.slow
def test_two_processes_match_one_with_accumulation_and_resume(with_shakespeare, workspace):
    single = train(tiny_config(max_steps=6, eval_interval=3, grad_accum=2), run_name="single")
    expected = _train_losses(single.run_dir)

    done = _torchrun(workspace, "--name", "ddp", "--max-steps", "6", "--set", "train.eval_interval=3")
    assert done.stdout.count("Run ") == 1  # only rank 0 reports
    got = _train_losses(workspace / "runs" / "ddp")
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=2e-4)
    state = json.loads((workspace / "runs" / "ddp" / "checkpoints" / "step_6" / "state.json").read_text())
    assert state["world_size"] == 2 and len(state["rng_per_rank"]) == 2

    # stop the distributed run at step 2 (token limit), then resume it to the end
    tokens_per_step = 2 * 4 * 32
    _torchrun(workspace, "--name", "ddp2", "--max-steps", "6", "--set", "train.eval_interval=3",
              "--max-tokens", str(2 * tokens_per_step))
    assert (workspace / "runs" / "ddp2" / "checkpoints" / "latest").read_text().strip() == "step_2"
    _torchrun(workspace, "--name", "ddp2", "--resume", "--set", "train.max_tokens=0")
    resumed = _train_losses(workspace / "runs" / "ddp2")
    for (_, a), (_, b) in zip(resumed, got, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


@pytest.mark.slow
def test_fsdp_matches_one_process_and_resumes(with_shakespeare, workspace):
    single = train(tiny_config(max_steps=4, eval_interval=2, grad_accum=2), run_name="single")
    tokens_per_step = 2 * 4 * 32
    _torchrun(workspace, "--fsdp", "--name", "fsdp", "--max-steps", "4", "--set", "train.eval_interval=2",
              "--max-tokens", str(3 * tokens_per_step))
    state = json.loads((workspace / "runs" / "fsdp" / "checkpoints" / "step_3" / "state.json").read_text())
    assert state["fsdp"] is True
    _torchrun(workspace, "--fsdp", "--name", "fsdp", "--resume", "--set", "train.max_tokens=0")
    got = _train_losses(workspace / "runs" / "fsdp")
    expected = _train_losses(single.run_dir)
    assert [s for s, _ in got] == [s for s, _ in expected]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=2e-4)
    from tinygpt_cli.checkpoint import load_checkpoint

    assert load_checkpoint(str(workspace / "runs" / "fsdp")).state["step"] == 4  # loads without FSDP too


def test_nproc_execs_torchrun_without_the_flag():
    command = torchrun_command(4, ["train", "--size", "small", "--nproc", "4", "--max-steps", "10"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=4", "-m",
                           "tinygpt_cli", "train", "--size", "small", "--max-steps", "10"]
    assert "--nproc=2" not in torchrun_command(2, ["train", "--nproc=2"])
