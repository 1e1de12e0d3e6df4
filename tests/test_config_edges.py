"""Configuration edges found by an audit: each was accepted silently, or ended in a traceback, or lost files."""


import pytest
from typer.testing import CliRunner

from conftest import TINY_SETTINGS, assert_one_line_error, tiny_config
from tinygpt_cli.cli import app
from tinygpt_cli.config import resolve_config
from tinygpt_cli.errors import ConfigError
from tinygpt_cli.training import train

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    ("text", "key", "line"),
    [
        ("train:\n  lr: 0.01\n  lr: 0.02\n", "'lr'", 3),  # the second one won without a word
        ("train:\n  lr: 0.01\ntrain:\n  max_steps: 5\n", "'train'", 3),  # and dropped every key of the first
    ],
)
def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path, text, key, line):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"c\.yaml repeats the key {key} \(line {line}\): keep one"):
        resolve_config(config_file=path)


def test_yaml_anchors_and_merges_still_load(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: &m {n_layer: 2}\nsample:\n  <<: {seed: 3, top_k: 5}\n  seed: 4\n")
    cfg = resolve_config(config_file=path)  # a key beside a merge overrides the merged one: not a repeat
    assert cfg.model.n_layer == 2 and cfg.sample.seed == 4 and cfg.sample.top_k == 5


def test_a_folder_as_config_is_named_a_folder(tmp_path):
    with pytest.raises(ConfigError, match="is a folder: pass the YAML file itself"):
        resolve_config(config_file=tmp_path)


def test_train_into_a_folder_with_files_but_no_checkpoint_is_refused_and_keeps_them(workspace):
    """A run refused in setup removed config.yaml, metrics.jsonl, report.md and loss.png of the folder it was
    named after (an earlier run whose checkpoints were deleted), as if they were its own."""
    folder = workspace / "runs" / "old"
    folder.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "report.md"):
        (folder / name).write_text(f"earlier {name}\n")
    result = invoke("train", *TINY_SETTINGS, "--max-steps", "1", "--batch-size", "100000000", "--name", "old")
    assert_one_line_error(result, "holds an earlier run's results (report.md) but no checkpoint to resume: pick "
                                  "another --name")
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "metrics.jsonl", "report.md"]
    assert (folder / "report.md").read_text() == "earlier report.md\n"


@pytest.mark.parametrize("shape", [["model.vocab_size=1e12"], ["model.n_layer=8000", "model.n_embd=256"]])
def test_a_model_too_large_for_the_ram_is_refused_before_it_is_built(with_shakespeare, workspace, monkeypatch,
                                                                     shape):
    """Audit: model.vocab_size=1e12 ended in the allocator's RuntimeError traceback; a deep model whose layers
    each fit (8000 × 256 wide, ~25 GB) would have been built layer by layer into the OOM killer."""
    from tinygpt_cli import training as train_module

    def never(cfg):
        raise AssertionError("the model was built")

    monkeypatch.setattr(train_module, "GPT", never)
    overrides = [arg for setting in shape for arg in ("--set", setting)]
    result = invoke("train", *TINY_SETTINGS, "--max-steps", "1", "--device", "cpu", *overrides, "--name", "huge")
    assert_one_line_error(result, "not even a micro-batch of 1 × 32 tokens fits in this machine's")
    assert "AdamW state alone take" in result.stderr and "tinygpt plan" in result.stderr
    assert not (workspace / "runs" / "huge").exists()


@pytest.mark.parametrize("refusal", ["can't allocate memory", "not enough memory"])  # Linux and macOS; Windows
def test_an_allocation_the_machine_refuses_is_one_line(with_shakespeare, workspace, monkeypatch, refusal):
    """What no estimate foresaw (another process took the RAM): the allocator's RuntimeError was a traceback (and
    still was on Windows, whose allocator words it otherwise: audit)."""
    from tinygpt_cli import training as train_module

    def refused(*args, **kwargs):
        raise RuntimeError(f"[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: {refusal}: you "
                           "tried to allocate 128000000000000 bytes")

    monkeypatch.setattr(train_module, "make_optimizer", refused)
    result = invoke("train", *TINY_SETTINGS, "--max-steps", "1", "--device", "cpu", "--name", "refused")
    assert_one_line_error(result, "out of memory: an allocation did not fit in this machine's memory: the model "
                                  "shape")
    assert not (workspace / "runs" / "refused").exists()
    from tinygpt_cli import data  # advice for the command that ran: a tokenize has no model shape (review)

    monkeypatch.setattr(data, "tokenize", lambda *args, **kwargs: (_ for _ in ()).throw(MemoryError()))
    assert_one_line_error(invoke("tokenize"), "out of memory: an allocation did not fit in this machine's memory: "
                                              "close what else uses the memory")


