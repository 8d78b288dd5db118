"""From a sweep's runs to the ablation's numbers: per cell the best configuration and every one of its seed runs,
and the paired comparisons between cells. Reads runs through `SweepRuns`; imports no tracking library.

What counts (no survivorship): a run that trained to its end (completed, early-stopped) or diverged is a result of
the method. A diverged run counts at the accuracy its network actually has (its weights are NaN, so it predicts one
class: about chance), and the cell's failure rate says how often that happened. Runs that failed (a crash) or were
stopped (Ctrl-C, or ASHA in a search stage) are not results: they are counted and named, never averaged.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from resnet_lab.report.stats import (
    ALPHA,
    Estimate,
    Paired,
    Ratio,
    geometric_mean_ci,
    holm,
    mean_ci,
    paired,
    paired_ratio,
    verdict,
)
from resnet_lab.spec.catalog import MODEL_CATALOG
from resnet_lab.tracking.query import SweepRuns, TrialRun

FINISHED = ("completed", "early_stopped")  # trained to their natural end
RESULTS = (*FINISHED, "diverged")  # results of the method: counted in every mean
CURVE_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc")
TIME_KEYS = ("train_time_s", "epoch_time_s", "eval_time_s")
FLOW_PREFIX = "gradflow/"
NOSKIP = "-noskip"  # model_label's suffix for skip: false


@dataclass(frozen=True)
class RunValues:
    """What one run of a cell's chosen configuration contributes to its row."""

    run: TrialRun
    outcome: str  # completed, early_stopped, diverged
    tested_epoch: int  # the epoch whose weights produced test/acc
    score: float  # the spec's metric at tested_epoch (selects the best configuration)
    val_acc: float  # val/acc at tested_epoch; a diverged run's at its last epoch
    test_acc: float
    train_acc: float  # train/acc of the last epoch (train mode: augmentation and dropout on)
    best_val_acc: float  # the highest val/acc of any epoch
    best_epoch: float
    train_time_s: float  # optimisation time, evaluation excluded
    curve: list[tuple[int, float, float]]  # (epoch, val/acc, cumulative training seconds)
    params: float

    def reached(self, target: float) -> tuple[int, float] | None:
        """(epochs, training seconds) to the first epoch with val/acc >= target; None if it never got there."""
        return next(((e, s) for e, acc, s in self.curve if acc >= target), None)


@dataclass(frozen=True)
class Flow:
    """Gradient flow of a cell's runs at one phase: per block a geometric mean over runs with its interval."""

    blocks: list[tuple[str, Ratio]]
    first_last: Ratio | None


@dataclass(frozen=True)
class CellSummary:
    """One row of the ablation table."""

    cell: str
    model: str
    depth: int | None
    block: str
    skip: bool | None  # None: not a residual model
    stage: str  # where the numbers come from: confirm, or search when the sweep had no confirm stage
    config: str  # the chosen configuration, readable (its run name without seed and stage)
    runs: list[RunValues]  # the chosen configuration's results (finished and diverged), one per seed
    counts: Counter[str]  # every run of the chosen configuration by outcome (ASHA stops as "asha")
    outcomes: Counter[str]  # every run of the cell by outcome
    val: Estimate | None  # over every result, diverged ones included
    test: Estimate | None
    test_finished: Estimate | None  # over finished runs only (shown when some diverged)
    train_acc: Estimate | None
    best_epoch: Estimate | None
    train_time_s: Estimate | None
    params: float | None
    reference: float | None
    best_run: TrialRun | None  # the chosen configuration's run with the best metric (for learning curves)
    flow: dict[str, Flow]  # phase -> gradient flow (init, epoch1, final)
    to_target: tuple[Estimate | None, Estimate | None, int] = (None, None, 0)  # epochs, seconds, runs never there
    configs: int = 1  # configurations of the stage the numbers come from (more than one: chosen among them)

    @property
    def family(self) -> str:
        """The cell label without `-noskip`: a skip-on cell and its plain twin share it."""
        return self.cell.replace(NOSKIP, "", 1)

    @property
    def diverged(self) -> int:
        """Results of the chosen configuration that diverged."""
        return sum(r.outcome == "diverged" for r in self.runs)

    def by_seed(self, get: Callable[[RunValues], float]) -> dict[int, float]:
        """seed -> value, for pairing."""
        return {r.run.seed: get(r) for r in self.runs if r.run.seed is not None}


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


