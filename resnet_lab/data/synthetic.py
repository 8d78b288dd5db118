"""A generated dataset for tests and smoke runs: one smooth random pattern per class, plus per-image noise."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from resnet_lab.data.base import RawData
from resnet_lab.spec.trial import SyntheticConfig

# Pixel units: patterns have std 40 around mid-grey 128, so +-3 std (8-248) stays inside uint8 before noise.
_MID_GREY = 128.0
_PATTERN_STD = 40.0
# A 4x4 grid of random values upsampled to the image: low-frequency patterns that survive a 4-pixel crop shift.
_PATTERN_CELLS = 4
_CHUNK = 4096  # images generated per step: bounds the float32 scratch to ~50 MB at 3x32x32


def class_patterns(cfg: SyntheticConfig, generator: torch.Generator) -> torch.Tensor:
    """(num_classes, C, S, S) float patterns with unit std each, drawn from `generator`."""
    cells = torch.randn(cfg.num_classes, cfg.channels, _PATTERN_CELLS, _PATTERN_CELLS, generator=generator)
    patterns = F.interpolate(cells, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    return patterns / patterns.std(dim=(1, 2, 3), keepdim=True)


def _draw(n: int, patterns: torch.Tensor, noise: float, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    num_classes = patterns.shape[0]
    # Balanced classes (n // K or n // K + 1 each), in random order.
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    images = torch.empty(n, *patterns.shape[1:], dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        y = labels[start:start + _CHUNK]
        eps = torch.randn(len(y), *patterns.shape[1:], generator=generator)
        x = torch.add(patterns.index_select(0, y), eps, alpha=noise).mul_(_PATTERN_STD).add_(_MID_GREY)
        images[start:start + _CHUNK] = x.round_().clamp_(0, 255)
    return images, labels


def make_synthetic(cfg: SyntheticConfig) -> RawData:
    """Train and test sets, identical for the same `cfg` (everything is drawn from one generator seeded cfg.seed)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    patterns = class_patterns(cfg, generator)
    # Train before test: changing test_size leaves the training images unchanged.
    train = _draw(cfg.train_size, patterns, cfg.noise, generator)
    test = _draw(cfg.test_size, patterns, cfg.noise, generator)
    return RawData(*train, *test, num_classes=cfg.num_classes)
