"""The Python API (`from tinygpt_cli import ...`): what a notebook imports and calls, as the package's docstring
shows it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY_OVERRIDES

SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_public_names_are_the_functions_whatever_was_imported_before():
    """Audit: `tinygpt_cli.train` was the function on first use and the module `tinygpt_cli.train` once anything
    had imported that (`from tinygpt_cli import evaluate` was always the module). The modules are now
    `training` and `evaluation`: checked in fresh processes, both orders; `import tinygpt_cli` imports no torch."""
    script = """
import inspect, sys
import tinygpt_cli
assert "torch" not in sys.modules
if sys.argv[1] == "modules first":
    import tinygpt_cli.training, tinygpt_cli.evaluation
from tinygpt_cli import evaluate, export_model, generate, sample_text, tokenize, train
import tinygpt_cli.training as training
from tinygpt_cli import evaluation
for f in (train, evaluate, export_model, generate, sample_text, tokenize, tinygpt_cli.train, tinygpt_cli.evaluate):
    assert inspect.isfunction(f), f
assert train is training.train and evaluate is evaluation.evaluate and inspect.ismodule(training)
assert {"train", "evaluate", "sample_text", "resolve_config"} <= set(dir(tinygpt_cli))
"""
    for order in ("modules first", "names first"):
        done = subprocess.run([sys.executable, "-c", script, order], capture_output=True, text=True,
                              env={"PYTHONPATH": SRC}, timeout=120)
        assert done.returncode == 0, (order, done.stderr[-2000:])


def test_the_notebook_example_runs(with_shakespeare, workspace):
    """The package docstring's example, on the tiny model."""
    from tinygpt_cli import evaluate, export_model, load_checkpoint, resolve_config, sample_text, train

    overrides = [*TINY_OVERRIDES, "train.max_steps=2"]
    result = train(resolve_config(size="micro", overrides=overrides), run_name="notebook")
    assert result.steps == 2
    model = load_checkpoint("notebook").model
    text = sample_text(model, "ROMEO:", 5, seed=1).samples[0].text
    assert isinstance(text, str) and text
    assert evaluate("notebook", tokens=64).loss > 0
    assert export_model("notebook", out=workspace / "hf").path == workspace / "hf"


def test_natural_arguments_work_or_are_one_clear_error(with_shakespeare, workspace, tmp_path):
    """Audit: arguments a notebook passes naturally failed with bare Python errors or did something else:
    a Path to tokenize, a str config file, one --set as a str, a str stop (split into its characters), text to
    generate, a seed past 64 bits, a dict for a config, a device this machine lacks."""
    import pytest
    import torch

    from tinygpt_cli import TinyGPTError, generate, load_checkpoint, resolve_config, sample_text, tokenize, train

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("Some text to tokenize. " * 200)
    assert tokenize(corpus, name="frompath").name == "frompath"
    with pytest.raises(TinyGPTError, match="one source"):
        tokenize([corpus / "a.txt"], name="fromlist")
    config = tmp_path / "c.yaml"
    config.write_text("train:\n  max_steps: 7\n")
    assert resolve_config(config_file=str(config)).train.max_steps == 7
    assert resolve_config(overrides="train.max_steps=5").train.max_steps == 5
    with pytest.raises(TinyGPTError, match="takes a RunConfig"):
        train({"size": "micro"})
    overrides = [*TINY_OVERRIDES, "train.max_steps=1"]
    train(resolve_config(size="micro", overrides=overrides), run_name="api")
    model = load_checkpoint("api").model
    whole = sample_text(model, "ROMEO:", 8, temperature=0, stop=["\n\n"]).samples[0]
    assert sample_text(model, "ROMEO:", 8, temperature=0, stop="\n\n").samples[0] == whole
    with pytest.raises(TinyGPTError, match="for text, sample_text"):
        next(generate(model, "ROMEO:", 3))
    with pytest.raises(TinyGPTError, match="--seed"):
        sample_text(model, "ROMEO:", 3, seed=2**70)
    with pytest.raises(TinyGPTError, match="lookahead needs"):
        sample_text(model, "ROMEO:", 3, lookahead=True, num_samples=2)
    if not torch.cuda.is_available():
        with pytest.raises(TinyGPTError, match="cannot move"):
            load_checkpoint("api", device="cuda")


