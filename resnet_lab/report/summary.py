"""From a sweep's runs to the ablation's numbers: per cell the best configuration and its seeds, per depth the
paired skip-on minus skip-off difference. Reads runs through `SweepRuns`; imports no tracking library.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from resnet_lab.report.stats import Estimate, mean_ci, paired_difference
from resnet_lab.spec.catalog import MODEL_CATALOG
from resnet_lab.tracking.query import SweepRuns, TrialRun

USABLE = ("completed", "early_stopped")  # trained to their natural end: they have test metrics
CURVE_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")
GRAD_PREFIX, GRAD_RATIO = "grad/", "grad/ratio_first_last"
NOSKIP = "-noskip"  # model_label's suffix for skip: false


@dataclass(frozen=True)
class RunValues:
    """What one usable run contributes to its cell's row."""

    run: TrialRun
    tested_epoch: int  # the epoch whose weights produced test/acc
    score: float  # the spec's metric at tested_epoch (selects the best configuration)
    val_acc: float  # val/acc at tested_epoch
    test_acc: float
    best_epoch: float
    train_time_s: float  # sum of epoch_time_s
    grad_ratio: float  # grad/ratio_first_last at the last epoch
    params: float


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
    runs: list[RunValues]  # the chosen configuration's usable runs, one per seed
    excluded: Counter[str]  # outcomes of the chosen configuration's other runs (diverged, failed, ...)
    outcomes: Counter[str]  # every run of the cell by outcome (ASHA stops counted as "asha")
    val: Estimate | None
    test: Estimate | None
    best_epoch: Estimate | None
    train_time_s: Estimate | None
    grad_ratio: Estimate | None
    params: float | None
    reference: float | None
    best_run: TrialRun | None  # the chosen configuration's run with the best metric (for learning curves)
    grads: dict[str, float]  # grad/NNN.layer -> mean over the chosen runs (last epoch)

    @property
    def family(self) -> str:
        """The cell label without `-noskip`: a skip-on cell and its plain twin share it."""
        return self.cell.replace(NOSKIP, "", 1)


@dataclass(frozen=True)
class SkipPair:
    """Skip on minus skip off for one depth, paired by seed."""

    family: str
    depth: int | None
    val: Estimate | None
    test: Estimate | None
    seeds: list[int]


@dataclass(frozen=True)
class Summary:
    """Everything the report shows."""

    sweep: SweepRuns
    metric: str
    mode: str
    cells: list[CellSummary]
    pairs: list[SkipPair]


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def model_depth(params: Mapping[str, str]) -> int | None:
    """Depth of a run's model: the `depth` param, else the digits of its arch label (`resnet18`); None if none."""
    model = params.get("model", "")
    if model in MODEL_CATALOG and not MODEL_CATALOG[model].depths:
        return None
    depth = params.get("depth", "default")
    if depth.isdigit():
        return int(depth)
    found = re.match(r"^[a-z_]*?(\d+)", params.get("arch", ""))
    return int(found.group(1)) if found else None


def model_block(params: Mapping[str, str], depth: int | None) -> str:
    """The residual block type (the spec's, else the model's default), `-` for plain CNNs."""
    model = params.get("model", "")
    if "model.block" in params:
        return params["model.block"]
    if model not in MODEL_CATALOG or not MODEL_CATALOG[model].residual:
        return "-"
    return "bottleneck" if model == "resnet" and depth is not None and depth >= 50 else "basic"


