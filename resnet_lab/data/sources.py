"""CIFAR-10/100, SVHN and Fashion-MNIST, read through torchvision's own dataset classes.

This module imports torchvision (about 7.7 s cold on these machines), so `load_data` imports it only when a real
dataset is asked for: synthetic runs and the loader never pay for it.

About md5: torchvision re-hashes every file each time a dataset object is built (`_check_integrity`). The checksums
matter when a file arrives from the internet, and torchvision still verifies those: the CIFAR archive (`tgz_md5`),
each SVHN .mat and each Fashion-MNIST .gz is checked by its download code. After that, hashing again costs every
trial 2 to 4 passes over 178 MB for CIFAR-10 (train and test objects, each checking in `download()` and `__init__`;
md5 runs at ~0.3 s per 178 MB here), and it rejects files in the real format whose bytes differ from the originals
(the test fixtures, a re-pickled copy). So the classes below check that the files are present, and leave the parsing
to torchvision's own `__init__`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torchvision import datasets

from resnet_lab.data.base import DatasetError, DatasetMissingError, RawData
from resnet_lab.spec.datasets import FILE_DATASETS

# Debian's `dataset-fashion-mnist` package installs the four gzipped IDX files here (recompressed by Debian: the
# decompressed bytes equal the originals).
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                       "t10k-labels-idx1-ubyte")

Split = tuple[torch.Tensor, torch.Tensor]


class PresentCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 with a presence check instead of a per-file md5 (see the module docstring)."""

    # check_integrity(path, None) tests that the file exists; download() still verifies the archive's tgz_md5.
    train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta: ClassVar[dict[str, str | None]] = {**datasets.CIFAR10.meta, "md5": None}


class PresentCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR100 with a presence check instead of a per-file md5 (see the module docstring)."""

    train_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in datasets.CIFAR100.train_list]
    test_list: ClassVar[list[list[str | None]]] = [[name, None] for name, _ in datasets.CIFAR100.test_list]
    meta: ClassVar[dict[str, str | None]] = {**datasets.CIFAR100.meta, "md5": None}


class PresentSVHN(datasets.SVHN):
    """torchvision's SVHN with a presence check instead of an md5 (see the module docstring)."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))

    def download(self) -> None:
        if not self._check_integrity():
            super().download()  # download_url verifies the md5 of the file it fetches


def _cifar(cls: type[datasets.CIFAR10], root: Path, train: bool, download: bool) -> Split:
    ds = cls(str(root), train=train, download=download)
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC: (N, 32, 32, 3)
    return images, torch.tensor(ds.targets, dtype=torch.int64)


def _svhn(root: Path, train: bool, download: bool) -> Split:
    ds = PresentSVHN(str(root), split="train" if train else "test", download=download)
    # torchvision already transposed X (32, 32, 3, N) -> (N, 3, 32, 32) and mapped label 10 to digit 0
    return torch.from_numpy(ds.data).contiguous(), torch.from_numpy(ds.labels).to(torch.int64)


def _fashion_mnist(root: Path, train: bool, download: bool) -> Split:
    ds = datasets.FashionMNIST(str(root), train=train, download=download)
    # (N, 28, 28) -> (N, 1, 32, 32): zero-pad 2 pixels a side once at load, so every model sees CIFAR's 32x32
    images = F.pad(ds.data.unsqueeze(1), (2, 2, 2, 2))
    return images, ds.targets.to(torch.int64)


@dataclass(frozen=True)
class Source:
    """Where a dataset's files live, how to read them, and what to tell a person when they are missing."""

    name: str  # its facts (classes, channels, size) are in spec/datasets.py's FILE_DATASETS
    subdir: str  # below the data root; the files that must exist are there
    files: tuple[str, ...]
    how_to_get: str  # "place ... there"; {dir} is the directory looked in
    read: Callable[[Path, bool, bool], Split]  # (root, train, download) -> (images, labels)

    def directory(self, root: Path) -> Path:
        """The directory this source's files must be in."""
        return root / self.subdir if self.subdir else root

    def missing(self, root: Path) -> list[str]:
        """The required files not present under `root`."""
        return [f for f in self.files if not (self.directory(root) / f).is_file()]


