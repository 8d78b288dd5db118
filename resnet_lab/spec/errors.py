"""Spec errors a person can act on: where (file, line), which field, what is wrong, and the near miss meant."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SpecIssue:
    """One problem in a spec: where, which field, what is wrong."""

    line: int | None
    path: str
    message: str

    def format(self, source: str) -> str:
        where = f"{source}:{self.line}" if self.line is not None else source
        text = f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"
        return printable(text)


def printable(text: str) -> str:
    """One terminal-safe line: newlines, escape sequences and other control characters shown as `\\n`, `\\x1b`."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class SpecError(Exception):
    """A spec (file or --set value) is invalid; str() is the full, printable message."""

    def __init__(self, source: str, issues: Sequence[SpecIssue]) -> None:
        self.source, self.issues = source, list(issues)
        super().__init__("\n".join(issue.format(source) for issue in self.issues))


def format_path(parts: Iterable[Any]) -> str:
    """["search", "lr", "values", 0] -> "search.lr.values[0]"."""
    return "".join(f"[{p}]" if isinstance(p, int) and not isinstance(p, bool) else f".{p}" for p in parts).lstrip(".")


def suggest(word: str, choices: Iterable[str]) -> str:
    """"; did you mean 'x'?" for a near miss, else ""."""
    choices = list(choices)
    prefixed = [c for c in choices if len(word) >= 3 and c.startswith(word)]  # `grace` -> `grace_period`
    match = prefixed[:1] if len(prefixed) == 1 else difflib.get_close_matches(str(word), choices, n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""
