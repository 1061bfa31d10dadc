"""Raw rows -> chat messages (or plain text): chat, prompt/completion, alpaca and text formats.

`at` names where a row came from ("data.source=x.jsonl, line 58") so that every error points at the row.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from bamba_ft.errors import ConfigError, DataError, pick, suggest

# format -> (required fields, optional fields)
FORMATS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "messages": (("messages",), ("system", "tools")),
    "prompt_completion": (("prompt", "completion"), ("system", "tools")),
    "alpaca": (("instruction", "output"), ("input", "system")),
    "text": (("text",), ()),
}
ROLES = ("system", "user", "assistant", "tool")
# ShareGPT-style rows ({"conversations": [{"from": "human", "value": ...}]}) are read as `messages`;
# data.roles adds to (or overrides) these speaker names.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant"}
# Only to write the example fix in an error; a guess never renames a role by itself.
_LIKELY = {"bot": "assistant", "model": "assistant", "ai": "assistant", "chatbot": "assistant",
           "human": "user", "prompter": "user", "question": "user", "answer": "assistant"}


def _format_keys(where: str) -> tuple[str, str]:
    """The config keys that set the format of the data `where` names, and that rename its fields: a source of
    data.sources has its own (its format wins over data.format)."""
    source = re.match(r"(data\.sources\[\d+\])\.", where)
    if source:
        return f"{source.group(1)}.format", f"map the fields with {source.group(1)}.columns ({{their: ours}})"
    return "data.format", "rename the fields"


def detect_format(columns: list[str], where: str) -> str:
    """The format whose required fields are all present, checked in a fixed order."""
    cols = set(columns)
    if "conversations" in cols:
        return "messages"
    key, rename = _format_keys(where)
    for name, (required, _) in FORMATS.items():
        if set(required) <= cols:
            return name
    expected = "; ".join(f"{n}: {', '.join(r)}" for n, (r, _) in FORMATS.items())
    raise DataError(
        f"{where}: cannot tell the data format from its fields ({', '.join(sorted(cols)) or 'none'}).\n"
        f"Expected one of: {expected} (or conversations, ShareGPT style).\n"
        f"Fix: {rename}, or set {key}=... explicitly."
    )


def check_fields(fmt: str, columns: list[str], where: str) -> None:
    """Raise a DataError naming the fields the format needs and the fields the data has."""
    required, optional = FORMATS[fmt]
    cols = set(columns)
    if fmt == "messages" and "conversations" in cols:
        return
    missing = [f for f in required if f not in cols]
    if missing:
        key, rename = _format_keys(where)
        opt = f" (optional: {', '.join(optional)})" if optional else ""
        raise DataError(
            f"{where}: data.format={fmt} expects fields {', '.join(required)}{opt}; "
            f"found: {', '.join(sorted(cols)) or 'none'}. Missing: {', '.join(missing)}.\n"
            f"Fix: set {key} to the format of this file (auto detects it), or {rename}."
        )


def role_map(renames: Mapping[str, str]) -> dict[str, str]:
    """`data.roles`, checked: every rename must end at a role the chat template knows."""
    bad = [f"data.roles.{k}={v}: not a chat role.{suggest(str(v), ROLES)} Valid: {', '.join(ROLES)}"
           for k, v in renames.items() if v not in ROLES]
    if bad:
        raise ConfigError(bad)
    return dict(renames)


def _text(value: Any, field: str, at: str, coerced: list[str] | None) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):  # CSV readers give NaN for empty cells
        raise DataError(f"{at}: field '{field}' has no value.\nFix: fill it in, or remove the row.")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if coerced is not None:
            coerced.append(field)  # counted and reported: CSV/parquet readers turn "007" into 7
        return str(value)
    raise DataError(f"{at}: field '{field}' must be a string, got {type(value).__name__}: {str(value)[:80]}")


class Conversation(list):
    """Chat messages in order, and the tool schemas the row offers the model (`tools`: passed to the chat
    template as transformers' apply_chat_template(tools=...) does; None when the row has none). `loss_from`:
    the first message whose assistant turns carry loss (a prompt given as messages may hold assistant turns,
    which are context, not completion)."""

    def __init__(self, messages: list[dict[str, Any]] = (), tools: list[dict[str, Any]] | None = None,  # type: ignore[assignment]
                 loss_from: int = 0) -> None:
        super().__init__(messages)
        self.tools = tools
        self.loss_from = loss_from


def tools_of(example: list[dict] | str) -> list[dict[str, Any]] | None:
    return getattr(example, "tools", None)


def _without_nulls(value: Any) -> Any:
    """Objects read through datasets (Arrow) carry every key seen anywhere in the file, as null where a row lacks
    it; dropped here, so a tool schema or call arguments hold only their own keys (an explicit null goes too)."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _json_value(value: Any, field: str, at: str) -> Any:
    """A JSON string (the OpenAI form of tool-call arguments and of tool lists) as its object."""
    if not isinstance(value, str):
        return _without_nulls(value)
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"{at}: {field} is a string but not JSON ({e.msg}): {value[:80]}\n"
                        "Fix: store it as a JSON object, or as a string holding valid JSON.") from None