_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"
_FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SOURCES: dict[str, Source] = {
    "cifar10": Source(
        "cifar10", "cifar-10-batches-py",
        ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
         "batches.meta"),
        f"place cifar-10-python.tar.gz from {_CIFAR_URL}cifar-10-python.tar.gz in {{root}} and extract it there "
        "(tar xzf) so that {dir}/data_batch_1 exists",
        lambda root, train, download: _cifar(PresentCIFAR10, root, train, download)),
    "cifar100": Source(
        "cifar100", "cifar-100-python", ("train", "test", "meta"),
        f"place cifar-100-python.tar.gz from {_CIFAR_URL}cifar-100-python.tar.gz in {{root}} and extract it there "
        "(tar xzf) so that {dir}/train exists",
        lambda root, train, download: _cifar(PresentCIFAR100, root, train, download)),
    "svhn": Source(
        "svhn", "", ("train_32x32.mat", "test_32x32.mat"),
        "place train_32x32.mat and test_32x32.mat from http://ufldl.stanford.edu/housenumbers/ in {dir}",
        _svhn),
    "fashion_mnist": Source(
        "fashion_mnist", "FashionMNIST/raw", FASHION_MNIST_FILES,
        f"place {', '.join(FASHION_MNIST_FILES)} (the .gz files from {_FASHION_URL}, gunzipped) in {{dir}}, "
        f"or install Debian's dataset-fashion-mnist (read from {FASHION_MNIST_SYSTEM_DIR})",
        _fashion_mnist),
}


