"""`CellSearcher`: one seeded Optuna (TPE) study per grid cell, seed repeats, and the confirm stage.

Why our own Searcher rather than Ray's `OptunaSearch`: that wraps exactly one study over one flat space, so trials
of every cell would compete in one TPE model, a seed repeat could not share its configuration, and there is no
second (confirm) stage. We use Optuna's public ask/tell API per cell and Ray Tune's public Searcher extension
point; Optuna does the proposing, Tune the scheduling.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass, field
from typing import Any

import optuna
from ray.tune.search import Searcher

from resnet_lab.outcome import OUTCOME_KEY, Outcome
from resnet_lab.spec.cells import Cell, configs_in, startup_configs, trials_in
from resnet_lab.spec.sweep import Choice, IntRange, LogUniform, SweepSpec, Uniform
from resnet_lab.tune.trainable import TrialMeta


def optuna_distribution(dist: Choice | Uniform | LogUniform | IntRange) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution for a spec distribution."""
    if isinstance(dist, Choice):
        return optuna.distributions.CategoricalDistribution(dist.values)
    if isinstance(dist, IntRange):
        return optuna.distributions.IntDistribution(dist.low, dist.high, step=dist.step, log=dist.log)
    return optuna.distributions.FloatDistribution(dist.low, dist.high, log=isinstance(dist, LogUniform))


def study_seed(base_seed: int) -> int:
    """The sampler seed of every cell's study: the same for all cells (common random numbers).

    With one seed for all cells, the random start-up offers every cell the same configurations (for the same
    search space), so a difference between cells is not the luck of a better draw; TPE then adapts to each cell's
    own results.
    """
    return (base_seed * 1_000_003 + 12_345) % 2**31


@dataclass
class Group:
    """One proposed configuration and its seed repeats; Optuna hears about it once every repeat has ended."""

    cell: str
    stage: str  # "search" or "confirm"
    values: dict[str, Any]
    seeds: list[int]
    optuna_trial: optuna.trial.Trial | None = None
    pending: list[int] = field(default_factory=list)  # seeds not yet handed to Tune
    outcomes: dict[int, tuple[str, float, dict[int, float]]] = field(default_factory=dict)  # seed -> result

    def __post_init__(self) -> None:
        self.pending = list(self.seeds)


@dataclass
class CellState:
    """Per-cell bookkeeping: its study, how many configurations were asked, its groups."""

    cell: Cell
    study: optuna.Study
    asked: int = 0
    groups: list[Group] = field(default_factory=list)
    confirmed: bool = False


