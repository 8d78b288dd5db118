"""A `Summary` as table rows (shared by the terminal and Markdown), Markdown text and PNG figures."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from resnet_lab import plots
from resnet_lab.outcome import Outcome
from resnet_lab.report.stats import Estimate, Ratio
from resnet_lab.report.summary import CURVE_KEYS, CellSummary, Summary

# (outcome, column): ASHA's stops apart from the other stops (tag stopped_by)
OUTCOME_COLUMNS = ((Outcome.COMPLETED, "completed"), (Outcome.EARLY_STOPPED, "early stopped"), ("asha", "ASHA-stopped"),
                   (Outcome.STOPPED, "stopped (other)"), (Outcome.DIVERGED, "diverged"), (Outcome.FAILED, "failed"))
FIGURES = {  # file -> caption
    "accuracy_vs_depth.png": "Test accuracy vs depth, skip on (solid) vs off (dashed); bands: 95% CI over seeds "
                             "(diverged runs counted); dotted: models without a depth knob.",
    "gradient_flow.png": "Norm of the loss gradient at each block's output (stem, blocks, head), per image, on a fixed "
                         "batch of validation images in eval mode, at initialisation and on the tested weights; "
                         "geometric mean over seeds with its 95% interval (log scale). Skip off dashed.",
    "learning_curves.png": "Learning curves of the best run of each cell (val solid, train dashed).",
    "accuracy_vs_params.png": "Test accuracy vs parameter count, 95% CI: parameter efficiency.",
    "lesion.png": "Test accuracy with one block deleted, per block, skip on (solid) vs off (dashed); bands: seeds.",
    "attribution_shares.png": "Shortcut share of each block's attribution, skip on vs off; bands: seeds.",
}
KINDS = {"skip": "skip on vs off", "depth": "deeper vs shallower", "baseline": "vs baseline", "compare": "requested"}


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


def runs_text(cell: CellSummary) -> str:
    """`3 of 3: 2 completed, 1 diverged`: how many runs the means are over, and what became of the others."""
    total = sum(cell.counts.values())
    parts = ", ".join(f"{n} {OUTCOME_NAMES.get(k, k)}" for k, n in sorted(cell.counts.items()))
    return f"{len(cell.runs)} of {total}: {parts}" if total else "none"


OUTCOME_NAMES = dict(OUTCOME_COLUMNS)


def ablation_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the ablation table."""
    with_ref = any(c.reference is not None for c in summary.cells)
    with_div = any(c.diverged for c in summary.cells)
    columns = ["cell", "model", "depth", "block", "skip", "params", "configuration", "stage", "runs in means",
               "val acc", "test acc", *(["test acc, finished runs only"] if with_div else []),
               *(["reference"] if with_ref else [])]
    rows = []
    for c in summary.cells:
        skip = {True: "on", False: "off", None: "-"}[c.skip]
        row = [c.cell, c.model, str(c.depth) if c.depth is not None else "-", c.block, skip, fmt_count(c.params),
               c.config, _stage(c), runs_text(c), _est(c.val), _est(c.test)]
        if with_div:
            row.append(_est(c.test_finished) if c.diverged else "same")
        if with_ref:
            row.append(f"{c.reference:.1%}" if c.reference is not None else "-")
        rows.append(row)
    return columns, rows


def _stage(cell: CellSummary) -> str:
    """Where the numbers come from: `confirm`, `search` (chosen among several), or `grid` (one configuration)."""
    return "grid" if cell.stage == "search" and cell.configs == 1 else cell.stage


def _ratio(value: Ratio | None) -> str:
    return value.fmt(show_n=False) if value is not None else "-"


