"""Every config in examples/ resolves, and the CPU ones train for a couple of steps as they are."""

from pathlib import Path

import pytest

from tinygpt_cli.config import resolve_config
from tinygpt_cli.training import train

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CPU_EXAMPLES = {"micro_cpu.yaml", "shakespeare_tiny.yaml"}  # trained here for 2 steps
GPU_EXAMPLES = {"gpt2_124m_owt_1gpu.yaml", "gpt2_124m_owt_8gpu.yaml", "finetune_from_gpt2.yaml"}
# 2 steps of a 2-layer, 32-wide model: the example's data, schedule and optimiser settings as they are
SHORT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32", "train.max_steps=2",
         "train.eval_interval=2", "train.eval_batches=1", "train.batch_size=2", "train.device=cpu"]


def test_every_example_is_known_and_resolves():
    found = {path.name for path in EXAMPLES.glob("*.yaml")}
    assert found == CPU_EXAMPLES | GPU_EXAMPLES, "classify new examples as CPU (trained here) or GPU"
    for name in sorted(found):
        cfg = resolve_config(config_file=EXAMPLES / name)
        text = (EXAMPLES / name).read_text()
        assert text.startswith("#"), f"{name} should open with a comment saying what it is and how to run it"
        assert "tinygpt" in text
        assert cfg.size in ("micro", "tiny", "small")


def test_gpu_examples_keep_the_global_batch():
    one = resolve_config(config_file=EXAMPLES / "gpt2_124m_owt_1gpu.yaml").train
    eight = resolve_config(config_file=EXAMPLES / "gpt2_124m_owt_8gpu.yaml").train
    assert one.batch_size * one.grad_accum == 8 * eight.batch_size * eight.grad_accum == 512
    assert "torchrun" in (EXAMPLES / "gpt2_124m_owt_8gpu.yaml").read_text()


@pytest.mark.parametrize("name", sorted(CPU_EXAMPLES))
def test_cpu_example_trains(with_shakespeare, name):
    cfg = resolve_config(config_file=EXAMPLES / name, overrides=SHORT)
    result = train(cfg, run_name=Path(name).stem)
    assert result.steps == 2 and result.stopped == "completed"
    assert result.final_val_loss is not None and (result.run_dir / "report.md").is_file()


def test_the_docs_example_paths_work_from_any_folder(tmp_path, monkeypatch):
    """Packaging QA: the docs' `--config examples/NAME.yaml` needs a clone; a pipx install has no examples/ folder,
    so the shipped examples (the wheel's tinygpt_cli.examples, examples/ here) answer where no such file is."""
    from tinygpt_cli.config import ConfigError, config_path, shipped_examples

    assert {name: path.resolve() for name, path in shipped_examples().items()} == {
        path.name: path.resolve() for path in EXAMPLES.glob("*.yaml")}
    monkeypatch.chdir(tmp_path)
    for spec in ("examples/micro_cpu.yaml", "micro_cpu.yaml", "micro_cpu"):
        assert config_path(Path(spec)).resolve() == (EXAMPLES / "micro_cpu.yaml").resolve()
        assert resolve_config(config_file=Path(spec)).size == "micro"
    (tmp_path / "examples").mkdir()
    (tmp_path / "examples" / "micro_cpu.yaml").write_text("size: tiny\n")  # a file of the user's own wins
    assert resolve_config(config_file=Path("examples/micro_cpu.yaml")).size == "tiny"
    for missing in ("elsewhere/micro_cpu.yaml", str(tmp_path / "micro_cpu.yaml"), "examples/nope.yaml"):
        with pytest.raises(ConfigError, match=r"does not exist: check the --config path \(the examples that come "
                                              r"with tinygpt: examples/finetune_from_gpt2.yaml, "):
            resolve_config(config_file=Path(missing))
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+: and the wheel installs them as that package
    setuptools = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    assert setuptools["package-dir"]["tinygpt_cli.examples"] == "examples"
    assert "tinygpt_cli.examples" in setuptools["packages"] and setuptools["package-data"]["tinygpt_cli.examples"]
