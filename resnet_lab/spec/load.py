"""`load_spec(path, overrides)`: the one call that turns a YAML file (+ `--set`) into a SweepSpec or a SpecError."""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from resnet_lab.spec.base import clean_message
from resnet_lab.spec.cells import Cell, CellError, check_cells, expand_cells, resolve_matches, variant_problems
from resnet_lab.spec.checks import check_spec_values, grid_value_problems, size_problems
from resnet_lab.spec.errors import SpecError, SpecIssue, format_path, suggest
from resnet_lab.spec.loader import LineDict, LineList, line_of, parse_yaml_text, read_spec_file
from resnet_lab.spec.sweep import (
    DISTRIBUTION_TAGS,
    SCHEDULER_TAGS,
    AshaConfig,
    Choice,
    IntRange,
    LogUniform,
    NoScheduler,
    SweepSpec,
    Uniform,
    factor_names,
    factor_path,
)

_TAGGED: dict[str, type[BaseModel]] = {"choice": Choice, "uniform": Uniform, "loguniform": LogUniform,
                                       "int": IntRange, "asha": AshaConfig, "none": NoScheduler}


@dataclass(frozen=True)
class LoadedSpec:
    """A valid spec with where it came from and its expanded cells."""

    spec: SweepSpec
    source: str
    cells: list[Cell]
    raw: dict[str, Any]  # the merged YAML data (file + overrides), for the resolved-spec artifact
    # Located messages about legitimate but suspicious values, printed with the plan (`file:18: field: ...`).
    warnings: tuple[str, ...] = ()

    @property
    def spec_hash(self) -> str:
        """Short content hash of the resolved spec: the identity of a sweep for resume."""
        canonical = json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def set_source(text: str) -> str:
    """How messages name a --set option: `--set trainer.epochs=3`, a long value shortened."""
    return f"--set {text}" if len(text) <= 80 else f"--set {text[:60]}... ({len(text)} characters)"


def parse_override(text: str) -> tuple[str, Any]:
    """`trainer.epochs=3` -> ("trainer.epochs", 3), the value read with the spec's YAML rules (and bounds)."""
    source = set_source(text)
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(source, [SpecIssue(None, "", "expected KEY.PATH=VALUE, e.g. trainer.epochs=3")])
    if any(not part.isidentifier() for part in key.split(".")):
        raise SpecError(source, [SpecIssue(None, key, "not a field path (dotted names, e.g. trainer.epochs)")])
    if not value.strip():
        return key, None
    try:
        return key, parse_yaml_text(value, source)
    except SpecError as exc:  # a one-line value has no useful line number; name the field it was meant for
        issues = [SpecIssue(None, ".".join(p for p in (key, i.path) if p).replace(".[", "["), i.message)
                  for i in exc.issues]
        raise SpecError(source, issues) from None


def _apply_override(data: LineDict, key: str, value: Any, source: str = "--set") -> None:
    node: dict[str, Any] = data
    *parents, leaf = key.split(".")
    for depth, part in enumerate(parents):
        child = node.get(part)
        if child is None:
            child = LineDict()
            child.line, child.key_lines = None, {}  # type: ignore[assignment]
            node[part] = child
            if isinstance(node, LineDict):
                node.key_lines[part] = None  # type: ignore[assignment]
        elif not isinstance(child, dict):
            where = ".".join(parents[: depth + 1])
            raise SpecError(source, [SpecIssue(
                None, key, f"{where} is a single value ({_show(child)}), not a section with fields")])
        node = child
    node[leaf] = _without_lines(value)
    if isinstance(node, LineDict):
        node.key_lines[leaf] = None  # type: ignore[assignment]


def _without_lines(value: Any) -> Any:
    """A --set value's line numbers count within the option, not the file: drop them so none is reported."""
    if isinstance(value, LineDict):
        value.line, value.key_lines = None, dict.fromkeys(value.key_lines)  # type: ignore[assignment]
        for child in value.values():
            _without_lines(child)
    elif isinstance(value, LineList):
        value.line, value.item_lines = None, [None] * len(value)  # type: ignore[assignment,list-item]
        for child in value:
            _without_lines(child)
    return value


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """Field names of the pydantic model at `loc` (a raw pydantic loc, tags included), for "did you mean"."""
    model: Any = SweepSpec
    free_key = False  # the next part is a key of a dict field (a search or grid name), not a field
    for part in loc:
        if free_key:
            free_key = False
            continue
        if isinstance(part, str) and part in _TAGGED:
            model = _TAGGED[part]
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        annotation = fields[part].annotation
        free_key = typing.get_origin(annotation) is dict
        model = _model_in(annotation)
    return sorted(getattr(model, "model_fields", {}))


