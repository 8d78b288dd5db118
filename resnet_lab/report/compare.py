"""Paired comparisons between cells (skip twins, deeper vs shallower, a baseline, requested pairs), Holm's
adjustment across them, and the sentences the numbers support."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from resnet_lab.report.cells import RESULTS, CellSummary, RunValues
from resnet_lab.report.stats import ALPHA, Paired, Ratio, holm, paired, paired_ratio, verdict

SKIP = "model.skip"  # the grid value a skip twin differs in


@dataclass(frozen=True)
class Comparison:
    """Cell a minus cell b, paired by seed: test accuracy always, train accuracy for depth comparisons."""

    kind: str  # skip, baseline, compare, depth
    a: str
    b: str
    test: Paired
    train: Paired | None = None
    time_ratio: Ratio | None = None  # a's over b's training seconds to the target accuracy
    test_p_holm: float = 1.0
    train_p_holm: float | None = None

    @property
    def title(self) -> str:
        """`resnet10 vs resnet10-noskip`."""
        return f"{self.a} vs {self.b}"


# --- comparisons -------------------------------------------------------------------------------------------------


def _signature(cell: CellSummary) -> tuple[str, ...] | None:
    """What two cells of a depth comparison share: model, block, skip and every grid value but the depth (runs
    logged before the grid tag: model, block, width, skip, dataset from their params)."""
    run = cell.runs[0].run if cell.runs else None
    if run is None or cell.depth is None:
        return None
    if cell.grid is not None:  # the same grid values but depth: the same net at another depth
        return (cell.model, cell.block, str(cell.skip), cell.family("model.depth"))
    p = run.params
    return (cell.model, cell.block, p.get("model.width", "1"), str(cell.skip), p.get("dataset.name", ""))


def pairs(cells: Sequence[CellSummary], baseline: str | None,
          explicit: Sequence[Sequence[str]]) -> list[tuple[str, CellSummary, CellSummary]]:
    """(kind, a, b) for every comparison the report makes: skip twins, deeper vs shallower, vs baseline, requested."""
    by_label = {c.cell: c for c in cells}
    out: list[tuple[str, CellSummary, CellSummary]] = []
    seen: set[tuple[str, str]] = set()

    def add(kind: str, a: CellSummary, b: CellSummary) -> None:
        if (a.cell, b.cell) not in seen and (b.cell, a.cell) not in seen:
            seen.add((a.cell, b.cell))
            out.append((kind, a, b))

    off = {c.family(SKIP): c for c in cells if c.skip is False}
    for on in cells:
        if on.skip and on.family(SKIP) in off:
            add("skip", on, off[on.family(SKIP)])
    families: dict[tuple[str, ...], dict[int, list[CellSummary]]] = {}
    for c in cells:
        if (sig := _signature(c)) is not None and c.depth is not None:
            families.setdefault(sig, {}).setdefault(c.depth, []).append(c)
    for depths in families.values():
        if len(depths) >= 2 and all(len(cs) == 1 for cs in depths.values()):
            add("depth", depths[max(depths)][0], depths[min(depths)][0])
    if baseline in by_label:
        for c in cells:
            if c.cell != baseline:
                add("baseline", c, by_label[baseline])
    for a, b in explicit:
        if a in by_label and b in by_label:
            add("compare", by_label[a], by_label[b])
    return out


def compare(kind: str, a: CellSummary, b: CellSummary, target: float | None) -> Comparison:
    """a minus b, paired by seed."""
    test = paired(a.by_seed(lambda v: v.test_acc), b.by_seed(lambda v: v.test_acc))
    train = paired(a.by_seed(lambda v: v.train_acc), b.by_seed(lambda v: v.train_acc)) if kind == "depth" else None
    ratio = None
    if target is not None:
        def seconds(v: RunValues) -> float:
            reached = v.reached(target)
            return reached[1] if reached else math.nan

        ratio = paired_ratio(a.by_seed(seconds), b.by_seed(seconds))
    return Comparison(kind, a.cell, b.cell, test, train, ratio)


def adjust(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """Holm across every test the report prints (test accuracy of each comparison, train accuracy of depth ones)."""
    tests = [(i, "test", c.test.p) for i, c in enumerate(comparisons) if c.test.n]
    tests += [(i, "train", c.train.p) for i, c in enumerate(comparisons) if c.train is not None and c.train.n]
    adjusted = holm([p for _, _, p in tests])
    out = list(comparisons)
    for (i, which, _), p in zip(tests, adjusted, strict=True):
        out[i] = dataclasses.replace(out[i], **({"test_p_holm": p} if which == "test" else {"train_p_holm": p}))
    return out


# --- conclusions -------------------------------------------------------------------------------------------------


def conclusions(cells: Sequence[CellSummary], comparisons: Sequence[Comparison]) -> list[str]:
    """The sentences under the tables: each says only what its interval and adjusted p-value support."""
    out = []
    for c in cells:
        if c.stage == "search" and c.configs > 1:
            out.append(f"{c.cell}: chosen among {c.configs} searched configurations on these same runs' validation "
                       "metric (no confirm stage), so its val accuracy is biased upward; its test accuracy is not. "
                       "A `confirm` stage with fresh seeds removes the bias.")
        results = len(c.runs)
        if c.diverged:
            out.append(f"{c.cell}: {c.diverged} of {results} runs diverged; they count in its accuracy at what the "
                       "diverged network scores (about chance), so its mean reflects the failure rate.")
        missing = sum(n for k, n in c.counts.items() if k not in RESULTS)
        if missing:
            out.append(f"{c.cell}: {missing} run(s) of the reported configuration did not finish "
                       f"({_counts(c.counts, exclude=RESULTS)}) and are not in its means.")
    names = {"skip": "skip on minus off", "baseline": "minus the baseline", "compare": "minus", "depth": "deeper minus"}
    tests = sum(bool(c.test.n) for c in comparisons) + sum(c.train is not None and bool(c.train.n)
                                                           for c in comparisons)
    for cmp in comparisons:
        what = f"{cmp.a} {names[cmp.kind]} {cmp.b}" if cmp.kind != "skip" else f"{cmp.a} vs {cmp.b} (skip on - off)"
        out.append(verdict(f"test accuracy, {what}", cmp.test.diff, cmp.test_p_holm, cmp.test.n, tests=tests))
        if cmp.train is not None and cmp.train_p_holm is not None:
            out.append(verdict(f"train accuracy, {what}", cmp.train.diff, cmp.train_p_holm, cmp.train.n,
                               tests=tests))
    out += degradation(cells, comparisons)
    return out


def degradation(cells: Sequence[CellSummary], comparisons: Sequence[Comparison]) -> list[str]:
    """Whether He et al. 2016's degradation (Fig. 6) appears: a deeper plain net trains worse than a shallower one,
    while the deeper residual net does not."""
    skip_of = {c.cell: c.skip for c in cells}
    depth = [c for c in comparisons if c.kind == "depth" and c.train is not None and c.train.diff is not None]
    plain = [c for c in depth if skip_of.get(c.a) is False]
    residual = [c for c in depth if skip_of.get(c.a) is True]
    if not plain or not residual:
        return []
    out = []
    for p in plain:
        twin = {c.cell: c.family(SKIP) for c in cells}
        r = next((r for r in residual if twin[r.a] == twin[p.a]), residual[0])
        assert p.train is not None and r.train is not None and p.train.diff and r.train.diff
        plain_worse = p.train.diff.high < 0 and (p.train_p_holm or 1.0) < ALPHA
        res_worse = r.train.diff.high < 0 and (r.train_p_holm or 1.0) < ALPHA
        facts = (f"plain {p.a} - {p.b}: {p.train.diff.fmt_pp(False)} train accuracy; residual {r.a} - {r.b}: "
                 f"{r.train.diff.fmt_pp(False)}")
        if plain_worse and not res_worse:
            out.append(f"Degradation (He et al. 2016, Fig. 6) appears: the deeper plain net trains worse than the "
                       f"shallower one and the deeper residual net does not ({facts}).")
        elif plain_worse and res_worse:
            out.append(f"Both deeper nets train worse than their shallower versions, so this is not the degradation "
                       f"pattern residual learning removes ({facts}).")
        elif p.train.diff.mean < 0:
            out.append(f"Degradation is not established: the deeper plain net's train accuracy is lower, but the "
                       f"interval or the Holm-adjusted test does not exclude no difference ({facts}).")
        else:
            out.append(f"Degradation does not appear: the deeper plain net does not train worse ({facts}).")
    return out


def _counts(counter: Counter[str], exclude: Sequence[str] = ()) -> str:
    return ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(counter.items()) if k not in exclude)
