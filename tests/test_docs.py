"""The docs cannot drift: command pages equal `--help`, the config reference equals the dataclasses,
and the docs' relative links point at files that exist."""

import importlib.util
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DOCS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_pages_match_help():
    gen = _load("gen_command_docs")
    if gen.snapshot_renderers() != gen.renderers():  # lowest-versions audit: other releases draw other boxes
        pytest.skip(f"docs/commands is a snapshot of the help as {gen.snapshot_renderers()} render it "
                    f"(here: {gen.renderers()})")
    pages = gen.render()
    names = set(gen.commands())
    assert {"plan", "runs", "data", "train", "tokenize", "generate"} <= names
    assert {p.stem for p in pages} == names | {"README"}  # every registered command has a page
    assert gen.stale(pages) == [], "docs/commands is out of date: run python docs/gen_command_docs.py"


def test_configuration_reference_matches_config():
    gen = _load("gen_config_reference")
    assert (DOCS / "configuration.md").read_text(encoding="utf-8") == gen.render(), \
        "docs/configuration.md is out of date: run python docs/gen_config_reference.py"


def test_every_config_key_has_a_meaning():
    from tinygpt_cli.config import SECTIONS

    gen = _load("gen_config_reference")
    for cls in SECTIONS.values():
        missing = {f for f in cls.__dataclass_fields__} - set(gen.field_comments(cls))
        assert not missing, f"{cls.__name__}: add a comment to {sorted(missing)} in config.py"


@pytest.mark.parametrize("page", sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")))
def test_relative_links_resolve(page):
    path = DOCS / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{path.relative_to(DOCS)} links to missing {target}"
