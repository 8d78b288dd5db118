"""Figures from metric histories (matplotlib, Agg backend, PNG files). No tracking or Ray imports."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt
import matplotlib.ticker

FLOW_PHASES = ("init", "final")


def gradient_flow(series: Mapping[str, Mapping[str, Sequence[Band]]], path: Path, *, dashed: Collection[str] = (),
                  title: str = "") -> Path:
    """Gradient norm at each block's output, input to output (log scale), one panel per phase (init, final): one
    line per label with its band (geometric mean over seeds and its 95% interval); `dashed` labels (skip off)."""
    phases = [ph for ph in FLOW_PHASES if any(ph in by_phase for by_phase in series.values())]
    fig, axes = plt.subplots(1, max(1, len(phases)), figsize=(6 * max(1, len(phases)), 4.5), squeeze=False)
    for ax, phase in zip(axes[0], phases, strict=False):
        for label, by_phase in series.items():
            bands = by_phase.get(phase, ())
            if not bands:
                continue
            xs = [b.x for b in bands]
            line, = ax.plot(xs, [b.mean for b in bands], "--" if label in dashed else "-", marker="o",
                            markersize=3, label=label)
            ax.fill_between(xs, [b.low for b in bands], [b.high for b in bands], color=line.get_color(), alpha=0.15)
        ax.set_yscale("log")
        ax.set(xlabel="block (stem -> head)", ylabel="||dL/d(block output)|| per image",
               title="at initialisation" if phase == "init" else "after training (tested weights)")
        ax.grid(alpha=0.3, which="both")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(fontsize=7)
    fig.suptitle(title or "gradient flow: norm of the loss gradient at each block's output (eval mode, fixed batch)")
    return _save(fig, path)


class Band(NamedTuple):
    """A mean with its interval at one x (depth, parameter count); low == high == mean when there is none."""

    x: float
    mean: float
    low: float
    high: float


def accuracy_vs_depth(lines: Mapping[str, Sequence[Band]], levels: Mapping[str, Band], path: Path, *,
                      dashed: Collection[str] = (), ylabel: str = "test accuracy", title: str = "") -> Path:
    """Accuracy against depth, one line with its CI band per label (skip on / off); models without a depth
    (`levels`) as horizontal lines with their band."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    depths = sorted({p.x for points in lines.values() for p in points})
    span = (depths[-1] - depths[0]) if len(depths) > 1 else 8.0
    for i, (label, points) in enumerate(lines.items()):
        pts = sorted(points)
        xs = [p.x for p in pts]
        dodge = (i - (len(lines) - 1) / 2) * 0.015 * span  # error bars of lines meeting at one depth stay apart
        xs = [x + dodge for x in xs]
        line, = ax.plot(xs, [p.mean for p in pts], "--" if label in dashed else "-", marker="o", label=label)
        ax.fill_between(xs, [p.low for p in pts], [p.high for p in pts], color=line.get_color(), alpha=0.15)
        with_ci = [(x, p) for x, p in zip(xs, pts, strict=True) if p.high > p.low]  # n=1 has no interval to draw
        if with_ci:
            ax.errorbar([x for x, _ in with_ci], [p.mean for _, p in with_ci],
                        yerr=[[p.mean - p.low for _, p in with_ci], [p.high - p.mean for _, p in with_ci]],
                        fmt="none", ecolor=line.get_color(), capsize=4)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, level) in enumerate(levels.items(), start=len(lines)):
        color = colors[i % len(colors)]
        ax.axhline(level.mean, linestyle=":", color=color, label=label)
        ax.axhspan(level.low, level.high, color=color, alpha=0.12)
    if depths:
        ax.set_xticks(depths)
        if len(depths) == 1:
            ax.set_xlim(depths[0] - span / 2, depths[0] + span / 2)
    ax.set(xlabel="depth (layers)", ylabel=ylabel, title=title or f"{ylabel} vs depth, skip on vs off (95% CI)")
    _clip_to_fraction(ax, [*(p for pts in lines.values() for p in pts), *levels.values()])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _clip_to_fraction(ax: plt.Axes, bands: Sequence[Band]) -> None:
    """Accuracies live in [0, 1]: an interval reaching past 1 is drawn cut at the axis (the table has it whole)."""
    if bands and all(0.0 <= b.mean <= 1.0 for b in bands):
        low, high = ax.get_ylim()
        ax.set_ylim(max(low, 0.0), min(high, 1.01))


def learning_curves_by_run(histories: Mapping[str, Sequence[Mapping[str, float]]], path: Path,
                           title: str = "") -> Path:
    """Loss and accuracy per epoch for several runs (val solid, train dashed, one colour per run)."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, history in histories.items():
        epochs = [int(h["epoch"]) for h in history]
        line, = ax_loss.plot(epochs, [h.get("val/loss", float("nan")) for h in history], "-", marker=".",
                             label=f"{label} val")
        color = line.get_color()
        ax_loss.plot(epochs, [h.get("train/loss", float("nan")) for h in history], "--", color=color)
        ax_acc.plot(epochs, [h.get("val/acc", float("nan")) for h in history], "-", marker=".", color=color,
                    label=f"{label} val")
        ax_acc.plot(epochs, [h.get("train/acc", float("nan")) for h in history], "--", color=color)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss (val solid, train dashed)")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy (val solid, train dashed)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax_acc.legend(fontsize=7)
    fig.suptitle(title or "learning curves of the best run per cell")
    return _save(fig, path)


def accuracy_vs_params(points: Mapping[str, Band], path: Path, *, dashed: Collection[str] = (),
                       ylabel: str = "test accuracy", title: str = "") -> Path:
    """Accuracy against parameter count with CI error bars, one labelled point per cell (log x when the counts
    span a decade or more); points in `dashed` (skip off) drawn hollow."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, p in points.items():
        hollow = label in dashed
        bar = ax.errorbar([p.x], [p.mean], yerr=[[p.mean - p.low], [p.high - p.mean]], fmt="s" if hollow else "o",
                          capsize=4, mfc="none" if hollow else None, label=label)
        ax.annotate(label, (p.x, p.mean), textcoords="offset points", xytext=(6, 4), fontsize=7,
                    color=bar.lines[0].get_color())
    sizes = [p.x for p in points.values() if p.x > 0]
    if sizes and max(sizes) / min(sizes) >= 10:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())
    ax.margins(x=0.15)
    ax.set(xlabel="parameters", ylabel=ylabel, title=title or f"{ylabel} vs parameter count (95% CI)")
    _clip_to_fraction(ax, list(points.values()))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
