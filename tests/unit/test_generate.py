"""recipe=generate's prompts (read and checked before a model loads) and its terminal chat."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bamba_ft.config.schema import GenerateConfig
from bamba_ft.errors import ConfigError, DataError
from bamba_ft.jobs.generate import chat, read_prompts


def _file(tmp_path: Path, name: str, text: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def test_prompts_file_rows_keep_their_conversation_and_reference(tmp_path: Path) -> None:
    rows = [{"prompt": "reverse cat", "completion": "tac"},
            {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort cba"},
                          {"role": "assistant", "content": "abc"}]},
            {"conversations": [{"from": "human", "value": "upper ab"}]}]
    path = _file(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    prompts = read_prompts(GenerateConfig(prompts_file=path, system="sys"))
    assert [p.reference for p in prompts] == ["tac", "abc", None]
    assert prompts[0].messages == [{"role": "system", "content": "sys"}, {"role": "user", "content": "reverse cat"}]
    # a row's own conversation: no generate.system added, its final assistant turn is the reference, not the prompt
    assert prompts[1].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort cba"}]
    assert prompts[1].shown() == "sort cba"
    assert prompts[2].messages == [{"role": "user", "content": "upper ab"}]
    assert prompts[0].where.endswith("line 1") and prompts[2].where.endswith("line 3")


def test_prompts_file_takes_conversational_prompt_completion_rows(tmp_path: Path) -> None:
    """A prompt_completion row whose prompt and completion are message lists, as the training data reads it."""
    rows = [{"prompt": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort cba"}],
             "completion": [{"role": "assistant", "content": "abc"}]},
            {"prompt": [{"role": "user", "content": "reverse cat"}], "completion": "tac"}]
    path = _file(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    prompts = read_prompts(GenerateConfig(prompts_file=path))
    assert prompts[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort cba"}]
    assert [p.reference for p in prompts] == ["abc", "tac"]
    assert prompts[1].shown() == "reverse cat"
    with pytest.raises(DataError, match=r"line 1: `prompt` is int, not text or a list of messages"):
        read_prompts(GenerateConfig(prompts_file=_file(tmp_path, "q.jsonl", '{"prompt": 3}\n')))


def test_prompts_txt_and_plain_text_continuation(tmp_path: Path) -> None:
    path = _file(tmp_path, "p.txt", "Q: reverse cat\n\nQ: sort cba\n")
    prompts = read_prompts(GenerateConfig(prompts_file=path, chat=False))
    assert [(p.text, p.messages) for p in prompts] == [("Q: reverse cat", None), ("Q: sort cba", None)]
    assert read_prompts(GenerateConfig()) is None  # standard input


@pytest.mark.parametrize(("text", "kw", "error", "message"), [
    ('{"prompt": "a"}\n{"prompt": \n', {}, DataError, r"p.jsonl, line 2: malformed JSON"),
    ('{"question": "a"}\n', {}, DataError, r"line 1: a row needs `prompt` \(text\) or `messages`.*it has question"),
    ('["a"]\n', {}, DataError, "line 1: a row must be a JSON object"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', {"chat": False}, ConfigError, "generate.chat=false"),
    ('{"messages": [{"role": "assistant", "content": "a"}]}\n', {}, DataError, "no turn before the answer"),
    ('{"messages": [{"role": "robot", "content": "a"}]}\n', {}, DataError, "robot"),
    ("\n\n", {}, DataError, "holds no prompt"),
    (b'{"prompt": "caf\xe9"}\n', {}, DataError, "not UTF-8"),
])
def test_a_bad_prompts_file_is_named_with_its_line(tmp_path: Path, text: str | bytes, kw: dict, error: type,
                                                   message: str) -> None:
    path = _file(tmp_path, "p.jsonl", text)
    with pytest.raises(error, match=message):
        read_prompts(GenerateConfig(prompts_file=path, **kw))


def test_prompt_options_refused_before_the_model_loads(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        read_prompts(GenerateConfig(prompts_file=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match=r"\.jsonl .* or \.txt"):
        read_prompts(GenerateConfig(prompts_file=_file(tmp_path, "p.csv", "a\n")))
    with pytest.raises(ConfigError, match="generate.prompt is empty"):
        read_prompts(GenerateConfig(prompt="  "))


@pytest.fixture(scope="module")
def builtin_model():  # noqa: ANN201
    from bamba_ft.config.schema import ModelConfig, QuantConfig
    from bamba_ft.data.templates import ensure_chat_template
    from bamba_ft.model.build import build_model, load_tokenizer

    cfg = ModelConfig()
    tokenizer = load_tokenizer(cfg)
    ensure_chat_template(tokenizer, None)
    return build_model(cfg, QuantConfig(), torch.device("cpu")).eval(), tokenizer


def test_chat_keeps_the_conversation_until_reset(builtin_model, capsys: pytest.CaptureFixture) -> None:  # noqa: ANN001
    model, tokenizer = builtin_model
    lines = iter(["reverse cat", "", "sort cba", "/reset", "upper ab", "/exit", "never read"])
    g = GenerateConfig(max_new_tokens=8, system="be brief")
    turns = chat(model, tokenizer, g, torch.device("cpu"), read=lambda _: next(lines))
    assert [[m["content"] for m in t["messages"]] for t in turns] == [
        ["be brief", "reverse cat"],
        ["be brief", "reverse cat", turns[0]["answer"], "sort cba"],
        ["be brief", "upper ab"],  # after /reset: the system message, then the new turn
    ]
    printed = capsys.readouterr().out
    assert all(t["answer"] in printed for t in turns) and "(started over)" in printed
    # end of input (Ctrl-D) ends the chat as /exit does
    assert len(chat(model, tokenizer, g, torch.device("cpu"), read=_eof)) == 0


def _eof(_: str) -> str:
    raise EOFError


def test_prompts_file_rows_keep_their_system_field(tmp_path: Path) -> None:
    """A prompt_completion row's `system` field is its system turn, as training reads the row, not dropped."""
    rows = [{"system": "be brief", "prompt": "sort cba", "completion": "abc"},
            {"system": "be brief", "prompt": [{"role": "user", "content": "reverse cat"}], "completion": "tac"},
            {"system": "be brief", "prompt": [{"role": "system", "content": "be long"}, {"role": "user", "content": "x"}]}]
    path = _file(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows[:2]) + "\n")
    prompts = read_prompts(GenerateConfig(prompts_file=path, system="sys"))
    assert prompts[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "sort cba"}]
    assert prompts[1].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "reverse cat"}]
    assert [p.reference for p in prompts] == ["abc", "tac"]
    with pytest.raises(DataError, match=r"line 1: the row's system field .* differ"):
        read_prompts(GenerateConfig(prompts_file=_file(tmp_path, "q.jsonl", json.dumps(rows[2]) + "\n")))


def test_prompts_file_rows_offer_their_tools_to_the_template(tmp_path: Path) -> None:
    """A row's `tools` reach the chat template, as training and eval's exact match render them, not dropped."""
    from bamba_ft.config.schema import ModelConfig
    from bamba_ft.data.templates import ensure_chat_template
    from bamba_ft.model.build import load_tokenizer

    tool = {"type": "function", "function": {"name": "lookup_weather", "parameters": {"type": "object"}}}
    rows = [{"messages": [{"role": "user", "content": "weather?"}], "tools": [tool]},
            {"prompt": "weather?", "tools": json.dumps([tool])},
            {"prompt": [{"role": "user", "content": "weather?"}], "tools": [tool]},
            {"prompt": "weather?"}]
    path = _file(tmp_path, "p.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    tokenizer = load_tokenizer(ModelConfig())
    ensure_chat_template(tokenizer, "bamba_ft")  # the preset renders tools (builtin:tiny's own template does not)
    shown = [p.render(tokenizer) for p in read_prompts(GenerateConfig(prompts_file=path))]
    assert all("lookup_weather" in text for text in shown[:3]) and "lookup_weather" not in shown[3]
    assert shown[0] == shown[1] == shown[2]
