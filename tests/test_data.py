"""resnet_lab.data: real file formats through torchvision, splits, and the on-device loader. No network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from datafiles import class_images, write_cifar10, write_cifar100, write_fashion_mnist, write_svhn

from resnet_lab.data import (
    DEFAULT_AUGMENT,
    Augment,
    DatasetError,
    DatasetMissingError,
    DataSplits,
    DeviceLoader,
    channel_stats,
    crop_flip,
    load_data,
    resolve_augment,
    split_indices,
)
from resnet_lab.data import sources as data_sources
from resnet_lab.spec import DatasetConfig, SyntheticConfig
from resnet_lab.spec.datasets import FILE_DATASETS

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


def offline(name: str, root: Path, **fields: object) -> DatasetConfig:
    """A dataset config that never downloads."""
    return DatasetConfig.model_validate({"name": name, "root": str(root), "download": False, **fields})


def synthetic(**fields: object) -> DatasetConfig:
    """A small synthetic dataset config."""
    return DatasetConfig(name="synthetic", synthetic=SyntheticConfig.model_validate(
        {"train_size": 200, "test_size": 50, **fields}))


def as_tensor(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


# --- real files ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fashion(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DataSplits]:
    if not DEBIAN_FASHION.is_dir():
        pytest.skip(f"{DEBIAN_FASHION} absent: apt-get install dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("fashion")
    return root, load_data(offline("fashion_mnist", root, subset=500))


def test_fashion_mnist_debian_files_load_zero_padded_to_32(fashion: tuple[Path, DataSplits]) -> None:
    root, data = fashion
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("fashion_mnist", 10, 1, 32)
    assert data.train[0].shape == (450, 1, 32, 32) and data.val[0].shape == (50, 1, 32, 32)
    assert data.test[0].shape == (10000, 1, 32, 32) and data.test[0].dtype == torch.uint8
    for images, labels in (data.train, data.val, data.test):
        assert labels.dtype == torch.int64 and labels.min() >= 0 and labels.max() <= 9
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert images[:, :, border].eq(0).all()
    assert set(data.test[1].tolist()) == set(range(10))
    # The unpacked raw file is the original: the first test image is its first 28x28 bytes after the 16-byte header.
    raw = (root / "FashionMNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
    first = torch.frombuffer(bytearray(raw[16:16 + 784]), dtype=torch.uint8).view(28, 28)
    assert torch.equal(data.test[0][0, 0, 2:30, 2:30], first)
    assert (root / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").stat().st_size == 16 + 60000 * 784
    facts = FILE_DATASETS["fashion_mnist"]  # the table's row is the real files' shape and size
    assert (facts.num_classes, facts.channels, facts.image_size, facts.train_size) == (10, 1, 32, 60000)


def test_fashion_mnist_unpacks_gzipped_system_files_into_root(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "system"
    _, test = write_fashion_mnist(system, train=40, test=10, gz=True)
    monkeypatch.setattr(data_sources, "FASHION_MNIST_SYSTEM_DIR", system)
    data = load_data(offline("fashion_mnist", tmp_path / "root", val_fraction=0.25))
    assert sorted((tmp_path / "root" / "FashionMNIST" / "raw").iterdir()) == sorted(
        tmp_path / "root" / "FashionMNIST" / "raw" / p.stem for p in system.iterdir())
    assert torch.equal(data.test[0], F.pad(as_tensor(test.images), (2, 2, 2, 2)))
    assert torch.equal(data.test[1], as_tensor(test.labels))
    assert len(data.train[1]) == 30 and len(data.val[1]) == 10


def test_cifar10_pickles_load_through_torchvision(tmp_path: Path) -> None:
    train, test = write_cifar10(tmp_path, train_per_batch=20, test=30)
    cfg = offline("cifar10", tmp_path, val_fraction=0.2)
    data = load_data(cfg)
    assert (data.num_classes, data.in_channels, data.image_size) == (10, 3, 32)
    train_idx, val_idx = split_indices(100, cfg)
    assert torch.equal(data.train[0], as_tensor(train.images)[train_idx])
    assert torch.equal(data.train[1], as_tensor(train.labels)[train_idx])
    assert torch.equal(data.val[0], as_tensor(train.images)[val_idx]) and len(val_idx) == 20
    assert torch.equal(data.test[0], as_tensor(test.images))
    assert torch.equal(data.test[1], as_tensor(test.labels))


def test_cifar100_pickles_load_fine_labels(tmp_path: Path) -> None:
    _, test = write_cifar100(tmp_path, train=200, test=50)
    data = load_data(offline("cifar100", tmp_path))
    assert data.num_classes == 100 and data.train[0].shape[1:] == (3, 32, 32)
    assert len(data.train[1]) + len(data.val[1]) == 200
    assert torch.equal(data.test[0], as_tensor(test.images))
    assert torch.equal(data.test[1], as_tensor(test.labels))  # fine labels, 0..99


def test_svhn_mat_files_load_with_label_10_read_as_digit_0(tmp_path: Path) -> None:
    _, test = write_svhn(tmp_path, train=60, test=30)
    data = load_data(offline("svhn", tmp_path))
    assert torch.equal(data.test[0], as_tensor(test.images))
    assert torch.equal(data.test[1], as_tensor(test.labels)) and (data.test[1] == 0).any()
    assert data.augment == Augment(crop=True, flip=False)


@pytest.mark.parametrize("name", sorted(FILE_DATASETS))
def test_file_datasets_load_with_the_shape_their_facts_state(name: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # One table (spec/datasets.py) tells the dry run, the parameter matching and the augmentation what a dataset is
    # without reading it: the files in the real formats must agree with it.
    if name == "fashion_mnist":
        write_fashion_mnist(tmp_path / "system", train=40, test=10, gz=True)
        monkeypatch.setattr(data_sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "system")
    else:
        {"cifar10": write_cifar10, "cifar100": write_cifar100, "svhn": write_svhn}[name](tmp_path)
    data, facts = load_data(offline(name, tmp_path)), FILE_DATASETS[name]
    assert (data.num_classes, data.in_channels, data.image_size) == (facts.num_classes, facts.channels,
                                                                     facts.image_size)
    assert data.augment == Augment(crop=True, flip=facts.flip)


@pytest.mark.parametrize(("name", "needed"), [
    ("cifar10", ["cifar-10-python.tar.gz", "cifar-10-batches-py/data_batch_1"]),
    ("cifar100", ["cifar-100-python.tar.gz", "cifar-100-python/train"]),
    ("svhn", ["train_32x32.mat", "test_32x32.mat"]),
    ("fashion_mnist", ["FashionMNIST/raw", "train-images-idx3-ubyte", "dataset-fashion-mnist"]),
])
def test_missing_dataset_error_names_dataset_directory_and_files(
        name: str, needed: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data_sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "no-system-copy")
    root = tmp_path / "data"
    with pytest.raises(DatasetMissingError) as info:
        load_data(offline(name, root))
    message = str(info.value)
    assert message.startswith(f"{name}: not found in {root}")
    assert all(part in message for part in needed), message
    assert "dataset.download: true" in message
    assert isinstance(info.value, RuntimeError) and info.value.__cause__ is None


def test_missing_error_lists_only_the_missing_files(tmp_path: Path) -> None:
    write_cifar10(tmp_path, train_per_batch=2, test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetMissingError, match=r"\(missing: data_batch_3\)"):
        load_data(offline("cifar10", tmp_path))


def test_unreadable_file_raises_dataset_error_without_traceback(tmp_path: Path) -> None:
    write_cifar10(tmp_path, train_per_batch=2, test=2)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"not a pickle")
    with pytest.raises(DatasetError, match=r"cifar10: could not read the files in .*cifar-10-batches-py") as info:
        load_data(offline("cifar10", tmp_path))
    assert not isinstance(info.value, DatasetMissingError)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# --- splits ---------------------------------------------------------------------------------------------------

def test_split_is_fixed_by_split_seed() -> None:
    a = split_indices(1000, synthetic().model_copy(update={"split_seed": 3}))
    b = split_indices(1000, synthetic().model_copy(update={"split_seed": 3}))
    c = split_indices(1000, synthetic().model_copy(update={"split_seed": 4}))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


def test_train_and_val_are_disjoint_and_cover_the_subset() -> None:
    train, val = split_indices(1000, DatasetConfig(subset=101, val_fraction=0.1))
    assert len(val) == 10 and len(train) == 91
    assert not set(train.tolist()) & set(val.tolist())
    train_full, val_full = split_indices(1000, DatasetConfig(val_fraction=0.1))
    assert len(train_full) + len(val_full) == 1000 and len(val_full) == 100


def test_tiny_subset_keeps_at_least_one_validation_image() -> None:
    train, val = split_indices(1000, DatasetConfig(subset=3, val_fraction=0.1))
    assert (len(train), len(val)) == (2, 1)


@pytest.mark.parametrize(("subset", "match"), [(1, "leave 0 for training"), (1001, "subset must be <= ")])
def test_split_without_training_images_is_a_clear_value_error(subset: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        split_indices(1000, DatasetConfig(subset=subset))


def test_load_data_applies_subset_and_computes_stats_on_the_training_split() -> None:
    data = load_data(synthetic().model_copy(update={"subset": 120, "val_fraction": 0.25}))
    assert (len(data.train[1]), len(data.val[1]), len(data.test[1])) == (90, 30, 50)
    pixels = data.train[0].double().div(255).transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(data.mean, pixels.mean(1).float())
    torch.testing.assert_close(data.std, pixels.std(1, correction=0).float())


def test_constant_channel_does_not_divide_by_zero() -> None:
    mean, std = channel_stats(torch.full((4, 2, 8, 8), 7, dtype=torch.uint8))
    torch.testing.assert_close(mean, torch.full((2,), 7 / 255))
    assert (std > 0).all()


# --- synthetic ------------------------------------------------------------------------------------------------

def test_synthetic_is_deterministic_from_seed() -> None:
    a, b, c = (load_data(synthetic(seed=s)) for s in (5, 5, 6))
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])
    assert not torch.equal(a.train[0], c.train[0])
    assert a.train[0].dtype == torch.uint8 and a.train[0].shape[1:] == (3, 32, 32)
    gray = load_data(synthetic(channels=1, image_size=16, num_classes=4))
    assert (gray.in_channels, gray.image_size, gray.num_classes) == (1, 16, 4)
    assert gray.test[0].shape == (50, 1, 16, 16) and set(gray.test[1].tolist()) == {0, 1, 2, 3}


def test_synthetic_classes_are_learnable_by_nearest_class_mean() -> None:
    data = load_data(synthetic(train_size=500, noise=1.0))
    x, y = data.train[0].float().flatten(1), data.train[1]
    centroids = torch.stack([x[y == k].mean(0) for k in range(data.num_classes)])
    predicted = torch.cdist(data.test[0].float().flatten(1), centroids).argmin(1)
    assert (predicted == data.test[1]).float().mean() > 0.9


# --- augmentation semantics -----------------------------------------------------------------------------------

def test_augmentation_defaults_and_overrides_per_dataset() -> None:
    assert DEFAULT_AUGMENT["cifar10"] == Augment(crop=True, flip=True)
    assert DEFAULT_AUGMENT["svhn"] == Augment(crop=True, flip=False)
    assert not DEFAULT_AUGMENT["synthetic"].active
    assert resolve_augment("svhn", True) == Augment(crop=True, flip=False)  # digits are never mirrored
    assert resolve_augment("synthetic", True) == Augment(crop=True, flip=True)
    assert resolve_augment("cifar100", False) == Augment()
    assert resolve_augment("fashion_mnist", None) == Augment(crop=True, flip=True)
    data = load_data(synthetic())
    assert data.augment_for(None) == data.augment == Augment()
    assert data.augment_for(True) == Augment(crop=True, flip=True) and data.augment_for(False) == Augment()


# --- loader ---------------------------------------------------------------------------------------------------

def indexed(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images labelled by their own index, so a batch's label names its source image."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g), torch.arange(n)


def identity(channels: int = 3) -> dict[str, torch.Tensor]:
    """mean/std that make the loader's output the raw pixel values as floats."""
    return {"mean": torch.zeros(channels), "std": torch.full((channels,), 1 / 255)}


