"""Data formats, label masks (token by token), length policy, packing, and the errors users see."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DataCollatorWithFlattening

from bamba_ft.config.schema import CHOICES, DataConfig, SourceConfig
from bamba_ft.data.formats import FORMATS, to_messages
from bamba_ft.data.module import BambaDataModule
from bamba_ft.data.packing import LOSS_INDEX, BatchPlan, collate_packed, pack_batches
from bamba_ft.data.tokenize import IGNORE_INDEX, split_windows, tokenize_example
from bamba_ft.errors import ConfigError, DataError

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def expected_labels(tokenizer, parts: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:  # noqa: ANN001
    """Token ids and labels built piece by piece: (text, has_loss) in order."""
    ids, labels = [], []
    for text, loss in parts:
        t = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += t
        labels += t if loss else [IGNORE_INDEX] * len(t)
    labels[0] = IGNORE_INDEX
    return ids, labels


def test_messages_label_mask_token_by_token(builtin_tokenizer) -> None:  # noqa: ANN001
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"}]
    tok = tokenize_example(builtin_tokenizer, messages, "completion", 512)
    ids, labels = expected_labels(builtin_tokenizer, [
        ("<|system|>Be brief.<|end|><|user|>2+2?<|end|><|assistant|>", False), ("4<|end|>", True),
        ("<|user|>3+3?<|end|><|assistant|>", False), ("6<|end|>", True)])
    assert tok.input_ids == ids
    assert tok.labels == labels
    everything = tokenize_example(builtin_tokenizer, messages, "all", 512)
    assert everything.labels == [IGNORE_INDEX] + ids[1:]


@pytest.mark.parametrize("fmt,row,parts", [
    ("prompt_completion", {"prompt": "1+2?", "completion": "3"},
     [("<|user|>1+2?<|end|><|assistant|>", False), ("3<|end|>", True)]),
    # a prompt of messages is context, its assistant turns included: loss on the completion only
    ("prompt_completion", {"prompt": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": "3"},
                                      {"role": "user", "content": "+1?"}],
                           "completion": [{"role": "assistant", "content": "4"}], "system": "Add."},
     [("<|system|>Add.<|end|><|user|>1+2?<|end|><|assistant|>3<|end|><|user|>+1?<|end|><|assistant|>", False),
      ("4<|end|>", True)]),
    ("alpaca", {"instruction": "Reverse.", "input": "cat", "output": "tac"},
     [("<|user|>Reverse.\n\ncat<|end|><|assistant|>", False), ("tac<|end|>", True)]),
    ("alpaca", {"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be kind."},
     [("<|system|>Be kind.<|end|><|user|>Say hi.<|end|><|assistant|>", False), ("hi<|end|>", True)]),
    ("messages", {"conversations": [{"from": "human", "value": "Sky?"}, {"from": "gpt", "value": "blue"}]},
     [("<|user|>Sky?<|end|><|assistant|>", False), ("blue<|end|>", True)]),
    ("text", {"text": "the cat"}, [("the cat<|end|>", True)]),
    # a messages row's own system field is its system turn, as for the other formats
    ("messages", {"system": "Be a pirate.", "messages": [{"role": "user", "content": "Sky?"},
                                                         {"role": "assistant", "content": "blue"}]},
     [("<|system|>Be a pirate.<|end|><|user|>Sky?<|end|><|assistant|>", False), ("blue<|end|>", True)]),
    ("messages", {"system": "Be a pirate.", "conversations": [{"from": "system", "value": "Be a pirate."},
                                                              {"from": "human", "value": "Sky?"},
                                                              {"from": "gpt", "value": "blue"}]},
     [("<|system|>Be a pirate.<|end|><|user|>Sky?<|end|><|assistant|>", False), ("blue<|end|>", True)]),
])
def test_formats_label_mask(builtin_tokenizer, fmt: str, row: dict, parts: list) -> None:  # noqa: ANN001
    tok = tokenize_example(builtin_tokenizer, to_messages(row, fmt, "test"), "completion", 512)
    ids, labels = expected_labels(builtin_tokenizer, parts)
    assert (tok.input_ids, tok.labels) == (ids, labels)


@pytest.mark.parametrize("key,turns", [
    ("messages", [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5", "weight": 0},
                  {"role": "user", "content": "Sure?"}, {"role": "assistant", "content": "4", "weight": 1}]),
    ("conversations", [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "5", "weight": 0.0},
                       {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "4", "weight": None}]),
])
def test_an_assistant_turn_of_weight_0_carries_no_loss(builtin_tokenizer, key: str, turns: list) -> None:  # noqa: ANN001
    """OpenAI's fine-tuning format (and ShareGPT files written for it) marks turns not to learn with weight 0."""
    tok = tokenize_example(builtin_tokenizer, to_messages({key: turns}, "messages", "test"), "completion", 512)
    ids, labels = expected_labels(builtin_tokenizer, [
        ("<|user|>2+2?<|end|><|assistant|>5<|end|><|user|>Sure?<|end|><|assistant|>", False), ("4<|end|>", True)])
    assert (tok.input_ids, tok.labels) == (ids, labels)


def test_a_turn_weight_other_than_0_or_1_is_named() -> None:
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello", "weight": 0.5}]}
    with pytest.raises(DataError, match=r"(?s)x.jsonl, line 4, message 1: weight=0.5.*0 \(no loss on this turn\) "
                                        r"or 1.*Fix:"):
        to_messages(row, "messages", "x.jsonl, line 4")


@pytest.mark.parametrize("fmt,conversation", [
    ("messages", {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello"}]}),
    ("prompt_completion", {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
                           "completion": "Hello"}),
])
def test_a_system_field_beside_another_system_message_is_named(fmt: str, conversation: dict) -> None:
    with pytest.raises(DataError, match=r"(?s)x.jsonl, line 2: the row's system field \('Be a pirate.'\) and its "
                                        r"first message, a system message \('Be kind.'\), differ.*Fix:"):
        to_messages({"system": "Be a pirate.", **conversation}, fmt, "x.jsonl, line 2")


@pytest.mark.parametrize("name,fmt", [("messages", "messages"), ("sharegpt", "messages"),
                                      ("prompt_completion", "prompt_completion"), ("alpaca", "alpaca"), ("text", "text")])
def test_each_format_loads_from_file(builtin_tokenizer, name: str, fmt: str) -> None:  # noqa: ANN001
    dm = BambaDataModule(DataConfig(source=str(ASSETS / f"{name}.jsonl"), val_fraction=0.25), builtin_tokenizer)
    dm.prepare()
    assert dm.fmt == fmt
    assert dm.stats["train"].kept + dm.stats["val"].kept == dm.stats["train"].rows + dm.stats["val"].rows
    example = dm.train_set[0]
    assert example["labels"][0] == IGNORE_INDEX
    assert any(t != IGNORE_INDEX for t in example["labels"])


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_other_file_types(builtin_tokenizer, tmp_path: Path, suffix: str) -> None:  # noqa: ANN001
    import datasets

    ds = datasets.load_dataset("json", data_files=str(ASSETS / "prompt_completion.jsonl"), split="train")
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        ds.to_parquet(str(path))
    elif suffix == ".csv":
        ds.to_csv(str(path), index=False)
    else:
        path.write_text(json.dumps(ds.to_list()))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.0), builtin_tokenizer)
    dm.prepare()
    assert dm.stats["train"].kept == 8 and dm.fmt == "prompt_completion"


