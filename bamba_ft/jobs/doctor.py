"""`task=doctor`: what this machine can run, and two checks on the configured model before a long job.

1. every LoRA adapter receives gradient (a fused kernel that bypasses a module would show here);
2. a packed row gives each sequence what it gets alone (the mixer and attention keep sequences apart).
"""

from __future__ import annotations

import importlib.util
import platform

import torch

from bamba_ft.config.schema import RunConfig
from bamba_ft.data.packing import collate_packed, collate_padded
from bamba_ft.errors import BambaFTError
from bamba_ft.jobs.model_card import library_versions
from bamba_ft.jobs.runtime import autocast_for, choose_device, to_device
from bamba_ft.model.build import build_model
from bamba_ft.model.lora import apply_peft, check_adapter_gradients, own_mixers
from bamba_ft.model.objective import mean_loss
from bamba_ft.ops.attention import flash_attn_installed, varlen_available
from bamba_ft.ops.kernels import available_backend
from bamba_ft.ops.loss import causal_lm

LENGTHS = [37, 1, 64, 5]


def environment() -> list[str]:
    lines = [f"python {platform.python_version()} on {platform.machine()}"]
    lines += [f"{k} {v}" for k, v in library_versions().items()]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
        lines.append(f"mixer backend on CUDA: {available_backend('cuda')}")
    else:
        lines.append("no CUDA device: mixer backend torch (exact, CPU speed)")
    lines.append(f"causal-conv1d: {'installed' if importlib.util.find_spec('causal_conv1d') else 'not installed'}")
    lines.append(f"flash-attn: {'installed' if flash_attn_installed() else 'not installed'}; "
                 "attention over packed rows (varlen): " + (
                     "torch's flash-attention varlen kernel" if varlen_available() else
                     "each sequence attended on its own, in torch (torch's varlen kernel needs CUDA)"))
    return lines


def packed_vs_alone(model: torch.nn.Module, device: torch.device, vocab: int) -> float:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS]
    batch = to_device(collate_packed([{"input_ids": s, "labels": s} for s in seqs]), device)
    batch.pop("labels")
    lm = causal_lm(model)
    with torch.no_grad(), autocast_for(lm, device):
        packed = lm(**batch, use_cache=False).logits[0].float()
        alone = torch.cat([lm(input_ids=torch.tensor([s], device=device), use_cache=False).logits[0].float()
                           for s in seqs])
    return float((packed - alone).norm() / alone.norm())


def run(cfg: RunConfig) -> dict:
    print("\n".join(environment()))
    device = choose_device(cfg.trainer.accelerator)
    model = apply_peft(build_model(cfg.model, cfg.quant, device), cfg.peft)
    vocab = causal_lm(model).config.vocab_size
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "labels": ids} for ids in
            (torch.randint(3, vocab, (n,), generator=g).tolist() for n in LENGTHS)]
    # transformers' own mixer (model.mixer=hf) refuses packed rows on some devices and leaks state across them on
    # others; training refuses packing there, so its adapters are checked on padded rows, as they would train
    packable = own_mixers(model)
    probe = to_device(collate_packed(rows) if packable else collate_padded(rows, pad_id=0), device)
    with autocast_for(causal_lm(model), device):
        norms = check_adapter_gradients(model, probe, mean_loss) if cfg.peft.method == "lora" else {}
    print(f"gradient check: {len(norms)} adapter tensors, all receive gradient" if norms else "gradient check: no adapters")
    if not packable:
        print(f"packing check: not run: model.mixer={cfg.model.mixer} (transformers' own mixer) does not keep packed "
              "sequences apart, so training refuses data.packing=true with it. Train with data.packing=false, or "
              "use model.mixer=auto (bamba_ft's exact mixer).")
        print("doctor: ok")
        return {"adapter_tensors": len(norms), "packing_rel_diff": None}
    err = packed_vs_alone(model, device, vocab)
    bound = 1e-4 if next(causal_lm(model).parameters()).dtype == torch.float32 else 3e-2
    print(f"packing check: packed row vs sequences alone, relative logit difference {err:.2e} (bound {bound:g})")
    if err > bound:
        raise BambaFTError(f"packed sequences influence each other (relative difference {err:.2e} > {bound:g}); "
                           "do not train with data.packing=true on this path.")
    print("doctor: ok")
    return {"adapter_tensors": len(norms), "packing_rel_diff": err}
