"""recipe=generate: answers from a run, adapter, checkpoint or merged model, to one prompt, a file of prompts, the
lines of standard input, or a chat on the terminal."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from bamba_ft.config.overrides import override_keys
from bamba_ft.config.schema import GenerateConfig, RunConfig
from bamba_ft.data.formats import to_messages, tools_of
from bamba_ft.data.templates import ensure_chat_template
from bamba_ft.errors import ConfigError, DataError
from bamba_ft.jobs.evaluate import generate
from bamba_ft.jobs.report import output_path_problem, publish_file
from bamba_ft.jobs.runtime import choose_device
from bamba_ft.model.restore import load_source, locate

log = logging.getLogger(__name__)

EXIT, RESET = "/exit", "/reset"


@dataclass
class Prompt:
    """One prompt: chat messages (generate.chat=true) or plain text to continue, with where it came from."""

    where: str
    messages: list[dict[str, Any]] | None = None
    text: str | None = None
    reference: str | None = None
    """The answer the prompt's row gave (a `completion`, or the final assistant turn of `messages`)."""
    tools: list[dict[str, Any]] | None = None
    """The tool schemas the row offers the model (its `tools`), passed to the chat template as training does."""

    def render(self, tokenizer: PreTrainedTokenizerBase) -> str:
        if self.messages is None:
            return self.text or ""
        return tokenizer.apply_chat_template(self.messages, tools=self.tools, tokenize=False, add_generation_prompt=True)

    def shown(self) -> str:
        """The prompt as the console shows it: the text, or the conversation's last user turn."""
        if self.messages is None:
            return self.text or ""
        return next((m["content"] for m in reversed(self.messages) if m["role"] == "user"), "")


def system_turn(g: GenerateConfig) -> list[dict[str, Any]]:
    """generate.system as the conversation's opening turn, or nothing."""
    return [{"role": "system", "content": g.system}] if g.system else []


def from_text(text: str, g: GenerateConfig, where: str) -> Prompt:
    if not g.chat:
        return Prompt(where, text=text)
    return Prompt(where, messages=[*system_turn(g), {"role": "user", "content": text}])


