import pytest
import yaml

from tinygpt_cli.config import MIN_LR_DIVISOR, PRESETS, config_from_dict, config_to_dict, dump_yaml, resolve_config
from tinygpt_cli.errors import ConfigError


def test_presets_have_gpt2_shapes():
    shapes = {name: PRESETS[name]["model"] for name in PRESETS}
    assert shapes["micro"] == {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128}
    assert (shapes["small"]["n_layer"], shapes["small"]["n_embd"], shapes["small"]["n_head"]) == (12, 768, 12)
    assert (shapes["medium"]["n_layer"], shapes["medium"]["n_embd"]) == (24, 1024)
    assert (shapes["large"]["n_layer"], shapes["large"]["n_embd"]) == (36, 1280)
    assert (shapes["xl"]["n_layer"], shapes["xl"]["n_embd"], shapes["xl"]["n_head"]) == (48, 1600, 25)
    for name in PRESETS:
        cfg = resolve_config(size=name)
        assert cfg.model.vocab_size == 50304
        assert cfg.size == name


def test_precedence_preset_file_set_flags(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"size": "tiny", "train": {"lr": 0.01, "max_steps": 7}, "model": {"dropout": 0.1}}))
    cfg = resolve_config(config_file=path)
    assert cfg.size == "tiny" and cfg.model.n_embd == 384
    assert cfg.train.lr == 0.01 and cfg.train.max_steps == 7 and cfg.model.dropout == 0.1
    cfg = resolve_config(config_file=path, overrides=["train.lr=3e-4", "train.max_steps=9"])
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 9
    cfg = resolve_config(size="micro", config_file=path, overrides=["train.max_steps=9"],
                         flags={"train.max_steps": 11, "train.lr": None})
    assert cfg.size == "micro" and cfg.model.n_embd == 128 and cfg.train.max_steps == 11


