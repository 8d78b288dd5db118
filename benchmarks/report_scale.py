"""How `sweep.py report`'s reading of MLflow grows with the sweep: batched history vs one request per run per key.

Generates a SQLite MLflow store per N (a parent run and N trial runs, E epochs x the report's keys each, written
with `MlflowClient.log_batch`: no Ray, no training), then times what the report reads (`load_sweep`, then
`SweepRuns.history` of every trial run for the metric, CURVE_KEYS and TIME_KEYS, as report/cells.py asks) two
ways in the same process: the batched path (resnet_lab/tracking/query.py) and the old path (`get_metric_history`
once per run per key). Prints one row per N with both times and their ratio.

    python benchmarks/report_scale.py [--quick] [--sizes 50,200,1000] [--epochs 20] [--dir /tmp/report_scale]
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import _common  # puts the repository on sys.path
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from resnet_lab.report.cells import CURVE_KEYS, TIME_KEYS  # the keys the report reads per run
from resnet_lab.tracking.query import SweepRuns, load_sweep
from resnet_lab.tracking.writer import TAG_CELL, TAG_OUTCOME, TAG_ROLE, TAG_SEED, TAG_STAGE, TAG_SWEEP, quiet_mlflow

EXPERIMENT = "report-scale"
METRIC = "val/acc"
KEYS = tuple(dict.fromkeys([METRIC, *CURVE_KEYS, *TIME_KEYS]))
CELLS = ("plain-20", "residual-20", "plain-56", "residual-56")


def generate(uri: str, runs: int, epochs: int) -> float:
    """A sweep of `runs` finished trials x `epochs` epochs x KEYS; returns the seconds it took to write."""
    quiet_mlflow()
    t0 = time.perf_counter()
    client = MlflowClient(uri)
    exp = client.create_experiment(EXPERIMENT)
    parent = client.create_run(exp, run_name="scale-20260101-000000",
                               tags={TAG_ROLE: "sweep", TAG_SWEEP: "scale-20260101-000000"})
    for i in range(runs):
        cell = CELLS[i % len(CELLS)]
        run = client.create_run(exp, run_name=f"trial_{i:05d}", start_time=1_700_000_000_000 + i, tags={
            MLFLOW_PARENT_RUN_ID: parent.info.run_id, TAG_ROLE: "trial", TAG_CELL: cell, TAG_STAGE: "search",
            TAG_SEED: str(i % 3), TAG_OUTCOME: "completed"})
        rid = run.info.run_id
        metrics = [Metric(key, (0.5 + 0.4 * e / epochs) if "acc" in key else 1.0 / (e + 1), 1_700_000_000_000 + e, e)
                   for e in range(epochs) for key in KEYS]
        for start in range(0, len(metrics), 1000):  # log_batch takes at most 1,000 metrics per request
            client.log_batch(rid, metrics=metrics[start:start + 1000],
                             params=[Param("lr", f"{0.01 * (1 + i % 7):.3f}"), Param("cell", cell)] if start == 0
                             else [], tags=[RunTag("resnet_lab.trial_id", f"t{i}")] if start == 0 else [])
        client.set_terminated(rid, "FINISHED")
    client.set_terminated(parent.info.run_id, "FINISHED")
    return time.perf_counter() - t0


def per_run_history(sweep: SweepRuns, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """The pre-batching `SweepRuns.history`: one `get_metric_history` request per run per key."""
    cache = {key: {int(m.step): float(m.value) for m in sweep._client.get_metric_history(run_id, key)}
             for key in keys}
    steps = sorted({step for series in cache.values() for step in series})
    return [{"epoch": float(step), **{k: s[step] for k, s in cache.items() if step in s}} for step in steps]


def read(uri: str, batched: bool) -> tuple[float, int]:
    """Seconds to load the sweep and every trial's history as the report does; the number of rows read."""
    t0 = time.perf_counter()
    sweep = load_sweep(uri, EXPERIMENT)
    rows = 0
    for run in sweep.runs:
        rows += len(sweep.history(run.run_id, KEYS) if batched else per_run_history(sweep, run.run_id, KEYS))
    return time.perf_counter() - t0, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="N = 50 and 200 only")
    p.add_argument("--sizes", default="50,200,1000", help="trial counts, comma-separated (10000 takes minutes)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--dir", default="/tmp/report_scale", help="where the generated stores go (kept for reuse)")
    a = p.parse_args()
    sizes = [50, 200] if a.quick else [int(s) for s in a.sizes.split(",")]
    print(_common.machine_line())
    print(f"keys per run: {len(KEYS)} ({', '.join(KEYS)}); epochs per run: {a.epochs}")
    print(f"{'N':>6} {'values':>9} {'generate s':>10} {'per-run s':>10} {'batched s':>10} {'ratio':>7}")
    for n in sizes:
        db = Path(a.dir) / f"n{n}_e{a.epochs}" / "mlflow.db"
        uri = f"sqlite:///{db}"
        made = 0.0
        if not db.exists():
            shutil.rmtree(db.parent, ignore_errors=True)
            db.parent.mkdir(parents=True)
            made = generate(uri, n, a.epochs)
        read(uri, True)  # warm: the schema check, the OS page cache
        old, rows_old = read(uri, False)
        new, rows_new = read(uri, True)
        assert rows_old == rows_new == n * a.epochs, (rows_old, rows_new)
        print(f"{n:>6} {n * a.epochs * len(KEYS):>9} {made:>10.1f} {old:>10.2f} {new:>10.2f} {old / new:>6.1f}x",
              flush=True)


if __name__ == "__main__":
    main()