def test_a_resume_from_python_goes_on_with_the_runs_own_config(with_shakespeare, tmp_path):
    """Audit: `train(cfg, resume=True)` with a cfg from a preset silently trained on with the preset's batch and
    warmup (the CLI builds a resume's config from the run's). With no cfg, a resume takes the run's own."""
    from tinygpt_cli import TinyGPTError, resolve_config, train
    from tinygpt_cli.training import StopFlag

    stop = StopFlag()

    def on_event(event):
        if event.kind == "step" and event.step >= 2:
            stop.reason = "interrupted"

    overrides = [*TINY_OVERRIDES, "train.max_steps=4"]
    first = train(resolve_config(size="micro", overrides=overrides), run_name="r", on_event=on_event, stop=stop)
    assert first.stopped == "interrupted" and first.steps == 2
    elsewhere = tmp_path / "elsewhere" / "other"  # review: by path, it resumed runs/other (or nothing)
    shutil.copytree(first.run_dir, elsewhere)
    assert train(run_name=str(elsewhere), resume=True).run_dir.resolve() == elsewhere.resolve()
    events = []
    resumed = train(run_name="r", resume=True, on_event=events.append)
    assert resumed.steps == 4 and resumed.stopped == "completed"
    assert not any("sequences per step" in (event.message or "") for event in events)  # the run's own batch
    with pytest.raises(TinyGPTError, match="resume=True"):
        train()


def test_train_leaves_the_callers_random_streams_and_tf32_as_they_were(with_shakespeare):
    """Audit: train reseeded torch's global random stream (and a resume numpy's and Python's), and turned TF32 on
    for the rest of the process: a notebook's own seeding and fp32 precision were changed under it."""
    import random

    import numpy as np
    import torch

    from tinygpt_cli import resolve_config, train

    def draws():
        return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]

    def seeded():
        torch.manual_seed(5)
        np.random.seed(5)
        random.seed(5)

    seeded()
    expected = draws()
    overrides = [*TINY_OVERRIDES, "train.max_steps=2"]
    for resume in (False, True):
        seeded()
        cfg = resolve_config(size="micro", overrides=[*overrides, f"train.max_steps={3 if resume else 2}"])
        train(cfg, run_name="r", resume=resume)
        assert draws() == expected


def test_loading_evaluating_exporting_and_planning_leave_the_callers_random_stream(with_shakespeare, workspace):
    """Library audit: load_checkpoint (and evaluate, export_model, sample's loads, which call it) built a randomly
    initialised GPT before its weights replaced it, which moved a notebook's seeded torch draws; plan's --measure
    reseeded the stream and kept the 412 MB CPU logits buffer."""
    import torch

    from tinygpt_cli import evaluate, export_model, load_checkpoint, resolve_config, train
    from tinygpt_cli import model as model_module
    from tinygpt_cli.plan import plan

    cfg = resolve_config(size="micro", overrides=[*TINY_OVERRIDES, "train.max_steps=1"])
    train(cfg, run_name="r")
    torch.manual_seed(5)
    expected = torch.rand(3).tolist()
    exported = export_model("r", "hf", workspace / "hf").path
    for call in (lambda: load_checkpoint("r"), lambda: evaluate("r", tokens=64, record=False),
                 lambda: evaluate(str(exported), tokens=64),
                 lambda: export_model("r", "hf", workspace / "hf2"), lambda: plan(cfg, do_measure=True)):
        torch.manual_seed(5)
        call()
        assert torch.rand(3).tolist() == expected
    assert not model_module._CPU_WORKSPACE.by_shape


