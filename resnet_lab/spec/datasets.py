"""The datasets a spec can name, and the fixed facts of the published ones: the one table the data layer, the
parameter matching and the cost estimate read (torch-free, so spec validation and `--dry-run` import it for free).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Literal

DatasetName = Literal["cifar10", "cifar100", "svhn", "fashion_mnist", "synthetic", "image_folder"]
DATASET_NAMES: tuple[str, ...] = typing.get_args(DatasetName)
# image_folder's side length when dataset.image_size is unset: torchvision's ImageNet evaluation crop.
DEFAULT_FOLDER_IMAGE_SIZE = 224


@dataclass(frozen=True)
class DatasetFacts:
    """A published dataset as the models see it (torchvision's classes; Krizhevsky 2009, Netzer et al. 2011,
    Xiao et al. 2017). Knowing them without reading the files saves seconds to minutes before a dry run."""

    num_classes: int
    channels: int
    image_size: int  # side in pixels after loading (Fashion-MNIST's 28 is zero-padded to 32 at load)
    train_size: int  # the official training split, before dataset.subset and val_fraction
    flip: bool  # whether a mirrored image keeps its label (digits do not: SVHN's 2/5 and 6/9 look-alikes)


# The datasets read from files (data/sources.py); synthetic and image_folder take their shape from the spec or
# the folder.
FILE_DATASETS: dict[str, DatasetFacts] = {
    "cifar10": DatasetFacts(num_classes=10, channels=3, image_size=32, train_size=50_000, flip=True),
    "cifar100": DatasetFacts(num_classes=100, channels=3, image_size=32, train_size=50_000, flip=True),
    "svhn": DatasetFacts(num_classes=10, channels=3, image_size=32, train_size=73_257, flip=False),
    "fashion_mnist": DatasetFacts(num_classes=10, channels=1, image_size=32, train_size=60_000, flip=True),
}
assert set(FILE_DATASETS) <= set(DATASET_NAMES), "a file dataset that DatasetName does not list"
