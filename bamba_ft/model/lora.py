"""peft LoRA on Bamba: target names checked against the model, and a probe that every adapter trains."""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from bamba_ft.config.schema import PeftConfig
from bamba_ft.errors import ConfigError, ModelError, suggest
from bamba_ft.model.families import family_for, has_attention_layers
from bamba_ft.rundir import RunDir

log = logging.getLogger(__name__)


def linear_names(model: nn.Module) -> list[str]:
    """Leaf names of the Linear layers (in_proj, q_proj, ...), in model order, without duplicates."""
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            names[name.rsplit(".", 1)[-1]] = None
    return list(names)


def own_mixers(model: nn.Module) -> bool:
    """Whether every Mamba-2 mixer of `model` runs bamba_ft's segment-aware forward (not `model.mixer=hf`)."""
    from bamba_ft.ops.mamba2 import SegmentAwareMixer

    mixers = [m for m in model.modules() if hasattr(m, "A_log") and hasattr(m, "out_proj")]
    return bool(mixers) and all(isinstance(m, SegmentAwareMixer) for m in mixers)


@contextmanager
def allow_mixer_out_proj(model: nn.Module) -> Iterator[None]:
    """Let peft put LoRA on the Mamba-2 `out_proj` of falcon_h1 and nemotron_h models when bamba_ft's mixer runs.

    peft refuses it for those model types because transformers' fused CUDA mixer reads `out_proj.weight` directly,
    bypassing the adapter (the same holds for Bamba, which peft does not list). bamba_ft's segment-aware mixer calls
    `out_proj` as a module, and the gradient probe before training checks every adapter. With transformers' own
    mixer (`model.mixer=hf`) peft's check stays.
    """
    from peft.tuners import tuners_utils

    if not own_mixers(model):
        yield
        return
    check = tuners_utils._check_lora_target_modules_mamba
    tuners_utils._check_lora_target_modules_mamba = lambda *args, **kwargs: None
    try:
        yield
    finally:
        tuners_utils._check_lora_target_modules_mamba = check


def peft_refused_targets(model_type: str, targets: list[str]) -> list[str]:
    """The `targets` that plain peft refuses to put LoRA on, or to load LoRA from, for `model_type` (its Mamba
    check: `out_proj` of falcon_h1 and nemotron_h): an adapter holding them loads only where that check is lifted,
    as bamba_ft does."""
    from types import SimpleNamespace

    from peft.tuners import tuners_utils

    model = SimpleNamespace(config=SimpleNamespace(model_type=model_type))
    refused = []
    for name in targets:
        try:
            tuners_utils._check_lora_target_modules_mamba(LoraConfig(), model, name)
        except ValueError:
            refused.append(name)
    return refused


@contextmanager
def adapters_off_meta(model: nn.Module) -> Iterator[None]:
    """On a base whose parameters are on the meta device (built to be sharded), keep new adapters on the CPU.

    peft moves each new adapter to its base layer's device (in `_replace_module` and in
    `_move_adapter_to_device_of_base_layer`); onto meta that would discard the initial values it has just drawn,
    which must be those a one-process run draws from the same seed. Here a module's move to meta leaves it where
    it is; a dtype cast in the same call still applies.
    """
    if not any(p.is_meta for p in model.parameters()):
        yield
        return
    to = nn.Module.to

    def to_unless_meta(self: nn.Module, *args, **kwargs) -> nn.Module:  # noqa: ANN002, ANN003
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is None or device.type != "meta":
            return to(self, *args, **kwargs)
        return to(self, dtype=dtype) if dtype is not None else self

    nn.Module.to = to_unless_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.to = to  # type: ignore[method-assign]


ATTENTION_PROJ = {"q_proj", "k_proj", "v_proj", "o_proj"}  # every family's attention projections (peft=lora's)

MLP = "mlp"  # in peft.target_modules: the feed-forward's Linear layers of the model's family, by their names there


def expand_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """`targets` with MLP replaced by the family's MLP layer names (Bamba gate/up/down_proj, Granite 4.0-H
    input/output_linear, Nemotron-H up/down_proj), so one preset (peft=lora_all) fits every family."""
    return expand_family_targets(getattr(getattr(model, "config", None), "model_type", "bamba"), targets)