def test_set_values_are_type_checked():
    cfg = resolve_config(overrides=["train.lr=1e-3", "model.bias=false", "train.max_steps=2_000", "data.dataset=123"])
    assert cfg.train.lr == 1e-3 and cfg.model.bias is False
    assert cfg.train.max_steps == 2000 and cfg.data.dataset == "123"
    with pytest.raises(ConfigError, match=r"train\.max_steps must be int"):
        resolve_config(overrides=["train.max_steps=lots"])
    with pytest.raises(ConfigError, match=r"train\.lr must be float"):
        resolve_config(overrides=["train.lr=fast"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.learning_rate=1", r"unknown config key train\.learning_rate"),
        ("optim.lr=1", "unknown config section 'optim'"),
        ("train.lr", "not section.key=value"),
        ("lr=1", "needs a section and a key"),
        ("model.n_embd=130", "divisible by model.n_head"),
        ("train.device=tpu", "train.device must be one of"),
        # a traceback from AdamW or NumPy, or a NaN that passed every check (found by an audit)
        ("train.beta1=2", r"train\.beta1 must be in \[0, 1\)"),
        ("train.beta2=-0.5", r"train\.beta2 must be in \[0, 1\)"),
        ("train.seed=-1", r"train\.seed must be 0 to 4611686018427387904"),
        ("train.seed=18446744073709551616", r"train\.seed must be 0 to"),  # a traceback from torch (audit)
        ("sample.seed=-5", r"sample\.seed must be 0 to"),
        ("train.weight_decay=.nan", r"train\.weight_decay must be a finite number"),
        ("train.grad_clip=.nan", r"train\.grad_clip must be a finite number"),
        ("train.max_minutes=.inf", r"train\.max_minutes must be a finite number"),
        # saved into the run's config.yaml, then every `tinygpt generate` of the run failed naming --temperature
        ("sample.temperature=.nan", r"sample\.temperature must be 0 \(greedy\) to 1e\+06 \(got nan\)"),
        ("sample.temperature=.inf", r"sample\.temperature must be 0 \(greedy\) to 1e\+06"),
        ("sample.temperature=2e6", r"sample\.temperature must be 0 \(greedy\) to 1e\+06"),
        ("sample.repetition_penalty=.inf", r"sample\.repetition_penalty must be a finite number more than 0"),
        # drawn up front: 1e9 filled the RAM before the first step (the OOM killer, or a MemoryError traceback)
        ("train.eval_batches=1e9", r"train\.eval_batches must be at most 100,000"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(overrides=[override])


def test_unknown_key_in_yaml_names_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 0.001\n  warmup: 10\n")
    with pytest.raises(ConfigError, match=r"unknown config key train\.warmup in .*c\.yaml"):
        resolve_config(config_file=path)


def test_unknown_preset_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        resolve_config(size="huge")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(config_file=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_config(config_file=bad)


def test_round_trip_through_yaml():
    cfg = resolve_config(size="tiny", overrides=["train.lr=5e-4"])
    assert config_from_dict(yaml.safe_load(dump_yaml(cfg))) == cfg
    assert config_to_dict(cfg)["train"]["lr"] == 5e-4


def test_resume_base_keeps_shape():
    base = resolve_config(size="tiny")
    cfg = resolve_config(overrides=["train.max_steps=42"], base=base)
    assert cfg.model == base.model and cfg.train.max_steps == 42 and cfg.size == "tiny"


def test_string_keys_keep_on_off_as_text(tmp_path):
    assert resolve_config(overrides=["train.compile=off"]).train.compile == "off"
    assert resolve_config(overrides=["data.dataset=yes"]).data.dataset == "yes"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  compile: off\n")
    assert resolve_config(config_file=path).train.compile == "off"


def test_a_quoted_string_value_is_unquoted_as_the_docs_say():
    """docs/configuration.md: quote a string YAML would read as something else, `--set "train.compile='off'"`."""
    assert resolve_config(overrides=["train.compile='off'"]).train.compile == "off"
    assert resolve_config(overrides=['data.dataset="my data"']).data.dataset == "my data"
    assert resolve_config(overrides=["data.dataset=it's"]).data.dataset == "it's"  # not a quoted string: as written


def test_min_lr_follows_an_lr_given_without_one(tmp_path):
    """Audit: `--lr 1e-4` on micro (min_lr 2e-4 from the preset) failed on a key the user never set. The presets'
    floor is a tenth of their peak: where lr is given (flag, --set or file) and min_lr is not, it stays a tenth."""
    assert resolve_config(size="micro", flags={"train.lr": 1e-4}).train.min_lr == pytest.approx(1e-5)
    assert resolve_config(size="small", overrides=["train.lr=1e-3"]).train.min_lr == pytest.approx(1e-4)
    assert resolve_config(overrides=["train.lr=3e-3"]).train.min_lr == 3e-4  # (review: not 0.00030000000000000003)
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 5.0e-4\n")
    assert resolve_config(config_file=path).train.min_lr == pytest.approx(5e-5)
    # given anywhere, min_lr is kept as given, and its own check names both keys and what to do
    path.write_text("train:\n  min_lr: 0.0\n")
    assert resolve_config(config_file=path, flags={"train.lr": 1e-4}).train.min_lr == 0.0
    assert resolve_config(size="micro", overrides=["train.min_lr=3e-5"], flags={"train.lr": 1e-4}).train.min_lr == 3e-5
    for name in PRESETS:  # the presets' own pairs
        train = resolve_config(size=name).train
        assert train.min_lr == pytest.approx(train.lr / MIN_LR_DIVISOR)
    with pytest.raises(ConfigError, match=r"^train.min_lr \(0.0003\) must be at most train.lr \(0.0001\): lower "
                                          r"it too, e.g. --set train.min_lr=1e-05$"):
        resolve_config(size="micro", overrides=["train.min_lr=3e-4"], flags={"train.lr": 1e-4})
    # a resumed run whose min_lr followed its lr goes on following a new --lr (audit: `--resume --lr 1e-2` kept
    # 2e-4, a 50x decay, as --lr's help does not say); one that set its own keeps it, and the check says what to do
    saved = resolve_config(size="micro")
    assert resolve_config(base=saved, flags={"train.lr": 1e-2}).train.min_lr == 1e-3
    assert resolve_config(base=saved, flags={"train.lr": 1e-4}).train.min_lr == 1e-5
    assert resolve_config(base=saved, overrides=["train.min_lr=0"], flags={"train.lr": 1e-4}).train.min_lr == 0
    assert resolve_config(base=saved, overrides=["train.warmup_steps=5"]).train.min_lr == saved.train.min_lr
    own = resolve_config(size="micro", overrides=["train.min_lr=0"])
    assert resolve_config(base=own, flags={"train.lr": 1e-2}).train.min_lr == 0
    own = resolve_config(size="micro", overrides=["train.min_lr=3e-4"])
    with pytest.raises(ConfigError, match=r"--set train.min_lr=1e-05"):
        resolve_config(base=own, flags={"train.lr": 1e-4})


def test_an_unreadable_config_file_says_to_make_it_readable(workspace, monkeypatch):
    """QA: a --config of mode 000 got the write advice ("point TINYGPT_HOME at a folder you can write")."""
    from pathlib import Path

    path = workspace / "noread.yaml"
    path.write_text("train:\n  max_steps: 3\n")

    def denied(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", denied)  # root reads a file of mode 000
    with pytest.raises(ConfigError, match=r"noread.yaml cannot be read \(Permission denied\): make it readable"):
        resolve_config(config_file=path)


def test_choices_are_read_in_any_case():
    """QA: `--device CPU` was taken, `--dtype BF16`, `--compile ON` and `train.optimizer=Muon` refused."""
    cfg = resolve_config(overrides=["train.dtype=BF16", "train.compile=ON", "train.optimizer=Muon",
                                    "train.schedule=WSD", "train.device= CPU "])
    tc = cfg.train
    assert (tc.dtype, tc.compile, tc.optimizer, tc.schedule, tc.device) == ("bf16", "on", "muon", "wsd", "cpu")
    with pytest.raises(ConfigError, match="train.dtype must be one of auto, fp32, bf16, fp16 \\(got 'bf17'\\)"):
        resolve_config(overrides=["train.dtype=BF17"])
