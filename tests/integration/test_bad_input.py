"""Bad data inputs end in one error naming the file (and line) and the fix: a BambaFTError, which the CLI prints
as one `bamba_ft:` message with exit status 2 and no traceback (test_out_of_memory checks that through the CLI).
Each case runs its composed config in this process: the CLI would add only its ~5 s start per case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bamba_ft.errors import BambaFTError
from tests.integration.conftest import run_in_process

TINY = ["trainer=cpu", "trainer.max_steps=1", "eval.before_training=false", "logger=none"]
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def _jsonl(*rows: dict) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


# name -> (file name or None, file bytes or None (a directory), extra overrides, what the message must contain)
CASES: dict[str, tuple[str | None, bytes | None, list[str], list[str]]] = {
    "non_utf8": ("d.jsonl", _jsonl(CHAT) + b'{"text": "caf\xe9"}\n', [], ["d.jsonl, line 2", "not UTF-8", "0xe9"]),
    "whitespace_only": ("d.jsonl", b"  \n\n\t\n", [], ["d.jsonl: the file is empty (only whitespace)"]),
    "zero_bytes": ("d.jsonl", b"", [], ["d.jsonl: the file is empty (0 bytes)"]),
    "empty_dir": ("d", None, [], ["/d: the directory is empty"]),
    "unknown_roles": ("d.jsonl", _jsonl(CHAT, {"messages": [{"role": "human", "content": "a"},
                                                            {"role": "bot", "content": "b"}]}),
                      [], ["d.jsonl, line 2", "'human', 'bot'", "data.roles={human: user, bot: assistant}"]),
    "mixed_formats": ("d.jsonl", _jsonl(CHAT, CHAT, {"prompt": "p", "completion": "c"}),
                      [], ["d.jsonl, line 3", "no messages", "completion, prompt"]),
    "non_text_content": ("d.jsonl", _jsonl(CHAT, {"messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
        {"role": "assistant", "content": "b"}]}), [], ["d.jsonl, line 2", "'image_url' part"]),
    "no_source": (None, None, [], ["data.source: no value given", "data.source=path/to/train.jsonl"]),
    "prompt_too_long": ("d.jsonl", _jsonl(*[{"prompt": "x" * 80, "completion": "y"}] * 4),
                        ["data.max_seq_len=32", "data.max_tokens_per_batch=64", "data.val_fraction=0"],
                        ["d.jsonl", "4 with a prompt longer than data.max_seq_len", "raise data.max_seq_len"]),
    "offline_hub_id": ("someorg/somedata", None, [], ["data.source=someorg/somedata", "HF_HUB_OFFLINE=1"]),
}


def _run(name: str, root: Path) -> BaseException | None:
    file, data, extra, _ = CASES[name]
    where = root / name
    where.mkdir()
    source: list[str] = []
    if file == "someorg/somedata":
        source = [f"data.source={file}"]
    elif file is not None:
        path = where / file
        path.mkdir() if data is None else path.write_bytes(data)
        source = [f"data.source={path}"]
    try:
        run_in_process(["data=file", *source, *TINY, *extra], where / "run")
    except Exception as e:  # noqa: BLE001 - the test asserts its type
        return e
    return None


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_message(name: str, tmp_path: Path) -> None:
    error = _run(name, tmp_path)
    assert isinstance(error, BambaFTError), repr(error)  # what the CLI reports as one message, exit status 2
    message = str(error)
    assert "Traceback" not in message and "bamba_ft:" not in message, message  # not a wrapped or nested report
    for text in CASES[name][3]:
        assert text in message, f"{text!r} not in:\n{message}"


@pytest.mark.parametrize("files,message", [
    # datasets read only the .jsonl files of this directory and trained on them alone
    ({"chat.jsonl": _jsonl(CHAT, CHAT), "more.csv": b"prompt,completion\np,c\n"},
     "the directory holds .csv and .jsonl files; a directory is read as one format"),
    # file names are split names to datasets: val.jsonl made a validation split and no train split
    ({"chat.jsonl": _jsonl(CHAT, CHAT), "val.jsonl": _jsonl(CHAT)},
     "names a directory's splits by its file names"),
])
def test_a_directory_that_would_be_read_in_part_is_refused(files: dict[str, bytes], message: str,
                                                           tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    for name, content in files.items():
        (data / name).write_bytes(content)
    with pytest.raises(BambaFTError, match=message):
        run_in_process(["data=file", f"data.source={data}", *TINY], tmp_path / "run")


def test_rows_without_an_answer_are_warned_about_from_the_first_line(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Dropped without a warning before; and the 'first' row named was the first in the held-out split's
    shuffled order (line 25 or 40), not in the file."""
    import logging

    caplog.set_level(logging.WARNING)
    data = tmp_path / "d.jsonl"
    no_answer = {"messages": [{"role": "user", "content": "hi"}]}
    data.write_bytes(_jsonl(no_answer, *[CHAT] * 20, *[no_answer] * 19, *[CHAT] * 20))
    run_in_process(["data=file", f"data.source={data}", *TINY], tmp_path / "run")
    warned = [r.getMessage() for r in caplog.records if "hold no token to learn" in r.getMessage()]
    assert warned and f"{data}, line 1)" in warned[0] and "rows dropped" in warned[0], warned


@pytest.mark.parametrize("override,problem", [
    ("data.source=missing.jsonl", "data.source=missing.jsonl: no such file or directory"),
    ("model.name_or_path=out/nomodel", "model.name_or_path=out/nomodel: no such directory"),
])
def test_a_missing_local_path_is_refused_before_the_model_loads(override: str, problem: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """The data file was found missing only after the model and its adapters were built (minutes for a 9B model);
    out/nomodel, with ./out present, went to the Hub as an id (about 30 s of retried requests)."""
    import logging

    from bamba_ft.errors import ConfigError

    caplog.set_level(logging.INFO)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "train.jsonl").write_bytes(_jsonl(CHAT, CHAT))
    with pytest.raises(ConfigError, match=problem):
        run_in_process(["data=file", "data.source=train.jsonl", *TINY, override], tmp_path / "run")
    assert not [r for r in caplog.records if r.getMessage().startswith(("model:", "LoRA"))], caplog.text