def dynamics_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the training-dynamics table: convergence speed and gradient flow."""
    target = f"{summary.target_acc:.1%}" if summary.target_acc is not None else "-"
    columns = ["cell", "best epoch", f"epochs to {target} val", f"train s to {target} val", "never reached",
               "train time", "grad first/last, init", "grad first/last, final"]
    rows = []
    for c in summary.cells:
        epochs, seconds, never = c.to_target
        init, final = c.flow.get("init"), c.flow.get("final")
        rows.append([c.cell, _est(c.best_epoch, "{:.1f}", False), _est(epochs, "{:.1f}", False),
                     _est(seconds, "{:.1f} s", False), f"{never} of {len(c.runs)}" if c.runs else "-",
                     _est(c.train_time_s, "{:.1f} s", False), _ratio(init.first_last if init else None),
                     _ratio(final.first_last if final else None)])
    return columns, rows


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def comparison_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the paired comparisons (a minus b, paired by seed)."""
    columns = ["comparison", "kind", "Δ test acc (95% CI)", "p exact", "p Holm", "Δ train acc (95% CI)",
               "p Holm (train)", "train s to target, ratio", "paired seeds"]
    rows = []
    for cmp in summary.comparisons:
        diff = cmp.test.diff.fmt_pp(False) if cmp.test.diff else "-"
        train = cmp.train.diff.fmt_pp(False) if cmp.train and cmp.train.diff else "-"
        rows.append([cmp.title, KINDS[cmp.kind], diff, _p(cmp.test.p if cmp.test.n else None),
                     _p(cmp.test_p_holm if cmp.test.n else None), train, _p(cmp.train_p_holm),
                     _ratio(cmp.time_ratio), ", ".join(map(str, cmp.test.seeds)) or "none"])
    return columns, rows


