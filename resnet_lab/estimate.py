"""What a sweep will cost before it runs (`python sweep.py SPEC --dry-run --estimate`).

Per cell: the epochs its trials run at most and, with ASHA, the epochs expected when each rung keeps 1/rf of the
trials that reach it; the seconds one epoch takes, from earlier runs of the same cell in MLflow (their logged
`epoch_time_s`, the whole epoch: train, eval, checkpoint) when the tracking store has them, else from timing a few
training steps of the cell's model on synthetic tensors of the dataset's shape (no data is loaded) on the device the
trials use; then device-hours (one trial's resources for an hour) and wall time at the sweep's concurrency.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

from resnet_lab.spec.cells import Cell, trials_in
from resnet_lab.spec.datasets import FILE_DATASETS
from resnet_lab.spec.load import LoadedSpec
from resnet_lab.spec.sweep import AshaConfig, SweepSpec, asha_rungs

WARMUP_STEPS = 3
TIMED_STEPS = 5


def expected_epochs(max_epochs: int, rungs: Sequence[int], reduction_factor: int) -> float:
    """Epochs one trial runs on average under ASHA when each rung keeps exactly 1/rf of the trials reaching it.

    Every trial runs to the first rung; a fraction (1/rf)^k passes the k-th rung and runs on to the next rung (or
    to `max_epochs` after the last one). Without rungs (grace period >= max_epochs) every trial runs max_epochs."""
    rungs = [r for r in rungs if r < max_epochs]
    if not rungs:
        return float(max_epochs)
    total, kept = float(rungs[0]), 1.0
    for i, rung in enumerate(rungs):
        kept /= reduction_factor
        total += kept * ((rungs[i + 1] if i + 1 < len(rungs) else max_epochs) - rung)
    return total


@dataclass(frozen=True)
class CellEstimate:
    """One cell's cost."""

    label: str
    trials: int
    confirm_trials: int  # confirm-stage trials always run their full budget (tune/schedule.py)
    epochs_max: int  # every trial to its full budget
    epochs_expected: float  # with ASHA's early stopping (= epochs_max without a scheduler)
    epoch_s: float  # seconds per epoch of one trial
    source: str  # "measured (N runs)" or "timed (N steps)"
    timed_epoch_s: float | None = None  # the step timing (train + eval), also when measured times were used
    measured_work_s: float | None = None  # measured train_time_s + eval_time_s per epoch: what the timing predicts

    @property
    def device_hours(self) -> float:
        return self.epochs_expected * self.epoch_s / 3600


def cell_epochs(spec: SweepSpec, cell: Cell) -> tuple[int, int, int, float]:
    """(trials, confirm trials, epochs at most, epochs expected with ASHA) of one cell."""
    trials = trials_in(spec, cell)
    confirm = len(spec.confirm.seeds) if spec.confirm else 0
    budget = spec.trainer.epochs
    searched = trials - confirm
    if isinstance(spec.scheduler, AshaConfig):
        max_t = min(budget, spec.scheduler.max_t or budget)  # ASHA stops every trial at max_t
        per_trial = expected_epochs(max_t, asha_rungs(spec.scheduler, max_t), spec.scheduler.reduction_factor)
        searched_max = max_t
    else:
        per_trial, searched_max = float(budget), budget
    return (trials, confirm, searched * searched_max + confirm * budget, searched * per_trial + confirm * budget)


def data_sizes(cell: Cell) -> tuple[int, int, int]:
    """(training images per epoch, validation images, image side) of a cell's dataset, without loading it."""
    ds = cell.base.dataset
    if ds.name == "synthetic":
        n, side = ds.synthetic.train_size, ds.synthetic.image_size
    elif ds.name in FILE_DATASETS:
        n, side = FILE_DATASETS[ds.name].train_size, FILE_DATASETS[ds.name].image_size
    else:  # an image folder: count its training images (files under train/<class>/)
        from pathlib import Path

        root = Path(ds.root or ".") / "train"
        n = sum(1 for p in root.glob("*/*") if p.is_file()) if root.is_dir() else 0
        side = ds.folder_image_size
    kept = min(n, ds.subset) if ds.subset is not None else n
    n_val = max(1, round(kept * ds.val_fraction))
    return max(1, kept - n_val), n_val, side


