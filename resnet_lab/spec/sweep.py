"""The sweep spec: sections as typed, frozen objects; grid x search expanded into cells."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from resnet_lab.spec.base import StrictModel
from resnet_lab.spec.trial import AnalysisKind, DatasetConfig, ModelConfig, TrainerConfig

# --- search distributions ---------------------------------------------------------------------------------------


class Choice(StrictModel):
    """One of a list of values."""

    type: Literal["choice"]
    values: list[Any] = Field(min_length=1, max_length=1000)


class Uniform(StrictModel):
    """A float drawn uniformly from [low, high]."""

    type: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _ordered(self) -> Uniform:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError(f"low and high must be finite (got low={self.low}, high={self.high})")
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        return self


class LogUniform(Uniform):
    """A float drawn log-uniformly from [low, high]; low > 0."""

    type: Literal["loguniform"]  # type: ignore[assignment]
    low: float = Field(gt=0.0)


class IntRange(StrictModel):
    """An integer in [low, high], optionally on a log scale or with a step."""

    type: Literal["int"]
    low: int
    high: int
    step: int = Field(1, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> IntRange:
        if self.low >= self.high:
            raise ValueError(f"low must be < high (got low={self.low}, high={self.high})")
        if self.log and (self.low <= 0 or self.step != 1):
            raise ValueError("a log-scale int range needs low > 0 and step 1")
        return self


Distribution = Annotated[Choice | Uniform | LogUniform | IntRange, Field(discriminator="type")]
DISTRIBUTION_TAGS = ("choice", "uniform", "loguniform", "int")

# --- scheduling, resources --------------------------------------------------------------------------------------


class AshaConfig(StrictModel):
    """Asynchronous successive halving (Li et al. 2020), one bracket set per grid cell."""

    type: Literal["asha"]
    grace_period: int = Field(1, gt=0)  # epochs every trial gets before it can be stopped
    reduction_factor: int = Field(3, ge=2, le=100)  # keep the top 1/reduction_factor at each rung
    max_t: int | None = Field(None, gt=0)  # None -> trainer.epochs
    brackets: int = Field(1, ge=1, le=10)


class NoScheduler(StrictModel):
    """Every trial runs its full budget."""

    type: Literal["none"]


SCHEDULER_TAGS = ("asha", "none")


def asha_rungs(cfg: AshaConfig, max_t: int) -> list[int]:
    """The epochs at which ASHA compares trials (bracket 0), ascending, as Ray's _Bracket places them."""
    out, t = [], cfg.grace_period
    while t < max_t:
        out.append(t)
        t *= cfg.reduction_factor
    return out


