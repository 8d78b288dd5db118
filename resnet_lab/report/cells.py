"""One cell of a sweep: its chosen configuration, every result of it, and the numbers of its table row.

What counts (no survivorship): a run that trained to its end (completed, early-stopped) or diverged is a result of
the method. A diverged run counts at the accuracy its network actually has (its weights are NaN, so it predicts one
class: about chance), and the cell's failure rate says how often that happened. Runs that failed (a crash) or were
stopped (Ctrl-C, or ASHA in a search stage) are not results: they are counted and named, never averaged.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from resnet_lab.outcome import Outcome
from resnet_lab.report.stats import Estimate, Ratio, geometric_mean_ci, mean_ci
from resnet_lab.spec.catalog import MODEL_CATALOG
from resnet_lab.tracking import TAG_CONFIG, TAG_GRID
from resnet_lab.tracking.query import SweepRuns, TrialRun

FINISHED = tuple(o for o in Outcome if o.trained_out)  # trained to their natural end
RESULTS = tuple(o for o in Outcome if o.is_result)  # results of the method: counted in every mean
CURVE_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")
TIME_KEYS = ("train_time_s", "epoch_time_s", "eval_time_s")
FLOW_PREFIX = "gradflow/"
NOSKIP = "-noskip"  # model_label's suffix for skip: false
# Params that place a run on the depth axis or in a skip arm (read as the fields above), repeat another param for the
# UI (`arch`, `lr`), or say which trial it was: not part of what a cell is besides its depth and skip arm.
NOT_SETTING = frozenset({"arch", "cell", "stage", "seed", "model", "depth", "block", "skip", "lr", "model.depth",
                         "model.skip"})


@dataclass(frozen=True)
class RunValues:
    """What one run of a cell's chosen configuration contributes to its row."""

    run: TrialRun
    outcome: str  # completed, early_stopped, diverged
    tested_epoch: int  # the epoch whose weights produced test/acc
    score: float  # the spec's metric at tested_epoch (selects the best configuration)
    val_acc: float  # val/acc at tested_epoch; a diverged run's at its last epoch
    test_acc: float
    train_acc: float  # train/acc of the last epoch (train mode: augmentation and dropout on)
    best_val_acc: float  # the highest val/acc of any epoch
    best_epoch: float
    train_time_s: float  # optimisation time, evaluation excluded
    curve: list[tuple[int, float, float]]  # (epoch, val/acc, cumulative training seconds)
    params: float

    def reached(self, target: float) -> tuple[int, float] | None:
        """(epochs, training seconds) to the first epoch with val/acc >= target; None if it never got there."""
        return next(((e, s) for e, acc, s in self.curve if acc >= target), None)


@dataclass(frozen=True)
class Flow:
    """Gradient flow of a cell's runs at one phase: per block a geometric mean over runs with its interval."""

    blocks: list[tuple[str, Ratio]]
    first_last: Ratio | None


@dataclass(frozen=True)
class CellSummary:
    """One row of the ablation table."""

    cell: str
    model: str
    depth: int | None
    block: str
    skip: bool | None  # None: not a residual model
    stage: str  # where the numbers come from: confirm, or search when the sweep had no confirm stage
    config: str  # the chosen configuration, readable (its run name without seed and stage)
    runs: list[RunValues]  # the chosen configuration's results (finished and diverged), one per seed
    counts: Counter[str]  # every run of the chosen configuration by outcome (ASHA stops as "asha")
    outcomes: Counter[str]  # every run of the cell by outcome
    val: Estimate | None  # over every result, diverged ones included
    test: Estimate | None
    test_finished: Estimate | None  # over finished runs only (shown when some diverged)
    train_acc: Estimate | None
    best_epoch: Estimate | None
    train_time_s: Estimate | None
    params: float | None
    reference: float | None
    best_run: TrialRun | None  # the chosen configuration's run with the best metric (for learning curves)
    flow: dict[str, Flow]  # phase -> gradient flow (init, epoch1, final)
    # every param all the cell's runs share (searched values differ between runs and drop out), NOT_SETTING left out
    setting: dict[str, str] = dataclasses.field(default_factory=dict)
    to_target: tuple[Estimate | None, Estimate | None, int] = (None, None, 0)  # epochs, seconds, runs never there
    configs: int = 1  # configurations of the stage the numbers come from (more than one: chosen among them)
    grid: dict[str, Any] | None = None  # the cell's grid values (tag resnet_lab.grid); None for runs logged before it

    def family(self, *leave_out: str) -> str:
        """What the cell shares with its twins: its grid values without `leave_out` (`model.skip` for the skip twin,
        `model.depth` for the same net at other depths). Runs logged before the grid tag: the label without
        `-noskip` (skip twins only)."""
        if self.grid is None:
            return self.cell.replace(NOSKIP, "", 1)
        return json.dumps({k: v for k, v in self.grid.items() if k not in leave_out}, sort_keys=True)

    @property
    def diverged(self) -> int:
        """Results of the chosen configuration that diverged."""
        return sum(r.outcome == Outcome.DIVERGED for r in self.runs)

    def by_seed(self, get: Callable[[RunValues], float]) -> dict[int, float]:
        """seed -> value, for pairing."""
        return {r.run.seed: get(r) for r in self.runs if r.run.seed is not None}


