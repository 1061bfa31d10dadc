"""Several processes: each rank on its own device, and data parallelism equal to accumulation (gloo on CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bamba_ft.config.schema import RunConfig
from bamba_ft.errors import ConfigError
from bamba_ft.jobs import runtime
from bamba_ft.model.build import resolve_path
from bamba_ft.model.restore import is_sharded, load_source, locate, read_sharded
from tests.integration.conftest import ROOT, cli, run_in_process


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(var, raising=False)
    return chosen


def test_each_rank_computes_on_the_gpu_of_its_local_rank(four_gpus: list[torch.device],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert runtime.choose_device("gpu") == torch.device("cuda", 0)  # the launching process is local rank 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime.choose_device("gpu") == torch.device("cuda", 1)
    assert runtime.choose_device("auto", [2, 3]) == torch.device("cuda", 3)  # trainer.devices=[2,3]
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("SLURM_LOCALID", "2")
    assert runtime.choose_device("gpu") == torch.device("cuda", 2)
    assert four_gpus == [torch.device("cuda", i) for i in (0, 1, 3, 2)]  # made current before any tensor
    monkeypatch.setenv("SLURM_LOCALID", "5")
    with pytest.raises(ConfigError, match=r"local rank 5 has no GPU.*nproc-per-node"):
        runtime.choose_device("gpu")
    assert runtime.choose_device("cpu") == torch.device("cpu")


RUN = ["recipe=sft", "model=tiny", "trainer=cpu", "logger=none", "trainer.max_steps=4",
       "trainer.val_check_interval=100", "eval.before_training=false", "eval.generate=false",
       "data.builtin_train_examples=64", "data.builtin_val_examples=24", "data.max_tokens_per_batch=512",
       "trainer.enable_progress_bar=false", "optim.warmup_steps=0"]


def _adapter(tmp_path: Path, name: str, *overrides: str) -> dict[str, torch.Tensor]:
    """Through the CLI for trainer.devices=2 (the launcher starts rank 1 from the command line), else in this process."""
    run = tmp_path / name
    if "trainer.devices=2" in overrides:
        cli([*RUN, *overrides, f"hydra.run.dir={run}"], cwd=tmp_path, timeout=600)
    else:
        run_in_process([*RUN, *overrides], run)
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.mark.slow
def test_ddp_on_two_ranks_equals_one_rank_accumulating_two(tmp_path: Path) -> None:
    """Rank r takes every 2nd batch from r on, so 2 ranks x 1 batch see what 1 rank sees in 2 accumulated batches."""
    ddp = _adapter(tmp_path, "ddp", "trainer.devices=2", "trainer.strategy=ddp")
    accumulated = _adapter(tmp_path, "accumulated", "trainer.accumulate_grad_batches=2")
    one_batch = _adapter(tmp_path, "one_batch")
    assert ddp.keys() == accumulated.keys()
    assert max(float((ddp[k] - accumulated[k]).abs().max()) for k in ddp) <= 1e-5
    # and the comparison can fail: one batch per step trains to a different adapter
    assert max(float((ddp[k] - one_batch[k]).abs().max()) for k in ddp) > 1e-3
    # validation loss summed over the ranks' shares equals the one-process evaluation after training
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 4
    # the logged train loss is the step's, over both ranks' targets, as the accumulated run's is over both batches
    alone = json.loads((tmp_path / "accumulated" / "metrics.json").read_text())["train"]["final_train_loss"]
    assert metrics["train"]["final_train_loss"] == pytest.approx(alone, rel=1e-5)
    assert abs(metrics["train"]["last_val_loss"] - metrics["after"]["val_loss"]) < 1e-5


# Clipping off for the LoRA comparison: the clip norm's last bits depend on the summation order (sharded here), and
# Adam turns that into a 2.6e-5 difference on one lora_A whose gradients start at zero (measured); without it the
# adapters are bitwise equal. Full fine-tuning keeps clipping on (3e-8 measured). Constant rate: a run that stops
# at step 2 and resumes to 4 then follows the rates of a 4-step run.
FSDP = ["trainer.strategy=fsdp", "optim.scheduler=constant"]


def _with(*overrides: str) -> list[str]:
    """RUN with `overrides` (key=value) replacing its values for the same keys."""
    merged = dict(o.split("=", 1) for o in RUN)
    merged.update(o.split("=", 1) for o in overrides)
    return [f"{k}={v}" for k, v in merged.items()]


def _train_here(run: Path, overrides: list[str]) -> Path:
    """Train in this process (no interpreter start-up): one-rank runs, FSDP's included, whose process group and
    launcher environment are removed afterwards."""
    import os

    import torch.distributed as dist
    from hydra import compose, initialize_config_dir

    from bamba_ft.config.overrides import to_run_config
    from bamba_ft.config.store import config_dirs, register_configs
    from bamba_ft.jobs import train

    register_configs()
    with initialize_config_dir(config_dir=str(config_dirs()[0]), version_base="1.3"):
        cfg = to_run_config(compose("train", overrides=[*overrides, f"output_dir={run}"]))
    environ = dict(os.environ)
    try:
        train.run(cfg)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    return run


def _held(proc: subprocess.CompletedProcess) -> list[tuple[int, int]]:
    """(parameters this rank holds, parameters of the model) from each rank's log line."""
    found = re.findall(r"this rank holds ([\d,]+) of ([\d,]+) parameters", proc.stdout + proc.stderr)
    return [(int(h.replace(",", "")), int(f.replace(",", ""))) for h, f in found]