def config_key(run: TrialRun) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Runs of one configuration share every param but the seed (and sit in the same stage)."""
    return run.stage, tuple(sorted((k, v) for k, v in run.params.items() if k != "seed"))


def config_name(run: TrialRun) -> str:
    """`resnet18-noskip-lr3.2e-04` from `resnet18-noskip-lr3.2e-04-s1-confirm`."""
    name = re.sub(r"-confirm$", "", run.name)
    return re.sub(r"-s\d+$", "", name)


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
    return int(best) if patience > 0 and best is not None and 0 < best <= last else last


def run_values(sweep: SweepRuns, run: TrialRun, metric: str, keys: Sequence[str] = ()) -> RunValues:
    """The numbers of one usable run (histories fetched from the store: `metric`, val/acc and `keys`)."""
    history = sweep.history(run.run_id, dict.fromkeys([metric, "val/acc", *keys]))
    epoch = tested_epoch(run)
    m = run.metrics
    times = [row["epoch_time_s"] for row in history if "epoch_time_s" in row]
    return RunValues(
        run=run, tested_epoch=epoch, score=_at(history, metric, epoch, m.get(metric, math.nan)),
        val_acc=_at(history, "val/acc", epoch, m.get("val/acc", math.nan)), test_acc=m.get("test/acc", math.nan),
        best_epoch=m.get("best_epoch", math.nan), train_time_s=sum(times) if times else math.nan,
        grad_ratio=m.get(GRAD_RATIO, math.nan), params=m.get("params", math.nan))


def usable(run: TrialRun) -> bool:
    """Trained to its natural end (completed or early-stopped) and tested: it counts towards the means."""
    return run.outcome in USABLE and "test/acc" in run.metrics


def choose_group(sweep: SweepRuns, runs: Sequence[TrialRun], metric: str, mode: str) -> list[TrialRun]:
    """The confirm stage's runs when there are any; else the search configuration with the best mean metric;
    else (no run of the cell is usable) all of them."""
    confirm = [r for r in runs if r.stage == "confirm"]
    if confirm:
        return confirm
    groups: dict[tuple, list[TrialRun]] = {}
    for run in runs:
        groups.setdefault(config_key(run), []).append(run)
    best: tuple[float, list[TrialRun]] | None = None
    for group in groups.values():
        scores = [run_values(sweep, r, metric).score for r in group if usable(r)]
        scores = [s for s in scores if math.isfinite(s)]
        if not scores:
            continue
        mean = sum(scores) / len(scores)
        if best is None or (mean > best[0] if mode == "max" else mean < best[0]):
            best = (mean, group)
    return best[1] if best else list(runs)  # nothing usable: the note then counts every run


def _outcome_key(run: TrialRun) -> str:
    return "asha" if run.tags.get("stopped_by") == "asha" else run.outcome


def summarize_cell(sweep: SweepRuns, cell: str, runs: Sequence[TrialRun], metric: str, mode: str,
                   reference: Mapping[str, float]) -> CellSummary:
    """One cell's row: its best configuration's usable runs reduced to means with intervals."""
    group = sorted(choose_group(sweep, runs, metric, mode), key=lambda r: (r.seed is None, r.seed or 0))
    kept = [r for r in group if usable(r)]
    values = [run_values(sweep, r, metric, ("epoch_time_s", *CURVE_KEYS)) for r in kept]
    sign = 1.0 if mode == "max" else -1.0
    best = max(values, key=lambda v: sign * v.score if math.isfinite(v.score) else -math.inf, default=None)
    params = (group or list(runs))[0].params
    depth = model_depth(params)
    skip = {"True": True, "False": False}.get(params.get("skip", "n/a"))
    grad_keys = sorted({k for v in values for k in v.run.metrics if k.startswith(GRAD_PREFIX) and k != GRAD_RATIO})
    grads = {k: sum(v.run.metrics[k] for v in values if k in v.run.metrics)
             / sum(1 for v in values if k in v.run.metrics) for k in grad_keys}
    sizes = [v.params for v in values if math.isfinite(v.params)]

    def estimate(get: Callable[[RunValues], float]) -> Estimate | None:
        return mean_ci([get(v) for v in values])

    return CellSummary(
        cell=cell, model=params.get("model", "?"), depth=depth, block=model_block(params, depth), skip=skip,
        stage=kept[0].stage if kept else "-", config=config_name(kept[0]) if kept else "-", runs=values,
        excluded=Counter(_outcome_key(r) for r in group if r not in kept),
        outcomes=Counter(_outcome_key(r) for r in runs), val=estimate(lambda v: v.val_acc),
        test=estimate(lambda v: v.test_acc), best_epoch=estimate(lambda v: v.best_epoch),
        train_time_s=estimate(lambda v: v.train_time_s), grad_ratio=estimate(lambda v: v.grad_ratio),
        params=sizes[0] if sizes else None, reference=reference.get(cell),
        best_run=best.run if best else None, grads=grads)


def skip_pairs(cells: Sequence[CellSummary]) -> list[SkipPair]:
    """Skip-on minus skip-off per twin pair of cells (same label but `-noskip`), paired by seed."""
    off = {c.family: c for c in cells if c.skip is False}
    pairs = []
    for on in cells:
        twin = off.get(on.family) if on.skip else None
        if twin is None:
            continue
        val, seeds = paired_difference({v.run.seed: v.val_acc for v in on.runs if v.run.seed is not None},
                                       {v.run.seed: v.val_acc for v in twin.runs if v.run.seed is not None})
        test, _ = paired_difference({v.run.seed: v.test_acc for v in on.runs if v.run.seed is not None},
                                    {v.run.seed: v.test_acc for v in twin.runs if v.run.seed is not None})
        pairs.append(SkipPair(on.family, on.depth, val, test, seeds))
    return sorted(pairs, key=lambda p: (p.depth is None, p.depth or 0, p.family))


def summarize(sweep: SweepRuns, metric: str, mode: str, reference: Mapping[str, float]) -> Summary:
    """The whole report's numbers; cells by model (as the sweep first ran them), depth, skip on before off."""
    by_cell: dict[str, list[TrialRun]] = {}
    for run in sweep.runs:
        by_cell.setdefault(run.cell, []).append(run)
    cells = [summarize_cell(sweep, cell, runs, metric, mode, reference) for cell, runs in by_cell.items()]
    first_seen = {model: i for i, model in reversed(list(enumerate(c.model for c in cells)))}
    cells.sort(key=lambda c: (first_seen[c.model], c.depth or 0, c.family, c.skip is False))
    return Summary(sweep, metric, mode, cells, skip_pairs(cells))