# --- one run -----------------------------------------------------------------------------------------------------


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def model_depth(params: Mapping[str, str]) -> int | None:
    """Depth of a run's model from its `depth` param (runs logged before it was resolved say "default": the
    catalogue's default then); None for models without a depth."""
    entry = MODEL_CATALOG.get(params.get("model", ""))
    depth = params.get("depth", "n/a")
    if depth.isdigit():
        return int(depth)
    return entry.default_depth if entry is not None and depth == "default" else None


def model_block(params: Mapping[str, str], depth: int | None) -> str:
    """The block the run's model was built from (its `block` param; the catalogue's for runs logged without it)."""
    if "block" in params:
        return params["block"]
    entry = MODEL_CATALOG.get(params.get("model", ""))
    return entry.architecture(depth, params.get("model.block"))[1] if entry is not None else "-"


def config_key(run: TrialRun) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Runs of one configuration share every param but the seed (and sit in the same stage)."""
    return run.stage, tuple(sorted((k, v) for k, v in run.params.items() if k != "seed"))


def config_name(run: TrialRun) -> str:
    """The configuration's label (`resnet18-noskip-lr3.2e-04`), tag `resnet_lab.config`.

    Runs logged before that tag existed: their run name without the seed and stage suffixes, the only place it was.
    """
    if TAG_CONFIG in run.tags:
        return run.tags[TAG_CONFIG]
    return re.sub(r"-s\d+$", "", re.sub(r"-confirm$", "", run.name))


def _at(history: Sequence[Mapping[str, float]], key: str, epoch: int, fallback: float) -> float:
    for row in history:
        if int(row["epoch"]) == epoch and key in row:
            return row[key]
    return fallback


def tested_epoch(run: TrialRun) -> int:
    """The epoch whose weights were tested: the best (lowest val loss) one when early stopping kept them."""
    last = int(run.metrics.get("epoch", 0))
    patience = _number(run.params.get("trainer.early_stopping_patience")) or 0
    best = run.metrics.get("best_epoch")
    if run.outcome == Outcome.DIVERGED:
        return last
    return int(best) if patience > 0 and best is not None and 0 < best <= last else last


def _chance(run: TrialRun) -> float:
    classes = run.metrics.get("num_classes") or _number(run.params.get("dataset.synthetic.num_classes")) or 10
    return 1.0 / classes


def _accuracy(value: float | None, run: TrialRun) -> float:
    """A measured accuracy; a diverged run whose evaluation gave no finite number counts at chance."""
    return value if value is not None and math.isfinite(value) else _chance(run)


def run_values(sweep: SweepRuns, run: TrialRun, metric: str) -> RunValues:
    """The numbers of one result run (histories fetched from the store)."""
    history = sweep.history(run.run_id, dict.fromkeys([metric, *CURVE_KEYS, *TIME_KEYS]))
    epoch = tested_epoch(run)
    m = run.metrics
    seconds, curve = 0.0, []
    for row in history:
        train_s = row.get("train_time_s", row.get("epoch_time_s", math.nan) - row.get("eval_time_s", 0.0))
        seconds += train_s
        if "val/acc" in row and math.isfinite(row["val/acc"]):
            curve.append((int(row["epoch"]), row["val/acc"], seconds))
    val_accs = [acc for _, acc, _ in curve]
    diverged = run.outcome == Outcome.DIVERGED
    return RunValues(
        run=run, outcome=run.outcome, tested_epoch=epoch, score=_at(history, metric, epoch, m.get(metric, math.nan)),
        val_acc=_accuracy(_at(history, "val/acc", epoch, m.get("val/acc", math.nan)), run),
        test_acc=_accuracy(m.get("test/acc"), run),
        train_acc=_chance(run) if diverged else _accuracy(m.get("train/acc"), run),
        best_val_acc=max(val_accs) if val_accs else math.nan, best_epoch=m.get("best_epoch", math.nan),
        train_time_s=seconds if history else math.nan, curve=curve, params=m.get("params", math.nan))


def is_result(run: TrialRun) -> bool:
    """Finished or diverged: a result of the method, counted in the means."""
    return run.outcome in RESULTS and (run.outcome == Outcome.DIVERGED or "test/acc" in run.metrics)


def outcome_key(run: TrialRun) -> str:
    """The outcome, with ASHA's stops apart from other stops."""
    return "asha" if run.tags.get("stopped_by") == "asha" else run.outcome


# --- one cell ----------------------------------------------------------------------------------------------------


def shared_setting(runs: Sequence[TrialRun]) -> dict[str, str]:
    """The params every run has with the same value, NOT_SETTING left out: what the cell fixed."""
    first = runs[0].params if runs else {}
    return {k: v for k, v in sorted(first.items())
            if k not in NOT_SETTING and all(r.params.get(k) == v for r in runs[1:])}


