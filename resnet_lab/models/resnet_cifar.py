"""He et al. 2015's CIFAR-10 ResNets (Sec. 4.2): 6n+2 layers, 16-32-64 channels, parameter-free shortcuts."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from resnet_lab.models.registry import register
from resnet_lab.models.resnet import BasicBlock, ResNet
from resnet_lab.spec.catalog import MODEL_CATALOG

# depth -> n, the basic blocks per stage: depth = 1 stem conv + 3 stages * n blocks * 2 convs + 1 fc (6n + 2); the
# depths are the catalogue's (`spec/catalog.py`).
CIFAR_DEPTHS: dict[int, int] = {depth: (depth - 2) // 6 for depth in MODEL_CATALOG["resnet_cifar"].depths}


class PadShortcut(nn.Module):
    """Option A shortcut: subsample by the stride and zero-pad the extra channels; no parameters (He et al. 2015)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        if out_planes < in_planes:
            raise ValueError(f"option A can only add channels (got {in_planes} -> {out_planes})")
        self.in_planes = in_planes
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (N, 16, 32, 32) -> (N, 16, 16, 16)
        extra = self.out_planes - self.in_planes
        # Half the new channels in front, half behind, as the widely used reimplementation (Idelbayev) pads.
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))  # -> (N, 32, 16, 16)

    def extra_repr(self) -> str:
        return f"{self.in_planes}->{self.out_planes}, stride={self.stride}"


@register("resnet_cifar")
def resnet_cifar(
    depth: int = 20,
    width: float = 1.0,
    skip: bool = True,
    dropout: float = 0.0,
    num_classes: int = 10,
    in_channels: int = 3,
) -> ResNet:
    """ResNet-`depth` of He et al.'s CIFAR family: 3 stages of n basic blocks at 16-32-64 channels, GAP, fc.

    Shortcuts are option A (strided subsample + zero channels), so skip on and off have the same parameter count;
    ResNet-20 has 0.27M (269,722 for 10 classes), ResNet-110 1.7M, as in the paper's Table 6.
    """
    if depth not in CIFAR_DEPTHS:
        raise ValueError(
            f"resnet_cifar depth {depth} is not supported; supported: {', '.join(map(str, CIFAR_DEPTHS))}"
        )
    n = CIFAR_DEPTHS[depth]
    return ResNet(
        BasicBlock, (n, n, n), width=width, skip=skip, dropout=dropout, num_classes=num_classes,
        in_channels=in_channels, base_channels=16, shortcut=PadShortcut,
    )
