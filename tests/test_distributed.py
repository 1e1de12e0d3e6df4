"""DDP through torchrun with 2 CPU processes (gloo): same losses as one process accumulating gradients."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY_SETTINGS, tiny_config, wait_for
from tinygpt_cli import checkpoint as ckpt
from tinygpt_cli import workspace as workspace_module
from tinygpt_cli.launch import torchrun_command
from tinygpt_cli.report import read_metrics
from tinygpt_cli.training import train


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


def _torchrun_script(workspace, tmp_path, text):
    """The Python `text` run on 2 ranks by torchrun, with the tests' folder as its argv[1] (for conftest)."""
    script = tmp_path / "ranks.py"
    script.write_text(text)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               str(Path(__file__).parent)]
    env = {**os.environ, "TINYGPT_HOME": str(workspace), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_match_one_with_accumulation_and_resume(with_shakespeare, workspace):
    single = train(tiny_config(max_steps=6, eval_interval=3, grad_accum=2), run_name="single")
    expected = _train_losses(single.run_dir)

    done = _torchrun(workspace, "--name", "ddp", "--max-steps", "6", "--set", "train.eval_interval=3",
                     "--log-to", "tensorboard")
    assert done.stdout.count("Run ") == 1  # only rank 0 reports
    assert len(list((workspace / "runs" / "ddp" / "tensorboard").glob("events.out.tfevents.*"))) == 1  # and logs
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
def test_muon_under_ddp_matches_one_process(with_shakespeare, workspace):
    """Every rank orthogonalizes the same all-reduced gradients: its weights stay those of one process."""
    single = train(tiny_config(max_steps=4, eval_interval=4, grad_accum=2, optimizer="muon"), run_name="single")
    _torchrun(workspace, "--name", "ddp", "--max-steps", "4", "--set", "train.eval_interval=4",
              "--set", "train.optimizer=muon")
    got, expected = _train_losses(workspace / "runs" / "ddp"), _train_losses(single.run_dir)
    assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3, 4]
    for (_, a), (_, b) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=2e-4)


