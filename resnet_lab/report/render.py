"""A `Summary` as table rows (shared by the terminal and Markdown), Markdown text and PNG figures."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from resnet_lab import plots
from resnet_lab.report.stats import Estimate
from resnet_lab.report.summary import CURVE_KEYS, CellSummary, Summary

OUTCOME_COLUMNS = (("completed", "completed"), ("early_stopped", "early stopped"), ("asha", "ASHA-stopped"),
                   ("stopped", "stopped (other)"), ("diverged", "diverged"), ("failed", "failed"))
FIGURES = {  # file -> caption
    "accuracy_vs_depth.png": "Test accuracy vs depth, skip on (solid) vs off (dashed); bands: 95% CI over seeds; "
                             "dotted: models without a depth knob.",
    "gradient_flow.png": "Mean |gradient| per weighted layer, input to output (log scale), at the last epoch, "
                         "mean over the chosen configuration's seeds: skip on vs off.",
    "learning_curves.png": "Learning curves of the best run of each cell (val solid, train dashed).",
    "accuracy_vs_params.png": "Test accuracy vs parameter count, 95% CI: parameter efficiency.",
}


def fmt_count(n: float | None) -> str:
    """19.8k, 11.2M."""
    if n is None or not math.isfinite(n):
        return "-"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def _est(value: Estimate | None, pattern: str = "{:.1%}", show_n: bool = True, signed: bool = False) -> str:
    return value.fmt(pattern, show_n, signed) if value is not None else "-"


def _note(cell: CellSummary) -> str:
    if not cell.excluded:
        return ""
    excluded = ", ".join(f"{n} {outcome}" for outcome, n in sorted(cell.excluded.items()))
    if not cell.runs:
        return f"no usable run ({excluded})"
    total = len(cell.runs) + sum(cell.excluded.values())
    return f"left out {sum(cell.excluded.values())} of {total} seeds: {excluded}"


def ablation_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the ablation table."""
    with_ref = any(c.reference is not None for c in summary.cells)
    columns = ["cell", "model", "depth", "block", "skip", "params", "configuration", "stage", "val acc",
               "test acc", "best epoch", "train time", "grad first/last", *(["reference"] if with_ref else []),
               "note"]
    rows = []
    for c in summary.cells:
        skip = {True: "on", False: "off", None: "-"}[c.skip]
        row = [c.cell, c.model, str(c.depth) if c.depth is not None else "-", c.block, skip, fmt_count(c.params),
               c.config, c.stage, _est(c.val), _est(c.test), _est(c.best_epoch, "{:.1f}", False),
               _est(c.train_time_s, "{:.1f} s", False), _est(c.grad_ratio, "{:.3g}", False)]
        if with_ref:
            row.append(f"{c.reference:.1%}" if c.reference is not None else "-")
        rows.append([*row, _note(c)])
    return columns, rows