def choose_group(sweep: SweepRuns, runs: Sequence[TrialRun], metric: str, mode: str) -> list[TrialRun]:
    """The confirm stage's runs when there are any; else the search configuration with the best mean metric over
    its results (a diverged repeat counts as the worst value); else (no result at all) every run of the cell."""
    confirm = [r for r in runs if r.stage == "confirm"]
    if confirm:
        return confirm
    groups: dict[tuple, list[TrialRun]] = {}
    for run in runs:
        groups.setdefault(config_key(run), []).append(run)
    worst = -math.inf if mode == "max" else math.inf
    best: tuple[float, list[TrialRun]] | None = None
    for group in groups.values():
        if not any(r.outcome in FINISHED for r in group):
            continue
        scores = [worst if r.outcome == Outcome.DIVERGED else run_values(sweep, r, metric).score
                  for r in group if is_result(r)]
        scores = [s if math.isfinite(s) or s == worst else worst for s in scores]
        mean = sum(scores) / len(scores)
        if best is None or (mean > best[0] if mode == "max" else mean < best[0]):
            best = (mean, group)
    return best[1] if best else list(runs)


def _flow(runs: Sequence[RunValues], phase: str) -> Flow | None:
    prefix = f"{FLOW_PREFIX}{phase}/block/"
    keys = sorted({k for r in runs for k in r.run.metrics if k.startswith(prefix)})
    if not keys:
        return None
    blocks = []
    for key in keys:
        ratio = geometric_mean_ci([r.run.metrics[key] for r in runs if key in r.run.metrics])
        if ratio is not None:
            blocks.append((key.removeprefix(prefix).split(".", 1)[1], ratio))
    ratio_key = f"{FLOW_PREFIX}{phase}/first_last"
    return Flow(blocks, geometric_mean_ci([r.run.metrics[ratio_key] for r in runs if ratio_key in r.run.metrics]))


def summarize_cell(sweep: SweepRuns, cell: str, runs: Sequence[TrialRun], metric: str, mode: str,
                   reference: Mapping[str, float]) -> CellSummary:
    """One cell's row: every result of its best configuration reduced to means with intervals."""
    group = sorted(choose_group(sweep, runs, metric, mode), key=lambda r: (r.seed is None, r.seed or 0))
    values = [run_values(sweep, r, metric) for r in group if is_result(r)]
    finished = [v for v in values if v.outcome in FINISHED]
    sign = 1.0 if mode == "max" else -1.0
    best = max(finished, key=lambda v: sign * v.score if math.isfinite(v.score) else -math.inf, default=None)
    params = (group or list(runs))[0].params
    depth = model_depth(params)
    sizes = [v.params for v in values if math.isfinite(v.params)]

    def estimate(get: Callable[[RunValues], float], over: Sequence[RunValues] = values) -> Estimate | None:
        return mean_ci([x for x in (get(v) for v in over) if math.isfinite(x)])

    flows = {phase: f for phase in ("init", "epoch1", "final") if (f := _flow(finished, phase)) is not None}
    return CellSummary(
        cell=cell, model=params.get("model", "?"), depth=depth, block=model_block(params, depth),
        skip={"True": True, "False": False}.get(params.get("skip", "n/a")),
        stage=group[0].stage if values else "-", config=config_name(best.run) if best else "-", runs=values,
        counts=Counter(outcome_key(r) for r in group), outcomes=Counter(outcome_key(r) for r in runs),
        val=estimate(lambda v: v.val_acc), test=estimate(lambda v: v.test_acc),
        test_finished=estimate(lambda v: v.test_acc, finished), train_acc=estimate(lambda v: v.train_acc),
        best_epoch=estimate(lambda v: v.best_epoch, finished),
        train_time_s=estimate(lambda v: v.train_time_s, finished), params=sizes[0] if sizes else None,
        reference=reference.get(cell), best_run=best.run if best else None, flow=flows, setting=shared_setting(runs),
        configs=len({config_key(r) for r in runs if values and r.stage == group[0].stage}), grid=grid_values(runs))


def grid_values(runs: Sequence[TrialRun]) -> dict[str, Any] | None:
    """The cell's grid values its runs were tagged with (every run of a cell has the same), or None."""
    text = next((r.tags[TAG_GRID] for r in runs if TAG_GRID in r.tags), None)
    return json.loads(text) if text is not None else None


def with_target(cell: CellSummary, target: float) -> CellSummary:
    """The cell with its epochs and training seconds to `target` val accuracy (over the runs that reached it)."""
    reached = [r for v in cell.runs if (r := v.reached(target)) is not None]
    epochs = mean_ci([e for e, _ in reached])
    seconds = mean_ci([s for _, s in reached if math.isfinite(s)])
    return dataclasses.replace(cell, to_target=(epochs, seconds, len(cell.runs) - len(reached)))