def expand_family_targets(model_type: str, targets: list[str]) -> list[str]:
    """`expand_targets` for a family named by its `model_type` (a model card knows the family, not the model)."""
    if MLP not in targets:
        return list(targets)
    mlp = list(family_for(model_type).mlp_targets)
    return list(dict.fromkeys(t for name in targets for t in (mlp if name == MLP else [name])))


@contextmanager
def _no_requantize_warning() -> Iterator[None]:
    """int8 bases: peft warns that it cannot re-quantize after merging; bamba_ft merges into dequantized weights."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*get_apply_tensor_subclass.*")
        yield


def load_adapter(model: nn.Module, adapter_dir: str, trainable: bool = False) -> nn.Module:
    """A saved peft adapter attached to `model` (its base, quantized as it trained), as `apply_peft` attaches one."""
    from peft import PeftModel

    with _no_requantize_warning(), allow_mixer_out_proj(model):
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def apply_peft(model: nn.Module, cfg: PeftConfig, fused: bool = True) -> nn.Module:
    """LoRA adapters on `cfg.target_modules` (base frozen), or the model unchanged for full fine-tuning.

    `fused=False` keeps peft's own forward (the benchmark's stock-stack baseline).
    """
    if cfg.method == "none":
        for p in model.parameters():
            if p.is_floating_point() and type(p.data) is torch.Tensor:
                p.requires_grad_(True)
        return model
    targets = expand_targets(model, cfg.target_modules)
    valid = linear_names(model)
    bad = [t for t in targets if t not in valid]
    if bad and set(bad) <= ATTENTION_PROJ and not has_attention_layers(model):
        kept = [t for t in cfg.target_modules if t not in bad]  # as typed: `mlp` stays `mlp`
        raise ConfigError(
            f"peft.target_modules: {', '.join(bad)}: {type(model).__name__} has no attention layers (every layer a "
            "Mamba-2 layer), so the attention projections match no module.\n"
            f"Fix: peft.target_modules=[{','.join(kept)}]"
        )
    if bad:
        raise ConfigError(
            [
                f"peft.target_modules: '{t}' matches no module of {type(model).__name__}.{suggest(t, valid)}\n"
                f"Valid: {', '.join(valid)}"
                for t in bad
            ]
        )
    model_type = getattr(getattr(model, "config", None), "model_type", "bamba")
    if refused := [] if own_mixers(model) else peft_refused_targets(model_type, targets):
        kept = [t for t in targets if t not in refused]
        raise ConfigError(
            f"peft.target_modules: peft refuses LoRA on {', '.join(refused)} of {model_type} models with transformers' "
            "own Mamba-2 mixer (model.mixer=hf; the benchmark's hf_* variants), whose fused CUDA path reads that "
            "weight directly, so the adapter would get no gradient.\nFix: model.mixer=auto (bamba_ft's mixer calls "
            f"it as a module), or leave it out: peft.target_modules=[{','.join(kept)}]"
        )
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        use_rslora=cfg.use_rslora,
        use_dora=cfg.use_dora,
        modules_to_save=list(cfg.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with _no_requantize_warning(), allow_mixer_out_proj(model), adapters_off_meta(model):
        peft_model = get_peft_model(model, lora)
    if fused:
        fuse_lora_forward(peft_model)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d on %s: %.2fM trainable of %.1fM parameters", cfg.r, ",".join(targets), trainable / 1e6, total / 1e6)
    return peft_model


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + s (x A^T) B^T for a frozen, plain weight W: both GEMMs of the input gradient in one.

    Autograd would compute dx = dy W and dx' = (s dy B) A separately and add them, one more pass over the
    layer's input per adapter; here the second GEMM accumulates into the first (`addmm_`). All tensors come in
    the compute dtype; `bias` (W's) may be None.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, weight_a, weight_b, scaling):  # noqa: ANN001, ANN205
        flat = x.reshape(-1, x.shape[-1])
        a = flat @ weight_a.t()
        out = torch.addmm(bias, flat, weight.t()) if bias is not None else flat @ weight.t()
        out.addmm_(a, weight_b.t(), alpha=scaling)
        ctx.save_for_backward(flat, weight, weight_a, weight_b, a)
        ctx.scaling, ctx.x_shape, ctx.has_bias = scaling, x.shape, bias is not None
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, dy):  # noqa: ANN001, ANN205
        flat, weight, weight_a, weight_b, a = ctx.saved_tensors
        dy = dy.reshape(-1, dy.shape[-1])
        da = (dy @ weight_b).mul_(ctx.scaling)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dy @ weight).addmm_(da, weight_a).view(ctx.x_shape)
        dbias = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        dweight_b = (dy.t() @ a).mul_(ctx.scaling)
        return dx, None, dbias, da.t() @ flat, dweight_b, None


class _FusedLoraForward:
    """peft's LoRA Linear with the adapter folded into the base layer's GEMMs.

    peft computes `base(x) + B(A(dropout(x))) * scaling`, which writes the full-width adapter output, scales it
    and adds it: three passes over the layer's output in forward and more in backward. It also casts `x` to the
    adapters' float32 under autocast, copying every adapted layer's input twice, although autocast multiplies
    in bfloat16 anyway. Here, in the autocast dtype:
    - a plain frozen `nn.Linear` base without dropout runs `_LoraLinear`: the adapter accumulates into the base
      output in the GEMM epilogue (forward) and into the base's input gradient (backward);
    - any other base (quantized, sharded as a tensor subclass, trainable) or adapter dropout: `addmm(base(x),
      A(dropout(x)), B^T, alpha=scaling)`, the forward fused and autograd's backward.
    Anything else (merged or disabled adapters, several active adapters, DoRA and other variants, per-call
    adapter names, an adapter bias) runs peft's own forward.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        name = self._single_plain_adapter() if not args and not kwargs else None
        if name is None:
            return super().forward(x, *args, **kwargs)
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        autocast = torch.is_autocast_enabled(x.device.type)
        if self._plain_base(name):
            base = self.base_layer
            dtype = torch.get_autocast_dtype(x.device.type) if autocast else base.weight.dtype
            bias = base.bias.to(dtype) if base.bias is not None else None
            return _LoraLinear.apply(x.to(dtype), base.weight.to(dtype), bias, lora_a.weight.to(dtype),
                                     lora_b.weight.to(dtype), self.scaling[name])
        result = self.base_layer(x)
        if not autocast and x.dtype != lora_a.weight.dtype:
            x = x.to(lora_a.weight.dtype)
        a = lora_a(self.lora_dropout[name](x))
        weight_b = lora_b.weight
        if not autocast:
            a, weight_b = a.to(result.dtype), weight_b.to(result.dtype)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), a.reshape(-1, a.shape[-1]), weight_b.t(),
                          alpha=self.scaling[name])
        return out.view(result.shape)

    def _plain_base(self, name: str) -> bool:
        """A frozen nn.Linear with plain tensors (not quantized or sharded) and no adapter dropout."""
        base = self.base_layer
        if type(base) is not nn.Linear or not isinstance(self.lora_dropout[name], nn.Identity):
            return False
        return all(t is None or (type(t.data) is torch.Tensor and not t.requires_grad) for t in (base.weight, base.bias))

    def _single_plain_adapter(self) -> str | None:
        if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
            return None
        name = self.active_adapters[0]
        if name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None:
            return None
        return name