def gens(order_seed: int = 0, aug_seed: int = 1) -> dict[str, torch.Generator]:
    return {"order_generator": torch.Generator().manual_seed(order_seed),
            "augment_generator": torch.Generator().manual_seed(aug_seed)}


def epoch(loader: DeviceLoader) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(loader)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def variants(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Every crop (zero padding) and mirror of each image, by plain slicing: (2 * (2p+1)^2, N, C, H, W)."""
    h, w = images.shape[-2:]
    framed = F.pad(images, (padding,) * 4)
    crops = [framed[..., dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)]
    return torch.stack(crops + [c.flip(-1) for c in crops])


def test_len_counts_batches() -> None:
    x, y = indexed(10, size=8)
    assert len(DeviceLoader(x, y, 4, **identity())) == 3 == len(list(DeviceLoader(x, y, 4, **identity())))
    assert len(DeviceLoader(x, y, 4, drop_last=True, **identity())) == 2
    assert [len(b) for _, b in DeviceLoader(x, y, 4, drop_last=True, **identity())] == [4, 4]


def test_unaugmented_batches_equal_normalized_originals() -> None:
    data = load_data(synthetic())
    expected = (data.train[0].float() / 255 - data.mean.view(1, 3, 1, 1)) / data.std.view(1, 3, 1, 1)
    images, labels = epoch(data.eval_loader("train", 64))
    torch.testing.assert_close(images, expected)
    assert torch.equal(labels, data.train[1])
    x, y = indexed(100)
    shuffled, order = epoch(DeviceLoader(x, y, 32, shuffle=True, mean=data.mean, std=data.std, **gens()))
    torch.testing.assert_close(shuffled, (x[order].float() / 255 - data.mean.view(1, 3, 1, 1))
                               / data.std.view(1, 3, 1, 1))


def test_shuffle_order_comes_from_the_order_generator_only() -> None:
    x, y = indexed(50, size=8)
    aug = Augment(crop=True, flip=True)
    _, order_a = epoch(DeviceLoader(x, y, 16, shuffle=True, augment=aug, **identity(), **gens(0, 1)))
    _, order_b = epoch(DeviceLoader(x, y, 16, shuffle=True, augment=aug, **identity(), **gens(0, 2)))
    _, order_c = epoch(DeviceLoader(x, y, 16, shuffle=True, augment=aug, **identity(), **gens(9, 1)))
    assert torch.equal(order_a.sort().values, y)
    assert torch.equal(order_a, order_b) and not torch.equal(order_a, order_c)


def test_augmented_images_are_crops_or_mirrors_of_their_own_source() -> None:
    x, y = indexed(256)
    out, labels = epoch(DeviceLoader(x, y, 100, shuffle=True, augment=Augment(crop=True, flip=True),
                                     **identity(), **gens()))
    assert out.shape == x.shape and out.dtype == torch.float32
    match = (variants(x[labels]).float() == out).flatten(2).all(2)  # (162, N): which variant each output is
    assert match.sum(0).eq(1).all()  # each output is exactly one crop/mirror of the image its label names
    which = match.int().argmax(0)
    flipped, shift = which >= 81, which % 81
    assert 0.35 < flipped.float().mean() < 0.65
    assert {0, 8} <= set((shift // 9).tolist()) and {0, 8} <= set((shift % 9).tolist())  # extreme offsets occur


def test_crop_only_never_mirrors() -> None:
    x, y = indexed(200, size=16)
    out, labels = epoch(DeviceLoader(x, y, 64, shuffle=True, augment=Augment(crop=True), **identity(), **gens()))
    match = (variants(x[labels]).float() == out).flatten(2).all(2)
    assert match[:81].any(0).all() and not match[81:].any()
    assert not torch.equal(out, x[labels].float())


def test_flip_mirrors_about_half_the_images() -> None:
    x, y = indexed(4000, channels=1, size=8)
    out, _ = epoch(DeviceLoader(x, y, 512, augment=Augment(flip=True), **identity(1), **gens()))
    mirrored = (out == x.flip(-1).float()).flatten(1).all(1)
    kept = (out == x.float()).flatten(1).all(1)
    assert (mirrored ^ kept).all()
    assert 0.45 < mirrored.float().mean() < 0.55  # binomial(4000, 0.5): std 0.008


def test_crop_flip_matches_slicing_of_the_zero_padded_image() -> None:
    x, _ = indexed(3, size=8)
    offsets = torch.tensor([[0, 8], [4, 4], [7, 1]])
    flips = torch.tensor([False, True, True])
    out = crop_flip(x, offsets, flips, 4)
    framed = F.pad(x, (4, 4, 4, 4))
    for i, ((dy, dx), f) in enumerate(zip(offsets.tolist(), flips.tolist(), strict=True)):
        crop = framed[i, :, dy:dy + 8, dx:dx + 8]
        assert torch.equal(out[i], crop.flip(-1) if f else crop)
    assert torch.equal(crop_flip(x, torch.full((3, 2), 4), torch.zeros(3, dtype=torch.bool), 4), x)


def test_batches_are_reproducible_from_generator_seeds() -> None:
    x, y = indexed(64, size=8)
    aug = Augment(crop=True, flip=True)
    a = epoch(DeviceLoader(x, y, 16, shuffle=True, augment=aug, **identity(), **gens(3, 4)))
    b = epoch(DeviceLoader(x, y, 16, shuffle=True, augment=aug, **identity(), **gens(3, 4)))
    c = epoch(DeviceLoader(x, y, 16, shuffle=True, augment=aug, **identity(), **gens(3, 5)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert torch.equal(a[1], c[1]) and not torch.equal(a[0], c[0])


def test_restoring_generator_states_replays_the_next_epoch() -> None:
    x, y = indexed(64, size=8)
    g = gens(7, 8)
    loader = DeviceLoader(x, y, 16, shuffle=True, augment=Augment(crop=True, flip=True), **identity(), **g)
    epoch(loader)
    saved = {k: v.get_state() for k, v in g.items()}  # what the trainer checkpoints after an epoch
    expected = epoch(loader)
    after_epoch = {k: v.get_state() for k, v in g.items()}
    for k, v in g.items():
        v.set_state(saved[k])
    next(iter(loader))  # a partly consumed epoch leaves the generators where a full one does
    assert all(torch.equal(v.get_state(), after_epoch[k]) for k, v in g.items())
    for k, v in g.items():
        v.set_state(saved[k])
    again = epoch(loader)
    assert torch.equal(again[0], expected[0]) and torch.equal(again[1], expected[1])


def test_random_options_require_explicit_generators() -> None:
    x, y = indexed(8, size=8)
    with pytest.raises(ValueError, match="order_generator"):
        DeviceLoader(x, y, 4, shuffle=True, **identity())
    with pytest.raises(ValueError, match="augment_generator"):
        DeviceLoader(x, y, 4, augment=Augment(flip=True), **identity())
    with pytest.raises(ValueError, match="uint8"):
        DeviceLoader(x.float(), y, 4, **identity())


def test_normalized_training_batches_have_zero_mean_unit_std() -> None:
    data = load_data(synthetic(train_size=400))
    images, _ = epoch(data.train_loader(64, augment=Augment(), **gens()))
    per_channel = images.transpose(0, 1).flatten(1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_channel.std(1, correction=0), torch.ones(3), atol=1e-4, rtol=0)
    val, _ = epoch(data.eval_loader("val", 64))
    assert val.mean().abs() < 0.2 and (val.std() - 1).abs() < 0.2  # same distribution, stats not fitted on it


def test_output_dtype_and_channels_last() -> None:
    x, y = indexed(8, size=8)
    ref, _ = epoch(DeviceLoader(x, y, 4, mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25)))
    out, _ = epoch(DeviceLoader(x, y, 4, mean=torch.full((3,), 0.5), std=torch.full((3,), 0.25),
                                dtype=torch.bfloat16, channels_last=True))
    batch, _ = next(iter(DeviceLoader(x, y, 4, mean=torch.zeros(3), std=torch.ones(3), channels_last=True)))
    assert batch.is_contiguous(memory_format=torch.channels_last) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.02, rtol=0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_loader_draws_on_device_generators() -> None:
    data = load_data(synthetic(), device="cuda")
    assert data.train[0].is_cuda and data.mean.is_cuda
    x, y = indexed(128)
    x, y = x.cuda(), y.cuda()
    g = {"order_generator": torch.Generator("cuda").manual_seed(0),
         "augment_generator": torch.Generator("cuda").manual_seed(1)}
    out, labels = epoch(DeviceLoader(x, y, 50, shuffle=True, augment=Augment(crop=True, flip=True),
                                     **{k: v.cuda() for k, v in identity().items()}, **g))
    assert out.is_cuda and labels.is_cuda
    match = (variants(x[labels]).float() == out).flatten(2).all(2)
    assert match.sum(0).eq(1).all()


def test_importing_the_data_module_does_not_import_torchvision() -> None:
    code = "import sys, resnet_lab.data; assert 'torchvision' not in sys.modules, 'torchvision imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_class_images_helper_encodes_labels() -> None:
    split = class_images(40, 10, channels=1, size=8)
    brightness = split.images.reshape(40, -1).mean(1)
    assert np.all(np.diff(brightness[np.argsort(split.labels, kind="stable")].reshape(10, 4).mean(1)) > 0)


# --- image_folder: class sub-folders of images of any size --------------------------------------------------------

FOLDER_COLOURS = {"blue": (20, 40, 220), "green": (30, 200, 40), "red": (230, 30, 20)}  # sorted: ImageFolder's order


def write_image_folder(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """PNGs (one JPEG, one grey BMP) per class in root/<split>/<class>: class colour plus noise, 20-90 px a side."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for cls, colour in FOLDER_COLOURS.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                h, w = (int(v) for v in rng.integers(20, 91, size=2))
                pixels = np.clip(np.array(colour) + rng.integers(-10, 11, size=(h, w, 3)), 0, 255).astype(np.uint8)
                image = Image.fromarray(pixels)
                if i == 1:
                    image.save(root / split / cls / f"{i}.jpg", quality=95)
                elif i == 2:
                    image.convert("L").save(root / split / cls / f"{i}.bmp")  # grey, through PIL, becomes RGB
                else:
                    image.save(root / split / cls / f"{i}.png")
    return root


def folder_config(root: Path, **fields: object) -> DatasetConfig:
    return DatasetConfig.model_validate({"name": "image_folder", "root": str(root), **fields})


def test_image_folder_reads_any_size_into_square_uint8_at_image_size(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, {"train": 8, "val": 3})
    data = load_data(folder_config(root, image_size=48, val_fraction=0.25))
    assert (data.name, data.num_classes, data.in_channels, data.image_size) == ("image_folder", 3, 3, 48)
    assert data.train[0].dtype == torch.uint8 and data.train[0].shape[1:] == (3, 48, 48)
    assert (len(data.train[1]), len(data.val[1]), len(data.test[1])) == (18, 6, 9)
    # Labels follow the sorted class folders; every image keeps its class colour after resizing (the grey BMP
    # carries its colour's luminance in all three channels).
    images, labels = data.test
    for label, (name, colour) in enumerate(FOLDER_COLOURS.items()):
        assert int((labels == label).sum()) == 3, name
        mean = images[labels == label].float().mean((0, 2, 3))
        assert mean.argmax().item() == int(np.argmax(colour)), (name, mean)


def test_image_folder_resizes_the_shorter_side_and_keeps_the_center(tmp_path: Path) -> None:
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            # 20 x 60: white middle third, black sides; the 20 x 20 center crop is all white.
            pixels = np.zeros((20, 60, 3), dtype=np.uint8)
            pixels[:, 20:40] = 255
            Image.fromarray(pixels).save(tmp_path / split / cls / "wide.png")
            Image.fromarray(pixels.transpose(1, 0, 2).copy()).save(tmp_path / split / cls / "tall.png")
    data = load_data(folder_config(tmp_path, image_size=32, val_fraction=0.5))
    images = torch.cat([data.train[0], data.val[0], data.test[0]])
    assert images.shape == (8, 3, 32, 32)
    # Antialiased resizing blurs the two edges by a pixel; everything inside is white.
    assert images[:, :, 2:-2, 2:-2].min().item() >= 250


def test_image_folder_decodes_once_and_rereads_when_a_file_changes(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path, {"train": 4, "val": 2})
    first = data_sources.read_image_folder(root, 40)
    cache = root / data_sources.FOLDER_CACHE_DIR / "40px.pt"
    assert cache.is_file()
    again = data_sources.read_image_folder(root, 40)
    assert torch.equal(first.train_images, again.train_images) and torch.equal(first.test_labels, again.test_labels)
    # A changed image (new bytes and mtime) must not be read from the stale cache.
    from PIL import Image

    changed = root / "train" / "blue" / "0.png"
    Image.fromarray(np.full((30, 30, 3), 255, dtype=np.uint8)).save(changed)
    fresh = data_sources.read_image_folder(root, 40)
    assert not torch.equal(fresh.train_images, first.train_images)
    assert fresh.train_images[0].min().item() == 255  # blue/0.png is the first training sample


def test_image_folder_without_a_val_split_names_the_layout(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 2})
    with pytest.raises(DatasetMissingError, match=r"must hold train/ and val/ \(or test/\).*found: train"):
        load_data(folder_config(tmp_path))


