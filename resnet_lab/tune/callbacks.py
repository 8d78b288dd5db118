"""Tune callbacks: adapt Tune's trial events to the MLflow tracker and the live console view."""

from __future__ import annotations

import base64
import json
import logging
import math
import tempfile
from pathlib import Path
from typing import Any

from ray.tune import Callback
from ray.tune.experiment import Trial

from resnet_lab.console import LiveView
from resnet_lab.outcome import OUTCOME_KEY, Outcome
from resnet_lab.spec import TrialConfig
from resnet_lab.spec.catalog import MODEL_CATALOG
from resnet_lab.spec.cells import Cell, model_label, short_value
from resnet_lab.tracking import (
    TAG_CELL,
    TAG_CONFIG,
    TAG_ERROR,
    TAG_GRID,
    TAG_OUTCOME,
    TAG_RESUMED_FROM,
    TAG_RETRIES,
    TAG_RUNG,
    TAG_SEED,
    TAG_STAGE,
    TAG_STOPPED_BY,
    TAG_TRIAL_ID,
    SweepRef,
    SweepTracker,
    TrackingUnavailable,
)
from resnet_lab.tune.schedule import CellScheduler
from resnet_lab.tune.trainable import ARTIFACTS_KEY, META_KEYS, RESUMED_KEY, TrialMeta, trial_config

log = logging.getLogger(__name__)
TRAINER_SCALARS = ("epoch", "workers", "lr", "epoch_time_s", "train_time_s", "eval_time_s", "throughput_img_s",
                   "params", "num_classes", "best_epoch", "diverged")


def our_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The trainer's metrics from a Tune result (Ray adds its own keys: time_total_s, pid, config, ...)."""
    return {k: float(v) for k, v in result.items()
            if (("/" in k and not k.startswith("config/")) or k in TRAINER_SCALARS)
            and isinstance(v, int | float) and not isinstance(v, bool)}


def config_label(config: dict[str, Any]) -> str:
    """`resnet18-noskip-lr3.2e-04`: the cell and the searched values (tag `resnet_lab.config`: one configuration's
    seeds and stages share it)."""
    searched = [f"{k.split('.')[-1].replace('_', '')}{short_value(v, fixed_width=True)}"
                for k, v in sorted(config.items()) if k not in META_KEYS]
    return "-".join([TrialMeta.of(config).cell, *searched])


def run_name(config: dict[str, Any]) -> str:
    """`resnet18-noskip-lr3.2e-04-s0`: the configuration's label, the seed; `-confirm` for the confirm stage."""
    meta = TrialMeta.of(config)
    return f"{config_label(config)}-s{meta.seed}" + ("-confirm" if meta.stage == "confirm" else "")


def grid_tag(cell: Cell) -> str:
    """The cell's grid values as the spec sets them (JSON, tag `resnet_lab.grid`): the report pairs cells by these
    (a skip twin shares all but `model.skip`), never by their labels. A width solved by `match_params` is left out:
    the spec did not set it, and a capacity-matched twin is still the twin."""
    values = {k: v for k, v in cell.values.items() if not (cell.match_params and k == "model.width")}
    return json.dumps(values, sort_keys=True, default=str)


def trial_params(cfg: TrialConfig, meta: TrialMeta) -> dict[str, Any]:
    """MLflow params: short columns for the UI (arch, depth, skip, lr, seed) plus the whole resolved config."""
    tc = cfg.trainer.resolved()
    depth, block = MODEL_CATALOG[cfg.model.name].architecture(cfg.model.depth, cfg.model.block)
    flat = {**cfg.to_flat(), **{f"trainer.{k}": v for k, v in tc.model_dump().items() if v is not None}}
    # The resolved architecture as fields (defaults applied): the report reads these, never the `arch` label.
    return {"arch": model_label(cfg.model), "model": cfg.model.name, "depth": depth if depth is not None else "n/a",
            "block": block, "skip": cfg.model.skip if cfg.model.skip is not None else "n/a", "lr": tc.lr,
            "seed": cfg.seed,
            "cell": meta.cell, "stage": meta.stage, **flat}


def ended(trial: Trial, scheduler: CellScheduler | None) -> tuple[Outcome, str, dict[str, str]]:
    """How a trial that Tune completed ended: (outcome, MLflow run status, extra tags).

    The trainer's outcome is on its last report; without one the trial was stopped from outside: by ASHA (the
    scheduler kept the rung) or by Tune (time budget, the user), which is not a failure of the trial."""
    reported = (trial.last_result or {}).get(OUTCOME_KEY)
    if reported is not None:
        return Outcome(reported), "FINISHED", {}
    rung = scheduler.stopped_at.get(trial.trial_id) if scheduler else None
    if rung is not None:
        return Outcome.STOPPED, "KILLED", {TAG_STOPPED_BY: "asha", TAG_RUNG: str(rung)}
    return Outcome.STOPPED, "KILLED", {TAG_STOPPED_BY: "tune"}