@functools.cache
def _fused_class(cls: type) -> type:
    return type(cls.__name__, (_FusedLoraForward, cls), {"__module__": cls.__module__})


def fuse_lora_forward(model: nn.Module) -> int:
    """Give every peft LoRA Linear of `model` the fused forward (per instance); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and not isinstance(module, _FusedLoraForward):
            module.__class__ = _fused_class(type(module))
            count += 1
    return count


def adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def check_adapter_gradients(model: nn.Module, batch: dict, loss_fn) -> dict[str, float]:  # noqa: ANN001
    """One forward/backward on `batch`: every trainable tensor must get a finite, non-zero gradient.

    With peft's default init (lora_B = 0) the lora_A gradients are exactly zero, which would hide a bypassed
    module; lora_B is set to small random values for the probe and restored afterwards.
    Returns {name: grad norm}; raises ModelError naming the modules whose adapters get no gradient.
    """
    params = adapter_parameters(model)
    saved = {n: p.detach().clone() for n, p in params.items() if "lora_B" in n}
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for n in saved:
                _local(params[n]).normal_(0.0, 0.02)
        for p in params.values():
            p.grad = None
        loss_fn(model, batch).backward()
        norms = {n: _norm(p.grad) for n, p in params.items()}  # a non-finite entry makes the norm non-finite
    finally:
        with torch.no_grad():
            for n, value in saved.items():
                params[n].copy_(value)
        for p in params.values():
            p.grad = None
        model.train(was_training)
    bypassed = sorted({_module_of(n) for n, v in norms.items() if v == 0.0 or not math.isfinite(v)})
    if bypassed:
        shown = "\n".join(bypassed[:20]) + (f"\n... and {len(bypassed) - 20} more" if len(bypassed) > 20 else "")
        raise ModelError(
            f"{len(bypassed)} adapted module(s) receive no (or a non-finite) gradient, so their adapters would not "
            f"train:\n{shown}\nThe forward path bypasses these modules (e.g. a fused kernel that reads their weight "
            "directly). Fix: use bamba_ft's mixer (model.mixer=auto) or drop them from peft.target_modules."
        )
    return norms


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded (DTensor) tensor; a plain tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _norm(grad: torch.Tensor | None) -> float:
    """The norm of a gradient over all its shards (0 when there is none)."""
    if grad is None:
        return 0.0
    norm = grad.norm()
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _module_of(param_name: str) -> str:
    for marker in (".lora_A", ".lora_B", ".lora_magnitude_vector"):
        if marker in param_name:
            return param_name.split(marker)[0].removeprefix("base_model.model.")
    return param_name


def adapter_dir_of(path: str) -> Path:
    """The adapter directory `path` names: itself, or a run directory's adapter/ (peft.init_from)."""
    given = Path(path).expanduser()
    for candidate in (given, RunDir(given).adapter):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise ConfigError(f"peft.init_from={path}: no adapter there (adapter_config.json in it or in its adapter/).\n"
                      "Fix: name a training run's directory, its adapter/, or an adapter-only export "
                      "(recipe=export export.adapter_only=true).")


