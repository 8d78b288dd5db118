"""The report's statistics (numbers only, no I/O): means with Student-t intervals over seeds, paired comparisons
with an exact sign-flip permutation test and Holm's correction, and ratios as geometric means.

References: He et al. 2016 report mean +- std over runs; Bouthillier et al. 2021 on pairing by seed; Agarwal et al.
2021 (rliable) on intervals rather than bare means. scipy does the distributions and the permutation test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
ALPHA = 0.05
EXACT_UP_TO = 16  # pairs; 2**16 sign patterns are enumerated exactly, beyond that a seeded Monte Carlo


@dataclass(frozen=True)
class Estimate:
    """A mean over n values with the half-width of its confidence interval (None when n < 2: no interval)."""

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
        """`91.2% ± 1.3% (n=3)`; `91.2% (n=1: no interval)` for one value. `signed`: `+1.2% ± 0.8% (n=3)`."""
        mean = (pattern.replace("{:", "{:+", 1) if signed else pattern).format(self.mean)
        if self.half_width is None:
            return f"{mean} (n={self.n}: no interval)" if show_n else mean
        text = f"{mean} ± {pattern.format(self.half_width)}"
        return f"{text} (n={self.n})" if show_n else text

    def fmt_pp(self, show_n: bool = True) -> str:
        """A difference of two accuracies (fractions) in percentage points: `+1.2 pp [-0.3, +2.7] (n=5)`."""
        mean = f"{100 * self.mean:+.1f} pp"
        if self.half_width is None:
            return f"{mean} (n={self.n}: no interval)" if show_n else mean
        text = f"{mean} [{100 * self.low:+.1f}, {100 * self.high:+.1f}]"
        return f"{text} (n={self.n})" if show_n else text


def mean_ci(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate | None:
    """Mean and Student-t interval half-width t_{(1+c)/2, n-1} * s / sqrt(n); None for no values.

    Non-finite values are an error here: callers decide what a diverged run contributes before averaging.
    """
    values = [float(v) for v in values]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"non-finite value among {values}; decide what it means before averaging")
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n == 1:
        return Estimate(mean, None, 1)
    from scipy.stats import t  # scipy costs ~0.3 s to import; only reports need it

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Estimate(mean, float(t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class Ratio:
    """A geometric mean of positive ratios with its interval, computed on the log scale and exponentiated."""

    mean: float
    low: float
    high: float
    n: int

    def fmt(self, show_n: bool = True) -> str:
        """`3.1x [1.8, 5.2] (n=3)`; `3.1x (n=1: no interval)`."""
        if self.n < 2:
            return f"{self.mean:.3g}x (n={self.n}: no interval)" if show_n else f"{self.mean:.3g}x"
        text = f"{self.mean:.3g}x [{self.low:.3g}, {self.high:.3g}]"
        return f"{text} (n={self.n})" if show_n else text


def geometric_mean_ci(ratios: Sequence[float], confidence: float = CONFIDENCE) -> Ratio | None:
    """Geometric mean of positive, finite ratios with a Student-t interval on log(ratio); None for none.

    Ratios average on the log scale: the arithmetic mean of 1/3 and 3 is 1.67 where the two cancel to 1.
    """
    logs = [math.log(r) for r in ratios if math.isfinite(r) and r > 0]
    est = mean_ci(logs, confidence)
    if est is None:
        return None
    return Ratio(math.exp(est.mean), math.exp(est.low), math.exp(est.high), est.n)


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of an exact paired permutation (sign-flip) test of mean difference 0.

    Under the null each pair's two values are exchangeable, so every difference keeps its size and either sign:
    all 2**n sign patterns are enumerated (scipy's permutation_test with n_resamples=inf) up to EXACT_UP_TO pairs.
    """
    diffs = [float(d) for d in differences]
    if len(diffs) < 2 or all(d == 0 for d in diffs):
        return 1.0  # one pair: both signs are as extreme as the observed one
    import numpy as np
    from scipy.stats import permutation_test

    a, b = np.asarray(diffs), np.zeros(len(diffs))
    exact = len(diffs) <= EXACT_UP_TO
    result = permutation_test(
        (a, b), lambda x, y, axis: np.mean(x - y, axis=axis), permutation_type="samples", vectorized=True,
        n_resamples=np.inf if exact else 100_000, alternative="two-sided", rng=None if exact else 0)
    return float(min(1.0, result.pvalue))


