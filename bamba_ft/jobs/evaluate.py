"""Evaluation: packed loss/perplexity, exact match by generation, predictions, curves; and `recipe=eval`."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from bamba_ft.config.overrides import COMMAND_LINE, key_origins, override_keys
from bamba_ft.config.schema import (
    NOT_BUILTIN,
    DataConfig,
    EvalConfig,
    RunConfig,
    Sampling,
    same_source,
    validate,
)
from bamba_ft.data.module import BambaDataModule
from bamba_ft.data.templates import end_of_turn_text, ensure_chat_template, stop_token_ids
from bamba_ft.data.tokenize import prompt_and_reference
from bamba_ft.errors import ConfigError, ModelError
from bamba_ft.faults import fault_point
from bamba_ft.jobs.report import output_path_problem, plot_curves, publish_file
from bamba_ft.jobs.runtime import autocast_for, choose_device, to_device
from bamba_ft.model.families import has_attention_layers
from bamba_ft.model.objective import loss_sum_and_count
from bamba_ft.model.restore import load_source, locate
from bamba_ft.ops.loss import causal_lm
from bamba_ft.rundir import RunDir

log = logging.getLogger(__name__)


@torch.no_grad()
def validation_loss(model: nn.Module, dm: BambaDataModule, device: torch.device) -> dict[str, float]:
    """Token-weighted loss and perplexity over the validation split."""
    loader = dm.full_val_dataloader()
    if not loader:
        return {}
    total, count = 0.0, 0
    with autocast_for(causal_lm(model), device):
        for batch in loader:
            s, n = loss_sum_and_count(model, to_device(batch, device))
            total, count = total + float(s), count + int(n)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": perplexity(loss), "val_tokens": count}


def perplexity(loss: float) -> float:
    """exp of a token-mean loss; inf past what a float holds (a loss above 709 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def normalize(answer: str) -> str:
    return " ".join(answer.strip().split())


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], cfg: Sampling, device: torch.device,
    add_special_tokens: bool = False, streamer: Any = None,
) -> list[str]:
    """Batched generation with left padding; returns the decoded continuations.

    `add_special_tokens`: the tokenizer's own (BOS) added to prompts that are not rendered by a chat template.
    `streamer` (transformers' TextStreamer, one prompt): each token printed as it is generated."""
    lm = causal_lm(model)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[str] = []
    sampling = (
        {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k or None}
        if cfg.do_sample
        else {"do_sample": False}
    )
    # transformers sizes the attention mask through the cache's attention layers and raises for a cache without
    # any: such a model generates without a cache, each new token from the whole sequence
    cache = has_attention_layers(lm)
    stops = stop_token_ids(tokenizer)  # EOS and the template's end-of-turn token
    # an end of turn spelt in ordinary tokens (no stop id can end it): stop at the text, and cut the answer before it
    marker = end_of_turn_text(tokenizer)
    by_text = {"stop_strings": [marker], "tokenizer": tokenizer} if marker else {}
    try:
        for s in range(0, len(prompts), cfg.batch_size):
            enc = tokenizer(prompts[s : s + cfg.batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=add_special_tokens)
            enc = {k: v.to(device) for k, v in enc.items()}
            with autocast_for(lm, device):
                ids = lm.generate(
                    **enc,
                    max_new_tokens=cfg.max_new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=stops,
                    use_cache=cache,
                    streamer=streamer,
                    **by_text,
                    **sampling,
                )
            new = ids[:, enc["input_ids"].shape[1] :]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            out.extend(t.split(marker, 1)[0] if marker else t for t in texts)
    finally:
        tokenizer.padding_side = side
    return out


def exact_match_eval(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, dm: BambaDataModule, cfg: EvalConfig, device: torch.device
) -> tuple[dict[str, float], list[dict]]:
    """Exact match of generated answers against the reference assistant turns of validation examples."""
    if not cfg.generate or cfg.num_generate == 0:  # 0: no generation metrics
        return {}, []
    pairs: list[tuple[str, str]] = []
    for example in dm.val_rows:
        pair = prompt_and_reference(tokenizer, example)
        if pair is not None:
            pairs.append(pair)
        if len(pairs) == cfg.num_generate:
            break
    if not pairs:
        return {}, []
    preds = generate(model, tokenizer, [p for p, _ in pairs], cfg, device)
    rows = [
        {"prompt": p, "reference": r, "prediction": pred, "correct": normalize(pred) == normalize(r)}
        for (p, r), pred in zip(pairs, preds)
    ]
    em = sum(r["correct"] for r in rows) / len(rows)
    return {"exact_match": em, "num_generated": len(rows)}, rows


def evaluate_model(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, dm: BambaDataModule, cfg: EvalConfig, device: torch.device
) -> tuple[dict[str, float], list[dict]]:
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        metrics = validation_loss(model, dm, device)
        em, rows = exact_match_eval(model, tokenizer, dm, cfg, device)
    finally:
        model.train(was_training)
    metrics.update(em)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics, rows


def format_metrics(m: dict[str, float]) -> str:
    parts = []
    if "val_loss" in m:
        parts.append(f"val loss {m['val_loss']:.4f} (ppl {m['val_ppl']:.2f})")
    if "exact_match" in m:
        parts.append(f"exact match {100 * m['exact_match']:.1f}% of {int(m['num_generated'])}")
    return ", ".join(parts) or "no validation data"


def validation_keys(data: DataConfig) -> list[str]:
    """The keys that give an evaluation of `data`, which holds no validation rows, rows to score: a validation file
    (for the built-in task, its generated examples), with data.max_val_examples where that is 0."""
    builtin = data.source == "builtin" and not data.sources
    rows = f"data.builtin_val_examples={DataConfig.builtin_val_examples}" if builtin else "data.val_source=FILE"
    named = data.builtin_val_examples > 0 if builtin else bool(data.val_source or data.val_split or data.val_fraction)
    keys = [] if named else [rows]
    if data.max_val_examples == 0:
        keys.append(f"data.max_val_examples={DataConfig.max_val_examples}")
    return keys or [rows]  # validation data named but empty: other data


def run(cfg: RunConfig) -> dict:
    """recipe=eval: evaluate a base model, adapter, checkpoint or merged model; write metrics and predictions."""
    device = choose_device(cfg.trainer.accelerator)
    src = locate(cfg.eval.checkpoint, cfg)
    src.refuse_ignored(override_keys())
    out = Path(cfg.eval.output_dir or cfg.output_dir)
    if cfg.eval.output_dir:  # checked before the evaluation, not after it (Hydra's own directory is checked as it starts)
        if problem := output_path_problem(out, f"eval.output_dir={out}", directory=True):
            raise ConfigError(problem)
        if found := RunDir(out).training_run():
            raise ConfigError(f"eval.output_dir={out} holds a training run ({', '.join(found[:3])}); the evaluation's "
                              "metrics.json and predictions.jsonl would replace the run's.\nFix: choose another "
                              "directory, or leave eval.output_dir unset (the evaluation's own run directory).")
    given = key_origins("data")
    data_cfg = eval_data_config(src.run, cfg, given)  # before the model loads: a refused key fails at once
    model, tokenizer = load_source(src, device)
    ensure_chat_template(tokenizer, data_cfg.chat_template)
    # The run's seed chose its held-out rows; trainer.seed on the command line picks others.
    seed = src.run.trainer.seed if src.run is not None and "trainer.seed" not in override_keys() else cfg.trainer.seed
    log.info("eval data: %s", describe_data(data_cfg, given if src.run is not None else None))
    dm = BambaDataModule(data_cfg, tokenizer, seed=seed)
    dm.prepare(train=False)  # the training split is not tokenized: only its held-out rows are read
    if src.run_dir is not None:
        check_hold_out(src.run_dir, dm.hold_out_rows)
    log.info("evaluating %s", src.description)
    metrics, rows = evaluate_model(model, tokenizer, dm, cfg.eval, device)
    metrics["lm_eval"] = run_lm_eval(model, tokenizer, cfg.eval, device)
    result = {"source": src.description, "metrics": metrics}
    run_dir = Path(cfg.eval.checkpoint) if cfg.eval.checkpoint and Path(cfg.eval.checkpoint).is_dir() else None
    curves = write_results(out, result, rows, run_dir)
    lines = [f"evaluated {src.description}", f"  {format_metrics(metrics)}"]
    if dm.val_set is None:  # e.g. a run trained without validation data (data.val_fraction=0)
        keys = validation_keys(data_cfg)
        whole = ["data=file", "data.source=FILE", *(k for k in keys if k.startswith("data.max_val_examples="))]
        lines.append(f"  Fix: add {' '.join(keys)} to the command, or {' '.join(whole)} to score all of a file")
    lines.append(f"  metrics: {out / 'metrics.json'}")
    if rows:
        lines.append(f"  predictions: {out / 'predictions.jsonl'}")
    if curves:
        lines.append(f"  training curves: {out / 'curves.png'}")
    print("\n".join(lines))
    if failed := metrics["lm_eval"].get("failed"):  # asked for by name: a run without them is no success
        raise ModelError(f"eval.lm_eval_tasks={list(cfg.eval.lm_eval_tasks)}: lm-eval could not run them ({failed}); "
                         f"the other metrics are in {out / 'metrics.json'}.\nFix: check the task names "
                         "(lm_eval --tasks list) and that their data is available (offline: in the datasets cache).")
    return result


def check_hold_out(run_dir: Path, now: dict[str, int]) -> None:
    """Refuse to score a run on rows held out of a source whose row count changed since it trained: the seeded
    permutation that picks them is another, so they would be partly rows the run trained on."""
    metrics = RunDir(run_dir).metrics
    try:
        then = json.loads(metrics.read_text()).get("data", {}).get("hold_out_rows", {}) if metrics.exists() else {}
    except (OSError, ValueError):
        return
    changed = [f"{where}: {then[where]:,} rows when the run trained, {n:,} now" for where, n in now.items()
               if where in then and then[where] != n]
    if changed:
        raise ConfigError(f"the run {run_dir} held its validation rows out of its training data, which has changed "
                          f"since ({'; '.join(changed)}): the rows held out now would partly be rows it trained on, "
                          "so its scores would flatter it.\nFix: evaluate on data it did not train on "
                          "(data.val_source=FILE), or on the data as it was.")


# Where a run's data comes from. A new data.source or data.sources on the command line takes all of these from the
# command line (their defaults where not given), so the run's own validation file or split is not scored in its place.
SOURCE_KEYS = ("source", "config", "field", "sources", "split", "format", "val_source", "val_split", "val_field")


def eval_data_config(run: RunConfig | None, cfg: RunConfig, given: Collection[str]) -> DataConfig:
    """The data to evaluate on: a run's own data config, so that a run is scored on the data it held out, with
    each data key the command line sets (`given`, dotted; `key_origins` says what set each) on top; without a run,
    the command line's.

    A key that the result would not read is a ConfigError naming it and the fix, never a silent drop.
    """
    if run is None:
        data = _score_all_of_a_new_source(cfg.data, None, given)
        _check_eval_data(data, cfg, sorted(given), "the command line's data config")
        return data
    keys = {k.removeprefix("data.") for k in given}
    if {"source", "sources"} & {k.split(".")[0] for k in keys}:
        keys |= set(SOURCE_KEYS)
    merged, ours = OmegaConf.structured(run.data), OmegaConf.structured(cfg.data)
    for key in sorted(keys):
        OmegaConf.update(merged, key, OmegaConf.select(ours, key), merge=False)
    data: DataConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    data = _score_all_of_a_new_source(data, run.data, given)
    where = "the run's data config with " + (" and ".join(
        f"{', '.join(names)} {origin}" for origin, names in _by_origin(given).items())
        or "no data keys from the command line")
    _check_eval_data(data, cfg, sorted(given), where)
    return data


HOLD_OUT_KEYS = ("val_source", "val_split", "val_fraction")


def _score_all_of_a_new_source(data: DataConfig, trained: DataConfig | None, given: set[str]) -> DataConfig:
    """A file given as data.source that the model did not train on is scored whole: none of it was trained on, so
    holding out data.val_fraction of it (what a training run does) would score 5% of the user's test set. The
    run's own training file keeps its hold-out, as does a source named with any of HOLD_OUT_KEYS."""
    keys = {k.removeprefix("data.").split(".")[0] for k in given}
    if "source" not in keys or set(HOLD_OUT_KEYS) & keys or data.sources or data.source == "builtin" or data.config:
        return data
    if trained is not None and not trained.sources and (trained.split, trained.config, trained.field) \
            == (data.split, data.config, data.field) and same_source(trained.source, data.source):
        return data
    log.info("data.source=%s: not what the model trained on, so all of it is scored (data.val_source=%s%s%s); "
             "data.val_fraction=F scores a held-out fraction instead", data.source, data.source,
             f", data.val_split={data.split}" if data.split else "",
             f", data.val_field={data.field}" if data.field else "")
    return dataclasses.replace(data, val_source=data.source, val_split=data.split, val_field=data.field)


def _check_eval_data(data: DataConfig, cfg: RunConfig, given: list[str], where: str) -> None:
    """Refuse command-line data keys that `data` would not read, and a merged config that fails the checks a
    training run's data passes (the run's values and the user's can clash, e.g. lengths)."""
    if data.source == "builtin" and not data.sources:
        ignored = [k for k in given if k.removeprefix("data.").split(".")[0] in NOT_BUILTIN]
        if ignored:
            raise ConfigError([
                f"{key}: the data is the builtin task (data.source=builtin), whose validation set is generated, "
                f"so {key} would be ignored.\nFix: also name the data it belongs to, e.g. "
                f"data=file data.source=path/to/train.jsonl {key}=...; or, for the builtin task, set "
                "data.builtin_val_examples=N or data.max_val_examples=N." for key in ignored], where)
    try:
        validate(dataclasses.replace(cfg, data=data))
    except ConfigError as e:
        raise ConfigError(e.problems, where) from None


def _by_origin(given: Collection[str]) -> dict[str, list[str]]:
    """The keys of `given` by what set them ('from the command line', 'set by smoke=fast': `key_origins`; a plain
    collection's were all typed), typed ones first: a group option such as smoke=fast sets keys no one typed."""
    origins = given if isinstance(given, Mapping) else dict.fromkeys(given, COMMAND_LINE)
    by: dict[str, list[str]] = {f"from {COMMAND_LINE}": []}
    for key in sorted(origins):
        origin = origins[key]
        by.setdefault(f"from {origin}" if origin == COMMAND_LINE else f"set by {origin}", []).append(key)
    return {origin: names for origin, names in by.items() if names}


def describe_data(data: DataConfig, given: Collection[str] | None) -> str:
    """Which data an evaluation reads, and whose config it is, for the log: overrides must be seen to apply, and
    the keys an option named on the command line set (smoke=fast) told from those typed."""
    if data.sources:
        what = "data.sources=[" + ", ".join(s.source for s in data.sources) + "]"
    else:
        what = f"data.source={data.source}"
    for key in ("field", "val_source", "val_split", "val_field"):
        if getattr(data, key):
            what += f", data.{key}={getattr(data, key)}"
    what += f", data.max_val_examples={data.max_val_examples}"
    if given is None:
        return f"{what} (the command line's data config)"
    if not given:
        return f"{what} (the run's data config)"
    origins = "; ".join(f"{origin}: {', '.join(names)}" for origin, names in _by_origin(given).items())
    return f"{what} (the run's data config; {origins})"


def write_results(out: Path, result: dict, rows: list[dict], run_dir: Path | None) -> bool:
    """Write predictions.jsonl, curves.png (when `run_dir` has a CSV log) and metrics.json, each atomically.

    metrics.json goes last and a previous one is removed first, so its presence means the set is complete and
    from one evaluation, even after a kill midway. Returns whether curves.png was written.
    """
    out.mkdir(parents=True, exist_ok=True)
    fault_point("eval.before_write")
    written = RunDir(out)
    written.metrics.unlink(missing_ok=True)
    if rows:
        publish_file(written.predictions, "".join(json.dumps(r) + "\n" for r in rows))
    else:  # no generation: an earlier evaluation's predictions would look like this one's
        written.predictions.unlink(missing_ok=True)
    curves = run_dir is not None and plot_curves(run_dir, written.curves)
    fault_point("eval.before_metrics")
    publish_file(written.metrics, json.dumps(result, indent=2, default=str) + "\n")
    return curves


def run_lm_eval(model: nn.Module, tokenizer: PreTrainedTokenizerBase, cfg: EvalConfig, device: torch.device) -> dict:
    """EleutherAI lm-evaluation-harness tasks, when the package is installed and the tasks load offline."""
    if not cfg.lm_eval_tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        log.warning("eval.lm_eval_tasks set but lm-eval is not installed (pip install lm-eval); skipped.")
        return {"skipped": "lm-eval not installed"}
    try:
        lm = HFLM(pretrained=causal_lm(model), tokenizer=tokenizer, device=str(device), batch_size=cfg.batch_size)
        results = lm_eval.simple_evaluate(model=lm, tasks=list(cfg.lm_eval_tasks))
    except Exception as e:  # task data missing offline, unknown task names, ...
        return {"failed": f"{type(e).__name__}: {e}"}
    return results.get("results", {}) if results else {}