def test_muon_splits_the_orthogonalization_across_ranks(workspace, tmp_path):
    """Under DDP each rank orthogonalizes its share of the matrices and gathers the others': two ranks each do
    half the Newton-Schulz work, and both end with one process's weights and momenta (12 matrices of a shape: a
    chunk of 8, 4 each, then one of 4, 2 each). A chunk gathers 8 matrices at most, as one process stacks them
    (review: it was 8 × the ranks, the gathered copy growing with them)."""
    script = """
import json, os, sys
import torch
import torch.distributed as dist
from tinygpt_cli import optim

def model():
    torch.manual_seed(0)
    blocks = torch.nn.ModuleDict({"h": torch.nn.ModuleList(
        torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"c_attn": torch.nn.Linear(8, 24)}),
                             "mlp": torch.nn.Linear(8, 16)}) for _ in range(12))})
    for parameter in blocks.parameters():
        parameter.grad = torch.randn_like(parameter)
    return blocks

def weights(cfg, module):
    opt = optim.make_optimizer(module, cfg)
    for _ in range(2):
        opt.step()
    return {name: p.detach().clone() for name, p in module.named_parameters()}, opt

from tinygpt_cli.config import TrainConfig
cfg = TrainConfig(optimizer="muon", max_steps=10)
dist.init_process_group("gloo")
counted = []
original = optim.orthogonalize
optim.orthogonalize = lambda matrices: counted.append(matrices.shape[0]) or original(matrices)
split, opt = weights(cfg, model())
dist.destroy_process_group()
mine, largest = sum(counted), max(counted)
one, one_opt = weights(cfg, model())  # no process group now: one process's step
ok = all(torch.allclose(split[name], one[name], atol=1e-6) for name in one)
ok &= all(torch.allclose(opt.state[a]["momentum_buffer"], one_opt.state[b]["momentum_buffer"])
          for a, b in zip(opt.param_groups[2]["params"], one_opt.param_groups[2]["params"]))
rank = int(os.environ["RANK"])  # a file a rank: two ranks printing to one pipe can join their lines (CI did)
with open(os.path.join(os.environ["TINYGPT_HOME"], f"rank{rank}.json"), "w") as handle:
    json.dump({"rank": rank, "mine": mine, "all": sum(counted) - mine, "same": bool(ok), "largest": largest}, handle)
"""
    done = _torchrun_script(workspace, tmp_path, "import sys; sys.path.insert(0, sys.argv[1])\n" + script)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads((workspace / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    # per step: c_attn's 12 weights (24×8, as 3 blocks each) and the MLP's 12 (16×8): each rank orthogonalizes
    # 4 + 2 of each, one process all 12. Two steps. No call takes more than one process's 8 matrices' blocks
    assert [r["mine"] for r in results] == [2 * (6 * 3 + 6)] * 2
    assert [r["all"] for r in results] == [2 * (12 * 3 + 12)] * 2
    assert all(r["same"] for r in results), results
    assert all(r["largest"] == 4 * 3 for r in results)  # a rank's share of a chunk of 8 c_attn weights


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


@pytest.mark.slow
def test_a_checkpoint_resumes_with_or_without_fsdp(with_shakespeare, workspace):
    """Checkpoints hold full weights, so an FSDP run goes on in one process (or under DDP), and a run trained
    without FSDP goes on under it: same losses as the straight run (the optimizer state follows, keyed by
    parameter name under FSDP, by position without)."""
    settings = {"max_steps": 4, "eval_interval": 2, "grad_accum": 2}
    expected = _train_losses(train(tiny_config(**settings), run_name="single").run_dir)
    tokens_per_step = 2 * 4 * 32
    _torchrun(workspace, "--fsdp", "--name", "sharded", "--max-steps", "4", "--set", "train.eval_interval=2",
              "--max-tokens", str(2 * tokens_per_step))
    train(tiny_config(**settings), run_name="sharded", resume=True)  # one process: unsharded
    train(tiny_config(**settings, max_tokens=2 * tokens_per_step), run_name="plain")
    _torchrun(workspace, "--fsdp", "--name", "plain", "--resume", "--set", "train.max_tokens=0", "--grad-accum", "1")
    for run in ("sharded", "plain"):
        got = _train_losses(workspace / "runs" / run)
        assert [s for s, _ in got] == [s for s, _ in expected]
        for (_, a), (_, b) in zip(got, expected, strict=True):
            assert a == pytest.approx(b, abs=2e-4)


def test_nproc_names_the_torchrun_command_without_the_flag():
    command = torchrun_command(4, ["train", "--size", "small", "--nproc", "4", "--max-steps", "10"])
    assert command == ["torchrun", "--standalone", "--nproc-per-node=4", "-m", "tinygpt_cli", "train", "--size",
                       "small", "--max-steps", "10"]
    assert "--nproc=2" not in torchrun_command(2, ["train", "--nproc=2"])


def _nproc(workspace, *args):
    """`tinygpt train --nproc 2 ...` as a user starts it: its own launcher, not torchrun."""
    command = [sys.executable, "-m", "tinygpt_cli", "train", "--nproc", "2", *TINY_SETTINGS, *args]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    return subprocess.Popen(command, env={**env, "TINYGPT_HOME": str(workspace)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_nproc_says_a_workers_error_once(with_shakespeare, workspace):
    """Every rank hits the same bad --data: one error line and exit 1, not one per rank and torchrun's
    traceback."""
    process = _nproc(workspace, "--data", "nonexist", "--name", "e")
    _, err = process.communicate(timeout=300)
    assert process.returncode == 1, err
    assert "\n\n" not in err, err
    assert [line for line in err.splitlines() if "error" in line.lower()] == [
        "error: no tokenized dataset named 'nonexist' (known: shakespeare): make it with `tinygpt tokenize SOURCE "
        "--name nonexist`"]
    assert "Traceback" not in err and "ChildFailedError" not in err
    assert "Launching 2 processes, as `torchrun --standalone --nproc-per-node=2 -m tinygpt_cli train" in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_under_nproc_saves_and_exits_with_its_code(with_shakespeare, workspace, sig):
    """Ctrl-C (or a scheduler's SIGTERM) reaches the launcher: the workers finish their step, rank 0 saves and
    says how to resume, and the group exits 130/143 with no traceback."""
    process = _nproc(workspace, "--name", "s", "--max-steps", "100000")
    run = workspace / "runs" / "s"
    wait_for(process, lambda: ckpt.latest_checkpoint(run) is not None, "checkpoint")
    process.send_signal(sig)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + sig, err
    assert "Traceback" not in err and "SignalException" not in err and "death signal" not in err
    by = "" if sig == signal.SIGINT else f" by {signal.Signals(sig).name}"  # what a scheduler sent, named
    assert f"Interrupted{by}; checkpoint saved. Continue with: tinygpt train --resume --name s --nproc 2" in out
    assert ckpt.latest_step(run) >= 2 and ckpt.load_checkpoint(ckpt.latest_checkpoint(run)).state["world_size"] == 2



def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while being read
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _running(pid: int) -> bool:
    """Whether `pid` still runs: an orphan that ended stays a zombie while its new parent (a container's init that
    never reaps) lets it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a parent's death signal is Linux's")
def test_workers_stop_and_save_when_their_launcher_is_killed(with_shakespeare, workspace):
    """Audit: `kill -9` of the `--nproc` launcher (or the OOM killer choosing it) left its workers training on,
    adopted by init, holding the run's lock, with no terminal to stop them. They now take its death as a
    scheduler's SIGTERM: finish the step, save, exit, and the run resumes."""
    process = _nproc(workspace, "--name", "o", "--max-steps", "100000")
    run = workspace / "runs" / "o"
    wait_for(process, lambda: ckpt.latest_checkpoint(run) is not None, "checkpoint")
    workers = _children(process.pid)
    assert len(workers) == 2, workers
    before = ckpt.latest_step(run)
    process.kill()
    process.wait(timeout=60)
    deadline = time.time() + 300
    while time.time() < deadline and any(_running(pid) for pid in workers):
        time.sleep(0.1)
    left = [pid for pid in workers if _running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    process.communicate(timeout=60)  # the workers held its pipes
    assert left == [], "the workers outlived their launcher"
    # rank 0 saved the step it was on: the last step logged. (Not always past `before`: the death can come as the
    # step-2 checkpoint is written, and then the workers stop at step 2, already saved.)
    trained, _ = read_metrics(run / "metrics.jsonl")
    assert ckpt.latest_step(run) == trained[-1][0] >= before
    assert not workspace_module.held(workspace_module.lock_of(run))  # the run is free to resume


def test_the_launcher_names_the_cause_of_a_failed_group(tmp_path):
    """launch._failed on the failures torch's agent reports: the workers' one-line errors once; a rank that died
    without one (killed by the OOM killer, say) named as the cause even when another rank then wrote an error;
    an interrupted group's exit code as it is."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from tinygpt_cli.errors import TinyGPTError
    from tinygpt_cli.launch import _failed

    def failed(*codes):
        failures = {}
        for rank, code in enumerate(codes):
            failures[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="")
            time.sleep(0.01)  # the first failure is the earliest
        return ChildFailedError("tinygpt_cli", failures)

    def said(exc, folder):
        with pytest.raises(TinyGPTError) as raised:
            _failed(exc, 2, folder)
        return str(raised.value)

    for rank in (0, 1):
        (tmp_path / f"rank-{rank}.txt").write_text("no tokenized dataset named 'x'")
    assert said(failed(1, 1), tmp_path) == "no tokenized dataset named 'x'"
    (tmp_path / "rank-1.txt").write_text("another problem")
    assert said(failed(1, 1), tmp_path) == "rank 0: no tokenized dataset named 'x' · rank 1: another problem"
    (tmp_path / "rank-1.txt").unlink()
    empty = tmp_path / "empty"
    empty.mkdir()
    killed = said(failed(-signal.SIGKILL, -signal.SIGTERM), empty)
    assert killed.startswith("rank 0 of 2 failed (killed by SIGKILL (the kernel's OOM killer")
    # QA: it said "see its output above" of a rank that printed nothing, and not how to go on
    assert killed.endswith("(what it printed, if anything, is above); a checkpoint saved before is kept: `tinygpt "
                           "train --resume --name RUN` goes on from it (a command with --auto-resume: run it again)")
    # a stop while the ranks join the group ends them by the signal itself (`dist.signals_end_the_process`)
    assert _failed(failed(-signal.SIGINT, -signal.SIGTERM), 2, empty) == 130
    only_rank_1 = tmp_path / "one"
    only_rank_1.mkdir()
    (only_rank_1 / "rank-1.txt").write_text("a knock-on error")
    assert said(failed(-signal.SIGKILL, 1), only_rank_1).startswith("rank 0 of 2 failed (killed by SIGKILL")
    assert _failed(failed(130, -signal.SIGTERM), 2, empty) == 130
    assert _failed(failed(129, 129), 2, empty) == 129  # a hangup that reached the workers directly
    assert said(failed(1, -signal.SIGTERM), empty).startswith("rank 0 of 2 failed (exit code 1)")


def test_the_launcher_leaves_an_ignored_hangup_ignored(monkeypatch):
    """Under nohup (SIGHUP ignored) the agent must not catch SIGHUP and pass it on to the workers, which would
    stop the run when the terminal closes; otherwise it handles what torchrun handles."""
    from torch.distributed.launcher.api import LaunchConfig

    from tinygpt_cli.launch import SHUTDOWN_TIMEOUT_S, launch_config

    fields = LaunchConfig.__dataclass_fields__
    monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_DFL)
    config = launch_config(2)
    assert config.nproc_per_node == 2 and config.rdzv_backend == "c10d" and config.max_restarts == 0
    if "shutdown_timeout" in fields:
        assert config.shutdown_timeout == SHUTDOWN_TIMEOUT_S
    if "signals_to_handle" in fields:
        assert "SIGHUP" in config.signals_to_handle
        monkeypatch.setattr(signal, "getsignal", lambda sig: signal.SIG_IGN if sig == signal.SIGHUP else signal.SIG_DFL)
        assert "SIGHUP" not in launch_config(2).signals_to_handle.split(",")
        assert "SIGTERM" in launch_config(2).signals_to_handle


def test_the_launcher_names_the_rank_that_said_why_not_its_knock_on(tmp_path):
    """One rank stops with its own error (bad data on that machine); the other's collective then fails because
    its peer left and it exits 1 too, seen "first" by the agent (same poll, rank order): the error said is the
    rank that said why, never "rank 0 failed (exit code 1)" with the cause lost."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from tinygpt_cli.errors import TinyGPTError
    from tinygpt_cli.launch import PEER_LOST, _failed

    def failed(*codes):
        failures = {}
        for rank, code in enumerate(codes):
            failures[rank] = ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=code, error_file="")
            time.sleep(0.01)
        return ChildFailedError("tinygpt_cli", failures)

    (tmp_path / "rank-1.txt").write_text("bad data on rank 1")
    with pytest.raises(TinyGPTError, match="^bad data on rank 1$"):  # rank 0 died of a traceback, no word
        _failed(failed(1, 1), 2, tmp_path)
    (tmp_path / "rank-0.txt").write_text(f"{PEER_LOST} (Connection closed by peer): ...")
    with pytest.raises(TinyGPTError, match="^bad data on rank 1$"):  # rank 0 said it lost its peer
        _failed(failed(1, 1), 2, tmp_path)
    (tmp_path / "rank-1.txt").unlink()  # rank 1 was killed without a word: that is the cause
    with pytest.raises(TinyGPTError, match="^rank 1 of 2 failed \\(killed by SIGKILL"):
        _failed(failed(1, -signal.SIGKILL), 2, tmp_path)


def test_a_collective_whose_peer_left_is_one_line():
    from tinygpt_cli.errors import TrainingError
    from tinygpt_cli.launch import PEER_LOST
    from tinygpt_cli.training import _peer_lost

    lost = _peer_lost(RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                                   "closed by peer [127.0.0.1]:2959. This is typically caused by a remote worker "
                                   "crashing. Check the logs of the remote worker before reporting an error."))
    assert isinstance(lost, TrainingError) and str(lost).startswith(PEER_LOST)
    assert "Connection closed by peer [127.0.0.1]:2959" in str(lost) and "pair.cc" not in str(lost)
    assert _peer_lost(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) is None


def test_a_resume_on_more_processes_gives_the_new_ranks_their_own_dropout_stream():
    from tinygpt_cli.training import _rank_rng

    single = {"rng": {"torch": "rank 0"}, "rng_per_rank": None}
    assert _rank_rng(single, 0) == {"torch": "rank 0"} and _rank_rng(single, 1) is None
    two = {"rng": {"torch": "rank 0"}, "rng_per_rank": [{"torch": "rank 0"}, {"torch": "rank 1"}]}
    assert _rank_rng(two, 1) == {"torch": "rank 1"} and _rank_rng(two, 3) is None


def test_a_stray_world_size_is_one_line(monkeypatch):
    """WORLD_SIZE left in the environment without torchrun's RANK / MASTER_ADDR: one line, not env://'s
    traceback."""
    import torch

    from tinygpt_cli import dist
    from tinygpt_cli.errors import TrainingError

    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrainingError, match="WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not"):
        dist.init(dist.from_environment(), torch.device("cpu"))


def test_several_processes_on_mps_is_one_line(monkeypatch):
    """A Mac's GPU under --nproc 2: gloo has no MPS tensors, and the ranks failed inside DDP with torch's error."""
    import torch

    from tinygpt_cli import dist
    from tinygpt_cli.errors import TrainingError

    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(TrainingError, match="MPS is one GPU that processes cannot share: train in one process "
                                            r"\(drop --nproc\), or pass --device cpu"):
        dist.init(dist.DistInfo(rank=1, local_rank=1, world_size=2), torch.device("mps"))
    assert not torch.distributed.is_initialized()
    # `tinygpt train --nproc 2` on a Mac says it once, before launching workers that would each fail alike
    from test_cli import assert_one_line_error, invoke

    from tinygpt_cli import launch
    from tinygpt_cli import training as train_module

    launched = []
    monkeypatch.setattr(launch, "launch", lambda nproc, argv: launched.append(nproc) or 0)
    monkeypatch.setattr(train_module, "resolve_device", lambda name: torch.device("mps"))
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert_one_line_error(invoke("train", "--nproc", "2"), "MPS is one GPU that processes cannot share")
    assert launched == []


def test_several_gpus_without_nccl_is_one_line(monkeypatch):
    """Windows builds of torch have no NCCL: each rank died in init_process_group with torch's traceback."""
    import torch

    from tinygpt_cli import dist
    from tinygpt_cli.errors import TrainingError

    monkeypatch.setenv("MASTER_ADDR", "localhost")
    monkeypatch.setenv("MASTER_PORT", "1")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(TrainingError, match=r"no NCCL, which training on several GPUs needs .*drop --nproc"):
        dist.init(dist.DistInfo(rank=0, local_rank=0, world_size=2), torch.device("cuda", 0))
    assert not torch.distributed.is_initialized()


def test_a_resume_on_fewer_processes_goes_on_with_the_log_window(with_shakespeare):
    """A checkpoint between log steps, written by 2 processes, resumed by 1 with twice the accumulation: the
    next log line is the mean of the whole window, as the uninterrupted run logs it (the saved sums are over 2
    ranks). Simulated in one process: the window of a 1-process checkpoint rewritten as 2 ranks wrote it."""
    settings = {"max_steps": 4, "eval_interval": 4, "log_interval": 2}
    straight = train(tiny_config(**settings), run_name="straight")
    train(tiny_config(**settings, max_tokens=3 * 4 * 32), run_name="cut")
    run = straight.run_dir.parent / "cut"
    state_file = run / "checkpoints" / "step_3" / "state.json"
    state = json.loads(state_file.read_text())
    assert state["log_window"]["steps"] == 1
    state["world_size"] = 2  # two ranks with the same losses: sums twice as large, per-rank RNG states
    state["log_window"]["loss_total"] *= 2
    state["rng_per_rank"] = [state["rng"], state["rng"]]
    state_file.write_text(json.dumps(state))
    train(tiny_config(**settings), run_name="cut", resume=True)
    got, expected = _train_losses(run), _train_losses(straight.run_dir)
    assert [step for step, _ in got] == [step for step, _ in expected] == [2, 4]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], abs=1e-6)