def test_wrong_argument_types_are_one_clear_error(with_shakespeare, workspace):
    """Library audit: a run's name where a model goes gave "AttributeError: 'str' object has no attribute
    'config'", a 2-D tensor prompt "Boolean value of Tensor with more than one value is ambiguous", a float id was
    taken, `train(stop=threading.Event())` failed after the whole setup, and `run_config_of("runs/r")` (the
    docstring's recipe with a string) raised a TypeError."""
    import threading

    import torch

    from tinygpt_cli import TinyGPTError, generate, load_checkpoint, resolve_config, sample_text, tokenize, train
    from tinygpt_cli.evaluation import evaluate, evaluate_task
    from tinygpt_cli.training import run_config_of

    cfg = resolve_config(size="micro", overrides=[*TINY_OVERRIDES, "train.max_steps=1"])
    train(cfg, run_name="r")
    model = load_checkpoint("r").model
    for call, fragment in (
            (lambda: sample_text("r", "Hi", 2), r"sample_text takes a tinygpt GPT model "
                                               r"\(load_checkpoint\(RUN\)\.model\), not a str"),
            (lambda: list(generate(load_checkpoint("r"), [1], 2)), "generate takes a tinygpt GPT model .*not a "
                                                                   "LoadedCheckpoint"),
            (lambda: sample_text(model, None, 2), "sample_text takes the prompt as text, not a NoneType"),
            (lambda: list(generate(model, torch.tensor([[1, 2]]), 2)), r"1-D, not 2-D \(for a \(1, N\) batch of one, "
                                                                       r"pass ids\[0\]\)"),
            (lambda: list(generate(model, torch.tensor([[1], [2]]), 2)), "1-D, not 2-D"),
            (lambda: list(generate(model, [True, 2], 2)), "not True/False"),
            (lambda: sample_text(torch.nn.Linear(1, 1), "Hi", 2), "takes a tinygpt GPT model"),
            (lambda: sample_text(torch.nn.parallel.DistributedDataParallel.__new__(
                torch.nn.parallel.DistributedDataParallel), "Hi", 2), "takes a tinygpt GPT model"),
            (lambda: list(generate(model, [1.5], 2)), "the prompt's token ids must be whole numbers"),
            (lambda: train(cfg, run_name="s", stop=threading.Event()), "stop takes a StopFlag"),
            # API QA: these were a TypeError from deep inside, a seed of 1.5 was recorded, and a device torch
            # does not know listed two dozen kinds
            (lambda: sample_text(model, "Hi", 2.0), r"--max-new-tokens must be a whole number \(got 2.0\)"),
            (lambda: sample_text(model, "Hi", "5"), r"--max-new-tokens must be a whole number \(got '5'\)"),
            (lambda: tokenize(fraction="0.5"), r"--fraction must be a number \(got '0.5'\)"),
            (lambda: tokenize(seed=1.5, name="x"), "--seed must be a whole number 0 to"),
            (lambda: load_checkpoint("r", device="tpu"), "unknown device 'tpu': use auto, cpu, cuda, cuda:N or mps"),
            (lambda: evaluate("r", tokens="256"), r"--tokens must be a whole number \(got '256'\)"),
            (lambda: evaluate_task("r", limit=2.5), r"--limit must be a whole number \(got 2.5\)"),
            (lambda: train(resolve_config(size="micro", overrides=["train.max_steps=2"]), run_name="r", resume=True),
             r"cannot change on resume \(model.n_layer 2 → 4, .*\): keep the run's model settings"),
    ):
        with pytest.raises(TinyGPTError, match=fragment):
            call()
    assert not (workspace / "runs" / "s").exists() and not (workspace / "data" / "x").exists()
    assert next(load_checkpoint("r", device="auto").model.parameters()).device.type == "cpu"
    assert next(load_checkpoint("r", device=" CPU:00").model.parameters()).device.type == "cpu"  # reviews
    with pytest.raises(TinyGPTError, match="unknown device 'cpu:٣'"):
        load_checkpoint("r", device="cpu:٣")
    import numpy as np  # review: numpy's numbers passed the checks, then failed in JSON, the seed, the hash

    assert tokenize(seed=np.int64(3), fraction=np.float32(0.5), name="np").meta["seed"] == 3
    assert evaluate("r", tokens=np.int64(64), record=False).tokens >= 64
    assert sample_text(model, "Hi", np.int64(3), seed=np.int64(1), top_k=np.int64(5)).samples[0].text == \
        sample_text(model, "Hi", 3, seed=1, top_k=5).samples[0].text
    train(cfg, run_name="s")  # a refused call holds nothing a later one needs
    assert list(generate(model, torch.tensor([1, 2]), 2, seed=0)) == list(generate(model, [1, 2], 2, seed=0))
    assert run_config_of(str(workspace / "runs" / "r")) == run_config_of(workspace / "runs" / "r")
    # QA: a run's name (as every other call takes) was "r has no config.yaml: it is not a tinygpt run folder", and
    # the function train's docstring points at was not in the package's names
    import tinygpt_cli

    assert tinygpt_cli.run_config_of("r") == run_config_of(workspace / "runs" / "r")
    with pytest.raises(TinyGPTError, match=r"no run or checkpoint at r2 \(did you mean r\?\)"):
        run_config_of("r2")
    for flags, fragment in (({"lr": 1e-3}, r"flags take dotted keys, section first .* not 'lr'"),  # a ValueError
                            ({"train.lrr": 1}, "unknown config key train.lrr in flags: "),  # it said "in --lrr"
                            ({"train.lr": "fast"}, "train.lr must be float")):
        with pytest.raises(TinyGPTError, match=fragment):
            resolve_config(flags=flags)


