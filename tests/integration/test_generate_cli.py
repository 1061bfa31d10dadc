"""recipe=generate on a trained run: its adapter, chat template and stop tokens, as the run's evaluation used them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.integration.conftest import run_in_process


def test_generate_answers_the_runs_validation_prompts_as_its_evaluation_did(
        sft_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bamba_ft.data.module import BambaDataModule
    from bamba_ft.data.templates import ensure_chat_template
    from bamba_ft.data.tokenize import prompt_and_reference
    from bamba_ft.model.build import load_tokenizer
    from bamba_ft.model.restore import load_run_config

    predictions = [json.loads(line) for line in (sft_run / "predictions.jsonl").read_text().splitlines()]
    run = load_run_config(sft_run)  # the conversations behind the run's predictions: its validation rows
    tokenizer = load_tokenizer(run.model)
    ensure_chat_template(tokenizer, run.data.chat_template)
    dm = BambaDataModule(run.data, tokenizer, seed=run.trainer.seed)
    dm.prepare(train=False)
    rows = dm.val_rows[: len(predictions)]
    assert [prompt_and_reference(tokenizer, r)[0] for r in rows] == [p["prompt"] for p in predictions]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": r}) + "\n" for r in rows))

    result = run_in_process(["recipe=generate", "trainer=cpu", f"generate.checkpoint={sft_run}",
                             f"generate.prompts_file={prompts}", "generate.max_new_tokens=6"], tmp_path / "gen")
    written = [json.loads(line) for line in (tmp_path / "gen" / "generations.jsonl").read_text().splitlines()]
    assert result["generations"] == len(predictions) == len(written) == 8
    assert [w["answer"] for w in written] == [p["prediction"] for p in predictions]  # greedy: the same tokens
    assert [w["reference"] for w in written] == [p["reference"] for p in predictions]
    # and the comparison can fail: the base model without the run's adapter answers otherwise
    run_in_process(["recipe=generate", "trainer=cpu", f"generate.prompts_file={prompts}", "generate.max_new_tokens=6"],
                   tmp_path / "base")
    base = [json.loads(line)["answer"] for line in (tmp_path / "base" / "generations.jsonl").read_text().splitlines()]
    assert base != [w["answer"] for w in written]
    out = capsys.readouterr().out
    assert f"[8/8] prompt: {written[-1]['messages'][-1]['content']}" in out and "generations: " in out


def test_generate_reads_prompts_from_standard_input(sft_run: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("Reverse the word: cat\n\nSort the letters: cba\n"))  # not a terminal
    out_file = tmp_path / "answers" / "a.jsonl"
    run_in_process(["recipe=generate", "trainer=cpu", f"generate.checkpoint={sft_run / 'adapter'}",
                    "generate.max_new_tokens=4", f"generate.output_file={out_file}"], tmp_path / "gen")
    written = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [w["messages"][-1]["content"] for w in written] == ["Reverse the word: cat", "Sort the letters: cba"]
    assert [w["where"] for w in written] == ["standard input, line 1", "standard input, line 3"]
    assert "[2/2] prompt: Sort the letters: cba" in capsys.readouterr().out


def test_generate_refuses_an_output_file_it_could_not_write_or_would_replace_before_the_model_loads(
        sft_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An existing directory or a path under a file failed with a traceback once every answer was generated; a run's
    metrics.json was silently replaced by the answers. An earlier generations file is replaced."""
    from bamba_ft.errors import ConfigError

    (tmp_path / "afile").write_text("mine")
    args = ["recipe=generate", "trainer=cpu", f"generate.checkpoint={sft_run}", "generate.prompt=Reverse cat",
            "generate.max_new_tokens=4"]
    metrics = (sft_run / "metrics.json").read_text()
    with monkeypatch.context() as m:
        m.setattr("bamba_ft.jobs.generate.load_source", lambda *a: pytest.fail("the model loaded"))
        for out, message in ((tmp_path, "is a directory"), (tmp_path / "afile" / "a.jsonl", "is a file, so nothing"),
                             (sft_run / "metrics.json", "is not an earlier generations file")):
            with pytest.raises(ConfigError, match=f"generate.output_file={out}.* {message}"):
                run_in_process([*args, f"generate.output_file={out}"], tmp_path / "gen")
    assert (sft_run / "metrics.json").read_text() == metrics and (tmp_path / "afile").read_text() == "mine"
    out = tmp_path / "answers.jsonl"
    for _ in range(2):  # the second run replaces the first's answers
        assert run_in_process([*args, f"generate.output_file={out}"], tmp_path / "gen")["generations"] == 1
    assert len(out.read_text().splitlines()) == 1
