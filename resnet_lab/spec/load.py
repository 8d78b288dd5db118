"""`load_spec(path, overrides)`: the one call that turns a YAML file (+ `--set`) into a SweepSpec or a SpecError."""

from __future__ import annotations

import hashlib
import json
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from resnet_lab.spec.loader import LineDict, SpecError, SpecIssue, line_of, parse_yaml_text, read_spec_file, suggest
from resnet_lab.spec.sweep import (
    DISTRIBUTION_TAGS,
    SCHEDULER_TAGS,
    Cell,
    SweepSpec,
    _clean,
    check_cells,
    expand_cells,
    factor_names,
    factor_path,
)


@dataclass(frozen=True)
class LoadedSpec:
    """A valid spec with where it came from and its expanded cells."""

    spec: SweepSpec
    source: str
    cells: list[Cell]
    raw: dict[str, Any]  # the merged YAML data (file + overrides), for the resolved-spec artifact

    @property
    def spec_hash(self) -> str:
        """Short content hash of the resolved spec: the identity of a sweep for resume."""
        canonical = json.dumps(self.spec.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def parse_override(text: str) -> tuple[str, Any]:
    """`trainer.epochs=3` -> ("trainer.epochs", 3), the value read with the spec's YAML rules."""
    source = f"--set {text}"
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise SpecError(source, [SpecIssue(None, "", "expected KEY.PATH=VALUE, e.g. trainer.epochs=3")])
    if any(not part.isidentifier() for part in key.split(".")):
        raise SpecError(source, [SpecIssue(None, key, "not a field path (dotted names, e.g. trainer.epochs)")])
    return key, parse_yaml_text(value, source) if value.strip() else None


def _apply_override(data: LineDict, key: str, value: Any) -> None:
    node: dict[str, Any] = data
    *parents, leaf = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = LineDict()
            child.line, child.key_lines = None, {}  # type: ignore[assignment]
            node[part] = child
        node = child
    node[leaf] = value
    if isinstance(node, LineDict):
        node.key_lines[leaf] = None  # type: ignore[assignment]


def _fields_at(loc: Sequence[Any]) -> list[str]:
    """Field names of the pydantic model found by walking `loc` from SweepSpec (for "did you mean")."""
    model: Any = SweepSpec
    for part in loc:
        if isinstance(part, str) and part in DISTRIBUTION_TAGS + SCHEDULER_TAGS:
            continue
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return []
        model = _model_in(fields[part].annotation)
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


def _issue_from_error(err: dict[str, Any], data: LineDict, overridden: dict[str, str]) -> tuple[str, SpecIssue]:
    """(source override or "", issue) for one pydantic error."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p in DISTRIBUTION_TAGS + SCHEDULER_TAGS
                                         and err["loc"].index(p) > 0 and err["loc"][0] in ("search", "scheduler"))]
    path = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    message = _clean(err["msg"])
    value = err.get("input")
    if err["type"] == "extra_forbidden":
        message = f"unknown key{suggest(str(loc[-1]), _fields_at(loc[:-1]))}"
    elif err["type"] == "missing":
        message = "is required"
    elif not isinstance(value, dict) and "(got" not in message:
        message += f" (got {value!r})"
    source = next((src for key, src in overridden.items() if path == key or path.startswith(key + ".")), "")
    return source, SpecIssue(None if source else line_of(data, loc), path, message)


def load_spec(path: str, overrides: Sequence[str] = ()) -> LoadedSpec:
    """Read, override, validate and expand a spec; every user mistake is a SpecError listing all problems found."""
    data, source = read_spec_file(path)
    overridden: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        _apply_override(data, key, value)
        overridden[key] = f"--set {text}"
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
                problems.append(("", SpecIssue(line_of(data, [section, key]), f"{section}.{key}",
                                               f"{exc}{suggest(key, factor_names())}")))
    if problems:
        raise _grouped(source, problems)
    try:
        cells = expand_cells(spec)
    except ValueError as exc:
        raise SpecError(source, [SpecIssue(line_of(data, ["grid"]), "grid", str(exc))]) from None
    for field, message in check_cells(spec, cells):
        parts = [int(p) if p.isdigit() else p for p in field.replace("[", ".").replace("]", "").split(".")]
        problems.append(("", SpecIssue(line_of(data, parts), field, message)))
    if problems:
        raise _grouped(source, problems)
    return LoadedSpec(spec, source, cells, data)


def _grouped(source: str, problems: list[tuple[str, SpecIssue]]) -> SpecError:
    """One SpecError; problems caused by a --set value name that option as their source."""
    issues = [issue if not src else SpecIssue(None, issue.path, f"{issue.message} [from {src}]")
              for src, issue in problems]
    return SpecError(source, sorted(issues, key=lambda i: (i.line is None, i.line or 0)))
