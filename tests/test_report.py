"""`python sweep.py report`: numbers recomputed by hand from real MLflow runs, figures, unusual outcomes."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.tune.experiment import Trial

from resnet_lab import report
from resnet_lab.outcome import OUTCOME_KEY
from resnet_lab.report.summary import summarize
from resnet_lab.spec import TrialConfig
from resnet_lab.spec.cells import Cell
from resnet_lab.spec.load import load_spec
from resnet_lab.spec.sweep import AshaConfig
from resnet_lab.tracking import (
    TAG_CELL,
    TAG_OUTCOME,
    TAG_SEED,
    TAG_STAGE,
    TAG_STOPPED_BY,
)
from resnet_lab.tracking import SweepTracker as Tracker
from resnet_lab.tracking.query import load_sweep
from resnet_lab.trainer import fit
from resnet_lab.tune.callbacks import MlflowRuns
from resnet_lab.tune.schedule import CellScheduler
from resnet_lab.tune.trainable import TrialMeta

ROOT = Path(__file__).resolve().parent.parent
# Student t quantiles t_{0.975, df} from printed tables: the test does not share the report's scipy call.
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764}
SKIP_ON, SKIP_OFF = "resnet8-w0.125", "resnet8-w0.125-noskip"
# Cells of the seeded store: one seed of three diverged; every seed diverged.
MIXED, DEAD = "mixed-noskip", "dead-noskip"
FIGURES = ("accuracy_vs_depth.png", "gradient_flow.png", "learning_curves.png", "accuracy_vs_params.png")

# A small real sweep: two cells (skip on/off), lr searched by TPE, ASHA stopping some, a confirm stage with 3
# fresh seeds.
SPEC = """
name: rep
experiment: rep
dataset:
  name: synthetic
  val_fraction: 0.25
  synthetic: {train_size: 320, test_size: 128, channels: 1, image_size: 16, noise: 0.5}
model: {name: resnet, depth: 8, width: 0.125}
trainer: {epochs: 3, batch_size: 32, threads: 1}
grid:
  skip: [true, false]
search:
  lr: {type: loguniform, low: 1.0e-4, high: 3.0e-2}
