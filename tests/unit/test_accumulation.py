"""An optimizer step's gradient is the mean loss over every target token of the step, whatever the number of
micro-batches it accumulates and however the tokens fall between them: a step of two batches equals one batch
holding both (float64)."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from bamba_ft.config.schema import OptimConfig
from bamba_ft.data.packing import collate_packed
from bamba_ft.data.tokenize import IGNORE_INDEX
from bamba_ft.lit_module import BambaLitModule
from bamba_ft.model.objective import loss_sum_and_count
from tests.unit.test_objective import lora_model as objective_lora_model

X = IGNORE_INDEX


def batch(seed: int, lengths: list[tuple[int, int]]) -> dict:
    """A packed row of sequences (length, prompt tokens without loss)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n, prompt in lengths:
        ids = torch.randint(1, 256, (n,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [X] * prompt + ids[prompt:]})
    return collate_packed(rows)


# About the same tokens per row, very different loss tokens: 35 targets, 3 targets, 19 targets.
BATCHES = [batch(0, [(20, 2), (20, 3)]), batch(1, [(20, 18), (20, 19)]), batch(2, [(20, 10), (20, 10)])]


def lora_model() -> torch.nn.Module:
    return objective_lora_model("sdpa")  # float64, LoRA with non-zero B on every target


