"""`load_data`: a dataset on the device as uint8, split into train / val / test, with its normalization stats."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from resnet_lab.data.base import RawData
from resnet_lab.data.loader import Augment, DeviceLoader
from resnet_lab.spec.datasets import FILE_DATASETS
from resnet_lab.spec.trial import DatasetConfig

Split = tuple[torch.Tensor, torch.Tensor]

# Crop (and flip where a mirror keeps the label: FILE_DATASETS' `flip`) for the file datasets. Synthetic data trains
# without augmentation by default: its tests and smoke runs want the plain task.
DEFAULT_AUGMENT: dict[str, Augment] = {
    **{name: Augment(crop=True, flip=facts.flip) for name, facts in FILE_DATASETS.items()},
    "synthetic": Augment(),
    "image_folder": Augment(resized_crop=True, flip=True),  # ImageNet's recipe: random resized crop + flip
}
FLIP_ALLOWED: dict[str, bool] = {**{name: facts.flip for name, facts in FILE_DATASETS.items()},
                                 "synthetic": True, "image_folder": True}
_STATS_CHUNK = 8192  # images per histogram step: bounds the per-channel copy to 8 MB at 32x32


def resolve_augment(name: str, augment: bool | None) -> Augment:
    """`dataset.augment`: None -> the dataset's default; False -> none; True -> crop, plus flip where allowed."""
    if augment is None:
        return DEFAULT_AUGMENT[name]
    if augment and name == "image_folder":
        return DEFAULT_AUGMENT[name]
    return Augment(crop=True, flip=FLIP_ALLOWED[name]) if augment else Augment()


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class DataSplits:
    """A dataset resident on one device: uint8 (N, C, H, W) images with int64 labels per split.

    `mean` and `std` are per-channel, in [0, 1] pixel units, computed on the training split only. `test` is kept
    apart for the final evaluation; model selection uses `val`, carved from the official training set.
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: torch.Tensor
    std: torch.Tensor
    augment: Augment  # the dataset's default; `augment_for(cfg.augment)` applies a config's override

    @property
    def device(self) -> torch.device:
        """Where the images live."""
        return self.train[0].device

    def augment_for(self, augment: bool | None) -> Augment:
        """The augmentation `dataset.augment` asks for on this dataset (see `resolve_augment`)."""
        return resolve_augment(self.name, augment) if augment is not None else self.augment

    def train_loader(self, batch_size: int, *, order_generator: torch.Generator,
                     augment_generator: torch.Generator | None, augment: Augment | None = None,
                     drop_last: bool = False, channels_last: bool = False) -> DeviceLoader:
        """Shuffled batches of the training split with `augment` (default: the dataset's)."""
        return DeviceLoader(*self.train, batch_size, mean=self.mean, std=self.std, shuffle=True,
                            drop_last=drop_last, augment=self.augment if augment is None else augment,
                            order_generator=order_generator, augment_generator=augment_generator,
                            channels_last=channels_last)

    def eval_loader(self, split: str, batch_size: int, *, channels_last: bool = False) -> DeviceLoader:
        """Batches of 'train', 'val' or 'test' in order, without augmentation."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test' (got {split!r})")
        return DeviceLoader(*getattr(self, split), batch_size, mean=self.mean, std=self.std,
                            channels_last=channels_last)


def split_indices(n: int, cfg: DatasetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices into a training set of `n` images: seeded shuffle, `subset` kept, then val carved off.

    Depends only on n, split_seed, subset and val_fraction, so every trial of a sweep validates on the same images.
    """
    if cfg.subset is not None and cfg.subset > n:
        raise ValueError(f"dataset.subset must be <= the {cfg.name} training set size {n} (got {cfg.subset})")
    kept = cfg.subset if cfg.subset is not None else n
    n_val = max(1, round(kept * cfg.val_fraction))
    if kept - n_val < 1:
        raise ValueError(f"dataset: {kept} training images with val_fraction {cfg.val_fraction} leave "
                         f"{kept - n_val} for training ({n_val} for validation); use a larger dataset.subset "
                         "or a smaller dataset.val_fraction")
    generator = torch.Generator().manual_seed(cfg.split_seed)  # CPU: the split is identical on every device
    order = torch.randperm(n, generator=generator)[:kept]
    # Sorted: the stored order follows the source file, and the loader shuffles anyway.
    return order[n_val:].sort().values, order[:n_val].sort().values


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, std) of uint8 (N, C, H, W) images, in [0, 1] units, as float32 on the images' device."""
    # A 256-bin histogram per channel: exact, and 0.15 s for 45k CIFAR images on 2 CPU cores (float64 sums: 2.4 s).
    channels = images.shape[1]
    counts = torch.zeros(channels, 256, dtype=torch.int64, device=images.device)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start:start + _STATS_CHUNK]
        for c in range(channels):
            counts[c] += torch.bincount(chunk[:, c].reshape(-1), minlength=256)
    levels = torch.arange(256, dtype=torch.float64, device=images.device)
    total = counts.sum(1).to(torch.float64)
    mean = counts.to(torch.float64) @ levels / total
    variance = counts.to(torch.float64) @ levels.square() / total - mean.square()
    # Floor at one grey level: a constant channel would otherwise normalize to inf.
    std = variance.clamp_min(0).sqrt().clamp_min(1.0)
    return (mean / 255).to(torch.float32), (std / 255).to(torch.float32)


