"""Figures from metric histories (matplotlib, Agg backend, PNG files). No tracking or Ray imports."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: figures are files, never windows
import matplotlib.pyplot as plt

GRAD_PREFIX = "grad/"
GRAD_RATIO = "grad/ratio_first_last"


def grad_layers(metrics: Mapping[str, float]) -> list[tuple[str, float]]:
    """(layer name, mean |grad|) from one epoch's metrics, input to output (keys are `grad/NNN.name`)."""
    keys = sorted(k for k in metrics if k.startswith(GRAD_PREFIX) and k != GRAD_RATIO)
    return [(k[len(GRAD_PREFIX):].split(".", 1)[1], float(metrics[k])) for k in keys]


def learning_curves(history: Sequence[Mapping[str, float]], path: Path, title: str = "") -> Path:
    """Train/val loss and accuracy per epoch."""
    epochs = [int(h["epoch"]) for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for split, style in (("train", "--"), ("val", "-")):
        ax_loss.plot(epochs, [h.get(f"{split}/loss", float("nan")) for h in history], style, label=split)
        ax_acc.plot(epochs, [h.get(f"{split}/acc", float("nan")) for h in history], style, label=split)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def gradient_flow(series: Mapping[str, Mapping[str, float]], path: Path, title: str = "") -> Path:
    """Mean |grad| per weighted layer, input to output, log scale; one line per labelled run (skip on vs off)."""
    fig, ax = plt.subplots(figsize=(10, 4))
    for label, metrics in series.items():
        layers = grad_layers(metrics)
        if layers:
            ax.plot(range(len(layers)), [g for _, g in layers], marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set(xlabel="weighted layer (input -> output)", ylabel="mean |gradient|", title=title or "gradient flow")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _save(fig, path)


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
