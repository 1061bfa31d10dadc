"""Builds the model (its family's ForCausalLM) and tokenizer from the model config: weights, dtype, attention, mixer."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from bamba_ft.config.schema import Mixer, ModelConfig, QuantConfig, looks_local, missing_path_problem
from bamba_ft.errors import ConfigError, ModelError
from bamba_ft.model.families import family_for
from bamba_ft.model.memory import apply_checkpointing
from bamba_ft.model.mixer import graphs_installed, install_mixer
from bamba_ft.model.quant import check_quant_device, quantize_layer, report_base_memory
from bamba_ft.model.shapes import SHAPES
from bamba_ft.ops.attention import VARLEN, choose_attention, register_varlen_attention

log = logging.getLogger(__name__)

BUILTIN = {"builtin:tiny": Path(__file__).resolve().parent.parent / "assets" / "tiny"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def first_use_note(backend: str, device: torch.device) -> str | None:
    """What the first steps on the kernels backend wait for, so a long first step is not taken for a hang."""
    if backend != Mixer.KERNELS or device.type != "cuda":
        return None
    return ("model: the first batches compile mamba-ssm's Triton kernels and time their configurations "
            "(74 s for one Bamba-9B conv+scan on an H100, the first time on a machine; 5 s in a later process, from "
            "Triton's cache on disk)")


def resolve_path(name_or_path: str) -> str:
    """builtin:NAME -> the shipped directory; anything else unchanged."""
    if name_or_path.startswith("builtin:"):
        if name_or_path not in BUILTIN:
            raise ModelError(f"model.name_or_path={name_or_path}: unknown builtin. Valid: {', '.join(BUILTIN)}")
        return str(BUILTIN[name_or_path])
    return name_or_path


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return DTYPES[name]


def _missing(what: str, path: str) -> str | None:
    """The problem of a `what` (model.name_or_path, model.tokenizer) path that looks local and does not exist."""
    return missing_path_problem(what, path, "tokenizer" if what == "model.tokenizer" else "model")


def check_local(what: str, path: str) -> None:
    """Refuse a path that looks local (schema.looks_local) and does not exist, before transformers takes it for a
    Hub id and spends about 30 s on retried requests. validate catches it in the config; this catches the paths
    read from elsewhere (an adapter's base_model_name_or_path, a run's saved config)."""
    if problem := _missing(what, path):
        raise ModelError(problem)


def _hub_error(what: str, path: str, e: Exception) -> ModelError:
    local = Path(path).expanduser()
    if local.is_dir():
        return ModelError(f"{what}={path}: the directory exists but is not a usable checkpoint ({e}).")
    if looks_local(path):
        return ModelError(_missing(what, path) or f"{what}={path}: not a directory ({e}).")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return ModelError(
        f"{what}={path}: not a local directory, and the Hugging Face Hub did not provide it ({first}).\n"
        "Fix: download it where the Hub is reachable (`hf download "
        f"{path} --local-dir DIR`) and pass {what}=DIR; for gated models log in first (`hf auth login`)."
    )


def shape_config(name: str) -> PretrainedConfig:
    """The config of a named shape (bamba_ft/model/shapes.py), in its family's config class."""
    if name not in SHAPES:
        raise ModelError(f"model.shape={name} is not a known shape. Valid: {', '.join(SHAPES)}")
    kwargs = dict(SHAPES[name])
    return family_for(kwargs.pop("model_type", "bamba"), where=f"model.shape={name}").config_class(**kwargs)