def test_nproc_checks_the_config_before_launching(workspace, monkeypatch):
    """A bad value was found by each of the N launched processes (each importing torch) instead of once."""
    from tinygpt_cli import launch

    launched = []
    monkeypatch.setattr(launch, "launch", lambda nproc, argv: launched.append(nproc) or 0)
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert_one_line_error(invoke("train", "--nproc", "2", "--set", "train.lr=fast"), "train.lr must be float")
    assert_one_line_error(invoke("train", "--nproc", "2", "--lr", "nan"), "train.lr must be a finite number")
    assert launched == []
    assert invoke("train", "--nproc", "2").exit_code == 0 and launched == [2]


def test_a_config_of_the_users_in_the_run_folder_is_never_removed(with_shakespeare, workspace):
    """`--config runs/exp/config.yaml --name exp`: a start refused in setup removed config.yaml as its own."""
    folder = workspace / "runs" / "exp"
    folder.mkdir(parents=True)
    mine = "# my settings\ntrain:\n  max_steps: 1\n"
    (folder / "config.yaml").write_text(mine)
    result = invoke("train", *TINY_SETTINGS, "--config", str(folder / "config.yaml"), "--batch-size", "100000000",
                    "--name", "exp")
    assert_one_line_error(result, "GiB of RAM")
    assert (folder / "config.yaml").read_text() == mine


class Boom(Exception):
    """An error of the caller's, mid-run."""


def test_a_start_killed_during_its_first_checkpoint_is_replaced_by_the_same_command(with_shakespeare, workspace):
    """Chaos QA: a SIGKILL between the first evaluation's loss plot and its checkpoint left loss.png, and the same
    command, --resume and `runs show`'s advice each refused the name ('an earlier run's results (loss.png)')."""
    folder = workspace / "runs" / "w"
    (folder / "checkpoints" / ".tmp-step_4-999").mkdir(parents=True)
    (folder / "config.yaml").write_text("leftover\n")
    (folder / "metrics.jsonl").write_text('{"step": 2, "loss": 10.9}\n{"kind": "val", "step": 4, "loss": 10.8}\n')
    (folder / "loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert train(tiny_config(max_steps=2, eval_interval=1000), run_name="w").steps == 2
    assert (folder / "checkpoints" / "latest").exists() and (folder / "report.md").exists()
    assert not (folder / "checkpoints" / ".tmp-step_4-999").exists()


@pytest.mark.parametrize("logged", ["", '{"step": 10, "loss": 5.1}\n'])
def test_a_failed_start_after_a_killed_one_leaves_nothing_behind(with_shakespeare, workspace, logged):
    """A start killed before its first checkpoint (the OOM killer, a preemption) left config.yaml and metrics.jsonl;
    the next start replaces them (it was refused once they held a logged step), and if it then fails before its
    first checkpoint its own files must go, else the start after it is refused as 'an earlier run's results'."""
    folder = workspace / "runs" / "again"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("leftover\n")
    (folder / "metrics.jsonl").write_text(logged)

    def fail_on_step(event):
        if event.kind == "step":
            raise Boom

    with pytest.raises(Boom):
        train(tiny_config(max_steps=50, eval_interval=1000, log_interval=1), run_name="again", on_event=fail_on_step)
    assert not folder.exists(), sorted(p.name for p in folder.iterdir())
    assert train(tiny_config(max_steps=2, eval_interval=1000), run_name="again").steps == 2


def test_an_alias_bomb_in_a_config_is_a_short_error(workspace):
    """Security QA: eight lines of YAML aliases that expand to 9^8 items as train.lr took 1.5 GB and printed a
    200 MB "one-line" error (the value's whole repr); the message now quotes it cut short."""
    levels = ['    a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        levels.append(f"    {name}: &{name} [{','.join([f'*{prev}'] * 9)}]")
    (workspace / "bomb.yaml").write_text("train:\n  lr:\n" + "\n".join(levels) + "\n")
    result = invoke("plan", "--config", str(workspace / "bomb.yaml"))
    assert_one_line_error(result, "train.lr must be float (got {'a': [")
    assert len(result.stderr) < 1000


@pytest.mark.parametrize(("env", "name"), [({"WORLD_SIZE": ""}, "WORLD_SIZE"), ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
                                           ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK"),
                                           ({"WORLD_SIZE": "²"}, "WORLD_SIZE")])  # review: a digit to isdigit
def test_a_garbled_torchrun_variable_is_a_one_line_error(workspace, monkeypatch, env, name):
    """Security QA: a job script's leftover `export WORLD_SIZE=` made `train` print a ValueError traceback."""
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert_one_line_error(invoke("train", "--size", "micro", "--max-steps", "1"),
                          f"{name}={env[name]!r} in the environment is not a whole number: unset it (`unset {name}`)")
