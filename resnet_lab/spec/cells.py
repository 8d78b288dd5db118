"""The cells of a sweep: grid x search expanded into labelled cells, parameter-matched widths solved, and the
checks a whole grid must pass before launch."""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from resnet_lab.spec.base import clean_message
from resnet_lab.spec.catalog import MODEL_CATALOG
from resnet_lab.spec.errors import suggest
from resnet_lab.spec.sweep import (
    METRICS,
    SECTIONS,
    AshaConfig,
    Choice,
    IntRange,
    LogUniform,
    SweepSpec,
    Uniform,
    factor_path,
)
from resnet_lab.spec.trial import ModelConfig, TrialConfig, with_values

# --- cells ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One grid combination: its fixed values, the searched values that apply to it, and a readable label."""

    index: int
    label: str
    values: dict[str, Any]  # config path -> value, the grid factors that apply to this cell
    search: dict[str, Choice | Uniform | LogUniform | IntRange]  # config path -> distribution
    base: TrialConfig  # spec values + this cell's values (seed 0, searched values at their spec defaults)
    match_params: str | None = None  # the cell label whose parameter count this cell's width is solved to
    matched: tuple[float, int, int] | None = None  # (solved width, its parameter count, the target's), once solved


def model_label(model: ModelConfig) -> str:
    """`resnet18`, `resnet18-noskip`, `resnet50-preact-w2`, `baseline_cnn`."""
    label = model.name
    depth, _ = MODEL_CATALOG[model.name].architecture(model.depth, model.block)
    if depth is not None:
        label = f"{model.name}{depth}"
    if model.block:
        label += f"-{model.block}"
    if model.width not in (None, 1.0):
        label += f"-w{model.width:g}"
    if model.skip is False:
        label += "-noskip"
    return label


def short_value(value: Any, fixed_width: bool = False) -> str:
    """A value in a label: `1e-3` -> `1.0e-03`, `0.5` -> `0.5` (`5.0e-01` with `fixed_width`: run names of searched
    floats sort and line up), `True` -> `true`."""
    if isinstance(value, float):
        return f"{value:.1e}" if fixed_width or value < 0.01 or value >= 1000 else f"{value:g}"
    return str(value).lower() if isinstance(value, bool) else str(value)


def cell_label(base: TrialConfig, values: dict[str, Any]) -> str:
    """The model label, plus any non-model grid factors (`resnet18-noskip-lr1.0e-03`, `baseline_cnn-svhn`)."""
    extra = [f"{path.split('.')[-1]}{short_value(v)}" for path, v in values.items()
             if not path.startswith("model.") and path != "dataset.name"]
    if "dataset.name" in values:
        extra.insert(0, str(values["dataset.name"]))
    return "-".join([model_label(base.model), *extra])


def applies(path: str, model_name: str) -> bool:
    """Whether a config path means something for a model (depth/skip only for residual models, ...)."""
    if not path.startswith("model.") or path == "model.name" or model_name not in MODEL_CATALOG:
        return True  # an unknown model keeps every factor, so validation reports the name, not a KeyError
    return path.split(".", 1)[1] in MODEL_CATALOG[model_name].params


def spec_trial_dict(spec: SweepSpec) -> dict[str, Any]:
    """The spec's fixed sections as a TrialConfig dict (unset fields dropped, so model defaults apply)."""
    return {"dataset": spec.dataset.model_dump(exclude_none=True), "model": spec.model.model_dump(exclude_none=True),
            "trainer": spec.trainer.model_dump(exclude_none=True), "seed": 0, "analysis": list(spec.analysis)}


VARIANT_KEYS = ("label", "match_params")  # a mapping grid entry's own keys, besides the config fields it sets