def load_config(cfg: ModelConfig) -> PretrainedConfig:
    path = resolve_path(cfg.name_or_path)
    if cfg.init == "random" and cfg.shape is not None:
        return shape_config(cfg.shape)
    check_local("model.name_or_path", path)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision)
    except Exception as e:  # OSError, ValueError, HF hub errors: all mean "cannot load this"
        raise _hub_error("model.name_or_path", path, e) from e
    try:
        family_for(config.model_type)
    except ConfigError as e:
        raise ModelError(
            f"model.name_or_path={cfg.name_or_path} is a '{config.model_type}' model "
            f"({', '.join(config.architectures or [])}), which bamba_ft does not fine-tune.\n{e.problems[0]}"
        ) from e
    return config


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if not cfg.tokenizer:
        load_config(cfg)  # the tokenizer comes from the checkpoint: refuse an unsupported one before anything else
    path = resolve_path(cfg.tokenizer or cfg.name_or_path)
    what = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    check_local(what, path)
    try:
        return AutoTokenizer.from_pretrained(path, revision=cfg.revision if not cfg.tokenizer else None)
    except Exception as e:
        raise _hub_error(what, path, e) from e


def init_layer(model: PreTrainedModel, layer: nn.Module, device: torch.device) -> None:
    """Give one decoder layer of a meta-device `model` fresh weights on `device`."""
    layer.to_empty(device=device)
    for m in layer.modules():
        model._init_weights(m)


def init_rest(model: PreTrainedModel, device: torch.device) -> None:
    """Fresh weights on `device` for everything of `model` outside its decoder layers (embeddings, norm, head).

    transformers' `_init_weights` also recomputes the non-persistent buffers a meta build leaves empty (rotary
    `inv_freq`; Falcon-H1's per-layer `mup_vector`, set from its decoder stack's module).
    """
    in_layers = {id(m) for m in model.model.layers.modules()}
    rest = [m for m in model.modules() if id(m) not in in_layers]
    for m in rest:
        m.to_empty(device=device, recurse=False)
    for m in reversed(rest):  # children before the modules that contain them (the decoder stack last)
        model._init_weights(m)
    if model.config.tie_word_embeddings:
        model.tie_weights()


_MOMENT_CHUNK = 1 << 24  # elements cast to float64 at a time: 128 MiB, not a copy of the largest weight (4 GiB)


def _moments(params: Iterator[nn.Parameter], total: torch.Tensor) -> None:
    """Add the float64 sum and sum of squares of `params` to `total` (on their device): a fingerprint that tells
    one random draw from another."""
    for p in params:
        for x in p.detach().reshape(-1).split(_MOMENT_CHUNK):
            x = x.double()
            total += torch.stack([x.sum(), x.dot(x)])


def _materialize_random(model: PreTrainedModel, device: torch.device, quant: QuantConfig,
                        fingerprint: bool = False) -> list[float] | None:
    """Fill a meta-device model with fresh weights one decoder layer at a time (quantizing each as it lands).
    `fingerprint`: return that of the weights drawn (before any quantization)."""
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for layer in model.model.layers:
        init_layer(model, layer, device)
        if fingerprint:
            _moments(layer.parameters(), total)
        quantize_layer(layer, quant)
    init_rest(model, device)
    if not fingerprint:
        return None
    in_layers = {id(p) for p in model.model.layers.parameters()}
    _moments((p for p in model.parameters() if id(p) not in in_layers), total)
    return total.tolist()