class Resources(StrictModel):
    """What one trial asks Ray for."""

    cpu: float = Field(1.0, gt=0.0, le=1024)
    gpu: float = Field(0.0, ge=0.0, le=64)  # a fraction < 1 packs trials onto one GPU; >= 1 must be whole
    memory_gb: float | None = Field(None, gt=0.0, le=16_384)
    # > 1: one trial trains data-parallel (DDP) over this many Ray Train workers, each with `cpu` and `gpu`.
    workers: int = Field(1, ge=1, le=1024)

    @field_validator("gpu")
    @classmethod
    def _whole_or_fraction(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise ValueError(f"must be a fraction below 1 (packing) or a whole number of GPUs (got {gpu})")
        return gpu


class Confirm(StrictModel):
    """Re-run the best configuration of each cell with these seeds at full budget (no early stopping by ASHA)."""

    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(min_length=1, max_length=100)

    @field_validator("seeds")
    @classmethod
    def _unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be unique (got {seeds})")
        return seeds


class ReportConfig(StrictModel):
    """What the report compares: every cell against `baseline`, the pairs in `compare`, and convergence speed."""

    baseline: str | None = None  # a cell label: every other cell is compared with it, paired by seed
    # pairs [a, b] of cell labels reported as a minus b
    compare: list[Annotated[list[str], Field(min_length=2, max_length=2)]] = Field(default_factory=list,
                                                                                   max_length=100)
    # val accuracy for "epochs and seconds to reach"; None: the lowest cell's mean best val accuracy (all reach it)
    target_acc: float | None = Field(None, gt=0.0, lt=1.0)


METRICS = {"val/acc": "max", "val/loss": "min", "train/acc": "max", "train/loss": "min"}

# --- the spec ---------------------------------------------------------------------------------------------------


class SweepSpec(StrictModel):
    """A whole sweep: fixed values, grid factors, searched values, scheduling and resources."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    experiment: str | None = Field(None, min_length=1, max_length=200)  # MLflow experiment; None -> name
    description: str = ""
    dataset: DatasetConfig = DatasetConfig()
    model: ModelConfig = ModelConfig()
    trainer: TrainerConfig = TrainerConfig()
    grid: dict[str, list[Any]] = Field(default_factory=dict)
    search: dict[str, Distribution] = Field(default_factory=dict)
    samples_per_cell: int = Field(1, ge=1, le=10_000)
    search_startup: int | None = Field(None, ge=1, le=10_000)  # random configs per cell before TPE; None: auto
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field([0], min_length=1, max_length=100)
    confirm: Confirm | None = None
    scheduler: Annotated[AshaConfig | NoScheduler, Field(discriminator="type")] = NoScheduler(type="none")
    metric: str = "val/acc"
    mode: Literal["max", "min"] | None = None  # None -> the metric's natural direction
    resources: Resources = Resources()
    max_concurrent: int | None = Field(None, ge=1, le=10_000)
    time_budget_s: float | None = Field(None, gt=0)
    storage: str | None = None  # Ray's trial storage: a local dir (default ./ray_results) or s3:// gs:// URI
    max_failures: int = Field(2, ge=0, le=100)
    # A trial checkpoints every this many epochs, or with "auto" by time (resnet_lab.tune.trainable.CheckpointClock:
    # at most 1/20 of its time on checkpoints, at most every 10 s), and always at its last one. A retried or resumed
    # trial repeats the epochs since its checkpoint (MLflow keeps each epoch's first record).
    checkpoint_every: int | Literal["auto"] = "auto"  # bounds: _every_or_auto
    reference: dict[str, float] = Field(default_factory=dict)  # published accuracies by cell label, for reports
    report: ReportConfig = ReportConfig()
    analysis: list[AnalysisKind] = Field(default_factory=list, max_length=2)  # every trial: lesion, attribution

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _every_or_auto(cls, every: Any) -> Any:
        # One message for the union: pydantic's would list each branch ("constrained-int", "literal['auto']").
        if every == "auto" or (isinstance(every, int) and not isinstance(every, bool) and 1 <= every <= 10_000):
            return every
        raise ValueError(f"expected a whole number of epochs from 1 to 10000, or 'auto' (got {every!r})")

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must be unique (got {seeds})")
        return seeds

    @field_validator("grid")
    @classmethod
    def _non_empty_factors(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"factor '{key}' has no values; list at least one")
            if len({repr(v) for v in values}) != len(values):
                raise ValueError(f"factor '{key}' lists a value twice (got {values})")
        return grid

    @field_validator("metric")
    @classmethod
    def _known_metric(cls, metric: str) -> str:
        if metric.startswith("test/"):
            raise ValueError("the test set is for final evaluation only; optimise a val/ metric")
        if metric not in METRICS:
            raise ValueError(f"unknown metric '{metric}'; use one of {', '.join(METRICS)}")
        return metric

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment the sweep logs to."""
        return self.experiment or self.name

    @property
    def resolved_mode(self) -> Literal["max", "min"]:
        """`mode`, or the metric's natural direction."""
        return self.mode or METRICS[self.metric]  # type: ignore[return-value]

    def to_yaml(self) -> str:
        """The resolved spec as YAML (logged as the sweep run's `spec.yaml`; read back by the report)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --- factor names -----------------------------------------------------------------------------------------------

SECTIONS = {"model": ModelConfig, "trainer": TrainerConfig, "dataset": DatasetConfig}
_ALIASES = {"model": "model.name", "dataset": "dataset.name", "seed": "seed"}


def factor_path(key: str) -> str:
    """The config path of a grid/search key: `depth` -> `model.depth`, `lr` -> `trainer.lr`; ValueError if none."""
    if key in _ALIASES:
        return _ALIASES[key]
    if "." in key:
        section, field = key.split(".", 1)
        if section in SECTIONS and field in SECTIONS[section].model_fields and field != "synthetic":
            return key
    for section in ("model", "trainer", "dataset"):
        if key in SECTIONS[section].model_fields and key not in ("name", "synthetic"):
            return f"{section}.{key}"
    raise ValueError(f"'{key}' is not a model, trainer or dataset field")


def factor_names() -> list[str]:
    """Every key a grid or search may use (short forms)."""
    names = set(_ALIASES) - {"seed"}
    for model in SECTIONS.values():
        names.update(f for f in model.model_fields if f not in ("name", "synthetic"))
    return sorted(names)
