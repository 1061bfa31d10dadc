"""Chat templates: named presets, `data.chat_template` resolution, and the tokens that end an assistant turn.

`data.chat_template` is an inline Jinja template, a file holding one, or a preset name. A tokenizer without a
template of its own gets the `bamba_ft` preset, which ends every turn with the tokenizer's own EOS token, so a
model trained on it learns to emit EOS after an answer and generation stops there. The saved adapter and
exports carry those stop ids in their generation_config.json (`generation_config_for`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bamba_ft.config.schema import chat_template_problem, is_inline_template
from bamba_ft.errors import ConfigError

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

FALLBACK = "bamba_ft"
# <|role|>content, then EOS after every turn. With the builtin tokenizer (EOS <|end|>) it renders exactly as
# the template shipped with builtin:tiny. Tool schemas go first, as a system turn; tool calls follow the
# assistant's text as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
_FALLBACK_TEMPLATE = (
    "{% if tools %}<|system|>Tools: {{ tools | tojson }}{{ eos_token }}{% endif %}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>{{ call['function'] | tojson }}</tool_call>{% endfor %}"
    "{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# ChatML as Qwen and others use it; the turn ends with <|im_end|>, a stop token where the tokenizer has it.
_CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n# Tools\n{{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>\n{{ call['function'] | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# The Jinja of each name in the config's CHAT_TEMPLATE_PRESETS (the config names them; their text belongs here).
PRESETS = {FALLBACK: _FALLBACK_TEMPLATE, "chatml": _CHATML_TEMPLATE}


def resolve_chat_template(value: str, key: str = "data.chat_template") -> str:
    """The Jinja source `value` names: itself when inline, a preset, or a file's text."""
    problem = chat_template_problem(value, key)
    if problem:
        raise ConfigError(problem)
    if is_inline_template(value):
        return value
    if value in PRESETS:
        return PRESETS[value]
    return Path(value).expanduser().read_text()


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, override: str | None) -> None:
    """Use `override` (see `resolve_chat_template`), else the tokenizer's own, else the `bamba_ft` preset."""
    if override:
        template = resolve_chat_template(override)
        _check_syntax(template, override)  # before the tokenizer takes it
        tokenizer.chat_template = template
    elif not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = PRESETS[FALLBACK]
    if tokenizer.pad_token_id is None:
        # Padded batches need a pad id; it never reaches the loss (labels are -100 there).
        tokenizer.pad_token = tokenizer.eos_token
    stop_token_ids(tokenizer, warn=True)


def _check_syntax(template: str, override: str) -> None:
    """A Jinja syntax error in data.chat_template, named with its line; otherwise it would surface at the first
    row rendered, reported against that row of the data."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:  # transformers renders with this environment and the loop-control extension
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except TemplateSyntaxError as e:
        # a file's path or a preset's name as given, however long; inline Jinja itself only when short
        short = len(override) <= 80 and "\n" not in override
        shown = override if short or not is_inline_template(override) else "(inline Jinja)"
        raise ConfigError(f"data.chat_template={shown}: template line {e.lineno}: {e.message}.\n"
                          "Fix: correct the template's Jinja syntax.") from None


def _end_of_turn(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text the template puts after an assistant's answer (None if the probe answer is not found)."""
    user = [{"role": "user", "content": "hi"}]
    try:
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": "ok"}], tokenize=False)
    except Exception:  # a template that refuses this probe: the answer's end cannot be told; EOS alone stops
        return None
    at = full.find("ok", len(prompt)) if full.startswith(prompt) else -1
    return full[at + 2 :] if at >= 0 else None


def _turn_end(tokenizer: PreTrainedTokenizerBase) -> tuple[str, int | None] | None:
    """(the text ending an assistant turn, stripped; its first token where that is a special (added) token, else
    None), or None where the template puts nothing visible after an answer."""
    tail = _end_of_turn(tokenizer)
    if not tail or not tail.strip():
        return None
    first = tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return tail.strip(), (first[0] if first and first[0] in special else None)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase, warn: bool = False) -> list[int]:
    """EOS, plus the token the chat template ends an assistant turn with when it is a special (added) token."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    end = _turn_end(tokenizer)
    if end is None:
        return ids
    text, token = end
    if token is not None:
        return ids + [token] if token not in ids else ids
    if warn:
        log.warning("the chat template ends an assistant turn with %r, which does not start with a special token "
                    "of this tokenizer: generation stops at that text (end_of_turn_text), slower than at a token, "
                    "and an exported model's generation_config stops only at EOS (%r). Fix: a template whose turns "
                    "end with EOS (data.chat_template=%s), or a tokenizer that has the end-of-turn token.",
                    text[:20], tokenizer.eos_token, FALLBACK)
    return ids


def end_of_turn_text(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The text the chat template ends an assistant turn with, where it is not a special token of this tokenizer
    (chatml's '<|im_end|>' spelt out in ordinary tokens): generation stops at this text and answers are cut before
    it, since no stop token id can end them. None where the turn ends with a special token, or with nothing."""
    end = _turn_end(tokenizer)
    return end[0] if end is not None and end[1] is None else None


def generation_config_for(model: Any, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The model's generation config, stopping at EOS and the chat template's end-of-turn token."""
    from transformers import GenerationConfig

    base = getattr(model, "generation_config", None)
    config = GenerationConfig.from_dict(base.to_dict()) if base is not None else GenerationConfig()
    stops = stop_token_ids(tokenizer)
    config.eos_token_id = stops[0] if len(stops) == 1 else stops
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config
