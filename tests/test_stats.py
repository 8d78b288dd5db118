"""The report's statistics against scipy and hand-enumerated values on known inputs (n = 1, 2, ties, all-diverged)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from resnet_lab.report import stats


def test_mean_ci_matches_scipy_t_interval() -> None:
    values = [0.912, 0.905, 0.921, 0.899, 0.917]
    est = stats.mean_ci(values)
    low, high = sps.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=sps.sem(values))
    assert est is not None and est.n == 5
    assert (est.low, est.high) == pytest.approx((low, high), rel=1e-12)


def test_mean_ci_of_one_value_has_no_interval_and_none_for_no_values() -> None:
    est = stats.mean_ci([0.9])
    assert est == stats.Estimate(0.9, None, 1)
    assert "no interval" in est.fmt()
    assert stats.mean_ci([]) is None


def test_mean_ci_refuses_non_finite_values_instead_of_dropping_them() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_ci([0.9, math.nan])


def test_paired_interval_matches_scipy_ttest_rel() -> None:
    a = {0: 0.91, 1: 0.90, 2: 0.93, 3: 0.92, 4: 0.915}
    b = {0: 0.88, 1: 0.89, 2: 0.90, 3: 0.905, 4: 0.90, 9: 0.5}  # seed 9 has no partner: left out
    result = stats.paired(a, b)
    seeds = [0, 1, 2, 3, 4]
    ci = sps.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(0.95)
    assert result.seeds == seeds
    assert result.diff is not None
    assert (result.diff.low, result.diff.high) == pytest.approx((ci.low, ci.high), rel=1e-10)


def _enumerated_p(diffs: list[float]) -> float:
    observed = abs(sum(diffs))
    patterns = list(itertools.product((1, -1), repeat=len(diffs)))
    extreme = sum(abs(sum(s * d for s, d in zip(signs, diffs, strict=True))) >= observed - 1e-12 for signs in patterns)
    return extreme / len(patterns)


@pytest.mark.parametrize("diffs", [
    [0.01, 0.02, 0.03, 0.04, 0.05, 0.06],  # all positive, n=6: 2/64
    [0.01, 0.02, 0.03, 0.04, 0.05],  # n=5: 2/32, cannot reach 0.05
    [0.02, -0.01, 0.03],
    [0.01, 0.01, -0.01, 0.01],  # ties in size
    [0.05, -0.05],  # n=2, symmetric: p = 1
    [0.03],  # n=1: p = 1
])
def test_sign_flip_p_equals_full_enumeration(diffs: list[float]) -> None:
    assert stats.sign_flip_p(diffs) == pytest.approx(_enumerated_p(diffs), abs=1e-12)


def test_sign_flip_p_known_values_and_all_zero_differences() -> None:
    assert stats.sign_flip_p([0.01] * 6) == pytest.approx(2 / 64)
    assert stats.sign_flip_p([0.01] * 5) == pytest.approx(2 / 32)
    assert stats.sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    assert stats.smallest_n_for(0.05) == 6
    assert stats.smallest_n_for(0.01) == 8
    assert stats.smallest_n_for(0.05, tests=6) == 8  # Holm: 6 * 2/2^8 = 0.047; 6 * 2/2^7 = 0.094
    assert stats.smallest_n_for(0.05, tests=2) == 7


def test_holm_matches_the_textbook_step_down() -> None:
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> monotone: 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([]) == []


def test_geometric_mean_interval_is_the_log_scale_t_interval() -> None:
    ratios = [3.0, 1 / 3, 1.0]
    result = stats.geometric_mean_ci(ratios)
    logs = np.log(ratios)
    low, high = sps.t.interval(0.95, 2, loc=logs.mean(), scale=sps.sem(logs))
    assert result is not None
    assert result.mean == pytest.approx(sps.gmean(ratios))
    assert result.mean == pytest.approx(1.0)
    assert (result.low, result.high) == pytest.approx((math.exp(low), math.exp(high)))


def test_paired_ratio_skips_non_positive_and_non_finite_values() -> None:
    result = stats.paired_ratio({0: 2.0, 1: 4.0, 2: math.inf, 3: 0.0}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    assert result is not None and result.n == 2
    assert result.mean == pytest.approx(sps.gmean([2.0, 4.0]))


def test_pp_formatting_is_percentage_points_not_percent() -> None:
    est = stats.Estimate(0.012, 0.008, 5)
    assert est.fmt_pp() == "+1.2 pp [+0.4, +2.0] (n=5)"


def test_verdict_says_what_the_numbers_support() -> None:
    small = stats.paired({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.89, 1: 0.92, 2: 0.9})  # CI contains zero
    text = stats.verdict("skip on vs off", small.diff, small.p, small.n)
    assert "no detectable difference at n=3" in text and "below n = 6" in text
    steady = stats.paired({0: 0.9, 1: 0.91, 2: 0.92}, {0: 0.88, 1: 0.895, 2: 0.90})  # CI excludes zero, n too small
    assert steady.diff is not None and steady.diff.low > 0
    text = stats.verdict("skip on vs off", steady.diff, steady.p, steady.n)
    assert "the t interval excludes zero, but an exact paired test cannot reach p < 0.05 below n = 6" in text
    assert "not established" in text
    clear = stats.paired({s: 0.9 + 0.001 * s for s in range(8)}, {s: 0.85 for s in range(8)})
    assert "higher" in stats.verdict("skip on vs off", clear.diff, clear.p, clear.n)
    family = stats.verdict("skip on vs off", clear.diff, 0.06, 6, tests=4)
    assert "after Holm's correction over 4 tests below n = 8" in family
    single = stats.paired({0: 0.9}, {0: 0.8})
    assert "single pair" in stats.verdict("x", single.diff, single.p, single.n)
    assert "no paired seeds" in stats.verdict("x", None, 1.0, 0)