def test_train_takes_a_caller_on_torchs_newer_precision_switches(with_shakespeare, workspace):
    """Review: reading the legacy TF32 switch after a caller set torch's newer `fp32_precision` raises ("mix of
    the legacy and new APIs"), which made train fail on any device. A fresh process, as the switch is global."""
    import os

    import torch

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("this torch has no fp32_precision switches")
    overrides = [*TINY_OVERRIDES, "train.max_steps=1"]
    script = f"""
import torch
from tinygpt_cli import resolve_config, train
torch.backends.cuda.matmul.fp32_precision = "tf32"
train(resolve_config(size="micro", overrides={overrides!r}), run_name="p")
assert torch.backends.cuda.matmul.fp32_precision == "tf32"
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SRC, "TINYGPT_HOME": str(workspace)})
    assert done.returncode == 0, done.stderr[-2000:]


def test_dtypes_are_taken_as_torch_names_them_too(with_shakespeare):
    """Audit: `load_model(..., dtype=torch.float16)` or "float16" was refused ("--dtype must be one of auto, fp32,
    bf16, fp16"): a notebook names dtypes as torch does."""
    import pytest
    import torch

    from tinygpt_cli import TinyGPTError, evaluate, resolve_config, train
    from tinygpt_cli.sample import load_model

    overrides = [*TINY_OVERRIDES, "train.max_steps=1"]
    train(resolve_config(size="micro", overrides=overrides), run_name="d")
    for given, want in ((torch.bfloat16, torch.bfloat16), ("float32", torch.float32), ("bf16", torch.bfloat16)):
        assert next(load_model("d", "cpu", given).model.parameters()).dtype == want
    assert evaluate("d", tokens=64, dtype=torch.float32, record=False).dtype == "float32"
    with pytest.raises(TinyGPTError, match="--dtype must be one of auto, fp32, bf16, fp16"):
        load_model("d", "cpu", "fp8")
