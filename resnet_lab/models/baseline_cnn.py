"""A plain CNN baseline: four conv-BN-ReLU-pool blocks, global average pool, linear."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from resnet_lab.models.registry import register
from resnet_lab.models.resnet import conv3x3, weight_init_scope

BASE_CHANNELS: tuple[int, ...] = (32, 64, 128, 256)  # 391,466 params for 3 channels, 10 classes


def conv_block(in_channels: int, out_channels: int, dropout: float) -> nn.Sequential:
    """conv3x3-BN-ReLU, 2x2 max-pool, dropout."""
    return nn.Sequential(
        conv3x3(in_channels, out_channels),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        # ceil_mode so small inputs never pool to nothing: 8x8 -> 4, 2, 1, 1 and 28x28 -> 14, 7, 4, 2.
        nn.MaxPool2d(2, ceil_mode=True),
        nn.Dropout(dropout),
    )


class BaselineCNN(nn.Module):
    """Four conv blocks (32-64-128-256 x width) -> global average pool -> dropout -> linear."""

    def __init__(
        self, *, width: float = 1.0, dropout: float = 0.0, num_classes: int = 10, in_channels: int = 3
    ) -> None:
        super().__init__()
        channels = [max(1, round(c * width)) for c in BASE_CHANNELS]
        with weight_init_scope(self):
            ins = [in_channels, *channels[:-1]]
            self.features = nn.Sequential(*(conv_block(i, o, dropout) for i, o in zip(ins, channels, strict=True)))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (N, 3, 32, 32) -> (N, 64, 16, 16) -> ... -> (N, 256, 2, 2)
        x = torch.flatten(self.avgpool(x), 1)  # -> (N, 256)
        return self.fc(self.dropout(x))  # -> (N, num_classes)


@register("baseline_cnn")
def baseline_cnn(width: float = 1.0, dropout: float = 0.0, num_classes: int = 10, in_channels: int = 3) -> BaselineCNN:
    """The plain CNN baseline, 391k params at width 1 (3 channels, 10 classes)."""
    return BaselineCNN(width=width, dropout=dropout, num_classes=num_classes, in_channels=in_channels)
