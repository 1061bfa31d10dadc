"""Raw rows -> chat messages (or plain text): chat, prompt/completion, alpaca and text formats."""

from __future__ import annotations

from typing import Any

from bamba_ft.errors import DataError

# format -> (required fields, optional fields)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ()),
    "prompt_completion": (("prompt", "completion"), ("system",)),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "text": (("text",), ()),
}
# ShareGPT-style rows ({"conversations": [{"from": "human", "value": ...}]}) are read as `messages`.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def detect_format(columns: list[str], where: str) -> str:
    """The format whose required fields are all present, checked in a fixed order."""
    cols = set(columns)
    if "conversations" in cols:
        return "messages"
    for name, (required, _) in FORMATS.items():
        if set(required) <= cols:
            return name
    expected = "; ".join(f"{n}: {', '.join(r)}" for n, (r, _) in FORMATS.items())
    raise DataError(
        f"{where}: cannot tell the data format from its fields ({', '.join(sorted(cols)) or 'none'}).\n"
        f"Expected one of: {expected} (or conversations, ShareGPT style).\n"
        f"Fix: rename the fields, or set data.format=... explicitly."
    )


def check_fields(fmt: str, columns: list[str], where: str) -> None:
    """Raise a DataError naming the fields the format needs and the fields the data has."""
    required, optional = FORMATS[fmt]
    cols = set(columns)
    if fmt == "messages" and "conversations" in cols:
        return
    missing = [f for f in required if f not in cols]
    if missing:
        opt = f" (optional: {', '.join(optional)})" if optional else ""
        raise DataError(
            f"{where}: data.format={fmt} expects fields {', '.join(required)}{opt}; "
            f"found: {', '.join(sorted(cols)) or 'none'}. Missing: {', '.join(missing)}.\n"
            f"Fix: set data.format to the format of this file (auto detects it), or rename the fields."
        )


def _text(value: Any, field: str, index: int, where: str) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # CSV readers turn "42" into 42
    if not isinstance(value, str):
        raise DataError(f"{where}, row {index}: field '{field}' must be a string, got {type(value).__name__}.")
    return value


def _as_messages(value: Any, index: int, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}, row {index}: 'messages' must be a non-empty list of {{role, content}} objects.")
    out = []
    for turn in value:
        if not isinstance(turn, dict):
            raise DataError(f"{where}, row {index}: each message must be an object with role and content.")
        if "from" in turn and "value" in turn:  # ShareGPT
            role = _SHAREGPT_ROLES.get(turn["from"])
            if role is None:
                raise DataError(f"{where}, row {index}: unknown ShareGPT speaker '{turn['from']}'.")
            out.append({"role": role, "content": _text(turn["value"], "value", index, where)})
            continue
        if "role" not in turn or "content" not in turn:
            raise DataError(
                f"{where}, row {index}: a message has fields {', '.join(sorted(turn))}; expected role and content."
            )
        out.append({"role": str(turn["role"]), "content": _text(turn["content"], "content", index, where)})
    return out


def _with_system(row: dict[str, Any], messages: list[dict[str, str]]) -> list[dict[str, str]]:
    system = row.get("system")
    return ([{"role": "system", "content": system}] if isinstance(system, str) and system else []) + messages


def to_messages(row: dict[str, Any], fmt: str, index: int, where: str) -> list[dict[str, str]] | str:
    """One row as chat messages, or as a plain string for the text format."""
    if fmt == "text":
        return _text(row["text"], "text", index, where)
    if fmt == "messages":
        return _as_messages(row["messages"] if "messages" in row and row["messages"] else row["conversations"], index, where)
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        user = _as_messages(prompt, index, where) if isinstance(prompt, list) else [
            {"role": "user", "content": _text(prompt, "prompt", index, where)}
        ]
        answer = _as_messages(completion, index, where) if isinstance(completion, list) else [
            {"role": "assistant", "content": _text(completion, "completion", index, where)}
        ]
        return _with_system(row, user + answer)
    # alpaca
    instruction = _text(row["instruction"], "instruction", index, where)
    extra = row.get("input")
    user = f"{instruction}\n\n{extra}" if isinstance(extra, str) and extra.strip() else instruction
    return _with_system(
        row,
        [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row["output"], "output", index, where)}],
    )