@pytest.mark.slow
def test_fsdp_lora_on_two_ranks_resumed_on_one_equals_one_rank_accumulating_two(tmp_path: Path) -> None:
    """FSDP2 over two gloo ranks for 2 steps, then resumed from its sharded checkpoint on one rank accumulating 2
    batches, to step 4: the adapter of one process accumulating 2 batches for 4 steps."""
    run, lora = tmp_path / "fsdp", [*FSDP, "trainer.gradient_clip_val=null"]
    first = cli(_with(*lora, "trainer.devices=2", "trainer.max_steps=2", f"hydra.run.dir={run}"), cwd=tmp_path,
                timeout=600)
    held = _held(first)  # each rank holds half of every weight; neither built the whole model (meta, then shards)
    assert len(held) == 2 and sum(h for h, _ in held) == held[0][1] and max(h for h, _ in held) < 0.55 * held[0][1]
    ckpt = run / "checkpoints" / "last.ckpt"
    assert is_sharded(ckpt) and len(list(ckpt.glob("*.distcp"))) == 2  # one file per rank
    reference = _train_here(tmp_path / "accumulated", _with(*lora[1:], "trainer.accumulate_grad_batches=2"))
    accumulated = load_file(reference / "adapter" / "adapter_model.safetensors")
    at_step_two = {k: torch.zeros_like(v) for k, v in accumulated.items()}  # the sharded checkpoint, in one process
    read_sharded(ckpt, {"model." + k.replace(".weight", ".default.weight"): v for k, v in at_step_two.items()})
    _train_here(run, _with(*lora, "trainer.devices=1", "trainer.accumulate_grad_batches=2", f"trainer.resume={run}"))
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert resumed.keys() == accumulated.keys()
    assert max(float((resumed[k] - accumulated[k]).abs().max()) for k in resumed) <= 1e-5
    val = [json.loads((r / "metrics.json").read_text())["train"]["last_val_loss"] for r in (run, tmp_path / "accumulated")]
    assert abs(val[0] - val[1]) <= 1e-5
    # and the comparison can fail: the adapter two steps earlier differs
    assert max(float((at_step_two[k] - accumulated[k]).abs().max()) for k in at_step_two) > 1e-3


@pytest.mark.slow
def test_fsdp_full_finetune_equals_accumulation_and_its_sharded_checkpoint_exports(tmp_path: Path) -> None:
    full = ["recipe=full", "trainer.max_steps=2", "optim.lr=1e-3", *FSDP[1:]]
    run = tmp_path / "fsdp"
    cli(_with(*full, FSDP[0], "trainer.devices=2", f"hydra.run.dir={run}"), cwd=tmp_path, timeout=600)
    _train_here(tmp_path / "accumulated", _with(*full, "trainer.accumulate_grad_batches=2"))
    sharded = load_file(run / "model" / "model.safetensors")  # gathered once to rank 0, saved as transformers does
    accumulated = load_file(tmp_path / "accumulated" / "model" / "model.safetensors")
    assert sharded.keys() == accumulated.keys()
    assert max(float((sharded[k] - accumulated[k]).abs().max()) for k in sharded) <= 1e-5
    base = load_file(Path(resolve_path("builtin:tiny")) / "model.safetensors")
    assert max(float((sharded[k] - base[k]).abs().max()) for k in sharded) > 1e-4  # it trained
    # what export reads from a run without model/: every rank's shards of last.ckpt, in one process
    model, _ = load_source(locate(str(run / "checkpoints" / "last.ckpt"), RunConfig()), torch.device("cpu"))
    state = model.state_dict()
    assert max(float((state[k] - sharded[k]).abs().max()) for k in sharded) == 0.0


