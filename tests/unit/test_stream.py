"""data.streaming: the stream packs the same sequences as the in-memory path, resumes where it stopped,
shards ranks disjointly, and holds at most data.stream_buffer examples."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, fields
from pathlib import Path

import datasets
import pytest
import torch

from bamba_ft.config.schema import DataConfig, RunConfig, SourceConfig, validate
from bamba_ft.data.builtin import generate_pretrain, generate_sft
from bamba_ft.data.load import load_stream, stream_read_error
from bamba_ft.data.module import BambaDataModule
from bamba_ft.data.stream import STREAM_KEY, StreamBatches, StreamPosition, balance
from bamba_ft.errors import ConfigError, DataError
from bamba_ft.jobs.checkpoints import config_changes

Seq = tuple[tuple[int, ...], tuple[int, ...]]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("stream")
    # chat rows (one example each) and text documents of ~300-600 tokens, which max_seq_len=128 splits in windows
    datasets.Dataset.from_list(generate_sft(70, seed=1)).to_parquet(d / "sft.parquet")
    return {"sft": write_jsonl(d / "sft.jsonl", generate_sft(70, seed=1)),
            "docs": write_jsonl(d / "docs.jsonl", generate_pretrain(24, seed=2)), "parquet": str(d / "sft.parquet")}


def data_cfg(source: str, **kw) -> DataConfig:  # noqa: ANN003
    base = dict(source=source, max_seq_len=128, max_tokens_per_batch=512, val_fraction=0.0, stream_buffer=16)
    if "docs" in source:
        base.update(overlong="split", overlong_stride=8)
    return DataConfig(**{**base, **kw})


def stream_of(tokenizer, cfg: DataConfig, seed: int = 42, **kw) -> StreamBatches:  # noqa: ANN001, ANN003
    dm = BambaDataModule(cfg, tokenizer, seed=seed)
    dm.prepare()
    return StreamBatches(dm.stream, dm.stream_sources, tokenizer, cfg, dm.seed, **kw)


def sequences(batch: dict) -> list[Seq]:
    cu = batch["cu_seq_lens_q"].tolist()
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    return [(tuple(ids[a:b]), tuple(labels[a:b])) for a, b in zip(cu, cu[1:])]


def position_of(meta: dict) -> StreamPosition:
    """The position a batch's STREAM_KEY entry ends at (without its counts)."""
    return StreamPosition(**{f.name: meta[f.name] for f in fields(StreamPosition)})


def one_epoch(batches: Iterator[dict]) -> list[tuple[list[Seq], dict]]:
    """(sequences, position after) of each batch until the stream's first pass ends."""
    out = []
    for batch in batches:
        meta = batch[STREAM_KEY]
        out.append((sequences(batch), meta))
        if meta["epoch"] == 1:
            return out
    raise AssertionError("the stream ended; it should restart")


def in_memory(tokenizer, cfg: DataConfig) -> Counter:  # noqa: ANN001
    dm = BambaDataModule(cfg, tokenizer)
    dm.prepare()
    return Counter((tuple(r["input_ids"]), tuple(r["labels"])) for r in dm.train_set)


@pytest.mark.parametrize("name", ["sft", "docs", "parquet"])
def test_stream_epoch_packs_the_in_memory_sequences(builtin_tokenizer, files: dict[str, str], name: str) -> None:  # noqa: ANN001
    cfg = data_cfg(files[name], streaming=True)
    streamed = Counter(s for seqs, _ in one_epoch(iter(stream_of(builtin_tokenizer, cfg))) for s in seqs)
    expected = in_memory(builtin_tokenizer, data_cfg(files[name]))
    assert sum(expected.values()) > 2 * cfg.stream_buffer  # several windows
    assert streamed == expected