def time_epoch(cell: Cell, device: str, threads: int) -> float:
    """Seconds one epoch of the cell's model takes: WARMUP_STEPS + TIMED_STEPS training steps and as many
    evaluation batches at the recipe's batch size on random tensors of the dataset's shape, scaled to the epoch."""
    import torch
    import torch.nn.functional as F

    from resnet_lab.models.matching import data_shape
    from resnet_lab.models.registry import build_model
    from resnet_lab.optim import build_optimizer

    cfg = cell.base
    tc = cfg.trainer.resolved()
    channels, classes = data_shape(cfg)
    n_train, n_val, side = data_sizes(cell)
    batch = min(tc.batch_size, n_train)
    dev = torch.device(device)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # a trial gets resources.cpu threads (Ray sets OMP_NUM_THREADS)
    try:
        torch.manual_seed(0)
        model = build_model(cfg.model.name, num_classes=classes, in_channels=channels,
                            **cfg.model.build_kwargs(tc.dropout)).to(dev)
        fmt = torch.channels_last if tc.channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        optimizer = build_optimizer(model, tc, dev)
        x = torch.randn(batch, channels, side, side, device=dev).contiguous(memory_format=fmt)
        y = torch.randint(0, classes, (batch,), device=dev)

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()

        def forward() -> None:
            with torch.no_grad():
                model(x)

        def timed(fn: object) -> float:
            for _ in range(WARMUP_STEPS):
                fn()  # type: ignore[operator]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            for _ in range(TIMED_STEPS):
                fn()  # type: ignore[operator]
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return (time.perf_counter() - start) / TIMED_STEPS

        model.train()
        train_s = timed(step) * math.ceil(n_train / batch)
        model.eval()
        eval_s = timed(forward) * math.ceil(n_val / batch)
        return train_s + eval_s
    finally:
        torch.set_num_threads(previous)


def measured_epoch_s(uri: str, experiment: str, labels: Sequence[str]) -> dict[str, tuple[float, float, int]]:
    """{cell label: (median epoch_time_s, median train_time_s + eval_time_s, runs)} over every logged epoch of the
    earlier trial runs of those cells in MLflow: one search per cell, one batched history read per key."""
    from mlflow.tracking import MlflowClient

    from resnet_lab.tracking.query import _bulk_history, _search
    from resnet_lab.tracking.writer import TAG_CELL, TAG_ROLE, quiet_mlflow

    quiet_mlflow()
    if uri.startswith("sqlite:///") and not os.path.exists(uri[len("sqlite:///"):].split("?", 1)[0]):
        return {}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {}
    out: dict[str, tuple[float, float, int]] = {}
    for label in labels:
        runs = _search(client, exp.experiment_id, f"tags.`{TAG_CELL}` = '{label}' and tags.`{TAG_ROLE}` = 'trial'")
        ids = [r.info.run_id for r in runs if "epoch_time_s" in r.data.metrics]
        if not ids:
            continue
        series = {}
        for key in ("epoch_time_s", "train_time_s", "eval_time_s"):
            bulk = _bulk_history(client, ids, key)
            if bulk is None:  # no batched read: the latest (last epoch's) values
                bulk = {r.info.run_id: {0: r.data.metrics[key]} for r in runs if key in r.data.metrics}
            series[key] = bulk
        epoch = [v for run in series["epoch_time_s"].values() for v in run.values() if math.isfinite(v)]
        work = [v + series["eval_time_s"].get(rid, {}).get(step, 0.0)
                for rid, run in series["train_time_s"].items() for step, v in run.items() if math.isfinite(v)]
        if epoch:
            out[label] = (statistics.median(epoch), statistics.median(work) if work else math.nan, len(ids))
    return out


def last_sweep_wall_s(uri: str, experiment: str, spec_name: str) -> float | None:
    """Wall seconds of the newest finished sweep of this spec in the store (its parent run), if any."""
    from resnet_lab.tracking.query import SweepNotFound, list_sweeps

    try:
        sweeps = list_sweeps(uri, experiment)
    except SweepNotFound:
        return None
    for parent in sweeps:
        if parent.status == "FINISHED" and parent.name.startswith(f"{spec_name}-"):
            from mlflow.tracking import MlflowClient

            end = MlflowClient(uri).get_run(parent.run_id).info.end_time
            return (end - parent.start_ms) / 1000 if end else None
    return None


