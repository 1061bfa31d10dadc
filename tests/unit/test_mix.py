"""data.stopping_strategy on a lopsided mix (0.9 of a 300-row source, 0.1 of a 10-row one), in memory and streamed:
the small source ends the mix, repeats, or is read once, and the per-source counts say which."""

from __future__ import annotations

import json

import pytest

from bamba_ft.config.schema import DataConfig, RunConfig, SourceConfig, validate
from bamba_ft.data.builtin import generate_sft
from bamba_ft.data.module import BambaDataModule
from bamba_ft.data.stream import STREAM_KEY, StreamBatches
from bamba_ft.errors import ConfigError

LARGE, TINY = 300, 10
STRATEGIES = ["first_exhausted", "all_exhausted", "all_exhausted_without_replacement"]


@pytest.fixture(scope="module")
def lopsided(tmp_path_factory: pytest.TempPathFactory) -> list[SourceConfig]:
    d = tmp_path_factory.mktemp("mix")
    sources = []
    for name, n, weight in (("large", LARGE, 0.9), ("tiny", TINY, 0.1)):
        path = d / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in generate_sft(n, seed=n)))
        sources.append(SourceConfig(source=str(path), weight=weight))
    return sources


def mix_cfg(sources: list[SourceConfig], strategy: str, **kw) -> DataConfig:  # noqa: ANN003
    return DataConfig(**{"sources": sources, "stopping_strategy": strategy, "val_fraction": 0.0, "max_seq_len": 128,
                         "max_tokens_per_batch": 512, "stream_buffer": 64, **kw})


def check_rows(strategy: str, rows: list[int], sizes: tuple[int, int] = (LARGE, TINY)) -> None:
    """The documented behaviour of each strategy, in rows drawn from (large, tiny) sources of `sizes` rows.

    Bounds on random draws: tiny rows drawn before the 300th large one are negative binomial, mean 300 * 0.1/0.9
    = 33.3, sd 6.1; large rows before the 10th tiny one: mean 90, sd 30. The bounds lie about 2.5 sd out (and
    the draws are seeded, so the test is deterministic)."""
    if strategy == "first_exhausted":  # the tiny source ends the mix: read once; most of the large one unused
        assert rows[1] == sizes[1] and 20 <= rows[0] <= 170
    elif strategy == "all_exhausted":  # the large source ends it: read once; the tiny one repeats ~3.3 times
        assert rows[0] == sizes[0] and 18 <= rows[1] <= 50
    else:  # every row once
        assert rows == list(sizes)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lopsided_mix_in_memory_follows_the_stopping_strategy(builtin_tokenizer, lopsided, strategy: str) -> None:  # noqa: ANN001
    dm = BambaDataModule(mix_cfg(lopsided, strategy), builtin_tokenizer)
    dm.prepare()
    st = [dm.stats["train[0]"], dm.stats["train[1]"]]
    assert [s.kept for s in st] == [LARGE, TINY]
    check_rows(strategy, [s.in_mix for s in st])
    assert [s.passes for s in st] == pytest.approx([st[0].in_mix / LARGE, st[1].in_mix / TINY], abs=1e-12)
    assert f"({st[1].in_mix} in the training mix: {st[1].passes:.2f} passes)" in st[1].line("train[1]")
    assert len(dm.train_set) == sum(s.in_mix for s in st)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_lopsided_mix_streamed_counts_rows_and_passes_per_source(builtin_tokenizer, lopsided, strategy: str) -> None:  # noqa: ANN001
    # 2 rows of each source held out for validation: a pass over a source starts at its 3rd row
    cfg = mix_cfg(lopsided, strategy, streaming=True, shuffle_buffer=32, val_fraction=0.05, max_val_examples=4)
    dm = BambaDataModule(cfg, builtin_tokenizer)
    dm.prepare()
    rows, passes = [0, 0], [0, 0]
    for batch in StreamBatches(dm.stream, dm.stream_sources, builtin_tokenizer, cfg, dm.seed):
        meta = batch[STREAM_KEY]
        for i, (r, n) in enumerate(meta["sources"]):
            rows[i], passes[i] = rows[i] + r, passes[i] + n
        dm.on_before_batch_transfer(batch, 0)  # as training meets it: the counts go to metrics and checkpoints
        if meta["epoch"] == 1:
            break
    report = dm.stream_report()
    assert (report["source_rows"], report["source_passes"]) == (rows, passes)
    resumed = BambaDataModule(cfg, builtin_tokenizer)
    resumed.load_state_dict(dm.state_dict())
    assert resumed.stream_report() == report
    sizes = (LARGE - 2, TINY - 2)
    check_rows(strategy, rows, sizes)
    for n, r, p in zip(sizes, rows, passes):  # passes started: reading a source's first row starts one
        assert n * (p - 1) < r <= n * p
    assert passes[1] >= 2 if strategy == "all_exhausted" else passes == [1, 1]


def test_stopping_strategy_without_a_weighted_mix_is_refused(lopsided) -> None:  # noqa: ANN001
    cfg = RunConfig()
    cfg.data.stopping_strategy = "all_exhausted"
    with pytest.raises(ConfigError, match=r"(?s)data.stopping_strategy=all_exhausted ends a mix of weighted "
                                          r"data.sources, and this run mixes none.*Fix: give every one"):
        validate(cfg)
    cfg.data.sources = [SourceConfig(source=s.source) for s in lopsided]
    with pytest.raises(ConfigError, match="data.stopping_strategy=all_exhausted"):
        validate(cfg)
    cfg.data.sources = lopsided
    validate(cfg)
    cfg.data.stopping_strategy = "first"
    with pytest.raises(ConfigError, match="data.stopping_strategy='first' is not an option"):
        validate(cfg)


@pytest.mark.parametrize("streaming", [False, True], ids=["memory", "stream"])
def test_data_format_reads_the_sources_that_leave_theirs_auto(builtin_tokenizer, tmp_path, streaming: bool) -> None:  # noqa: ANN001
    """A file whose rows fit two formats (text, and alpaca's instruction/output): data.format=text decides for a
    source whose own format is auto, as it does for data.source; a source's own format still wins."""
    path = tmp_path / "both.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}", "instruction": "Say hi", "output": "hi"}) + "\n"
                            for i in range(8)))
    own = SourceConfig(source=str(path), format="alpaca")
    cfg = mix_cfg([SourceConfig(source=str(path)), own], "first_exhausted", format="text", streaming=streaming)
    dm = BambaDataModule(cfg, builtin_tokenizer)
    dm.prepare()
    if streaming:
        assert [s.fmt for s in dm.stream_sources] == ["text", "alpaca"]
    else:
        assert (dm.formats["train[0]"], dm.formats["train[1]"]) == ("text", "alpaca")
