"""Data-parallel trials: one Tune trial drives a Ray Train `TorchTrainer` over `resources.workers` workers.

Ray 2.60 runs Train V2, which refuses `Tuner(TorchTrainer(...))`; the supported pattern is a Tune function that
builds the TorchTrainer with `TuneReportCallback` and calls `.fit()`. Ray Train sets up the process group (NCCL on
GPU, gloo on CPU) and each worker's device; `fit()` sees an initialised process group and shards its data.
Metric names, checkpoints and resume are those of single-worker trials.
"""

from __future__ import annotations

import tempfile
from typing import Any

from ray import tune

from resnet_lab.outcome import OUTCOME_KEY
from resnet_lab.spec import TrialConfig
from resnet_lab.tune.trainable import RESUMED_KEY, CheckpointClock, TrialMeta, placement_of, trial_config

# The driver function only waits on its workers; Tune refuses a zero-resource request, so ask for a little memory.
DRIVER_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}


def _worker_loop(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the same `fit()`, reporting through ray.train."""
    import ray.train

    from resnet_lab.checkpoint import TrainState  # torch: imported where training happens, not in the driver
    from resnet_lab.trainer import Placement, fit

    cfg: TrialConfig = trial_config(loop_config["base"], loop_config["config"], loop_config["cpus"])
    rank = ray.train.get_context().get_world_rank()
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = TrainState.load(directory)

    clock = CheckpointClock(loop_config["checkpoint_every"])  # rank 0's decides: it alone writes checkpoints

    def report(epoch: Any) -> None:
        metrics = dict(epoch.metrics)
        if epoch.status is not None:  # the last report: how the trial ended, as the trainer decided
            metrics[OUTCOME_KEY] = str(epoch.status)
        if resume is not None:  # as single-worker trials: the record says from which epoch this run continued
            metrics[RESUMED_KEY] = resume.epoch
        # Every worker reports (Train waits for all); rank 0 alone writes the checkpoint, when one is due.
        if rank != 0 or not clock.due(epoch):
            ray.train.report(metrics)
            return
        with clock.saving(), tempfile.TemporaryDirectory() as directory:
            epoch.state().save(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    # Ray Train gave this worker a GPU (ScalingConfig use_gpu) or none: a gpu-0 worker on a GPU node sees every GPU.
    placement = Placement("cpu")
    if placement_of(cfg.trainer.resolved(), loop_config["gpu"]).device != "cpu":
        import ray.train.torch

        placement = Placement(str(ray.train.torch.get_device()))  # this worker's own GPU (local rank)
    fit(cfg, report, resume=resume, placement=placement)


def train_trial_ddp(config: dict[str, Any], bases: dict[str, TrialConfig], workers: int, cpu: float, gpu: float,
                    storage: str, checkpoint_every: int | str = "auto") -> None:
    """A Tune trial that trains data-parallel; a retried trial resumes Train's run of the same name."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    experiment = tune.get_context().get_experiment_name()
    trainer = TorchTrainer(
        _worker_loop,
        train_loop_config={"config": config, "base": bases[TrialMeta.of(config).cell], "cpus": cpu, "gpu": gpu,
                           "checkpoint_every": checkpoint_every},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpu > 0,
                                               resources_per_worker={"CPU": cpu, "GPU": gpu}),
        run_config=ray.train.RunConfig(
            name=f"{experiment}-ddp-{trial_id}", storage_path=storage, callbacks=[TuneReportCallback()],
            # Train's own checkpoints (Tune only sees their path), so not CheckpointPruner's: Train V2's checkpoint
            # manager writes the snapshot naming the new checkpoint before it deletes the old one
            # (`_save_state_and_delete_old_checkpoints`, Ray 2.60), so keeping one is safe where Tune's
            # num_to_keep=1 was not. A worker lost mid-trial fails this run; Tune retries the trial (max_failures)
            # and the TorchTrainer of the same name resumes from that snapshot's checkpoint.
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
    )
    trainer.fit()
