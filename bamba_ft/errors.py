"""User-facing errors: each names the bad value, where it came from, and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import TypeVar

T = TypeVar("T")


class BambaFTError(Exception):
    """An error caused by user input (config, files, environment), shown without a traceback."""


class ConfigError(BambaFTError):
    """One or more problems in the composed config, gathered and raised once."""

    def __init__(self, problems: list[str] | str, where: str = "the composed config"):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n > 1 else ''} in {where}:"
        body = "\n".join("  " + p.replace("\n", "\n    ") for p in self.problems)
        super().__init__(f"{head}\n{body}")


class DataError(BambaFTError):
    """Bad or missing training data."""


class ModelError(BambaFTError):
    """A checkpoint, tokenizer or model option that cannot be used."""


class DeviceMemoryError(BambaFTError):
    """The accelerator ran out of memory in training; the message names the batch, the memory mode and the fixes."""


class Problems:
    """Collects problems so that every one is reported in one error."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, problem: str) -> None:
        self.items.append(problem)

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self, where: str = "the composed config") -> None:
        if self.items:
            raise ConfigError(self.items, where)


def suggest(name: str, valid: Iterable[str]) -> str:
    """' Did you mean X?' when a close match exists, else ''."""
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.6)
    return f" Did you mean '{match[0]}'?" if match else ""


def not_an_option(key: str, value: object, options: Iterable[str]) -> str:
    """The problem line for a value outside its closed set of choices: the value, a close match, every option."""
    options = list(options)
    return f"{key}={value!r} is not an option.{suggest(str(value), options)} Valid: {', '.join(options)}"


def pick(table: Mapping[str, T], value: str, key: str, where: str = "the composed config") -> T:
    """`table[value]`, or a ConfigError naming `key`, the value and the valid choices (the table's keys)."""
    if value not in table:
        raise ConfigError(not_an_option(key, value, table), where)
    return table[value]