def test_fewer_batches_than_ranks_is_an_error_not_zero_steps(builtin_tokenizer) -> None:  # noqa: ANN001
    from types import SimpleNamespace

    from bamba_ft.config.schema import DataConfig
    from bamba_ft.data.module import BambaDataModule
    from bamba_ft.errors import DataError

    dm = BambaDataModule(DataConfig(builtin_train_examples=40, builtin_val_examples=8), builtin_tokenizer)
    dm.prepare()
    dm.trainer = SimpleNamespace(global_rank=1, world_size=2)  # 40 short rows fill one 4096-token batch
    with pytest.raises(DataError, match=r"(?s)fewer batches than the 2 ranks.*Fix: lower data.max_tokens_per_batch"):
        dm.train_dataloader()
    dm.cfg.max_tokens_per_batch = 256
    assert len(dm.train_dataloader()) >= 1


@pytest.mark.slow
@pytest.mark.parametrize("to_group", [True, False], ids=["every-rank", "rank-1-only"])
def test_sigterm_stops_two_ranks_at_one_step_with_a_checkpoint(tmp_path: Path, to_group: bool) -> None:
    """SIGTERM to every process (scancel, a terminal's process group) or to one rank only: the ranks agree on one
    step, save it and exit 143. Before, each rank's Lightning handler ran a broadcast inside the signal handler,
    which paired with another rank's unrelated collective: the ranks hung (or failed in gloo)."""
    run = tmp_path / "run"
    args = [*RUN, "trainer.max_steps=400", "trainer.checkpoint_every_n_steps=2", "trainer.devices=2",
            "trainer.strategy=ddp", f"hydra.run.dir={run}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    out = tmp_path / "out.txt"
    with out.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "bamba_ft", *args], cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            while not (run / "checkpoints" / "last.ckpt").exists() and proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            if to_group:
                os.killpg(proc.pid, signal.SIGTERM)
            else:  # rank 1 is the launching process's child running the same command
                rank1 = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "bamba_ft"], capture_output=True,
                                       text=True).stdout.split()
                assert len(rank1) == 1, rank1
                os.kill(int(rank1[0]), signal.SIGTERM)
            status = proc.wait(timeout=120)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    assert status == 143, out.read_text()[-3000:]
    stopped = torch.load(run / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert 2 <= stopped["global_step"] < 400
    assert f"stopped at step {stopped['global_step']}" in out.read_text()
    if not to_group:
        return
    # the printed command continues it on both ranks
    resumed = cli([*args[:-1], f"trainer.max_steps={stopped['global_step'] + 2}", f"trainer.resume={run}",
                   f"hydra.run.dir={tmp_path / 'resumed'}"], cwd=tmp_path, timeout=600)
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["train"]["steps"] == stopped["global_step"] + 2, resumed.stdout[-2000:]


QUANT_METHODS = ["nf4", "int8", "int4", "fp8"]


def _wrap_quantized_base(rank: int, root: str) -> None:
    """For each method in turn, its own process group (and rendezvous file), as a run of that method has: the ranks
    wrap a quantized base in DDP and save its weights before and after. A method that raises records its traceback
    and the next one still runs, so each test reports its own method."""
    import traceback

    import torch.distributed as dist
    from torch import nn

    from bamba_ft.config.schema import OptimConfig, QuantConfig
    from bamba_ft.lit_module import BambaLitModule
    from bamba_ft.model.quant import dequantize_model, quantize_layer

    def base(method: str) -> nn.Module:  # every rank builds and quantizes the same base, as every rank of a run loads it
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 256, bias=False), nn.Linear(256, 256))
        assert quantize_layer(model, QuantConfig(method=method)) == 2
        return model

    for method in QUANT_METHODS:
        out = Path(root) / method
        dist.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
        try:
            model, quantized = base(method), base(method)
            torch.nn.parallel.DistributedDataParallel(BambaLitModule(model, OptimConfig()))  # as Lightning's DDP strategy
            weights = {}
            for name, m in (("before", quantized), ("after", model)):
                dequantize_model(m, torch.float32)
                weights[name] = [layer.weight.detach() for layer in m]
            torch.save(weights, out / f"{rank}.pt")
        except Exception:  # reported by the method's own test
            (out / f"{rank}.err").write_text(traceback.format_exc())
        finally:
            dist.destroy_process_group()