def concurrency(spec: SweepSpec, total_trials: int, max_concurrent: int | None) -> tuple[int, str]:
    """Trials at once: --max-concurrent, else the spec's max_concurrent, else what fits on this machine."""
    if max_concurrent or spec.max_concurrent:
        n = int(max_concurrent or spec.max_concurrent)  # type: ignore[arg-type]
        return max(1, min(n, total_trials)), "max_concurrent"
    fits = int((os.cpu_count() or 1) // spec.resources.cpu)
    why = f"{os.cpu_count()} CPUs / {spec.resources.cpu:g} per trial"
    if spec.resources.gpu > 0:
        import torch

        gpus = torch.cuda.device_count()
        fits = min(fits, int(gpus // spec.resources.gpu))
        why += f", {gpus} GPUs / {spec.resources.gpu:g} per trial"
    return max(1, min(fits, total_trials)), f"fits on this machine ({why})"


def trial_device(spec: SweepSpec) -> str:
    """Where the trials train: CUDA when they ask for a GPU and one is visible (or trainer.device says so)."""
    wanted = spec.trainer.device
    if wanted != "auto":
        return wanted
    if spec.resources.gpu > 0:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def estimate(loaded: LoadedSpec, uri: str | None = None, time_steps: bool = True) -> list[CellEstimate]:
    """Every cell's estimate; measured epoch times from `uri` when it has runs of the cell, else timed steps."""
    spec = loaded.spec
    measured = measured_epoch_s(uri, spec.experiment_name, [c.label for c in loaded.cells]) if uri else {}
    device, threads = trial_device(spec), max(1, int(spec.resources.cpu))
    out = []
    for cell in loaded.cells:
        trials, confirm, most, expected = cell_epochs(spec, cell)
        timed = time_epoch(cell, device, threads) if time_steps or cell.label not in measured else None
        work = None
        if cell.label in measured:
            seconds, work, runs = measured[cell.label]
            source = f"measured ({runs} runs)"
        else:
            seconds, source = float(timed or 0.0), f"timed ({TIMED_STEPS} steps, {device})"
        out.append(CellEstimate(cell.label, trials, confirm, most, expected, seconds, source, timed, work))
    return out


# What a sweep costs beyond its trials' epochs, measured by benchmarks/scaling.py on a 2-CPU VM (SQLite, trials of
# ~0.6 s): Ray's actor reuse, MLflow's run creation and end, checkpoints, the trial's data set-up, per trial per slot,
# plus Ray start-up, preflight and shutdown. On the idle machine with write-behind MLflow (2 Dec 2026): 0.78 s at 50
# trials and 0.41 s at 200, and 30-32 s; with 0.6 s and 30 s the estimate (recomputed from those runs' figures) is
# 0.89 and 1.08 of the actual wall time.
# (The 1 Dec runs beside a test suite, with synchronous writes, came to 1.6 s at 200 trials and 0.6 s at 1,000.)
# With a trial's writes sent as one request (later on 2 Dec): 0.32 s at 200 trials, 2 at a time, and the estimate
# 0.95-1.09 of the wall time as run by the benchmark; 1 at a time (a core left to the driver) it came to 1.35-1.42:
# this constant is the cost when the driver shares the cores with the trials. With checkpoints by time (third
# session of 2 Dec): 1.03-1.20 from 50 to 1,000 trials at 2 at a time, 1.30-1.47 at 1 at a time, 1.03 on the
# quick start.
TRIAL_OVERHEAD_S = 0.6
STARTUP_S = 30.0


def print_estimate(loaded: LoadedSpec, uri: str | None, max_concurrent: int | None = None) -> None:
    """The `--estimate` table and totals."""
    from resnet_lab import console

    spec = loaded.spec
    cells = estimate(loaded, uri)
    rows = []
    for c in cells:
        # the step timing against the same work measured in the earlier runs (train + eval, per epoch)
        ratio = f"{c.timed_epoch_s / c.measured_work_s:.2f}" if c.timed_epoch_s and c.measured_work_s else "-"
        rows.append([c.label, str(c.trials), str(c.epochs_max), f"{c.epochs_expected:.1f}", f"{c.epoch_s:.1f}",
                     c.source, ratio, f"{c.device_hours:.3f}"])
    console.print_table(f"estimate for sweep '{spec.name}'",
                        ["cell", "trials", "epochs max", "epochs expected", "s/epoch", "from",
                         "timed/measured train+eval", "device-h"], rows)
    total_trials = sum(c.trials for c in cells)
    hours = sum(c.device_hours for c in cells)
    hours_max = sum(c.epochs_max * c.epoch_s for c in cells) / 3600
    slots, why = concurrency(spec, total_trials, max_concurrent)
    training = hours * 3600 / slots
    wall = training + total_trials * TRIAL_OVERHEAD_S / slots + STARTUP_S
    console.info(f"total: {total_trials} trials, at most {sum(c.epochs_max for c in cells)} epochs, expected "
                 f"{sum(c.epochs_expected for c in cells):.1f}; {hours:.3f} device-hours expected ({hours_max:.3f} "
                 f"at most); wall about {_duration(wall)} at {slots} trials at once ({why}): "
                 f"{_duration(training)} of training, {TRIAL_OVERHEAD_S:g} s per trial of orchestration and "
                 f"{STARTUP_S:.0f} s to start, as measured on a 2-CPU machine (benchmarks/scaling.py)")
    if uri:
        actual = last_sweep_wall_s(uri, spec.experiment_name, spec.name)
        if actual:
            console.info(f"the last finished run of this sweep in {uri} took {_duration(actual)}: "
                         f"estimate/actual {wall / actual:.2f}")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
