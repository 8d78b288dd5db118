"""Size caps checked before the grid is expanded, and cross-field rules on values pydantic accepts one by one.

Each rule returns (field path, message) pairs; `load_spec` turns them into located errors or warnings. Kept apart
from `sweep.check_cells` (the grid/search rules) so the two can change independently.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from resnet_lab.spec.cells import Cell, search_points
from resnet_lab.spec.errors import suggest
from resnet_lab.spec.sweep import Choice, SweepSpec, factor_path

# A real sweep has 2-30 cells and tens to hundreds of trials; issue 15 plans for 1,000-trial sweeps. Ten times
# that is still a plan, anything beyond is a typo (an extra zero, a factor listed by mistake) or an attack, and is
# refused from the factor counts alone: a 200-byte grid of 6 factors x 10 values is a million cells, which took
# minutes to expand and validate before any message.
MAX_CELLS = 1_000
MAX_TRIALS = 10_000
# Schedules that warm the lr up (resnet_lab/optim.py); `plateau` and `none` ignore warmup_epochs.
WARMUP_SCHEDULES = ("onecycle", "cosine")


@dataclass
class Findings:
    """What the value rules found: errors stop the load; warnings are printed with the plan."""

    errors: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)


def _count(n: int) -> str:
    return f"{n:,}" if n < 10**15 else f"{n:.2e}"


_SCALARS = (str, int, float, bool, type(None))


def grid_value_problems(spec: SweepSpec) -> list[tuple[str, str]]:
    """Grid entries must be single values, or mappings of single values (a variant setting several fields).

    A list in a grid (`model: [[], resnet]`, found by tests/test_spec_fuzz.py) reached cell expansion and raised
    TypeError (unhashable) instead of an error naming the entry.
    """
    problems: list[tuple[str, str]] = []
    for key, entries in spec.grid.items():
        for i, entry in enumerate(entries):
            if isinstance(entry, dict):
                problems += [(f"grid.{key}[{i}].{sub}", f"a variant's field takes one value, not a "
                                                        f"{'mapping' if isinstance(v, dict) else 'list'} (got {v!r})")
                             for sub, v in entry.items() if not isinstance(v, _SCALARS)]
            elif not isinstance(entry, _SCALARS):
                problems.append((f"grid.{key}[{i}]", f"a grid entry is one value (or a mapping of fields for a "
                                                     f"variant), not a list (got {entry!r})"))
    return problems


def size_problems(spec: SweepSpec) -> list[tuple[str, str]]:
    """Cells and trials the spec would plan, from the factor counts (before any cell is built), against the caps.

    The counts are upper bounds: expansion later merges cells a factor does not apply to (depth of a baseline CNN).
    """
    lengths = {key: len(values) if isinstance(values, list | tuple) else 1 for key, values in spec.grid.items()}
    cells = math.prod(lengths.values())
    if cells > MAX_CELLS:
        product = " x ".join(f"{key} {n:,}" for key, n in lengths.items())
        return [("grid", f"{len(lengths)} factors make {_count(cells)} cells ({product}); at most {MAX_CELLS:,} "
                         "are allowed: search some factors instead of enumerating them, or split the sweep")]
    configs = spec.samples_per_cell if spec.search else 1
    confirm = len(spec.confirm.seeds) if spec.confirm else 0
    per_cell = configs * len(spec.seeds) + confirm
    trials = cells * per_cell
    if trials <= MAX_TRIALS:
        return []
    parts = {"grid": cells, "samples_per_cell": configs, "seeds": len(spec.seeds)}
    where = max(parts, key=lambda k: parts[k])  # point at the biggest multiplier
    detail = (f"{cells:,} cell{'s' if cells != 1 else ''} x ({configs:,} configuration{'s' if configs != 1 else ''} "
              f"x {len(spec.seeds)} seed{'s' if len(spec.seeds) != 1 else ''}"
              + (f" + {confirm} confirm seeds" if confirm else "") + ")")
    return [(where, f"the sweep would run up to {_count(trials)} trials ({detail}); at most {MAX_TRIALS:,} are "
                    "allowed: lower samples_per_cell or seeds, or split the sweep")]


def check_spec_values(spec: SweepSpec, cells: list[Cell], grid_overridden: bool = False) -> Findings:
    """Values each valid alone that contradict another field, or that are surely a slip (a percent for a fraction).

    `grid_overridden`: a --set changed the grid, model or dataset, so a `reference` label for a cell the override
    removed is expected (a warning), not a typo (an error).
    """
    found = Findings()
    if spec.time_budget_s is not None and not math.isfinite(spec.time_budget_s):
        found.errors.append(("time_budget_s", f"must be a finite number of seconds (got {spec.time_budget_s}); "
                                              "leave it out for no limit"))
    found.errors += _warmup_problems(spec, cells)
    reference = getattr(spec, "reference", None) or {}
    errors, warnings = _reference_problems(reference, [c.label for c in cells], grid_overridden)
    found.errors += errors
    found.warnings += warnings
    errors, warnings = _report_problems(spec, [c.label for c in cells], grid_overridden)
    found.errors += errors
    found.warnings += warnings
    return found


def _report_problems(spec: SweepSpec, labels: list[str],
                     grid_overridden: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`report.baseline` and `report.compare` name cells the sweep has (a warning when a --set changed the grid)."""
    named = [("report.baseline", spec.report.baseline)] if spec.report.baseline is not None else []
    named += [(f"report.compare[{i}][{j}]", label) for i, pair in enumerate(spec.report.compare)
              for j, label in enumerate(pair)]
    errors: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    for path, label in named:
        if label in labels:
            continue
        message = f"'{label}' is not a cell label{suggest(label, labels)} (cells: {', '.join(labels[:10])})"
        (warnings if grid_overridden else errors).append(
            (path, message + ("; a --set changed the grid" if grid_overridden else "")))
    errors += [(f"report.compare[{i}]", f"compares a cell with itself (got {pair})")
               for i, pair in enumerate(spec.report.compare) if pair[0] == pair[1]]
    return errors, warnings


