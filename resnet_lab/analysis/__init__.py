"""Analyses of a trained model, run once after training when a trial's config asks (`analysis: [lesion, attribution]`).

Plain PyTorch (Captum for attributions); no Ray or MLflow. `analyse()` is the trainer's single entry point.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from torch import nn

from resnet_lab.analysis.common import EvalSet, accuracy, block_key, fixed_subset, residual_blocks, shortcut
from resnet_lab.analysis.lesion import LESION_IMAGES, lesion_study, lesioned, lesioned_output
from resnet_lab.data import DataSplits
from resnet_lab.spec import TrialConfig

ATTRIBUTION_MAPS_PNG = "attribution_maps.png"


@dataclass
class Analysis:
    """What the analyses produced: metrics for the final result, files (name -> bytes) for the run's artifacts."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, bytes] = field(default_factory=dict)


def analyse(kinds: list[str] | tuple[str, ...], model: nn.Module, test: EvalSet, title: str = "") -> Analysis:
    """Run the requested analyses (`lesion`, `attribution`) on `model` with the test images in `test`."""
    result = Analysis()
    if "lesion" in kinds:
        images, labels = fixed_subset(test.images, test.labels, LESION_IMAGES)
        result.metrics.update(lesion_study(model, replace(test, images=images, labels=labels)))
    if "attribution" in kinds:
        from resnet_lab.analysis.attribution import ATTRIBUTION_IMAGES, input_maps, render_maps, shortcut_shares

        images, labels = fixed_subset(test.images, test.labels, ATTRIBUTION_IMAGES)
        subset = replace(test, images=images, labels=labels)
        result.metrics.update(shortcut_shares(model, subset))
        result.artifacts[ATTRIBUTION_MAPS_PNG] = render_maps(input_maps(model, subset), title)
    return result


def analyse_run(cfg: TrialConfig, model: nn.Module, data: DataSplits, *, channels_last: bool = False,
                amp: bool = False) -> Analysis:
    """The trainer's hook: `cfg.analysis` on the trained `model` with `data`'s test split (fixed subsets)."""
    test = EvalSet(*data.test, data.mean, data.std, channels_last=channels_last, amp=amp)
    skip = "" if cfg.model.skip is None else f", skip {str(cfg.model.skip).lower()}"
    title = f"{cfg.model.name}{'' if cfg.model.depth is None else cfg.model.depth}{skip}, seed {cfg.seed}"
    return analyse(cfg.analysis, model, test, title)


__all__ = [
    "ATTRIBUTION_MAPS_PNG", "LESION_IMAGES", "Analysis", "EvalSet", "accuracy", "analyse", "analyse_run", "block_key",
    "fixed_subset", "lesion_study", "lesioned", "lesioned_output", "residual_blocks", "shortcut",
]