def pair_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the paired skip-on minus skip-off table."""
    columns = ["depth", "skip on vs off", "Δ val acc", "Δ test acc", "paired seeds"]
    rows = [[str(p.depth) if p.depth is not None else "-", f"{p.family} vs {p.family}-noskip",
             _est(p.val, signed=True), _est(p.test, signed=True), ", ".join(map(str, p.seeds)) or "none"]
            for p in summary.pairs]
    return columns, rows


def run_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the per-cell run counts by outcome."""
    known = {key for key, _ in OUTCOME_COLUMNS}
    rows = []
    for c in summary.cells:
        other = sum(n for outcome, n in c.outcomes.items() if outcome not in known)
        rows.append([c.cell, str(sum(c.outcomes.values())), *(str(c.outcomes.get(k, 0)) for k, _ in OUTCOME_COLUMNS),
                     str(other)])
    return ["cell", "trials", *(title for _, title in OUTCOME_COLUMNS), "other"], rows


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(summary: Summary, figures: Sequence[Path]) -> str:
    """The report as Markdown: header, ablation table, paired differences, run counts, figures."""
    sweep, parent = summary.sweep, summary.sweep.parent
    out = [f"# {parent.name}", "",
           f"Experiment `{sweep.experiment_name}` (id {sweep.experiment_id}), parent run `{parent.run_id}` "
           f"({parent.status}), {len(sweep.runs)} trials; metric `{summary.metric}` ({summary.mode}); "
           f"tracking store `{sweep.uri}`; written {time.strftime('%Y-%m-%d %H:%M %Z')}.", "",
           "## Ablation", "", markdown_table(*ablation_rows(summary)), "",
           "Per cell, the best configuration: the confirm stage's runs (all its seeds) when the sweep had one, else "
           f"the searched configuration with the best mean `{summary.metric}` over its completed runs, with all its "
           "seed repeats. Accuracies: mean ± half-width of the 95% confidence interval over seeds (Student t, "
           "n seeds); one seed gives no interval. Val acc is taken at the epoch whose weights were tested "
           "(best val loss when early stopping keeps them, else the last epoch). Best epoch: epoch of the lowest "
           "val loss. Train time: sum of epoch times per run. Grad first/last: mean |gradient| of the first over "
           "the last weighted layer at the last epoch. Diverged, failed and stopped runs are left out of the "
           "means: the note counts those of the chosen configuration, the Runs table those of the whole cell."]
    if any(c.reference is not None for c in summary.cells):
        out += ["", "Reference: the published test accuracy of the reference study for this cell."]
    out += ["", "## Skip connections: on minus off, paired by seed", ""]
    if summary.pairs:
        out += [markdown_table(*pair_rows(summary)), "",
                "Mean of the per-seed differences with its 95% CI (Student t); n=1 gives no interval."]
    else:
        out += ["No cell has a skip-off twin in this sweep."]
    out += ["", "## Runs", "", markdown_table(*run_rows(summary)), "", "## Figures", ""]
    for path in figures:
        out += [f"![{path.stem}]({path.name})", "", FIGURES.get(path.name, ""), ""]
    return "\n".join(out).rstrip() + "\n"


def _band(x: float, est: Estimate) -> plots.Band:
    return plots.Band(x, est.mean, est.low, est.high)


def _depth_free(family: str) -> str:
    """`resnet-w0.25` from `resnet10-w0.25`: one line per family across depths."""
    return re.sub(r"^([a-z_]*?)\d+", r"\1", family, count=1)


def figures(summary: Summary, out_dir: Path) -> list[Path]:
    """The report's PNGs (each only when the sweep has data for it)."""
    cells = [c for c in summary.cells if c.test is not None]
    made: list[Path] = []

    def add(name: str, draw: Callable[[Path], Path]) -> None:
        made.append(draw(out_dir / name))

    lines: dict[str, list[plots.Band]] = {}
    levels: dict[str, plots.Band] = {}
    dashed = set()
    for c in cells:
        assert c.test is not None
        if c.depth is None or c.skip is None:
            levels[c.cell] = _band(0, c.test)
            continue
        label = f"{_depth_free(c.family)} {'skip' if c.skip else 'no skip'}"
        lines.setdefault(label, []).append(_band(c.depth, c.test))
        if not c.skip:
            dashed.add(label)
    if lines or levels:
        add("accuracy_vs_depth.png", lambda p: plots.accuracy_vs_depth(lines, levels, p, dashed=dashed))
    grads = {c.cell: c.grads for c in cells if c.grads}
    if grads:
        add("gradient_flow.png", lambda p: plots.gradient_flow(
            grads, p, "gradient flow: mean |grad| per layer, last epoch (skip on vs off)"))
    curves = {c.cell: summary.sweep.history(c.best_run.run_id, CURVE_KEYS) for c in summary.cells if c.best_run}
    if curves:
        add("learning_curves.png", lambda p: plots.learning_curves_by_run(curves, p))
    sized = {c.cell: _band(c.params, c.test) for c in cells if c.params and c.test is not None}
    if sized:
        add("accuracy_vs_params.png", lambda p: plots.accuracy_vs_params(
            sized, p, dashed={c.cell for c in cells if c.skip is False}))
    return made