def test_nproc_under_torchrun_or_beside_a_stray_world_size(workspace, monkeypatch):
    """Audit: `torchrun --nproc-per-node 2 ... train --nproc 4` ran 2 processes without a word, and a WORLD_SIZE
    left in the environment made `--nproc 2` train one process. A worker is what torchrun starts (RANK,
    LOCAL_RANK and WORLD_SIZE); a --nproc that disagrees with it is refused, and a stray WORLD_SIZE launches."""
    from test_cli import assert_one_line_error, invoke

    from tinygpt_cli import launch

    launched = []
    monkeypatch.setattr(launch, "launch", lambda nproc, argv: launched.append(nproc) or 0)
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert invoke("train", "--nproc", "2").exit_code == 0 and launched == [2]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert_one_line_error(invoke("train", "--nproc", "4"), "--nproc 4, but torchrun started 2 processes on this "
                                                           "machine: drop --nproc")


_THREADS_AFTER_TRAINING = """
import os, sys
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config
from tinygpt_cli.training import train

train(tiny_config(max_steps=2, eval_interval=2, fsdp=True), run_name="threads")
names = sorted(open(f"/proc/self/task/{task}/comm").read().strip() for task in os.listdir("/proc/self/task"))
with open(os.path.join(os.environ["TINYGPT_HOME"], f"threads{os.environ['RANK']}.txt"), "w") as handle:
    handle.write(f"rank {os.environ['RANK']}: {names}")  # a file a rank: two printing to one pipe can join lines
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads a process's threads from /proc")
def test_training_leaves_no_backend_threads_behind(with_shakespeare, workspace, tmp_path):
    """When train() returns, the gloo group's threads have been joined. FSDP's device mesh (held by DTensor's
    caches for the life of the process) kept the group alive until interpreter teardown, where joining those
    threads could abort a finished rank ('terminate called without an active exception', seen once in CI)."""
    done = _torchrun_script(workspace, tmp_path, _THREADS_AFTER_TRAINING)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [(workspace / f"threads{rank}.txt").read_text() for rank in (0, 1)]
    assert all("gloo" not in line for line in reports), reports


_ONE_RANK_TERMED = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
from conftest import tiny_config
from tinygpt_cli.training import train

def on_event(event):
    if event.kind == "step" and event.step == 1 and os.environ["RANK"] == "0":
        os.kill(os.getpid(), signal.SIGTERM)  # this rank alone; the other stops by agreement

for lr in (1e-3, 2e-3):
    result = train(tiny_config(max_steps=4, eval_interval=4, log_interval=1, lr=lr), run_name=f"lr{lr}",
                   on_event=on_event)
    print(f"rank {os.environ['RANK']} returned {result.stopped}", flush=True)
"""