@dataclass(frozen=True)
class Summary:
    """Everything the report shows."""

    sweep: SweepRuns
    metric: str
    mode: str
    cells: list[CellSummary]
    comparisons: list[Comparison]
    target_acc: float | None
    target_source: str  # "report.target_acc" or "lowest cell's mean best val accuracy"
    conclusions: list[str] = field(default_factory=list)


# --- one run -----------------------------------------------------------------------------------------------------


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def model_depth(params: Mapping[str, str]) -> int | None:
    """Depth of a run's model: the `depth` param, else the digits of its arch label (`resnet18`); None if none."""
    model = params.get("model", "")
    if model in MODEL_CATALOG and not MODEL_CATALOG[model].depths:
        return None
    depth = params.get("depth", "default")
    if depth.isdigit():
        return int(depth)
    found = re.match(r"^[a-z_]*?(\d+)", params.get("arch", ""))
    return int(found.group(1)) if found else None


def model_block(params: Mapping[str, str], depth: int | None) -> str:
    """The residual block type (the spec's, else the model's default), `-` for plain CNNs."""
    model = params.get("model", "")
    if "model.block" in params:
        return params["model.block"]
    if model not in MODEL_CATALOG or not MODEL_CATALOG[model].residual:
        return "-"
    return "bottleneck" if model == "resnet" and depth is not None and depth >= 50 else "basic"


def config_key(run: TrialRun) -> tuple[str, tuple[tuple[str, str], ...]]:
    """Runs of one configuration share every param but the seed (and sit in the same stage)."""
    return run.stage, tuple(sorted((k, v) for k, v in run.params.items() if k != "seed"))


def config_name(run: TrialRun) -> str:
    """`resnet18-noskip-lr3.2e-04` from `resnet18-noskip-lr3.2e-04-s1-confirm`."""
    name = re.sub(r"-confirm$", "", run.name)
    return re.sub(r"-s\d+$", "", name)


def _at(history: Sequence[Mapping[str, float]], key: str, epoch: int, fallback: float) -> float:
    for row in history:
        if int(row["epoch"]) == epoch and key in row:
            return row[key]
    return fallback


def tested_epoch(run: TrialRun) -> int:
    """The epoch whose weights were tested: the best (lowest val loss) one when early stopping kept them."""
    last = int(run.metrics.get("epoch", 0))
    patience = _number(run.params.get("trainer.early_stopping_patience")) or 0
    best = run.metrics.get("best_epoch")
    if run.outcome == "diverged":
        return last
    return int(best) if patience > 0 and best is not None and 0 < best <= last else last


def _chance(run: TrialRun) -> float:
    classes = run.metrics.get("num_classes") or _number(run.params.get("dataset.synthetic.num_classes")) or 10
    return 1.0 / classes


def _accuracy(value: float | None, run: TrialRun) -> float:
    """A measured accuracy; a diverged run whose evaluation gave no finite number counts at chance."""
    return value if value is not None and math.isfinite(value) else _chance(run)


def run_values(sweep: SweepRuns, run: TrialRun, metric: str) -> RunValues:
    """The numbers of one result run (histories fetched from the store)."""
    history = sweep.history(run.run_id, dict.fromkeys([metric, *CURVE_KEYS, *TIME_KEYS]))
    epoch = tested_epoch(run)
    m = run.metrics
    seconds, curve = 0.0, []
    for row in history:
        train_s = row.get("train_time_s", row.get("epoch_time_s", math.nan) - row.get("eval_time_s", 0.0))
        seconds += train_s
        if "val/acc" in row and math.isfinite(row["val/acc"]):
            curve.append((int(row["epoch"]), row["val/acc"], seconds))
    val_accs = [acc for _, acc, _ in curve]
    diverged = run.outcome == "diverged"
    return RunValues(
        run=run, outcome=run.outcome, tested_epoch=epoch, score=_at(history, metric, epoch, m.get(metric, math.nan)),
        val_acc=_accuracy(_at(history, "val/acc", epoch, m.get("val/acc", math.nan)), run),
        test_acc=_accuracy(m.get("test/acc"), run),
        train_acc=_chance(run) if diverged else _accuracy(m.get("train/acc"), run),
        best_val_acc=max(val_accs) if val_accs else math.nan, best_epoch=m.get("best_epoch", math.nan),
        train_time_s=seconds if history else math.nan, curve=curve, params=m.get("params", math.nan))