class CellSearcher(Searcher):
    """Proposes trials cell by cell (round-robin, so cells run concurrently) from per-cell Optuna studies."""

    def __init__(self, spec: SweepSpec, cells: list[Cell], seed: int = 0) -> None:
        super().__init__(metric=spec.metric, mode=spec.resolved_mode)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._confirm_seeds = list(spec.confirm.seeds) if spec.confirm else []
        self._seeds = list(spec.seeds)
        self._configs = {c.label: configs_in(spec, c) for c in cells}
        self._startup = {c.label: startup_configs(spec, c) for c in cells}
        self._total = sum(trials_in(spec, c) for c in cells)
        self._direction = "maximize" if spec.resolved_mode == "max" else "minimize"
        self._cells = {c.label: CellState(c, self._new_study(c, seed)) for c in cells}
        self._order = [c.label for c in cells]
        self._next = 0
        self._trials: dict[str, tuple[Group, int]] = {}  # Tune trial id -> (group, seed)
        self._curves: dict[str, dict[int, float]] = {}  # Tune trial id -> epoch -> metric

    def _new_study(self, cell: Cell, seed: int) -> optuna.Study:
        # constant_liar: concurrent TPE trials of one cell avoid proposing the same point (Optuna >= 2.8).
        sampler = optuna.samplers.TPESampler(seed=study_seed(seed), constant_liar=True,
                                             n_startup_trials=self._startup[cell.label])
        return optuna.create_study(direction=self._direction, sampler=sampler, study_name=cell.label)

    def total_trials(self) -> int:
        """How many trials the sweep will run in all (search stage plus confirm stage)."""
        return self._total

    def _configs_in(self, state: CellState) -> int:
        return self._configs[state.cell.label]

    # -- proposing -----------------------------------------------------------------------------------------------
    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        """The next trial's config, None while waiting on the search stage, FINISHED when all are handed out."""
        for offset in range(len(self._order)):
            label = self._order[(self._next + offset) % len(self._order)]
            proposal = self._propose(self._cells[label])
            if proposal is not None:
                self._next = (self._next + offset + 1) % len(self._order)
                group, seed = proposal
                self._trials[trial_id] = (group, seed)
                return {**TrialMeta(group.cell, group.stage, seed).as_config(), **group.values}
        if all(self._exhausted(s) for s in self._cells.values()):
            return Searcher.FINISHED
        return None

    def _propose(self, state: CellState) -> tuple[Group, int] | None:
        for group in state.groups:  # finish handing out seed repeats of an asked configuration first
            if group.pending:
                return group, group.pending.pop(0)
        if state.asked < self._configs_in(state):
            state.asked += 1
            group = Group(state.cell.label, "search", {}, self._seeds)
            if state.cell.search:
                dists = {path: optuna_distribution(d) for path, d in state.cell.search.items()}
                group.optuna_trial = state.study.ask(dists)
                group.values = dict(group.optuna_trial.params)
            state.groups.append(group)
            return group, group.pending.pop(0)
        if self._confirm_seeds and not state.confirmed and self._search_done(state):
            state.confirmed = True
            best = self._best_values(state)
            if best is not None:
                group = Group(state.cell.label, "confirm", best, self._confirm_seeds)
                state.groups.append(group)
                return group, group.pending.pop(0)
        return None

    def _search_done(self, state: CellState) -> bool:
        searched = [g for g in state.groups if g.stage == "search"]
        return len(searched) == self._configs_in(state) and all(
            len(g.outcomes) == len(g.seeds) for g in searched)

    def _exhausted(self, state: CellState) -> bool:
        asked_all = state.asked >= self._configs_in(state) and not any(g.pending for g in state.groups)
        return asked_all and (not self._confirm_seeds or state.confirmed)

    def _best_values(self, state: CellState) -> dict[str, Any] | None:
        """Searched values of the cell's best completed configuration (Optuna's view); None when none completed
        (every one pruned, diverged or failed): there is nothing to confirm, and the report says so for the cell."""
        completed = [t for t in state.study.trials if t.state == optuna.trial.TrialState.COMPLETE
                     and math.isfinite(t.value)]
        if completed:
            best = max(completed, key=lambda t: t.value if self._direction == "maximize" else -t.value)
            return dict(best.params)
        return None

    # -- hearing back --------------------------------------------------------------------------------------------
    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        """Keep each trial's learning curve (Optuna gets it as intermediate values of a pruned trial)."""
        if self.metric in result and "training_iteration" in result:
            self._curves.setdefault(trial_id, {})[int(result["training_iteration"])] = float(result[self.metric])

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        """Record the trial's outcome; tell Optuna once every seed repeat of its configuration has ended."""
        if trial_id not in self._trials:
            return
        group, seed = self._trials[trial_id]
        curve = self._curves.pop(trial_id, {})
        ended = result.get(OUTCOME_KEY) if result else None  # the trainer's word, on its last report
        if error or not result:
            outcome = "failed"
        elif ended is None:
            outcome = "pruned"  # stopped before its natural end (ASHA)
        elif Outcome(ended) is Outcome.DIVERGED:
            outcome = "diverged"
        else:
            outcome = "complete"
        if result and self.metric in result:
            curve.setdefault(int(result.get("training_iteration", len(curve))), float(result[self.metric]))
        best = self._best_of(curve)
        group.outcomes[seed] = (outcome, best, curve)
        if len(group.outcomes) == len(group.seeds) and group.optuna_trial is not None:
            self._tell(self._cells[group.cell].study, group)

    def _best_of(self, curve: dict[int, float]) -> float:
        finite = [v for v in curve.values() if math.isfinite(v)]
        if not finite:
            return math.nan
        return max(finite) if self.mode == "max" else min(finite)

    def _tell(self, study: optuna.Study, group: Group) -> None:
        outcomes = [o for o, _, _ in group.outcomes.values()]
        trial = group.optuna_trial
        worst = -math.inf if self.mode == "max" else math.inf
        if all(o == "failed" for o in outcomes):
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        elif "diverged" in outcomes:
            study.tell(trial, worst)  # divergence is a result: the worst one, so TPE steers away from it
        elif "pruned" in outcomes:
            # Report the mean learning curve over the repeats; TPE ranks pruned trials by how far they got.
            curves = [c for o, _, c in group.outcomes.values() if o != "failed"]
            for step in sorted(set.intersection(*(set(c) for c in curves))):
                trial.report(sum(c[step] for c in curves) / len(curves), step)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            values = [v for o, v, _ in group.outcomes.values() if o == "complete" and math.isfinite(v)]
            study.tell(trial, sum(values) / len(values) if values else worst)

    # -- Tune's state hooks (driver restarts and restore) ----------------------------------------------------------
    def save(self, checkpoint_path: str) -> None:
        """Pickle the whole state, Optuna studies included (in-memory storage pickles without its lock)."""
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        """Inverse of `save`."""
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Our metric and mode come from the spec; accept Tune's only when they agree."""
        return (metric in (None, self.metric)) and (mode in (None, self.mode))