@pytest.mark.parametrize("stop", [1, 5, 9])
def test_stream_resume_continues_at_the_same_position(builtin_tokenizer, files: dict[str, str], stop: int) -> None:  # noqa: ANN001
    cfg = data_cfg(files["docs"], streaming=True, stream_buffer=7)  # windows end inside rows (split documents)
    full = one_epoch(iter(stream_of(builtin_tokenizer, cfg)))
    assert any(meta["row_items"] for _, meta in full)  # some stop points lie mid-row
    position = position_of(full[stop - 1][1])
    after = one_epoch(iter(stream_of(builtin_tokenizer, cfg, start=position)))
    assert [s for s, _ in full[:stop] + after] == [s for s, _ in full]


def passes(batches: Iterator[dict], n: int) -> list[tuple[list[Seq], dict]]:
    """(sequences, position after) of each batch until `n` passes over the stream have ended."""
    out = []
    for batch in batches:
        out.append((sequences(batch), batch[STREAM_KEY]))
        if batch[STREAM_KEY]["epoch"] == n:
            return out
    raise AssertionError("the stream ended; it should restart")


def test_stream_shuffle_is_seeded_by_pass_and_resumes_at_the_same_rows(builtin_tokenizer, files: dict[str, str]) -> None:  # noqa: ANN001
    cfg = data_cfg(files["sft"], streaming=True, shuffle_buffer=16, stream_buffer=8, max_tokens_per_batch=128)
    stream = stream_of(builtin_tokenizer, cfg)
    orders = [[r["__row__"] for r in stream._pass_rows(epoch)] for epoch in range(2)]
    assert sorted(orders[0]) == sorted(orders[1]) == list(range(1, 71))  # every row once per pass
    assert orders[0] != list(range(1, 71)) and orders[0] != orders[1]  # shuffled, differently in each pass
    assert [r["__row__"] for r in stream_of(builtin_tokenizer, cfg, seed=7)._pass_rows(0)] != orders[0]
    assert [r["__row__"] for r in stream_of(builtin_tokenizer, cfg)._pass_rows(1)] == orders[1]  # reproducible
    full = passes(iter(stream), 2)
    positions = [position_of(meta) for _, meta in full]
    for epoch in (0, 1):  # a stop inside a window, past the first window, of each pass
        stop = next(i for i, p in enumerate(positions, 1) if p.epoch == epoch and p.rows_read and p.steps_done)
        position = positions[stop - 1]
        after = passes(iter(stream_of(builtin_tokenizer, cfg, start=position)), 2)
        assert [s for s, _ in full[:stop] + after] == [s for s, _ in full]


def test_stream_shuffle_order_is_the_same_in_a_dataloader_worker(builtin_tokenizer, files: dict[str, str]) -> None:  # noqa: ANN001
    """datasets reseeds a shuffle in a DataLoader worker by the worker id; data.num_workers=1 must not move rows."""
    cfg = data_cfg(files["sft"], streaming=True, shuffle_buffer=16, stream_buffer=8, max_tokens_per_batch=128)
    here = [s for s, _ in one_epoch(iter(stream_of(builtin_tokenizer, cfg)))]
    loader = torch.utils.data.DataLoader(stream_of(builtin_tokenizer, cfg), batch_size=None, num_workers=1)
    assert [s for s, _ in one_epoch(iter(loader))] == here


