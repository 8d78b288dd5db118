"""The sweep spec: sections as typed, frozen objects; grid x search expanded into cells."""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from resnet_lab.spec.base import StrictModel
from resnet_lab.spec.catalog import MODEL_CATALOG
from resnet_lab.spec.trial import AnalysisKind, DatasetConfig, ModelConfig, TrainerConfig, TrialConfig

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
    reference: dict[str, float] = Field(default_factory=dict)  # published accuracies by cell label, for reports
    analysis: list[AnalysisKind] = Field(default_factory=list, max_length=2)  # every trial: lesion, attribution

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

    @property
    def max_epochs(self) -> int:
        """The most epochs any one trial trains."""
        return self.trainer.epochs


# --- factor names -----------------------------------------------------------------------------------------------

_SECTIONS = {"model": ModelConfig, "trainer": TrainerConfig, "dataset": DatasetConfig}
_ALIASES = {"model": "model.name", "dataset": "dataset.name", "seed": "seed"}


def factor_path(key: str) -> str:
    """The config path of a grid/search key: `depth` -> `model.depth`, `lr` -> `trainer.lr`; ValueError if none."""
    if key in _ALIASES:
        return _ALIASES[key]
    if "." in key:
        section, field = key.split(".", 1)
        if section in _SECTIONS and field in _SECTIONS[section].model_fields and field != "synthetic":
            return key
    for section in ("model", "trainer", "dataset"):
        if key in _SECTIONS[section].model_fields and key not in ("name", "synthetic"):
            return f"{section}.{key}"
    raise ValueError(f"'{key}' is not a model, trainer or dataset field")


def factor_names() -> list[str]:
    """Every key a grid or search may use (short forms)."""
    names = set(_ALIASES) - {"seed"}
    for model in _SECTIONS.values():
        names.update(f for f in model.model_fields if f not in ("name", "synthetic"))
    return sorted(names)


# --- cells ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One grid combination: its fixed values, the searched values that apply to it, and a readable label."""

    index: int
    label: str
    values: dict[str, Any]  # config path -> value, the grid factors that apply to this cell
    search: dict[str, Choice | Uniform | LogUniform | IntRange]  # config path -> distribution
    base: TrialConfig  # spec values + this cell's values (seed 0, searched values at their spec defaults)


def model_label(model: ModelConfig) -> str:
    """`resnet18`, `resnet18-noskip`, `resnet50-preact-w2`, `baseline_cnn`."""
    label = model.name
    if model.name in ("resnet", "resnet_cifar"):
        default_depth = {"resnet": 18, "resnet_cifar": 20}[model.name]
        label = f"{'resnet' if model.name == 'resnet' else 'resnet_cifar'}{model.depth or default_depth}"
    if model.block:
        label += f"-{model.block}"
    if model.width not in (None, 1.0):
        label += f"-w{model.width:g}"
    if model.skip is False:
        label += "-noskip"
    return label


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1e}" if value < 0.01 or value >= 1000 else f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def cell_label(base: TrialConfig, values: dict[str, Any]) -> str:
    """The model label, plus any non-model grid factors (`resnet18-noskip-lr1.0e-03`, `baseline_cnn-svhn`)."""
    extra = [f"{path.split('.')[-1]}{_short(v)}" for path, v in values.items()
             if not path.startswith("model.") and path != "dataset.name"]
    if "dataset.name" in values:
        extra.insert(0, str(values["dataset.name"]))
    return "-".join([model_label(base.model), *extra])


def applies(path: str, model_name: str) -> bool:
    """Whether a config path means something for a model (depth/skip only for residual models, ...)."""
    if not path.startswith("model.") or path == "model.name" or model_name not in MODEL_CATALOG:
        return True  # an unknown model keeps every factor, so validation reports the name, not a KeyError
    return path.split(".", 1)[1] in MODEL_CATALOG[model_name].params


