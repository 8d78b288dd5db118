"""What every data source hands back, and the errors a person can act on."""

from __future__ import annotations

from dataclasses import dataclass

import torch


class DatasetError(RuntimeError):
    """A dataset could not be read; the message names the dataset, the directory and what to do."""


class DatasetMissingError(DatasetError):
    """The dataset's files are not in the data root and could not be downloaded."""


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class RawData:
    """A source's full train and test sets on the CPU: uint8 (N, C, H, W) images and int64 (N,) labels."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        for images, labels in ((self.train_images, self.train_labels), (self.test_images, self.test_labels)):
            assert images.dtype == torch.uint8 and images.dim() == 4, (images.dtype, images.shape)
            assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],), (labels.dtype, labels.shape)