def is_result(run: TrialRun) -> bool:
    """Finished or diverged: a result of the method, counted in the means."""
    return run.outcome in RESULTS and (run.outcome == "diverged" or "test/acc" in run.metrics)


def outcome_key(run: TrialRun) -> str:
    """The outcome, with ASHA's stops apart from other stops."""
    return "asha" if run.tags.get("stopped_by") == "asha" else run.outcome


# --- one cell ----------------------------------------------------------------------------------------------------


def choose_group(sweep: SweepRuns, runs: Sequence[TrialRun], metric: str, mode: str) -> list[TrialRun]:
    """The confirm stage's runs when there are any; else the search configuration with the best mean metric over
    its results (a diverged repeat counts as the worst value); else (no result at all) every run of the cell."""
    confirm = [r for r in runs if r.stage == "confirm"]
    if confirm:
        return confirm
    groups: dict[tuple, list[TrialRun]] = {}
    for run in runs:
        groups.setdefault(config_key(run), []).append(run)
    worst = -math.inf if mode == "max" else math.inf
    best: tuple[float, list[TrialRun]] | None = None
    for group in groups.values():
        if not any(r.outcome in FINISHED for r in group):
            continue
        scores = [worst if r.outcome == "diverged" else run_values(sweep, r, metric).score
                  for r in group if is_result(r)]
        scores = [s if math.isfinite(s) or s == worst else worst for s in scores]
        mean = sum(scores) / len(scores)
        if best is None or (mean > best[0] if mode == "max" else mean < best[0]):
            best = (mean, group)
    return best[1] if best else list(runs)


def _flow(runs: Sequence[RunValues], phase: str) -> Flow | None:
    prefix = f"{FLOW_PREFIX}{phase}/block/"
    keys = sorted({k for r in runs for k in r.run.metrics if k.startswith(prefix)})
    if not keys:
        return None
    blocks = []
    for key in keys:
        ratio = geometric_mean_ci([r.run.metrics[key] for r in runs if key in r.run.metrics])
        if ratio is not None:
            blocks.append((key.removeprefix(prefix).split(".", 1)[1], ratio))
    ratio_key = f"{FLOW_PREFIX}{phase}/first_last"
    return Flow(blocks, geometric_mean_ci([r.run.metrics[ratio_key] for r in runs if ratio_key in r.run.metrics]))


def summarize_cell(sweep: SweepRuns, cell: str, runs: Sequence[TrialRun], metric: str, mode: str,
                   reference: Mapping[str, float]) -> CellSummary:
    """One cell's row: every result of its best configuration reduced to means with intervals."""
    group = sorted(choose_group(sweep, runs, metric, mode), key=lambda r: (r.seed is None, r.seed or 0))
    values = [run_values(sweep, r, metric) for r in group if is_result(r)]
    finished = [v for v in values if v.outcome in FINISHED]
    sign = 1.0 if mode == "max" else -1.0
    best = max(finished, key=lambda v: sign * v.score if math.isfinite(v.score) else -math.inf, default=None)
    params = (group or list(runs))[0].params
    depth = model_depth(params)
    sizes = [v.params for v in values if math.isfinite(v.params)]

    def estimate(get: Callable[[RunValues], float], over: Sequence[RunValues] = values) -> Estimate | None:
        return mean_ci([x for x in (get(v) for v in over) if math.isfinite(x)])

    flows = {phase: f for phase in ("init", "epoch1", "final") if (f := _flow(finished, phase)) is not None}
    return CellSummary(
        cell=cell, model=params.get("model", "?"), depth=depth, block=model_block(params, depth),
        skip={"True": True, "False": False}.get(params.get("skip", "n/a")),
        stage=group[0].stage if values else "-", config=config_name(best.run) if best else "-", runs=values,
        counts=Counter(outcome_key(r) for r in group), outcomes=Counter(outcome_key(r) for r in runs),
        val=estimate(lambda v: v.val_acc), test=estimate(lambda v: v.test_acc),
        test_finished=estimate(lambda v: v.test_acc, finished), train_acc=estimate(lambda v: v.train_acc),
        best_epoch=estimate(lambda v: v.best_epoch, finished),
        train_time_s=estimate(lambda v: v.train_time_s, finished), params=sizes[0] if sizes else None,
        reference=reference.get(cell), best_run=best.run if best else None, flow=flows,
        configs=len({config_key(r) for r in runs if values and r.stage == group[0].stage}))


