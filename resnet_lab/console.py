"""Everything the user sees in the terminal. The only module that imports rich.

On a terminal: tables and a live view. Elsewhere (CI logs, pipes): plain, quiet lines.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

_stdout = Console(highlight=False)
_stderr = Console(stderr=True, highlight=False)

EPOCH_COLUMNS = (
    ("epoch", "epoch", "{:.0f}"),
    ("train/loss", "train loss", "{:.4f}"),
    ("train/acc", "train acc", "{:.2%}"),
    ("val/loss", "val loss", "{:.4f}"),
    ("val/acc", "val acc", "{:.2%}"),
    ("lr", "lr", "{:.2e}"),
    ("grad/ratio_first_last", "grad first/last", "{:.3g}"),
    ("throughput_img_s", "img/s", "{:,.0f}"),
    ("epoch_time_s", "time s", "{:.1f}"),
)


def is_interactive() -> bool:
    """True when stdout is a terminal a person is watching."""
    return _stdout.is_terminal


def fmt(value: Any, pattern: str) -> str:
    """Format a metric, tolerating missing and non-finite values."""
    if value is None:
        return "-"
    try:
        return pattern.format(value)
    except (TypeError, ValueError):
        return str(value)


def error(message: str) -> None:
    """Print a user error (one line per problem) to stderr, without a traceback."""
    from rich.markup import escape

    for line in message.rstrip().splitlines():
        # User text ([from --set ...], bracketed values) must never be read as rich markup.
        if _stderr.is_terminal:
            _stderr.print(f"[bold red]error:[/] {escape(line)}", soft_wrap=True)
        else:
            _stderr.print(f"error: {line}", markup=False, soft_wrap=True)


def info(message: str) -> None:
    """Print one informational line."""
    _stdout.print(message, soft_wrap=True, markup=False)


def print_epoch(metrics: Mapping[str, float], header: bool) -> None:
    """One row of the per-epoch table of `python -m resnet_lab.train`, printed as the epoch ends."""
    widths = [max(len(title), 9) for _, title, _ in EPOCH_COLUMNS]
    if header:
        info("  ".join(title.rjust(w) for (_, title, _), w in zip(EPOCH_COLUMNS, widths, strict=True)))
    cells = [fmt(metrics.get(key), pattern).rjust(w) for (key, _, pattern), w in zip(EPOCH_COLUMNS, widths,
                                                                                          strict=True)]
    info("  ".join(cells))


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A titled table: rich on a terminal, aligned plain text elsewhere."""
    table = Table(title=title, show_lines=False)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    if is_interactive():
        _stdout.print(table)
    else:
        Console(file=sys.stdout, width=200, color_system=None).print(table)


class LiveView:
    """The sweep's live display: progress with ETA, running trials, best per cell; plain lines when not a TTY."""

    def __init__(self, total: int, metric: str, mode: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.metric, self.mode, self.total = metric, mode, total
        self.running: dict[str, dict[str, Any]] = {}  # trial id -> {name, cell, epoch, metric, lr}
        self.best: dict[str, tuple[float, str]] = {}  # cell -> (value, run name)
        self.outcomes: dict[str, int] = {}
        self.interactive = is_interactive()
        self.progress = Progress(TextColumn("trials"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(), console=_stdout)
        self.task = self.progress.add_task("trials", total=total)
        self.live: Any = None  # started on the first update, so a restored sweep's view starts where it is

    def resumed(self, done: int) -> None:
        """A restored sweep: `done` trials had already ended."""
        self.progress.update(self.task, completed=done)

    def close(self) -> None:
        """Draw the final state and release the terminal."""
        if self.live is not None:
            self.live.update(self._render())
            self.live.stop()
            self.live = None

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    def trial_update(self, trial_id: str, name: str, cell: str, metrics: Mapping[str, float]) -> None:
        """A trial reported an epoch."""
        value = metrics.get(self.metric)
        self.running[trial_id] = {"name": name, "cell": cell, "epoch": metrics.get("epoch"), "value": value,
                                  "lr": metrics.get("lr")}
        if value is not None and value == value and (cell not in self.best or self._better(value,
                                                                                           self.best[cell][0])):
            self.best[cell] = (value, name)
        self.refresh()

    def trial_done(self, trial_id: str, name: str, outcome: str, detail: str = "") -> None:
        """A trial ended (any outcome)."""
        info_ = self.running.pop(trial_id, {})
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.progress.advance(self.task)
        if not self.interactive:
            value = info_.get("value")
            shown = f" {self.metric}={value:.4f}" if isinstance(value, float) else ""
            done = int(self.progress.tasks[0].completed)
            info(f"[{done}/{self.total}] {name}: {outcome}{shown}{(' ' + detail) if detail else ''}")
        self.refresh()

    def refresh(self) -> None:
        """Redraw (terminal only)."""
        if not self.interactive:
            return
        if self.live is None:
            from rich.live import Live

            self.live = Live(self._render(), console=_stdout, refresh_per_second=2)
            self.live.start()
        self.live.update(self._render())

    def _render(self) -> Any:
        from rich.console import Group

        running = Table(title="running", expand=False)
        for column in ("trial", "cell", "epoch", self.metric, "lr"):
            running.add_column(column)
        for row in self.running.values():
            running.add_row(row["name"], row["cell"], fmt(row["epoch"], "{:.0f}"), fmt(row["value"], "{:.4f}"),
                            fmt(row["lr"], "{:.2e}"))
        best = Table(title=f"best {self.metric} per cell", expand=False)
        for column in ("cell", self.metric, "trial"):
            best.add_column(column)
        for cell, (value, name) in sorted(self.best.items()):
            best.add_row(cell, f"{value:.4f}", name)
        return Group(self.progress, running, best)
