"""Finds what a checkpoint path points at (run, adapter, .ckpt, merged model) and rebuilds that model."""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn
from transformers import PreTrainedTokenizerBase

from bamba_ft.config.schema import ModelConfig, QuantConfig, RunConfig
from bamba_ft.errors import ConfigError, ModelError
from bamba_ft.model.build import build_model, load_tokenizer, same_draw
from bamba_ft.model.lora import apply_peft, fuse_lora_forward, load_adapter
from bamba_ft.rundir import RUN_CONFIG, RunDir

log = logging.getLogger(__name__)



# A base drawn at random (model.init=random) is in no file: eval and export draw it again from the run's seed and
# check the draw against the fingerprint recorded here (in the run directory, and in its adapter directory).
RANDOM_BASE = "random_base.json"


def random_base_record(cfg: RunConfig, model: nn.Module, device: torch.device) -> dict | None:
    """What rebuilds this run's random base, or None when its base is loaded from a file (or drawn sharded)."""
    fingerprint = getattr(model, "random_base_fingerprint", None)
    if cfg.model.init != "random" or fingerprint is None:
        return None
    return {"model": dataclasses.asdict(cfg.model), "quant": dataclasses.asdict(cfg.quant), "seed": cfg.trainer.seed,
            "device": device.type, "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "torch": torch.__version__, "fingerprint": fingerprint}


def _read_random_base(directory: Path) -> dict | None:
    path = directory / RANDOM_BASE
    return json.loads(path.read_text()) if path.exists() else None


def save_run_config(cfg: RunConfig, run_dir: Path) -> None:
    """Every rank of a run started by torchrun or srun writes it, at about the same moment: each through a
    temporary file of its own, so no rank renames another's half-written copy, or finds its own renamed away."""
    from bamba_ft.jobs.report import publish_file

    publish_file(run_dir / RUN_CONFIG, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


# A checkpoint is a zip archive (torch.save) whose central directory is written last, so a file cut short by a
# crash or a full disk does not open as a zip; CRCs catch bytes changed later. Past this size only completeness
# is checked: the CRCs would cost a second full read of a file torch.load reads anyway.
_FULL_CRC_BELOW = 4 << 30


SHARDED_META = "meta.pt"  # Lightning's name for the non-tensor state of a sharded checkpoint directory
DCP_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the shard files


def is_sharded(path: Path) -> bool:
    """A checkpoint directory written by trainer.strategy=fsdp (torch.distributed.checkpoint plus meta.pt)."""
    return path.is_dir() and (path / SHARDED_META).is_file()


def _sharded_problem(path: Path) -> str | None:
    if not (path / SHARDED_META).is_file():
        return f"a directory without {SHARDED_META} (not a finished sharded checkpoint)"
    if not (path / DCP_INDEX).is_file():
        return f"a sharded checkpoint without its {DCP_INDEX} index"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(path)).read_metadata().storage_data.values()
    except Exception as e:  # a truncated or foreign index
        return f"a sharded checkpoint whose {DCP_INDEX} does not read ({type(e).__name__})"
    absent = sorted({s.relative_path for s in storage} - {p.name for p in path.iterdir()})
    if absent:
        return f"a sharded checkpoint missing {len(absent)} shard file(s) (first: {absent[0]})"
    return checkpoint_problem(path / SHARDED_META)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` cannot be a complete checkpoint (a file, or a sharded directory), or None when it looks intact."""
    if path.is_dir():
        return _sharded_problem(path)
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"unreadable ({e.strerror})"
    if size == 0:
        return "empty (0 bytes)"
    try:
        with zipfile.ZipFile(path) as archive:
            if size < _FULL_CRC_BELOW:
                bad = archive.testzip()
                if bad is not None:
                    return f"corrupt (entry {bad} fails its CRC check)"
    except zipfile.BadZipFile:
        return f"truncated or not a checkpoint ({size:,} bytes, no complete archive)"
    except (OSError, EOFError, zipfile.LargeZipFile) as e:
        return f"unreadable ({e})"
    return None


def require_intact(path: Path, what: str) -> None:
    """Raise a ModelError naming `path` when it is not a complete checkpoint."""
    problem = checkpoint_problem(path)
    if problem:
        raise ModelError(f"{what}: {path} is {problem}, so it cannot be loaded. Use another checkpoint of the run "
                         f"(its adapter/ directory, or best-*.ckpt under checkpoints/).")


def state_file(path: Path) -> Path:
    """The file holding a checkpoint's non-tensor state: the checkpoint file, or a sharded directory's meta.pt."""
    return path / SHARDED_META if path.is_dir() else path


def checkpoint_state(path: Path) -> dict:
    """A checkpoint's non-tensor state (global_step, loops, the run's config): of a file, or a sharded directory's
    meta.pt; tensors are mapped, not read."""
    return torch.load(state_file(path), map_location="cpu", weights_only=False, mmap=True)


def read_sharded(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` (name -> a tensor of the right shape) from a sharded checkpoint's `state_dict`, in one process
    or on every rank of a run (each reading what its tensors hold); ModelError names a tensor the checkpoint lacks."""
    import torch.distributed.checkpoint as dcp

    stored = {k.removeprefix("state_dict.") for k in dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata}
    missing = sorted(set(tensors) - stored)
    if missing:
        raise ModelError(f"{path}: lacks {len(missing)} trained tensors of this model (first: {missing[0]}); it was "
                         "written for a different model or adapter configuration.")
    dcp.load({"state_dict": tensors}, checkpoint_id=str(path))


def _drop_unknown(data: dict, schema: type, prefix: str = "") -> list[str]:
    """Remove keys the schema does not declare (written by another bamba_ft version); return their names."""
    hints = typing.get_type_hints(schema)
    dropped = []
    for key in list(data):
        if key not in hints:
            dropped.append(prefix + key)
            del data[key]
        elif dataclasses.is_dataclass(hints[key]) and isinstance(data[key], dict):
            dropped += _drop_unknown(data[key], hints[key], f"{prefix}{key}.")
    return dropped


def load_run_config(run_dir: Path) -> RunConfig:
    data = OmegaConf.to_container(OmegaConf.load(run_dir / RUN_CONFIG))
    dropped = _drop_unknown(data, RunConfig)
    if dropped:
        log.warning("%s: ignoring keys this bamba_ft version does not know: %s", run_dir / RUN_CONFIG, ", ".join(dropped))
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), data))  # type: ignore[return-value]
    except Exception as e:
        raise ModelError(f"{run_dir / RUN_CONFIG} does not describe a bamba_ft run ({e}).") from e


RUN_OWNS = ("model", "quant", "peft")  # what a run (or a random base's record) brings: the command line's is not used


@dataclass
class Source:
    """What to load: a base model, optionally an adapter directory or trainable state from a .ckpt."""

    model: ModelConfig
    quant: QuantConfig
    run: RunConfig | None = None
    adapter_dir: Path | None = None
    ckpt: Path | None = None
    description: str = ""
    random_base: dict | None = None
    """For an `init=random` base: the run's record of its draw (RANDOM_BASE), None when it made none."""
    own: tuple[str, ...] = ("peft",)
    """Config sections (or keys) the source brings itself: the command line's values for them are not used."""
    run_dir: Path | None = None
    """The training run it comes from (`run`'s directory), recorded in an export so that its model is evaluated on
    that run's data."""

    def refuse_ignored(self, given: set[str]) -> None:
        """Command-line keys (`given`, dotted; a group choice by its name) that this source would silently ignore."""
        hit = sorted(k for k in given if any(k == o or k.startswith(o + ".") for o in self.own))
        if hit:
            raise ConfigError(f"{', '.join(hit)}: {self.description} brings its own {', '.join(self.own)}, so these "
                              "would be ignored.\nFix: drop them; to use another model or adapter, name it in "
                              "eval.checkpoint, generate.checkpoint or export.checkpoint (unset: the configured base "
                              "model).")


def locate(checkpoint: str | None, cfg: RunConfig) -> Source:
    """Interpret `checkpoint` (eval.checkpoint, generate.checkpoint, export.checkpoint); None means the configured
    base model."""
    if checkpoint is None:
        m = cfg.model
        what = (f"{m.shape or m.name_or_path} shape, drawn at random" if m.init == "random"
                else m.name_or_path)
        return Source(m, cfg.quant, description=f"base model {what}")
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise ModelError(f"checkpoint {checkpoint}: no such file or directory.")
    if path.suffix == ".ckpt" and (path.is_file() or is_sharded(path)):
        run_dir = RunDir.of_checkpoint(path).root
        if not (run_dir / RUN_CONFIG).exists():
            raise ModelError(f"checkpoint {checkpoint}: cannot find its run's {RUN_CONFIG} in {run_dir}.")
        run = load_run_config(run_dir)
        return Source(run.model, run.quant, run=run, ckpt=path, description=f"training checkpoint {path}", run_dir=run_dir,
                      random_base=_read_random_base(run_dir), own=RUN_OWNS)
    if (path / "adapter_config.json").exists() and (path.parent / RUN_CONFIG).exists() and \
            RunDir(path.parent).adapter.resolve() == path.resolve():
        # a run's own adapter/: its base is the run's (quantized, or a random draw), not the command line's
        log.info("checkpoint %s: the adapter of run %s, evaluated on that run's base", checkpoint, path.parent)
        path = path.parent
    rd = RunDir(path)
    if rd.run_config.exists():
        run = load_run_config(path)
        drawn = _read_random_base(path)
        if rd.adapter.is_dir():
            return Source(run.model, run.quant, run=run, adapter_dir=rd.adapter, description=f"run {path}", run_dir=path,
                          random_base=drawn, own=RUN_OWNS)
        if rd.full_model.is_dir():
            model = dataclasses.replace(run.model, name_or_path=str(rd.full_model), init="pretrained", tokenizer=None)
            return Source(model, QuantConfig(), run=run, description=f"run {path} (full weights)", own=RUN_OWNS,
                          run_dir=path)
        if rd.resumable_checkpoints():  # a stopped run: its checkpoint furthest into training, as a resume takes
            from bamba_ft.jobs.checkpoints import newest_intact

            ckpt = newest_intact(path, f"checkpoint {checkpoint}")
            return Source(run.model, run.quant, run=run, ckpt=ckpt, description=f"run {path} ({ckpt.name})", run_dir=path,
                          random_base=drawn, own=RUN_OWNS)
        raise ModelError(f"checkpoint {checkpoint}: the run has no adapter/, model/ or checkpoint (last.ckpt, "
                         "interrupted.ckpt, best-*) yet.")
    if (drawn := _read_random_base(path)) is not None and (path / "adapter_config.json").exists():
        model = ModelConfig(**{k: v for k, v in drawn["model"].items() if k in ModelConfig.__dataclass_fields__})
        quant = QuantConfig(**{k: v for k, v in drawn["quant"].items() if k in QuantConfig.__dataclass_fields__})
        return Source(model, quant, adapter_dir=path, random_base=drawn, own=RUN_OWNS,
                      description=f"adapter {path} on its random {model.shape or model.name_or_path} base")
    if (path / "adapter_config.json").exists():
        from bamba_ft.config.overrides import override_keys

        named = override_keys() & {"model", "model.name_or_path"}  # the base named on the command line (a local copy)
        if not named and (run_dir := _exported_from(path)) is not None:
            # an adapter-only export of a run: that run's base (quantized as it trained), data and seed, as a merged
            # export is scored on them
            run = load_run_config(run_dir)
            return Source(run.model, run.quant, run=run, adapter_dir=path, run_dir=run_dir, own=RUN_OWNS,
                          random_base=_read_random_base(run_dir),
                          description=f"adapter {path} (exported from run {run_dir})")
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if named:
            base = cfg.model.name_or_path
        model = dataclasses.replace(cfg.model, name_or_path=base or cfg.model.name_or_path, init="pretrained")
        return Source(model, cfg.quant, adapter_dir=path, description=f"adapter {path} on {model.name_or_path}")
    if (path / "config.json").exists():
        model = dataclasses.replace(cfg.model, name_or_path=str(path), init="pretrained", tokenizer=None)
        run_dir = _exported_from(path)  # a merged export of a run: scored on that run's data and seed, as the run is
        return Source(model, QuantConfig(), run=load_run_config(run_dir) if run_dir else None, run_dir=run_dir,
                      own=("quant", "peft", "model.name_or_path"),
                      description=f"model {path}" + (f" (exported from run {run_dir})" if run_dir else ""))
    raise ModelError(
        f"checkpoint {checkpoint}: not a run directory ({RUN_CONFIG}), a peft adapter (adapter_config.json), "
        "a model directory (config.json) or a .ckpt file."
    )


def _exported_from(path: Path) -> Path | None:
    """The training run an export directory records (export_report.json's `run`), while that run is still there;
    None for any other model directory."""
    report = path / "export_report.json"
    try:
        run = json.loads(report.read_text()).get("run") if report.exists() else None
    except (OSError, ValueError):
        return None
    return Path(run) if run and RunDir(run).run_config.exists() else None


def _build_base(src: Source, device: torch.device) -> nn.Module:
    """The source's base; a random one drawn again from its run's seed, and refused unless it is the same draw."""
    if src.model.init != "random" or (src.adapter_dir is None and src.ckpt is None):
        return build_model(src.model, src.quant, device)  # a base model to evaluate as it is configured
    drawn = src.random_base
    if drawn is None:
        raise ModelError(f"{src.description}: trained on a base drawn at random (model.init=random) whose draw was not "
                         f"recorded ({RANDOM_BASE}: runs before it was kept, or trained under FSDP), so no other "
                         "process can rebuild that base; adapters on another draw would be scored or merged wrongly."
                         "\nFix: train on a saved base (model.name_or_path=<directory>), or recipe=full, whose "
                         "weights are saved whole.")
    model = build_model(src.model, src.quant, device, seed=int(drawn["seed"]))
    again = model.random_base_fingerprint
    if not same_draw(drawn["fingerprint"], again):
        here = (device.type, str(next(model.parameters()).dtype).removeprefix("torch."), torch.__version__)
        then = (drawn["device"], drawn["dtype"], drawn.get("torch", "?"))
        cause = (f"it was drawn on {then[0]} in {then[1]} with torch {then[2]}, here on {here[0]} in {here[1]} with "
                 f"torch {here[2]}" if here != then else "the device, dtype and torch version are the ones it was drawn "
                 f"with, so {RANDOM_BASE} or the code that draws it changed")
        raise ModelError(f"{src.description}: its random base, drawn again from seed {drawn['seed']}, is another draw "
                         f"(sum and sum of squares {again[0]:.9g}, {again[1]:.9g}; recorded {drawn['fingerprint'][0]:.9g}, "
                         f"{drawn['fingerprint'][1]:.9g}): {cause}. The adapters would be scored or merged on other "
                         "weights.\nFix: evaluate or export where and as it trained (model.dtype), or train on a saved base.")
    return model


def load_source(src: Source, device: torch.device, trainable: bool = False) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Build the base (quantized as configured), attach the adapter or .ckpt state; eval mode unless `trainable`."""
    # A run saves its tokenizer (chat template included) beside the adapter.
    has_tokenizer = src.adapter_dir is not None and (src.adapter_dir / "tokenizer_config.json").exists()
    tokenizer = load_tokenizer(dataclasses.replace(src.model, tokenizer=str(src.adapter_dir)) if has_tokenizer else src.model)
    model: nn.Module = _build_base(src, device)
    if src.adapter_dir is not None:
        model = load_adapter(model, str(src.adapter_dir), trainable)
        fuse_lora_forward(model)
    elif src.ckpt is not None:
        assert src.run is not None
        model = apply_peft(model, src.run.peft)
        require_intact(src.ckpt, "checkpoint")
        prefix = "model."
        if src.ckpt.is_dir():  # sharded (trainer.strategy=fsdp): the shards of every rank, read into one process
            weights = {prefix + n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
            read_sharded(src.ckpt, weights)
            weights = {k[len(prefix):]: v for k, v in weights.items()}
        else:
            state = torch.load(src.ckpt, map_location=device, weights_only=False)["state_dict"]
            weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in weights]
        if missing:
            raise ModelError(f"{src.ckpt}: lacks {len(missing)} trained tensors (first: {missing[0]}).")
        model.load_state_dict(weights, strict=False)
    model.to(device)
    model.train(trainable)
    return model, tokenizer