@pytest.mark.slow
def test_a_sigterm_to_one_rank_of_a_library_run_ends_every_rank(with_shakespeare, workspace, tmp_path):
    """Review: a train() stopped by a SIGTERM to one process of the group went on to the caller's handler on that
    rank only; the others, stopped by agreement, returned and started the sweep's next run, to wait on a peer that
    had gone. Every rank now learns the signal."""
    done = _torchrun_script(workspace, tmp_path, _ONE_RANK_TERMED)
    assert "returned" not in done.stdout, done.stdout + done.stderr[-2000:]
    assert done.returncode != 0
    assert not (workspace / "runs" / "lr0.002").exists()


_OWN_WORKSPACE_PER_RANK = """
import os, shutil, sys
home = os.path.join(sys.argv[1], f"node{os.environ['RANK']}")
if not os.path.isdir(home):
    shutil.copytree(os.path.join(sys.argv[1], "node0"), home)
os.environ["TINYGPT_HOME"] = home
exec(os.environ.get(f"TINYGPT_TEST_RANK{os.environ['RANK']}", ""))  # what differs on this rank's machine
sys.argv = ["tinygpt", *sys.argv[2:]]
from tinygpt_cli.cli import main
main()
"""


@pytest.mark.slow
def test_ranks_that_do_not_share_a_filesystem_end_together(with_shakespeare, workspace, tmp_path):
    """Two machines without a shared filesystem: only rank 0's sees the checkpoints. A run that stops (here by
    --max-tokens) at a step it has just evaluated and saved ends there on every rank, instead of a rank that sees
    no checkpoint starting a save of its own that the others never join."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    workspace.rename(nodes / "node0")
    code, _, err = _apart(tmp_path, "--name", "apart", "--max-steps", "6", "--max-tokens", str(4 * 2 * 4 * 32))
    assert code == 0, err[-3000:]
    assert ckpt.latest_step(nodes / "node0" / "runs" / "apart") == 4
    assert not (nodes / "node1" / "runs" / "apart").exists()


@pytest.mark.slow
def test_a_machine_without_the_tokenized_data_says_so(workspace, tmp_path):
    """With no data anywhere, rank 0 tokenizes the embedded corpus into its workspace; a rank on a machine that
    does not share it says what to do instead of failing an assert."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    workspace.rename(nodes / "node0")
    (nodes / "node1").mkdir()
    code, _, err = _apart(tmp_path, "--name", "apart", "--max-steps", "1")
    assert code != 0
    assert "on this machine (rank 0 tokenized its own): run tinygpt tokenize on every machine" in err
    assert "AssertionError" not in err