@pytest.fixture(scope="module")
def wrapped_quantized_bases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One pair of spawned ranks for every method: a spawn starts two interpreters that import torch, Lightning and
    torchao (about 6 s on two cores), the wrap itself takes a fraction of a second."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ddp_quantized")
    for method in QUANT_METHODS:
        (root / method).mkdir()
    mp.spawn(_wrap_quantized_base, args=(str(root),), nprocs=2)
    return root


@pytest.mark.parametrize("method", QUANT_METHODS)
def test_ddp_leaves_the_quantized_base_of_every_rank_as_quantized(wrapped_quantized_bases: Path, method: str) -> None:
    """DDP's start-up broadcast of rank 0's parameters took torchao's NF4 tensor through a re-quantization that moved
    every rank's base (rank 0's too, by 3e-7 here; 0.007 of the builtin model's validation loss after two QLoRA
    steps): the run's closing metrics scored a base that a reload of its adapter does not rebuild. int8 and int4
    tensors could not be broadcast at all (no `view`), nor float8 codes over gloo. The base must come out of the
    wrap bit for bit as quantized (tolerance 0)."""
    out = wrapped_quantized_bases / method
    for r in range(2):
        if (out / f"{r}.err").exists():
            pytest.fail(f"rank {r} failed:\n{(out / f'{r}.err').read_text()}")
    ranks = [torch.load(out / f"{r}.pt") for r in range(2)]
    for got in ranks:
        for before, after in zip(got["before"], got["after"], strict=True):
            assert torch.equal(before, after), float((before - after).abs().max())