samples_per_cell: 3
seeds: [0]
confirm: {seeds: [1, 2, 3]}
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
max_concurrent: 2
reference: {resnet8-w0.125: 0.9}
"""


def shared_sweep(factory: pytest.TempPathFactory) -> dict[str, str]:
    """Run the small sweep once per test session (tests/test_ui.py reuses it); returns uri, spec, dir."""
    base = factory.getbasetemp() / "report_sweep"
    done = base / "sweep.json"
    if done.exists():
        return json.loads(done.read_text())
    base.mkdir(exist_ok=True)
    spec = base / "rep.yaml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{base / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", uri,
                           "--storage", str(base / "ray_results")], capture_output=True, text=True, cwd=base,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    info = {"uri": uri, "spec": str(spec), "dir": str(base)}
    done.write_text(json.dumps(info))
    return info


def table(markdown: str, first_column: str) -> dict[str, dict[str, str]]:
    """A Markdown table of report.md (found by its first column's title) as {first cell: {column: cell}}."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_column} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def by_hand(values: list[float]) -> tuple[float, float | None]:
    """Mean and 95% half-width t * s / sqrt(n)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return mean, None
    return mean, T975[len(values) - 1] * statistics.stdev(values) / math.sqrt(len(values))


def shown(mean: float, half: float | None, n: int, signed: bool = False) -> str:
    head = f"{mean:+.1%}" if signed else f"{mean:.1%}"
    return f"{head} (n={n}: no interval)" if half is None else f"{head} ± {half:.1%} (n={n})"


# --- the real sweep (slow: Ray start-up and 12 trials, about a minute) ------------------------------------------------


@pytest.fixture(scope="module")
def real(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    info = shared_sweep(tmp_path_factory)
    cwd = tmp_path_factory.mktemp("report_cli")
    previous = Path.cwd()
    os.chdir(cwd)  # the default output directory is reports/<sweep>/ under the working directory
    try:
        assert report.main([info["spec"], "--tracking-uri", info["uri"]]) == 0
    finally:
        os.chdir(previous)
    client = MlflowClient(info["uri"])
    exp = client.get_experiment_by_name("rep")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parent = next(r for r in runs if r.data.tags.get("resnet_lab.role") == "sweep")
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    out = cwd / "reports" / parent.info.run_name
    return {**info, "client": client, "parent": parent, "kids": kids, "out": out,
            "md": (out / "report.md").read_text()}


def confirm_values(real: dict[str, Any], cell: str) -> dict[int, tuple[float, float]]:
    """seed -> (val/acc at the tested (best) epoch, test/acc) of a cell's confirm runs, straight from MLflow."""
    out = {}
    for run in real["kids"]:
        if run.data.tags[TAG_CELL] != cell or run.data.tags[TAG_STAGE] != "confirm":
            continue
        assert run.data.tags[TAG_OUTCOME] == "completed" and int(run.data.params["trainer.early_stopping_patience"])
        best = int(run.data.metrics["best_epoch"])  # early stopping keeps the best weights: test ran on those
        history = {m.step: m.value for m in real["client"].get_metric_history(run.info.run_id, "val/acc")}
        out[int(run.data.tags[TAG_SEED])] = (history[best], run.data.metrics["test/acc"])
    return out


@pytest.mark.slow
def test_table_shows_mean_and_t_interval_over_confirm_seeds_recomputed_from_mlflow(real: dict[str, Any]) -> None:
    rows = table(real["md"], "cell")
    assert set(rows) == {SKIP_ON, SKIP_OFF}
    for cell in (SKIP_ON, SKIP_OFF):
        values = confirm_values(real, cell)
        assert sorted(values) == [1, 2, 3]
        row = rows[cell]
        assert row["val acc"] == shown(*by_hand([v for v, _ in values.values()]), 3)
        assert row["test acc"] == shown(*by_hand([t for _, t in values.values()]), 3)
        assert row["runs in means"] == "3 of 3: 3 completed"
        assert row["stage"] == "confirm" and row["depth"] == "8" and row["block"] == "basic"
        assert row["skip"] == ("on" if cell == SKIP_ON else "off") and row["params"].endswith("k")
    assert rows[SKIP_ON]["reference"] == "90.0%" and rows[SKIP_OFF]["reference"] == "-"


@pytest.mark.slow
def test_other_columns_match_the_runs(real: dict[str, Any]) -> None:
    summary = summarize(load_sweep(real["uri"], "rep"), "val/acc", "max", {})
    client = real["client"]
    for cell in summary.cells:
        runs = [r for r in real["kids"] if r.data.tags[TAG_CELL] == cell.cell and r.data.tags[TAG_STAGE] == "confirm"]
        times = [sum(m.value for m in client.get_metric_history(r.info.run_id, "train_time_s")) for r in runs]
        assert cell.train_time_s is not None and cell.train_time_s.mean == pytest.approx(statistics.mean(times))
        for phase in ("init", "final"):  # geometric mean over seeds of the logged first/last ratio
            ratios = [r.data.metrics[f"gradflow/{phase}/first_last"] for r in runs]
            flow = cell.flow[phase]
            assert flow.first_last is not None
            assert flow.first_last.mean == pytest.approx(math.exp(statistics.mean(math.log(x) for x in ratios)))
        assert cell.best_epoch is not None
        assert cell.best_epoch.mean == pytest.approx(statistics.mean(r.data.metrics["best_epoch"] for r in runs))
        assert cell.params == runs[0].data.metrics["params"]


@pytest.mark.slow
def test_skip_on_minus_off_is_paired_by_seed_in_percentage_points(real: dict[str, Any]) -> None:
    on, off = confirm_values(real, SKIP_ON), confirm_values(real, SKIP_OFF)
    row = table(real["md"], "comparison")[f"{SKIP_ON} vs {SKIP_OFF}"]
    diffs = [on[s][1] - off[s][1] for s in (1, 2, 3)]
    mean, half = by_hand(diffs)
    assert half is not None
    assert row["paired seeds"] == "1, 2, 3" and row["kind"] == "skip on vs off"
    low, high = 100 * (mean - half), 100 * (mean + half)
    assert row["Δ test acc (95% CI)"] == f"{100 * mean:+.1f} pp [{low:+.1f}, {high:+.1f}]"
    signs = [sum(sg * d for sg, d in zip(p, diffs, strict=True)) for p in itertools.product((1, -1), repeat=3)]
    exact = sum(abs(x) >= abs(sum(diffs)) - 1e-12 for x in signs) / 8
    assert float(row["p exact"]) == pytest.approx(exact, rel=1e-3)
    assert "an exact paired test cannot reach p < 0.05 below n = 6" in real["md"] or exact < 0.05


@pytest.mark.slow
def test_runs_table_counts_every_outcome(real: dict[str, Any]) -> None:
    rows = table(real["md"], "cell | trials")
    for cell in (SKIP_ON, SKIP_OFF):
        kids = [k for k in real["kids"] if k.data.tags[TAG_CELL] == cell]
        asha = sum(k.data.tags.get(TAG_STOPPED_BY) == "asha" for k in kids)
        completed = sum(k.data.tags[TAG_OUTCOME] == "completed" for k in kids)
        assert rows[cell]["trials"] == str(len(kids)) == "6"
        assert rows[cell]["ASHA-stopped"] == str(asha) and rows[cell]["completed"] == str(completed)


@pytest.mark.slow
def test_figures_are_written_logged_and_non_trivial(real: dict[str, Any]) -> None:
    for name in FIGURES:
        assert f"]({name})" in real["md"]
        image = np.asarray(Image.open(real["out"] / name).convert("RGB"), dtype=float)
        height, width, _ = image.shape
        assert width >= 600 and height >= 300, name
        inked = (image.sum(axis=2) < 600).mean()  # pixels clearly darker than white
        assert 0.01 < inked < 0.6 and image.std() > 20, name
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50, name  # lines, text and bands, not a blank canvas
    logged = {a.path for a in real["client"].list_artifacts(real["parent"].info.run_id, "report")}
    assert logged == {f"report/{n}" for n in ("report.md", *FIGURES)}


@pytest.mark.slow
def test_report_by_experiment_name_and_sweep_id_matches_the_spec_report(
        real: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent = real["parent"].info.run_id
    assert report.main(["rep", "--sweep", parent, "--tracking-uri", real["uri"], "--out", str(tmp_path)]) == 0
    again = (tmp_path / "report.md").read_text()
    assert table(again, "cell") == table(real["md"], "cell")  # reference numbers come from the logged spec
    out = capsys.readouterr().out
    assert "best configuration per cell" in out and SKIP_OFF in out and f"report: {tmp_path / 'report.md'}" in out
    assert "comparisons: a minus b, paired by seed" in out and "test accuracy" in out


@pytest.mark.slow
def test_unknown_experiment_sweep_and_bad_spec_are_one_line_errors(real: dict[str, Any], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert report.main(["nope", "--tracking-uri", real["uri"], "--out", str(tmp_path)]) == 1
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err
    assert report.main(["rep", "--sweep", "rep-1999", "--tracking-uri", real["uri"]]) == 1
    assert f"sweeps there: {real['parent'].info.run_name}" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmetric: val/accuracy\n")
    assert report.main([str(bad), "--tracking-uri", real["uri"]]) == 2
    assert "metric" in capsys.readouterr().err


# --- failed, diverged and ASHA-stopped runs, seeded through the tracker with real training -------------------


def trial(skip: bool | None, seed: int, model: str = "resnet", **trainer: Any) -> TrialConfig:
    model_cfg = {"name": model, "width": 0.125 if model == "resnet" else 0.25}
    if model == "resnet":
        model_cfg.update(depth=8, skip=skip)
    return TrialConfig.model_validate({
        "dataset": {"name": "synthetic", "val_fraction": 0.25,
                    "synthetic": {"train_size": 256, "test_size": 64, "channels": 1, "image_size": 16}},
        "model": model_cfg, "trainer": {"epochs": 3, "batch_size": 32, "threads": 1, **trainer}, "seed": seed})


def seed_run(tracker: Tracker, cfg: TrialConfig, cell: str, end: str, epochs: int | None = None,
             stage: str = "search", grid: dict[str, Any] | None = None) -> list[dict]:
    """One child run as the sweep leaves it: the sweep's own MLflow callback driven by a stub Tune trial that
    reports `cfg`'s real epochs; `end` is completed, diverged, asha or failed. `grid`: the cell's grid values
    (default: the model and its skip arm, the factors these cells differ in)."""
    grid = grid if grid is not None else {"model.name": cfg.model.name, "model.skip": cfg.model.skip}
    config = {**TrialMeta(cell, stage, cfg.seed).as_config(), "trainer.lr": cfg.trainer.resolved().lr}  # Ray's
    trial = Trial("train_trial", config=config, trial_id=uuid.uuid4().hex[:8], stub=True)
    scheduler = CellScheduler(AshaConfig(type="asha"), cfg.trainer.epochs, "val/acc", "max")
    callback = MlflowRuns(tracker.ref, {cell: Cell(0, cell, grid, {}, cfg)}, scheduler)
    callback.setup()
    callback.on_step_begin(0, [])
    callback.on_trial_start(0, [trial], trial)
    history: list[dict] = []
    if epochs != 0:
        fit(cfg, lambda epoch: history.append({**epoch.metrics, **(
            {OUTCOME_KEY: str(epoch.status)} if epoch.status is not None else {})}))  # as train_trial reports
        history = history[:epochs]
    for metrics in history:
        trial.update_last_result(metrics)  # as Tune does before it calls the callbacks
        callback.on_trial_result(int(metrics["epoch"]), [trial], trial, dict(metrics))
    assert end != "diverged" or history[-1]["diverged"] == 1.0
    if end == "failed":
        trial.error_msg = "RuntimeError: worker died (seeded by the test)"
        callback.on_trial_error(len(history), [trial], trial)
    else:
        if end == "asha":
            scheduler.stopped_at[trial.trial_id] = len(history)  # what ASHA records when it stops a trial
        assert (OUTCOME_KEY in history[-1]) == (end != "asha")
        callback.on_trial_complete(len(history), [trial], trial)
    return history


@pytest.fixture(scope="module")
def odd(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("odd")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri, "odd")
    tracker.start_sweep("odd-20260101-000000", {}, {"metric": "val/acc", "mode": "max"}, {})
    # Weight decay 1.0 at lr 10 multiplies every decayed weight by (1 - 10) = -9 per step: the classifier's weights
    # pass float32's 3e38 within ~40 steps whatever the gradients do (24 steps per epoch at batch 8).
    diverge = {"optimizer": "sgd", "lr": 10.0, "momentum": 0.0, "weight_decay": 1.0, "batch_size": 8}
    hist: dict[str, list[list[dict]]] = {"good": [], "slow": []}
    for seed in (0, 1):
        hist["good"].append(seed_run(tracker, trial(True, seed, lr=1e-2), SKIP_ON, "completed"))
        hist["slow"].append(seed_run(tracker, trial(True, seed, lr=1e-4), SKIP_ON, "completed"))
        seed_run(tracker, trial(True, seed, **diverge), SKIP_ON, "diverged")
    seed_run(tracker, trial(True, 0, lr=3e-4), SKIP_ON, "asha", epochs=1)
    seed_run(tracker, trial(True, 0, lr=3e-3), SKIP_ON, "failed", epochs=0)
    off = seed_run(tracker, trial(False, 0, lr=1e-2), SKIP_OFF, "completed")
    seed_run(tracker, trial(False, 1, lr=1e-2), SKIP_OFF, "failed", epochs=1)
    seed_run(tracker, trial(None, 0, model="baseline_cnn", lr=1e-3), "baseline_cnn-w0.25", "failed", epochs=0)
    # A confirm stage with a forced divergence in one of three seeds, and a cell whose every seed diverged; each its
    # own cell of the grid (a stand-in factor sets them apart from SKIP_OFF: no skip twin).
    mixed, dead = ({"model.name": "resnet", "model.skip": False, "variant": v} for v in ("mixed", "dead"))
    hist["mixed"] = [seed_run(tracker, trial(False, seed, lr=1e-2), MIXED, "completed", stage="confirm", grid=mixed)
                     for seed in (1, 2)]
    hist["mixed"].append(seed_run(tracker, trial(False, 3, **diverge), MIXED, "diverged", stage="confirm",
                                  grid=mixed))
    hist["dead"] = [seed_run(tracker, trial(False, seed, **diverge), DEAD, "diverged", stage="confirm", grid=dead)
                    for seed in (1, 2)]
    tracker.end_run(tracker.parent_id, "FINISHED")
    path = report.write_report(uri, "odd", None, None, tmp / "out", show=False)
    return {"uri": uri, "hist": hist, "off": off, "md": path.read_text(), "out": tmp / "out"}


def final_numbers(history: list[dict]) -> tuple[float, float]:
    """(val/acc at the best epoch, test/acc) of a completed run."""
    best = int(history[-1]["best_epoch"])
    return next(h["val/acc"] for h in history if int(h["epoch"]) == best), history[-1]["test/acc"]


def test_best_search_configuration_wins_and_failed_and_stopped_runs_are_counted_not_averaged(
        odd: dict[str, Any]) -> None:
    means = {name: statistics.mean(final_numbers(h)[0] for h in odd["hist"][name]) for name in ("good", "slow")}
    winner = max(means, key=means.__getitem__)
    row = table(odd["md"], "cell")[SKIP_ON]
    assert row["stage"] == "search"
    assert row["configuration"] == f"{SKIP_ON}-lr{1e-2 if winner == 'good' else 1e-4:.1e}"
    assert row["val acc"] == shown(*by_hand([final_numbers(h)[0] for h in odd["hist"][winner]]), 2)
    assert row["test acc"] == shown(*by_hand([final_numbers(h)[1] for h in odd["hist"][winner]]), 2)
    assert row["runs in means"] == "2 of 2: 2 completed"
    counts = table(odd["md"], "cell | trials")[SKIP_ON]
    assert (counts["trials"], counts["completed"], counts["diverged"], counts["ASHA-stopped"], counts["failed"]) == (
        "8", "4", "2", "1", "1")


def test_a_diverged_seed_is_a_result_in_the_mean_and_its_failure_rate_is_shown(odd: dict[str, Any]) -> None:
    runs = odd["hist"]["mixed"]
    assert runs[2][-1]["diverged"] == 1.0
    test_accs = [h[-1]["test/acc"] for h in runs]  # the diverged network's own test accuracy (about chance)
    assert all(math.isfinite(a) for a in test_accs) and test_accs[2] < 0.5
    row = table(odd["md"], "cell")[MIXED]
    assert row["runs in means"] == "3 of 3: 2 completed, 1 diverged"
    assert row["test acc"] == shown(*by_hand(test_accs), 3)
    assert row["test acc, finished runs only"] == shown(*by_hand(test_accs[:2]), 2)
    assert f"{MIXED}: 1 of 3 runs diverged" in odd["md"]


def test_a_cell_whose_seeds_all_diverged_keeps_its_row_at_the_accuracy_it_scored(odd: dict[str, Any]) -> None:
    row = table(odd["md"], "cell")[DEAD]
    assert row["runs in means"] == "2 of 2: 2 diverged"
    assert row["test acc"] == shown(*by_hand([h[-1]["test/acc"] for h in odd["hist"]["dead"]]), 2)
    assert f"{DEAD}: 2 of 2 runs diverged" in odd["md"]
    assert table(odd["md"], "cell | trials")[DEAD]["diverged"] == "2"


def test_one_seed_says_so_instead_of_an_interval(odd: dict[str, Any]) -> None:
    row = table(odd["md"], "cell")[SKIP_OFF]
    assert row["test acc"] == shown(final_numbers(odd["off"])[1], None, 1)
    assert row["runs in means"] == "1 of 2: 1 completed, 1 failed"
    pair = table(odd["md"], "comparison")[f"{SKIP_ON} vs {SKIP_OFF}"]
    assert pair["paired seeds"] == "0" and pair["p exact"] == "1"
    assert "from a single pair of seeds; no interval and no test" in odd["md"]


def test_a_cell_without_results_still_gets_a_row(odd: dict[str, Any]) -> None:
    row = table(odd["md"], "cell")["baseline_cnn-w0.25"]
    assert row["test acc"] == "-" and row["runs in means"] == "0 of 1: 1 failed"
    assert row["depth"] == "-" and row["skip"] == "-"
    for name in FIGURES:
        assert (odd["out"] / name).stat().st_size > 10_000, name


def test_renaming_runs_does_not_change_the_report(odd: dict[str, Any], tmp_path: Path) -> None:
    client = MlflowClient(odd["uri"])
    exp = client.get_experiment_by_name("odd")
    for run in client.search_runs([exp.experiment_id], max_results=1000):
        if run.data.tags.get("resnet_lab.role") == "trial":
            client.set_tag(run.info.run_id, "mlflow.runName", f"renamed-{run.info.run_id[:6]}")
    again = report.write_report(odd["uri"], "odd", None, None, tmp_path, show=False).read_text()
    columns = ("runs in means", "val acc", "test acc", "stage", "configuration", "depth", "block", "skip")
    before, after = table(odd["md"], "cell"), table(again, "cell")
    assert {c: {k: r[k] for k in columns} for c, r in before.items()} == {
        c: {k: r[k] for k in columns} for c, r in after.items()}


def test_renaming_cells_does_not_change_what_is_compared(odd: dict[str, Any], tmp_path: Path) -> None:
    """Skip twins are paired by the grid values their runs carry (tag resnet_lab.grid), not by `-noskip` labels."""
    db = tmp_path / "mlflow.db"
    shutil.copy(odd["uri"].removeprefix("sqlite:///"), db)  # a copy: the module's store stays as the others read it
    client = MlflowClient(f"sqlite:///{db}")
    names: dict[str, str] = {}
    for run in client.search_runs([client.get_experiment_by_name("odd").experiment_id], max_results=1000):
        if run.data.tags.get("resnet_lab.role") == "trial":
            cell = run.data.tags["resnet_lab.cell"]
            client.set_tag(run.info.run_id, "resnet_lab.cell", names.setdefault(cell, f"cell{len(names)}"))
    again = report.write_report(f"sqlite:///{db}", "odd", None, None, tmp_path / "out", show=False).read_text()
    before = table(odd["md"], "comparison")
    assert f"{SKIP_ON} vs {SKIP_OFF}" in before
    renamed = {}
    for pair, row in before.items():
        label = " vs ".join(names[c] for c in pair.split(" vs "))
        renamed[label] = {**row, "comparison": label}
    assert table(again, "comparison") == renamed


def test_paper_spec_puts_the_reference_studys_numbers_beside_ours(tmp_path: Path) -> None:
    spec = load_spec(str(ROOT / "sweeps" / "paper.yaml")).spec
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, spec.experiment_name)
    tracker.start_sweep("paper-20260101-000000", {}, {"metric": "val/acc", "mode": "max"}, {})
    # Tiny stand-ins trained for real, filed under the paper's cell labels (which key the reference numbers).
    seed_run(tracker, trial(None, 0, model="baseline_cnn", lr=1e-3), "baseline_cnn", "completed")
    seed_run(tracker, trial(True, 0, lr=1e-2), "resnet18", "completed")
    tracker.end_run(tracker.parent_id, "FINISHED")
    rows = table(report.write_report(uri, spec.experiment_name, None, spec, tmp_path / "out", show=False)
                 .read_text(), "cell")
    assert rows["baseline_cnn"]["reference"] == "84.1%" and rows["resnet18"]["reference"] == "89.9%"
    assert "published test accuracy of the reference study" in (tmp_path / "out" / "report.md").read_text()
