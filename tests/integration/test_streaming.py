"""data.streaming=true end to end: training from a JSONL stream, its metrics, and stop/resume through a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bamba_ft.config.schema import DataConfig
from bamba_ft.data.builtin import generate_sft
from bamba_ft.jobs import train
from tests.integration.test_distributed import _adapter
from tests.integration.test_resume import adapter, small_run, stop_at


def stream_run(out: Path, source: Path, steps: int, resume: str | None = None, workers: int = 0) -> object:
    cfg = small_run(out, resume=resume, steps=steps)
    cfg.data = DataConfig(source=str(source), streaming=True, stream_buffer=24, max_val_examples=8,
                          max_seq_len=128, max_tokens_per_batch=256, num_workers=workers)
    return cfg


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_sft(80, seed=3)))
    return path


@pytest.mark.parametrize("workers", [0, 1])  # 1: tokenized in a DataLoader worker; positions travel with batches
def test_streaming_train_run_writes_packing_efficiency(source: Path, tmp_path: Path, workers: int) -> None:
    metrics = train.run(stream_run(tmp_path / "run", source, steps=3, workers=workers))
    assert metrics["train"]["steps"] == 3
    stream = metrics["data"]["train_stream"]
    assert stream["batches"] == 3 and stream["epoch"] == 0
    assert metrics["data"]["val"]["kept"] == 8  # the stream's first 8 rows
    assert 0.5 < metrics["packing_efficiency"] <= 1.0
    assert json.loads((tmp_path / "run/metrics.json").read_text())["packing_efficiency"] == metrics["packing_efficiency"]


def test_streaming_resume_matches_uninterrupted(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train.run(stream_run(tmp_path / "full", source, steps=6))
    stop_at(monkeypatch, 4)
    assert train.run(stream_run(tmp_path / "first", source, steps=6))["stopped_at"] == 4
    monkeypatch.undo()
    metrics = train.run(stream_run(tmp_path / "second", source, steps=6, resume=str(tmp_path / "first")))
    assert metrics["data"]["train_stream"]["batches"] == 6  # counted across the resume
    full, resumed = adapter(tmp_path / "full"), adapter(tmp_path / "second")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6)


def test_streaming_ddp_on_two_ranks_equals_one_rank_accumulating_two(tmp_path: Path) -> None:
    """Rank r trains every 2nd batch of each window from r on: 2 ranks x 1 batch see what 1 rank sees in 2
    accumulated batches (this window of 64 examples packs into an even number of batches, so none is halved)."""
    stream = ["data.streaming=true", "data.stream_buffer=64", "data.num_workers=0"]
    ddp = _adapter(tmp_path, "ddp", *stream, "trainer.devices=2", "trainer.strategy=ddp")
    accumulated = _adapter(tmp_path, "accumulated", *stream, "trainer.accumulate_grad_batches=2")
    assert max(float((ddp[k] - accumulated[k]).abs().max()) for k in ddp) <= 1e-5
    assert any(float(v.abs().max()) > 0 for k, v in ddp.items() if "lora_B" in k)  # the adapter did train
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 4 and metrics["data"]["train_stream"]["batches"] == 4


@pytest.mark.parametrize("workers", [0, 1])
def test_a_stream_counts_and_warns_about_the_rows_its_length_policy_cut(source: Path, tmp_path: Path, workers: int,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """In memory, truncated and dropped examples are counted in the data line and metrics.json; a stream
    counted none of them."""
    import logging

    caplog.set_level(logging.WARNING)
    rows_file = tmp_path / "long.jsonl"  # every other answer is longer than data.max_seq_len
    rows_file.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": "x" * (80 if i % 2 else 8)}) + "\n"
                                 for i in range(60)))
    cfg = stream_run(tmp_path / "run", rows_file, steps=8, workers=workers)
    cfg.data.max_seq_len = 40
    cfg.data.max_tokens_per_batch, cfg.data.stream_buffer = 120, 6  # windows of 6 rows: several end in 8 steps
    stream = json.loads((tmp_path / "run/metrics.json").read_text())["data"]["train_stream"] if train.run(cfg) else {}
    rows = stream["rows"]  # counted as a window's last batch is trained
    assert rows.get("truncated", 0) > 0 and sum(rows.values()) == sum(stream["source_rows"]) > 0, stream
    if workers == 0:  # a worker process logs where caplog does not listen
        # once per run: the gradient probe's stream and the fit's share what was said
        assert caplog.text.count("data warning: training rows longer than data.max_seq_len=40 are cut to it") == 1