@pytest.mark.parametrize("recipe", ["eval", "export"])
def test_eval_and_export_started_on_several_ranks_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 recipe: str) -> None:
    """torchrun or srun starting eval or export on several ranks ran all of it on each: the ranks evaluated the same
    rows and wrote the same results again, and an export's ranks removed each other's half-written copy or failed
    on the other's finished one (`export.output_dir exists`), so the command failed with an export written."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    args = {"eval": ["recipe=eval", "model=tiny", "trainer=cpu", "logger=none", "data.builtin_val_examples=8",
                     "eval.generate=false"],
            "export": ["recipe=export", f"export.checkpoint={tmp_path / 'run'}"]}[recipe]
    with pytest.raises(ConfigError, match=rf"(?s)recipe={recipe} runs in one process.*2 ranks.*Fix: start it without"):
        run_in_process(args, tmp_path / recipe)
    assert not (tmp_path / recipe / "metrics.json").exists()
    # srun's ranks, and a rank above 0 of a launcher that sets no world size (Lightning's own)
    assert runtime.launched_ranks({"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}) == 4
    assert runtime.launched_ranks({"LOCAL_RANK": "1"}) == 2
    assert runtime.launched_ranks({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0", "WORLD_SIZE": "1"}) == 1


UNEVEN = ["data.builtin_train_examples=40", "data.max_tokens_per_batch=256", "optim.scheduler=constant",
          "trainer.gradient_clip_val=null", "trainer.strategy=ddp"]  # 5 batches an epoch: 2 ranks leave one out


@pytest.mark.slow
def test_ddp_stopped_at_an_uneven_epochs_end_resumes_on_one_rank_as_on_two(tmp_path: Path) -> None:
    """Two ranks train 4 of an epoch's 5 batches (2 steps). Resumed from there on one rank accumulating 2, the run
    trained the batch the ranks had left out, as a step of its own, and went on one batch off the two ranks' plan;
    it goes on with the next epoch as the two ranks do."""
    run = tmp_path / "ddp"
    cli(_with(*UNEVEN, "trainer.devices=2", "trainer.max_steps=2", f"hydra.run.dir={run}"), cwd=tmp_path, timeout=600)
    _train_here(tmp_path / "one", _with(*UNEVEN, "trainer.devices=1", "trainer.accumulate_grad_batches=2",
                                        "trainer.max_steps=4", f"trainer.resume={run}"))
    cli(_with(*UNEVEN, "trainer.devices=2", "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'two'}"), cwd=tmp_path,
        timeout=600)
    one, two = (load_file(tmp_path / r / "adapter" / "adapter_model.safetensors") for r in ("one", "two"))
    assert max(float((one[k] - two[k]).abs().max()) for k in one) <= 1e-5


def test_one_ranks_checkpoint_at_an_uneven_epochs_end_resumes_on_two_ranks(builtin_tokenizer) -> None:  # noqa: ANN001
    """One rank accumulating 2 ends an epoch of 5 batches with a step of one: last.ckpt there, resumed on two ranks,
    was refused as written inside a step (the fix named last.ckpt, the file it was). The two ranks start the next
    epoch."""
    from types import SimpleNamespace

    from bamba_ft.config.schema import DataConfig
    from bamba_ft.data.module import BambaDataModule
    from bamba_ft.jobs.checkpoints import CONFIG_KEY, WORLD_KEY, resume_on_ranks

    dm = BambaDataModule(DataConfig(builtin_train_examples=40, builtin_val_examples=8, max_tokens_per_batch=256),
                         builtin_tokenizer)
    dm.prepare()
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)
    assert len(dm.make_plan(dm.train_set, shuffle=True, sharded=False)) == 5
    dm.load_state_dict({"epoch": 0, "batches_done": 5, "world_size": 1})
    assert dm._resume == {"epoch": 0, "batches_done": 2}  # all of each rank's share: the epoch is done
    config = asdict(RunConfig())
    config["trainer"]["accumulate_grad_batches"] = 2
    counts = {"ready": 5, "started": 5, "processed": 5, "completed": 4}
    ckpt = {WORLD_KEY: 1, CONFIG_KEY: config, "loops": {"fit_loop": {"epoch_loop.batch_progress": {
        "total": dict(counts), "current": dict(counts), "is_last_batch": True}}}}
    resume_on_ranks(ckpt, world_size=2, accumulate=1)
    assert ckpt["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["processed"] == 2
    # inside an epoch, a position two ranks cannot share is still refused
    with pytest.raises(ConfigError, match="cannot share evenly"):
        dm.load_state_dict({"epoch": 0, "batches_done": 3, "world_size": 1})


def test_torchrun_with_another_number_of_ranks_than_trainer_devices_is_refused_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --nproc-per-node 2 with trainer.devices=3: Lightning refused the mismatch only after the model and
    data had loaded, with a traceback and exit 1. It is refused with the config, naming both counts and the fix."""
    from hydra import compose, initialize_config_dir

    from bamba_ft.config.overrides import to_run_config
    from bamba_ft.config.store import config_dirs, register_configs

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    register_configs()
    with initialize_config_dir(config_dir=str(config_dirs()[0]), version_base="1.3"):
        composed = compose("train", overrides=[*_with("trainer.strategy=ddp", "trainer.devices=3"),
                                                        "output_dir=run"])
    with pytest.raises(ConfigError, match=r"(?s)trainer.devices=3 x trainer.num_nodes=1 make 3 ranks.*started 2 "
                                          r"processes.*Fix: trainer.devices=2"):
        to_run_config(composed)
    from bamba_ft.config.schema import launched_ranks_problem

    cfg = RunConfig()
    assert launched_ranks_problem(cfg, {}) is None  # no launcher
    assert launched_ranks_problem(cfg, {"WORLD_SIZE": "1"}) is None
    cfg.trainer.devices, cfg.trainer.num_nodes = 4, 2
    assert launched_ranks_problem(cfg, {"WORLD_SIZE": "8"}) is None
    assert "Fix: trainer.devices=2" in launched_ranks_problem(cfg, {"WORLD_SIZE": "4"})
    cfg.task = "bench"  # which sets up its ranks itself
    assert launched_ranks_problem(cfg, {"WORLD_SIZE": "4"}) is None
