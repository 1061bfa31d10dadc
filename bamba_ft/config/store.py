"""Registers the schema and the recipes with Hydra, and finds conf/ in a checkout or an installed wheel."""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from bamba_ft.config.schema import RunConfig

_PKG = Path(__file__).resolve().parent.parent


def config_dirs() -> tuple[Path, Path]:
    """(conf dir, recipes dir): inside the package when installed from a wheel, else the checkout's top level."""
    for conf, recipes in ((_PKG / "_conf", _PKG / "_recipes"), (_PKG.parent / "conf", _PKG.parent / "recipes")):
        if conf.is_dir() and recipes.is_dir():
            return conf, recipes
    raise FileNotFoundError(f"bamba_ft's conf/ and recipes/ directories are missing (looked beside {_PKG}).")


def recipe_names() -> list[str]:
    return sorted(p.stem for p in config_dirs()[1].glob("*.yaml"))


# Mappings whose keys are the user's (renames): a command-line `key={a: b}` must add keys to them.
OPEN_MAPPINGS = ("data.roles",)


def register_configs() -> None:
    """Store `schema` and every recipes/<name>.yaml as option <name> of group `recipe`.

    Hydra names a group after its directory; recipes/ sits at the top of the repository, so its files are
    registered here instead, as global packages (a recipe may set any key and override any group).
    """
    cs = ConfigStore.instance()
    schema = OmegaConf.structured(RunConfig)
    for key in OPEN_MAPPINGS:  # Hydra locks the composed config; these take new keys: data.roles={bot: assistant}
        OmegaConf.set_struct(OmegaConf.select(schema, key), False)
    cs.store(name="schema", node=schema)
    for path in sorted(config_dirs()[1].glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