def with_target(cell: CellSummary, target: float) -> CellSummary:
    """The cell with its epochs and training seconds to `target` val accuracy (over the runs that reached it)."""
    reached = [r for v in cell.runs if (r := v.reached(target)) is not None]
    epochs = mean_ci([e for e, _ in reached])
    seconds = mean_ci([s for _, s in reached if math.isfinite(s)])
    return _replace(cell, to_target=(epochs, seconds, len(cell.runs) - len(reached)))


def _replace(cell: CellSummary, **changes: object) -> CellSummary:
    import dataclasses

    return dataclasses.replace(cell, **changes)


# --- comparisons -------------------------------------------------------------------------------------------------


def _signature(cell: CellSummary) -> tuple[str, ...] | None:
    """What two cells of a depth comparison share: model, block, width, skip, dataset (from the logged params)."""
    run = cell.runs[0].run if cell.runs else None
    if run is None or cell.depth is None:
        return None
    p = run.params
    return (cell.model, cell.block, p.get("model.width", "1"), str(cell.skip), p.get("dataset.name", ""))


def _pairs(cells: Sequence[CellSummary], baseline: str | None,
           explicit: Sequence[Sequence[str]]) -> list[tuple[str, CellSummary, CellSummary]]:
    by_label = {c.cell: c for c in cells}
    out: list[tuple[str, CellSummary, CellSummary]] = []
    seen: set[tuple[str, str]] = set()

    def add(kind: str, a: CellSummary, b: CellSummary) -> None:
        if (a.cell, b.cell) not in seen and (b.cell, a.cell) not in seen:
            seen.add((a.cell, b.cell))
            out.append((kind, a, b))

    off = {c.family: c for c in cells if c.skip is False}
    for on in cells:
        if on.skip and on.family in off:
            add("skip", on, off[on.family])
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
    import dataclasses

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
        r = next((r for r in residual if r.a.replace(NOSKIP, "") == p.a.replace(NOSKIP, "")), residual[0])
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


# --- the whole report --------------------------------------------------------------------------------------------


def summarize(sweep: SweepRuns, metric: str, mode: str, reference: Mapping[str, float], *,
              baseline: str | None = None, compare_pairs: Sequence[Sequence[str]] = (),
              target_acc: float | None = None) -> Summary:
    """The whole report's numbers; cells by model (as the sweep first ran them), depth, skip on before off."""
    by_cell: dict[str, list[TrialRun]] = {}
    for run in sweep.runs:
        by_cell.setdefault(run.cell, []).append(run)
    cells = [summarize_cell(sweep, cell, runs, metric, mode, reference) for cell, runs in by_cell.items()]
    first_seen = {model: i for i, model in reversed(list(enumerate(c.model for c in cells)))}
    cells.sort(key=lambda c: (first_seen[c.model], c.depth or 0, c.family, c.skip is False))
    target, source = target_acc, "report.target_acc"
    if target is None:
        # The lowest cell's mean best val accuracy: every cell reaches it on average, so times are comparable.
        bests = [m.mean for c in cells if (m := mean_ci([v.best_val_acc for v in c.runs
                                                          if v.outcome in FINISHED])) is not None]
        target, source = (min(bests) if bests else None), "the lowest cell's mean best val accuracy"
    if target is not None:
        cells = [with_target(c, target) for c in cells]
    comparisons = adjust([compare(kind, a, b, target) for kind, a, b in _pairs(cells, baseline, compare_pairs)])
    return Summary(sweep, metric, mode, cells, comparisons, target, source, conclusions(cells, comparisons))