def _warmup_problems(spec: SweepSpec, cells: Iterable[Cell]) -> list[tuple[str, str]]:
    """warmup_epochs longer than the run: the lr would still be climbing when training ends (optim.py clamps it)."""
    problems: list[tuple[str, str]] = []
    search_key = next((k for k in spec.search if factor_path(k) == "trainer.warmup_epochs"), None)
    grid_key = next((k for k in spec.grid if factor_path(k) == "trainer.warmup_epochs"), None)
    for cell in cells:
        trainer = cell.base.trainer.resolved()
        if trainer.schedule not in WARMUP_SCHEDULES:
            continue
        where = f"grid.{grid_key}" if grid_key and "trainer.warmup_epochs" in cell.values else "trainer.warmup_epochs"
        warmups = [(where, trainer.warmup_epochs)]
        dist = cell.search.get("trainer.warmup_epochs")
        if dist is not None and search_key is not None:
            points = search_points(dist)
            warmups.append((f"search.{search_key}.{'values' if isinstance(dist, Choice) else 'high'}", max(points)))
        for path, warmup in warmups:
            if warmup > trainer.epochs:
                problems.append((path, f"must be <= trainer.epochs ({trainer.epochs}) with the {trainer.schedule} "
                                       f"schedule: the lr would still be warming up when training ends "
                                       f"(got {warmup:g}, cell {cell.label})"))
        if problems:
            break  # one cell says it; the others would repeat it
    return problems


def _reference_problems(reference: Mapping[str, Any], labels: list[str],
                        grid_overridden: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """`reference` values are accuracies as fractions, by the label of a cell the sweep has."""
    errors: list[tuple[str, str]] = []
    warnings: list[tuple[str, str]] = []
    for label, value in reference.items():
        path = f"reference.{label}"
        if isinstance(value, int | float) and not 0.0 <= value <= 1.0:
            hint = f"; write {value / 100:g} for {value:g}%" if 1.0 < value <= 100.0 else ""
            errors.append((path, f"is an accuracy as a fraction between 0 and 1 (got {value:g}){hint}"))
        if label not in labels:
            message = (f"no cell is labelled '{label}', so the report cannot show it{suggest(label, labels)} "
                       f"(cells: {', '.join(labels[:10])}{', ...' if len(labels) > 10 else ''})")
            if grid_overridden:
                warnings.append((path, message + "; a --set changed the grid"))
            else:
                errors.append((path, message))
    return errors, warnings
