"""Turns a Hydra config into the typed `TrainConfig`, and checks command-line keys before Hydra runs.

Hydra's struct mode rejects unknown keys in YAML and plain overrides, but `+key=value` slips through it
and its messages do not list the valid keys. Both paths here name the key, the valid ones and a close match.
"""

from __future__ import annotations

import typing
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bamba_ft.config.schema import TrainConfig, validate
from bamba_ft.errors import ConfigError, Problems, suggest

GROUPS = ("model", "peft", "quant", "data", "optim", "trainer", "logger", "recipe", "debug")


def _hints(dc: type) -> dict[str, Any]:
    return typing.get_type_hints(dc)


def check_key(dotted: str) -> str | None:
    """None if `dotted` names a key of TrainConfig, else a message naming the bad part and the valid keys."""
    node: Any = TrainConfig
    path: list[str] = []
    for part in dotted.split("."):
        if is_dataclass(node):
            names = [f.name for f in fields(node)]
            if part not in names:
                where = ".".join(path) or "the top level"
                return (
                    f"'{part}' is not a key of {where}.{suggest(part, names)}\n"
                    f"Valid keys of {where}: {', '.join(names)}"
                )
            node = _hints(node)[part]
        elif typing.get_origin(node) is list and part.isdigit():
            node = typing.get_args(node)[0]
        else:
            return f"'{'.'.join(path)}' holds a value, not keys; '{part}' cannot be set inside it."
        path.append(part)
    return None


def check_overrides(argv: list[str]) -> None:
    """Validate `key=value` command-line overrides against the schema (before Hydra composes anything)."""
    problems = Problems()
    for token in argv:
        if token.startswith("-") or "=" not in token:
            continue
        key = token.split("=", 1)[0].lstrip("~+")
        if key.split(".")[0] == "hydra" or key in GROUPS:  # Hydra checks its own keys and group choices
            continue
        message = check_key(key)
        if message:
            problems.add(f"{token}: {message}")
    problems.raise_if_any("the command-line overrides")


def to_train_config(cfg: DictConfig) -> TrainConfig:
    """Merge the composed config onto the schema again (catching `+key` additions) and validate it."""
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(TrainConfig), container)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        message = (check_key(key) if key else None) or str(e).splitlines()[0]
        raise ConfigError(f"{key or 'config'}: {message}") from None
    assert isinstance(typed, TrainConfig)
    validate(typed)
    return typed