def smallest_n_for(alpha: float = ALPHA, tests: int = 1) -> int:
    """The fewest pairs with which an exact two-sided sign-flip test can reach p < alpha: 2 / 2**n < alpha, and
    with Holm over `tests` tests, even the smallest p is multiplied by `tests`: tests * 2 / 2**n < alpha."""
    n = 1
    while tests * 2.0 / 2**n >= alpha:
        n += 1
    return n


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment (family-wise error), in the input order.

    Written here because scipy offers only false-discovery-rate control (`false_discovery_control`); Holm controls
    the family-wise error rate under any dependence between the comparisons, which is what a results table claims.
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Paired:
    """a - b paired by seed: the mean difference with its t interval, and the exact sign-flip p-value."""

    diff: Estimate | None
    p: float  # unadjusted, two-sided
    seeds: list[int]

    @property
    def n(self) -> int:
        """Number of pairs."""
        return len(self.seeds)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> Paired:
    """a[s] - b[s] over the seeds s both have with finite values (e.g. skip on minus skip off)."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]))
    diffs = [a[s] - b[s] for s in seeds]
    return Paired(mean_ci(diffs), sign_flip_p(diffs), seeds)


def paired_ratio(a: Mapping[int, float], b: Mapping[int, float]) -> Ratio | None:
    """Geometric mean of a[s] / b[s] over the seeds both have (positive, finite), with its log-scale interval."""
    seeds = sorted(s for s in set(a) & set(b) if math.isfinite(a[s]) and math.isfinite(b[s]) and a[s] > 0 < b[s])
    return geometric_mean_ci([a[s] / b[s] for s in seeds])


def verdict(what: str, diff: Estimate | None, p_holm: float, n: int, alpha: float = ALPHA, tests: int = 1) -> str:
    """One sentence that says only what the interval and the adjusted p-value support (`tests`: Holm's family)."""
    if diff is None or n == 0:
        return f"{what}: no paired seeds, so no comparison."
    needed = smallest_n_for(alpha, tests)
    size = f"{100 * diff.mean:+.1f} pp"
    if diff.half_width is None:
        return f"{what}: {size} from a single pair of seeds; no interval and no test (run at least {needed} seeds)."
    interval = f"95% CI [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] pp"
    if p_holm < alpha:
        direction = "higher" if diff.mean > 0 else "lower"
        return f"{what}: {abs(100 * diff.mean):.1f} pp {direction} ({interval}, Holm-adjusted p = {p_holm:.3g}, n={n})."
    excludes_zero = diff.low > 0 or diff.high < 0
    family = f" after Holm's correction over {tests} tests" if tests > 1 else ""
    if n < needed:
        if excludes_zero:
            return (f"{what}: {size} ({interval}) at n={n}: the t interval excludes zero, but an exact paired test "
                    f"cannot reach p < {alpha:g}{family} below n = {needed}, so the difference is not established; "
                    "run more seeds.")
        return (f"{what}: no detectable difference at n={n} ({size}, {interval}): an exact paired test cannot reach "
                f"p < {alpha:g}{family} below n = {needed}.")
    if excludes_zero:
        return (f"{what}: {size} ({interval}), but the Holm-adjusted exact test does not confirm it "
                f"(p = {p_holm:.3g}, n={n}): not established.")
    return f"{what}: no detectable difference ({size}, {interval}, Holm-adjusted p = {p_holm:.3g}, n={n})."
