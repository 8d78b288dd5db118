"""The plain PyTorch trainer on tiny real runs (resnet_lab/trainer.py, checkpoint.py, optim.py)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from resnet_lab.checkpoint import TrainState
from resnet_lab.spec import TrialConfig
from resnet_lab.trainer import EpochMetrics, derive_seed, fit, weighted_layers

TIMING_KEYS = ("epoch_time_s", "throughput_img_s")
SMALL = {"train_size": 256, "test_size": 64, "image_size": 16}


def config(**sections: Any) -> TrialConfig:
    base: dict[str, Any] = {
        "dataset": {"name": "synthetic", "synthetic": SMALL, "val_fraction": 0.25},
        "model": {"name": "resnet", "depth": 8, "width": 0.125},
        "trainer": {"epochs": 3, "batch_size": 32, "threads": 1},
    }
    for key, value in sections.items():
        replace = not isinstance(value, dict) or (key == "model" and "name" in value)  # another model: its own fields
        base[key] = value if replace else {**base.get(key, {}), **value}
    return TrialConfig.model_validate(base)


def without_timing(history: list[dict[str, float]]) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if k not in TIMING_KEYS} for h in history]


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Any:
    # Two test workers or a busy CI box: one thread keeps CPU timing stable and results bit-exact.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_memorizes_a_tiny_set() -> None:
    cfg = config(trainer={"epochs": 15, "lr": 3e-3, "early_stopping_patience": 0},
                 model={"name": "baseline_cnn", "width": 0.5, "dropout": 0.0},
                 dataset={"synthetic": {**SMALL, "train_size": 128, "noise": 0.3}})
    epochs: list[EpochMetrics] = []
    result = fit(cfg, epochs.append)
    losses = [e.metrics["train/loss"] for e in epochs]
    assert result.status == "completed" and len(epochs) == 15
    assert losses[-1] < 0.25 * losses[0]
    assert epochs[-1].metrics["train/acc"] >= 0.98
    assert epochs[-1].final and not any(e.final for e in epochs[:-1])


def test_reports_every_metric_per_epoch_and_final_metrics() -> None:
    epochs: list[EpochMetrics] = []
    result = fit(config(), epochs.append)
    for e in epochs:
        for key in ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s", "throughput_img_s",
                    "grad/ratio_first_last"):
            assert math.isfinite(e.metrics[key]), key
    grads = [k for k in epochs[0].metrics if k.startswith("grad/0")]
    model_layers = weighted_layers(__import__("resnet_lab.models", fromlist=["build_model"]).build_model(
        "resnet", depth=8, width=0.125))
    assert len(grads) == len(model_layers) == 8  # one per weighted layer, input to output
    assert grads[0].endswith(model_layers[0][0]) and grads[-1].endswith(model_layers[-1][0])
    first, last = epochs[0].metrics[grads[0]], epochs[0].metrics[grads[-1]]
    assert epochs[0].metrics["grad/ratio_first_last"] == pytest.approx(first / last)
    for key in ("test/acc", "test/loss", "params", "best_epoch"):
        assert key in result.metrics
    assert result.metrics["params"] == result.params > 0


def test_same_seed_gives_identical_metrics_and_other_seed_differs() -> None:
    a = fit(config(seed=7))
    b = fit(config(seed=7))
    c = fit(config(seed=8))
    assert without_timing(a.history) == without_timing(b.history)
    assert without_timing(a.history) != without_timing(c.history)


def test_seeds_are_split_by_purpose() -> None:
    seeds = {derive_seed(3, p) for p in ("weights", "order", "augment", "dropout")}
    assert len(seeds) == 4 and derive_seed(3, "order") == derive_seed(3, "order")


class StopAfter(Exception):
    pass


@pytest.mark.parametrize("recipe", ["paper", "fast"])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path: Path, recipe: str) -> None:
    cfg = config(trainer={"recipe": recipe, "epochs": 4, "batch_size": 32},
                 dataset={"augment": True, "synthetic": {**SMALL, "image_size": 20}})
    full = fit(cfg)

    def stop_after_two(e: EpochMetrics) -> None:
        if e.epoch == 2:
            e.state().save(tmp_path)
            raise StopAfter

    with pytest.raises(StopAfter):
        fit(cfg, stop_after_two)
    state = TrainState.load(tmp_path)  # weights_only=True inside
    assert state.epoch == 2 and state.config == cfg.to_flat()
    resumed_epochs: list[EpochMetrics] = []
    resumed = fit(cfg, resumed_epochs.append, resume=state)
    assert [e.epoch for e in resumed_epochs] == [3, 4]
    assert without_timing(resumed.history) == without_timing(full.history)
    assert resumed.metrics["test/acc"] == full.metrics["test/acc"]


def test_resuming_a_finished_run_trains_nothing(tmp_path: Path) -> None:
    cfg = config(trainer={"epochs": 2})
    fit(cfg, lambda e: e.state().save(tmp_path))
    calls: list[EpochMetrics] = []
    result = fit(cfg, calls.append, resume=TrainState.load(tmp_path))
    assert calls == [] and result.status == "completed" and "test/acc" in result.metrics


def test_divergence_ends_the_run_as_a_result_not_an_exception() -> None:
    # lr 10 with weight decay 1.0 multiplies every weight by -9 per step: float32 overflows within two epochs.
    cfg = config(model={"name": "baseline_cnn", "width": 0.25},
                 trainer={"epochs": 6, "batch_size": 8, "optimizer": "sgd", "lr": 10.0, "momentum": 0.0,
                          "weight_decay": 1.0, "schedule": "none"})
    epochs: list[EpochMetrics] = []
    result = fit(cfg, epochs.append)
    assert result.status == "diverged"
    assert len(epochs) < 6 and epochs[-1].final and epochs[-1].status == "diverged"
    assert result.metrics["diverged"] == 1.0 and not math.isfinite(result.metrics["train/loss"])


def test_early_stopping_on_val_loss_with_patience() -> None:
    # Labels drowned in noise: val loss stops improving after a few epochs while train loss keeps falling.
    cfg = config(model={"name": "baseline_cnn", "width": 0.5, "dropout": 0.0},
                 dataset={"synthetic": {**SMALL, "noise": 8.0}},
                 trainer={"epochs": 40, "lr": 3e-3, "early_stopping_patience": 2})
    result = fit(cfg)
    val = [h["val/loss"] for h in result.history]
    assert result.status == "early_stopped" and len(val) < 40
    assert len(val) - result.best_epoch == 2  # stopped exactly `patience` epochs after the best
    assert min(val) == val[result.best_epoch - 1] and all(v >= min(val) for v in val[result.best_epoch:])


def test_plateau_schedule_lowers_lr_when_val_loss_stalls() -> None:
    cfg = config(model={"name": "baseline_cnn", "width": 0.5, "dropout": 0.0},
                 dataset={"synthetic": {**SMALL, "noise": 8.0}},
                 trainer={"epochs": 12, "lr": 3e-3, "early_stopping_patience": 0, "plateau_patience": 1,
                          "plateau_factor": 0.5})
    lrs = [h["lr"] for h in fit(cfg).history]
    assert lrs[0] == pytest.approx(3e-3) and min(lrs) <= 1.5e-3


def test_fast_recipe_warms_up_then_anneals() -> None:
    cfg = config(trainer={"recipe": "fast", "epochs": 4, "batch_size": 32, "lr": 0.4, "warmup_epochs": 1.0})
    lrs = [h["lr"] for h in fit(cfg).history]
    assert lrs[0] == pytest.approx(0.4, rel=0.1)  # end of the warm-up epoch: at (one step past) the peak
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3]


@pytest.mark.parametrize(("epochs", "steps_per_epoch", "warmup_epochs"),
                         [(2, 1, 1.0), (3, 1, 1.0), (4, 10, 0.0), (1, 1, 1.0), (1, 2, 0.5), (10, 5, 1.0)])
def test_onecycle_runs_for_any_length_and_warm_up(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> None:
    # OneCycleLR divided by zero for warm-ups under 2 steps: warmup_epochs 0, or a fast-recipe run of a few steps.
    from resnet_lab.optim import build_scheduler

    tc = config(trainer={"recipe": "fast", "epochs": epochs, "lr": 0.2, "warmup_epochs": warmup_epochs}
                ).trainer.resolved()
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=tc.lr)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    total = epochs * steps_per_epoch
    lrs = [optimizer.param_groups[0]["lr"]]
    for _ in range(total - 1):  # the trainer steps the schedule after every optimizer step
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    assert all(0 < lr <= 0.2 * (1 + 1e-9) for lr in lrs)
    if total >= 3:  # a cycle: up to the peak, then down below the start
        assert max(lrs) == pytest.approx(0.2) and lrs[0] < 0.2 and lrs[-1] < lrs[0]


def test_fast_recipe_with_one_step_per_epoch_trains() -> None:
    cfg = config(trainer={"recipe": "fast", "epochs": 2, "batch_size": 512})  # 192 images: one step an epoch
    result = fit(cfg)
    assert result.status == "completed" and len(result.history) == 2


def test_fit_restores_the_callers_global_rng_and_threads() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    threads = torch.get_num_threads()
    fit(config(trainer={"epochs": 1, "threads": 2}))
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_grayscale_model_input_channels_follow_the_data() -> None:
    cfg = config(dataset={"synthetic": {**SMALL, "channels": 1}}, trainer={"epochs": 1})
    assert fit(cfg).status == "completed"