def from_row(row: Any, g: GenerateConfig, where: str) -> Prompt:
    """A prompts_file row: {"prompt": text, optional "completion"} or {"messages": [...]} (ShareGPT's
    "conversations" too); a final assistant turn is the reference, and its answer is generated anew."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object with `prompt` or `messages`, not {type(row).__name__}.")
    if "messages" in row or "conversations" in row:
        if not g.chat:
            raise ConfigError(f"{where}: a `messages` row (or one with a `system` field) needs the chat template, and "
                              "generate.chat=false continues plain text.\nFix: drop generate.chat=false, or give "
                              "`prompt` rows without `system`.")
        messages = to_messages(row, "messages", where)
        assert isinstance(messages, list)
        reference = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else None
        if not messages or messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: the conversation has no turn before the answer to generate.\n"
                            "Fix: end `messages` with a user turn (a final assistant turn is read as the reference).")
        return Prompt(where, messages=list(messages), reference=reference, tools=tools_of(messages))
    if isinstance(row.get("prompt"), list):  # a conversational prompt_completion row: the prompt is messages
        prompt = from_row({"messages": row["prompt"], "system": row.get("system"), "tools": row.get("tools")}, g, where)
        completion = row.get("completion")
        if isinstance(completion, list):  # the answer as messages: its last assistant turn is the reference
            completion = next((m.get("content") for m in reversed(completion)
                               if isinstance(m, dict) and m.get("role") == "assistant"), None)
        prompt.reference = completion if isinstance(completion, str) else prompt.reference
        return prompt
    if isinstance(row.get("prompt"), str):
        if row.get("system") is not None or row.get("tools"):  # as training reads the row: not generate.system
            return from_row({**row, "prompt": [{"role": "user", "content": row["prompt"]}]}, g, where)
        prompt = from_text(row["prompt"], g, where)
        completion = row.get("completion")
        prompt.reference = completion if isinstance(completion, str) else None
        return prompt
    if "prompt" in row:
        raise DataError(f"{where}: `prompt` is {type(row['prompt']).__name__}, not text or a list of messages.\n"
                        "Fix: give the prompt as a string, or as [{\"role\": \"user\", \"content\": ...}].")
    raise DataError(f"{where}: a row needs `prompt` (text) or `messages` (a conversation); it has "
                    f"{', '.join(map(str, row)) or 'no fields'}.\nFix: rename its prompt field to `prompt`.")


def line_prompts(lines: Iterable[str], g: GenerateConfig, where: str) -> list[Prompt]:
    """A prompt per non-blank line (a .txt prompts file, standard input), each named by `where` and its line."""
    return [from_text(line.rstrip("\n"), g, f"{where}, line {n}") for n, line in enumerate(lines, 1) if line.strip()]


def read_prompts(g: GenerateConfig) -> list[Prompt] | None:
    """generate.prompt or the rows of generate.prompts_file, checked before the model loads; None: neither is set
    (prompts come from standard input)."""
    if g.prompt is not None:
        if not g.prompt.strip():
            raise ConfigError("generate.prompt is empty.\nFix: give the prompt's text, generate.prompt=\"...\".")
        return [from_text(g.prompt, g, "generate.prompt")]
    if g.prompts_file is None:
        return None
    key = f"generate.prompts_file={g.prompts_file}"
    path = Path(g.prompts_file).expanduser()
    if path.suffix not in (".jsonl", ".txt"):
        raise ConfigError(f"{key}: a prompts file is .jsonl (rows with `prompt` or `messages`) or .txt (a prompt per "
                          "line).\nFix: give the file one of those suffixes.")
    if not path.is_file():
        raise ConfigError(f"{key}: no such file.\nFix: check the path (relative paths start where the command runs).")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{key}: not UTF-8 text (byte {e.start}).\nFix: save the file as UTF-8.") from None
    if path.suffix == ".txt":
        prompts = line_prompts(lines, g, key)
    else:
        prompts = [_json_prompt(line, g, f"{key}, line {n}") for n, line in enumerate(lines, 1) if line.strip()]
    if not prompts:
        raise DataError(f"{key}: the file holds no prompt.")
    return prompts


def _json_prompt(line: str, g: GenerateConfig, where: str) -> Prompt:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno}).\nFix that line (each line one JSON "
                        "object).") from None
    return from_row(row, g, where)


def check_output_file(out: Path) -> None:
    """generate.output_file is written once every answer is in: refuse what would fail there, and a file that is not
    an earlier generations file (a run's metrics.json, say), which it would replace."""
    what = f"generate.output_file={out}"
    if problem := output_path_problem(out, what, directory=False):
        raise ConfigError(problem)
    if out.is_file() and out.stat().st_size and not _generations_file(out):
        raise ConfigError(f"{what} exists and is not an earlier generations file (JSON lines with `where` and "
                          "`answer`), so writing the answers would replace it.\nFix: name another file, or move "
                          "that one away yourself.")


def _generations_file(path: Path) -> bool:
    """Whether `path` starts as generations.jsonl does: a JSON object with `where` and `answer`."""
    try:
        with path.open(encoding="utf-8") as f:
            row = json.loads(f.readline())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(row, dict) and {"where", "answer"} <= row.keys()


def chat(model: nn.Module, tokenizer: PreTrainedTokenizerBase, g: GenerateConfig, device: torch.device,
         read: Callable[[str], str] = input) -> list[dict]:
    """A conversation on the terminal, each answer printed as it is generated; /reset starts over, /exit or
    end of input (Ctrl-D) ends it. With generate.chat=false each line is a text to continue, without history."""
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history = system_turn(g)
    turns: list[dict] = []
    print(f"type a message; {RESET} starts over, {EXIT} (or Ctrl-D) ends")
    while True:
        try:
            line = read("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not line.strip():
            continue
        if line.strip() == EXIT:
            break
        if line.strip() == RESET:
            history = system_turn(g)
            print("(started over)")
            continue
        prompt = from_text(line, g, f"chat, turn {len(turns) + 1}")
        if prompt.messages is not None:
            prompt.messages = [*history, prompt.messages[-1]]
        print("model> ", end="", flush=True)
        answer = generate(model, tokenizer, [prompt.render(tokenizer)], g, device, add_special_tokens=not g.chat,
                          streamer=streamer)[0]
        if prompt.messages is not None:
            history = [*prompt.messages, {"role": "assistant", "content": answer}]
        turns.append(_record(prompt, answer))
    return turns


def _record(prompt: Prompt, answer: str) -> dict:
    row: dict[str, Any] = {"where": prompt.where}
    row.update({"messages": prompt.messages} if prompt.messages is not None else {"text": prompt.text})
    row["answer"] = answer
    if prompt.reference is not None:
        row["reference"] = prompt.reference
    return row


def run(cfg: RunConfig) -> dict:
    """recipe=generate: load the model once, answer every prompt, write them with their answers as JSON lines."""
    g = cfg.generate
    prompts = read_prompts(g)  # a bad prompts file fails before the model loads
    out = Path(g.output_file).expanduser() if g.output_file else Path(cfg.output_dir) / "generations.jsonl"
    check_output_file(out)  # and so does an output file that cannot be written or would replace another file
    device = choose_device(cfg.trainer.accelerator)
    src = locate(g.checkpoint, cfg)
    src.refuse_ignored(override_keys())
    model, tokenizer = load_source(src, device)
    # the run's template (and so its stop tokens), unless the command line names another
    template = cfg.data.chat_template
    if src.run is not None and "data.chat_template" not in override_keys():
        template = src.run.data.chat_template
    ensure_chat_template(tokenizer, template)
    torch.manual_seed(cfg.trainer.seed)  # sampling (generate.do_sample=true) repeats with the seed
    log.info("generating with %s", src.description)
    if prompts is None and sys.stdin.isatty():
        rows = chat(model, tokenizer, g, device)
    else:
        if prompts is None:
            prompts = line_prompts(sys.stdin, g, "standard input")
            if not prompts:
                raise ConfigError("no prompt: standard input was empty.\nFix: give generate.prompt=\"...\" or "
                                  "generate.prompts_file=FILE, or run on a terminal to chat.")
        answers = generate(model, tokenizer, [p.render(tokenizer) for p in prompts], g, device,
                           add_special_tokens=not g.chat)
        rows = [_record(p, a) for p, a in zip(prompts, answers)]
        for i, (p, a) in enumerate(zip(prompts, answers), 1):
            head = f"[{i}/{len(prompts)}] " if len(prompts) > 1 else ""
            print(f"{head}prompt: {p.shown()}\n{' ' * len(head)}answer: {a}")
    if rows:
        publish_file(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"generations: {out}")
    return {"source": src.description, "generations": len(rows), "output_file": str(out) if rows else None}
