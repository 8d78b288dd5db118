"""Which models exist and which parameters each accepts, without importing torch.

Why a catalogue beside the registry in `resnet_lab.models`: a spec error must print in under 2 s, and importing
torch alone costs several seconds, so the spec validates model names, depths and parameters against this table.
`models.register()` refuses a name missing here and `tests/test_models.py` checks that both agree, so the two
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelEntry:
    """What the spec may say about one registered model."""

    params: frozenset[str]  # ModelConfig fields this model accepts (besides num_classes / in_channels)
    # supported depth -> the block it is built from ("basic", "bottleneck"); empty when the model has no `depth`.
    # The one table of depths: the spec checks against it and the model builders take their blocks from it.
    blocks: Mapping[int, str] = field(default_factory=dict)
    default_depth: int | None = None  # the builder's default `depth`
    residual: bool = False  # has a `skip` switch
    doc: str = ""

    @property
    def depths(self) -> tuple[int, ...]:
        """Supported depths; empty when the model has no `depth`."""
        return tuple(self.blocks)

    def architecture(self, depth: int | None, block: str | None) -> tuple[int | None, str]:
        """(depth, block) a model is built with once defaults apply: `block` "-" for a plain CNN, the depth's own
        block ("basic", "bottleneck") unless `preact` (or the block itself) was asked for."""
        depth = depth if depth is not None else self.default_depth
        if not self.residual:
            return depth, "-"
        natural = self.blocks.get(depth, "basic") if depth is not None else "basic"
        return depth, block or natural


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
        blocks={8: "basic", 10: "basic", 18: "basic", 34: "basic", 50: "bottleneck", 101: "bottleneck",
                152: "bottleneck"},
        default_depth=18,
        residual=True,
        doc="ResNet, 4 stages (3 at depth 8); basic blocks up to 34, bottleneck from 50; preact optional; "
            "stem cifar (3x3, 32 px) or imagenet (7x7/2 + max-pool, torchvision's)",
    ),
    "resnet_cifar": ModelEntry(
        params=frozenset({"depth", "width", "skip", "dropout"}),
        blocks=dict.fromkeys((20, 32, 44, 56, 110), "basic"),
        default_depth=20,
        residual=True,
        doc="He et al. 2016 CIFAR family, 6n+2 layers, 16-32-64 channels, parameter-free (option A) shortcuts",
    ),
}


def model_names() -> list[str]:
    """Names of every model the spec accepts, sorted."""
    return sorted(MODEL_CATALOG)
