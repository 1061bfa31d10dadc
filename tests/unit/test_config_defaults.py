"""Defaults are stated once, in the schema: option files set only what makes them differ from it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bamba_ft.config.schema import RunConfig
from bamba_ft.config.store import config_dirs
from tests.unit.test_config import composed

CONF, RECIPES = config_dirs()
# The keys that name an option (peft=lora sets method: lora; a recipe its task) may restate the schema's default.
IDENTITY = {"task", "peft.method", "quant.method", "optim.name", "data.source", "data.builtin_kind"}


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        out: dict[str, object] = {}
        for k, v in node.items():
            if k != "defaults":
                out |= _flat(v, f"{prefix}{k}.")
        return out
    return {prefix[:-1]: node}


def _option_files() -> list[tuple[str, Path]]:
    files = [(p.parent.name, p) for p in sorted(CONF.glob("*/*.yaml")) if p.parent.name != "hydra"]
    return files + [("", p) for p in sorted(RECIPES.glob("*.yaml"))]


@pytest.mark.parametrize(("group", "path"), _option_files(), ids=lambda x: x if isinstance(x, str) else x.stem)
def test_option_files_do_not_restate_schema_defaults(group: str, path: Path) -> None:
    text = path.read_text()
    package = "" if not group or "@package _global_" in text else f"{group}."
    defaults = _flat(asdict(RunConfig()))
    restated = [f"{package}{k}" for k, v in _flat(OmegaConf.to_container(OmegaConf.create(text))).items()
                if f"{package}{k}" not in IDENTITY and f"{package}{k}" in defaults and defaults[f"{package}{k}"] == v]
    assert not restated, f"{path.name} restates schema defaults (drop them): {restated}"


def test_default_run_is_the_schema_plus_the_builtin_task() -> None:
    """`python -m bamba_ft` with no arguments == RunConfig() overlaid with conf/data/builtin.yaml, nothing else."""
    expected = OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(CONF / "data" / "builtin.yaml"))
    expected.output_dir = "/tmp/bamba_ft_test"
    assert asdict(composed([])) == asdict(OmegaConf.to_object(expected))
