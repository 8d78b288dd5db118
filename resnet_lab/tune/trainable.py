"""The Ray Tune trainable: a few lines around `fit()` (as in Ray's mnist_pytorch example)."""

from __future__ import annotations

import base64
import functools
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
from ray import tune

from resnet_lab.outcome import OUTCOME_KEY
from resnet_lab.spec import DatasetConfig, ResolvedTrainer, TrialConfig
from resnet_lab.spec.trial import with_values

if TYPE_CHECKING:  # torch is imported in trial processes only
    from resnet_lab.trainer import Placement

# Keys the searcher adds to a trial's config besides searched values (read them through TrialMeta).
META_KEYS = ("cell", "stage", "seed")


@dataclass(frozen=True)
class TrialMeta:
    """Which cell, stage and seed a trial belongs to: the searcher's keys of Ray's config, read in one place."""

    cell: str
    stage: str  # "search" or "confirm"
    seed: int

    @classmethod
    def of(cls, config: Mapping[str, Any]) -> TrialMeta:
        return cls(str(config["cell"]), str(config.get("stage", "search")), int(config["seed"]))

    def as_config(self) -> dict[str, Any]:
        """The keys the searcher puts in a trial's config."""
        return {"cell": self.cell, "stage": self.stage, "seed": self.seed}

# Result key of a trial process that continued from a checkpoint: the checkpoint's epoch (the callback tags the run).
RESUMED_KEY = "resumed_from_epoch"
# Result key of a trial's final epoch: files for its run, {name: base64}; the driver's callback uploads and drops it.
ARTIFACTS_KEY = "artifacts"


def trial_config(base: TrialConfig, config: dict[str, Any], cpus: float | None = None) -> TrialConfig:
    """The typed config of one trial: its cell's base config with the searched values and seed applied."""
    values = {k: v for k, v in config.items() if k not in META_KEYS}
    merged = with_values(base.model_dump(exclude_none=True), values)
    merged["seed"] = TrialMeta.of(config).seed
    if cpus and "threads" not in merged["trainer"]:
        merged["trainer"]["threads"] = max(1, math.floor(cpus))  # use the cores Ray gave us, no more
    return TrialConfig.model_validate(merged)


def placement_of(tc: ResolvedTrainer, gpu: float) -> Placement:
    """The trainer's `Placement` from what Ray assigned this process: CUDA only with GPUs of its own.

    Ray 2.60 leaves every GPU visible to a task or actor that asked for none (no CUDA_VISIBLE_DEVICES="" unless
    RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1), so `torch.cuda.is_available()` would put every gpu-0 trial on cuda:0.
    With GPUs assigned, Ray sets CUDA_VISIBLE_DEVICES to them, and "cuda" (the current device) is the first.
    """
    from resnet_lab.trainer import Placement

    if tc.device == "cpu" or not ray.get_gpu_ids():
        if tc.device == "cuda":  # the spec check refuses this before a sweep starts; a hand-built trial may not
            raise RuntimeError("trainer.device is 'cuda' but Ray assigned this trial no GPU; set resources.gpu")
        return Placement("cpu")
    return Placement("cuda", gpu_fraction=min(gpu, 1.0))


@functools.lru_cache(maxsize=2)
def _cached_data(dataset: DatasetConfig, device: str) -> Any:
    """With reuse_actors, consecutive trials in one worker share the loaded dataset (seconds for CIFAR)."""
    from resnet_lab.data import load_data

    return load_data(dataset, device)


# `checkpoint_every: auto`: a checkpoint once the training since the last one has taken at least this many times
# what the last checkpoint took (so at most ~1/AUTO_COST_RATIO of a trial's time goes to checkpoints), and never
# more often than every AUTO_MIN_INTERVAL_S; due at the first epoch's end past that interval, so a retry repeats
# the interval or one epoch, whichever is longer. Ray Tune's CheckpointConfig counts
# iterations only (`checkpoint_frequency`), which cannot tell a 0.2 s epoch of a small CNN on a local disk from a
# minute-long ResNet epoch whose checkpoint goes to S3; hence a clock of our own.
AUTO_COST_RATIO = 20.0
AUTO_MIN_INTERVAL_S = 10.0


class CheckpointClock:
    """Which epoch's report carries a checkpoint: the last one always (its state is the trial's result: `model.init`
    of a transfer sweep reads it), and every `every` epochs, or with "auto" by time (see AUTO_COST_RATIO)."""

    def __init__(self, every: int | str, now: Callable[[], float] = time.monotonic) -> None:
        self.every, self._now = every, now
        self._since = now()  # the process's start: what a retry of it would repeat
        self._cost_s = 0.0  # what the last checkpoint (state, save, upload through Tune) took

    def due(self, epoch: Any) -> bool:
        if epoch.status is not None:
            return True
        if self.every != "auto":
            return bool(epoch.epoch % int(self.every) == 0)
        return self._now() - self._since >= max(AUTO_MIN_INTERVAL_S, AUTO_COST_RATIO * self._cost_s)

    @contextmanager
    def saving(self) -> Iterator[None]:
        """Around a checkpoint's save and report: its cost sets the next interval, and the interval restarts."""
        start = self._now()
        yield
        self._since = self._now()
        self._cost_s = self._since - start


def train_trial(config: dict[str, Any], bases: dict[str, TrialConfig], checkpoint_every: int | str = "auto") -> None:
    """Run one trial; report every epoch, with a checkpoint when `CheckpointClock` says one is due and at the last
    epoch; continue from Tune's checkpoint when restored."""
    # torch-bearing imports stay inside: the driver imports this module too and never needs torch.
    from resnet_lab.checkpoint import TrainState
    from resnet_lab.trainer import fit

    resources = tune.get_context().get_trial_resources()
    cpus = resources.required_resources.get("CPU") if resources else None
    gpus = resources.required_resources.get("GPU", 0.0) if resources else 0.0
    cfg = trial_config(bases[TrialMeta.of(config).cell], config, cpus)
    resume = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = TrainState.load(directory)

    node_id = ray.get_runtime_context().get_node_id()  # node_ip cannot tell apart nodes that share a host
    clock = CheckpointClock(checkpoint_every)

    def report(epoch: Any) -> None:
        metrics = {**epoch.metrics, "node_id": node_id}
        if epoch.status is not None:  # the last report: how the trial ended, as the trainer decided
            metrics[OUTCOME_KEY] = str(epoch.status)
        if resume is not None:  # this process continued from a checkpoint: the record says from which epoch
            metrics[RESUMED_KEY] = resume.epoch
        if epoch.artifacts:  # analysis figures (resnet_lab.analysis), a few tens of KB
            metrics[ARTIFACTS_KEY] = {name: base64.b64encode(data).decode("ascii")
                                      for name, data in epoch.artifacts.items()}
        if not clock.due(epoch):
            tune.report(metrics)
            return
        with clock.saving(), tempfile.TemporaryDirectory() as directory:
            epoch.state().save(directory)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))

    placement = placement_of(cfg.trainer.resolved(), gpus)
    fit(cfg, report, resume=resume, data=_cached_data(cfg.dataset, placement.device), placement=placement)