def token_mean_grads(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The reference: the gradient of the summed loss of `batches` over their target tokens, as one batch."""
    model.zero_grad()
    sums, counts = zip(*(loss_sum_and_count(model, b) for b in batches))
    (sum(sums) / sum(counts)).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def trained_grads(batches: list[dict], steps: int, accumulate: int) -> dict[str, torch.Tensor]:
    """The gradients of the last of `steps` optimizer steps over `batches` (learning rate 0: the weights stay)."""
    return fit(batches, steps, accumulate)[0]


def fit(batches: list[dict], steps: int, accumulate: int) -> tuple[dict[str, torch.Tensor], float]:
    """(the gradients of the last of `steps` optimizer steps over `batches`, the train/loss logged last)."""
    model = lora_model()
    lit = BambaLitModule(model, OptimConfig(lr=0.0, warmup_steps=0, scheduler="constant"))
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="64-true", max_steps=steps,
                        accumulate_grad_batches=accumulate, gradient_clip_val=None, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, float(trainer.callback_metrics["train/loss"])


def assert_grads_close(got: dict, want: dict) -> None:
    """Within 1e-6 of each tensor's largest entry: the same gradient computed as sum / count or as a mean differs
    by 1.4e-7 of it here (measured), the tokens weighted otherwise by more than 0.1."""
    assert got.keys() == want.keys() and got
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6 * float(want[k].abs().max()),
                                   msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize("first", [0, 1], ids=["many-then-few", "few-then-many"])
def test_accumulated_step_equals_one_batch_of_its_tokens(first: int) -> None:
    batches = [BATCHES[first], BATCHES[1 - first]]
    want = token_mean_grads(lora_model(), batches)
    assert_grads_close(trained_grads(batches, steps=1, accumulate=2), want)
    # and the comparison can fail: the mean of the two batches' means weights the 3 loss tokens up by 35/3
    means = token_mean_grads(lora_model(), batches[:1])
    assert max(float((means[k] - want[k]).abs().max()) for k in want) > 1e-3


def test_a_short_last_step_of_an_epoch_is_the_mean_over_its_own_tokens() -> None:
    """3 batches in steps of 2: the second step holds one batch, whose gradient is not halved."""
    want = token_mean_grads(lora_model(), BATCHES[2:])
    assert_grads_close(trained_grads(BATCHES, steps=2, accumulate=2), want)


def test_one_batch_a_step_is_that_batch_mean() -> None:
    want = token_mean_grads(lora_model(), BATCHES[:1])
    assert_grads_close(trained_grads(BATCHES[:1], steps=1, accumulate=1), want)


def test_the_logged_train_loss_is_the_step_mean_over_its_tokens() -> None:
    """What train/loss (the curves, metrics.json's final_train_loss) reports of a step of two batches: the loss it
    trained on, not the last batch's alone."""
    model = lora_model()
    with torch.no_grad():
        sums, counts = zip(*(loss_sum_and_count(model, b) for b in BATCHES[:2]))
    want = float(sum(sums) / sum(counts))
    got = fit(BATCHES[:2], steps=1, accumulate=2)[1]
    assert abs(got - want) <= 1e-9 * want
    assert abs(float(sums[1] / counts[1]) - want) > 0.05  # the last batch's own mean is another number


def test_training_asks_for_the_router_aux_loss_and_validation_does_not(monkeypatch: pytest.MonkeyPatch) -> None:
    """An MoE config's load-balancing loss (output_router_logits) is part of what training minimizes, as in
    transformers' ForCausalLM; val/loss stays the next-token loss (tests/unit/test_families.py checks the values)."""
    from bamba_ft import lit_module

    asked: list[bool] = []
    monkeypatch.setattr(lit_module, "loss_sum_and_count",
                        lambda model, batch, router_aux=False: asked.append(router_aux) or (torch.ones(()), torch.ones(())))
    module = BambaLitModule(torch.nn.Linear(1, 1), OptimConfig())
    module({}, train=True)
    module({})
    assert asked == [True, False]


def test_the_logged_training_rate_counts_every_rank_s_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """train/tokens_per_sec (metrics.json's window_tokens_per_sec, beside tokens_per_sec over every rank's tokens)
    was rank 0's tokens alone: 1/N of the run's rate on N ranks. Here the other rank trained 3 times as many."""
    from types import SimpleNamespace

    import bamba_ft.lit_module as lit_module

    lit = BambaLitModule(torch.nn.Linear(2, 2), OptimConfig())
    reduced: list[float] = []

    def reduce(value: torch.Tensor, reduce_op: str) -> torch.Tensor:
        assert reduce_op == "sum"
        reduced.append(float(value))
        return value * 4

    trainer = SimpleNamespace(world_size=2, global_step=0, log_every_n_steps=1, strategy=SimpleNamespace(reduce=reduce))
    monkeypatch.setattr(BambaLitModule, "trainer", property(lambda self: trainer))
    logged: dict[str, float] = {}
    monkeypatch.setattr(lit, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    clock = iter([10.0, 12.0])
    monkeypatch.setattr(lit_module.time, "perf_counter", lambda: next(clock))
    batch = {"input_ids": torch.zeros(1, 100, dtype=torch.long)}
    lit.on_train_batch_end(None, batch, 0)  # the first batch starts the window
    lit._tokens += 100  # this rank's next batch, as training_step counts it
    lit.on_train_batch_end(None, batch, 1)
    assert reduced == [100.0]
    assert logged["train/tokens_per_sec"] == pytest.approx(400 / 2.0)


def test_the_logged_training_rate_leaves_out_validation_and_checkpoint_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """train/tokens_per_sec (metrics.json's window_tokens_per_sec) is the training rate: a validation after a logged
    step fell into the next window, so the step after each validation logged a fraction of the rate. Here 100
    tokens train in 2 s around a 4 s validation and a 1 s checkpoint: 50 tokens/s, not 100 / 7 s."""
    from types import SimpleNamespace

    import bamba_ft.lit_module as lit_module

    lit = BambaLitModule(torch.nn.Linear(2, 2), OptimConfig())
    trainer = SimpleNamespace(world_size=1, global_step=0, log_every_n_steps=1)
    monkeypatch.setattr(BambaLitModule, "trainer", property(lambda self: trainer))
    logged: dict[str, float] = {}
    monkeypatch.setattr(lit, "log", lambda name, value, **kw: logged.__setitem__(name, float(value)))
    now = [10.0]
    monkeypatch.setattr(lit_module.time, "perf_counter", lambda: now[0])
    batch = {"input_ids": torch.zeros(1, 100, dtype=torch.long)}
    lit.on_train_batch_end(None, batch, 0)  # the first batch starts the window at t=10
    lit.on_validation_start()
    now[0] = 14.0
    lit.on_validation_end()  # 4 s of validation
    lit._tokens += 100  # the next batch, as training_step counts it, trains until t=16
    lit.exclude_from_rate(1.0)  # and its step's checkpoint took 1 s more (StepCheckpoint)
    now[0] = 17.0
    lit.on_train_batch_end(None, batch, 1)
    assert logged["train/tokens_per_sec"] == pytest.approx(100 / 2.0, rel=1e-12)


def test_the_learning_rate_is_logged_once_per_optimizer_step_under_accumulation() -> None:
    """Lightning's LearningRateMonitor logs before every training batch of a logged step: with 2 accumulated batches
    the CSV and TensorBoard logs held each step's learning rate twice, under the same step."""
    from lightning.pytorch.loggers import Logger

    from bamba_ft.jobs.callbacks import StepLearningRateMonitor

    class Recorder(Logger):
        name, version = "recorder", 0
        logged: list[tuple[int, float]] = []

        def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
            self.logged += [(step, v) for k, v in metrics.items() if k.startswith("lr-")]

        def log_hyperparams(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            pass

    lit = BambaLitModule(lora_model(), OptimConfig(lr=1.0, warmup_steps=4, scheduler="constant"))
    recorder = Recorder()
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="64-true", max_steps=3, accumulate_grad_batches=2,
                        gradient_clip_val=None, logger=recorder, log_every_n_steps=1, callbacks=[StepLearningRateMonitor()],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(BATCHES[:2] * 3, batch_size=None))
    assert recorder.logged == [(0, 0.25), (1, 0.5), (2, 0.75)]  # warm-up: (step + 1) / 4 of lr 1