def _apart(tmp_path, *args, rank_code=None, timeout=600):
    """`tinygpt train <args>` on 2 ranks that each have their own workspace, nodes/node<rank> (node1 a copy of
    node0 unless the test made it), as on two machines without a shared filesystem; `rank_code` {rank: code} runs
    on that rank first (what differs on its machine). Returns (exit code, stdout, stderr); a group that hangs is
    killed, its workers included (they outlive torchrun), and the test fails."""
    script = tmp_path / "per_rank.py"
    script.write_text(_OWN_WORKSPACE_PER_RANK)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script),
               str(tmp_path / "nodes"), "train", *TINY_SETTINGS, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           **{f"TINYGPT_TEST_RANK{rank}": code for rank, code in (rank_code or {}).items()}}
    out_path, err_path = tmp_path / "apart.out", tmp_path / "apart.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:  # files: a pipe would wait for stray workers
        process = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            hung = True
        else:
            hung = False
    _kill_processes_running(script)
    if hung:
        pytest.fail("the ranks did not end together (one waits in a collective the other never joins): "
                    + err_path.read_text()[-2000:])
    return process.returncode, out_path.read_text(), err_path.read_text()


def _kill_processes_running(script: Path) -> None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(script).encode() in (entry / "cmdline").read_bytes():
                    os.kill(int(entry.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.mark.slow
def test_rank_0_tokenizes_while_another_machine_already_has_the_data(workspace, tmp_path, shakespeare_tokens):
    """Rank 0's workspace has no data, another machine's has: rank 0 tokenizes and waits for the others, who must
    wait with it (they skipped the barrier and hung in DDP's setup)."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    workspace.rename(nodes / "node0")
    shutil.copytree(shakespeare_tokens, nodes / "node1" / "data" / "shakespeare")
    code, _, err = _apart(tmp_path, "--name", "t", "--max-steps", "2")
    assert code == 0, err[-3000:]
    assert ckpt.latest_step(nodes / "node0" / "runs" / "t") == 2


@pytest.mark.slow
def test_a_run_folder_on_another_machine_does_not_refuse_a_new_run(with_shakespeare, workspace, tmp_path):
    """Only rank 0's runs/ holds the run's checkpoints: another machine's own old run of that name (never
    shared) must not stop a new one (rank 1 refused alone while rank 0 went on)."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    shutil.copytree(workspace, nodes / "node0")
    train(tiny_config(max_steps=2), run_name="again")  # in this test's workspace, which becomes rank 1's
    workspace.rename(nodes / "node1")
    code, _, err = _apart(tmp_path, "--name", "again", "--max-steps", "2")
    assert code == 0, err[-3000:]
    assert ckpt.latest_step(nodes / "node0" / "runs" / "again") == 2


@pytest.mark.slow
def test_batch_size_auto_is_the_same_on_machines_with_other_memory(with_shakespeare, workspace, tmp_path):
    """--batch-size auto on machines with different RAM: every rank takes the smallest micro-batch that fits
    anywhere (under FSDP a rank with more micro-steps than another hung in its all-gathers)."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    workspace.rename(nodes / "node0")
    # fits 2 of the 4 per rank, beside each of the 2 processes of the machine itself
    small = ("import tinygpt_cli.plan as plan; "
             "plan._host_memory = lambda: 100_000_000 + 2 * int(plan.HOST_RUNTIME_BYTES / plan.HOST_USABLE_SHARE)")
    code, out, err = _apart(tmp_path, "--name", "auto", "--max-steps", "2", "--fsdp", "--batch-size", "auto",
                            rank_code={1: small})
    assert code == 0, err[-3000:]
    assert "micro-batch 2 × 2 accumulation steps" in err + out
    state = json.loads((nodes / "node0" / "runs" / "auto" / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["batch"] == {"batch_size": 2, "grad_accum": 2}


@pytest.mark.slow
def test_a_machine_without_a_compiler_makes_every_rank_run_eagerly(with_shakespeare, workspace, tmp_path):
    """torch.compile fails on one machine only (no C++ compiler there): all ranks run eagerly (that rank alone
    wrapped the model in DDP again, a collective the others never joined)."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    workspace.rename(nodes / "node0")
    code, _, err = _apart(tmp_path, "--name", "eager", "--max-steps", "2", "--compile", "on",
                          rank_code={1: "os.environ['CXX'] = '/bin/false'"}, timeout=300)
    assert code == 0, err[-3000:]
    assert "torch.compile unavailable" in err
    assert ckpt.latest_step(nodes / "node0" / "runs" / "eager") == 2


@pytest.mark.slow
def test_a_stale_copy_of_the_run_folder_stops_a_resume_on_every_rank(with_shakespeare, workspace, tmp_path):
    """Resume on two machines where the second holds an older copy of the run: every rank says so, instead of
    rank 1 going on from step 2 while rank 0 goes on from step 4 (their collectives paired off wrongly: mixed
    gradients, then a lost connection)."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    settings = {"max_steps": 6, "eval_interval": 2}
    train(tiny_config(**settings, max_tokens=2 * 4 * 32), run_name="r")
    shutil.copytree(workspace, nodes / "node1")  # the copy, taken at step 2
    train(tiny_config(**settings, max_tokens=4 * 4 * 32), run_name="r", resume=True)
    workspace.rename(nodes / "node0")
    code, _, err = _apart(tmp_path, "--name", "r", "--resume", "--set", "train.max_tokens=0")
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, err[-3000:]
    assert "from different checkpoints (r step 4, r step 2, by rank)" in errors[0]
    assert ckpt.latest_step(nodes / "node0" / "runs" / "r") == 4


@pytest.mark.slow
def test_machines_started_with_other_settings_stop_together(with_shakespeare, workspace, tmp_path):
    """Another config on one machine (an edited config file, a flag left out): every rank says so before
    training, instead of one rank training a step more than the others and waiting for them forever."""
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    workspace.rename(nodes / "node0")
    code, _, err = _apart(tmp_path, "--name", "mixed", "--max-steps", "2",
                          rank_code={1: "sys.argv += ['--set', 'train.eval_interval=1']"})
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, err[-3000:]
    assert "other settings than rank 0 (train.eval_interval)" in errors[0]


def test_more_cpu_processes_than_cores_is_warned(workspace, monkeypatch):
    """`--nproc 8` on a 2-core machine without a GPU ran 8 processes on 2 cores, each slower than one alone, without
    a word. It still runs (gloo is how DDP is tried on a laptop) but says what to expect."""
    from test_cli import assert_one_line_error, invoke

    from tinygpt_cli import launch, sources

    launched = []
    monkeypatch.setattr(launch, "launch", lambda nproc, argv: launched.append(nproc) or 0)
    monkeypatch.setattr(sources, "available_cpus", lambda: 2)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    result = invoke("train", "--nproc", "4")
    assert result.exit_code == 0 and launched == [4]
    assert "--nproc 4 on 2 CPU cores" in " ".join(result.stderr.split())
    result = invoke("train", "--nproc", "2")
    assert result.exit_code == 0 and "CPU cores" not in result.stderr
    # QA: --nproc 1000 started workers for minutes, each loading torch, and left one hanging
    assert_one_line_error(invoke("train", "--nproc", "1000"), "--nproc 1000 is more processes than 2 CPU cores can "
                                                              "run: use at most 8")
    assert launched == [4, 2]
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert_one_line_error(invoke("train", "--nproc", "4"), "--nproc 4, but only 2 CUDA GPU(s) are visible: use "
                                                           "--nproc 2 (one process per GPU)")
    assert invoke("train", "--nproc", "2").exit_code == 0 and launched == [4, 2, 2]


def test_the_quiet_agent_puts_back_the_callers_logging_disable():
    """Library audit: the launcher's silence ended with logging.disable(NOTSET), dropping a caller's own level."""
    import logging

    from tinygpt_cli.launch import _quiet_agent

    logging.disable(logging.INFO)
    try:
        with _quiet_agent():
            assert logging.root.manager.disable == logging.CRITICAL
        assert logging.root.manager.disable == logging.INFO
    finally:
        logging.disable(logging.NOTSET)


@pytest.mark.slow
def test_auto_resume_on_machines_that_do_not_share_runs_is_one_line(with_shakespeare, workspace, tmp_path):
    """Audit: --auto-resume decides on each machine from its own runs/: rank 0 resumed, rank 1 (no copy of the run)
    started fresh, and DDP died with a 100-line traceback ("Rank 1 has 28 params, while rank 0 has ... 26"); the
    ranks' check of the checkpoint they hold was entered by the resuming ranks only."""
    train(tiny_config(max_steps=2, eval_interval=2), run_name="split")
    other = tmp_path / "machine1"  # rank 1's workspace: the same data, no runs
    (other / "data").mkdir(parents=True)
    shutil.copytree(workspace / "data" / "shakespeare", other / "data" / "shakespeare")
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(f'#!/bin/sh\n[ "$RANK" = 1 ] && export TINYGPT_HOME={other}\n'
                       f'exec {sys.executable} -m tinygpt_cli "$@"\n')
    wrapper.chmod(0o755)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--no-python",
               str(wrapper), "train", *TINY_SETTINGS, "--name", "split", "--auto-resume", "--max-steps", "4",
               "--data", "shakespeare"]
    env = {**os.environ, "TINYGPT_HOME": str(workspace), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: the ranks would resume from different checkpoints (split step 2, split: no checkpoint (a new " \
        "run), by rank)" in done.stderr
    assert "DDP expects same model" not in done.stderr  # (torchrun's own launcher adds its ChildFailedError)


@pytest.mark.slow
def test_a_task_scored_during_ddp_training_adds_up_the_ranks_shares(with_shakespeare, workspace, tmp_path):
    """train.eval_task under DDP: each rank scores its share of the examples (7: 4 and 3) and the sums are added,
    giving the figures of `tinygpt eval --task` on the checkpoint. FSDP, whose weights are whole only inside the
    step, refuses it in one line."""
    from test_evaluate import LAMBADA_ROWS

    from tinygpt_cli.evaluation import evaluate_task

    data = tmp_path / "lambada.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in LAMBADA_ROWS * 2), encoding="utf-8")
    task = ["--set", "train.eval_task=lambada_openai", "--set", f"train.eval_task_data={data}",
            "--set", "train.eval_task_limit=7"]
    _torchrun(workspace, "--name", "ddp", "--max-steps", "2", *task)
    run = workspace / "runs" / "ddp"
    [record] = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if json.loads(line)["kind"] == "lambada_openai"]
    expected = evaluate_task(run / "checkpoints" / "step_2", task="lambada_openai", task_data=data, limit=7,
                             record=False)
    assert record["examples"] == 7
    assert (record["accuracy"], record["perplexity"]) == pytest.approx((expected.accuracy, expected.perplexity))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "tinygpt_cli",
               "train", *TINY_SETTINGS, "--fsdp", "--name", "sharded", "--max-steps", "2", *task]
    env = {**os.environ, "TINYGPT_HOME": str(workspace), "OMP_NUM_THREADS": "1"}
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert "train.eval_task does not run under --fsdp" in refused.stderr
    assert not (workspace / "runs" / "sharded").exists()


