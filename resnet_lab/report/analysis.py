"""Lesion and attribution results of a sweep's runs as table rows and figures (pure functions; no tracking).

Input everywhere: per cell (or any label the caller chooses, e.g. "resnet18 skip" / "resnet18 plain"), the final
metrics of each of its runs (one dict per seed), as `resnet_lab.analysis` logged them:
`lesion/full.test_acc`, `lesion/blockNN.test_acc` (absent: a plain block that changes shape cannot be bypassed),
`lesion/num_blocks`, `lesion/mean_drop`, `attribution/blockNN.shortcut_share`. Runs without them are left out.
Means over seeds with Student-t 95% intervals (`report.stats.mean_ci`); in figures the seeds are the band.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from resnet_lab.report.stats import mean_ci

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

Runs = Mapping[str, Sequence[Mapping[str, float]]]  # label -> the final metrics of each run (seed)

LESION_KEY = "lesion/block{:02d}.test_acc"
SHARE_KEY = "attribution/block{:02d}.shortcut_share"
_LESION = re.compile(r"^lesion/block(\d+)\.test_acc$")
_SHARE = re.compile(r"^attribution/block(\d+)\.shortcut_share$")


@dataclass(frozen=True)
class Summary:
    """A mean over seeds with its 95% interval (low == high == mean for one seed); n seeds."""

    mean: float
    low: float
    high: float
    n: int


def summarize(values: Sequence[float]) -> Summary | None:
    """Mean and 95% t-interval of the finite values; None when there is none."""
    est = mean_ci([v for v in values if math.isfinite(v)])
    if est is None:
        return None
    half = est.half_width or 0.0
    return Summary(est.mean, est.mean - half, est.mean + half, est.n)


def _per_block(runs: Sequence[Mapping[str, float]], pattern: re.Pattern[str], key: str) -> list[Summary | None]:
    """Per block index (0 .. the highest logged), the summary over the runs that have it; None where none has."""
    blocks = {int(m.group(1)) for run in runs for k in run if (m := pattern.match(k))}
    count = max(blocks) + 1 if blocks else 0
    return [summarize([run[key.format(i)] for run in runs if key.format(i) in run]) for i in range(count)]


@dataclass(frozen=True)
class LesionRow:
    """One label's lesion results: intact accuracy, per-block accuracy with that block deleted, mean drop."""

    label: str
    runs: int
    full_acc: Summary
    block_acc: tuple[Summary | None, ...]  # None: not applicable (a plain block that changes shape)
    mean_drop: Summary | None  # intact minus the mean over applicable blocks, per run, then over seeds
    worst_block: int | None  # the block whose deletion costs most (by mean accuracy)


@dataclass(frozen=True)
class AttributionRow:
    """One label's attribution results: the shortcut's share per block (residual blocks only)."""

    label: str
    runs: int
    shares: tuple[Summary | None, ...]  # None: the block has no shortcut (skip off)
    mean_share: Summary | None  # per run the mean over blocks, then over seeds


def lesion_rows(cells: Runs) -> list[LesionRow]:
    """A row per label that has lesion results, in the given order."""
    rows = []
    for label, all_runs in cells.items():
        runs = [r for r in all_runs if "lesion/full.test_acc" in r]
        if not runs:
            continue
        blocks = _per_block(runs, _LESION, LESION_KEY)
        applicable = [(i, b) for i, b in enumerate(blocks) if b is not None]
        worst = min(applicable, key=lambda ib: ib[1].mean)[0] if applicable else None
        full = summarize([r["lesion/full.test_acc"] for r in runs])
        assert full is not None  # every run kept has the key
        rows.append(LesionRow(label, len(runs), full, tuple(blocks),
                              summarize([r["lesion/mean_drop"] for r in runs if "lesion/mean_drop" in r]), worst))
    return rows


def attribution_rows(cells: Runs) -> list[AttributionRow]:
    """A row per label that has attribution results (`attribution/images` logged), in the given order."""
    rows = []
    for label, all_runs in cells.items():
        runs = [r for r in all_runs if "attribution/images" in r]
        if not runs:
            continue
        per_run = [[v for k, v in r.items() if _SHARE.match(k) and math.isfinite(v)] for r in runs]
        rows.append(AttributionRow(label, len(runs), tuple(_per_block(runs, _SHARE, SHARE_KEY)),
                                   summarize([sum(s) / len(s) for s in per_run if s])))
    return rows


def _pp(summary: Summary | None) -> str:
    """A drop in accuracy in percentage points: `4.3 pp [1.9, 6.7]`."""
    if summary is None:
        return "n/a"
    if summary.n < 2:
        return f"{100 * summary.mean:.1f} pp"
    return f"{100 * summary.mean:.1f} pp [{100 * summary.low:.1f}, {100 * summary.high:.1f}]"