def test_a_validation_fraction_that_leaves_nothing_to_train_is_named(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "few.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {i} 1", "completion": str(i + 1)}) + "\n" for i in range(60)))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.99), builtin_tokenizer)
    with pytest.raises(DataError, match=r"(?s)data.val_fraction=0.99 holds out 60 of its 60 rows.*Fix: lower"):
        dm.prepare()
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.05), builtin_tokenizer)
    dm.prepare()  # ceil(0.05 * 60) = 3 held out, as datasets rounds
    assert (dm.stats["train"].rows, dm.stats["val"].rows) == (57, 3)


def test_a_chat_template_syntax_error_names_the_template(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from bamba_ft.data.templates import ensure_chat_template

    # a path over 80 characters too (pytest -n's tmp_path is longer): it was shown as "(inline Jinja)"
    for path in (tmp_path / "chat.jinja", tmp_path / ("d" * 80) / "chat.jinja"):
        path.parent.mkdir(exist_ok=True)
        path.write_text('{% for m in messages %}\n{{ m["content"] }\n{% endfor %}')
        with pytest.raises(ConfigError, match=rf"data.chat_template={path}: template line 2: unexpected '}}'"):
            ensure_chat_template(builtin_tokenizer, str(path))


def test_an_open_quote_in_a_csv_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """pandas reads up to the next quote as one field and says nothing; at the end of the file it fails with a
    message that datasets wraps in 'An error occurred while generating the dataset'."""
    from bamba_ft.data.load import load_rows

    closed_later = tmp_path / "later.csv"
    closed_later.write_text('prompt,completion\nadd 1 1,2\n"add 1 2,3\nadd 0 0,0"\nadd 2 2,4\n')
    with caplog.at_level("WARNING", logger="bamba_ft"):
        assert len(load_rows(str(closed_later), "train", "data.source")) == 3
    assert "1 row(s) hold a line break inside a quoted field (first: row 2)" in caplog.text
    never_closed = tmp_path / "open.csv"
    never_closed.write_text('prompt,completion\nadd 1 1,2\n"add 1 2,3\nadd 0 0,0\n')
    with pytest.raises(DataError, match=r"(?s)open.csv, line 3: the row that starts here opens a quoted field that "
                                        r"is not closed before the end of the file.\nFix: close the quote"):
        load_rows(str(never_closed), "train", "data.source")


def test_a_csv_line_with_more_fields_than_the_header_is_named_with_the_fix(tmp_path: Path) -> None:
    """pandas' "Expected 2 fields in line 6, saw 4" came with no fix, and its line counts records: after a quoted
    field over two lines it is one less than the file's."""
    from bamba_ft.data.load import load_rows

    ragged = tmp_path / "ragged.csv"
    ragged.write_text('prompt,completion\n"add 1\n1",2\nadd 1 2,3\n\nadd 2, 2,4,x\nadd 0 0,0\n')
    with pytest.raises(DataError, match=r'(?s)ragged.csv, line 6: 4 fields where the header \(line 1\) has 2: prompt, '
                                        r'completion.\nFix: put each field that holds a comma in double quotes \("a, b"'):
        load_rows(str(ragged), "train", "data.source")


def test_malformed_json_line_is_named(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "bad.jsonl"
    lines = (ASSETS / "text.jsonl").read_text().splitlines()
    lines.insert(3, '{"text": "broken"')
    path.write_text("\n".join(lines) + "\n")
    dm = BambaDataModule(DataConfig(source=str(path)), builtin_tokenizer)
    with pytest.raises(DataError, match=rf"malformed JSON at {path}:4"):
        dm.prepare()


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_byte_order_mark_is_read_as_datasets_reads_it(tmp_path: Path, suffix: str) -> None:
    # editors on Windows save UTF-8 with a BOM; datasets reads such files, so they are not refused as malformed
    from bamba_ft.data.load import LINE, load_rows

    rows = [{"text": f"t{i}"} for i in range(3)]
    body = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl" else json.dumps(rows, indent=0)
    path = tmp_path / f"bom{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    ds = load_rows(str(path), "train", "data.source")
    assert ds["text"] == ["t0", "t1", "t2"]
    assert ds[LINE] == ([1, 2, 3] if suffix == ".jsonl" else [2, 5, 8])


def _rows_under_a_key(path: Path, rows: dict[str, list[dict]], indent: int | None) -> None:
    """A .json file holding one JSON object, its rows listed under the keys of `rows` (as many exports write)."""
    path.write_text(json.dumps({"version": 1, **rows}, indent=indent))


@pytest.mark.parametrize("indent", [None, 2], ids=["one line", "pretty"])
@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
def test_a_json_object_whose_rows_are_under_a_key_is_named_with_the_key_and_the_fix(
        builtin_tokenizer, tmp_path: Path, indent: int | None, streaming: bool) -> None:  # noqa: ANN001
    """Read as it is, a one-line object was one row whose fields fit no format (a format-detection error), and a
    pretty-printed one a malformed first line of JSON Lines."""
    path = tmp_path / "export.json"
    _rows_under_a_key(path, {"data": [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]}, indent)
    with pytest.raises(DataError, match=rf'(?s)^data.source={path}: the file holds one JSON object \(keys: version, '
                                        r'data\) rather than rows: its list of 3 rows is under key "data".\nFix: set '
                                        r"data.field=data to read them, or convert the file to JSON Lines \(one row a "
                                        r"line\): jq -c '.data\[\]' export.json > export.jsonl$"):
        BambaDataModule(DataConfig(source=str(path), streaming=streaming), builtin_tokenizer).prepare()
    sources = [SourceConfig(source=str(ASSETS / "text.jsonl")), SourceConfig(source=str(path))]
    with pytest.raises(DataError, match=r"(?s)data.sources\[1\].source=.*Fix: set data.sources\[1\].field=data "):
        BambaDataModule(DataConfig(sources=sources, streaming=streaming, val_fraction=0.0), builtin_tokenizer).prepare()
    with pytest.raises(DataError, match=r"(?s)data.val_source=.*Fix: set data.val_field=data "):
        BambaDataModule(DataConfig(source=str(ASSETS / "text.jsonl"), val_source=str(path), streaming=streaming),
                        builtin_tokenizer).prepare()
    _rows_under_a_key(path, {"train": [{"text": "t"}] * 4, "test": [{"text": "v"}]}, indent)
    with pytest.raises(DataError, match=r'(?s)its lists of rows are under keys "train" \(4 rows\) and "test" \(1 '
                                        r'rows\).\nFix: set data.field=train to read those under "train"'):
        BambaDataModule(DataConfig(source=str(path), streaming=streaming), builtin_tokenizer).prepare()


def test_a_one_line_row_or_a_json_array_is_still_read_as_rows(tmp_path: Path) -> None:
    """A lone object holding a row format's fields is one row (its list of messages is no list of rows)."""
    from bamba_ft.data.load import load_rows

    row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "one.json"
    path.write_text(json.dumps(row))
    assert load_rows(str(path), "train", "data.source")["messages"] == [row["messages"]]


@pytest.mark.parametrize("indent", [None, 2], ids=["one line", "pretty"])
def test_data_field_reads_the_rows_under_its_key_with_their_lines(builtin_tokenizer, tmp_path: Path,
                                                                  indent: int | None) -> None:  # noqa: ANN001
    from bamba_ft.data.load import LINE, load_rows

    rows = [{"prompt": f"add {i} 1", "completion": str(i + 1)} for i in range(5)]
    path = tmp_path / "export.json"
    _rows_under_a_key(path, {"data": rows, "test": [{"prompt": "add 9 9", "completion": "18"}]}, indent)
    ds = load_rows(str(path), "train", "data.source", field="data")
    assert ds["prompt"] == [r["prompt"] for r in rows]
    text = path.read_text().splitlines()  # pretty: a row's opening brace is on the line before its prompt
    prompts = [next(k for k, line in enumerate(text, start=1) if f'"add {i} 1"' in line) for i in range(5)]
    assert ds[LINE] == ([1] * 5 if indent is None else [k - 1 for k in prompts])
    cfg = DataConfig(source=str(path), field="data", val_source=str(path), val_field="test")
    dm = BambaDataModule(cfg, builtin_tokenizer)
    dm.prepare()
    assert (dm.stats["train"].kept, dm.stats["val"].kept, dm.fmt) == (5, 1, "prompt_completion")
    assert dm.val_rows[0][-1]["content"] == "18"
    stream = BambaDataModule(DataConfig(source=str(path), field="data", streaming=True, val_fraction=0.0),
                             builtin_tokenizer)
    stream.prepare()
    assert [r["prompt"] for r in stream.stream] == [r["prompt"] for r in rows]


def test_a_data_field_that_does_not_name_the_rows_is_named_with_the_fix(tmp_path: Path) -> None:
    from bamba_ft.data.load import load_rows

    path = tmp_path / "export.json"
    _rows_under_a_key(path, {"data": [{"text": "a"}, {"text": "b"}]}, 2)
    with pytest.raises(DataError, match=r'(?s)data.field=dat: .*export.json has no key "dat"; its keys: version, data.'
                                        r" Did you mean 'data'\?\nFix: set data.field to the key of the list that "
                                        r"holds the rows \(data.field=data\)"):
        load_rows(str(path), "train", "data.source", field="dat")
    _rows_under_a_key(path, {"data": [{"text": "a"}, "b"]}, 2)
    with pytest.raises(DataError, match=r'data.sources\[0\].field=version: the value under key "version" in .* is a '
                                        r"number, not a list of rows"):
        load_rows(str(path), "train", "data.sources[0].source", field="version")
    with pytest.raises(DataError, match=rf"data.source: {path}:7: each element must be a JSON object, got str"):
        load_rows(str(path), "train", "data.source", field="data")
    lines = tmp_path / "lines.json"
    lines.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"(?s)data.val_field=data: .*lines.json holds more than one JSON value \(the "
                                        r"second at line 2\), as JSON Lines do.*Fix: drop data.val_field"):
        load_rows(str(lines), "train", "data.val_source", field="data")


def test_a_data_field_beside_a_file_that_is_not_json_is_refused(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    from bamba_ft.config.schema import RunConfig, validate

    monkeypatch.chdir(tmp_path)
    Path("train.jsonl").touch()
    Path("d.json").touch()
    with pytest.raises(ConfigError, match=r"(?s)data.field=data: data.source=train.jsonl is not a .json file.*Fix: "
                                          r"drop data.field"):
        validate(RunConfig(data=DataConfig(source="train.jsonl", field="data")))
    with pytest.raises(ConfigError, match=r"data.val_field=test: data.val_source is not set"):
        validate(RunConfig(data=DataConfig(source="d.json", val_field="test")))
    with pytest.raises(ConfigError, match=r"data.field=data and data.sources are both set"):
        validate(RunConfig(data=DataConfig(field="data", sources=[SourceConfig(source="d.json", field="data")])))
    validate(RunConfig(data=DataConfig(source="d.json", field="data", val_source="d.json", val_field="test")))


@pytest.mark.parametrize("streaming", [False, True])
def test_a_validation_split_of_a_single_file_is_refused(builtin_tokenizer, streaming: bool) -> None:  # noqa: ANN001
    # a file has no splits: data.val_split would read the whole training file again as validation
    cfg = DataConfig(source=str(ASSETS / "text.jsonl"), val_split="test", streaming=streaming)
    with pytest.raises(DataError, match=r"(?s)data.val_split=test: data.source=.*text.jsonl is one file.*data.val_source"):
        BambaDataModule(cfg, builtin_tokenizer).prepare()


def test_malformed_json_array_is_named_without_the_jsonl_advice(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "bad.json"
    path.write_text('[\n {"text": "a"},\n {"text": "b"}\n {"text": "c"}\n]\n')  # a comma left out
    with pytest.raises(DataError, match=rf"(?s)malformed JSON at {path}:4:2: Expecting ',' delimiter.\nFix the JSON "
                                        r"there \(the file is one JSON array of objects\)"):
        BambaDataModule(DataConfig(source=str(path)), builtin_tokenizer).prepare()


def test_no_validation_examples_means_no_validation(builtin_tokenizer, caplog) -> None:  # noqa: ANN001
    # as in a stream (data.streaming), data.max_val_examples=0 turns validation off rather than failing on an
    # empty validation split
    dm = BambaDataModule(DataConfig(source=str(ASSETS / "text.jsonl"), val_fraction=0.25, max_val_examples=0),
                         builtin_tokenizer)
    dm.prepare()
    assert dm.val_set is None and "val" not in dm.stats and dm.val_dataloader() == []
    assert "data.max_val_examples=0: no validation." in caplog.text
    from bamba_ft.data.load import load_rows

    assert dm.stats["train"].rows == len(load_rows(str(ASSETS / "text.jsonl"), "train", "data.source"))  # all trained


@pytest.mark.parametrize("name", ["header.csv", "none.json", "none.parquet"])
def test_a_file_without_rows_is_named_as_such(tmp_path: Path, name: str) -> None:
    # datasets' readers fail on these with 'Instruction "train" corresponds to no data!' or an Arrow batch size
    import pandas as pd

    from bamba_ft.data.load import load_rows

    path = tmp_path / name
    if name.endswith(".csv"):
        path.write_text("prompt,completion\n")
    elif name.endswith(".json"):
        path.write_text("[]\n")
    else:
        pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(path)
    with pytest.raises(DataError, match=rf"(?s){name}: the file has no rows .*Fix: point data.source at a file with "):
        load_rows(str(path), "train", "data.source")


def test_missing_fields_name_expected_and_found(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n' * 4)
    with pytest.raises(DataError, match=r"expects fields instruction, output .*found: answer, question"):
        BambaDataModule(DataConfig(source=str(path), format="alpaca"), builtin_tokenizer).prepare()
    with pytest.raises(DataError, match=r"cannot tell the data format .*answer, question"):
        BambaDataModule(DataConfig(source=str(path)), builtin_tokenizer).prepare()


def test_overlong_truncate_or_drop_counted(builtin_tokenizer) -> None:  # noqa: ANN001
    src = str(ASSETS / "alpaca.jsonl")
    cut = BambaDataModule(DataConfig(source=src, max_seq_len=28, val_fraction=0.0), builtin_tokenizer)
    cut.prepare()
    st = cut.stats["train"]
    assert st.truncated == 7 and st.kept == 8 and max(cut.train_set["length"]) == 28
    drop = BambaDataModule(DataConfig(source=src, max_seq_len=28, overlong="drop", val_fraction=0.0), builtin_tokenizer)
    drop.prepare()
    st = drop.stats["train"]
    assert (st.dropped_overlong, st.kept, st.truncated) == (7, 1, 0)


def test_empty_after_filtering_says_how_to_fix(builtin_tokenizer) -> None:  # noqa: ANN001
    cfg = DataConfig(source=str(ASSETS / "alpaca.jsonl"), max_seq_len=8, overlong="drop", val_fraction=0.0)
    with pytest.raises(DataError, match=r"(?s)no train examples left .*Fix: raise data.max_seq_len"):
        BambaDataModule(cfg, builtin_tokenizer).prepare()


def test_pack_batches_fills_budget_once_each() -> None:
    g = torch.Generator().manual_seed(0)
    lengths = [int(x) for x in torch.randint(1, 600, (500,), generator=g)]
    batches = pack_batches(lengths, 2048, seed=1)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in batches)
    efficiency = sum(lengths) / (len(batches) * 2048)
    assert efficiency > 0.98, efficiency
    assert pack_batches(lengths, 2048, seed=1) == batches
    assert pack_batches(lengths, 2048, seed=2) != batches


def test_batch_plan_shards_ranks_evenly() -> None:
    lengths = [50 + (i * 37) % 300 for i in range(200)]
    plans = [BatchPlan(lengths, True, 1024, 8, seed=0, rank=r, world_size=3) for r in range(3)]
    seen = [set(i for b in p.plan() for i in b) for p in plans]
    assert len({len(p) for p in plans}) == 1
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2]) and not (seen[0] & seen[2])


def test_batch_plan_skip_resumes_mid_epoch() -> None:
    lengths = [50 + (i * 37) % 300 for i in range(100)]
    plan = BatchPlan(lengths, True, 1024, 8, seed=0)
    full = list(plan)
    plan.skip = 3
    assert list(plan) == full[3:]
    assert list(plan) == full  # the skip applies once


def test_collate_packed_matches_transformers_flattening() -> None:
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [-100]},
                {"input_ids": [9, 10], "labels": [-100, 10]}]
    ours = collate_packed(examples)
    theirs = DataCollatorWithFlattening(return_seq_idx=True, return_flash_attn_kwargs=True, return_tensors="pt")(
        [dict(e) for e in examples])
    assert set(ours) == set(theirs) | {LOSS_INDEX}  # ours also says which rows the loss reads
    assert ours.pop(LOSS_INDEX).tolist() == [0, 1, 4]  # tokens 5, 6 and 9 have a target next
    for key in ours:
        if torch.is_tensor(ours[key]):
            assert torch.equal(ours[key].long(), theirs[key].long()), key
            # int32 everywhere the kernels read positions; transformers gives int64 position_ids
            assert ours[key].dtype == (torch.int32 if key == "position_ids" else theirs[key].dtype), key
        else:
            assert ours[key] == theirs[key], key


