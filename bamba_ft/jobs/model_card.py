"""The model card (README.md) of an export: base model, data, recipe config, metrics, library versions."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from bamba_ft.config.schema import RunConfig
from bamba_ft.model.families import Family
from bamba_ft.model.lora import expand_family_targets
from bamba_ft.rundir import RunDir

_LIBRARIES = ("bamba_ft", "torch", "transformers", "peft", "torchao", "lightning", "datasets", "mamba-ssm", "causal-conv1d")


def library_versions() -> dict[str, str]:
    out = {}
    for name in _LIBRARIES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _sources_text(d: Any) -> str:
    """The run's training data as the card states it: each of `data.sources` (with its weight) or `data.source`."""
    if not d.sources:
        return f"`{d.source}`" + ("" if d.format == "auto" else f" (format {d.format})")
    parts = []
    for s in d.sources:
        fmt = s.format if s.format not in (None, "auto") else d.format
        extra = [f"weight {s.weight:g}"] if s.weight is not None else []
        extra += [] if fmt == "auto" else [f"format {fmt}"]
        parts.append(f"`{s.source}`" + (f" ({', '.join(extra)})" if extra else ""))
    return ", ".join(parts)


def write_model_card(directory: Path, cfg: RunConfig, src: Any, report: dict, adapter_only: bool,
                     family: Family) -> None:
    model_type = family.model_type
    run = src.run
    base = run.model.name_or_path if run is not None else src.model.name_or_path
    random = src.model.init == "random" or (run is not None and run.model.init == "random")
    if random:
        shape = (run.model if run is not None else src.model).shape
        base_text = f"a {shape or model_type} model drawn at random (model.init=random; only bamba_ft draws it again)"
    elif base.startswith("builtin:"):
        base_text = f"`{base}`, the small base shipped with bamba_ft"
    else:
        base_text = f"`{base}`"
    hub_base = None if random or base.startswith("builtin:") else base  # a base others can download
    metrics_file = RunDir(run.output_dir).metrics if run is not None else None
    metrics = json.loads(metrics_file.read_text()) if metrics_file is not None and metrics_file.exists() else {}
    tags = [model_type, "mamba2", "bamba_ft"] + (["lora", "peft"] if adapter_only or (run and run.peft.method == "lora") else [])
    front = {"library_name": "peft" if adapter_only else "transformers", **({"base_model": hub_base} if hub_base else {}),
             "tags": tags}
    lines = ["---", OmegaConf.to_yaml(OmegaConf.create(front)).strip(), "---", ""]
    title = "LoRA adapter" if adapter_only else f"{family.name} model"
    lines += [f"# {title} fine-tuned with bamba_ft", ""]
    lines += [f"- Base model: {base_text}", f"- Exported from: {src.description}"]
    if not adapter_only:
        lines.append(f"- Weights: merged, `{report.get('dtype')}`")
    if run is not None:
        d = run.data
        lines += [
            f"- Method: {'LoRA' if run.peft.method == 'lora' else 'full fine-tuning'}"
            + (f" (r={run.peft.r}, alpha={run.peft.lora_alpha}, targets "
               f"{', '.join(expand_family_targets(model_type, list(run.peft.target_modules)))})"
               if run.peft.method == "lora" else "")
            + (f" on a {run.quant.method}-quantized base" if run.quant.method != "none" else ""),
            f"- Data: {_sources_text(d)} (max {d.max_seq_len} tokens, {'packed' if d.packing else 'padded'} batches, "
            f"loss on {d.train_on} tokens)",
        ]
    if metrics:
        lines += ["", "## Metrics", "", "| metric | before | after |", "|---|---|---|"]
        before, after = metrics.get("before", {}), metrics.get("after", {})
        for key in ("val_loss", "val_ppl", "exact_match"):
            if key in after:
                b = before.get(key)
                lines.append(f"| {key} | {'-' if b is None else f'{b:.4f}'} | {after[key]:.4f} |")
    if "verify" in report:
        v = report["verify"]
        lines += ["", "## Export check", "",
                  f"Reloaded with `transformers` ({v['reloaded_class']}) in a fresh process: max |logit difference| to the "
                  f"adapter model {v['max_abs_logit_diff']:.2e} ({v['max_rel_logit_diff']:.1e} of the largest logit, bound "
                  f"{v['tolerance']:g}); greedy generation identical: "
                  f"{v['greedy_generation_identical']}."]
    lines += ["", "## Usage", ""]
    refused = report.get("peft_refused_targets", [])
    if refused:  # PeftModel.from_pretrained raises on them: bamba_ft loads the adapter, or merges it
        lines += [f"peft refuses LoRA on `{'`, `'.join(refused)}` of {model_type} models (`PeftModel.from_pretrained` "
                  "raises), as transformers' fused CUDA mixer reads that weight directly and would skip the adapter. "
                  "Run it with bamba_ft, or merge it for transformers:", ""]
    if adapter_only and (hub_base is None or refused):  # its base is in no model repository, or peft refuses it
        lines += ["```bash", "python -m bamba_ft recipe=eval eval.checkpoint=<this directory>",
                  "python -m bamba_ft recipe=export export.checkpoint=<this directory>   # merged, for transformers"]
    elif adapter_only:
        lines += ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  f"base = AutoModelForCausalLM.from_pretrained(\"{base}\")", "model = PeftModel.from_pretrained(base, \"<this directory>\")"]
    else:
        lines += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
                  "model = AutoModelForCausalLM.from_pretrained(\"<this directory>\")",
                  "tokenizer = AutoTokenizer.from_pretrained(\"<this directory>\")"]
    lines += ["```", ""]
    if run is not None:
        lines += ["## Training config", "", "```yaml", OmegaConf.to_yaml(OmegaConf.structured(run)).strip(), "```", ""]
    lines += ["## Library versions", ""] + [f"- {k} {v}" for k, v in library_versions().items()] + [""]
    (directory / "README.md").write_text("\n".join(lines))
