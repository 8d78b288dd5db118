"""What both analyses share: the residual blocks of a model, the fixed test images, plain accuracy."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resnet_lab.data import DeviceLoader


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class EvalSet:
    """Fixed test images for an analysis: uint8 (N, C, H, W) and int64 (N,) on one device, with the normalization."""

    images: Tensor
    labels: Tensor
    mean: Tensor
    std: Tensor
    batch_size: int = 1024
    channels_last: bool = False
    amp: bool = False  # bf16 autocast (CUDA only), as the trainer evaluates

    def loader(self) -> DeviceLoader:
        """Batches in order, normalized, without augmentation."""
        return DeviceLoader(self.images, self.labels, self.batch_size, mean=self.mean, std=self.std,
                            channels_last=self.channels_last)

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        on_cuda = self.images.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if self.amp and on_cuda else contextlib.nullcontext()


def fixed_subset(images: Tensor, labels: Tensor, max_images: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """At most `max_images` of a split, the same seeded draw for every trial (sorted: file order kept)."""
    n = labels.shape[0]
    if n <= max_images:
        return images, labels
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
    pick = pick.to(images.device)
    return images.index_select(0, pick), labels.index_select(0, pick)


def residual_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's residual blocks (skip on or off) in forward order; empty for a model without any.

    A block is a module with a `skip` flag and a `downsample` slot, as every block in `resnet_lab.models.resnet`
    (BasicBlock, Bottleneck and their pre-activation versions). Block i is `block{i:02d}` in metric keys.
    """
    return [(name, m) for name, m in model.named_modules()
            if name and hasattr(m, "skip") and hasattr(m, "downsample") and hasattr(m, "preact")]


def block_key(index: int) -> str:
    """`block03`: the metric name of the block at `index` in `residual_blocks` order."""
    return f"block{index:02d}"


def shortcut(block: nn.Module, x: Tensor) -> Tensor:
    """What a block's shortcut adds to its residual branch: `x`, or its `downsample` projection.

    Pre-activation blocks project the activated input relu(bn1(x)), as their forward does; post-activation blocks
    project `x` itself.
    """
    if block.downsample is None:
        return x
    return block.downsample(block.relu(block.bn1(x)) if block.preact else x)


@torch.no_grad()
def accuracy(model: nn.Module, data: EvalSet) -> float:
    """Top-1 accuracy of `model` (in eval mode) on `data`."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.images.device)
    for x, y in data.loader():
        with data.autocast():
            correct += (model(x).argmax(1) == y).sum()
    return correct.item() / max(1, data.labels.shape[0])