def test_eval_plan_covers_every_example_once_on_every_rank_count() -> None:
    from bamba_ft.data.packing import MaskedRows

    lengths = [50 + (i * 37) % 300 for i in range(101)]
    for world in (1, 2, 3, 5):
        plans = [BatchPlan(lengths, True, 1024, 8, seed=0, shuffle=False, rank=r, world_size=world, pad=True)
                 for r in range(world)]
        assert len({len(p) for p in plans}) == 1  # collectives (FSDP) see the same number of batches
        real = sorted(i for p in plans for b in p.plan() for i in b if i >= 0)
        assert real == list(range(101))
    rows = MaskedRows([{"input_ids": [5, 6], "labels": [-100, 6]}])
    assert rows[0]["labels"] == [-100, 6] and rows[-1] == {"input_ids": [5, 6], "labels": [-100, -100]}


def test_shipped_tokenizer_is_the_builtin_one(builtin_tokenizer) -> None:  # noqa: ANN001
    from transformers import AutoTokenizer

    from bamba_ft.model.build import resolve_path

    shipped = AutoTokenizer.from_pretrained(resolve_path("builtin:tiny"))
    assert shipped.get_vocab() == builtin_tokenizer.get_vocab()
    assert shipped.chat_template == builtin_tokenizer.chat_template
    text = "<|user|>Sort the letters of cab.<|end|><|assistant|>abc<|end|>"
    assert shipped(text)["input_ids"] == builtin_tokenizer(text)["input_ids"]


