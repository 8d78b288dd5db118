"""Parameter counts of a trial's model without loading its data, for `match_params` (capacity-matched cells)."""

from __future__ import annotations

import functools

from resnet_lab.models.registry import build_model, count_params
from resnet_lab.spec import TrialConfig
from resnet_lab.spec.datasets import FILE_DATASETS


def data_shape(cfg: TrialConfig) -> tuple[int, int]:
    """(in_channels, num_classes) the model of `cfg` is built with."""
    ds = cfg.dataset
    channels, classes = _all_classes(cfg)
    return channels, len(ds.classes) if getattr(ds, "classes", None) else classes


def _all_classes(cfg: TrialConfig) -> tuple[int, int]:
    ds = cfg.dataset
    if ds.name == "synthetic":
        return ds.synthetic.channels, ds.synthetic.num_classes
    if ds.name in FILE_DATASETS:  # fixed facts: no need to load the data to learn its shape
        facts = FILE_DATASETS[ds.name]
        return facts.channels, facts.num_classes
    # A folder of images (class sub-folders): RGB, as many classes as the training folder has sub-folders.
    from torchvision.datasets.folder import find_classes

    root = ds.root_path()
    train = root / "train" if (root / "train").is_dir() else root
    return 3, len(find_classes(str(train))[0])


def param_count(cfg: TrialConfig) -> int:
    """Trainable parameters of the model `cfg` trains (its dataset's channels and classes)."""
    in_channels, num_classes = data_shape(cfg)
    kwargs = cfg.model.build_kwargs(cfg.trainer.resolved().dropout)
    return _count(cfg.model.name, in_channels, num_classes, tuple(sorted(kwargs.items())))


@functools.lru_cache(maxsize=1024)
def _count(name: str, in_channels: int, num_classes: int, kwargs: tuple[tuple[str, object], ...]) -> int:
    return count_params(build_model(name, in_channels=in_channels, num_classes=num_classes, **dict(kwargs)))
