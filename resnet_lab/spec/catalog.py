"""Which models exist and which parameters each accepts, without importing torch.

Why a catalogue beside the registry in `resnet_lab.models`: a spec error must print in under 2 s, and importing
torch alone costs several seconds, so the spec validates model names, depths and parameters against this table.
`models.register()` refuses a name missing here and `tests/test_models.py` checks that both agree, so the two
cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelEntry:
    """What the spec may say about one registered model."""

    params: frozenset[str]  # ModelConfig fields this model accepts (besides num_classes / in_channels)
    depths: tuple[int, ...] = ()  # supported depths; empty when the model has no `depth`
    residual: bool = False  # has a `skip` switch
    doc: str = ""


BLOCKS = ("basic", "bottleneck", "preact")

MODEL_CATALOG: dict[str, ModelEntry] = {
    "baseline_cnn": ModelEntry(
        params=frozenset({"dropout", "width"}),
        doc="4 conv blocks (conv-BN-ReLU, pool, dropout) -> GAP -> dropout -> linear; ~392k params",
    ),
    "mini_resnet": ModelEntry(
        params=frozenset({"dropout", "skip", "width"}),
        residual=True,
        doc="ResNet-14: stem, 3 stages of 2 basic blocks (64-128-256), fc; ~2.8M params",
    ),
    "resnet": ModelEntry(
        params=frozenset({"depth", "block", "width", "skip", "dropout", "stem"}),
        depths=(8, 10, 18, 34, 50, 101, 152),
        residual=True,
        doc="ResNet, 4 stages (3 at depth 8); basic blocks up to 34, bottleneck from 50; preact optional; "
            "stem cifar (3x3, 32 px) or imagenet (7x7/2 + max-pool, torchvision's)",
    ),
    "resnet_cifar": ModelEntry(
        params=frozenset({"depth", "width", "skip", "dropout"}),
        depths=(20, 32, 44, 56, 110),
        residual=True,
        doc="He et al. 2016 CIFAR family, 6n+2 layers, 16-32-64 channels, parameter-free (option A) shortcuts",
    ),
}


def model_names() -> list[str]:
    """Names of every model the spec accepts, sorted."""
    return sorted(MODEL_CATALOG)
