"""YAML in, Python values plus the line of every key out; and errors a person can act on.

PyYAML follows YAML 1.1: unquoted `1e-3` is a string and `on`/`yes` are True. Our loader reads `1e-3` as a float
and only `true`/`false` as booleans, so users write what they mean and `skip: yes` is an error, not a surprise.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_SPEC_BYTES = 1_000_000


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: where, which field, what is wrong."""

    line: int | None
    path: str
    message: str

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class SpecError(Exception):
    """A spec (file or --set value) is invalid; str() is the full, printable message."""

    def __init__(self, source: str, issues: Sequence[SpecIssue]) -> None:
        self.source, self.issues = source, list(issues)
        super().__init__("\n".join(issue.format(source) for issue in self.issues))


class LineDict(dict):
    """A mapping from YAML that remembers the line (1-based) of each key and of itself."""

    line: int = 1
    key_lines: dict[Any, int]


class LineList(list):
    """A sequence from YAML that remembers the line of each item and of itself."""

    line: int = 1
    item_lines: list[int]


class _Loader(yaml.SafeLoader):
    """SafeLoader (no object construction) with YAML-1.2-like scalars, line tracking and duplicate-key errors."""


# Copy the resolver table so editing it does not change PyYAML's global SafeLoader.
_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.line, out.key_lines = node.start_mark.line + 1, {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str | int | float | bool) or key is None:
            raise yaml.MarkedYAMLError(problem="keys must be plain names", problem_mark=key_node.start_mark)
        if key in out:
            raise yaml.MarkedYAMLError(
                problem=f"duplicate key '{key}' (first on line {out.key_lines[key]})",
                problem_mark=key_node.start_mark)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList(loader.construct_object(child, deep=True) for child in node.value)
    out.line, out.item_lines = node.start_mark.line + 1, [child.start_mark.line + 1 for child in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml_text(text: str, source: str) -> Any:
    """Parse YAML text with our scalar rules; raises SpecError with the line on syntax errors."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or str(exc)
        if ("\t" in text and "tab" in problem.lower()) or (mark and "\t" in _line_of(text, mark.line)):
            problem = "tab character: YAML indentation must use spaces"
        raise SpecError(source, [SpecIssue(mark.line + 1 if mark else None, "", f"invalid YAML: {problem}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, [SpecIssue(None, "", f"invalid YAML: {exc}")]) from None


def _line_of(text: str, index: int) -> str:
    lines = text.splitlines()
    return lines[index] if 0 <= index < len(lines) else ""


def read_spec_file(path: str | Path) -> tuple[LineDict, str]:
    """Read and parse a spec file; every problem (missing, directory, bytes, syntax, shape) is a SpecError."""
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise SpecError(source, [SpecIssue(None, "", "no such file")])
    if p.is_dir():
        raise SpecError(source, [SpecIssue(None, "", "is a directory; expected a YAML spec file")])
    raw = p.read_bytes()
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(source, [SpecIssue(None, "", f"file is {len(raw):,} bytes; a spec is at most "
                                                     f"{MAX_SPEC_BYTES:,}")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise SpecError(source, [SpecIssue(line, "", f"not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                                                     "save the file as UTF-8")]) from None
    data = parse_yaml_text(text, source)
    if data is None:
        raise SpecError(source, [SpecIssue(1, "", "the spec is empty; expected a mapping with at least `name`")])
    if not isinstance(data, dict):
        line = getattr(data, "line", 1)
        raise SpecError(source, [SpecIssue(line, "", f"expected a mapping of sections at the top level "
                                                     f"(got {type(data).__name__})")])
    return data, source


def line_of(data: Any, path: Iterable[Any]) -> int | None:
    """The line of the deepest key of `path` found in parsed YAML (None when not from a file)."""
    line, node = getattr(data, "line", None), data
    for part in path:
        if isinstance(node, LineDict) and part in node:
            line, node = node.key_lines.get(part, line), node[part]
        elif isinstance(node, LineList) and isinstance(part, int) and 0 <= part < len(node):
            line, node = node.item_lines[part], node[part]
        else:
            break
    return line


def suggest(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for a near miss, else ""."""
    match = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""
