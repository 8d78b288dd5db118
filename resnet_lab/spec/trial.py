"""Typed configuration of one training run: dataset, model, trainer recipe and seed.

These are the objects the trainer receives. Every default lives here (recipes included); nothing downstream
does `cfg.get("lr", 0.01)`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, Strict, ValidationInfo, create_model, field_validator, model_validator

from resnet_lab.spec.base import StrictModel, without_none
from resnet_lab.spec.catalog import MODEL_CATALOG
from resnet_lab.spec.datasets import DEFAULT_FOLDER_IMAGE_SIZE, DatasetName
from resnet_lab.spec.errors import suggest

DATA_ROOT_ENV = "RESNET_LAB_DATA"


def default_data_root() -> Path:
    """The data root when neither the spec nor the CLI names one: $RESNET_LAB_DATA, else ~/.cache/resnet-lab/data."""
    env = os.environ.get(DATA_ROOT_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "resnet-lab" / "data"


class SyntheticConfig(StrictModel):
    """Shape of the generated dataset (`dataset.name: synthetic`): class-dependent patterns plus noise."""

    train_size: int = Field(1024, gt=0, le=1_000_000)
    test_size: int = Field(256, gt=0, le=1_000_000)
    num_classes: int = Field(10, ge=2, le=1000)
    channels: Literal[1, 3] = 3
    image_size: int = Field(32, ge=8, le=256)
    noise: float = Field(0.5, ge=0.0, le=10.0)  # std of the per-image noise, relative to the class pattern
    seed: int = Field(0, ge=0, le=2**31 - 1)


class DatasetConfig(StrictModel):
    """Which data a run trains on and how the train set is split."""

    name: DatasetName = "cifar10"
    root: str | None = None  # None -> default_data_root()
    download: bool = True  # fetch through torchvision when missing (needs the internet)
    subset: int | None = Field(None, gt=0, le=100_000_000)  # use only the first N shuffled training images (quick runs)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    # fixed across trial seeds so every trial validates on the same images
    split_seed: int = Field(0, ge=0, le=2**31 - 1)
    augment: bool | None = None  # None -> the dataset's default (crop+flip; crop only for digits)
    synthetic: SyntheticConfig = SyntheticConfig()
    # image_folder only: side of the square images (shorter side resized to it, then center-cropped); None -> 224
    image_size: int | None = Field(None, ge=16, le=1024)
    # keep only these classes, relabelled 0..k-1 in this order (e.g. [5, 6, 7, 8, 9] for a transfer target)
    # (a tuple, so the config stays hashable for the per-worker data cache; YAML lists are accepted)
    classes: tuple[Annotated[int, Strict(), Field(ge=0)], ...] | None = Field(None, min_length=2, max_length=100_000,
                                                                               strict=False)

    @model_validator(mode="after")
    def _folder_fields(self) -> DatasetConfig:
        if self.name == "image_folder" and self.root is None:
            raise ValueError("dataset.root is required for image_folder: a directory holding train/ and val/ "
                             "(or test/), each with one sub-folder of images per class")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError(f"dataset.classes lists a class twice (got {self.classes})")
        if self.name != "image_folder" and self.image_size is not None:
            raise ValueError(f"dataset.image_size applies to image_folder only ({self.name} has a fixed size; "
                             "synthetic data takes dataset.synthetic.image_size)")
        return self

    @property
    def folder_image_size(self) -> int:
        """image_folder's image side in pixels (dataset.image_size, default 224)."""
        return self.image_size if self.image_size is not None else DEFAULT_FOLDER_IMAGE_SIZE

    @property
    def has_files(self) -> bool:
        """Whether the dataset is read from files (to fetch or check before a sweep); synthetic is generated."""
        return self.name != "synthetic"

    def root_path(self) -> Path:
        """The resolved, absolute data root."""
        return (Path(self.root).expanduser() if self.root else default_data_root()).absolute()


