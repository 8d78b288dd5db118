"""Data layer: datasets resident on the device as uint8, split train/val/test, batched and augmented there.

`load_data(cfg, device)` returns `DataSplits`; `DeviceLoader` iterates normalized, augmented batches from it.
Plain PyTorch; torchvision is imported only when a real dataset is read (see `sources`).
"""

from __future__ import annotations

from resnet_lab.data.base import DatasetError, DatasetMissingError, RawData
from resnet_lab.data.loader import NO_AUGMENT, Augment, DeviceLoader, crop_flip, random_boxes, resized_crop_flip
from resnet_lab.data.splits import (
    DEFAULT_AUGMENT,
    DataSplits,
    channel_stats,
    load_data,
    prepare_data,
    read_raw,
    resolve_augment,
    split_indices,
)

__all__ = [
    "DEFAULT_AUGMENT", "NO_AUGMENT", "Augment", "DataSplits", "DatasetError", "DatasetMissingError", "DeviceLoader",
    "RawData", "channel_stats", "crop_flip", "load_data", "prepare_data", "random_boxes", "read_raw",
    "resized_crop_flip", "resolve_augment", "split_indices",
]