def run_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Columns and rows of the per-cell run counts by outcome (every stage)."""
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
    """The report as Markdown: header, ablation table, comparisons and conclusions, dynamics, run counts, figures."""
    sweep, parent = summary.sweep, summary.sweep.parent
    out = [f"# {parent.name}", "",
           f"Experiment `{sweep.experiment_name}` (id {sweep.experiment_id}), parent run `{parent.run_id}` "
           f"({parent.status}), {len(sweep.runs)} trials; metric `{summary.metric}` ({summary.mode}); "
           f"tracking store `{sweep.uri}`; written {time.strftime('%Y-%m-%d %H:%M %Z')}.", "",
           "## Ablation", "", markdown_table(*ablation_rows(summary)), "",
           "Per cell, the best configuration: the confirm stage's runs (fresh seeds, full budget) when the sweep had "
           f"one, else the searched configuration with the best mean `{summary.metric}`, with all its seed repeats. "
           "Accuracies: mean ± half-width of the 95% Student-t interval over seeds; one seed gives no interval. "
           "Every result counts: a diverged run at the accuracy its network scores (its weights are NaN, so about "
           "chance), so a cell that often diverges shows it in its mean and in `runs in means`; runs that failed "
           "(a crash) or were stopped are not results and are listed there, never averaged. Val acc is taken at the "
           "epoch whose weights were tested (best val loss when early stopping keeps them, else the last epoch)."]
    if any(c.reference is not None for c in summary.cells):
        out += ["", "Reference: the published test accuracy of the reference study for this cell."]
    out += ["", "## Comparisons, paired by seed", ""]
    if summary.comparisons:
        out += [markdown_table(*comparison_rows(summary)), "",
                "a minus b over the seeds both have, in percentage points (pp), with the 95% Student-t interval of "
                "the mean difference; p exact: two-sided exact sign-flip permutation test of the paired "
                "differences (scipy `permutation_test`, all 2^n sign patterns); p Holm: Holm's step-down "
                "adjustment across every test in this table (test and train accuracy). With n pairs the smallest "
                "possible exact p is 2/2^n, so n < 6 can never reach p < 0.05, and Holm multiplies the smallest p "
                "by the number of tests m: m x 2/2^n must be below 0.05 (6 tests need n >= 8). Train acc (depth "
                "comparisons): the last epoch's training accuracy. Time ratio: geometric mean over seeds of a's "
                "over b's training "
                "seconds (evaluation excluded) to the target val accuracy, interval on the log scale."]
    else:
        out += ["No comparison: no cell has a skip-off twin, a deeper or shallower twin, a `report.baseline` or "
                "a `report.compare` pair."]
    out += ["", "## Conclusions", "", *(f"- {line}" for line in summary.conclusions or ["Nothing to conclude."])]
    out += ["", "## Training dynamics", "", markdown_table(*dynamics_rows(summary)), "",
            f"Target val accuracy {summary.target_acc:.1%} ({summary.target_source}). "
            if summary.target_acc is not None else "No target accuracy: no finished run. ",
            "Epochs and training seconds (evaluation excluded) to the first epoch at or above it, mean over the "
            "runs that reached it; `never reached` counts the others. Grad first/last: the gradient norm at the "
            "stem's output over that at the last block's output (two feature maps; the head is left out), "
            "geometric mean over seeds with its 95% interval; below 1 the gradient shrinks toward the input."]
    out += analysis_sections(summary)
    out += ["", "## Runs", "", markdown_table(*run_rows(summary)), "", "## Figures", ""]
    for path in figures:
        out += [f"![{path.stem}]({path.name})", "", FIGURES.get(path.name, ""), ""]
    return "\n".join(out).rstrip() + "\n"


def final_metrics(summary: Summary) -> dict[str, list[dict[str, float]]]:
    """Cell -> the final metrics of each finished run of its chosen configuration (the analyses' input)."""
    return {c.cell: [dict(v.run.metrics) for v in c.runs if v.outcome != Outcome.DIVERGED]
            for c in summary.cells if c.runs}


def analysis_sections(summary: Summary) -> list[str]:
    """The lesion and attribution tables (`analysis: [lesion, attribution]`), when the runs logged them."""
    from resnet_lab.report import analysis

    runs = final_metrics(summary)
    out: list[str] = []
    lesions = [r for r in analysis.lesion_rows(runs) if r.runs]
    if lesions:
        out += ["", "## Lesion study", "", markdown_table(*analysis.lesion_table(lesions)), "",
                "Test accuracy (fixed subset of test images) with one block deleted at a time, mean over seeds: a "
                "residual block keeps its shortcut, a plain block is bypassed where its shapes allow (n/a where "
                "they do not). Veit et al. 2016: deleting one block of a ResNet barely hurts, of a plain net "
                "destroys it."]
    shares = [r for r in analysis.attribution_rows(runs) if r.runs]
    if shares:
        out += ["", "## Attributions: shortcut vs residual branch", "",
                markdown_table(*analysis.attribution_table(shares)), "",
                "Share of each block's integrated-gradients attribution (Captum LayerIntegratedGradients, true-class "
                "logit, 64 fixed test images) carried by the shortcut, mean over seeds; plain nets have none."]
    return out


def _band(x: float, est: Estimate) -> plots.Band:
    return plots.Band(x, est.mean, est.low, est.high)


# What sets a line of the depth figure apart, always: the model's own knobs and the data (as the spec set them).
LINE_FIELDS = ("model.block", "model.width", "dataset.name")


def _line_part(key: str, value: str) -> str:
    """`w0.25`, `preact`, `svhn`, `recipefast`: one field in a line's legend label, as cell labels write it."""
    value = value.lower() if value in ("True", "False") else value
    if key == "model.width":
        return f"w{value}"
    return value if key in ("model.block", "dataset.name") else f"{key.split('.')[-1]}{value}"


def _kinds(group: Sequence[CellSummary], fields: Sequence[str]) -> int:
    """How many cells of `group` the values of `fields` tell apart."""
    return len({tuple(c.setting.get(k) for k in fields) for c in group})


def _separating_fields(cells: Sequence[CellSummary]) -> list[str]:
    """Further fields that tell apart cells of one model and data at the same depth and skip arm (a grid over
    something else, like the recipe): as few as do it, model and data fields first, then the recipe."""
    groups: dict[tuple, list[CellSummary]] = {}
    for c in cells:
        groups.setdefault((c.model, c.depth, c.skip, *(c.setting.get(k) for k in LINE_FIELDS)), []).append(c)
    clashes = [g for g in groups.values() if len(g) > 1]
    rank = ("model.", "dataset.", "trainer.recipe", "trainer.")
    candidates = sorted({k for g in clashes for c in g for k in c.setting} - set(LINE_FIELDS),
                        key=lambda k: (next((i for i, p in enumerate(rank) if k.startswith(p)), len(rank)), k))
    chosen: list[str] = []
    for key in candidates:
        if all(_kinds(g, chosen) == len(g) for g in clashes):
            break
        if any(_kinds(g, [*chosen, key]) > _kinds(g, chosen) for g in clashes):
            chosen.append(key)
    return chosen


def depth_line_labels(cells: Sequence[CellSummary]) -> dict[str, str]:
    """cell -> its line in the accuracy-vs-depth figure (`resnet-w0.25 skip`), from the cell's fields: cells that
    differ only in depth share a line; skip on and off are apart."""
    fields = [*LINE_FIELDS, *_separating_fields(cells)]
    if len({c.setting.get("dataset.name") for c in cells}) == 1:
        fields.remove("dataset.name")  # one dataset: the caption's business, not each line's (as in cell labels)
    labels = {}
    for c in cells:
        parts = [_line_part(k, c.setting[k]) for k in fields if k in c.setting]
        labels[c.cell] = f"{'-'.join([c.model, *parts])} {'skip' if c.skip else 'no skip'}"
    return labels


def figures(summary: Summary, out_dir: Path) -> list[Path]:
    """The report's PNGs (each only when the sweep has data for it)."""
    cells = [c for c in summary.cells if c.test is not None]
    made: list[Path] = []

    def add(name: str, draw: Callable[[Path], Path]) -> None:
        made.append(draw(out_dir / name))

    lines: dict[str, list[plots.Band]] = {}
    levels: dict[str, plots.Band] = {}
    dashed = set()
    line_of = depth_line_labels([c for c in cells if c.depth is not None and c.skip is not None])
    for c in cells:
        assert c.test is not None
        if c.depth is None or c.skip is None:
            levels[c.cell] = _band(0, c.test)
            continue
        label = line_of[c.cell]
        lines.setdefault(label, []).append(_band(c.depth, c.test))
        if not c.skip:
            dashed.add(label)
    if lines or levels:
        add("accuracy_vs_depth.png", lambda p: plots.accuracy_vs_depth(lines, levels, p, dashed=dashed))
    flows = {c.cell: {phase: [plots.Band(i, r.mean, r.low, r.high) for i, (_, r) in enumerate(flow.blocks)]
                      for phase, flow in c.flow.items()} for c in summary.cells if c.flow}
    if flows:
        add("gradient_flow.png", lambda p: plots.gradient_flow(
            flows, p, dashed={c.cell for c in summary.cells if c.skip is False}))
    curves = {c.cell: summary.sweep.history(c.best_run.run_id, CURVE_KEYS) for c in summary.cells if c.best_run}
    if curves:
        add("learning_curves.png", lambda p: plots.learning_curves_by_run(curves, p))
    from resnet_lab.report import analysis

    runs, plain = final_metrics(summary), {c.cell for c in summary.cells if c.skip is False}
    for name, draw in (("lesion.png", analysis.lesion_figure), ("attribution_shares.png", analysis.attribution_figure)):
        drawn = draw(runs, out_dir / name, dashed=plain)
        if drawn is not None:
            made.append(drawn)
    sized = {c.cell: _band(c.params, c.test) for c in cells if c.params and c.test is not None}
    if sized:
        add("accuracy_vs_params.png", lambda p: plots.accuracy_vs_params(
            sized, p, dashed={c.cell for c in cells if c.skip is False}))
    return made