def test_datamodule_state_resumes_the_stream(builtin_tokenizer, files: dict[str, str]) -> None:  # noqa: ANN001
    cfg = data_cfg(files["sft"], streaming=True, max_tokens_per_batch=128)  # ~20 batches an epoch
    dm = BambaDataModule(cfg, builtin_tokenizer)
    dm.prepare()
    batches = iter(dm.train_dataloader())
    seen = [sequences(dm.on_before_batch_transfer(next(batches), 0)) for _ in range(6)]
    state = dm.state_dict()
    assert state["stream"]["epoch"] == 0 and state["stream"]["batches"] == 6
    assert dm.packing_efficiency() == pytest.approx(
        sum(len(s[0]) for b in seen for s in b) / (6 * cfg.max_tokens_per_batch), abs=1e-12)
    uninterrupted = [sequences(b) for _, b in zip(range(12), iter(stream_of(builtin_tokenizer, cfg)))]
    resumed = BambaDataModule(cfg, builtin_tokenizer)
    resumed.load_state_dict(state)
    resumed.prepare()
    rest = iter(resumed.train_dataloader())
    assert seen + [sequences(resumed.on_before_batch_transfer(next(rest), 0)) for _ in range(6)] == uninterrupted
    assert resumed.stream_batches == 12
    with pytest.raises(ConfigError, match="data.streaming=true"):
        BambaDataModule(data_cfg(files["sft"]), builtin_tokenizer).load_state_dict(state)
    older = {"stream": {k: v for k, v in state["stream"].items() if k != "shuffle_buffer"}}  # before the shuffle
    with pytest.raises(ConfigError, match=r"(?s)data.shuffle_buffer=0, this run has data.shuffle_buffer=10000.*"
                                          r"Fix: resume with data.shuffle_buffer=0"):
        BambaDataModule(cfg, builtin_tokenizer).load_state_dict(older)


