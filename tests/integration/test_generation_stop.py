"""After the default fine-tune, greedy generation ends each answer with EOS, which the saved adapter's
generation_config.json names, so generation stops there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.integration.conftest import run_in_process


@pytest.mark.slow
def test_greedy_generation_stops_at_eos_after_the_default_training(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    from bamba_ft.config.schema import RunConfig
    from bamba_ft.data.builtin import generate_sft
    from bamba_ft.model.restore import load_source, locate
    from bamba_ft.ops.loss import causal_lm

    run = tmp_path / "run"
    # 60 of the recipe's 400 steps: the answer format (answer, then <|end|>) is learnt long before the answers.
    # Runs of 25, 35, 45, 50 and 60 steps were measured: 0, 13 and then all 16 of these prompts stop at EOS. The run's own
    # evaluation is cut to 16 validation rows and no generation: it does not touch the weights (the adapter is
    # bitwise the same as with the default 200 rows and 8 generations, measured), and the test generates itself.
    run_in_process(["recipe=sft", "trainer=cpu", "trainer.max_steps=60", "eval.before_training=false",
                    "data.builtin_val_examples=16", "eval.generate=false"], run)
    adapter = run / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    generation = GenerationConfig.from_pretrained(adapter)
    eos = tokenizer.convert_tokens_to_ids("<|end|>")
    assert generation.eos_token_id == tokenizer.eos_token_id == eos
    model, _ = load_source(locate(str(run), RunConfig()), torch.device("cpu"))
    lm = causal_lm(model)
    limit = 32
    for example in generate_sft(16, seed=7, validation=True):
        prompt = tokenizer.apply_chat_template(example["messages"][:1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = lm.generate(ids, generation_config=generation, max_new_tokens=limit, do_sample=False)
        new = out[0, ids.shape[1]:].tolist()
        # The answers are a few characters long: generation must stop at the first EOS, well before the limit.
        assert new[-1] == eos and eos not in new[:-1] and len(new) < limit, tokenizer.decode(new)
