"""Turns a Hydra config into the typed `RunConfig`, and checks command-line keys before Hydra runs.

Hydra's struct mode rejects unknown keys in YAML and plain overrides, but `+key=value` slips through it
and its messages do not list the valid keys. Both paths here name the key, the valid ones and a close match.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import fields, is_dataclass
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bamba_ft.config.schema import NOT_BUILTIN, DataConfig, RunConfig, validate
from bamba_ft.errors import ConfigError, Problems, not_an_option, suggest

GROUPS = ("model", "peft", "quant", "data", "optim", "trainer", "logger", "recipe", "smoke", "sweep")
# Groups that act only in a sweep (-m): a search (sweep=lora_hpo), Hydra's sweeper and launcher.
_SWEEP_ONLY = ("sweep", "hydra/sweeper", "hydra/launcher")


def _hints(dc: type) -> dict[str, Any]:
    return typing.get_type_hints(dc)


def check_key(dotted: str) -> str | None:
    """None if `dotted` names a key of RunConfig, else a message naming the bad part and the valid keys."""
    node: Any = RunConfig
    path: list[str] = []
    for part in dotted.split("."):
        if is_dataclass(node):
            names = [f.name for f in fields(node)]
            if part not in names:
                where = ".".join(path) or "the top level"
                # at the top level a misspelt group (recpie=eval) is matched against the groups too
                groups = [] if path else [g for g in GROUPS if g not in names]
                also = f"; config groups (group=option): {', '.join(groups)}" if groups else ""
                return (
                    f"'{part}' is not a key of {where}.{suggest(part, [*names, *groups])}\n"
                    f"Valid keys of {where}: {', '.join(names)}{also}"
                )
            node = _hints(node)[part]
        elif typing.get_origin(node) is list and part.isdigit():
            node = typing.get_args(node)[0]
        elif typing.get_origin(node) is dict:  # a mapping of the user's own keys (data.roles.bot=assistant)
            node = typing.get_args(node)[1]
        else:
            return f"'{'.'.join(path)}' holds a value, not keys; '{part}' cannot be set inside it."
        path.append(part)
    return None


_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "ListConfig": "a list ([a,b])", "DictConfig": "a mapping ({a: b})"}


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return str(OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value).replace(" ", "")


def _type_problem(schema: DictConfig, key: str, value: Any) -> str | None:
    """None if `value` fits the declared type of `key`, else what was expected and what came."""
    try:
        OmegaConf.update(schema, key, value, merge=True)
    except OmegaConfBaseException:
        for i, item in enumerate(value if isinstance(value, (list, ListConfig)) else []):  # data.sources=[{...}]
            for name in item if isinstance(item, (dict, DictConfig)) else []:
                if (problem := check_key(f"{key}.{i}.{name}")) is not None:
                    return f"item {i} of the list: {problem}"
        default = OmegaConf.select(OmegaConf.structured(RunConfig), key, default=None)
        expected = _KINDS.get(type(default).__name__, "a value of the type this key declares")
        hint = f" (for example {key}={_show(default)})" if default is not None else ""  # a preset may set another
        return f"{_show(value)} is not {expected}{hint}."
    return None


def _values(override: Any) -> list[Any]:
    """The value(s) an override sets: each value of a discrete sweep (a,b / choice / range), the two ends
    of an interval a sweeper samples from (tag(log, interval(a, b)))."""
    if not override.is_sweep_override():
        return [override.value()]
    if override.is_discrete_sweep():
        return list(override.sweep_iterator())
    interval = override.value()
    return [interval.start, interval.end]


def group_options(group: str) -> list[str]:
    """The options of a config group: recipes/*.yaml for `recipe`, conf/<group>/*.yaml for the others."""
    from bamba_ft.config.store import config_dirs, recipe_names

    if group == "recipe":
        return recipe_names()
    return sorted(p.stem for p in (config_dirs()[0] / group).glob("*.yaml"))


def _group_problems(parser: Any, token: str, group: str) -> list[str]:
    """`recipe=sftt`, `model=bamba-10b`: the option named (each value of a sweep) must exist."""
    from hydra.errors import HydraException

    try:
        values = _values(parser.parse_override(token))
    except HydraException:
        return []  # Hydra reports what it cannot parse
    if any(value is None for value in values):  # Hydra fails on it with a traceback
        return [f"{token}: a config group takes an option name, not null.\nFix: ~{group} leaves the group out."]
    options = group_options(group)
    return [f"{token}: {not_an_option(group, value, options)}" for value in values if str(value) not in options]


def check_overrides(argv: list[str]) -> None:
    """Validate `key=value` command-line overrides against the schema, names and types (before Hydra composes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    problems = Problems()
    parser = OverridesParser.create()
    schema = OmegaConf.structured(RunConfig)
    multirun = any(a in ("-m", "--multirun") or a == "hydra.mode=MULTIRUN" for a in argv)
    for token in argv:
        if token.startswith("-") or "=" not in token:
            continue
        key = token.split("=", 1)[0].lstrip("~+")
        if not multirun and not token.startswith("~") and (key in _SWEEP_ONLY or (
                key == "sweep.resume" and token.split("=", 1)[1].lower() != "false")):
            # Hydra ignores them in a single run, which then trains once with the defaults they were to replace
            problems.add(f"{token}: applies to a sweep, and without -m this command runs one job (the search or "
                         "launcher named would not be used).\nFix: add -m, e.g. python -m bamba_ft -m "
                         f"{token} ...")
            continue
        if key in GROUPS and not token.startswith("~"):
            for problem in _group_problems(parser, token, key):
                problems.add(problem)
            continue
        if key.split(".")[0] == "hydra" or key.split("/")[0] == "hydra":
            continue  # Hydra and its plugins (sweepers, launchers) check their own keys
        message = check_key(key)
        if message:
            problems.add(f"{token}: {message}")
            continue
        try:
            override = parser.parse_override(token)
        except HydraException as e:
            value = token.split("=", 1)[1] if "=" in token else ""
            fix = (f"A value starting with ~ needs quotes (Hydra reads ~ as its delete mark): '{key}=\"{value}\"', "
                   f"or write $HOME's path out." if value.startswith("~") else
                   "Quote values holding spaces or commas, e.g. 'data.chat_template=\"...\"'.")
            problems.add(f"{token}: cannot be parsed ({str(e).splitlines()[0]}). {fix}")
            continue
        if override.is_delete():
            continue
        if override.is_discrete_sweep() and not multirun:
            text = _type_problem(OmegaConf.structured(RunConfig), key, "a text") is None
            quote = f"quote a text that holds commas, '{key}=\"{token.split('=', 1)[1]}\"', or " if text else ""
            problems.add(f"{token}: the commas make this a list of values to sweep over (Hydra's a,b), and this is no "
                         f"sweep.\nFix: {quote}add -m to run one job per value.")
            continue
        for value in _values(override):
            problem = _type_problem(schema, key, value)
            if problem:
                if key == "debug":
                    problem += "\ndebug=true shows full tracebacks; the two-step smoke run is smoke=fast."
                if override.is_interval_sweep() and isinstance(value, float) and value.is_integer():
                    problem += "\nHydra's interval() gives floats; for an integer key write int(interval(a, b))."
                problems.add(f"{token}: {problem}")
                break
    problems.raise_if_any("the command-line overrides")


def override_keys() -> set[str]:
    """The keys this Hydra run's command line names (`key=v`, `+key=v`, `~key`, `group=option`); empty outside a
    Hydra run. Jobs that start from a saved config need them: only what the user typed may replace it."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def in_sweep() -> bool:
    """Whether this is a job of a Hydra sweep (`-m`); False outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def option_config(group: str, option: str | None) -> DictConfig | None:
    """What conf/<group>/<option>.yaml sets, placed at the top level (as `@package _global_` files are); None for
    no choice or a group outside conf/ (recipe, hydra/...). Hydra's composed config cannot say which option set
    a key; the file can."""
    from bamba_ft.config.store import config_dirs

    path = config_dirs()[0] / group / f"{option}.yaml"
    if "/" in group or option is None or not path.is_file():
        return None
    text = path.read_text()
    node = OmegaConf.create(text)
    return node if "@package _global_" in text else OmegaConf.create({group: node})


COMMAND_LINE = "the command line"


def key_origins(section: str) -> dict[str, str]:
    """Dotted keys under `section` (e.g. "data") that the command line sets, each with what set it: COMMAND_LINE for
    a `section.key=...` override, else the group option named there that sets it among its top-level keys of
    `section` ('data=file', 'smoke=fast'), so that a log tells the keys typed from those an option brought.

    Why: a job that starts from a saved run's config (recipe=eval on a run) applies exactly these on top of it;
    the composed config alone cannot tell a typed value from a default.
    """
    from hydra.core.hydra_config import HydraConfig

    given = override_keys()
    origins = dict.fromkeys(sorted(k for k in given if k.startswith(f"{section}.")), COMMAND_LINE)
    choices = HydraConfig.get().runtime.choices if given else {}
    for group in sorted(given & set(choices)):
        node = option_config(group, choices[group])
        part = OmegaConf.select(node, section) if node is not None else None
        if isinstance(part, DictConfig):
            for k in part:
                origins.setdefault(f"{section}.{k}", f"{group}={choices[group]}")
    return origins


def _unset_keys(node: DictConfig) -> list[str]:
    """The dotted keys an option file leaves `???`, read without resolving interpolations: a file alone cannot
    resolve `${sweep.direction}` (OmegaConf.missing_keys tries, and fails on conf/sweep/lora_hpo.yaml)."""
    def walk(value: Any, prefix: str) -> Iterator[str]:
        if isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{prefix}{k}.")
        elif value == "???":
            yield prefix.rstrip(".")

    return list(walk(OmegaConf.to_container(node, resolve=False), ""))


def to_run_config(cfg: DictConfig) -> RunConfig:
    """Merge the composed config onto the schema again (catching `+key` additions) and validate it."""
    # A `???` in a chosen group option must fail here. Hydra merges the option onto the schema, and a
    # merged `???` keeps the schema's default, so `data=file` without `data.source` would train on builtin data.
    from hydra.core.hydra_config import HydraConfig

    missing = set(OmegaConf.missing_keys(cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overridden = override_keys()
        defaults = OmegaConf.structured(RunConfig)
        for group, option in hydra_cfg.runtime.choices.items():
            node = option_config(str(group), option)
            for key in _unset_keys(node) if node is not None else ():
                unchanged = OmegaConf.select(cfg, key) == OmegaConf.select(defaults, key)
                if unchanged and key not in overridden:
                    missing.add(key)
    if OmegaConf.select(cfg, "data.sources"):  # data=file with data.sources: the sources replace data.source
        missing.discard("data.source")
    if missing:
        examples = {"data.source": "data.source=path/to/train.jsonl (or data.sources=[...] to mix several)"}
        raise ConfigError([
            f"{key}: no value given, and this config needs one.\n"
            f"Fix: add {examples.get(key, key + '=...')} to the command line."
            for key in sorted(missing)
        ])
    try:
        container = OmegaConf.to_container(cfg, resolve=True)
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), container)
        typed = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        message = (check_key(key) if key else None) or str(e).splitlines()[0]
        raise ConfigError(f"{key or 'config'}: {message}") from None
    assert isinstance(typed, RunConfig)
    problems: list[str] = []  # one error for both checks: data.source=x.jsonl under data=builtin may be missing too
    try:
        validate(typed)
    except ConfigError as e:
        problems += e.problems
    if HydraConfig.initialized():
        try:
            _check_data_option(typed, str(HydraConfig.get().runtime.choices.get("data")))
        except ConfigError as e:
            problems += e.problems
    if problems:
        raise ConfigError(problems)
    return typed


def _check_data_option(cfg: RunConfig, option: str) -> None:
    """Refuse training on the user's data under a built-in data option (`data=builtin`, the default): its
    lengths and schedule are tuned for the tiny built-in task and would silently apply to that data
    (examples truncated at 128 tokens, 400 steps at lr 3e-3)."""
    d = cfg.data
    if cfg.task not in ("train", "preview"):  # a preview shows the data as training would read it
        return
    if d.source == "builtin" and not d.sources:
        default = DataConfig()
        unread = [f"data.{k}={getattr(d, k)}" for k in NOT_BUILTIN if getattr(d, k) != getattr(default, k)]
        if unread:
            raise ConfigError([f"{key}: the data is the built-in task, which generates its training and validation "
                               "sets, so this would be ignored.\nFix: also name your data (data=file "
                               f"data.source=path/to/train.jsonl {key}), or drop it (the built-in validation size: "
                               "data.builtin_val_examples=N)." for key in unread])
        return
    if not option.startswith("builtin"):
        return
    from bamba_ft.config.store import config_dirs

    given = f"data.source={d.source}" if d.source != "builtin" else "'data.sources=[...]'"
    preset = OmegaConf.load(config_dirs()[0] / "data" / f"{option}.yaml")  # the option's own values, not the run's
    tuned = ", ".join(f"{k}={OmegaConf.select(preset, k)}" for k in (
        "data.max_seq_len", "data.max_tokens_per_batch", "optim.lr", "trainer.max_steps")
        if OmegaConf.select(preset, k) is not None)
    raise ConfigError(
        f"{given} with data={option}: that data option tunes lengths and schedule for the built-in task "
        f"({tuned}), and they would apply to your data.\n"
        f"Fix: add data=file to the command line (python -m bamba_ft data=file {given})."
    )