class ModelConfig(StrictModel):
    """Architecture by name; fields left as None take the model's own default."""

    name: str = "resnet"
    depth: int | None = Field(None, gt=0)
    block: Literal["basic", "bottleneck", "preact"] | None = None
    width: float | None = Field(None, gt=0.0, le=16.0)  # channel multiplier
    skip: bool | None = None  # residual models only; False is He et al.'s plain-net ablation
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # None -> the recipe's dropout
    stem: Literal["cifar", "imagenet"] | None = None  # resnet: 3x3 for 32 px, or torchvision's 7x7/2 + max-pool
    # Transfer (resnet_lab.transfer): start from a checkpoint's weights; "{seed}" in the path is the trial's seed.
    init: str | None = Field(None, min_length=1)  # a directory holding train_state.pt (or the file itself)
    head: Literal["reset", "keep"] | None = None  # None/reset: a new classifier (`fc`) for the new classes
    freeze: Literal["stem"] | Annotated[int, Field(ge=1, le=8)] | None = None  # the stem, or stem + first N stages

    @field_validator("init")
    @classmethod
    def _absolute_init(cls, init: str | None) -> str | None:
        # Absolute now, in the driver: Ray runs each trial in its own working directory.
        return None if init is None else str(Path(init).expanduser().absolute())

    @model_validator(mode="after")
    def _transfer_fields(self) -> ModelConfig:
        if self.init is None and (self.freeze is not None or self.head is not None):
            raise ValueError("model.freeze and model.head apply with model.init (a checkpoint to start from)")
        if self.freeze is not None and not MODEL_CATALOG[self.name].residual:
            raise ValueError(f"model.freeze needs a model with a stem and stages (resnet family), not '{self.name}'")
        return self

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        if name not in MODEL_CATALOG:
            raise ValueError(f"'{name}' is not a known model{suggest(name, MODEL_CATALOG)} "
                             f"(known: {', '.join(sorted(MODEL_CATALOG))})")
        return name

    @field_validator("depth", "block", "width", "skip", "dropout", "stem")
    @classmethod
    def _applicable(cls, value: Any, info: ValidationInfo) -> Any:
        entry = MODEL_CATALOG.get(info.data.get("name", ""))
        if value is None or entry is None:
            return value
        if info.field_name not in entry.params:
            raise ValueError(f"'{info.field_name}' does not apply to model '{info.data['name']}'")
        if info.field_name == "depth" and value not in entry.depths:
            raise ValueError(f"depth {value} is not supported by '{info.data['name']}'; "
                             f"supported: {', '.join(map(str, entry.depths))}")
        return value

    def build_kwargs(self, default_dropout: float) -> dict[str, Any]:
        """Keyword arguments for `build_model(self.name, ...)`: the fields that were set, plus dropout."""
        kwargs = {f: getattr(self, f) for f in ("depth", "block", "width", "skip", "stem")
                  if getattr(self, f) is not None}
        kwargs["dropout"] = self.dropout if self.dropout is not None else default_dropout
        return kwargs


Recipe = Literal["paper", "fast"]
AnalysisKind = Literal["lesion", "attribution"]


class TrainerConfig(StrictModel):
    """Optimisation recipe and its knobs. None means "the recipe's value" (see RECIPES).

    The knobs are declared here only: ResolvedTrainer is derived from these fields (`_resolved_model`).
    """

    recipe: Recipe = "paper"
    epochs: int = Field(30, gt=0, le=10_000)
    batch_size: int | None = Field(None, gt=0, le=65_536)
    optimizer: Literal["adam", "adamw", "sgd"] | None = None
    lr: float | None = Field(None, gt=0.0, le=10.0)
    momentum: float | None = Field(None, ge=0.0, lt=1.0)
    nesterov: bool | None = None
    weight_decay: float | None = Field(None, ge=0.0, le=1.0)
    schedule: Literal["plateau", "onecycle", "cosine", "none"] | None = None
    warmup_epochs: float | None = Field(None, ge=0.0, le=10_000)
    plateau_patience: int | None = Field(None, ge=0, le=10_000)
    plateau_factor: float | None = Field(None, gt=0.0, lt=1.0)
    early_stopping_patience: int | None = Field(None, ge=0, le=10_000)  # 0 disables early stopping
    label_smoothing: float | None = Field(None, ge=0.0, lt=1.0)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)  # default dropout for models that do not set their own
    grad_clip: float | None = Field(None, gt=0.0, le=1e6)
    # auto: under Ray, CUDA only when Ray assigned the trial GPUs (resources.gpu > 0); outside Ray, CUDA if visible
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on GPUs with native bf16 (Ampere on); float32 elsewhere
    channels_last: bool = True  # NHWC memory format (CUDA and CPU: oneDNN runs NHWC without reorders)
    compile: bool = False  # torch.compile the model (compile time is reported separately)
    threads: int | None = Field(None, gt=0, le=1024)  # torch intra-op threads; None leaves torch's default
    # deterministic kernels and no cudnn.benchmark autotuning: same seed, same device -> the same numbers (slower)
    deterministic: bool | None = None

    def resolved(self) -> ResolvedTrainer:
        """Fill every None from the recipe: the only place recipe defaults are applied."""
        values = {**RECIPES[self.recipe], **{k: v for k, v in self.model_dump().items() if v is not None}}
        return ResolvedTrainer(**values)