def _model_in(annotation: Any) -> Any:
    """The pydantic model inside an annotation (Optional[X], Annotated[X | Y, ...]); the first one wins."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _show(value: Any) -> str:
    """repr() of a value, shortened: a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def _message(err: dict[str, Any], loc: list[Any]) -> str:
    """A pydantic error as a rule that reads naturally after `field: `, with the value and a fix where there is one."""
    kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
    if kind == "extra_forbidden":
        return f"unknown key{suggest(str(loc[-1]), _fields_at(err['loc'][:-1]))}"
    if kind == "missing":
        return "is required"
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tags = DISTRIBUTION_TAGS if loc[0] == "search" else SCHEDULER_TAGS
        if kind == "union_tag_not_found":
            return f"is required: one of {', '.join(tags)}"
        return f"'{ctx.get('tag')}' is not one of {', '.join(tags)}{suggest(str(ctx.get('tag')), tags)}"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"should be a mapping of `key: value` lines (got {_show(value)})"
    if kind in ("too_short", "too_long"):
        bound, n = (("at least", ctx.get("min_length")) if kind == "too_short" else ("at most", ctx.get("max_length")))
        got = _show(value) if kind == "too_short" else f"{ctx.get('actual_length')}"
        return f"should list {bound} {n} value{'s' if n != 1 else ''} (got {got})"
    if kind == "string_pattern_mismatch" and loc == ["name"]:
        return (f"should be 1 to 64 letters, digits, '_', '.' or '-', starting with a letter or digit "
                f"(it names runs and directories) (got {_show(value)})")
    message = clean_message(err["msg"])
    if isinstance(value, dict) or (kind in ("value_error", "assertion_error")
                                   and ("(got" in message or str(value) in message)):
        return message  # a whole section is no use to print; our own validators already show the value
    message += f" (got {_show(value)})"
    if kind == "literal_error" and isinstance(value, str):
        message += suggest(value, re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
    elif kind in ("int_type", "float_type", "bool_type") and isinstance(value, str):
        message += _type_hint(kind, value)
    return message


def _type_hint(kind: str, text: str) -> str:
    """"; write it without quotes" when a quoted string would have been the right type unquoted."""
    if kind == "int_type" and re.fullmatch(r"[-+]?0[0-9_]+", text):
        return "; write it without leading zeros (YAML 1.1 would read 010 as octal 8)"
    try:
        parsed = parse_yaml_text(text, "")
    except SpecError:
        return ""
    wanted = {"int_type": int, "float_type": (int, float), "bool_type": bool}[kind]
    if isinstance(parsed, wanted) and (kind == "bool_type" or not isinstance(parsed, bool)):
        return "; write it without quotes"
    return "; write true or false" if kind == "bool_type" else ""


def _issue_from_error(err: dict[str, Any], data: LineDict, overridden: dict[str, str]) -> tuple[str, SpecIssue]:
    """(source override or "", issue) for one pydantic error."""
    loc = [p for i, p in enumerate(err["loc"])
           if not (i > 0 and err["loc"][0] in ("search", "scheduler") and p in DISTRIBUTION_TAGS + SCHEDULER_TAGS)]
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc.append("type")
    path = format_path(loc)
    return _located(path, loc, _message(err, loc), data, overridden)


def _located(path: str, loc: Sequence[Any], message: str, data: LineDict,
             overridden: dict[str, str]) -> tuple[str, SpecIssue]:
    """The issue at `loc`: its line in the file, or (when a --set value put it there) that option as its source."""
    paths = (path, format_path(loc))  # at or under the overridden key, or a rule about the section it is in
    source = next((src for key, src in overridden.items()
                   if any(p == key or p.startswith((key + ".", key + "[")) or key.startswith(p + ".") for p in paths)),
                  "")
    return source, SpecIssue(None if source else line_of(data, loc), path, message)


def load_spec(path: str, overrides: Sequence[str] = ()) -> LoadedSpec:
    """Read, override, validate and expand a spec; every user mistake is a SpecError listing all problems found."""
    data, source = read_spec_file(path)
    overridden: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        overridden[key] = set_source(text)
        _apply_override(data, key, value, overridden[key])
    try:
        spec = SweepSpec.model_validate(data)
    except ValidationError as exc:
        raise _grouped(source, [_issue_from_error(e, data, overridden) for e in exc.errors()]) from None
    problems: list[tuple[str, SpecIssue]] = []
    for section in ("grid", "search"):
        for key in getattr(spec, section):
            try:
                factor_path(key)
            except ValueError as exc:
                problems.append(_located(f"{section}.{key}", [section, key],
                                         f"{exc}{suggest(key, factor_names())}", data, overridden))
    # The grid's size from its factor counts, before a single cell is built: a million-cell grid fails here at once.
    problems += [_located(path, [path], message, data, overridden) for path, message in size_problems(spec)]
    problems += [_located(field, _parts(field), message, data, overridden)
                 for field, message in grid_value_problems(spec)]
    problems += [_located(field, _parts(field), message, data, overridden) for field, message in variant_problems(spec)]
    if problems:
        raise _grouped(source, problems)
    try:
        cells = expand_cells(spec)
    except CellError as exc:
        raise _grouped(source, [_located("grid", _grid_item(spec, exc), str(exc), data, overridden)]) from None
    grid_overridden = any(key.split(".")[0] in ("grid", "model", "dataset") for key in overridden)
    findings = check_spec_values(spec, cells, grid_overridden)
    for field, message in [*check_cells(spec, cells), *findings.errors]:
        problems.append(_located(field, _parts(field), message, data, overridden))
    if problems:
        raise _grouped(source, problems)
    cells = _matched(spec, cells, data, overridden, source)
    warnings = _grouped(source, [_located(field, _parts(field), message, data, overridden)
                                 for field, message in findings.warnings])
    return LoadedSpec(spec, source, cells, data, tuple(str(warnings).splitlines()) if warnings.issues else ())


def _matched(spec: SweepSpec, cells: list[Cell], data: LineDict, overridden: dict[str, str],
             source: str) -> list[Cell]:
    """Cells with `match_params` get their width solved (this builds models: torch is imported only here, and
    only for a spec that asks for it, so other specs still fail or plan in about a second)."""
    if not any(c.match_params for c in cells):
        return cells
    from resnet_lab.models.matching import param_count  # the one place the spec layer reaches for torch

    try:
        return resolve_matches(cells, param_count)
    except ValueError as exc:
        where = next((["grid", k, i, "match_params"] for k, entries in spec.grid.items()
                      for i, e in enumerate(entries) if isinstance(e, dict) and "match_params" in e), ["grid"])
        raise _grouped(source, [_located(format_path(where), where, str(exc), data, overridden)]) from None


def _parts(field: str) -> list[Any]:
    """"search.lr.values[0]" -> ["search", "lr", "values", 0]; a reference label may itself hold dots."""
    if field.startswith("reference."):
        return ["reference", field.removeprefix("reference.")]
    return [int(p) if p.isdigit() else p for p in field.replace("[", ".").replace("]", "").split(".")]


def _grid_item(spec: SweepSpec, exc: CellError) -> list[Any]:
    """Where a bad grid combination is best pointed at: the grid value the failing field came from, else `grid`."""
    if exc.item is not None:
        key, index = exc.item
        entry = spec.grid[key][index]
        sub = exc.field.split(".", 1)[-1] if key in ("model", "dataset", "trainer") else exc.field.split(".")[-1]
        return ["grid", key, index, sub] if isinstance(entry, dict) and sub in entry else ["grid", key, index]
    for key, values in spec.grid.items():
        if factor_path(key) == exc.field and exc.field in exc.values:
            return ["grid", key, values.index(exc.values[exc.field])]
    return ["grid"]


def _grouped(source: str, problems: list[tuple[str, SpecIssue]]) -> SpecError:
    """One SpecError; problems caused by a --set value name that option as their source."""
    issues = [issue if not src else SpecIssue(None, issue.path, f"{issue.message} [from {src}]")
              for src, issue in problems]
    return SpecError(source, sorted(issues, key=lambda i: (i.line is None, i.line or 0)))
