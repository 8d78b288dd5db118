"""Run a whole sweep on Ray Tune: local Ray by default, or a cluster at `address`; resume an interrupted one."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

from resnet_lab import console
from resnet_lab.provenance import provenance
from resnet_lab.spec.load import LoadedSpec
from resnet_lab.spec.sweep import AshaConfig
from resnet_lab.tracking import TAG_OUTCOME, TAG_SPEC_HASH, SweepTracker, TrackingUnavailable
from resnet_lab.tune.callbacks import sweep_callbacks
from resnet_lab.tune.capacity import Capacity, concurrency_limit, describe, read_capacity, resource_problems
from resnet_lab.tune.checkpoints import CheckpointPruner
from resnet_lab.tune.ddp import DRIVER_RESOURCES, train_trial_ddp
from resnet_lab.tune.schedule import CellScheduler
from resnet_lab.tune.search import CellSearcher
from resnet_lab.tune.trainable import TrialMeta, train_trial


class PreflightError(Exception):
    """The sweep cannot start (unreachable cluster, resources no node has, nothing to resume, ...)."""


@dataclass(frozen=True)
class RunOptions:
    """How to run a sweep (CLI options), apart from the spec itself."""

    tracking_uri: str
    address: str | None = None
    storage: str | None = None  # overrides spec.storage
    max_concurrent: int | None = None  # overrides spec.max_concurrent
    ray_temp_dir: str | None = None
    resume: bool = False


@dataclass
class SweepOutcome:
    """What a sweep produced; `interrupted` when it stopped before every trial ended (resume it)."""

    name: str
    parent_run_id: str
    experiment_id: str
    experiment_dir: str
    planned: int
    outcomes: dict[str, int] = field(default_factory=dict)  # outcome -> count of child runs
    wall_s: float = 0.0
    interrupted: bool = False
    # Why MLflow could not be told how the sweep ended (the store stopped answering); its unsent writes are spooled
    # and `--resume` sends them. Empty when the store took every write.
    tracking_lost: str = ""

    @property
    def trials(self) -> int:
        """Child runs that ended with an outcome."""
        return sum(self.outcomes.values())


def storage_path(loaded: LoadedSpec, override: str | None) -> str:
    """Where Ray keeps trial state: --storage, else the spec's, else $RESNET_LAB_STORAGE (set on our cluster
    heads to the shared bucket), else ./ray_results; a URI as given, a local path made absolute."""
    storage = override or loaded.spec.storage or os.environ.get("RESNET_LAB_STORAGE") or "ray_results"
    return storage if "://" in storage else str(Path(storage).expanduser().absolute())


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds on an unreachable `host:port`: ray.init() itself waits minutes for a GCS that is not there."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return  # "auto" reads the local node's address file; Ray Client has its own timeout
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise PreflightError(f"Ray address '{address}' is not HOST:PORT (e.g. 127.0.0.2:6379) or 'auto'")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise PreflightError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def init_ray(address: str | None, temp_dir: str | None) -> None:
    """Connect to a cluster or start local Ray, with Ray's log noise kept out of the user's way."""
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Tune's automatic loggers include TensorBoardX: an import and an event-writer thread in the driver (~6% of its
    # CPU, profiled) for files nobody reads here (MLflow is the record). JSON and CSV are passed explicitly.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    # Ray's warnings still reach its session logs (/tmp/ray/session_*/logs); the console shows our view only.
    kwargs: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR,
                              "include_dashboard": False, "ignore_reinit_error": True}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_reachable(address)
    if temp_dir and not address:
        kwargs["_temp_dir"] = temp_dir
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, TimeoutError) as exc:
        raise PreflightError(f"cannot reach the Ray cluster at {address}: {exc}".rstrip()) from None


def check_resources(loaded: LoadedSpec) -> Capacity:
    """A trial asking for more than any node has, or can be launched with, would wait forever: refuse before
    launch. Nodes the autoscaler may add count (a head with 0 CPUs and GPU workers from 0 is the usual cluster)."""
    capacity = read_capacity()
    problems = resource_problems(loaded.spec.resources, capacity)
    if capacity.autoscaling and not capacity.launchable:
        # An autoscaler we cannot read (KubeRay's reads its node types from Kubernetes; or it runs on another
        # machine than this driver): nodes it launches may fit what no live node does.
        # Concurrency then comes from live nodes only: set max_concurrent in the spec (clusters/README.md).
        if problems:
            console.info(f"note: {'; '.join(problems)}. The cluster's autoscaler runs where its node types are not "
                         "readable from here: trials wait for nodes it launches (check `ray status` if none start)")
        return capacity
    if problems:
        raise PreflightError("; ".join(problems))
    if capacity.launchable:
        console.info(f"cluster: {len(capacity.live)} live node(s); {describe(capacity)}")
    return capacity


def concurrency(loaded: LoadedSpec, override: int | None, capacity: Capacity, total: int) -> int:
    """Trials at once: the option, else the spec, else as many as the cluster can grow to hold."""
    if override or loaded.spec.max_concurrent:
        return int(override or loaded.spec.max_concurrent)  # type: ignore[arg-type]
    limit = concurrency_limit(loaded.spec.resources, capacity, total)
    if capacity.autoscaling and not capacity.launchable:
        console.info(f"note: {limit} trial(s) at once, what the live nodes hold: the autoscaler's node types are not "
                     "readable from here, so set max_concurrent in the spec (or --max-concurrent) to what the full "
                     "cluster holds, or it will not grow")
    return limit


def experiment_uri(storage: str, name: str) -> str:
    """`storage`/`name` for a local path or a URI, keeping a URI's query (`?endpoint_override=...`) at the end."""
    if "://" not in storage:
        return os.path.join(storage, name)
    parts = urlsplit(storage)
    return urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + name))


