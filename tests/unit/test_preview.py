"""recipe=preview: the first batch's sequences as training reads them, the tokens with loss marked."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bamba_ft.config.schema import DataConfig, PreviewConfig, RunConfig
from bamba_ft.data.packing import collate_packed, collate_padded
from bamba_ft.data.tokenize import IGNORE_INDEX
from bamba_ft.jobs import preview

EXAMPLES = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
            {"input_ids": [8, 9], "labels": [IGNORE_INDEX, IGNORE_INDEX]},
            {"input_ids": [10, 11, 12, 13], "labels": [IGNORE_INDEX, 11, IGNORE_INDEX, 13]}]


@pytest.mark.parametrize("collate", [collate_packed, lambda e: collate_padded(e, pad_id=0),
                                     lambda e: collate_padded(e, pad_id=0, left=True)], ids=["packed", "right", "left"])
def test_sequences_come_back_from_a_collated_batch(collate) -> None:  # noqa: ANN001
    assert preview.sequences(collate(EXAMPLES)) == [(e["input_ids"], e["labels"]) for e in EXAMPLES]


def test_runs_of_loss_tokens_are_marked(builtin_tokenizer) -> None:  # noqa: ANN001
    ids = builtin_tokenizer("ab", add_special_tokens=False)["input_ids"] + [builtin_tokenizer.eos_token_id]
    ids = builtin_tokenizer("xy", add_special_tokens=False)["input_ids"] + ids
    labels = [IGNORE_INDEX, IGNORE_INDEX, *ids[2:]]
    eos = builtin_tokenizer.eos_token
    assert preview.marked(builtin_tokenizer, ids, labels, color=False) == f"xy[[ab{eos}]]"
    assert preview.marked(builtin_tokenizer, ids, labels, color=True) == f"xy\033[32mab{eos}\033[0m"
    labels[3] = IGNORE_INDEX  # two runs
    assert preview.marked(builtin_tokenizer, ids, labels, color=False) == f"xy[[a]]b[[{eos}]]"


def test_preview_shows_the_template_and_the_answer_with_loss(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {i} and 1", "completion": str(i + 1)}) + "\n" for i in range(8)))
    cfg = RunConfig(task="preview", data=DataConfig(source=str(path), val_fraction=0.0, max_tokens_per_batch=64),
                    preview=PreviewConfig(examples=8, color="false"))
    result = preview.run(cfg)
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if line.startswith("<|user|>")]
    assert len(shown) == result["sequences"] < 8  # the first batch holds a few of the eight
    for line in shown:
        n = int(line.split("add ")[1].split(" ")[0])
        assert line == f"<|user|>add {n} and 1<|end|><|assistant|>[[{n + 1}<|end|>]]"
    assert f"train batch 1: {result['sequences']} sequences" in out and "generation stops at '<|end|>'" in out


def test_preview_names_the_preset_a_tokenizer_without_a_template_gets(tmp_path: Path, builtin_tokenizer,  # noqa: ANN001
                                                                      capsys: pytest.CaptureFixture) -> None:
    """It said "chat template: the tokenizer's own" for a tokenizer that has none (the bamba_ft preset renders)."""
    from bamba_ft.config.schema import ModelConfig

    bare = tmp_path / "tok"
    builtin_tokenizer.save_pretrained(bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(4)))
    preview.run(RunConfig(task="preview", model=ModelConfig(tokenizer=str(bare)),
                          data=DataConfig(source=str(path), val_fraction=0.0), preview=PreviewConfig(color="false")))
    assert "chat template: the bamba_ft preset (the tokenizer has none)" in capsys.readouterr().out


def test_preview_names_an_end_of_turn_text_that_no_token_stops_at(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture) -> None:
    """chatml's '<|im_end|>' is ten ordinary characters to the builtin tokenizer: no stop id ends a turn, so
    generation stops at that text, and the preview says so beside the EOS token."""
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"add {i} and 1", "completion": str(i + 1)}) + "\n" for i in range(8)))
    cfg = RunConfig(task="preview", data=DataConfig(source=str(path), val_fraction=0.0, max_tokens_per_batch=256,
                                                    chat_template="chatml"),
                    preview=PreviewConfig(examples=8, color="false"))
    preview.run(cfg)
    assert "generation stops at '<|end|>', the text '<|im_end|>'" in capsys.readouterr().out
