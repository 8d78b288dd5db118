"""Optimizers and learning-rate schedules of the training recipes."""

from __future__ import annotations

import math

import torch
from torch import nn

from resnet_lab.spec import ResolvedTrainer

# Schedules stepped once per optimizer step; "plateau" is stepped once per epoch on val loss.
PER_STEP_SCHEDULES = ("onecycle", "cosine", "none")


def build_optimizer(model: nn.Module, tc: ResolvedTrainer, device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimizer; weight decay skips BN and bias parameters (Goyal et al. 2017)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernels (one pass over all parameters) exist for CUDA and, since torch 2.4, for CPU. On CPU torch's
    # default is the per-parameter for-loop: fused Adam steps 3.6x faster for resnet18 and 6.4x for baseline_cnn
    # here (1 thread; benchmarks/README.md).
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    if tc.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, nesterov=tc.nesterov and tc.momentum > 0,
                               **fused)
    if tc.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=tc.lr, **fused)
    # Adam applies weight decay as L2 in the gradient, as the reference study's Keras-style Adam did.
    return torch.optim.Adam(groups, lr=tc.lr, **fused)


Scheduler = torch.optim.lr_scheduler.LRScheduler | torch.optim.lr_scheduler.ReduceLROnPlateau


def build_scheduler(optimizer: torch.optim.Optimizer, tc: ResolvedTrainer, steps_per_epoch: int) -> Scheduler:
    """The recipe's schedule. Per-step schedules count optimizer steps; plateau counts epochs."""
    total = max(1, tc.epochs * steps_per_epoch)
    warmup = min(total - 1, round(tc.warmup_epochs * steps_per_epoch))
    if tc.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=tc.plateau_factor, patience=tc.plateau_patience)
    if tc.schedule == "onecycle":
        if total < 3:  # too short for a cycle (OneCycleLR needs >= 2 warm-up steps and one after): constant lr
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        # OneCycleLR divides by (pct_start x total - 1): a warm-up of 0 or 1 steps raised ZeroDivisionError at the
        # first step (warmup_epochs: 0, or a run of a few steps). The shortest valid warm-up is 2 steps.
        pct = min(max(warmup, 2), total - 1) / total
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=tc.lr, total_steps=total, pct_start=pct, anneal_strategy="linear",
            cycle_momentum=False)
    if tc.schedule == "cosine":
        def cosine_with_warmup(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
