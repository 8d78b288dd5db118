"""Helpers shared by the benchmark scripts: plain-text tables, the machine line, medians and spreads.

Only the standard library here: `startup.py` imports this before anything heavy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository: sweep.py lives here
if str(ROOT) not in sys.path:  # run from a checkout, installed or not
    sys.path.insert(1, str(ROOT))


def parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes: --quick and --device."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a reduced run (about 1-2 minutes)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where trials train (default: cuda when available, else cpu)")
    return p


def resolve_device(requested: str | None) -> str:
    """`--device`, or cuda when torch sees a GPU (imports torch)."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible to this process")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def machine_line(device: str = "cpu") -> str:
    """What ran the benchmark: CPU count, load average (the machine may be shared), GPU name."""
    load = "/".join(f"{x:.1f}" for x in os.getloadavg())
    line = f"machine: {platform.node()}, {os.cpu_count()} CPUs, load avg {load} (1/5/15 min), python " \
           f"{platform.python_version()}"
    if device == "cuda":
        import torch

        line += f", GPU {torch.cuda.get_device_name()}"
    return line


def median(values: Sequence[float]) -> float:
    """Median, NaN for no values."""
    return statistics.median(values) if values else float("nan")


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation); sd 0 for one value."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, right-aligned numbers, that reads the same in a terminal, a log and the README."""
    cells = [[str(h) for h in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([title, line(cells[0]), rule, *(line(r) for r in cells[1:])])


def show(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a table and a blank line, flushed (benchmarks run for minutes; show progress as it comes)."""
    print(table(title, header, rows) + "\n", flush=True)
