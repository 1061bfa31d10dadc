"""`task=export`: merge adapters into the base, write a standard transformers directory, verify it, push it.

The directory is built under a temporary name beside the target and renamed into place only after it
was written and verified, so a failed export never leaves a directory that looks finished. The temporary
directory names its owner (pid, host, process start time) in a marker file; an export killed outright
(SIGKILL, OOM, power cut) leaves it behind, and the next export to the same parent directory removes it once
that owner is gone. SIGTERM and Ctrl-C remove it on the way out.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from bamba_ft.config.overrides import override_keys
from bamba_ft.config.schema import RunConfig
from bamba_ft.data.templates import generation_config_for
from bamba_ft.errors import BambaFTError, ConfigError
from bamba_ft.faults import fault_point
from bamba_ft.jobs.model_card import write_model_card
from bamba_ft.jobs.report import (
    atomic_write_json,
    current_umask,
    fsync_dir,
    output_path_problem,
    publish_file,
)
from bamba_ft.model.build import DTYPES
from bamba_ft.model.families import family_of, has_attention_layers
from bamba_ft.model.lora import peft_refused_targets
from bamba_ft.model.mixer import stock_forward
from bamba_ft.model.quant import dequantize_model, is_quantized
from bamba_ft.model.restore import RANDOM_BASE, load_source, locate
from bamba_ft.ops.loss import causal_lm
from bamba_ft.rundir import RunDir

log = logging.getLogger(__name__)

OWNER_FILE = ".bamba_ft-export-owner.json"  # inside a temporary export directory: who is writing it
# A temporary directory without an owner file (written by an older bamba_ft, or killed within microseconds of
# its creation) cannot be checked; it is removed once it was last modified this long ago.
UNOWNED_STALE_S = 3600

# Fixed probe text for the logit comparison (covers chat special tokens and plain characters).
PROBE = [{"role": "user", "content": "What is 12 plus 30? Answer briefly."}, {"role": "assistant", "content": "42"}]

_RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
d, ids, out, dtype, cache = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "cache"
model = AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype)).eval()
x = torch.load(ids)
with torch.no_grad():
    logits = model(input_ids=x, use_cache=False).logits.float()
    gen = model.generate(x[:, : x.shape[1] // 2], max_new_tokens=8, do_sample=False, use_cache=cache,
                         pad_token_id=model.config.pad_token_id)
torch.save({"logits": logits, "generated": gen, "class": type(model).__name__}, out)
"""


def _probe_ids(tokenizer) -> torch.Tensor:  # noqa: ANN001
    text = tokenizer.apply_chat_template(PROBE, tokenize=False)
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])