def _tool_calls(value: Any, at: str) -> list[dict[str, Any]]:
    """Tool calls in the form chat templates read: {type: function, function: {name, arguments}} (+ id)."""
    if not isinstance(value, list):
        raise DataError(f"{at}: tool_calls must be a list of calls, got {type(value).__name__}.")
    calls = []
    for call in value:
        fn = call.get("function") if isinstance(call, dict) and call.get("function") is not None else call
        name = fn.get("name") if isinstance(fn, dict) else None
        if not isinstance(name, str) or not name:
            raise DataError(f"{at}: a tool call needs a function name: "
                            '{"type": "function", "function": {"name": ..., "arguments": {...}}}.')
        args = _json_value(fn.get("arguments"), "a tool call's arguments", at)
        out = {"type": "function", "function": {"name": name, "arguments": {} if args is None else args}}
        if call.get("id") is not None:
            out["id"] = call["id"]
        calls.append(out)
    return calls


def row_tools(row: dict[str, Any], at: str) -> list[dict[str, Any]] | None:
    """The row's `tools` (a list of JSON schemas, or a string holding one), or None."""
    value = row.get("tools")
    if value is None or value == "" or value == []:
        return None
    tools = _json_value(value, "tools", at)
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise DataError(f"{at}: tools must be a list of JSON schemas (objects), got {type(tools).__name__}.")
    return tools


def _content(value: Any, at: str, coerced: list[str] | None) -> str:
    """A message's text; a list of parts (the OpenAI/HF form) is read when every part is text."""
    if not isinstance(value, list):
        return _text(value, "content", at, coerced)
    texts = []
    for part in value:
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != "text":
            raise DataError(
                f"{at}: its content holds a '{kind}' part; only text parts "
                '({"type": "text", "text": "..."}) can be trained on.\n'
                "Fix: remove the non-text parts (or the rows holding them) from the data."
            )
        texts.append(_text(part.get("text"), "content[].text", at, coerced))
    return "".join(texts)  # chat templates print text parts back to back


def _unknown_roles(names: list[str], at: str) -> DataError:
    example = ", ".join(f"{n}: {_LIKELY.get(n.lower(), n.lower() if n.lower() in ROLES else 'user')}" for n in names)
    return DataError(
        f"{at}: unknown chat role{'s' if len(names) > 1 else ''} {', '.join(repr(n) for n in names)} "
        f"(valid: {', '.join(ROLES)}; ShareGPT rows may also use {', '.join(SHAREGPT_ROLES)}).\n"
        f"Fix: map them with data.roles, e.g. 'data.roles={{{example}}}'"
    )


def _turn(turn: dict[str, Any], role: str, content: Any, at: str, coerced: list[str] | None) -> dict[str, Any]:
    """One message: role and text, plus an assistant's tool calls and a tool result's call id and name; an
    assistant turn of weight 0 (`NO_LOSS`) is context only."""
    calls = turn.get("tool_calls")
    if calls is not None and calls != []:
        if role != "assistant":
            raise DataError(f"{at}: a {role} message has tool_calls; only assistant messages make tool calls.\n"
                            "Fix: give the calls to an assistant message (or map the role with data.roles).")
        message = {"role": role, "content": "" if content is None else _content(content, at, coerced),
                   "tool_calls": _tool_calls(calls, at)}
    else:
        message = {"role": role, "content": _content(content, at, coerced)}
    if role == "tool":
        message.update({k: turn[k] for k in ("tool_call_id", "name") if turn.get(k) is not None})
    if role == "assistant" and _weight(turn.get("weight"), at) == 0:
        message[NO_LOSS] = True
    return message


# The key a message carries when it is context only: an assistant turn whose `weight` is 0.
NO_LOSS = "no_loss"


