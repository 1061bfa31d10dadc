"""FSDP2 (`fully_shard`) for bamba_ft models: built without weights, sharded per decoder layer, then filled.

Every rank builds the model with its parameters on the meta device (`build_model(empty=True)`; adapters get
their initial values on the CPU, drawn as a one-process run draws them), applies `fully_shard` to each decoder
layer of its family and then to the root, and only then receives weights: rank 0 reads one unit's tensors from
the checkpoint's safetensors (or draws them, for random init) and `set_model_state_dict(full_state_dict=True,
broadcast_from_rank0=True)` sends them tensor by tensor, each rank keeping its shard. So no rank holds the full
model: a rank holds its shards plus the tensor in flight, and rank 0 also the unit it is reading.

The root is the module whose forward computes the loss (the LightningModule): bamba_ft's loss calls the decoder
stack and the LM head directly, not the model's own forward, so the root's hooks must run around both.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from bamba_ft.config.schema import ModelConfig
from bamba_ft.errors import ModelError
from bamba_ft.model.build import empty_model, load_config, resolve_path
from bamba_ft.model.families import family_for, family_of
from bamba_ft.ops.loss import causal_lm

log = logging.getLogger(__name__)

Reader = Callable[[list[str]], dict[str, torch.Tensor]]
"""Checkpoint key names (as transformers saves them) -> their full tensors; called on rank 0 only."""

# peft's wrappers insert these into a base weight's name; the checkpoint knows the name without them.
_PEFT_PARTS = re.compile(r"\.(base_layer|original_module|modules_to_save\.[^.]+)(?=\.)")


def checkpoint_key(name: str) -> str:
    """`base_model.model.model.layers.0.mamba.in_proj.base_layer.weight` -> `model.layers.0.mamba.in_proj.weight`."""
    return _PEFT_PARTS.sub("", name.removeprefix("base_model.model."))


def mixed_precision(precision: str, device: torch.device):  # noqa: ANN201
    """bf16 all-gathers and compute with float32 gradient reduction on GPUs in bf16 precision; else none."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cuda" and precision.startswith("bf16"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def shard_model(root: nn.Module, model: nn.Module, mesh, policy) -> int:  # noqa: ANN001
    """`fully_shard` each decoder layer of `model` (one unit each), then `root` (embeddings, final norm, LM head).

    Returns the number of units. Activation checkpointing composes: transformers' per-layer checkpoint wraps the
    layer's whole call, FSDP's gathering hooks included, so the recomputation in backward finds the layer gathered.
    """
    from torch.distributed.fsdp import fully_shard

    layers = causal_lm(model).model.layers
    unit = family_of(model).decoder_layer_class
    odd = sorted({type(layer).__name__ for layer in layers if not isinstance(layer, unit)})
    if odd:
        raise ModelError(f"the decoder stack holds {', '.join(odd)}, not only {unit.__name__}: one FSDP unit per "
                         "decoder layer needs the family's layer class.")
    for i, layer in enumerate(layers):
        # the last layer's weights are needed again at once by backward: keep them gathered after its forward
        fully_shard(layer, mesh=mesh, mp_policy=policy, reshard_after_forward=i < len(layers) - 1)
    fully_shard(root, mesh=mesh, mp_policy=policy)
    return len(layers) + 1


def _units(model: nn.Module) -> list[tuple[str, list[str]]]:
    """(unit name, parameter and persistent buffer names of `model` in it), decoder layers first, the rest last."""
    names = list(model.state_dict(keep_vars=True))
    prefixes = {id(m): n for n, m in model.named_modules()}
    units, taken = [], set()
    for i, layer in enumerate(causal_lm(model).model.layers):
        prefix = prefixes[id(layer)] + "."
        keys = [n for n in names if n.startswith(prefix)]
        units.append((f"layer {i}", keys))
        taken.update(keys)
    units.append(("embeddings, final norm and head", [n for n in names if n not in taken]))
    return units


def initial_values(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a model built empty that already hold values (adapters): copies, before sharding."""
    return {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items() if not t.is_meta}


def load_sharded(model: nn.Module, make_reader: Callable[[], Reader] | None, initial: dict[str, torch.Tensor]) -> None:
    """Give every rank its shards of `model`'s weights, one unit at a time, from rank 0.

    Rank 0 passes `make_reader` (the checkpoint's tensors) and `initial` (the adapters' starting values, which
    win for any name both have); the other ranks pass None and {}. A problem on rank 0 (a missing file or
    tensor) is sent to every rank, which all raise the same ModelError instead of waiting for tensors.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    dtypes = {n: t.dtype for n, t in model.state_dict(keep_vars=True).items()}
    read: Reader | None = None
    for unit, names in _units(model):
        state: dict[str, torch.Tensor] = {}
        error: Exception | None = None
        if make_reader is not None:
            try:
                read = read or make_reader()
                state = _unit_state(read, names, initial, dtypes)
            except Exception as e:  # the other ranks are waiting for this unit: tell them first
                error = e
        problem = [f"{type(error).__name__}: {error} (loading {unit})" if error else None]
        dist.broadcast_object_list(problem, src=0)
        if error is not None:
            raise error
        if problem[0] is not None:
            raise ModelError(f"rank 0 could not read the weights: {problem[0]}")
        set_model_state_dict(model, state, options=options)
        del state
    left = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    if left:
        raise ModelError(f"{len(left)} tensors of the model were not loaded (first: {left[0]}).")


def _unit_state(read: Reader, names: list[str], initial: dict[str, torch.Tensor],
                dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    """Rank 0: the full tensors of one unit, by the model's names, in the model's dtypes."""
    wanted = {checkpoint_key(n) for n in names if n not in initial}
    found = read(sorted(wanted)) if wanted else {}
    missing = sorted(wanted - set(found))
    if missing:
        raise ModelError(f"the checkpoint has no tensor {missing[0]} ({len(missing)} missing); it was saved for "
                         "a different model.")
    return {n: (initial[n] if n in initial else found[checkpoint_key(n)]).to(dtypes[n]) for n in names}


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """Key -> safetensors file of a transformers checkpoint directory."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    single = path / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {k: single for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    raise ModelError(f"model.name_or_path={path}: no model.safetensors (or its index) to load shards from; "
                     "trainer.strategy=fsdp reads safetensors only.\nFix: save the model with "
                     "save_pretrained(safe_serialization=True), or use trainer=ddp.")


def _local_checkpoint(cfg: ModelConfig) -> Path:
    path = Path(resolve_path(cfg.name_or_path)).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:  # the files from_pretrained would fetch (or find in the cache)
        return Path(snapshot_download(str(path), revision=cfg.revision, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as e:
        raise ModelError(f"model.name_or_path={cfg.name_or_path}: not a local directory and the Hugging Face Hub "
                         f"did not provide it ({str(e).splitlines()[0] if str(e) else type(e).__name__}).\n"
                         f"Fix: download it (`hf download {cfg.name_or_path} --local-dir DIR`) and pass "
                         "model.name_or_path=DIR.") from e


def safetensors_reader(cfg: ModelConfig) -> Reader:
    """Reads the requested tensors of the checkpoint `cfg` names, opening each file as it is needed."""
    from safetensors import safe_open

    files = _checkpoint_files(_local_checkpoint(cfg))

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k in files:
                by_file.setdefault(files[k], []).append(k)
        for file, names in by_file.items():
            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in names})
        return out

    return read


def random_reader(cfg: ModelConfig, dtype: torch.dtype, device: torch.device | str = "cpu") -> Reader:
    """Fresh weights as `init=random` draws them, one decoder layer (or the rest) at a time, on `device` (rank 0's
    GPU: drawing a 9B model's weights on the host took minutes).

    A one-process run draws its weights before its adapters, a sharded one after them (the adapters must exist
    before sharding), so the two start from different random weights with the same seed.
    """
    from bamba_ft.model.build import init_layer, init_rest

    config = load_config(cfg)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        template = empty_model(family_for(config.model_type).causal_lm_class, config)
    finally:
        torch.set_default_dtype(previous)
    layers = template.model.layers
    device = torch.device(device)

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        match = re.match(r"model\.layers\.(\d+)\.", keys[0])
        if match:
            i = int(match.group(1))
            init_layer(template, layers[i], device)
            state = {f"model.layers.{i}.{k}": v for k, v in layers[i].state_dict().items()}
            layers[i].to("meta")  # free it: the next layer takes its place
        else:
            init_rest(template, device)
            state = {k: v for k, v in template.state_dict().items() if not k.startswith("model.layers.")}
        return {k: state[k] for k in keys if k in state}

    return read


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded `model`, gathered to rank 0's host memory one at a time (other ranks get {}).

    Collective: every rank calls it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def storage_bytes(model: nn.Module) -> Iterator[tuple[str, int, int]]:
    """(name, elements held by this rank, elements of the full tensor) for every parameter of a sharded model."""
    for name, p in model.named_parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        yield name, local.numel(), p.numel()
