"""The live view of a 1,000-trial sweep: bounded tables, the best per cell kept, and a plain log (no terminal) of
one line per finished trial plus at most one progress line per PROGRESS_EVERY_S."""

from __future__ import annotations

import io
import math
import random
import time

import pytest
from rich.console import Console

from resnet_lab import console
from resnet_lab.console import BEST_ROWS, FINISHED_ROWS, PROGRESS_EVERY_S, RUNNING_ROWS, LiveView

TRIALS, EPOCHS, CONCURRENT, CELLS = 1000, 3, 40, 60  # 60 cells: more than BEST_ROWS


class Clock:
    """Simulated seconds: each reported epoch takes one."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def feed(view: LiveView, clock: Clock, trials: int) -> dict[str, tuple[float, str]]:
    """`trials` trials of EPOCHS epochs, CONCURRENT at a time; returns the true best val/acc per cell."""
    rng = random.Random(0)
    best: dict[str, tuple[float, str]] = {}
    pending = list(range(trials))
    running: dict[int, int] = {}  # trial -> epochs reported
    while pending or running:
        while pending and len(running) < CONCURRENT:
            running[pending.pop(0)] = 0
        trial = rng.choice(list(running))
        running[trial] += 1
        name, cell = f"trial_{trial:04d}", f"cell{trial % CELLS:02d}"
        value = rng.random()
        clock.now += 1.0
        view.trial_update(str(trial), name, cell, {"epoch": running[trial], "val/acc": value, "lr": 0.01})
        if cell not in best or value > best[cell][0]:
            best[cell] = (value, name)
        if running[trial] == EPOCHS:
            del running[trial]
            view.trial_done(str(trial), name, "completed" if trial % 7 else "early_stopped")
    return best


def rendered_lines(view: LiveView) -> tuple[int, float]:
    out = Console(file=io.StringIO(), width=160, color_system=None)
    start = time.perf_counter()
    out.print(view._render())
    return len(out.file.getvalue().splitlines()), time.perf_counter() - start


def test_live_view_at_1000_trials_is_bounded_and_keeps_the_best(capsys: pytest.CaptureFixture[str]) -> None:
    clock = Clock()
    small = LiveView(20, "val/acc", "max", clock=clock)
    feed(small, clock, 20)
    view = LiveView(TRIALS, "val/acc", "max", clock=clock)
    best = feed(view, clock, TRIALS)
    assert view.best == best  # every cell's best, not only the cells shown
    assert len(view.finished) == FINISHED_ROWS and view.done == TRIALS
    assert view.outcomes == {"completed": TRIALS - math.ceil(TRIALS / 7), "early_stopped": math.ceil(TRIALS / 7)}
    # mid-sweep: CONCURRENT trials running, only RUNNING_ROWS of them drawn
    for trial in range(CONCURRENT):
        view.trial_update(f"x{trial}", f"extra_{trial}", "cell00", {"epoch": 1, "val/acc": 0.0})
    lines, seconds = rendered_lines(view)
    lines_small, _ = rendered_lines(small)
    # progress 1 + three tables of (title, top border, header, separator, bottom border) + their rows + 2 captions
    assert lines == 1 + 3 * 5 + RUNNING_ROWS + FINISHED_ROWS + BEST_ROWS + 2
    assert lines_small <= lines
    assert seconds < 1.0, seconds  # a few ms on an idle core; generous for a loaded 2-core machine
    out = Console(file=io.StringIO(), width=160, color_system=None)
    out.print(view._render())
    text = out.file.getvalue()
    assert "extra_39" in text and "extra_0 " not in text  # the most recently reported running trials
    assert f"and {CONCURRENT - RUNNING_ROWS} more running" in text
    assert f"and {CELLS - BEST_ROWS} more cells" in text


def test_plain_mode_logs_one_line_per_trial_and_a_progress_line_per_minute(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert not console.is_interactive()  # pytest captures stdout: the plain-line mode
    clock = Clock()
    view = LiveView(TRIALS, "val/acc", "max", clock=clock)
    capsys.readouterr()
    feed(view, clock, TRIALS)
    lines = capsys.readouterr().out.splitlines()
    finished = [line for line in lines if "] trial_" in line]
    progress = [line for line in lines if " running; " in line]
    assert len(finished) == TRIALS and len(lines) == len(finished) + len(progress)
    elapsed = TRIALS * EPOCHS  # simulated seconds: one per reported epoch
    assert len(progress) == elapsed // PROGRESS_EVERY_S
    assert progress[-1].startswith("[") and "best val/acc" in progress[-1]