def previous_runs(loaded: LoadedSpec, storage: str) -> list[str]:
    """Experiment dirs (paths or URIs) of earlier runs of this sweep that Tune can restore, oldest first.

    Listed through pyarrow's filesystem layer, the one Ray's own storage uses (`ray.train._internal.storage.
    get_fs_and_path`), so s3://, gs://, file:// (with a URI's query, e.g. `?endpoint_override=`) and local paths
    all work."""
    try:
        fs, root = pafs.FileSystem.from_uri(storage)
        entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except (OSError, ValueError) as exc:  # pyarrow raises OSError for unreachable buckets, bad credentials
        raise PreflightError(f"cannot list storage {storage}: {exc}") from None
    run_name = re.compile(re.escape(loaded.spec.name) + r"-\d{8}-\d{6}")
    names = sorted(e.base_name for e in entries
                   if e.type == pafs.FileType.Directory and run_name.fullmatch(e.base_name))
    return [experiment_uri(storage, n) for n in names
            if tune.Tuner.can_restore(f"{root.rstrip('/')}/{n}", storage_filesystem=fs)]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's or `kill`'s polite stop) takes Tune's Ctrl-C path: checkpoint, mark, exit."""
    previous = signal.getsignal(signal.SIGTERM)

    def forward(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGINT)

    try:
        signal.signal(signal.SIGTERM, forward)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_trainable(loaded: LoadedSpec, storage: str) -> Any:
    """The trainable with its resources: one process per trial, or a DDP driver over `resources.workers`."""
    res = loaded.spec.resources
    bases = {c.label: c.base for c in loaded.cells}
    if res.workers > 1:
        return tune.with_resources(
            tune.with_parameters(train_trial_ddp, bases=bases, workers=res.workers, cpu=res.cpu, gpu=res.gpu,
                                 storage=storage, checkpoint_every=loaded.spec.checkpoint_every), DRIVER_RESOURCES)
    resources: dict[str, float] = {"cpu": res.cpu, "gpu": res.gpu}
    if res.memory_gb:
        resources["memory"] = res.memory_gb * 2**30
    return tune.with_resources(
        tune.with_parameters(train_trial, bases=bases, checkpoint_every=loaded.spec.checkpoint_every), resources)


def _parent_tags(loaded: LoadedSpec) -> dict[str, str]:
    return {TAG_SPEC_HASH: loaded.spec_hash, "spec_source": loaded.source}