def unpack_system_fashion_mnist(raw_dir: Path, system_dir: Path) -> None:
    """Gunzip Debian's Fashion-MNIST files into `raw_dir` where it lacks them, so torchvision finds them there."""
    todo = [f for f in FASHION_MNIST_FILES if not (raw_dir / f).is_file() and (system_dir / f"{f}.gz").is_file()]
    if not todo:
        return
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        for name in todo:
            # Write then rename: trials starting in parallel on one root never read a half-written file.
            tmp = raw_dir / f".{name}.{os.getpid()}.tmp"
            with gzip.open(system_dir / f"{name}.gz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, raw_dir / name)
    except OSError as exc:
        raise DatasetError(f"fashion_mnist: cannot unpack {system_dir} into {raw_dir}: {exc}; "
                           "point dataset.root at a writable directory") from None


def _missing_error(source: Source, root: Path, missing: list[str], reason: str | None) -> DatasetMissingError:
    where = source.directory(root)
    found = f"not found in {where} (missing: {', '.join(missing)})"
    if reason:
        found += f" and the download failed ({reason})"
    how = source.how_to_get.format(root=root, dir=where)
    retry = "; or retry while online" if reason else "; or run with dataset.download: true while online"
    return DatasetMissingError(f"{source.name}: {found}; {how}{retry}")


def read_source(name: str, root: Path, download: bool) -> RawData:
    """Read a torchvision-backed dataset's train and test sets from `root`, downloading only if `download`."""
    source = SOURCES[name]
    if name == "fashion_mnist":
        unpack_system_fashion_mnist(source.directory(root), FASHION_MNIST_SYSTEM_DIR)
    missing = source.missing(root)
    if missing and not download:
        raise _missing_error(source, root, missing, reason=None)
    try:
        train = source.read(root, True, download)
        test = source.read(root, False, download)
    except Exception as exc:  # torchvision raises RuntimeError, urllib URLError/OSError, pickle/scipy their own
        reason = f"{type(exc).__name__}: {exc}".strip().replace("\n", " ")
        missing = source.missing(root)
        if missing:
            raise _missing_error(source, root, missing, reason) from None
        raise DatasetError(f"{source.name}: could not read the files in {source.directory(root)} ({reason}); "
                           "delete them and place fresh copies, or let dataset.download: true fetch them") from None
    return RawData(*train, *test, num_classes=FILE_DATASETS[name].num_classes)


# --------------------------------------------------------------------------------------------------------------------
# image_folder: torchvision's ImageFolder layout (root/train/<class>/*.png, root/val/<class>/*.jpg), any image size

FOLDER_TEST_SPLITS = ("val", "test")  # Imagenette and ImageNet name their held-out split val/
FOLDER_CACHE_DIR = ".resnet-lab-cache"
# torchvision.io decodes these without PIL (libjpeg-turbo, libpng, libwebp); other extensions ImageFolder accepts
# (bmp, ppm, pgm, tif) go through PIL.
_IO_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif")


def _folder_splits(root: Path) -> tuple[Path, Path]:
    train = root / "train"
    test = next((root / name for name in FOLDER_TEST_SPLITS if (root / name).is_dir()), None)
    if not train.is_dir() or test is None:
        raise DatasetMissingError(
            f"image_folder: {root} must hold train/ and val/ (or test/), each with one sub-folder of images per "
            f"class (found: {', '.join(sorted(p.name for p in root.iterdir())) if root.is_dir() else 'no directory'})")
    return train, test


def _folder_samples(directory: Path) -> tuple[list[str], list[tuple[str, int]]]:
    try:
        # ImageFolder only lists the files here; its loader is never called.
        ds = datasets.ImageFolder(str(directory), loader=lambda path: path)
    except (FileNotFoundError, OSError) as exc:
        raise DatasetError(f"image_folder: {directory}: {exc}") from None
    return ds.classes, ds.samples


def _decode(path: str, image_size: int) -> torch.Tensor:
    """One image file -> uint8 (3, S, S): shorter side resized to S (antialiased), center-cropped."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2 import functional as TF

    try:
        if path.lower().endswith(_IO_EXTENSIONS):
            image = decode_image(path, mode=ImageReadMode.RGB)
        else:
            from PIL import Image

            with Image.open(path) as pil:
                image = TF.pil_to_tensor(pil.convert("RGB"))
    except Exception as exc:  # torchvision raises RuntimeError, PIL UnidentifiedImageError/OSError
        raise DatasetError(f"image_folder: cannot decode {path} ({type(exc).__name__}: {exc}); "
                           "remove or replace the file") from None
    image = TF.resize(image, [image_size], antialias=True)
    return TF.center_crop(image, [image_size, image_size])


def _decode_all(samples: list[tuple[str, int]], image_size: int) -> Split:
    images = torch.empty(len(samples), 3, image_size, image_size, dtype=torch.uint8)
    for i, (path, _) in enumerate(samples):
        images[i] = _decode(path, image_size)
    return images, torch.tensor([label for _, label in samples], dtype=torch.int64)


def _fingerprint(samples: list[tuple[str, int]], image_size: int) -> str:
    """Hash of every file's path, size and mtime plus the size: a changed folder never reads a stale cache."""
    digest = hashlib.sha256(f"{image_size}".encode())
    for path, label in samples:
        stat = os.stat(path)
        digest.update(f"{path}\0{label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def read_image_folder(root: Path, image_size: int) -> RawData:
    """Read `root/train` and `root/val` (or `test`) as uint8 (N, 3, S, S) at S = `image_size`, decoded once.

    Each image's shorter side is resized to S and the center S x S kept, so the device holds one uint8 copy at the
    training size (150 KB an image at 224 px); random resized crops are drawn per batch from it (`Augment`).
    The decoded tensors are cached in `root/.resnet-lab-cache/` (the driver's `prepare_data` fills it, trials
    read it); a read-only root just decodes every time.
    """
    train_dir, test_dir = _folder_splits(root)
    classes, train_samples = _folder_samples(train_dir)
    test_classes, test_samples = _folder_samples(test_dir)
    if test_classes != classes:
        only_train, only_test = sorted(set(classes) - set(test_classes)), sorted(set(test_classes) - set(classes))
        raise DatasetError(f"image_folder: {train_dir} and {test_dir} must have the same class folders "
                           f"(only in train: {only_train or 'none'}; only in {test_dir.name}: {only_test or 'none'})")
    key = _fingerprint(train_samples + test_samples, image_size)
    cache = root / FOLDER_CACHE_DIR / f"{image_size}px.pt"
    if cache.is_file():
        try:
            saved = torch.load(cache, weights_only=True)
            if saved.get("key") == key:
                return RawData(*saved["train"], *saved["test"], num_classes=len(classes))
        except Exception:  # a truncated or foreign file: decode again and overwrite it
            pass
    train, test = _decode_all(train_samples, image_size), _decode_all(test_samples, image_size)
    try:
        cache.parent.mkdir(exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # write then rename: parallel trials never
        torch.save({"key": key, "train": train, "test": test}, tmp)  # read a half-written file
        os.replace(tmp, cache)
    except OSError:
        pass  # read-only dataset directory: every reader decodes (slower, same tensors)
    return RawData(*train, *test, num_classes=len(classes))