def test_stream_ranks_see_disjoint_data_in_equal_steps(builtin_tokenizer, files: dict[str, str]) -> None:  # noqa: ANN001
    cfg = data_cfg(files["sft"], streaming=True, max_tokens_per_batch=256)
    whole = Counter(s for seqs, _ in one_epoch(iter(stream_of(builtin_tokenizer, cfg))) for s in seqs)
    ranks = [one_epoch(iter(stream_of(builtin_tokenizer, cfg, rank=r, world_size=2))) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    positions = [[(position_of(m), m["sources"]) for _, m in rank] for rank in ranks]
    assert positions[0] == positions[1]  # one position describes both ranks
    parts = [Counter(s for seqs, _ in rank for s in seqs) for rank in ranks]
    assert not parts[0] & parts[1] and parts[0] + parts[1] == whole


def test_balance_splits_batches_to_a_multiple_of_the_world() -> None:
    batches = [[0, 1, 2], [3], [4, 5]]
    out = balance(batches, 2)
    assert len(out) == 4 and sorted(i for b in out for i in b) == list(range(6))
    assert balance([[0], [1], [2]], 2) == [[0], [1]]  # nothing to split: every rank drops the same remainder


@pytest.mark.parametrize("name", ["sft", "docs"])
def test_stream_buffer_never_holds_more_than_stream_buffer(builtin_tokenizer, files: dict[str, str], name: str) -> None:  # noqa: ANN001
    cfg = data_cfg(files[name], streaming=True, stream_buffer=5)
    stream = stream_of(builtin_tokenizer, cfg)
    held = []
    original = stream._window

    def window(examples, *args):  # noqa: ANN001, ANN002, ANN202
        held.append(len(examples))
        yield from original(examples, *args)

    stream._window = window
    one_epoch(iter(stream))
    assert stream.peak_buffer == 5 and max(held) == 5 and len(held) > 3


def test_stream_holds_out_the_head_for_validation(builtin_tokenizer, files: dict[str, str]) -> None:  # noqa: ANN001
    cfg = data_cfg(files["sft"], streaming=True, val_fraction=0.05, max_val_examples=10)
    dm = BambaDataModule(cfg, builtin_tokenizer)
    dm.prepare()
    rows = [json.loads(line) for line in Path(files["sft"]).read_text().splitlines()]
    assert [m[1]["content"] for m in dm.val_rows] == [r["messages"][1]["content"] for r in rows[:10]]
    streamed = {r["__row__"] for r in dm.stream}
    assert min(streamed) == 11 and len(streamed) == 60


def test_stream_mixes_sources_by_weight(builtin_tokenizer, files: dict[str, str]) -> None:  # noqa: ANN001
    cfg = DataConfig(source="builtin", sources=[SourceConfig(source=files["sft"], weight=1.0),
                                                 SourceConfig(source=files["docs"], weight=1.0)],
                     max_seq_len=128, max_tokens_per_batch=512, overlong="split", stream_buffer=16,
                     streaming=True, max_val_examples=2)
    epoch = one_epoch(iter(stream_of(builtin_tokenizer, cfg)))
    texts = [builtin_tokenizer.decode(ids) for seqs, _ in epoch for ids, _ in seqs]
    assert any("assistant" in t for t in texts) and any("Q:" in t for t in texts)


def test_repeated_training_examples_in_a_stream_window_are_counted_as_in_memory(  # noqa: ANN001
        builtin_tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The in-memory warning, per window of data.stream_buffer examples (memory stays bounded by the window): rows
    repeated within a window are counted; a weighted mix that restarts a small source repeats it by design."""
    rows = [{"prompt": "same", "completion": "row"}] * 5 + [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(15)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    one_epoch(iter(stream_of(builtin_tokenizer, data_cfg(path, streaming=True, stream_buffer=32))))
    assert ("data warning: 4 of the 20 training examples of a stream window (data.stream_buffer=32: examples in "
            f"different windows are not compared) repeat an earlier one (the same tokens) in data.source={path}, so "
            "each copy is trained every pass. Fix: deduplicate the rows") in caplog.text
    caplog.clear()
    apart = write_jsonl(tmp_path / "apart.jsonl", rows[5:13] * 2)  # each row again 8 rows on: in the next window
    one_epoch(iter(stream_of(builtin_tokenizer, data_cfg(apart, streaming=True, stream_buffer=8, shuffle_buffer=0))))
    assert "repeat an earlier one" not in caplog.text
    small, large = write_jsonl(tmp_path / "small.jsonl", rows[5:8]), write_jsonl(tmp_path / "large.jsonl", rows[8:])
    mix = DataConfig(source="builtin", sources=[SourceConfig(source=small, weight=0.5), SourceConfig(source=large,
                     weight=0.5)], stopping_strategy="all_exhausted", streaming=True, val_fraction=0.0,
                     stream_buffer=64, max_seq_len=128, max_tokens_per_batch=512)
    epoch = one_epoch(iter(stream_of(builtin_tokenizer, mix)))
    texts = [builtin_tokenizer.decode(ids) for seqs, _ in epoch for ids, _ in seqs]
    assert sum("q0" in t for t in texts) > 1 and "repeat an earlier one" not in caplog.text  # q0 drawn again


@pytest.mark.parametrize("bad_line", [3, 45])  # in the held-out head, and met mid-stream while training
def test_a_malformed_line_met_by_the_stream_is_named(builtin_tokenizer, tmp_path: Path, files: dict[str, str],  # noqa: ANN001
                                                     bad_line: int) -> None:
    lines = Path(files["sft"]).read_text().splitlines()
    lines[bad_line - 1] = lines[bad_line - 1][:30]  # cut short, as by an interrupted write
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = data_cfg(str(path), streaming=True, val_fraction=0.05, max_val_examples=10)
    with pytest.raises(DataError, match=rf"(?s)data.source: malformed JSON at .*cut.jsonl:{bad_line}: .*Fix that line"):
        one_epoch(iter(stream_of(builtin_tokenizer, cfg)))


def test_a_malformed_line_the_reader_meets_while_opening_the_stream_is_named(builtin_tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    # datasets' JSON reader parses the file's first block when the stream is opened (to infer its features); a line
    # that is cut short where an earlier row held a string fails there, before any row is read
    rows = [json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) for i in range(20)]
    rows[11] = '{"prompt": "x", "completion": 5'
    path = tmp_path / "cut.jsonl"
    path.write_text("\n".join(rows) + "\n")
    cfg = data_cfg(str(path), streaming=True, val_fraction=0.05, max_val_examples=4)
    with pytest.raises(DataError, match=r"(?s)data.source: malformed JSON at .*cut.jsonl:12: .*Fix that line"):
        BambaDataModule(cfg, builtin_tokenizer).prepare()


def test_a_line_cut_at_its_end_is_named_with_its_column_when_streamed(tmp_path: Path) -> None:
    # the stream's check reads the file line by line; the column must be that of the line, as in memory
    line = '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"'
    path = tmp_path / "cut.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n" + '{"text": "ok"}\n')
    error = stream_read_error(ValueError("reader"), [f"data.source={path}"])
    assert f"cut.jsonl:2: Expecting ',' delimiter (column {len(line) + 1})" in str(error)


def test_streaming_config_errors() -> None:
    cfg = RunConfig()
    cfg.data.streaming, cfg.trainer.max_steps, cfg.trainer.max_epochs = True, -1, 2
    cfg.data.num_workers = 2
    with pytest.raises(ConfigError, match=r"(?s)trainer.max_steps=-1.*set trainer.max_steps=N.*data.num_workers=2"):
        validate(cfg)


def test_hub_stream_offline_says_to_use_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"(?s)data.source=org/set: .*cannot be streamed.*pass its local path"):
        load_stream("org/set", "train", "data.source")


def test_resume_refuses_a_changed_stream_head() -> None:
    old = RunConfig()
    old.data.streaming = True
    new = RunConfig()
    new.data.streaming, new.data.max_val_examples = True, 10
    applied, refused = config_changes(asdict(old), new)
    assert refused == ["data.max_val_examples: 1000 -> 10"] and not applied
    new.data.streaming = old.data.streaming = False  # in memory the held-out rows do not move the training set
    assert config_changes(asdict(old), new) == (["data.max_val_examples: 1000 -> 10"], [])


def test_a_streamed_run_resumed_on_other_ranks_is_refused_saying_why() -> None:
    # in memory, N ranks resume on M accumulating N/M (README, "Several GPUs"); a stream's position does not
    # rescale, so the refusal names the stream as its reason rather than reading as a plain changed setting
    old = RunConfig()
    old.data.streaming, old.trainer.devices = True, 2
    new = RunConfig()
    new.data.streaming, new.trainer.devices, new.trainer.accumulate_grad_batches = True, 1, 2
    applied, refused = config_changes(asdict(old), new)
    assert not applied and len(refused) == 2
    assert all("data.streaming=true: a stream's position counts the batches" in r for r in refused), refused
    old.data.streaming = new.data.streaming = False
    assert config_changes(asdict(old), new)[1] == []


def test_split_windows_left_out_of_a_stream_are_counted_as_in_memory(  # noqa: ANN001
        builtin_tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """data.overlong=split leaves out the windows of a long prompt that hold no loss token: the in-memory path
    counts them (split_windows_no_loss), the stream left them out without a word."""
    long_prompt = " ".join(f"word{i}" for i in range(120))
    rows = [{"prompt": long_prompt + f" q{i}", "completion": f"a{i}"} for i in range(6)]
    rows += [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(6)]
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    kw = dict(overlong="split", overlong_stride=8, max_seq_len=64, max_tokens_per_batch=256, stream_buffer=5)
    memory = BambaDataModule(data_cfg(path, **kw), builtin_tokenizer)
    memory.prepare()
    expected = memory.stats["train"]
    assert expected.split_windows_no_loss > 0  # the case at hand
    dm = BambaDataModule(data_cfg(path, streaming=True, **kw), builtin_tokenizer, seed=42)
    dm.prepare()
    for batch in StreamBatches(dm.stream, dm.stream_sources, builtin_tokenizer, dm.cfg, dm.seed):
        epoch = batch[STREAM_KEY]["epoch"]
        dm.on_before_batch_transfer(batch, 0)  # as each batch reaches training
        if epoch == 1:  # the first pass has ended
            break
    report = dm.stream_report()
    assert (report["split_windows"], report["split_windows_no_loss"]) == (
        expected.split_windows, expected.split_windows_no_loss)
    assert report["rows"]["split"] == expected.split
    assert "hold no loss token and are left out" in caplog.text
    resumed = BambaDataModule(data_cfg(path, streaming=True, **kw), builtin_tokenizer, seed=42)
    resumed.load_state_dict(dm.state_dict())  # a resumed run goes on counting from the checkpoint's counts
    assert resumed.stream_report() == report