def fmt(summary: Summary | None, pattern: str = "{:.1%}") -> str:
    """`91.2% [89.9, 92.5]`, `91.2%` for one seed, `n/a` for none."""
    if summary is None:
        return "n/a"
    if summary.n < 2:
        return pattern.format(summary.mean)
    return f"{pattern.format(summary.mean)} [{100 * summary.low:.1f}, {100 * summary.high:.1f}]"


def lesion_table(rows: Sequence[LesionRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text): label, seeds, intact accuracy, mean drop, worst block, accuracy per deleted block."""
    width = max((len(r.block_acc) for r in rows), default=0)
    header = ["cell", "seeds", "intact", "mean drop", "worst", *(f"-{i:02d}" for i in range(width))]
    body = [[r.label, str(r.runs), fmt(r.full_acc), _pp(r.mean_drop), "-" if r.worst_block is None else
             f"{r.worst_block:02d}", *(fmt(b, "{:.0%}") if b is not None else "n/a" for b in r.block_acc),
             *([""] * (width - len(r.block_acc)))] for r in rows]
    return header, body


def attribution_table(rows: Sequence[AttributionRow]) -> tuple[list[str], list[list[str]]]:
    """(header, rows of text): label, seeds, mean shortcut share, share per block."""
    width = max((len(r.shares) for r in rows), default=0)
    header = ["cell", "seeds", "shortcut share", *(f"{i:02d}" for i in range(width))]
    body = [[r.label, str(r.runs), fmt(r.mean_share, "{:.0%}"),
             *(fmt(s, "{:.0%}") if s is not None else "n/a" for s in r.shares),
             *([""] * (width - len(r.shares)))] for r in rows]
    return header, body


def _block_lines(ax: Axes, rows: Sequence[tuple[str, Sequence[Summary | None]]], dashed: Collection[str]) -> list[str]:
    """One line with its band per label against the block index; returns the lines' colours."""
    colors = []
    for label, blocks in rows:
        xs = list(range(len(blocks)))
        means = [b.mean if b else math.nan for b in blocks]
        line, = ax.plot(xs, means, "--" if label in dashed else "-", marker="o", label=label)
        ax.fill_between(xs, [b.low if b else math.nan for b in blocks], [b.high if b else math.nan for b in blocks],
                        color=line.get_color(), alpha=0.18, linewidth=0)
        missing = [x for x, b in zip(xs, blocks, strict=True) if b is None]
        if missing:  # not applicable: marked on the axis, never drawn as a value
            ax.plot(missing, [0.0] * len(missing), "x", color=line.get_color(), clip_on=False)
        colors.append(line.get_color())
    return colors


def lesion_figure(cells: Runs, path: Path, *, dashed: Collection[str] = (), title: str = "") -> Path | None:
    """Test accuracy with each block deleted, one line per label (`dashed`: skip off), the intact accuracy dotted;
    bands: 95% interval over seeds; x on the axis: block not applicable. None when no label has lesion results."""
    rows = lesion_rows(cells)
    if not rows:
        return None
    fig, ax = _axes()
    colors = _block_lines(ax, [(r.label, r.block_acc) for r in rows], dashed)
    for color, row in zip(colors, rows, strict=True):
        ax.axhline(row.full_acc.mean, linestyle=":", color=color, linewidth=1)
    ax.set(xlabel="deleted block (input to output)", ylabel="test accuracy", ylim=(0.0, 1.02),
           title=title or "lesion study: accuracy with one block deleted (dotted: intact; x: no bypass)")
    return _save(fig, ax, max(len(r.block_acc) for r in rows), path)


def attribution_figure(cells: Runs, path: Path, *, dashed: Collection[str] = (), title: str = "") -> Path | None:
    """The shortcut's share of each block's attribution, one line per label, bands: 95% interval over seeds.
    None when no label has attribution results."""
    rows = [r for r in attribution_rows(cells) if r.shares]
    if not rows:
        return None
    fig, ax = _axes()
    _block_lines(ax, [(r.label, r.shares) for r in rows], dashed)
    ax.axhline(0.5, linestyle=":", color="grey", linewidth=1)
    ax.set(xlabel="block (input to output)", ylabel="shortcut share of |attribution|", ylim=(0.0, 1.0),
           title=title or "attribution through the shortcut vs the residual branch (Captum, LayerIG)")
    return _save(fig, ax, max(len(r.shares) for r in rows), path)


def _axes() -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure as Canvas  # imported here: reports without analyses never load it

    fig = Canvas(figsize=(8, 4.5))
    return fig, fig.subplots()


def _save(fig: Figure, ax: Axes, blocks: int, path: Path) -> Path:
    """Block ticks, grid, legend, tight layout; written as a PNG."""
    ax.set_xticks(range(blocks))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