# The reference study: Adam lr 1e-3, batch 64, ReduceLROnPlateau on val loss, early stopping, dropout.
# `fast`: the usual CIFAR speed recipe (SGD Nesterov 0.9, wd 5e-4, one-cycle with warm-up, label smoothing 0.1,
# batch 512, lr 0.2 for batch 512 as in Goyal et al.'s 0.1 per 256).
RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(
        batch_size=64, optimizer="adam", lr=1e-3, momentum=0.9, nesterov=False, weight_decay=0.0,
        schedule="plateau", warmup_epochs=0.0, plateau_patience=3, plateau_factor=0.5,
        early_stopping_patience=8, label_smoothing=0.0, dropout=0.3, deterministic=False,
    ),
    "fast": dict(
        batch_size=512, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True, weight_decay=5e-4,
        schedule="onecycle", warmup_epochs=1.0, plateau_patience=3, plateau_factor=0.5,
        early_stopping_patience=0, label_smoothing=0.1, dropout=0.0, deterministic=False,
    ),
}


def _resolved_model() -> type[StrictModel]:
    """TrainerConfig with every field the recipes fill made required and never None: the knobs stay declared once.

    A field with a non-None default becomes required too (resolved() always passes it); a field whose default is
    None and that no recipe fills (grad_clip, threads) keeps its declaration: None stays a meaningful value.
    """
    filled = set(RECIPES["paper"])
    assert all(set(recipe) == filled for recipe in RECIPES.values()), "every recipe fills the same knobs"
    assert filled <= set(TrainerConfig.model_fields), "a recipe fills a knob TrainerConfig does not declare"
    fields: dict[str, Any] = {}
    for name, info in TrainerConfig.model_fields.items():
        if name not in filled and info.default is None:
            fields[name] = (info.annotation, info)
            continue
        annotation = info.annotation
        if name in filled:
            annotation = without_none(annotation)
        constrained = Annotated[(annotation, *info.metadata)] if info.metadata else annotation  # bounds kept
        fields[name] = (constrained, ...)
    return create_model("ResolvedTrainer", __base__=StrictModel, __module__=__name__,
                        __doc__="A TrainerConfig with every recipe default applied: what the trainer actually runs.",
                        **fields)


ResolvedTrainer = _resolved_model()


class TrialConfig(StrictModel):
    """Everything one training run needs: the trainer's only input."""

    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    seed: int = Field(0, ge=0, le=2**31 - 1)
    # after training, on the tested weights: lesion study, Captum attributions (resnet_lab.analysis)
    analysis: list[AnalysisKind] = Field(default_factory=list, max_length=2)

    @field_validator("analysis")
    @classmethod
    def _unique_analyses(cls, kinds: list[str]) -> list[str]:
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"analysis lists a kind twice (got {kinds})")
        return kinds

    def to_flat(self) -> dict[str, Any]:
        """Flat `section.key` dict for Ray's param_space and MLflow params (None values dropped)."""
        return flatten(self.model_dump(exclude_none=True))

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> TrialConfig:
        """Rebuild from `to_flat()` output (what a Ray trial receives); keys outside the config are ignored."""
        fields = set(cls.model_fields)
        return cls.model_validate(with_values({}, {k: v for k, v in flat.items() if k.split(".", 1)[0] in fields}))


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{path}."))
        else:
            out[path] = value
    return out


def with_values(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a nested config dict with dotted-path values set (`{"model.depth": 18}`); the one setter of
    dotted paths (`--set` has its own, which also keeps the spec's line numbers: `spec/load.py`)."""
    out = copy.deepcopy(dict(config))
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out
