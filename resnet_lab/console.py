"""Everything the user sees in the terminal. The only module that imports rich.

On a terminal: tables and a live view. Elsewhere (CI logs, pipes): plain, quiet lines.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
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


RUNNING_ROWS = 12  # running trials shown (the most recently reported first); a caption counts the rest
FINISHED_ROWS = 8  # finished trials shown, newest first; every outcome is counted in the progress line
BEST_ROWS = 40  # cells in the best-per-cell table (every cell's best is kept; a caption counts the ones not shown)
PROGRESS_EVERY_S = 60.0  # plain mode: at most one progress line per minute, besides one line per finished trial


class LiveView:
    """The sweep's live display: progress with ETA, running trials, recently finished trials, best per cell; plain
    lines when not a TTY.

    Its size and cost do not grow with the sweep: the tables hold at most RUNNING_ROWS + FINISHED_ROWS + BEST_ROWS
    rows, the state kept is the running trials, the best per cell, the last FINISHED_ROWS trials and a count per
    outcome, and the tables are built only when rich redraws (twice a second), not on every reported epoch. Without
    a terminal it prints one line per finished trial and, at most every PROGRESS_EVERY_S, one progress line."""

    def __init__(self, total: int, metric: str, mode: str, *, clock: Callable[[], float] | None = None) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.metric, self.mode, self.total = metric, mode, total
        self.running: dict[str, dict[str, Any]] = {}  # trial id -> {name, cell, epoch, metric, lr}, last reported last
        self.best: dict[str, tuple[float, str]] = {}  # cell -> (value, run name)
        self.finished: deque[tuple[str, str, Any]] = deque(maxlen=FINISHED_ROWS)  # (name, outcome, value)
        self.outcomes: dict[str, int] = {}
        self.interactive = is_interactive()
        self.clock = clock or time.monotonic
        self.last_progress_line = self.clock()
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
            self.live.refresh()
            self.live.stop()
            self.live = None

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.mode == "max" else a < b

    @property
    def done(self) -> int:
        return int(self.progress.tasks[0].completed)

    def trial_update(self, trial_id: str, name: str, cell: str, metrics: Mapping[str, float]) -> None:
        """A trial reported an epoch."""
        value = metrics.get(self.metric)
        self.running.pop(trial_id, None)  # re-inserted last: the dict is ordered by the latest report
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
        self.finished.append((name, outcome, info_.get("value")))
        self.progress.advance(self.task)
        if not self.interactive:
            value = info_.get("value")
            shown = f" {self.metric}={value:.4f}" if isinstance(value, float) else ""
            info(f"[{self.done}/{self.total}] {name}: {outcome}{shown}{(' ' + detail) if detail else ''}")
        self.refresh()

    def progress_line(self) -> str:
        """`[412/1000] 24 running; 380 completed, 32 early_stopped; best val/acc 0.9120 (resnet20, trial_...)`."""
        counts = ", ".join(f"{n} {k}" for k, n in sorted(self.outcomes.items())) or "none ended"
        line = f"[{self.done}/{self.total}] {len(self.running)} running; {counts}"
        if self.best:
            cell, (value, name) = max(self.best.items(), key=lambda kv: kv[1][0] if self.mode == "max"
                                      else -kv[1][0])
            line += f"; best {self.metric} {value:.4f} ({cell}, {name})"
        return line

    def refresh(self) -> None:
        """Redraw on a terminal (rich calls _render at its own rate); elsewhere a progress line now and then."""
        if not self.interactive:
            now = self.clock()
            if now - self.last_progress_line >= PROGRESS_EVERY_S:
                self.last_progress_line = now
                info(self.progress_line())
            return
        if self.live is None:
            from rich.live import Live

            self.live = Live(get_renderable=self._render, console=_stdout, refresh_per_second=2)
            self.live.start()

    def _render(self) -> Any:
        from rich.console import Group

        shown = list(self.running.values())[-RUNNING_ROWS:][::-1]
        hidden = len(self.running) - len(shown)
        running = Table(title=f"running ({len(self.running)})", expand=False,
                        caption=f"and {hidden} more running" if hidden else None)
        for column in ("trial", "cell", "epoch", self.metric, "lr"):
            running.add_column(column)
        for row in shown:
            running.add_row(row["name"], row["cell"], fmt(row["epoch"], "{:.0f}"), fmt(row["value"], "{:.4f}"),
                            fmt(row["lr"], "{:.2e}"))
        finished = Table(title=f"last finished ({self.done} ended)", expand=False)
        for column in ("trial", "outcome", self.metric):
            finished.add_column(column)
        for name, outcome, value in list(self.finished)[::-1]:  # a copy: rich renders from its own thread
            finished.add_row(name, outcome, fmt(value, "{:.4f}"))
        cells = sorted(self.best.items())
        best = Table(title=f"best {self.metric} per cell", expand=False,
                     caption=f"and {len(cells) - BEST_ROWS} more cells" if len(cells) > BEST_ROWS else None)
        for column in ("cell", self.metric, "trial"):
            best.add_column(column)
        for cell, (value, name) in cells[:BEST_ROWS]:
            best.add_row(cell, f"{value:.4f}", name)
        return Group(self.progress, running, finished, best)
