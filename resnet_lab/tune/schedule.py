"""`CellScheduler`: one ASHA per grid cell, so trials only ever compete with trials of their own cell.

Ray's ASHAScheduler keeps one set of rungs for all trials: a fast-converging cell (resnet18) would set cutoffs
that stop every trial of a slow one (plain-34). Wrapping one ASHAScheduler per cell behind Tune's public
TrialScheduler interface keeps Ray's implementation of the algorithm and fixes only the grouping.
"""

from __future__ import annotations

from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from resnet_lab.spec.sweep import AshaConfig
from resnet_lab.tune.trainable import TrialMeta


class CellScheduler(FIFOScheduler):
    """Routes each trial to its cell's ASHAScheduler; confirm-stage trials always run their full budget."""

    def __init__(self, cfg: AshaConfig, max_t: int, metric: str, mode: str) -> None:
        super().__init__()
        self._cfg, self._max_t, self._metric, self._mode = cfg, max_t, metric, mode
        self._asha: dict[str, ASHAScheduler] = {}
        # Tune trial id -> epoch at which ASHA stopped it; read by the tracking callback (same driver process).
        self.stopped_at: dict[str, int] = {}
        self._live: set[str] = set()  # trials added to an ASHA and not yet completed/removed from it

    def _for(self, trial: Trial) -> ASHAScheduler | None:
        meta = TrialMeta.of(trial.config)
        if meta.stage == "confirm":
            return None
        cell = meta.cell
        if cell not in self._asha:
            self._asha[cell] = ASHAScheduler(
                time_attr="training_iteration", metric=self._metric, mode=self._mode, max_t=self._max_t,
                grace_period=self._cfg.grace_period, reduction_factor=self._cfg.reduction_factor,
                brackets=self._cfg.brackets)
        return self._asha[cell]

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        """Metric and mode come from the spec; accept Tune's only when they agree."""
        return metric in (None, self._metric) and mode in (None, self._mode)

    def on_trial_add(self, tune_controller: Any, trial: Trial) -> None:
        asha = self._for(trial)
        if asha is not None:
            asha.on_trial_add(tune_controller, trial)
            self._live.add(trial.trial_id)

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        asha = self._for(trial)
        if asha is None:
            return TrialScheduler.CONTINUE
        decision = asha.on_trial_result(tune_controller, trial, result)
        epoch = int(result.get("training_iteration", 0))
        if decision == TrialScheduler.STOP and epoch < self._max_t and not result.get("done"):
            self.stopped_at[trial.trial_id] = epoch
        return decision

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        asha = self._for(trial)
        if asha is not None and trial.trial_id in self._live:
            self._live.discard(trial.trial_id)
            asha.on_trial_complete(tune_controller, trial, result)

    def on_trial_error(self, tune_controller: Any, trial: Trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        asha = self._for(trial)
        if asha is not None and trial.trial_id in self._live:
            self._live.discard(trial.trial_id)
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"CellScheduler: {len(self._asha)} cells, {len(self.stopped_at)} trials stopped by ASHA"