def test_validation_file_may_use_another_format(builtin_tokenizer) -> None:  # noqa: ANN001
    dm = BambaDataModule(DataConfig(source=str(ASSETS / "alpaca.jsonl"), val_source=str(ASSETS / "messages.jsonl")),
                         builtin_tokenizer)
    dm.prepare()
    assert dm.formats == {"train": "alpaca", "validation": "messages"}
    assert dm.val_rows[0][-1] == {"role": "assistant", "content": "hi"}


def test_list_content_and_role_renames_mask_token_by_token(builtin_tokenizer) -> None:  # noqa: ANN001
    row = {"messages": [{"role": "human", "content": [{"type": "text", "text": "Sky"}, {"type": "text", "text": "?"}]},
                        {"role": "bot", "content": [{"type": "text", "text": "blue"}]},
                        {"role": "human", "content": "Sea?"}, {"role": "bot", "content": "deep"}]}
    with pytest.raises(DataError, match=r"(?s)line 3: unknown chat roles 'human', 'bot' .*data.roles=\{human: user, bot: assistant\}"):
        to_messages(row, "messages", "x.jsonl, line 3")
    messages = to_messages(row, "messages", "test", {"human": "user", "bot": "assistant"})
    tok = tokenize_example(builtin_tokenizer, messages, "completion", 512)
    ids, labels = expected_labels(builtin_tokenizer, [
        ("<|user|>Sky?<|end|><|assistant|>", False), ("blue<|end|>", True),
        ("<|user|>Sea?<|end|><|assistant|>", False), ("deep<|end|>", True)])
    assert (tok.input_ids, tok.labels) == (ids, labels)
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}
    with pytest.raises(DataError, match=r"x.jsonl, line 3, message 0: its content holds a 'image_url' part"):
        to_messages(image, "messages", "x.jsonl, line 3")


def test_conversation_without_assistant_turn_has_no_loss(builtin_tokenizer) -> None:  # noqa: ANN001
    tok = tokenize_example(builtin_tokenizer, [{"role": "user", "content": "hello"}], "completion", 512)
    assert set(tok.labels) == {IGNORE_INDEX} and tok.full_targets == 0


def test_errors_name_the_file_line_after_the_split_shuffle(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    good = json.dumps({"prompt": "a", "completion": "b"})
    lines = [good] * 200
    lines[57] = json.dumps({"prompt": "a", "completion": None})
    lines.insert(10, "")  # blank lines are skipped by the reader but still count as file lines
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n")
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.25), builtin_tokenizer)
    with pytest.raises(DataError, match=rf"{path}, line 59: this row has no completion; its fields are prompt,"):
        dm.prepare()


