"""Means with Student-t confidence intervals over seeds, and paired differences (numbers only, no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean over n seeds with the half-width of its confidence interval (None when n < 2: no interval)."""

    mean: float
    half_width: float | None
    n: int

    @property
    def low(self) -> float:
        """Lower end of the interval (the mean itself when there is none)."""
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        """Upper end of the interval (the mean itself when there is none)."""
        return self.mean + (self.half_width or 0.0)

    def fmt(self, pattern: str = "{:.1%}", show_n: bool = True, signed: bool = False) -> str:
        """`91.2% ± 1.3% (n=3)`; `91.2% (n=1: no interval)` for a single seed. `signed`: `+1.2% ± 0.8% (n=3)`."""
        mean = (pattern.replace("{:", "{:+", 1) if signed else pattern).format(self.mean)
        if self.half_width is None:
            return f"{mean} (n={self.n}: no interval)" if show_n else mean
        text = f"{mean} ± {pattern.format(self.half_width)}"
        return f"{text} (n={self.n})" if show_n else text


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate | None:
    """Mean and Student-t interval half-width t_{(1+c)/2, n-1} * s / sqrt(n); None for no values."""
    finite = [float(v) for v in values if math.isfinite(v)]
    n = len(finite)
    if n == 0:
        return None
    mean = sum(finite) / n
    if n == 1:
        return Estimate(mean, None, 1)
    from scipy.stats import t  # scipy costs ~0.3 s to import; only reports need it

    sd = math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1))
    return Estimate(mean, float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n), n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> tuple[Estimate | None, list[int]]:
    """Mean of a[s] - b[s] over the seeds s both have (e.g. skip on minus skip off), and those seeds."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    return mean_ci([a[s] - b[s] for s in seeds]), seeds
