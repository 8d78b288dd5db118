"""Tiny datasets written in the real on-disk formats torchvision reads, for tests that must not touch the network.

CIFAR-10/100: python pickles of dicts ('data' uint8 (N, 3072) as R, G, B planes of 32x32; 'labels' or
'fine_labels'), plus batches.meta / meta. SVHN: .mat files with X (32, 32, 3, N) uint8 and y (N, 1), 10 meaning
digit 0. Fashion-MNIST: big-endian IDX files. Every image's brightness encodes its class (a model can learn it) and
carries its own noise (no two images are equal).

Usage: `write_cifar10(tmp_path)` then `DatasetConfig(name="cifar10", root=str(tmp_path), download=False)`.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.io


@dataclass(frozen=True)
class FakeSplit:
    """What was written: images (N, C, H, W) uint8 in file order and labels (N,) int64 in 0..K-1."""

    images: np.ndarray
    labels: np.ndarray


def class_images(n: int, num_classes: int, channels: int = 3, size: int = 32, seed: int = 0) -> FakeSplit:
    """n images whose brightness encodes the label (16 + 224 * label / K) plus uniform noise of +-8."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n, dtype=np.int64) % num_classes
    rng.shuffle(labels)
    level = 16 + 224 * labels / num_classes
    noise = rng.integers(-8, 9, size=(n, channels, size, size))
    images = np.clip(level[:, None, None, None] + noise, 0, 255).astype(np.uint8)
    return FakeSplit(images, labels)


def _pickle(path: Path, obj: dict) -> None:
    # Protocol 2, as the original files (written by Python 2's cPickle); torchvision reads with encoding="latin1",
    # which turns the originals' Python 2 str keys into str: so the keys here are str too ('data', not b'data').
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_cifar10(root: Path, train_per_batch: int = 20, test: int = 20, seed: int = 0) -> tuple[FakeSplit, FakeSplit]:
    """Write `root`/cifar-10-batches-py (5 training batches, test_batch, batches.meta); return (train, test)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train = class_images(5 * train_per_batch, 10, seed=seed)
    for b in range(5):
        part = slice(b * train_per_batch, (b + 1) * train_per_batch)
        _pickle(folder / f"data_batch_{b + 1}", {
            "batch_label": f"training batch {b + 1} of 5", "labels": train.labels[part].tolist(),
            "data": train.images[part].reshape(train_per_batch, 3072),
            "filenames": [f"img_{i}.png" for i in range(part.start, part.stop)]})
    test_split = class_images(test, 10, seed=seed + 1)
    _pickle(folder / "test_batch", {
        "batch_label": "testing batch 1 of 1", "labels": test_split.labels.tolist(),
        "data": test_split.images.reshape(test, 3072), "filenames": [f"test_{i}.png" for i in range(test)]})
    _pickle(folder / "batches.meta", {"num_cases_per_batch": train_per_batch, "num_vis": 3072, "label_names": [
        "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]})
    return train, test_split


def write_cifar100(root: Path, train: int = 200, test: int = 50, seed: int = 0) -> tuple[FakeSplit, FakeSplit]:
    """Write `root`/cifar-100-python (train, test, meta) with fine and coarse labels; return (train, test)."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": class_images(train, 100, seed=seed), "test": class_images(test, 100, seed=seed + 1)}
    for name, split in splits.items():
        n = len(split.labels)
        _pickle(folder / name, {
            "filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": f"{name}ing batch 1 of 1",
            "fine_labels": split.labels.tolist(), "coarse_labels": (split.labels // 5).tolist(),
            "data": split.images.reshape(n, 3072)})
    _pickle(folder / "meta", {"fine_label_names": [f"fine_{i}" for i in range(100)],
                              "coarse_label_names": [f"coarse_{i}" for i in range(20)]})
    return splits["train"], splits["test"]


def write_svhn(root: Path, train: int = 60, test: int = 30, seed: int = 0) -> tuple[FakeSplit, FakeSplit]:
    """Write `root`/train_32x32.mat and test_32x32.mat as the originals (digit 0 stored as 10); return (train, test)."""
    Path(root).mkdir(parents=True, exist_ok=True)
    splits = {"train": class_images(train, 10, seed=seed), "test": class_images(test, 10, seed=seed + 1)}
    for name, split in splits.items():
        x = np.ascontiguousarray(split.images.transpose(2, 3, 1, 0))  # (N, C, H, W) -> (H, W, C, N)
        y = np.where(split.labels == 0, 10, split.labels).astype(np.uint8)[:, None]
        scipy.io.savemat(Path(root) / f"{name}_32x32.mat", {"X": x, "y": y})
    return splits["train"], splits["test"]


def _idx_bytes(array: np.ndarray) -> bytes:
    magic = 0x0800 + array.ndim  # 0x08: unsigned byte, then the number of dimensions
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


def write_fashion_mnist(folder: Path, train: int = 60, test: int = 20, gz: bool = False,
                        seed: int = 0) -> tuple[FakeSplit, FakeSplit]:
    """Write the four IDX files (28x28) into `folder`, gzipped as Debian ships them if `gz`; return (train, test).

    For torchvision the folder is `<root>/FashionMNIST/raw` (not gzipped); Debian's is /usr/share/datasets/
    fashion-mnist (gzipped).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    splits = {"train": class_images(train, 10, 1, 28, seed), "t10k": class_images(test, 10, 1, 28, seed + 1)}
    for prefix, split in splits.items():
        for kind, array in (("images-idx3", split.images[:, 0]), ("labels-idx1", split.labels)):
            data = _idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return splits["train"], splits["t10k"]