def test_a_row_missing_one_field_names_that_field(tmp_path: Path) -> None:
    from bamba_ft.data.load import load_rows

    path = tmp_path / "d.csv"
    path.write_text("instruction,output\nq1,a1\nq2,\n")  # an empty CSV cell reads as no value
    rows = load_rows(str(path), "train", "data.source")
    with pytest.raises(DataError, match=r"d.csv, row 2: this row has no output; its fields are instruction, but"):
        [to_messages(r, "alpaca", f"data.source={path}, row {r['__row__']}") for r in rows]


def test_a_csv_column_of_conversations_written_as_json_text_says_to_keep_the_lists(tmp_path: Path) -> None:
    """A chat set saved with pandas' to_csv holds each conversation as JSON text: the error said a list was needed,
    without saying that the file was the reason."""
    from bamba_ft.data.load import load_rows

    path = tmp_path / "chat.csv"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    path.write_text('messages\n"' + json.dumps(turns).replace('"', '""') + '"\n')
    (row,) = load_rows(str(path), "train", "data.source")
    with pytest.raises(DataError, match=r"(?s)chat.csv, row 1: 'messages' is text that spells a JSON list.*"
                                        r"Fix: write the rows as .jsonl or .parquet"):
        to_messages(row, "messages", f"data.source={path}, row {row['__row__']}")
    with pytest.raises(DataError, match=r"(?s)'messages' must be a non-empty list .*Fix: give each row its conversation"):
        to_messages({"messages": []}, "messages", "x.jsonl, line 1")


def test_empty_answers_and_numbers_are_counted(builtin_tokenizer, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    rows = [{"prompt": "a", "completion": "b"}] * 6 + [{"prompt": "a", "completion": " "}] * 2 + [
        {"prompt": "a", "completion": 7}] * 3
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.0), builtin_tokenizer)
    dm.prepare()
    st = dm.stats["train"]
    assert (st.rows, st.kept, st.empty_assistant, st.coerced) == (11, 11, 2, 3)
    assert "2 train rows have an empty assistant message" in caplog.text and f"{path}, line 7" in caplog.text
    assert "3 train rows hold a number" in caplog.text and f"{path}, line 9" in caplog.text


def test_answers_the_tokenizer_cannot_encode_are_counted(builtin_tokenizer, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """Characters outside the vocabulary become its unknown token, on which the loss then trains the model; one in
    the prompt only is no loss target."""
    rows = [{"prompt": "a", "completion": "b"}] * 3 + [{"prompt": "é", "completion": "b"}] + [
        {"prompt": "a", "completion": "héllo"}, {"prompt": "a", "completion": "日本"}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.0), builtin_tokenizer)
    dm.prepare()
    assert dm.stats["train"].unknown_targets == 2
    assert "2 train rows have answer text the tokenizer cannot encode" in caplog.text and f"{path}, line 5" in caplog.text


def test_prompt_longer_than_max_seq_len_is_counted_apart(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    rows = [{"prompt": "x" * 40, "completion": "y"}] * 2 + [{"prompt": "x", "completion": "y"}] * 3
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.0, max_seq_len=20), builtin_tokenizer)
    dm.prepare()
    st = dm.stats["train"]
    assert (st.kept, st.dropped_prompt_too_long, st.dropped_no_targets, st.truncated) == (3, 2, 0, 0)


@pytest.mark.parametrize("overlap", [0, 1, 5])
def test_split_windows_train_every_label_once(overlap: int) -> None:
    g = torch.Generator().manual_seed(overlap)
    ids = torch.randint(0, 100, (103,), generator=g).tolist()
    labels = [t if keep else IGNORE_INDEX for t, keep in zip(ids, torch.rand(103, generator=g).gt(0.3).tolist())]
    labels[0] = IGNORE_INDEX
    windows = split_windows(ids, labels, 16, overlap)
    step = 16 - max(overlap, 1)
    assert all(len(w) == 16 for w, _ in windows[:-1]) and (len(windows) - 1) * step + len(windows[-1][0]) == 103
    trained_at: list[int] = []  # the original position of each trained label, window by window
    for k, (w_ids, w_labels) in enumerate(windows):
        assert len(w_ids) <= 16 and w_ids == ids[k * step : k * step + 16]
        assert w_labels[0] == IGNORE_INDEX
        trained_at += [k * step + j for j, t in enumerate(w_labels) if t != IGNORE_INDEX]
    assert trained_at == [p for p, t in enumerate(labels) if t != IGNORE_INDEX]  # each once, in order
    trained = [t for _, w_labels in windows for t in w_labels if t != IGNORE_INDEX]
    assert trained == [t for t in labels if t != IGNORE_INDEX]