def same_draw(recorded: list[float], drawn: list[float]) -> bool:
    """Whether two random bases' fingerprints are one draw (to float64 summation noise; another draw differs in
    the sum by about the root of the sum of squares)."""
    return abs(recorded[1] - drawn[1]) <= 1e-9 * recorded[1] and abs(recorded[0] - drawn[0]) <= 1e-7 * recorded[1]


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device and their buffers where they are made.

    `with torch.device("meta")` would put the buffers there too, and the non-persistent ones (rotary
    frequencies, Falcon-H1's muP vector) are in no checkpoint: they must be computed, and they are small.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def empty_model(causal_lm_class: type, config: PretrainedConfig) -> PreTrainedModel:
    """The model with meta parameters and real buffers, computed as a load computes them."""
    with parameters_on_meta():
        model = causal_lm_class(config)
    for m in reversed(list(model.modules())):  # children first, as _materialize_random; on meta params a no-op
        model._init_weights(m)
    return model


def build_model(cfg: ModelConfig, quant: QuantConfig, device: torch.device, empty: bool = False,
                dtype: torch.dtype | None = None, graphs_auto: bool = False, seed: int | None = None) -> nn.Module:
    """The model on `device`, in `cfg.dtype`, with bamba_ft's mixer installed and `use_cache=False`.

    Quantized bases are built one decoder layer at a time, so the device never holds the full 16-bit model.
    `empty`: parameters on the meta device (for sharding first and loading after; bamba_ft/model/shard.py), for
    computing on `device`. `dtype` overrides the dtype `cfg.dtype` resolves to. `graphs_auto`: the caller trains
    where the conv+scan's CUDA graphs pay (`why_no_graphs` found no reason against them), so model.cuda_graphs=auto
    turns them on where the fused conv+scan runs; otherwise auto means off. `seed`: an `init=random` base is drawn
    from it, leaving the random state as it was; its fingerprint is the model's `random_base_fingerprint` (None
    for an unseeded draw).
    """
    check_quant_device(quant, device)
    config = load_config(cfg)
    causal_lm_class = family_for(config.model_type).causal_lm_class
    dtype = dtype or resolve_dtype(cfg.dtype, device)
    attn = choose_attention(cfg.attn_implementation, device.type)
    if attn == VARLEN:
        register_varlen_attention()
    config.use_cache = False  # a cache in training disables packed-sequence masks (transformers 5.24)
    config._attn_implementation = attn
    path = resolve_path(cfg.name_or_path)

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if empty:
            model = empty_model(causal_lm_class, config)
        elif cfg.init == "random":
            with torch.device("meta"):
                model = causal_lm_class(config)
            drawn = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
            with drawn if seed is not None else contextlib.nullcontext():
                if seed is not None:
                    torch.manual_seed(seed)
                # a seeded draw is one a record can name, so it gets a fingerprint (benchmarks draw unseeded)
                model.random_base_fingerprint = _materialize_random(model, device, quant, fingerprint=seed is not None)
        else:
            # Quantized: load on the CPU, then move and quantize layer by layer.
            load_device = "cpu" if quant.method != "none" else device
            try:
                model = causal_lm_class.from_pretrained(
                    path, config=config, dtype=dtype, revision=cfg.revision, device_map={"": load_device}
                )
            except Exception as e:
                raise _hub_error("model.name_or_path", path, e) from e
            if quant.method != "none":
                for layer in model.model.layers:
                    layer.to(device)
                    quantize_layer(layer, quant)
                model.to(device)
    finally:
        torch.set_default_dtype(previous)

    model.config.use_cache = False
    if model.generation_config is not None:
        model.generation_config.use_cache = True  # generation still uses the cache; training never does
    graphs = "false" if cfg.cuda_graphs == "auto" and not graphs_auto else cfg.cuda_graphs
    backend = install_mixer(model, cfg.mixer, cuda_graphs=graphs, device=device,
                            scan_states=cfg.scan_states)
    chosen = apply_checkpointing(model, cfg.gradient_checkpointing)
    params = sum(p.numel() for p in model.parameters())
    # a random model with a named shape is that shape, whatever name_or_path (the tokenizer's source) says
    named = f"{cfg.shape} shape" if cfg.init == "random" and cfg.shape else cfg.name_or_path
    weights = "random init" if cfg.init == "random" else "pretrained"
    log.info(
        "model: %s (%s, %.1fM parameters, %s, attention %s, mixer backend %s; %d of %d layers checkpointed%s)",
        named, weights + (", loaded after sharding" if empty else ""), params / 1e6,
        str(dtype).removeprefix("torch."), attn, backend, len(chosen), config.num_hidden_layers,
        ", activations offloaded to host memory" if cfg.activation_offload else "",
    )
    if note := first_use_note(backend, device):
        log.info(note)
    if graphs_installed(model):
        log.info("model: the Mamba-2 conv+scan runs as CUDA graphs (model.cuda_graphs=%s)", cfg.cuda_graphs)
    if quant.method != "none":
        report_base_memory(model, quant)
    return model
