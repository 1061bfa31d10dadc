"""A dataset repository on disk (data files per configuration, declared in README.md as on the Hub) read, eagerly
and streamed, through the same `datasets.load_dataset(name, config, split=, streaming=)` call as a Hub id."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
from huggingface_hub import constants

from bamba_ft.config.schema import DataConfig, SourceConfig
from bamba_ft.data import load
from bamba_ft.data.builtin import generate_sft
from bamba_ft.data.load import ROW, load_rows, load_stream
from bamba_ft.errors import DataError
from tests.unit.test_stream import in_memory, one_epoch, stream_of, write_jsonl

README = """---
configs:
- config_name: chat
  data_files:
  - split: train
    path: "chat/*.jsonl"
- config_name: qa
  data_files:
  - split: train
    path: "qa/train.jsonl"
---
A chat configuration in two shards and a question/answer one.
"""
QA_COLUMNS = {"question": "prompt", "answer": "completion"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> str:
    d = tmp_path_factory.mktemp("repo")
    (d / "README.md").write_text(README)
    (d / "chat").mkdir()
    (d / "qa").mkdir()
    # JSON Lines: a Parquet stream of several shards sleeps 5 s at each pass's end (datasets' reader-thread guard)
    rows = generate_sft(60, seed=5)
    for i in range(2):
        write_jsonl(d / "chat" / f"train-{i}.jsonl", rows[30 * i : 30 * (i + 1)])
    qa = [{"question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]} for r in rows[:40]]
    write_jsonl(d / "qa" / "train.jsonl", qa)
    return str(d)


def without_row(rows: object) -> list[dict]:
    return [{k: v for k, v in r.items() if k != ROW} for r in rows]


@pytest.mark.parametrize(("config", "n"), [("chat", 60), ("qa", 40)])
def test_repo_directory_streams_the_configuration_load_dataset_gives(repo: str, config: str, n: int) -> None:
    streamed = list(load_stream(repo, "train", "data.source", config))
    assert [r[ROW] for r in streamed] == list(range(1, n + 1))
    assert without_row(streamed) == list(datasets.load_dataset(repo, config, split="train", streaming=True))
    assert without_row(streamed) == without_row(load_rows(repo, "train", "data.source", config))


def test_repo_directory_without_a_configuration_names_the_key_that_picks_one(repo: str) -> None:
    with pytest.raises(DataError, match=r"(?s)data.source=.*Config name is missing.*\['chat', 'qa'\].*"
                                        r"Fix: set data.config to one of its configurations"):
        load_stream(repo, "train", "data.source")
    with pytest.raises(DataError, match=r"(?s)BuilderConfig 'nope' not found.*Fix: set data.sources\[1\].config"):
        load_rows(repo, "train", "data.sources[1].source", "nope")


def test_hub_id_and_repo_directory_take_one_call(repo: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub is unreachable here: `org/multi` is served from the repository directory by a stand-in for
    datasets.load_dataset that records each call; a Hub id and the directory must make the same call."""
    calls, real = [], datasets.load_dataset

    def served(path: str, name: str | None = None, **kw) -> object:  # noqa: ANN003
        calls.append((path, name, kw))
        return real(repo if path == "org/multi" else path, name, **kw)

    monkeypatch.setattr(datasets, "load_dataset", served)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(load, "_hub_unreachable", lambda: None)
    for streaming in (True, False):
        read = load_stream if streaming else load_rows
        calls.clear()
        hub, local = read("org/multi", "train", "data.source", "qa"), read(repo, "train", "data.source", "qa")
        cache = calls[1][2].pop("cache_dir", None)  # a directory in memory: a cache keyed on its files (load.py)
        assert calls == [(src, "qa", {"split": "train", "streaming": streaming}) for src in ("org/multi", repo)]
        assert (cache is None) == streaming and (streaming or "bamba_ft_local" in cache)
        assert list(hub) == list(local)


@pytest.mark.parametrize("how", ["data.config", "data.sources"])
def test_streamed_repo_configuration_packs_the_in_memory_sequences(builtin_tokenizer, repo: str, how: str) -> None:  # noqa: ANN001
    picked = ({"source": repo, "config": "chat"} if how == "data.config"
              else {"sources": [SourceConfig(source=repo, config="qa", columns=QA_COLUMNS)]})
    cfg = DataConfig(**picked, streaming=True, shuffle_buffer=16, stream_buffer=16, max_seq_len=128,
                     max_tokens_per_batch=512, val_fraction=0.0)
    streamed = Counter(s for seqs, _ in one_epoch(iter(stream_of(builtin_tokenizer, cfg))) for s in seqs)
    expected = in_memory(builtin_tokenizer, DataConfig(**{**vars(cfg), "streaming": False}))
    assert sum(expected.values()) == (60 if how == "data.config" else 40)
    assert streamed == expected