def test_overlong_split_through_the_data_module(builtin_tokenizer, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    long_text = "".join(chr(97 + i % 26) for i in range(300))
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": long_text}) + "\n" + json.dumps({"text": "short"}) + "\n")
    cfg = DataConfig(source=str(path), format="text", val_fraction=0.0, max_seq_len=64, overlong="split",
                     overlong_stride=8, max_tokens_per_batch=64)
    dm = BambaDataModule(cfg, builtin_tokenizer)
    with caplog.at_level("INFO", logger="bamba_ft.data.module"):
        dm.prepare()
    st = dm.stats["train"]
    full = tokenize_example(builtin_tokenizer, long_text, "all", None)
    n_windows = -(-(len(full.input_ids) - 64) // 56) + 1
    assert (st.rows, st.kept, st.split, st.split_windows, st.truncated) == (2, 2, 1, n_windows, 0)
    rows = dm.train_set.to_list()
    windows = [r for r in rows if len(r["input_ids"]) > 6]  # "short" + EOS is 6 tokens
    assert max(r["length"] for r in rows) == 64 and len(windows) == n_windows
    trained = [t for r in windows for t in r["labels"] if t != IGNORE_INDEX]
    assert trained == [t for t in full.labels if t != IGNORE_INDEX]
    assert st.tokens == sum(r["length"] for r in rows)
    assert f"split 1 into {n_windows} windows" in caplog.text


def test_overlong_split_counts_the_windows_it_leaves_out(builtin_tokenizer, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A prompt longer than data.max_seq_len splits into windows without a loss token, which are left out: the
    count said only how many windows were kept."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "p" * 200, "completion": "answer"}) + "\n")
    cfg = DataConfig(source=str(path), format="prompt_completion", val_fraction=0.0, max_seq_len=64,
                     overlong="split", overlong_stride=8, max_tokens_per_batch=64)
    dm = BambaDataModule(cfg, builtin_tokenizer)
    with caplog.at_level("INFO", logger="bamba_ft.data.module"):
        dm.prepare()
    st = dm.stats["train"]
    full = tokenize_example(builtin_tokenizer, [{"role": "user", "content": "p" * 200},
                                                {"role": "assistant", "content": "answer"}], "assistant", None)
    windows = split_windows(full.input_ids, full.labels, 64, 8)
    with_loss = sum(1 for _, labels in windows if any(t != IGNORE_INDEX for t in labels))
    assert 0 < with_loss < len(windows)
    assert (st.split, st.split_windows, st.split_windows_no_loss) == (1, with_loss, len(windows) - with_loss)
    assert f"into {with_loss} windows ({len(windows) - with_loss} more without a loss token left out)" in caplog.text


@pytest.mark.parametrize("n", [1 << 18, pytest.param(1 << 20, marks=pytest.mark.slow)])
def test_million_token_row_tokenizes_and_packs_in_linear_time(builtin_tokenizer, n: int) -> None:  # noqa: ANN001
    """2^18 tokens in about 1.5 s, 2^20 in about 5 s on two cores (the tokenizer itself takes a third). A pass
    quadratic in tokens would take hours at 2^20."""
    turns = 16
    body = n // turns - 20
    messages = [{"role": role, "content": ch * body} for _ in range(turns // 2) for role, ch in
                (("user", "q"), ("assistant", "a"))]
    tok = tokenize_example(builtin_tokenizer, messages, "completion", n)
    assert not tok.truncated and len(tok.input_ids) > n - 400
    assert sum(1 for t in tok.labels if t != IGNORE_INDEX) == turns // 2 * (body + 1)  # answer + <|end|>
    batch = collate_packed([{"input_ids": tok.input_ids, "labels": tok.labels}])
    assert batch["position_ids"].dtype == batch["seq_idx"].dtype == batch["cu_seq_lens_q"].dtype == torch.int32
    assert int(batch["position_ids"][0, -1]) == len(tok.input_ids) - 1
    assert batch["cu_seq_lens_q"].tolist() == [0, len(tok.input_ids)]
    windows = split_windows(tok.input_ids, tok.labels, n >> 4, 1024)
    trained = [t for _, w_labels in windows for t in w_labels if t != IGNORE_INDEX]
    assert trained == [t for t in tok.labels if t != IGNORE_INDEX]


WEATHER_TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_TURNS = [
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
    {"role": "assistant", "content": "Sunny."},
]
TOOLS_JSON = json.dumps(WEATHER_TOOLS)
CALL = '{"name": "weather", "arguments": {"city": "Rome"}}'


@pytest.mark.parametrize("preset,parts", [
    ("bamba_ft", [(f"<|system|>Tools: {TOOLS_JSON}<|end|><|user|>Rome?<|end|><|assistant|>", False),
                  (f"<tool_call>{CALL}</tool_call><|end|>", True),
                  ("<|tool|>sunny<|end|><|assistant|>", False), ("Sunny.<|end|>", True)]),
    ("chatml", [(f"<|im_start|>system\n# Tools\n{TOOLS_JSON}<|im_end|>\n<|im_start|>user\nRome?<|im_end|>\n"
                 "<|im_start|>assistant\n", False), (f"<tool_call>\n{CALL}\n</tool_call><|im_end|>\n", True),
                ("<|im_start|>tool\nsunny<|im_end|>\n<|im_start|>assistant\n", False), ("Sunny.<|im_end|>\n", True)]),
])
@pytest.mark.parametrize("fmt", ["messages", "prompt_completion"])
def test_tool_calls_render_and_mask_token_by_token(preset: str, parts: list, fmt: str) -> None:
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.templates import ensure_chat_template

    tokenizer = build_char_tokenizer()
    ensure_chat_template(tokenizer, preset)
    user = [{"role": "user", "content": [{"type": "text", "text": "Rome?"}]}]
    row = ({"messages": user + TOOL_TURNS, "tools": WEATHER_TOOLS} if fmt == "messages"
           else {"prompt": user, "completion": TOOL_TURNS, "tools": TOOLS_JSON})
    tok = tokenize_example(tokenizer, to_messages(row, fmt, "test"), "completion", 4096)
    ids, labels = expected_labels(tokenizer, parts)
    assert (tok.input_ids, tok.labels) == (ids, labels)


def test_an_opening_assistant_turn_has_no_loss_on_the_template_header() -> None:
    # the header before the first answer is markup, as the generation prompt before every later answer is
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.templates import ensure_chat_template

    tokenizer = build_char_tokenizer()
    ensure_chat_template(tokenizer, "chatml")
    messages = [{"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    tok = tokenize_example(tokenizer, messages, "completion", 512)
    ids, labels = expected_labels(tokenizer, [
        ("<|im_start|>assistant\n", False), ("Hi!<|im_end|>\n", True),
        ("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n", False), ("4<|im_end|>\n", True)])
    assert (tok.input_ids, tok.labels) == (ids, labels)


def test_tool_rows_read_from_a_file_keep_only_their_own_keys(tmp_path: Path) -> None:
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.templates import ensure_chat_template

    tokenizer = build_char_tokenizer()
    ensure_chat_template(tokenizer, "bamba_ft")
    other = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "clock", "arguments": {"zone": "UTC"}}}]}, {"role": "tool", "content": "noon"},
        {"role": "assistant", "content": "Noon."}]
    rows = [{"messages": [{"role": "user", "content": "Rome?"}] + TOOL_TURNS[:1] + [
        {"role": "tool", "content": "sunny"}, TOOL_TURNS[2]], "tools": WEATHER_TOOLS}, {"messages": other}]
    path = tmp_path / "tools.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.0), tokenizer)
    dm.prepare()
    rome, clock = sorted((tokenizer.decode(r["input_ids"]) for r in dm.train_set), key=lambda t: "clock" in t)
    assert CALL in rome and '"parameters": {"type": "object", "properties": {"city"' in rome
    assert '{"name": "clock", "arguments": {"zone": "UTC"}}' in clock and "Tools" not in clock
    assert "null" not in rome + clock  # Arrow gives each row every key of the file; those are dropped
    assert dm.stats["train"].empty_assistant == 0  # a turn holding only tool calls is not an empty answer


def test_tool_errors_name_the_example(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "Rome?"}] + TOOL_TURNS}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.0), builtin_tokenizer)
    with pytest.raises(DataError, match=rf"(?s){path}, line 2: the chat template ignores tool_calls .*"
                                        r"data.chat_template .*bamba_ft, chatml"):
        dm.prepare()
    user_call = {"messages": [{"role": "user", "content": "x", "tool_calls": TOOL_TURNS[0]["tool_calls"]}]}
    with pytest.raises(DataError, match=r"x.jsonl, line 4, message 0: a user message has tool_calls"):
        to_messages(user_call, "messages", "x.jsonl, line 4")
    bad_args = {"messages": [{"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "f", "arguments": "{city"}}]}]}
    with pytest.raises(DataError, match=r"line 5, message 0: a tool call's arguments is a string but not JSON"):
        to_messages(bad_args, "messages", "x.jsonl, line 5")


def test_fallback_template_ends_turns_with_the_tokenizers_own_eos() -> None:
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.templates import ensure_chat_template, generation_config_for, stop_token_ids

    tokenizer = build_char_tokenizer()
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    tokenizer.chat_template = None
    ensure_chat_template(tokenizer, None)
    eos = tokenizer.convert_tokens_to_ids("</s>")
    assert eos == tokenizer.eos_token_id != tokenizer.convert_tokens_to_ids("<|end|>")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    tok = tokenize_example(tokenizer, messages, "completion", 64)
    ids, labels = expected_labels(tokenizer, [("<|user|>hi</s><|assistant|>", False), ("ok</s>", True)])
    assert (tok.input_ids, tok.labels) == (ids, labels) and tok.labels[-1] == eos
    assert stop_token_ids(tokenizer) == [eos] and generation_config_for(None, tokenizer).eos_token_id == eos


def test_fallback_renders_as_the_builtin_template(builtin_tokenizer) -> None:  # noqa: ANN001
    from bamba_ft.data.templates import FALLBACK, PRESETS

    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": "user", "content": "v"}]
    ours = builtin_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    fallback = builtin_tokenizer.apply_chat_template(messages, chat_template=PRESETS[FALLBACK], tokenize=False,
                                                     add_generation_prompt=True)
    assert fallback == ours == "<|system|>s<|end|><|user|>u<|end|><|assistant|>a<|end|><|user|>v<|end|><|assistant|>"


def test_chatml_stops_at_im_end_when_the_tokenizer_has_it() -> None:
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.templates import ensure_chat_template, generation_config_for, stop_token_ids

    tokenizer = build_char_tokenizer()
    ensure_chat_template(tokenizer, "chatml")
    assert stop_token_ids(tokenizer) == [tokenizer.eos_token_id]  # <|im_end|> is 10 characters here: EOS only
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert generation_config_for(None, tokenizer).eos_token_id == [tokenizer.eos_token_id, im_end]


def _source_file(path: Path, n: int, tag: str, fields: tuple[str, str] = ("prompt", "completion")) -> str:
    path.write_text("".join(json.dumps({fields[0]: f"{tag}{i}?", fields[1]: tag}) + "\n" for i in range(n)))
    return str(path)


def test_sources_mix_by_weight_deterministically() -> None:
    import datasets

    from bamba_ft.data.module import mix_sources

    parts = [datasets.Dataset.from_dict({"source": [i] * 6000}) for i in (0, 1)]
    first = mix_sources(parts, [0.7, 0.3], seed=1, stopping_strategy="first_exhausted")["source"][:5000]
    assert abs(first.count(0) / 5000 - 0.7) < 0.02  # binomial sd at n=5000 is 0.0065
    assert mix_sources(parts, [0.7, 0.3], seed=1, stopping_strategy="first_exhausted")["source"][:5000] == first
    assert mix_sources(parts, [0.7, 0.3], seed=2, stopping_strategy="first_exhausted")["source"][:5000] != first
    assert mix_sources(parts, [None, None], seed=1, stopping_strategy="first_exhausted")["source"] == [0] * 6000 + [1] * 6000


def test_sources_map_columns_and_count_each_source(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from bamba_ft.config.schema import SourceConfig

    a = _source_file(tmp_path / "a.jsonl", 300, "a")
    b = _source_file(tmp_path / "b.jsonl", 300, "b", ("question", "answer"))
    cfg = DataConfig(val_fraction=0.0, sources=[
        SourceConfig(source=a, weight=0.7), SourceConfig(source=b, weight=0.3, max_examples=200,
                                                         columns={"question": "prompt", "answer": "completion"})])
    dm = BambaDataModule(cfg, builtin_tokenizer, seed=1)
    dm.prepare()
    st = dm.stats
    assert (st["train[0]"].rows, st["train[1]"].rows) == (300, 200)  # max_examples applied before mixing
    answers = [builtin_tokenizer.decode(ids[-2:-1]) for ids in dm.train_set["input_ids"]]  # the letter before <|end|>
    assert (answers.count("a"), answers.count("b")) == (st["train[0]"].in_mix, st["train[1]"].in_mix)
    assert st["train[0]"].in_mix + st["train[1]"].in_mix == st["train"].kept == len(dm.train_set)
    assert st["train[0]"].in_mix == 300 or st["train[1]"].in_mix == 200  # drawn until one source ran out
    assert dm.formats == {"train[0]": "prompt_completion", "train[1]": "prompt_completion"}


def test_sources_concatenate_without_weights_and_check_columns(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from bamba_ft.config.schema import SourceConfig

    a = _source_file(tmp_path / "a.jsonl", 30, "a")
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(10)))
    dm = BambaDataModule(DataConfig(val_fraction=0.2, sources=[SourceConfig(source=a), SourceConfig(source=str(b))]),
                         builtin_tokenizer)
    dm.prepare()
    assert (dm.stats["train[0]"].kept, dm.stats["train[1]"].kept, dm.stats["train"].kept) == (24, 8, 32)
    assert dm.stats["val"].kept == 8 and len(dm.val_rows) == 8 and dm.stats["val"].in_mix is None
    assert dm.formats["train[1]"] == "text" and dm.formats["validation[1]"] == "text"
    bad = DataConfig(sources=[SourceConfig(source=a, columns={"question": "prompt"})])
    with pytest.raises(DataError, match=r"data.sources\[0\].columns: no column question to rename; the data has "
                                        r"prompt, completion"):
        BambaDataModule(bad, builtin_tokenizer).prepare()


def test_max_val_examples_validates_every_source(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    # the bound is shared out evenly (as a stream's held-out head is), not filled from the first source alone
    from bamba_ft.config.schema import SourceConfig
    from bamba_ft.data.module import even_quotas

    assert even_quotas([15, 3], 10) == [7, 3] and even_quotas([15, 3], 4) == [2, 2] and even_quotas([2, 2], 10) == [2, 2]
    a = _source_file(tmp_path / "a.jsonl", 300, "a")
    b = _source_file(tmp_path / "b.jsonl", 60, "b")
    dm = BambaDataModule(DataConfig(max_val_examples=10, sources=[SourceConfig(source=a), SourceConfig(source=b)]),
                         builtin_tokenizer)
    dm.prepare()
    answers = [builtin_tokenizer.decode(ids[-2:-1]) for ids in dm.val_set["input_ids"]]  # the letter before <|end|>
    assert (answers.count("a"), answers.count("b")) == (7, 3) and dm.stats["val"].kept == 10
    # and only those are held out: every other row trains
    assert (dm.stats["train[0]"].rows, dm.stats["train[1]"].rows) == (293, 57)


def test_rows_held_out_past_max_val_examples_are_trained(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    """5% of 300 rows is 15; with data.max_val_examples=5 the other 10 were held out of training and validated
    neither. A smaller bound holds out a prefix of a larger one's rows, so a run's evaluation under the newer code
    scores rows its training held out."""
    path = _source_file(tmp_path / "a.jsonl", 300, "a")
    dm = BambaDataModule(DataConfig(source=path, max_val_examples=5), builtin_tokenizer)
    dm.prepare()
    assert (dm.stats["train"].rows, dm.stats["val"].rows) == (295, 5)
    wider = BambaDataModule(DataConfig(source=path, max_val_examples=15), builtin_tokenizer)
    wider.prepare()
    assert (wider.stats["train"].rows, wider.stats["val"].rows) == (285, 15)
    assert wider.val_set["input_ids"][:5] == dm.val_set["input_ids"]
    assert dm.hold_out_rows == {f"data.source={path}": 300}  # what an evaluation checks the file against


def test_format_errors_of_one_source_say_the_fix_in_words(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    a = _source_file(tmp_path / "a.jsonl", 10, "a")
    with pytest.raises(DataError, match=r"Fix: set data.format to the format of this file \(auto detects it\), or "
                                        r"rename the fields\.$"):
        BambaDataModule(DataConfig(source=a, format="alpaca"), builtin_tokenizer).prepare()
    b = _source_file(tmp_path / "b.jsonl", 10, "b", ("question", "answer"))
    with pytest.raises(DataError, match=r"Fix: rename the fields, or set data.format=... explicitly\.$"):
        BambaDataModule(DataConfig(source=b), builtin_tokenizer).prepare()


def test_format_errors_of_a_source_name_its_own_keys(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    # a source's format (data.sources[i].format) wins over data.format, and its fields are renamed by its columns
    from bamba_ft.config.schema import SourceConfig

    a = _source_file(tmp_path / "a.jsonl", 10, "a")
    b = _source_file(tmp_path / "b.jsonl", 10, "b", ("question", "answer"))
    wrong = DataConfig(sources=[SourceConfig(source=a, format="alpaca")])
    with pytest.raises(DataError, match=r"(?s)Fix: set data.sources\[0\].format to the format of this file .*"
                                        r"or map the fields with data.sources\[0\].columns \(\{their: ours\}\)\.$"):
        BambaDataModule(wrong, builtin_tokenizer).prepare()
    unknown = DataConfig(sources=[SourceConfig(source=a), SourceConfig(source=b)])
    with pytest.raises(DataError, match=r"(?s)answer, question.*Fix: map the fields with data.sources\[1\].columns "
                                        r".*or set data.sources\[1\].format=..."):
        BambaDataModule(unknown, builtin_tokenizer).prepare()


def test_to_messages_reads_alpaca_and_refuses_an_unknown_format_naming_the_valid_ones() -> None:
    row = {"instruction": "Reverse.", "input": "cat", "output": "tac"}
    assert to_messages(row, "alpaca", "test") == [{"role": "user", "content": "Reverse.\n\ncat"},
                                                  {"role": "assistant", "content": "tac"}]
    with pytest.raises(ConfigError, match=r"data.format='alpacca' is not an option\. Did you mean 'alpaca'\? "
                                          r"Valid: messages, prompt_completion, alpaca, text"):
        to_messages(row, "alpacca", "test")
    assert CHOICES["data.format"] == ("auto", *FORMATS)  # every configurable format has a reader, and only those


def test_a_dataset_directory_with_configurations_is_read_as_its_files_are_now(tmp_path: Path) -> None:
    """datasets caches such a directory under its name and configuration: rows added later, or another directory
    of the same name, were read from the first load's cache."""
    from bamba_ft.data.load import load_rows

    def repo(root: Path, rows: int) -> Path:
        (root / "repo" / "qa").mkdir(parents=True, exist_ok=True)
        (root / "repo" / "README.md").write_text(
            "---\nconfigs:\n- config_name: qa\n  data_files:\n  - split: train\n    path: qa/*.jsonl\n---\n")
        (root / "repo" / "qa" / "train.jsonl").write_text(
            "".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(rows)))
        return root / "repo"

    first = repo(tmp_path / "a", 10)
    assert len(load_rows(str(first), "train", "data.source", "qa")) == 10
    repo(tmp_path / "a", 25)
    assert len(load_rows(str(first), "train", "data.source", "qa")) == 25
    assert len(load_rows(str(repo(tmp_path / "b", 7)), "train", "data.source", "qa")) == 7  # same name, elsewhere


def test_rows_are_not_read_from_the_cache_the_previous_codes_tokenization_wrote(builtin_tokenizer, tmp_path: Path,  # noqa: ANN001
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """datasets keys a map's cache on its function's name and arguments (dill pickles an importable function by
    reference): after an upgrade that changes how rows are tokenized, the old code's rows came back. The data
    code's fingerprint is an argument of the map, so the new code runs."""
    from bamba_ft.data import module, tokenize

    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a", "completion": "bcd"}) + "\n" for _ in range(8)))

    def targets() -> int:
        dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.0), builtin_tokenizer)
        dm.prepare()
        return dm.stats["train"].target_tokens

    before = targets()
    original = tokenize.encode_row

    def upgraded(row: dict, **kw) -> dict:  # noqa: ANN003  the same function name, other code: one target fewer
        out = original(row, **kw)
        return {**out, "n_targets": out["n_targets"] - 1}

    upgraded.__module__, upgraded.__name__, upgraded.__qualname__ = original.__module__, "encode_row", "encode_row"
    monkeypatch.setattr(tokenize, "encode_row", upgraded)
    monkeypatch.setattr(module, "encode_row", upgraded)
    monkeypatch.setattr(module, "code_version", lambda: "the upgraded code")
    assert targets() == before - 8


def test_validation_examples_that_are_also_trained_are_counted(builtin_tokenizer, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A row repeated in the file lands in both splits: the validation loss then partly measures memorisation."""
    rows = [{"prompt": "same", "completion": "row"}] * 20 + [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(20)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = BambaDataModule(DataConfig(source=str(path), val_fraction=0.25), builtin_tokenizer)
    dm.prepare()
    repeated = sum(1 for r in dm.val_rows if r[-1]["content"] == "row")
    assert repeated > 0 and f"data warning: {repeated} of the 10 validation examples are also training" in caplog.text
    caplog.clear()
    distinct = tmp_path / "e.jsonl"
    distinct.write_text("".join(json.dumps(r) + "\n" for r in rows[20:]))
    BambaDataModule(DataConfig(source=str(distinct), val_fraction=0.25), builtin_tokenizer).prepare()
    assert "also training examples" not in caplog.text and "repeat an earlier one" not in caplog.text


def test_repeated_training_examples_are_counted_per_source(builtin_tokenizer, tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """A row repeated in the data is trained once per copy every epoch, a weight nobody chose: warned about. A
    weighted mix that repeats a small source (all_exhausted) does so by design: not warned about."""
    rows = [{"prompt": "same", "completion": "row"}] * 5 + [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(15)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    BambaDataModule(DataConfig(source=str(path), val_fraction=0.0), builtin_tokenizer).prepare()
    assert f"data warning: 4 of the 20 training examples repeat an earlier one (the same tokens) in data.source={path}" \
        in caplog.text
    caplog.clear()
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in rows[5:8]))
    large.write_text("".join(json.dumps({"prompt": f"x{i}", "completion": f"y{i}"}) + "\n" for i in range(30)))
    dm = BambaDataModule(DataConfig(sources=[SourceConfig(source=str(small), weight=0.5),
                                             SourceConfig(source=str(large), weight=0.5)],
                                    stopping_strategy="all_exhausted", val_fraction=0.0), builtin_tokenizer)
    dm.prepare()
    assert dm.stats["train[0]"].passes > 1 and "repeat an earlier one" not in caplog.text


def test_a_data_error_names_the_files_first_bad_row(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    """The hold-out shuffles the rows before they are tokenized: with every row bad, the error named whichever came
    first in the shuffle."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "robot", "content": f"q{i}"},
                                                     {"role": "assistant", "content": "a"}]}) + "\n" for i in range(40)))
    with pytest.raises(DataError, match=rf"{path}, line 1\b"):
        BambaDataModule(DataConfig(source=str(path)), builtin_tokenizer).prepare()
