"""Batches straight from a device-resident uint8 dataset, augmented on the device (airbench's approach).

No DataLoader workers, no PIL, no per-image Python: a 50k-image CIFAR epoch is a few hundred tensor ops.
Every random number comes from the generators the caller passes in (data order and augmentation apart, as airbench
keeps `order_seed` and `aug_seed`), and an epoch draws all of them when it starts: restoring the generators' states
(`Generator.set_state`) reproduces the following epochs exactly, however much of an epoch was consumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop of the zero-padded image (or a random resized crop), horizontal flip."""

    crop: bool = False
    flip: bool = False
    padding: int = 4  # pixels of zero padding a side before the 32x32 crop (He et al. 2016, CIFAR)
    # Random resized crop (Szegedy et al. 2015, torchvision's RandomResizedCrop) for larger images: a box of
    # `scale` of the image's area and aspect ratio in [3/4, 4/3], resized back to the image's size. The lower
    # bound 0.35 instead of ImageNet's 0.08 is fast.ai's choice for Imagenette-sized data and short runs.
    resized_crop: bool = False
    scale: tuple[float, float] = (0.35, 1.0)

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ValueError(f"Augment.padding must be >= 0 (got {self.padding})")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"Augment.scale must satisfy 0 < low <= high <= 1 (got {self.scale})")
        if self.crop and self.resized_crop:
            raise ValueError("Augment: choose crop (padded) or resized_crop, not both")

    @property
    def active(self) -> bool:
        """Whether this augmentation changes anything."""
        return self.flip or self.resized_crop or (self.crop and self.padding > 0)