def test_image_folder_with_different_class_folders_names_them(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 2, "val": 2})
    (tmp_path / "train" / "violet").mkdir()
    (tmp_path / "val" / "blue" / "0.png").rename(tmp_path / "violet.png")
    from PIL import Image

    Image.new("RGB", (24, 24)).save(tmp_path / "train" / "violet" / "0.png")
    with pytest.raises(DatasetError, match=r"only in train: \['violet'\]; only in val: none"):
        load_data(folder_config(tmp_path))


def test_image_folder_with_an_unreadable_image_names_the_file(tmp_path: Path) -> None:
    write_image_folder(tmp_path, {"train": 2, "val": 1})
    (tmp_path / "val" / "red" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot decode .*red/broken\.png"):
        load_data(folder_config(tmp_path))


def test_image_size_is_an_image_folder_field_and_root_is_required() -> None:
    with pytest.raises(ValueError, match=r"dataset\.image_size applies to image_folder only"):
        DatasetConfig.model_validate({"name": "cifar10", "image_size": 64})
    with pytest.raises(ValueError, match=r"dataset\.root is required for image_folder"):
        DatasetConfig.model_validate({"name": "image_folder"})
    assert folder_config(Path("/x")).folder_image_size == 224


def test_image_folder_trains_with_random_resized_crops_by_default(tmp_path: Path) -> None:
    assert resolve_augment("image_folder", None) == Augment(resized_crop=True, flip=True)
    assert resolve_augment("image_folder", True) == Augment(resized_crop=True, flip=True)
    assert not resolve_augment("image_folder", False).active


def test_resized_crop_of_the_whole_image_is_the_identity_and_a_flip_mirrors(tmp_path: Path) -> None:
    from resnet_lab.data.loader import resized_crop_flip

    x = torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8)
    whole = torch.tensor([[0.5, 0.5, 1.0, 1.0]]).repeat(3, 1)
    assert torch.equal(resized_crop_flip(x, whole, torch.zeros(3, dtype=torch.bool)), x)
    assert torch.equal(resized_crop_flip(x, whole, torch.ones(3, dtype=torch.bool)), x.flip(-1))
    # The top-left quadrant, resized 2x: the first 7 rows and columns sample inside it; the last samples a quarter
    # pixel beyond the box, bilinearly (as roi_align does), and so blends in the neighbours.
    quadrants = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    quadrants[..., :4, :4], quadrants[..., :4, 4:], quadrants[..., 4:, :4] = 10, 20, 30
    top_left = resized_crop_flip(quadrants, torch.tensor([[0.25, 0.25, 0.5, 0.5]]), torch.zeros(1, dtype=torch.bool))
    assert top_left[..., :7, :7].unique().tolist() == [10]