def init_adapters_from(model: nn.Module, cfg: PeftConfig, base: str) -> Path:
    """Load a trained adapter's weights into `model`'s fresh adapters (peft.init_from); its LoRA settings must be
    `cfg`'s, and every adapter tensor of the model must come from it. `base`: the model's base, compared with the
    adapter's (a warning: a local copy of the base is named otherwise)."""
    import json

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    directory = adapter_dir_of(str(cfg.init_from))
    saved = json.loads((directory / "adapter_config.json").read_text())
    mine = {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "use_rslora": cfg.use_rslora, "use_dora": cfg.use_dora,
            "target_modules": sorted(expand_targets(model, cfg.target_modules))}
    theirs = {k: saved.get(k) for k in mine}
    theirs["target_modules"] = sorted(theirs["target_modules"] or [])
    differ = [f"peft.{k}: the adapter has {theirs[k]!r}, this run {mine[k]!r}" for k in mine
              if theirs[k] != mine[k] and not (k == "lora_alpha" and float(theirs[k] or 0) == float(mine[k]))]
    if differ:
        raise ConfigError([f"peft.init_from={cfg.init_from}: {d}.\nFix: set it to the adapter's value." for d in differ])
    if saved.get("base_model_name_or_path") not in (None, base):
        log.warning("peft.init_from=%s: the adapter was trained on %s, and this run's base is %s (fine for a local "
                    "copy of that base; anything else starts from weights that fit another model).",
                    cfg.init_from, saved.get("base_model_name_or_path"), base)
    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise ConfigError(f"peft.init_from={cfg.init_from}: {weights} is missing.\nFix: name a complete adapter.")
    state = load_file(str(weights))
    result = set_peft_model_state_dict(model, state)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    loaded = set(state)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in trainable if n.replace(".default", "") not in loaded]
    if unexpected or missing:
        what = f"{len(missing)} of this run's adapter tensors are not in it (first: {missing[0]})" if missing else (
            f"{len(unexpected)} of its tensors fit no adapter of this model (first: {unexpected[0]})")
        raise ConfigError(f"peft.init_from={cfg.init_from}: {what}.\nFix: start from an adapter of the same "
                          "model and targets.")
    log.info("adapters start from %s (%d tensors)", directory, len(state))
    return directory
