"""`recipe=eval` on a run: the run's own data config, with every data key of the command line on top of it.

The integration tests (tests/integration/test_cli.py) evaluate a real run; these check the merge itself."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig

from bamba_ft.config.overrides import key_origins
from bamba_ft.config.schema import DataConfig, RunConfig, SourceConfig
from bamba_ft.config.store import config_dirs, register_configs
from bamba_ft.errors import ConfigError
from bamba_ft.jobs.evaluate import describe_data, eval_data_config, validation_keys

# A run trained on the user's files, with its own validation file, lengths and role names.
RUN = RunConfig(data=DataConfig(source="train.jsonl", val_source="val.jsonl", format="messages", max_seq_len=300,
                                max_tokens_per_batch=600, roles={"human": "user"}))


@pytest.fixture(autouse=True)
def data_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The files these configs name, in the current directory: the merged config is validated, and validate
    refuses a data file that does not exist."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.jsonl", "val.jsonl", "other.jsonl", "new.jsonl", "a.jsonl", "b.jsonl"):
        (tmp_path / name).touch()


@pytest.fixture
def hydra_overrides() -> Iterator[object]:
    """Sets Hydra's config for a command line, as Hydra's run_job does, so key_origins can read it."""
    register_configs()

    def use(overrides: list[str]) -> None:
        with initialize_config_dir(config_dir=str(config_dirs()[0]), version_base="1.3"):
            cfg = compose("train", overrides=["output_dir=/tmp/x", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)

    yield use
    HydraConfig.instance().cfg = None  # a later compose must not see these choices


def test_key_origins_are_the_typed_keys_and_the_options_named_there_that_set_the_others(hydra_overrides) -> None:  # noqa: ANN001
    hydra_overrides(["recipe=eval", "data=file", "data.source=x.jsonl", "++data.format=messages", "smoke=fast",
                     "trainer.seed=3"])
    typed = "the command line"  # data.source is data=file's too: typed, it is the user's
    assert key_origins("data") == {"data.source": typed, "data.format": typed, "data.max_tokens_per_batch": "data=file",
                                   "data.builtin_train_examples": "smoke=fast", "data.builtin_val_examples": "smoke=fast"}
    hydra_overrides(["recipe=eval"])  # the default data option and the recipe set no data key
    assert key_origins("data") == {}


def test_the_eval_log_tells_the_keys_typed_from_those_an_option_set() -> None:
    """smoke=fast sets data.builtin_*: the log listed them as if typed on the command line."""
    origins = {"data.max_val_examples": "the command line", "data.builtin_train_examples": "smoke=fast",
               "data.builtin_val_examples": "smoke=fast"}
    assert describe_data(DataConfig(max_val_examples=3), origins) == (
        "data.source=builtin, data.max_val_examples=3 (the run's data config; from the command line: "
        "data.max_val_examples; set by smoke=fast: data.builtin_train_examples, data.builtin_val_examples)")
    only_smoke = {k: v for k, v in origins.items() if v == "smoke=fast"}
    assert describe_data(DataConfig(), only_smoke).endswith(
        "(the run's data config; set by smoke=fast: data.builtin_train_examples, data.builtin_val_examples)")
    assert describe_data(DataConfig(), {"data.max_val_examples"}).endswith(
        "(the run's data config; from the command line: data.max_val_examples)")


def test_no_data_keys_evaluate_on_the_runs_own_data() -> None:
    assert eval_data_config(RUN, RunConfig(), set()) == RUN.data


def test_each_given_key_replaces_the_runs_value_and_nothing_else() -> None:
    cfg = RunConfig(data=DataConfig(val_source="other.jsonl", max_val_examples=3, roles={"bot": "assistant"}))
    data = eval_data_config(RUN, cfg, {"data.val_source", "data.max_val_examples", "data.roles.bot"})
    assert (data.source, data.val_source, data.max_val_examples) == ("train.jsonl", "other.jsonl", 3)
    assert (data.max_seq_len, data.format, data.roles) == (300, "messages", {"human": "user", "bot": "assistant"})


def test_a_new_source_brings_its_own_validation_not_the_runs() -> None:
    """The run's val_source belongs to its data: kept, it would be evaluated instead of the new source. A file the
    model never trained on is scored whole, not its 5% hold-out; named with a hold-out key, as that says."""
    data = eval_data_config(RUN, RunConfig(data=DataConfig(source="new.jsonl")), {"data.source"})
    assert (data.source, data.val_source, data.format) == ("new.jsonl", "new.jsonl", "auto")
    held = RunConfig(data=DataConfig(source="new.jsonl", val_fraction=0.2))
    data = eval_data_config(RUN, held, {"data.source", "data.val_fraction"})
    assert (data.val_source, data.val_fraction) == (None, 0.2)
    split = RunConfig(data=DataConfig(source="new.jsonl", split="test"))
    assert eval_data_config(None, split, {"data.source", "data.split"}).val_split == "test"  # no run: a base model
    assert data.max_seq_len == 300  # the run's tokenization stays
    mixed = RunConfig(data=DataConfig(sources=[SourceConfig(source="a.jsonl"), SourceConfig(source="b.jsonl")]))
    data = eval_data_config(mixed, RunConfig(data=DataConfig(source="new.jsonl")), {"data.source"})
    assert (data.source, data.sources) == ("new.jsonl", [])  # data.sources would replace data.source


def test_a_json_file_read_under_another_key_is_a_new_source_scored_under_that_key() -> None:
    """data.field picks the rows of a .json file holding one object: the run's file under another key (its test
    rows) is data the model did not train on, scored whole, its validation read under the same key."""
    Path("export.json").touch()
    run = RunConfig(data=DataConfig(source="export.json", field="train"))
    data = eval_data_config(run, RunConfig(data=DataConfig(source="export.json", field="test")),
                            {"data.source", "data.field"})
    assert (data.val_source, data.val_field, data.field) == ("export.json", "test", "test")
    same = eval_data_config(run, RunConfig(data=DataConfig(source="export.json", field="train")),
                            {"data.source", "data.field"})
    assert (same.val_source, same.val_field) == (None, None)  # its own training rows: the hold-out is scored


def test_the_runs_own_training_file_named_again_keeps_its_hold_out() -> None:
    """Scoring the whole training file would score rows the model trained on."""
    own = RunConfig(data=DataConfig(source="train.jsonl"))
    run = RunConfig(data=DataConfig(source="train.jsonl"))
    data = eval_data_config(run, own, {"data.source"})
    assert (data.val_source, data.val_fraction) == (None, 0.05)


@pytest.mark.parametrize("spelling", ["./train.jsonl", "{cwd}/train.jsonl", "../{name}/train.jsonl", "link.jsonl"])
def test_the_runs_own_training_file_spelt_otherwise_keeps_its_hold_out(spelling: str, tmp_path: Path) -> None:
    """The run trained on train.jsonl; the same file by another path was taken for new data and scored whole,
    training rows included, so the evaluation reported a lower loss than the held-out rows give."""
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "train.jsonl")
    given = spelling.format(cwd=tmp_path, name=tmp_path.name)
    run = RunConfig(data=DataConfig(source="train.jsonl"))
    data = eval_data_config(run, RunConfig(data=DataConfig(source=given)), {"data.source"})
    assert (data.source, data.val_source, data.val_fraction) == (given, None, 0.05)
    other = eval_data_config(run, RunConfig(data=DataConfig(source="./other.jsonl")), {"data.source"})
    assert other.val_source == "./other.jsonl"  # another file is still scored whole


@pytest.mark.parametrize(("data", "keys"), [
    (DataConfig(source="train.jsonl", val_fraction=0.0), ["data.val_source=FILE"]),
    (DataConfig(source="train.jsonl", max_val_examples=0), ["data.max_val_examples=1000"]),
    (DataConfig(source="train.jsonl", val_fraction=0.0, max_val_examples=0),
     ["data.val_source=FILE", "data.max_val_examples=1000"]),
    (DataConfig(sources=[SourceConfig(source="a.jsonl")], val_fraction=0.0), ["data.val_source=FILE"]),
    (DataConfig(builtin_val_examples=0), ["data.builtin_val_examples=200"]),
    (DataConfig(max_val_examples=0), ["data.max_val_examples=1000"])])
def test_a_run_without_validation_data_is_told_the_keys_that_give_its_evaluation_some(data: DataConfig,
                                                                                      keys: list[str]) -> None:
    """A run trained with data.val_fraction=0 suggested recipe=eval, which only printed 'no validation data'."""
    assert validation_keys(data) == keys  # data.val_source on the builtin task would be refused


def test_a_key_the_builtin_task_does_not_read_is_refused_with_the_fix() -> None:
    cfg = RunConfig(data=DataConfig(val_source="other.jsonl"))
    with pytest.raises(ConfigError, match=r"(?s)data.val_source: the data is the builtin task.*would be ignored"
                                          r".*Fix: .*data=file data.source="):
        eval_data_config(RunConfig(), cfg, {"data.val_source"})


def test_a_clash_of_the_runs_values_and_the_given_ones_names_both() -> None:
    cfg = RunConfig(data=DataConfig(max_tokens_per_batch=100))
    with pytest.raises(ConfigError, match=r"(?s)the run's data config with data.max_tokens_per_batch from the "
                                          r"command line.*max_tokens_per_batch=100 .*data.max_seq_len=300"):
        eval_data_config(RUN, cfg, {"data.max_tokens_per_batch"})
    with pytest.raises(ConfigError, match=r"the run's data config with data.max_tokens_per_batch set by data=file"):
        eval_data_config(RUN, cfg, {"data.max_tokens_per_batch": "data=file"})


@pytest.mark.parametrize("mixed", [False, True], ids=["source", "sources"])
def test_an_evaluation_reads_the_same_held_out_rows_without_tokenizing_the_training_split(
        mixed: bool, tmp_path, builtin_tokenizer) -> None:  # noqa: ANN001
    import json

    from bamba_ft.data.builtin import generate_sft
    from bamba_ft.data.module import BambaDataModule

    files = []
    for seed in (1, 2):
        files.append(tmp_path / f"d{seed}.jsonl")
        files[-1].write_text("".join(json.dumps(r) + "\n" for r in generate_sft(40, seed=seed)))
    cfg = (DataConfig(source="builtin", sources=[SourceConfig(source=str(f)) for f in files], val_fraction=0.1)
           if mixed else DataConfig(source=str(files[0]), val_fraction=0.1))
    trained, evaluated = BambaDataModule(cfg, builtin_tokenizer, seed=7), BambaDataModule(cfg, builtin_tokenizer, seed=7)
    trained.prepare()
    evaluated.prepare(train=False)
    assert evaluated.train_set is None and trained.train_set is not None
    assert evaluated.val_rows == trained.val_rows and len(evaluated.val_rows) == (8 if mixed else 4)
    assert evaluated.val_set["input_ids"] == trained.val_set["input_ids"]


def test_perplexity_is_the_exp_of_the_token_mean_loss_above_30_nats_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """val_ppl (the summary's 'val perplexity', metrics.json, a sweep objective) and the logged val/ppl were
    exp(min(loss, 30)): every loss above 30 nats read as the same 1.07e13, so a sweep minimizing val_ppl saw such runs
    tie. Two batches of 120 and 30 nats over 3 and 1 target tokens: loss 37.5, perplexity exp(37.5) = 1.9e16."""
    import math
    from types import SimpleNamespace

    import torch

    from bamba_ft.config.schema import OptimConfig
    from bamba_ft.jobs import evaluate
    from bamba_ft.lit_module import BambaLitModule

    batches = [(torch.tensor(120.0), torch.tensor(3)), (torch.tensor(30.0), torch.tensor(1))]
    sums = iter(batches)
    monkeypatch.setattr(evaluate, "loss_sum_and_count", lambda model, batch: next(sums))
    dm = SimpleNamespace(full_val_dataloader=lambda: [{}, {}])
    metrics = evaluate.validation_loss(torch.nn.Linear(1, 1), dm, torch.device("cpu"))
    assert metrics["val_loss"] == pytest.approx(37.5, rel=1e-12)
    assert metrics["val_ppl"] == pytest.approx(math.exp(37.5), rel=1e-12)
    assert evaluate.perplexity(800.0) == math.inf  # past a float: inf, never a number standing in for it

    lit = BambaLitModule(torch.nn.Linear(1, 1), OptimConfig())
    trainer = SimpleNamespace(strategy=SimpleNamespace(reduce=lambda value, reduce_op: value))
    monkeypatch.setattr(BambaLitModule, "trainer", property(lambda self: trainer))
    logged: dict[str, float] = {}
    monkeypatch.setattr(lit, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    monkeypatch.setattr(lit, "forward", lambda batch: batches[batch])
    lit.on_validation_epoch_start()
    lit.validation_step(0, 0)
    lit.validation_step(1, 1)
    lit.on_validation_epoch_end()
    assert logged["val/loss"] == pytest.approx(37.5, rel=1e-6)
    assert logged["val/ppl"] == pytest.approx(math.exp(37.5), rel=1e-5)  # float32


def test_an_end_of_turn_spelt_in_ordinary_tokens_stops_generation_and_is_cut_off() -> None:
    """A chat template whose assistant turns end with text that is no special token of the tokenizer (chatml's
    '<|im_end|>' on a tokenizer without it) gives generation no stop id: it ran on to max_new_tokens past the
    answer, and exact match compared 'answer<|im_end|>...' with 'answer' (0% whatever the answers). Generation now
    stops at that text and the answer is cut before it. Here characters 4-6 of a greedy continuation are made the
    template's end of turn: the answer is the first four characters, and generation stopped after the seventh."""
    import torch

    from bamba_ft.config.schema import Sampling
    from bamba_ft.data.builtin import build_char_tokenizer
    from bamba_ft.data.templates import end_of_turn_text
    from bamba_ft.jobs.evaluate import generate
    from tests.unit.test_families import tiny  # its float64-norm fixture stays with its own tests

    tokenizer = build_char_tokenizer()
    model = tiny("nemotron_h", vocab_size=len(tokenizer))
    prompts, cpu = ["reverse the word hello"], torch.device("cpu")
    free = generate(model, tokenizer, prompts, Sampling(max_new_tokens=12, batch_size=1), cpu)[0]
    mark = free[4:7]
    assert len(free) == 12 and free.find(mark) == 4 and end_of_turn_text(tokenizer) is None
    tokenizer.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                               + mark + "{% endif %}{% endfor %}")
    assert end_of_turn_text(tokenizer) == mark

    steps = []  # one forward per generated token
    model.register_forward_hook(lambda module, args, output: steps.append(1))
    assert generate(model, tokenizer, prompts, Sampling(max_new_tokens=12, batch_size=1), cpu) == [free[:4]]
    assert len(steps) == 7