# The callbacks below hold plain data only until Tune calls `setup()`, where they build their MLflow client and
# display: Tune pickles them with the run config when a sweep starts and unpickles them on `--resume`, so a fresh
# and a resumed sweep build them the same way. What a resumed driver must know comes from Tune at the first step:
# the trials it restored.


class MlflowRuns(Callback):
    """One MLflow child run per trial: params and tags when it starts, metrics per epoch, errors and retries,
    how it ended."""

    def __init__(self, sweep: SweepRef, cells: dict[str, Cell], scheduler: CellScheduler | None) -> None:
        self.sweep, self.cells, self.scheduler = sweep, cells, scheduler
        self.tracker: SweepTracker | None = None  # built in setup()
        self.runs: dict[str, str] = {}  # Tune trial id -> its run (an id, or a handle until the run exists)
        self.logged: dict[str, int] = {}  # Tune trial id -> last epoch in MLflow (this process's knowledge)
        self.restored: frozenset[str] | None = None  # trials Tune held at its first step: an earlier driver's
        self._resumed: dict[str, Any] = {}  # Tune trial id -> the checkpoint epoch its process resumed from
        self._outcome: dict[str, str] = {}  # Tune trial id -> the outcome tag sent with its last epoch

    def setup(self, **info: Any) -> None:
        self.tracker = SweepTracker.attach(self.sweep)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.restored is None:  # a new sweep has no trials yet at its first step; a resumed one has its own
            self.restored = frozenset(t.trial_id for t in trials)

    def get_state(self) -> dict | None:
        """Tune calls this as it saves the experiment state (`TuneController.save_to_dir`), after taking the
        trials' state and before uploading it: the writes queued so far (every result in that state) are stored
        first. So the state a `--resume` restores never holds an epoch MLflow lacks, even after a SIGKILL (the
        outbox lingers and writes behind). While the store is away nothing waits: those writes are buffered and
        spooled at a give-up. No state of its own: None (Tune then writes no callback file)."""
        if self.tracker is not None:
            self.tracker.settle()
        return None

    def _run_id(self, trial: Trial) -> str:
        assert self.tracker is not None, "Tune calls setup() first"
        if trial.trial_id not in self.runs:
            config = trial.config
            meta = TrialMeta.of(config)
            cfg = trial_config(self.cells[meta.cell].base, config)
            tags = {TAG_CELL: meta.cell, TAG_STAGE: meta.stage, TAG_SEED: str(meta.seed),
                    TAG_CONFIG: config_label(config), TAG_GRID: grid_tag(self.cells[meta.cell])}
            reuse = trial.trial_id in (self.restored or ())  # an earlier driver may have created its run
            self.runs[trial.trial_id] = self.tracker.start_trial(trial.trial_id, run_name(config),
                                                                 trial_params(cfg, meta), tags, reuse=reuse)
            if not reuse:
                self.logged[trial.trial_id] = 0  # a new run: nothing recorded yet, no need to ask
        return self.runs[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._run_id(trial)

    def on_trial_recover(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        """The trial's process failed and Tune retries it from its last checkpoint."""
        run_id = self._run_id(trial)
        assert self.tracker is not None
        self.tracker.set_tags(run_id, {TAG_RETRIES: str(trial.num_failures)})
        self.tracker.log_text(run_id, _error_text(trial), f"error-attempt{trial.num_failures}.txt")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        metrics = our_metrics(result)
        step = int(metrics.get("epoch", result.get("training_iteration", 0)))
        run_id = self._run_id(trial)
        assert self.tracker is not None
        files = result.pop(ARTIFACTS_KEY, None)  # popped: Tune's snapshots and result.json do not keep the bytes
        if files:
            self._log_files(run_id, files)
        # A restored trial continues from the checkpoint in Tune's last experiment snapshot, which can be older
        # than what MLflow already holds (the driver was interrupted between the two). The repeated epochs
        # are recorded once: the first record stands (on CPU the retrained epoch is bit-identical anyway).
        if trial.trial_id not in self.logged:
            self.logged[trial.trial_id] = self.tracker.last_step(run_id)
        if step > self.logged[trial.trial_id]:
            finite = {k: v for k, v in metrics.items() if math.isfinite(v)}
            tags = {key: str(result[key]) for key in ("node_ip", "node_id") if step == 1 and result.get(key)}
            if result.get(OUTCOME_KEY) is not None:  # the last epoch: its outcome travels in the same request
                tags[TAG_OUTCOME] = self._outcome[trial.trial_id] = str(Outcome(result[OUTCOME_KEY]))
            self.tracker.log_metrics(run_id, finite, step, tags=tags)  # one request per epoch
            self.logged[trial.trial_id] = step
        else:
            log.info("trial %s repeated epoch %d from an older checkpoint; MLflow already has it", trial, step)
        resumed = result.get(RESUMED_KEY)
        if resumed is not None and self._resumed.get(trial.trial_id) != resumed:  # a retry or --resume: say where from
            self._resumed[trial.trial_id] = resumed
            self.tracker.set_tags(run_id, {TAG_RESUMED_FROM: str(int(resumed))})

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        outcome, status, tags = ended(trial, self.scheduler)
        self._finish(trial, outcome, status, tags)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        error = _error_text(trial)
        run_id = self._run_id(trial)
        assert self.tracker is not None
        self.tracker.log_text(run_id, error, "error.txt")
        last_line = error.strip().splitlines()[-1][:4000] if error else ""
        self._finish(trial, Outcome.FAILED, "FAILED", {TAG_ERROR: last_line})

    def _log_files(self, run_id: str, files: dict[str, str]) -> None:
        """Files a trial sent base64-encoded in its result (analysis figures) as artifacts of its run."""
        assert self.tracker is not None
        with tempfile.TemporaryDirectory() as directory:
            paths = [Path(directory) / Path(name).name for name in files]
            for path, data in zip(paths, files.values(), strict=True):
                path.write_bytes(base64.b64decode(data))
            self.tracker.log_artifacts(run_id, paths)

    def _finish(self, trial: Trial, outcome: Outcome, status: str, tags: dict[str, str]) -> None:
        run_id = self._run_id(trial)
        assert self.tracker is not None
        if tags or self._outcome.get(trial.trial_id) != str(outcome):  # else it went with the last epoch
            self.tracker.set_tags(run_id, {TAG_OUTCOME: str(outcome), **tags})
        self.tracker.end_run(run_id, status)


class OrphanRuns(Callback):
    """At the first step: soft-delete the sweep's child runs whose trial Tune does not hold.

    A trial created after Tune's last snapshot and cut off by a hard kill (SIGKILL, power loss) has an MLflow run,
    but the restored sweep never heard of it: its searcher proposes a trial in its place (the same configuration
    during TPE's random start-up). The old run would be an extra child run of the sweep, so it is soft-deleted
    (restorable), with the reason as a tag. A new sweep has no child runs at its first step: one empty query.
    """

    def __init__(self, sweep: SweepRef) -> None:
        self.sweep = sweep
        self.tracker: SweepTracker | None = None  # built in setup()
        self.checked = False

    def setup(self, **info: Any) -> None:
        self.tracker = SweepTracker.attach(self.sweep)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if self.checked:
            return
        self.checked = True
        assert self.tracker is not None, "Tune calls setup() first"
        known = {t.trial_id for t in trials}
        try:
            children = self.tracker.children()
        except TrackingUnavailable as exc:  # not a reason to stop the sweep: the next resume looks again
            log.warning("could not look for runs of trials lost with an earlier driver (%s); any such run stays "
                        "until the next --resume looks again", exc)
            return
        for run in children:
            trial_id = run.data.tags.get(TAG_TRIAL_ID)
            if trial_id and trial_id not in known:
                self.tracker.discard(run.info.run_id, f"trial {trial_id} started after the sweep's last state "
                                                      "snapshot and was lost with the driver; the resumed sweep "
                                                      "ran another trial in its place")
                log.info("discarded run %s of trial %s, unknown to the restored sweep", run.info.run_id, trial_id)


class LiveProgress(Callback):
    """The console's live view of the sweep (console.LiveView)."""

    def __init__(self, total: int, metric: str, mode: str, scheduler: CellScheduler | None) -> None:
        self.total, self.metric, self.mode, self.scheduler = total, metric, mode, scheduler
        self.view: LiveView | None = None  # built in setup()
        self.started = False

    def setup(self, **info: Any) -> None:
        self.view = LiveView(self.total, self.metric, self.mode)

    def on_step_begin(self, iteration: int, trials: list[Trial], **info: Any) -> None:
        if not self.started and self.view is not None:  # a resumed sweep: count the trials that had ended
            self.started = True
            done = sum(t.status in (Trial.TERMINATED, Trial.ERROR) for t in trials)
            if done:
                self.view.resumed(done)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        if self.view is not None:
            self.view.trial_update(trial.trial_id, run_name(trial.config), TrialMeta.of(trial.config).cell,
                                   our_metrics(result))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        outcome, _, tags = ended(trial, self.scheduler)
        self._done(trial, outcome, f"(ASHA at epoch {tags[TAG_RUNG]})" if TAG_RUNG in tags else "")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._done(trial, Outcome.FAILED, "")

    def _done(self, trial: Trial, outcome: Outcome, detail: str) -> None:
        if self.view is not None:
            self.view.trial_done(trial.trial_id, run_name(trial.config), outcome, detail)

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        if self.view is not None:
            self.view.close()


def sweep_callbacks(sweep: SweepRef, cells: dict[str, Cell], scheduler: CellScheduler | None,
                    view: tuple[int, str, str] | None) -> list[Callback]:
    """The sweep's callbacks, in the order Tune calls them: orphans go before any run is created or re-attached.
    `view`: (total trials, metric, mode) of the live view, or None for none."""
    callbacks: list[Callback] = [OrphanRuns(sweep), MlflowRuns(sweep, cells, scheduler)]
    if view is not None:
        callbacks.append(LiveProgress(*view, scheduler))
    return callbacks


def _error_text(trial: Trial) -> str:
    """The trial's error as Tune recorded it."""
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        return Path(path).read_text(errors="replace")
    return str(getattr(trial, "error_msg", "") or "unknown error")