def test_random_resized_crop_boxes_stay_inside_and_follow_the_scale() -> None:
    from resnet_lab.data.loader import random_boxes

    boxes = random_boxes(20_000, (0.35, 1.0), torch.Generator().manual_seed(0))
    cx, cy, w, h = boxes.unbind(1)
    assert (cx - w / 2 >= -1e-6).all() and (cx + w / 2 <= 1 + 1e-6).all()
    assert (cy - h / 2 >= -1e-6).all() and (cy + h / 2 <= 1 + 1e-6).all()
    area = w * h
    assert area.min() >= 0.35 * 0.75 - 1e-6 and area.max() <= 1.0 + 1e-6  # clipping a side only shrinks the area
    assert (w / h).min() >= 0.75 - 1e-4 or area.max() > 0.99  # clipped boxes at full scale may reach any ratio


def test_loader_with_resized_crop_is_reproducible_and_random(tmp_path: Path) -> None:
    x = torch.randint(0, 256, (16, 3, 24, 24), dtype=torch.uint8)
    y = torch.arange(16)

    def first_batch(seed: int) -> torch.Tensor:
        loader = DeviceLoader(x, y, 16, mean=torch.zeros(3), std=torch.ones(3),
                              augment=Augment(resized_crop=True, flip=True),
                              augment_generator=torch.Generator().manual_seed(seed))
        return next(iter(loader))[0]

    a, b, c = first_batch(1), first_batch(1), first_batch(2)
    assert a.shape == (16, 3, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x.float() / 255)  # cropped


def test_image_folder_trains_an_imagenet_stem_resnet_end_to_end(tmp_path: Path) -> None:
    from resnet_lab.spec import TrialConfig
    from resnet_lab.trainer import fit

    root = write_image_folder(tmp_path, {"train": 6, "val": 2})
    cfg = TrialConfig.model_validate({
        "dataset": {"name": "image_folder", "root": str(root), "image_size": 64, "val_fraction": 0.2},
        "model": {"name": "resnet", "depth": 10, "width": 0.25, "stem": "imagenet"},
        "trainer": {"epochs": 1, "batch_size": 8, "device": "cpu", "threads": 1},
    })
    result = fit(cfg)
    assert result.status == "completed" and 0.0 <= result.metrics["test/acc"] <= 1.0