def run_sweep(loaded: LoadedSpec, options: RunOptions) -> SweepOutcome:
    """Run (or resume) every trial of the spec; MLflow ends with one parent and one ended child per trial."""
    spec, cells = loaded.spec, loaded.cells
    start = time.perf_counter()
    storage = storage_path(loaded, options.storage)
    tracker = SweepTracker(options.tracking_uri, spec.experiment_name)
    searcher = CellSearcher(spec, cells)
    total = searcher.total_trials()
    trainable = build_trainable(loaded, storage)

    if options.resume:
        runs = previous_runs(loaded, storage)
        if not runs:
            raise PreflightError(f"nothing to resume: no earlier run of '{spec.name}' under {storage}")
        path = runs[-1]
        name = os.path.basename(urlsplit(path).path if "://" in path else path)
        parent = tracker.find_sweep(name)
        if parent is None:
            raise PreflightError(f"{path} has no sweep run named '{name}' in MLflow experiment "
                                 f"'{spec.experiment_name}' at {options.tracking_uri}")
        if parent.data.tags.get(TAG_SPEC_HASH) != loaded.spec_hash:
            raise PreflightError(f"the spec changed since '{name}' started (hash {parent.data.tags.get(TAG_SPEC_HASH)}"
                                 f", now {loaded.spec_hash}); resume needs the same spec and --set values")
        if options.max_concurrent is not None:
            # Tuner.restore() takes the TuneConfig saved when the sweep started (its public API has no override).
            console.info(f"note: --max-concurrent {options.max_concurrent} does not apply to --resume: the sweep "
                         "continues with the concurrency it started with")
        tracker.start_sweep(name, {}, {}, {}, parent_id=parent.info.run_id)
        init_ray(options.address, options.ray_temp_dir)
        check_resources(loaded)
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True)
    else:
        name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        init_ray(options.address, options.ray_temp_dir)
        capacity = check_resources(loaded)
        scheduler = None
        if isinstance(spec.scheduler, AshaConfig):
            scheduler = CellScheduler(spec.scheduler, spec.scheduler.max_t or spec.trainer.epochs, spec.metric,
                                      spec.resolved_mode)
        tracker.start_sweep(
            name, tags=_parent_tags(loaded),
            params={"cells": len(cells), "trials": total, "metric": spec.metric, "mode": spec.resolved_mode,
                    "storage": storage, **provenance()},
            artifacts={"spec.yaml": spec.to_yaml()})
        # Tune pickles the run config (these callbacks with it) here and restores it on --resume.
        callbacks = sweep_callbacks(tracker.ref, {c.label: c for c in cells}, scheduler,
                                    (total, spec.metric, spec.resolved_mode))
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                search_alg=searcher, scheduler=scheduler, num_samples=total,
                max_concurrent_trials=concurrency(loaded, options.max_concurrent, capacity, total),
                # Measured here: 4.3 s -> 0.6 s per trial; safe because fit() keeps no state between trials.
                reuse_actors=True, time_budget_s=spec.time_budget_s,
                trial_dirname_creator=lambda trial: f"{TrialMeta.of(trial.config).cell}-{trial.trial_id}",
                trial_name_creator=lambda trial: f"{TrialMeta.of(trial.config).cell}-{trial.trial_id}"),
            run_config=tune.RunConfig(
                name=name, storage_path=storage, verbose=0,
                callbacks=[*callbacks, CheckpointPruner(), JsonLoggerCallback(), CSVLoggerCallback()],
                # Tune keeps every checkpoint; CheckpointPruner deletes them once no saved state points at them.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                failure_config=tune.FailureConfig(max_failures=spec.max_failures)),
        )
    return _fit(tuner, tracker, name, total, start, experiment_uri(storage, name))


def _fit(tuner: tune.Tuner, tracker: SweepTracker, name: str, total: int, start: float,
         experiment_dir: str) -> SweepOutcome:
    """Run the tuner; whatever happens, leave no MLflow run RUNNING."""
    assert tracker.parent_id is not None
    status = "FAILED"
    try:
        with sigterm_as_interrupt():
            tuner.fit()
        status = "FINISHED"
    except KeyboardInterrupt:  # a second Ctrl-C: Tune aborts without its own cleanup
        status = "KILLED"
        raise
    finally:
        counts: dict[str, int] = {}
        lost = ""
        try:
            tracker.close_running("KILLED")
            for run in tracker.children():
                outcome = run.data.tags.get(TAG_OUTCOME)
                if outcome:
                    counts[outcome] = counts.get(outcome, 0) + 1
        except TrackingUnavailable as exc:
            # The store went away (during the sweep or after its last trial): Tune's state is saved and the writes
            # MLflow has not taken are in the spool, so the sweep is resumable. Don't let a traceback here replace
            # the exception (if any) tuner.fit() raised, or hide how to continue.
            lost = str(exc)
        interrupted = bool(lost) or sum(counts.values()) < total
        if not lost:
            if status == "FINISHED" and interrupted:
                status = "KILLED"  # Tune's graceful Ctrl-C path: state saved, trials left to resume
            tracker.set_tags(tracker.parent_id, {**{f"trials_{k}": str(v) for k, v in counts.items()},
                                                 "interrupted": str(interrupted).lower()})
            tracker.end_run(tracker.parent_id, status)
            if not tracker.flush():
                lost, interrupted = f"MLflow at {tracker.uri} stopped answering as the sweep ended", True
    return SweepOutcome(name, tracker.parent_id, tracker.experiment_id, experiment_dir, total, counts,
                        time.perf_counter() - start, interrupted, lost)