def variant_values(key: str, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config path -> value, variant keys) that one grid entry sets.

    A plain entry sets its factor (`depth: 10` -> model.depth). A mapping entry sets several fields at once, so a
    grid can hold variants with their own parameters: under `model` (or `dataset`, `trainer`) its keys are that
    section's fields, under any other factor name they are factor names (`{depth: 20, lr: 0.1}`); `label` names
    the cell and `match_params: <cell label>` solves the variant's width to that cell's parameter count.
    """
    if not isinstance(value, dict):
        return {factor_path(key): value}, {}
    meta = {k: value[k] for k in VARIANT_KEYS if k in value}
    fields = {k: v for k, v in value.items() if k not in VARIANT_KEYS}
    if key in SECTIONS:
        return {f"{key}.{k}": v for k, v in fields.items()}, meta
    return {factor_path(k): v for k, v in fields.items()}, meta


def variant_problems(spec: SweepSpec) -> list[tuple[str, str]]:
    """Mapping grid entries with keys that name no field, or variant keys of the wrong type; (field, message)."""
    problems: list[tuple[str, str]] = []
    for key, entries in spec.grid.items():
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            where = f"grid.{key}[{i}]"
            if not entry:
                problems.append((where, "a mapping entry must set at least one field (got {})"))
            for sub, value in entry.items():
                if sub in VARIANT_KEYS:
                    if not isinstance(value, str) or not value:
                        problems.append((f"{where}.{sub}", f"should be a cell label (a string) (got {value!r})"))
                    elif sub == "label" and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}", value):
                        problems.append((f"{where}.{sub}", "should be 1 to 64 letters, digits or '_.+-', starting "
                                                           f"with a letter or digit (got {value!r})"))
                    continue
                if key in SECTIONS:
                    known = [f for f in SECTIONS[key].model_fields if f != "synthetic"]
                    if sub not in known:
                        problems.append((f"{where}.{sub}", f"'{sub}' is not a {key} field{suggest(sub, known)} "
                                                           f"(known: {', '.join(known)})"))
                    continue
                try:
                    factor_path(sub)
                except ValueError as exc:
                    problems.append((f"{where}.{sub}", str(exc)))
            if "match_params" in entry and key != "model":
                problems.append((f"{where}.match_params", f"only an entry of the `model` factor can match parameter "
                                                          f"counts (it solves model.width) (got it under '{key}')"))
    return problems


def expand_cells(spec: SweepSpec) -> list[Cell]:
    """Enumerate the grid; drop factors that do not apply to a cell's model and merge the duplicates.

    Raises ValueError naming the factor when a combination is invalid (e.g. a depth the model lacks).
    """
    base = spec_trial_dict(spec)
    search = {factor_path(key): dist for key, dist in spec.search.items()}
    cells: list[Cell] = []
    seen: set[str] = set()
    indexed = [list(enumerate(values)) for values in spec.grid.values()]
    for combo in itertools.product(*indexed):
        values: dict[str, Any] = {}
        chosen: dict[str, Any] = {}  # set by a mapping entry: always applies (a field it names must make sense)
        meta: dict[str, Any] = {}
        origin: dict[str, tuple[str, int]] = {}  # config path -> (grid key, entry index), to point errors at it
        for key, (i, entry) in zip(spec.grid, combo, strict=True):
            fields, entry_meta = variant_values(key, entry)
            (chosen if isinstance(entry, dict) else values).update(fields)
            meta.update(entry_meta)
            origin.update(dict.fromkeys(fields, (key, i)))
        model_name = chosen.get("model.name", values.get("model.name", spec.model.name))
        applicable = {**{p: v for p, v in values.items() if applies(p, model_name)}, **chosen}
        config = _validated(with_values(base, applicable), applicable, "grid", origin)
        key = repr((sorted(applicable.items()), sorted(meta.items())))
        if key in seen:
            continue
        seen.add(key)
        cell_search = {p: d for p, d in search.items() if applies(p, model_name)}
        # A matched cell's width is solved later: its label leaves the (placeholder) width out.
        shown = config.model_copy(update={"model": config.model.model_copy(update={"width": None})}) \
            if "match_params" in meta else config
        label = meta.get("label") or cell_label(shown, applicable)
        cells.append(Cell(len(cells), label, applicable, cell_search, config, meta.get("match_params")))
    labels = [c.label for c in cells]
    if len(set(labels)) != len(labels):  # two cells only differing in a value the label rounds away
        cells = [dataclasses.replace(c, label=f"{c.label}-c{c.index}") for c in cells]
    return cells


def match_problems(spec: SweepSpec, cells: list[Cell]) -> list[tuple[str, str]]:
    """`match_params` that names no cell, itself, or another matched cell; (field, message)."""
    labels = {c.label: c for c in cells}
    entries = {e["match_params"]: f"grid.{k}[{i}].match_params" for k, es in spec.grid.items()
               for i, e in enumerate(es) if isinstance(e, dict) and "match_params" in e}
    problems = []
    for cell in cells:
        if cell.match_params is None:
            continue
        target = labels.get(cell.match_params)
        where = entries.get(cell.match_params, "grid")
        if target is None:
            problems.append((where, f"cell {cell.label}: match_params '{cell.match_params}' is not a cell label"
                                     f"{suggest(cell.match_params, labels)} (cells: {', '.join(labels)})"))
        elif target is cell or target.match_params is not None:
            problems.append((where, f"cell {cell.label}: match_params must name a cell with its own fixed size "
                                     f"(got '{cell.match_params}')"))
    return problems


MATCH_TOLERANCE = 0.02  # a matched cell's parameter count is within 2% of its target's


def resolve_matches(cells: list[Cell], count: Callable[[TrialConfig], int]) -> list[Cell]:
    """Solve `model.width` of every `match_params` cell so its parameter count is within 2% of its target's.

    `count` gives a config's parameter count (resnet_lab.models.matching.param_count builds the model); it is
    passed in because the spec layer never imports torch. Parameter count grows monotonically with width (channel
    counts are rounded), so a bisection on log(width) finds the closest width. Raises ValueError when no width
    within the model's bounds comes within the tolerance.
    """
    labels = {c.label: c for c in cells}
    out = []
    for cell in cells:
        if cell.match_params is None:
            out.append(cell)
            continue
        target = count(labels[cell.match_params].base)
        width, got = _solve_width(cell.base, target, count)
        if abs(got - target) > MATCH_TOLERANCE * target:
            raise ValueError(f"cell {cell.label}: no width in [{_MIN_WIDTH}, {_MAX_WIDTH}] gives within "
                             f"{MATCH_TOLERANCE:.0%} of {cell.match_params}'s {target:,} parameters; the closest is "
                             f"width {width:g} with {got:,}")
        values = {**cell.values, "model.width": width}
        base = cell.base.model_copy(update={"model": cell.base.model.model_copy(update={"width": width})})
        out.append(dataclasses.replace(cell, values=values, base=base, matched=(width, got, target)))
    return out


_MIN_WIDTH, _MAX_WIDTH = 1 / 64, 16.0


def _solve_width(base: TrialConfig, target: int, count: Callable[[TrialConfig], int]) -> tuple[float, int]:
    def at(width: float) -> int:
        return count(base.model_copy(update={"model": base.model.model_copy(update={"width": width})}))

    # Bracket before bisecting: a count grows about quadratically with width, so one build at width 1 predicts the
    # answer, and the search stays within 4x of it either way. Bisecting over the whole [1/64, 16] would build a
    # 16x-wide model first (ResNet-152 at width 16: 15 billion parameters, 60 GB), which is what the bracket avoids.
    w0 = 1.0
    c0 = at(w0)
    guess = min(max(w0 * math.sqrt(target / c0), _MIN_WIDTH), _MAX_WIDTH)
    lo, hi = math.log(max(guess / 4, _MIN_WIDTH)), math.log(min(guess * 4, _MAX_WIDTH))
    best = (w0, c0)
    for _ in range(20):
        mid = (lo + hi) / 2
        width = float(f"{math.exp(mid):.4g}")  # 4 significant digits: readable in labels and params
        got = at(width)
        if abs(got - target) < abs(best[1] - target):
            best = (width, got)
        if got < target:
            lo = mid
        else:
            hi = mid
    return best


class CellError(ValueError):
    """A grid combination (or searched value) makes an invalid TrialConfig; `field` is the config path at fault."""

    def __init__(self, message: str, values: dict[str, Any], field: str,
                 item: tuple[str, int] | None = None) -> None:
        super().__init__(message)
        self.values, self.field, self.item = values, field, item  # item: (grid key, entry index) at fault


def _validated(config: dict[str, Any], values: dict[str, Any], section: str,
               origin: dict[str, tuple[str, int]] | None = None) -> TrialConfig:
    try:
        return TrialConfig.model_validate(config)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        shown = ", ".join(f"{p}={v!r}" for p, v in values.items())
        item = (origin or {}).get(where)
        raise CellError(f"{section} combination {{{shown}}}: {where}: {clean_message(err['msg'])}", values, where,
                        item) from None


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
    if spec.confirm is not None and set(spec.confirm.seeds) & set(spec.seeds):
        both = sorted(set(spec.confirm.seeds) & set(spec.seeds))
        fresh = list(range(max(spec.seeds) + 1, max(spec.seeds) + 1 + len(spec.confirm.seeds)))
        problems.append(("confirm.seeds", f"seeds {both} also ran the search (seeds: {list(spec.seeds)}); a confirm "
                                          "run with a search seed repeats the run that won the selection, so its "
                                          "interval is biased upward: use seeds the search never saw, e.g. "
                                          f"confirm.seeds: {fresh} (got {list(spec.confirm.seeds)})"))
    problems += match_problems(spec, cells)
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