def read_raw(cfg: DatasetConfig) -> RawData:
    """The full train and test sets of `cfg.name` on the CPU (downloading or unpacking files if needed)."""
    if cfg.name == "synthetic":
        from resnet_lab.data.synthetic import make_synthetic

        return make_synthetic(cfg.synthetic)
    if cfg.name == "image_folder":
        from resnet_lab.data.sources import read_image_folder

        return read_image_folder(cfg.root_path(), cfg.folder_image_size)
    from resnet_lab.data.sources import read_source  # imports torchvision: ~7.7 s cold, only when needed

    return read_source(cfg.name, cfg.root_path(), cfg.download)


def select_classes(raw: RawData, classes: list[int], name: str) -> RawData:
    """Only the images of `classes`, relabelled 0..k-1 in the listed order (`dataset.classes`)."""
    unknown = [c for c in classes if c >= raw.num_classes]
    if unknown:
        raise ValueError(f"dataset.classes: {name} has classes 0-{raw.num_classes - 1}; no class {unknown[0]}")
    lookup = torch.full((raw.num_classes,), -1, dtype=torch.int64)
    lookup[torch.tensor(classes)] = torch.arange(len(classes))
    splits = []
    for images, labels in ((raw.train_images, raw.train_labels), (raw.test_images, raw.test_labels)):
        new = lookup[labels]
        keep = (new >= 0).nonzero().squeeze(1)
        splits += [images.index_select(0, keep), new.index_select(0, keep)]
    return RawData(*splits, num_classes=len(classes))


def prepare_data(cfg: DatasetConfig) -> None:
    """Fetch or unpack the dataset's files once, e.g. in a sweep's driver before trials start in parallel."""
    if not cfg.has_files:
        return  # generated in each trial: no files to fetch, nothing to build in the driver
    read_raw(cfg)


def load_data(cfg: DatasetConfig, device: torch.device | str = "cpu") -> DataSplits:
    """Read `cfg`'s dataset, split train into train/val, and move every split to `device` as uint8.

    Raises DatasetMissingError when the files are absent and cannot be downloaded, ValueError for a split that
    leaves no training or validation image.
    """
    raw = read_raw(cfg)
    if cfg.classes is not None:
        raw = select_classes(raw, cfg.classes, cfg.name)
    train_idx, val_idx = split_indices(raw.train_labels.shape[0], cfg)
    device = torch.device(device)
    train = (raw.train_images.index_select(0, train_idx).to(device), raw.train_labels[train_idx].to(device))
    val = (raw.train_images.index_select(0, val_idx).to(device), raw.train_labels[val_idx].to(device))
    test = (raw.test_images.to(device), raw.test_labels.to(device))
    mean, std = channel_stats(train[0])
    return DataSplits(name=cfg.name, train=train, val=val, test=test, num_classes=raw.num_classes,
                      in_channels=raw.train_images.shape[1], image_size=raw.train_images.shape[2], mean=mean,
                      std=std, augment=DEFAULT_AUGMENT[cfg.name])