@torch.no_grad()
def _reference(model: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and greedy tokens through transformers' own forward, which is what a reloaded export runs; so the
    comparison measures merge, cast, save and load, not two scan implementations' rounding (~1e-5 in float32)."""
    lm = causal_lm(model).eval()
    device = next(lm.parameters()).device
    x = ids.to(device)
    with stock_forward(lm):
        logits = lm(input_ids=x, use_cache=False).logits.float().cpu()
    # a model without attention layers generates without a cache (evaluate.generate says why), here and reloaded
    gen = lm.generate(x[:, : x.shape[1] // 2], max_new_tokens=8, do_sample=False, use_cache=has_attention_layers(lm),
                      pad_token_id=lm.config.pad_token_id).cpu()
    return logits, gen


def verify_export(directory: Path, ids: torch.Tensor, ref_logits: torch.Tensor, ref_gen: torch.Tensor,
                  dtype: str, tolerance: float, cache: bool = True) -> dict:
    """Load `directory` with plain transformers in a fresh process; compare logits and greedy generations."""
    with tempfile.TemporaryDirectory() as tmp:
        ids_path, out_path = Path(tmp) / "ids.pt", Path(tmp) / "out.pt"
        torch.save(ids, ids_path)
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # everything it needs is in the directory
        cache = "cache" if cache else "no-cache"
        proc = subprocess.run([sys.executable, "-c", _RELOAD, str(directory.resolve()), str(ids_path), str(out_path), dtype,
                               cache], capture_output=True, text=True, env=env, cwd=tmp)
        if proc.returncode != 0:
            raise BambaFTError(f"the export at {directory} does not load with transformers:\n{proc.stderr[-2000:]}")
        out = torch.load(out_path)
    diff = float((out["logits"] - ref_logits).abs().max())
    rel = diff / max(float(ref_logits.abs().max()), 1e-12)
    same_gen = torch.equal(out["generated"], ref_gen)
    result = {"max_abs_logit_diff": diff, "max_rel_logit_diff": rel, "tolerance": tolerance,
              "greedy_generation_identical": same_gen, "reloaded_class": out["class"]}
    if rel > tolerance:
        raise BambaFTError(
            f"export verification failed: logits of the reloaded export differ from the adapter model by {diff:.3g} "
            f"({rel:.2e} of the largest logit; bound {tolerance:g}). The export was not moved into place."
        )
    return result


def _default_tolerance(dtype: str) -> float:
    """Bound on max |diff| / max |logit|. float32: rounding only (a float32 merge is exact to ~1e-6). 16-bit: the
    reloaded model computes in 16 bits (measured 1.8e-2 on builtin:tiny in bfloat16), and a deeper model adds
    rounding per layer; the bound still catches a wrong merge or a broken save, which are off by order 1."""
    return 1e-5 if dtype == "float32" else 0.1 if dtype == "bfloat16" else 5e-2


def default_target(checkpoint: Path, adapter_only: bool) -> Path:
    """`<run>/export` (or export_adapter): beside the checkpoints for a .ckpt, inside a run or adapter directory."""
    name = "export_adapter" if adapter_only else "export"
    if checkpoint.suffix == ".ckpt":
        return RunDir.of_checkpoint(checkpoint).root / name
    return checkpoint / name


def check_target(target: Path, source: Path, overwrite: bool) -> None:
    """Before any work: `export.overwrite` replaces an earlier export only, never a run, the source or a file."""
    if not target.exists():
        if problem := output_path_problem(target, f"export.output_dir={target}", directory=True):
            raise ConfigError(problem)
        return
    if not target.is_dir():
        raise ConfigError(f"export.output_dir={target} is a file. Fix: name a directory (new, or an earlier export).")
    if not overwrite:
        raise ConfigError(f"export.output_dir={target} exists. Fix: choose another directory or export.overwrite=true.")
    if target == source or target in source.parents:
        raise ConfigError(f"export.output_dir={target} holds the export's source {source}: replacing it would delete "
                          "what is being exported.\nFix: export into another directory.")
    if not (target / "export_report.json").exists():
        raise ConfigError(f"export.output_dir={target} is not an earlier export (it has no export_report.json); "
                          "export.overwrite=true replaces exports only, so it would delete what is there.\nFix: "
                          "choose another directory, or move that one away yourself.")


def _place(tmp: Path, target: Path, overwrite: bool) -> None:
    """Rename the finished temporary directory onto `target` (replacing it only when asked)."""
    if target.exists():
        if not overwrite:
            raise ConfigError(f"export.output_dir={target} exists. Fix: choose another directory or export.overwrite=true.")
        old = _old_dir(target)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        fault_point("export.mid_replace")
        os.replace(tmp, target)
        fault_point("export.after_rename")
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
        fault_point("export.after_rename")
    fsync_dir(target.parent)
    (target / OWNER_FILE).unlink(missing_ok=True)


def _old_dir(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def _process_start(pid: int) -> str | None:
    """Start time of `pid` in clock ticks since boot (Linux), which tells a reused pid from its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may contain spaces


def _owner() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()), "created": time.time()}


def _owner_alive(owner: dict) -> bool | None:
    """Whether the process that wrote `owner` still runs; None when it ran on another host and cannot be checked."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = int(owner["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        pass
    start = _process_start(pid)
    return start is None or owner.get("start") is None or start == owner["start"]


def _read_owner(directory: Path) -> dict | None:
    try:
        return json.loads((directory / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None


def _remove_partial(directory: Path) -> None:
    """Remove everything but the owner file first, so a cleaner killed midway leaves a directory still marked."""
    for child in directory.iterdir():
        if child.name == OWNER_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    shutil.rmtree(directory, ignore_errors=True)


def clean_stale_exports(target: Path) -> list[Path]:
    """Remove what killed exports to `target` left: temporary directories whose owner is gone, the previous export
    set aside while being replaced (restored when the replacement never arrived), an owner file in the export.

    Returns the removed directories. A temporary directory of a live export, here or on another host, is kept.
    """
    if not target.parent.is_dir():
        return []
    removed, busy = [], False
    prefix = f".{target.name}.partial-"
    for d in sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.is_dir()):
        owner = _read_owner(d)
        alive = _owner_alive(owner) if owner is not None else time.time() - d.stat().st_mtime < UNOWNED_STALE_S
        if alive is None:
            log.warning("%s: temporary export directory of process %s on host %s; kept. Fix: if no export runs "
                        "there, remove it (rm -r '%s').", d, owner["pid"], owner["host"], d)
        if alive is not False:
            busy = True
            continue
        _remove_partial(d)
        removed.append(d)
        log.warning("removed %s, left by an export that was killed (%s)", d,
                    f"process {owner['pid']} is gone" if owner else "no owner file, older than an hour")
    old = _old_dir(target)
    if not busy and old.is_dir():  # a live export may be between its two renames: leave `.old` to it
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
            log.warning("removed %s, the export replaced by an export that was killed before removing it", old)
        else:  # killed between moving the old export aside and moving the new one in: undo the first move
            os.replace(old, target)
            log.warning("restored %s from %s: an export that was replacing it was killed midway", target, old)
    owner = _read_owner(target) if target.is_dir() else None
    if owner is not None and _owner_alive(owner) is False:
        (target / OWNER_FILE).unlink(missing_ok=True)  # killed right after its rename; the export is complete
    return removed


def _make_readable(directory: Path) -> None:
    """Give the tree the modes a plain mkdir/open would (mkdtemp and mkstemp make 0700/0600), and flush it to disk
    so that the rename cannot reach the disk before the data does."""
    umask = current_umask()
    for root, dirs, files in os.walk(directory):
        os.chmod(root, 0o777 & ~umask)
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o666 & ~umask)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for name in dirs:
            fsync_dir(Path(root) / name)
    fsync_dir(directory)


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """Turn SIGTERM (docker stop, kill, a scheduler's preemption) into SystemExit(143), so cleanup code runs."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not interrupt the cleanup
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def push_to_hub(directory: Path, repo_id: str, private: bool, message: str) -> str:
    """Upload `directory` to the Hub (token from HF_TOKEN or the saved login); returns the commit URL."""
    import shlex

    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # the export is complete and verified: only the upload is left to retry, with the Hub's own command
    retry = (f"The local export at {directory} is complete; to upload it alone: hf upload {shlex.quote(repo_id)} "
             f"{shlex.quote(str(directory))} . {'--private' if private else '--no-private'} "
             f"--commit-message {shlex.quote(message)}")
    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message=message)
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        hint = "log in with `hf auth login` or set HF_TOKEN with write access" if status in (401, 403) else "check the repository id and your network"
        raise BambaFTError(f"push to {repo_id} failed ({status}: {str(e).splitlines()[0]}). Fix: {hint}.\n{retry}") from e
    except Exception as e:  # connection errors, offline mode
        raise BambaFTError(f"push to {repo_id} failed ({type(e).__name__}: {e}). The Hub is unreachable or offline "
                           f"mode is on (HF_HUB_OFFLINE).\n{retry}") from e
    return str(getattr(info, "commit_url", info))


def run(cfg: RunConfig) -> dict:
    ex = cfg.export
    if not ex.checkpoint:
        raise ConfigError("export.checkpoint is not set. Fix: export.checkpoint=<training run directory or adapter>.")
    src = locate(ex.checkpoint, cfg)
    src.refuse_ignored(override_keys())
    lora = src.adapter_dir is not None or (src.ckpt is not None and src.run is not None and src.run.peft.method == "lora")
    if ex.adapter_only and not lora:  # before the model loads (a full run's .ckpt failed in peft's save)
        raise ConfigError(f"export.adapter_only=true needs a LoRA run, adapter or checkpoint to export, and "
                          f"{src.description} has no adapter: its weights are a whole model.\nFix: drop "
                          "export.adapter_only to export that model.")
    target = (Path(ex.output_dir) if ex.output_dir else default_target(Path(ex.checkpoint), ex.adapter_only))
    target = target.expanduser().resolve()  # the verification process runs elsewhere
    clean_stale_exports(target)  # first: it may restore a target that a killed overwrite had moved aside
    check_target(target, Path(ex.checkpoint).expanduser().resolve(), ex.overwrite)
    device = torch.device("cpu")
    # The base is built as it trained, in the run's dtype: a quantized base from the weights in that dtype (NF4
    # codes drawn from bf16 weights are not those drawn from float32), a random base drawn in it. _write casts the
    # model to float32 for the merge, then once to the export dtype.
    model, tokenizer = load_source(src, device)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _sigterm_as_exit():
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
        try:
            (tmp / OWNER_FILE).write_text(json.dumps(_owner()))
            report = _write(model, tokenizer, cfg, src, tmp, target)
            report["output_dir"] = str(target)
            atomic_write_json(tmp / "export_report.json", report)
            _make_readable(tmp)
            fault_point("export.before_rename")
            _place(tmp, target, ex.overwrite)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (SystemExit, KeyboardInterrupt)):
                print(f"bamba_ft: export interrupted ({type(e).__name__}); removed the unfinished {tmp}", file=sys.stderr)
            raise
    lines = [f"exported {src.description}", f"  to {target}"]
    if "verify" in report:
        v = report["verify"]
        lines.append(f"  verified: reloaded with {v['reloaded_class']}; max |logit diff| {v['max_abs_logit_diff']:.2e} "
                     f"= {v['max_rel_logit_diff']:.1e} of the largest logit (bound {v['tolerance']:g}); "
                     f"greedy generation identical: {v['greedy_generation_identical']}")
    if "peft_refused_targets" in report:
        lines.append(f"  note: plain peft refuses LoRA on {', '.join(report['peft_refused_targets'])} of this model type "
                     f"(PeftModel.from_pretrained raises); bamba_ft runs it (eval.checkpoint={target}), and "
                     f"recipe=export export.checkpoint={target} merges it for transformers")
    if "quantized_vs_merged_max_abs_logit_diff" in report:
        lines.append(f"  quantized base + adapter vs merged: max |logit diff| {report['quantized_vs_merged_max_abs_logit_diff']:.2e}")
    print("\n".join(lines))  # before the push: a failed push leaves a verified export, and this says so
    if ex.push_to_hub:
        report["hub_commit"] = push_to_hub(target, ex.repo_id, ex.private, ex.commit_message)
        publish_file(target / "export_report.json", json.dumps(report, indent=2, default=str) + "\n")
        print(f"  pushed: {report['hub_commit']}")
    return report


def _write(model: nn.Module, tokenizer, cfg: RunConfig, src, tmp: Path, target: Path) -> dict:  # noqa: ANN001
    ex = cfg.export
    report: dict = {"source": src.description, "dtype": ex.dtype}
    if src.run_dir is not None:  # recipe=eval on this directory scores that run's data (restore._exported_from)
        report["run"] = str(Path(src.run_dir).resolve())
    ids = _probe_ids(tokenizer)
    if ex.adapter_only:
        from peft import get_peft_model_state_dict

        # the adapter keeps the dtype it trained in: export.dtype is the merged weights'
        saved = get_peft_model_state_dict(model)
        report["dtype"] = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in saved.values()}))
        model.save_pretrained(tmp)
        # plain peft refuses to load some families' out_proj adapters: the card and the summary say how to run it
        targets = json.loads((tmp / "adapter_config.json").read_text())["target_modules"]
        if refused := peft_refused_targets(family_of(model).model_type, sorted(targets)):
            report["peft_refused_targets"] = refused
        tokenizer.save_pretrained(tmp)
        generation_config_for(causal_lm(model), tokenizer).save_pretrained(tmp)
        if src.random_base is not None:  # the adapter alone names its random base
            atomic_write_json(tmp / RANDOM_BASE, src.random_base)
        fault_point("export.after_save")
        write_model_card(tmp, cfg, src, report, adapter_only=True, family=family_of(model))
        return report
    quantized = any(is_quantized(p) for p in model.parameters())
    if quantized:  # the quantized base and adapter as they trained, for the report
        ref_logits, ref_gen = _reference(model, ids)
        report["dequantized_layers"] = dequantize_model(causal_lm(model), torch.float32)
    model = model.float()  # merged in float32: a 16-bit base and its adapter are exact in it
    if not quantized:
        ref_logits, ref_gen = _reference(model, ids)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    if quantized:  # verify the export against the merged model; report how far quantization moved it
        merged_logits, ref_gen = _reference(model, ids)
        report["quantized_vs_merged_max_abs_logit_diff"] = float((merged_logits - ref_logits).abs().max())
        ref_logits = merged_logits
    model = model.to(DTYPES[ex.dtype])
    model.config.use_cache = True  # exports are for inference
    model.config.architectures = [family_of(model).causal_lm_class.__name__]
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
    fault_point("export.after_save")
    _strip_attention_choice(tmp)
    tokenizer.save_pretrained(tmp)
    generation_config_for(model, tokenizer).save_pretrained(tmp)  # stops at EOS and the template's end of turn
    fault_point("export.before_verify")
    if ex.verify:
        tol = ex.max_rel_diff if ex.max_rel_diff is not None else _default_tolerance(ex.dtype)
        report["verify"] = verify_export(tmp, ids, ref_logits, ref_gen, ex.dtype, tol, has_attention_layers(model))
    fault_point("export.after_verify")
    write_model_card(tmp, cfg, src, report, adapter_only=False, family=family_of(model))
    return report


def _strip_attention_choice(directory: Path) -> None:
    """bamba_ft's `varlen` attention is registered in-process only; exports load with transformers' default."""
    path = directory / "config.json"
    data = json.loads(path.read_text())
    for key in ("_attn_implementation", "attn_implementation", "_attn_implementation_internal"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
