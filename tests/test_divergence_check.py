"""The trainer's step-level NaN check (resnet_lab/trainer.py, DIVERGENCE_CHECK_STEPS): a diverged epoch stops at
the next check instead of running its remaining steps on NaN weights.

Every other test trains at most 25 steps per epoch, so the check (every 50 steps) never ran in any of them; here an
epoch has 192 steps and diverges long before step 50.
"""

from __future__ import annotations

import math

import torch

from resnet_lab.spec import TrialConfig
from resnet_lab.trainer import DIVERGENCE_CHECK_STEPS, EpochMetrics, fit


def test_a_diverging_epoch_stops_at_the_first_step_check_not_at_the_end_of_the_epoch() -> None:
    # lr 10 with weight decay 1.0 and no momentum overflows float32 within a few steps (as in test_reliability's
    # divergence test); batch 2 over 384 training images is 192 steps per epoch. schedule `none` is a per-step
    # LambdaLR, so the scheduler's step count is the number of optimizer steps the epoch took.
    cfg = TrialConfig.model_validate({
        "dataset": {"name": "synthetic", "val_fraction": 0.25,
                    "synthetic": {"train_size": 512, "test_size": 32, "image_size": 8}},
        "model": {"name": "baseline_cnn", "width": 0.25},
        "trainer": {"epochs": 3, "batch_size": 2, "optimizer": "sgd", "lr": 10.0, "momentum": 0.0,
                    "weight_decay": 1.0, "schedule": "none", "threads": 1, "device": "cpu"},
    })
    steps_per_epoch = int(512 * 0.75) // 2
    assert steps_per_epoch > 2 * DIVERGENCE_CHECK_STEPS  # the check must have room to cut the epoch short
    epochs: list[tuple[EpochMetrics, int]] = []
    threads = torch.get_num_threads()
    try:
        result = fit(cfg, lambda e: epochs.append((e, e.state().scheduler["last_epoch"])))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "diverged"
    assert len(epochs) == 1, "a diverged run ends after the epoch it diverged in"
    metrics, steps = epochs[0]
    assert math.isnan(metrics.metrics["train/loss"]) or math.isinf(metrics.metrics["train/loss"])
    assert metrics.final and metrics.status == "diverged" and metrics.metrics["diverged"] == 1.0
    # Stopped at the first check after the loss went non-finite: 50 steps, not the epoch's 192.
    assert steps == DIVERGENCE_CHECK_STEPS, f"took {steps} steps of {steps_per_epoch}"


def test_a_healthy_epoch_runs_every_step() -> None:
    # The same run at a sane lr: the check passes and the epoch takes all 192 steps (the counter above is real).
    cfg = TrialConfig.model_validate({
        "dataset": {"name": "synthetic", "val_fraction": 0.25,
                    "synthetic": {"train_size": 512, "test_size": 32, "image_size": 8}},
        "model": {"name": "baseline_cnn", "width": 0.25},
        "trainer": {"epochs": 1, "batch_size": 2, "optimizer": "sgd", "lr": 0.01, "momentum": 0.0,
                    "schedule": "none", "threads": 1, "device": "cpu"},
    })
    steps: list[int] = []
    threads = torch.get_num_threads()
    try:
        result = fit(cfg, lambda e: steps.append(e.state().scheduler["last_epoch"]))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "completed" and steps == [int(512 * 0.75) // 2]