def test_fsdp2_is_found_where_torch_2_4_keeps_it(monkeypatch):
    """Lowest-versions audit: `from torch.distributed.fsdp import fully_shard` exists from torch 2.6; pyproject
    allows 2.4, which keeps FSDP2 in torch.distributed._composable.fsdp, so --fsdp failed there on an import."""
    import types

    from tinygpt_cli.training import fsdp2_fully_shard

    assert callable(fsdp2_fully_shard())
    old_home = types.ModuleType("torch.distributed._composable.fsdp")  # torch 2.4's layout
    old_home.fully_shard = lambda module: module
    monkeypatch.setitem(sys.modules, "torch.distributed.fsdp", types.ModuleType("torch.distributed.fsdp"))
    monkeypatch.setitem(sys.modules, "torch.distributed._composable.fsdp", old_home)
    assert fsdp2_fully_shard() is old_home.fully_shard


def test_a_stop_while_joining_the_group_ends_the_rank_at_once(tmp_path):
    """QA: Ctrl-C (or SIGTERM) while one rank was still starting left the other blocked in gloo's connect, in C++,
    where the handlers tinygpt had set (Python's) never ran: the launcher waited its whole grace, ten minutes, then
    exited without a word. While it joins the group a stop signal now ends the rank at once."""
    import socket

    with socket.socket() as probe:  # a free port: rank 1 never comes, so rank 0 waits in the join
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = (
        "import signal, sys, torch\n"
        "from tinygpt_cli import dist\n"
        "signal.signal(signal.SIGTERM, lambda *a: sys.exit(99))  # as the CLI's handler, which cannot run there\n"
        "print('joining', flush=True)\n"
        "dist.init(dist.from_environment(), torch.device('cpu'))\n"
    )
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "joining"
        time.sleep(3)  # in the join: torch imported, the store listening
        assert process.poll() is None
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == -signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_handlers_come_back_after_the_join():
    from tinygpt_cli.dist import signals_end_the_process

    def mine(signum, frame):
        return None

    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, mine)
    try:
        with signals_end_the_process():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