def with_values(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of a nested config dict with dotted-path values set."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for path, value in values.items():
        node = out
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def spec_trial_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec's fixed sections as a TrialConfig dict (unset fields dropped, so model defaults apply)."""
    return {"dataset": spec.dataset.model_dump(exclude_none=True), "model": spec.model.model_dump(exclude_none=True),
            "trainer": spec.trainer.model_dump(exclude_none=True), "seed": 0, "analysis": list(spec.analysis)}


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """Enumerate the grid; drop factors that do not apply to a cell's model and merge the duplicates.

    Raises ValueError naming the factor when a combination is invalid (e.g. a depth the model lacks).
    """
    base = spec_trial_dict(spec)
    paths = {key: factor_path(key) for key in spec.grid}
    search = {factor_path(key): dist for key, dist in spec.search.items()}
    cells: list[Cell] = []
    seen: set[str] = set()
    for combo in itertools.product(*spec.grid.values()):
        values = dict(zip(paths.values(), combo, strict=True))
        model_name = values.get("model.name", spec.model.name)
        applicable = {p: v for p, v in values.items() if applies(p, model_name)}
        config = _validated(with_values(base, applicable), applicable, "grid")
        key = repr(sorted(applicable.items()))
        if key in seen:
            continue
        seen.add(key)
        cell_search = {p: d for p, d in search.items() if applies(p, model_name)}
        cells.append(Cell(len(cells), cell_label(config, applicable), applicable, cell_search, config))
    labels = [c.label for c in cells]
    if len(set(labels)) != len(labels):  # two cells only differing in a value the label rounds away
        cells = [Cell(c.index, f"{c.label}-c{c.index}", c.values, c.search, c.base) for c in cells]
    return cells


class CellError(ValueError):
    """A grid combination (or searched value) makes an invalid TrialConfig; `field` is the config path at fault."""

    def __init__(self, message: str, values: dict[str, Any], field: str) -> None:
        super().__init__(message)
        self.values, self.field = values, field


def _validated(config: dict[str, Any], values: dict[str, Any], section: str) -> TrialConfig:
    try:
        return TrialConfig.model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
        raise CellError(f"{section} combination {{{shown}}}: {where}: {_clean(err['msg'])}", values, where) from None


def _clean(message: str) -> str:
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    return message[:1].lower() + message[1:]


def configs_in(spec: SweepSpec, cell: Cell) -> int:
    """Configurations a cell runs: TPE's proposals, or one when nothing applies to it is searched."""
    return spec.samples_per_cell if cell.search else 1


def startup_configs(spec: SweepSpec, cell: Cell) -> int:
    """Configurations of a cell drawn at random before TPE models the results (`search_startup`, else auto).

    Optuna's default is 10, made for studies of 100+ trials: a cell of 12 would never leave random search. Auto is
    a third of the cell's configurations, at least 2 (TPE needs a better and a worse group) and at most 10.
    """
    configs = configs_in(spec, cell)
    if spec.search_startup is not None:
        return min(spec.search_startup, configs)
    return min(configs, max(2, min(10, math.ceil(configs / 3))))


def trials_in(spec: SweepSpec, cell: Cell) -> int:
    """Trials a cell runs: each configuration once per seed, plus the confirm stage's seeds."""
    return configs_in(spec, cell) * len(spec.seeds) + (len(spec.confirm.seeds) if spec.confirm else 0)


def search_points(dist: Choice | Uniform | LogUniform | IntRange) -> list[Any]:
    """Values that bound a distribution: every choice, or low and high."""
    return list(dist.values) if isinstance(dist, Choice) else [dist.low, dist.high]


def check_cells(spec: SweepSpec, cells: list[Cell]) -> list[tuple[str, str]]:
    """Cross-field rules pydantic cannot see; returns (field path, message) pairs."""
    problems: list[tuple[str, str]] = []
    for key, dist in spec.search.items():
        path = factor_path(key)
        if key in spec.grid or any(factor_path(g) == path for g in spec.grid):
            problems.append((f"search.{key}", "is also a grid factor; a value is either enumerated or searched"))
            continue
        for i, point in enumerate(search_points(dist)):
            where = f"search.{key}.values[{i}]" if isinstance(dist, Choice) else f"search.{key}.{('low', 'high')[i]}"
            for cell in (c for c in cells if path in c.search):
                try:
                    _validated(with_values(cell.base.model_dump(exclude_none=True), {path: point}), {}, "search")
                except ValueError as exc:
                    problems.append((where, f"{str(exc).split(': ', 2)[-1]} (got {point!r}, cell {cell.label})"))
                    break
    if spec.search and not any(cell.search for cell in cells):
        problems.append(("search", "no searched value applies to any cell's model"))
    if spec.samples_per_cell > 1 and not spec.search:
        problems.append(("samples_per_cell", f"needs a `search` section: with nothing searched every sample of a "
                                             f"cell is the same configuration (got {spec.samples_per_cell}); "
                                             "use `seeds` to repeat runs"))
    if spec.search_startup is not None and not spec.search:
        problems.append(("search_startup", "needs a `search` section: it is how many searched configurations "
                                           f"are drawn at random before TPE (got {spec.search_startup})"))
    if spec.confirm is not None and not spec.search:
        problems.append(("confirm", "needs a `search` section: it re-runs each cell's best searched configuration"))
    if isinstance(spec.scheduler, AshaConfig):
        max_t = spec.scheduler.max_t or spec.trainer.epochs
        if spec.scheduler.max_t is not None and max_t > spec.trainer.epochs:
            problems.append(("scheduler.max_t", f"must be <= trainer.epochs ({spec.trainer.epochs}) (got {max_t})"))
        if spec.scheduler.grace_period > max_t:
            problems.append(("scheduler.grace_period", f"must be <= max_t ({max_t}) "
                                                       f"(got {spec.scheduler.grace_period})"))
    if spec.mode is not None and spec.mode != METRICS[spec.metric]:
        problems.append(("mode", f"{spec.metric} is better when {METRICS[spec.metric]}imised (got {spec.mode})"))
    problems.extend(placement_problems(spec, cells))
    return problems


def placement_problems(spec: SweepSpec, cells: list[Cell]) -> list[tuple[str, str]]:
    """GPU requests the trainer cannot honour: it trains on one GPU per process, and only on GPUs Ray assigned."""
    res, problems = spec.resources, []
    if res.workers > 1 and 0 < res.gpu < 1:
        problems.append(("resources.gpu", f"a fraction packs several DDP workers of one trial onto one GPU, which "
                                          f"NCCL refuses ('Duplicate GPU detected'); write gpu: 1 (one GPU per "
                                          f"worker), or workers: 1 to pack single-worker trials (got {res.gpu:g} "
                                          f"with workers: {res.workers})"))
    if res.gpu > 1:
        gpus = int(res.gpu) * res.workers
        problems.append(("resources.gpu", f"each worker trains on one GPU, so the others would be reserved and "
                                          f"idle; write gpu: 1 and workers: {gpus} to train data-parallel on {gpus} "
                                          f"GPUs (got {res.gpu:g} with workers: {res.workers})"))
    if res.gpu == 0:
        for cell in cells:
            if cell.base.trainer.device != "cuda":
                continue
            where = "trainer.device"
            if "trainer.device" in cell.values:  # from the grid: point at the factor when it is a plain one
                where = next((f"grid.{k}" for k in spec.grid if k in ("device", "trainer.device")), "grid")
            problems.append((where, "'cuda' needs a GPU from Ray, but resources.gpu is 0 (a trial would use a GPU "
                                    "nobody reserved for it); write resources.gpu: 1 (or 0.5 to pack two trials "
                                    f"per GPU), or trainer.device: auto (got 'cuda', cell {cell.label})"))
            break
    return problems