def _weight(value: Any, at: str) -> int | None:
    """A message's `weight` (OpenAI's fine-tuning format, ShareGPT files written for it): 0 or 1, or None."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value in (0, 1)):
        return None if value is None else int(value)
    if isinstance(value, bool):
        return int(value)
    raise DataError(f"{at}: weight={value!r}; a message's weight is 0 (no loss on this turn) or 1 (loss, as without "
                    "it).\nFix: set it to 0 or 1, or remove it.")


def _as_messages(value: Any, at: str, renames: Mapping[str, str], coerced: list[str] | None) -> list[dict[str, Any]]:
    if isinstance(value, str) and value.lstrip().startswith("["):  # a list written out as text, as a CSV cell holds it
        raise DataError(f"{at}: 'messages' is text that spells a JSON list, not a list of messages (a CSV column holds "
                        "text only).\nFix: write the rows as .jsonl or .parquet, which keep lists.")
    if not isinstance(value, list) or not value:
        raise DataError(f"{at}: 'messages' must be a non-empty list of {{role, content}} objects.\nFix: give each row "
                        "its conversation, [{\"role\": \"user\", \"content\": ...}, {\"role\": \"assistant\", ...}].")
    out, unknown = [], []
    for n, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise DataError(f"{at}: each message must be an object with role and content, got {type(turn).__name__}.")
        # Rows read by datasets may carry every key of the file with None where a row lacks it.
        if turn.get("from") is not None:  # ShareGPT
            name, content = turn["from"], turn.get("value")
            role = renames.get(name, SHAREGPT_ROLES.get(name, name))
        elif turn.get("role") is not None:
            name, content = turn["role"], turn.get("content")
            role = renames.get(name, name)
        else:
            found = ", ".join(sorted(k for k, v in turn.items() if v is not None)) or "none"
            raise DataError(f"{at}: a message has fields {found}; expected role and content (or from and value).")
        if role not in ROLES:
            if str(name) not in unknown:
                unknown.append(str(name))
            continue
        out.append(_turn(turn, role, content, f"{at}, message {n}", coerced))
    if unknown:
        raise _unknown_roles(unknown, at)
    return out


def _optional(row: dict[str, Any], field: str, at: str, coerced: list[str] | None) -> str:
    value = row.get(field)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _text(value, field, at, coerced)


def _with_system(
    row: dict[str, Any], messages: list[dict[str, Any]], at: str, coerced: list[str] | None
) -> list[dict[str, Any]]:
    """The row's `system` field as the conversation's system turn: before its messages, or the same text as the
    system message they open with; a different one is an error, as either choice would train what the row
    does not say."""
    system = _optional(row, "system", at, coerced)
    if not system:
        return messages
    if messages and messages[0]["role"] == "system":
        if messages[0]["content"] != system:
            raise DataError(f"{at}: the row's system field ({system[:60]!r}) and its first message, a system message "
                            f"({messages[0]['content'][:60]!r}), differ: the conversation would have two system "
                            "turns.\nFix: keep one of them in the row (the field, or the system message).")
        return messages
    return [{"role": "system", "content": system}] + messages


def _check_row(row: dict[str, Any], fmt: str, at: str) -> None:
    """Every row must hold its format's fields: a file mixing formats fails at the first row that differs."""
    required = ("messages", "conversations") if fmt == "messages" else FORMATS[fmt][0]
    present = [f for f in required if row.get(f) is not None]
    if (fmt == "messages" and present) or len(present) == len(required):
        return
    found = ", ".join(sorted(k for k, v in row.items() if v is not None and not k.startswith("__"))) or "none"
    wanted = "messages (or conversations)" if fmt == "messages" else ", ".join(f for f in required if f not in present)
    raise DataError(
        f"{at}: this row has no {wanted}; its fields are {found}, but the data's format is {fmt}.\n"
        "Fix: give every row of a file the same format (split mixed files), or fill in the missing fields."
    )


def _from_text(row: dict[str, Any], at: str, renames: Mapping[str, str], coerced: list[str] | None) -> str:
    return _text(row["text"], "text", at, coerced)


def _from_messages(row: dict[str, Any], at: str, renames: Mapping[str, str],
                   coerced: list[str] | None) -> Conversation:
    value = row["messages"] if row.get("messages") is not None else row["conversations"]
    return Conversation(_with_system(row, _as_messages(value, at, renames, coerced), at, coerced), row_tools(row, at))


def _from_prompt_completion(row: dict[str, Any], at: str, renames: Mapping[str, str],
                            coerced: list[str] | None) -> Conversation:
    prompt, completion = row["prompt"], row["completion"]
    user = _as_messages(prompt, at, renames, coerced) if isinstance(prompt, list) else [
        {"role": "user", "content": _text(prompt, "prompt", at, coerced)}
    ]
    answer = _as_messages(completion, at, renames, coerced) if isinstance(completion, list) else [
        {"role": "assistant", "content": _text(completion, "completion", at, coerced)}
    ]
    messages = _with_system(row, user + answer, at, coerced)
    return Conversation(messages, row_tools(row, at), loss_from=len(messages) - len(answer))


def _from_alpaca(row: dict[str, Any], at: str, renames: Mapping[str, str],
                 coerced: list[str] | None) -> list[dict[str, Any]]:
    instruction = _text(row["instruction"], "instruction", at, coerced)
    extra = _optional(row, "input", at, coerced)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _text(row["output"], "output", at, coerced)
    return _with_system(row, [{"role": "user", "content": user}, {"role": "assistant", "content": output}], at, coerced)


# format -> its row reader; the keys are FORMATS' keys.
_READERS = {
    "messages": _from_messages,
    "prompt_completion": _from_prompt_completion,
    "alpaca": _from_alpaca,
    "text": _from_text,
}


def to_messages(
    row: dict[str, Any],
    fmt: str,
    at: str,
    renames: Mapping[str, str] | None = None,
    coerced: list[str] | None = None,
) -> list[dict[str, Any]] | str:
    """One row as chat messages, or as a plain string for the text format.

    Args:
        fmt: one of FORMATS (`auto` is resolved before, by `detect_format`).
        renames: `data.roles` (checked by `role_map`).
        coerced: receives the name of each field whose number was read as text.
    """
    read = pick(_READERS, fmt, "data.format")
    _check_row(row, fmt, at)
    return read(row, at, renames or {}, coerced)