def resized_crop_flip(images: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Resize each image's box back to the full (H, W), mirroring where `flips`: one bilinear grid_sample.

    Args:
        images: uint8 (N, C, H, W).
        boxes: (N, 4) float (center x, center y, width, height) as fractions of the image's side, inside it.
        flips: (N,) bool; True mirrors left-right.
    """
    n, c, h, w = images.shape
    boxes = boxes.to(images.device, torch.float32)
    # affine_grid maps output coordinates in [-1, 1] to input ones: x_in = width * x_out + (2 * cx - 1).
    sx = boxes[:, 2] * torch.where(flips.to(images.device), -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 2] = sx, 2 * boxes[:, 0] - 1
    theta[:, 1, 1], theta[:, 1, 2] = boxes[:, 3], 2 * boxes[:, 1] - 1
    grid = F.affine_grid(theta, [n, c, h, w], align_corners=False)
    out = F.grid_sample(images.to(torch.float32), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def random_boxes(n: int, scale: tuple[float, float], generator: torch.Generator) -> torch.Tensor:
    """(n, 4) random-resized-crop boxes (cx, cy, w, h) in image fractions, on the generator's device.

    Area ~ U(scale), log aspect ratio ~ U(log 3/4, log 4/3) as torchvision draws them; a side longer than the image
    is clipped to it (torchvision retries 10 times, then falls back to a center crop).
    """
    u = torch.rand(n, 4, generator=generator, device=generator.device)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    ratio = torch.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[:, 1])
    w, h = (area * ratio).sqrt().clamp(max=1.0), (area / ratio).sqrt().clamp(max=1.0)
    return torch.stack([w / 2 + (1 - w) * u[:, 2], h / 2 + (1 - h) * u[:, 3], w, h], dim=1)


NO_AUGMENT = Augment()


def crop_flip(images: torch.Tensor, offsets: torch.Tensor, flips: torch.Tensor, padding: int) -> torch.Tensor:
    """Crop each image at its (dy, dx) offset in a `padding`-wide zero frame, mirroring where `flips`: one gather.

    Args:
        images: (N, C, H, W), any dtype; zero is the padding value (black for uint8, as torchvision's RandomCrop).
        offsets: (N, 2) integers in [0, 2 * padding]; (padding, padding) keeps the image in place.
        flips: (N,) bool; True mirrors left-right.
    """
    n, c, h, w = images.shape
    device = images.device
    framed = F.pad(images, (padding,) * 4) if padding else images
    hp, wp = h + 2 * padding, w + 2 * padding
    offsets, flips = offsets.to(device, torch.int64), flips.to(device)
    # Rows first: each output row (n, c, r) is a whole row r + dy of the frame, so index_select copies rows
    # (1.1 ms for the whole crop+flip of a 512x3x32x32 uint8 batch on 2 CPU cores; one 4-D gather took 11 ms).
    plane = torch.arange(n * c, device=device).view(n, c, 1) * hp  # first frame row of each (image, channel)
    rows = (plane + offsets[:, None, :1] + torch.arange(h, device=device)).view(-1)  # (N * C * H,)
    picked = framed.reshape(n * c * hp, wp).index_select(0, rows).view(n, c * h, wp)
    # Then columns: a window starting at dx, read right-to-left where flipped.
    cols = torch.arange(w, device=device).expand(n, w)
    cols = offsets[:, 1:] + torch.where(flips[:, None], w - 1 - cols, cols)  # (N, W)
    return picked.gather(2, cols[:, None, :].expand(n, c * h, w)).view(n, c, h, w)


class DeviceLoader:
    """Iterates (images, labels) batches of a device-resident uint8 split, normalized, optionally augmented.

    Yields float (N, C, H, W) images, `(x / 255 - mean) / std` per channel, in `dtype` (channels_last memory
    format if asked), and int64 labels, all on the data's device. `len(loader)` is the number of batches.
    Generators may live on the CPU or on the data's device. The trainer keeps them on the CPU on every device: a CPU
    generator's state loads on any node (a CUDA generator's does not load into a CPU one), and an epoch's draws are
    made once in `iter()` and copied to the device in one transfer each (~1 ms for 50k images).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        mean: torch.Tensor,
        std: torch.Tensor,
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment = NO_AUGMENT,
        order_generator: torch.Generator | None = None,
        augment_generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W) (got {images.dtype} {tuple(images.shape)})")
        if labels.shape != (images.shape[0],) or labels.device != images.device:
            raise ValueError(f"labels must be ({images.shape[0]},) on {images.device} "
                             f"(got {tuple(labels.shape)} on {labels.device})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0 (got {batch_size})")
        # Explicit generators only: the global RNG would tie data order to weight init and break resume.
        if shuffle and order_generator is None:
            raise ValueError("shuffle=True needs an order_generator (a torch.Generator)")
        if augment.active and augment_generator is None:
            raise ValueError(f"augment={augment} needs an augment_generator (a torch.Generator)")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.drop_last, self.augment = shuffle, drop_last, augment
        self.order_generator, self.augment_generator = order_generator, augment_generator
        self.dtype, self.channels_last = dtype, channels_last
        channels = images.shape[1]
        std32 = std.to(images.device, torch.float32).view(1, channels, 1, 1)
        # (x / 255 - mean) / std == x * scale - shift: one multiply and one subtract per element.
        self._scale = 1.0 / (255.0 * std32)
        self._shift = mean.to(images.device, torch.float32).view(1, channels, 1, 1) / std32

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Draw the whole epoch's randomness here, not lazily per batch: the generators' states after iter() do not
        # depend on how many batches the caller consumed.
        n, device = self.images.shape[0], self.images.device
        order = None
        if self.shuffle:
            g = self.order_generator
            assert g is not None  # checked in __init__
            order = torch.randperm(n, generator=g, device=g.device).to(device)
        offsets = flips = boxes = None
        if self.augment.active:
            g, aug = self.augment_generator, self.augment
            assert g is not None  # checked in __init__
            pad = aug.padding if aug.crop else 0
            if aug.resized_crop:
                boxes = random_boxes(n, aug.scale, g).to(device)
            if aug.crop:
                offsets = torch.randint(0, 2 * pad + 1, (n, 2), generator=g, device=g.device).to(device)
            else:
                offsets = torch.zeros(n, 2, dtype=torch.int64, device=device)
            if aug.flip:
                flips = (torch.rand(n, generator=g, device=g.device) < 0.5).to(device)
            else:
                flips = torch.zeros(n, dtype=torch.bool, device=device)
        return self._batches(order, offsets, flips, boxes)

    def _batches(self, order: torch.Tensor | None, offsets: torch.Tensor | None, flips: torch.Tensor | None,
                 boxes: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pad = self.augment.padding if self.augment.crop else 0
        for i in range(len(self)):
            batch = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if order is None:
                x, y = self.images[batch], self.labels[batch]  # views, no copy
            else:
                index = order[batch]
                # index_select: 0.15 ms for 512 CIFAR images vs 5.5 ms for images[index] on 2 CPU cores
                x, y = self.images.index_select(0, index), self.labels.index_select(0, index)
            if boxes is not None and flips is not None:
                x = resized_crop_flip(x, boxes[batch], flips[batch])  # the resampled batch only, back to uint8
            elif offsets is not None and flips is not None:
                x = crop_flip(x, offsets[batch], flips[batch], pad)  # on uint8: a quarter of float32's traffic
            yield self.normalize(x), y

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float in this loader's dtype and memory format."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # convert while it is 1 byte/element
        if images.is_contiguous():
            # Broadcasting (1, C, 1) over (N, C, H*W) runs ~1.4x faster on CPU than (1, C, 1, 1) over 4-D.
            n, c, h, w = images.shape
            x = images.view(n, c, h * w).to(torch.float32)
            x = x.mul_(self._scale.view(1, c, 1)).sub_(self._shift.view(1, c, 1)).view(n, c, h, w)
        else:
            x = images.to(torch.float32).mul_(self._scale).sub_(self._shift)
        return x if self.dtype == torch.float32 else x.to(self.dtype)
