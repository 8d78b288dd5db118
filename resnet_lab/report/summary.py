"""From a sweep's runs to the ablation's numbers: per cell the best configuration and every one of its seed runs
(`cells`), and the paired comparisons between cells with the sentences they support (`compare`). Reads runs through
`SweepRuns`; imports no tracking library.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from resnet_lab.report.cells import (
    CURVE_KEYS,
    FINISHED,
    CellSummary,
    RunValues,
    summarize_cell,
    with_target,
)
from resnet_lab.report.compare import Comparison, adjust, compare, conclusions, pairs
from resnet_lab.report.stats import mean_ci
from resnet_lab.tracking.query import SweepRuns, TrialRun

__all__ = ["CURVE_KEYS", "CellSummary", "Comparison", "RunValues", "Summary", "summarize"]


@dataclass(frozen=True)
class Summary:
    """Everything the report shows."""

    sweep: SweepRuns
    metric: str
    mode: str
    cells: list[CellSummary]
    comparisons: list[Comparison]
    target_acc: float | None
    target_source: str  # "report.target_acc" or "lowest cell's mean best val accuracy"
    conclusions: list[str] = field(default_factory=list)


# --- the whole report --------------------------------------------------------------------------------------------


def summarize(sweep: SweepRuns, metric: str, mode: str, reference: Mapping[str, float], *,
              baseline: str | None = None, compare_pairs: Sequence[Sequence[str]] = (),
              target_acc: float | None = None) -> Summary:
    """The whole report's numbers; cells by model (as the sweep first ran them), depth, skip on before off."""
    by_cell: dict[str, list[TrialRun]] = {}
    for run in sweep.runs:
        by_cell.setdefault(run.cell, []).append(run)
    cells = [summarize_cell(sweep, cell, runs, metric, mode, reference) for cell, runs in by_cell.items()]
    first_seen = {model: i for i, model in reversed(list(enumerate(c.model for c in cells)))}
    cells.sort(key=lambda c: (first_seen[c.model], c.depth or 0, c.family("model.skip"), c.skip is False))
    target, source = target_acc, "report.target_acc"
    if target is None:
        # The lowest cell's mean best val accuracy: every cell reaches it on average, so times are comparable.
        bests = [m.mean for c in cells if (m := mean_ci([v.best_val_acc for v in c.runs
                                                          if v.outcome in FINISHED])) is not None]
        target, source = (min(bests) if bests else None), "the lowest cell's mean best val accuracy"
    if target is not None:
        cells = [with_target(c, target) for c in cells]
    comparisons = adjust([compare(kind, a, b, target) for kind, a, b in pairs(cells, baseline, compare_pairs)])
    return Summary(sweep, metric, mode, cells, comparisons, target, source, conclusions(cells, comparisons))
