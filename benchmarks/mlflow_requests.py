"""MLflow's own CPU per trial: what a trial's record costs the driver, apart from Ray (issue 15).

`scaling.py` finds MLflow's share of the driver with py-spy inside a running sweep; this measures it alone. One
trial of scaling.py's workload is trained once for its real epoch metrics, params and tags; then N trials' records
go to a fresh SQLite store, in this process, two ways:
- `tracker`: through `SweepTracker` as sweep.py's callback writes them (start_trial, an epoch's log_metrics, the
  outcome with the last epoch, end_run), one trial stored before the next starts; its outbox merges a trial's
  create, params and epochs, so a trial is 3 MLflow calls: create_run, log_batch, set_terminated;
- `client`: those 3 calls made directly with MlflowClient, each timed alone: the floor any MLflow record of the
  same content costs, and where it goes.
Printed per trial: the process's CPU (every thread: the outbox writes from its own), wall time, MLflow calls.

    python benchmarks/mlflow_requests.py [--quick] [--trials N]
"""

from __future__ import annotations

import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from _common import machine_line, parser, show
from scaling import EPOCHS, IMAGES, SPEC

CALLS = ("create_run", "log_batch", "set_terminated", "update_run", "search_runs", "get_metric_history")


def workload(tmp: Path) -> tuple[dict[str, Any], dict[str, str], list[dict[str, float]]]:
    """(params, tags, every epoch's metrics) of one trial of scaling.py's workload, as the callback builds them."""
    from resnet_lab.spec.load import load_spec
    from resnet_lab.tracking.writer import TAG_CELL, TAG_CONFIG, TAG_GRID, TAG_SEED, TAG_STAGE
    from resnet_lab.trainer import fit
    from resnet_lab.tune.callbacks import config_label, grid_tag, trial_params
    from resnet_lab.tune.trainable import TrialMeta, trial_config

    spec = tmp / "workload.yaml"
    spec.write_text(SPEC.format(trials=1, images=IMAGES, epochs=EPOCHS, concurrency=1, device="cpu"))
    cell = load_spec(str(spec), []).cells[0]
    config = {"cell": cell.label, "stage": "search", "seed": 0, **{key: 0.03 for key in cell.search}}
    meta = TrialMeta.of(config)
    cfg = trial_config(cell.base, config, cpus=1)
    epochs: list[dict[str, float]] = []
    fit(cfg, lambda epoch: epochs.append({k: float(v) for k, v in epoch.metrics.items()}))
    tags = {TAG_CELL: meta.cell, TAG_STAGE: meta.stage, TAG_SEED: str(meta.seed), TAG_CONFIG: config_label(config),
            TAG_GRID: grid_tag(cell)}
    return trial_params(cfg, meta), tags, epochs


def counting(client: Any, counts: Counter[str]) -> None:
    """Count the MLflow client calls made through `client` (its methods wrapped on the instance)."""
    for name in CALLS:
        method = getattr(client, name)

        def wrapped(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            counts[_name] += 1
            return _method(*args, **kwargs)

        setattr(client, name, wrapped)


def through_tracker(uri: str, n: int, params: dict[str, Any], tags: dict[str, str],
                    epochs: list[dict[str, float]]) -> dict[str, Any]:
    from resnet_lab.tracking.writer import SweepTracker

    tracker = SweepTracker(uri, "tracker")
    tracker.start_sweep("tracker", {}, {}, {})
    tracker.flush()
    counts: Counter[str] = Counter()
    counting(tracker.client, counts)
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        run = tracker.start_trial(f"t{i:05d}", f"trial {i}", params, tags)
        for step, metrics in enumerate(epochs, 1):
            last = {"resnet_lab.outcome": "completed"} if step == len(epochs) else None
            tracker.log_metrics(run, metrics, step, tags=last)
        tracker.end_run(run, "FINISHED")
        assert tracker.flush(), "the store stopped answering"
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"path": "SweepTracker (as sweep.py)", "cpu_ms": 1000 * cpu / n, "wall_ms": 1000 * wall / n,
            "calls": sum(counts.values()) / n, "by_call": {k: v / n for k, v in counts.items()}}


def through_client(uri: str, n: int, params: dict[str, Any], tags: dict[str, str],
                   epochs: list[dict[str, float]]) -> dict[str, Any]:
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    client = MlflowClient(uri)
    experiment = client.create_experiment("client")
    parent = client.create_run(experiment, run_name="client").info.run_id
    spent: Counter[str] = Counter()
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(n):
        start = time.process_time()
        run = client.create_run(experiment, run_name=f"trial {i}", tags={
            MLFLOW_PARENT_RUN_ID: parent, MLFLOW_RUN_NAME: f"trial {i}", **tags}).info.run_id
        created = time.process_time()
        now = int(time.time() * 1000)
        client.log_batch(run, metrics=[Metric(k, v, now, step) for step, m in enumerate(epochs, 1)
                                       for k, v in m.items()],
                         params=[Param(k, str(v)) for k, v in params.items()],
                         tags=[RunTag("resnet_lab.outcome", "completed")])
        logged = time.process_time()
        client.set_terminated(run, "FINISHED")
        ended = time.process_time()
        spent.update({"create_run": created - start, "log_batch": logged - created, "set_terminated": ended - logged})
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"path": "MlflowClient, 3 calls", "cpu_ms": 1000 * cpu / n, "wall_ms": 1000 * wall / n, "calls": 3.0,
            "by_call": {k: 1000 * v / n for k, v in spent.items()}}


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=None, help="trials per path (default 300; --quick 50)")
    args = p.parse_args()
    n = args.trials or (50 if args.quick else 300)
    print(machine_line("cpu"), flush=True)
    from resnet_lab.tracking.writer import quiet_mlflow

    quiet_mlflow()
    with tempfile.TemporaryDirectory(prefix="rlm-") as tmp:
        params, tags, epochs = workload(Path(tmp))
        print(f"a trial's record: {len(params)} params, {len(tags)} tags (+ MLflow's parent and name), "
              f"{len(epochs)} epochs x {len(epochs[0])} metrics; {n} trials per path, SQLite\n", flush=True)
        rows = []
        for path in (through_client, through_tracker):
            warm, measured = (f"sqlite:///{Path(tmp) / f'{path.__name__}-{k}.db'}" for k in ("warm", "measured"))
            path(warm, 10, params, tags, epochs)  # warm-up: first imports and statements
            rows.append(path(measured, n, params, tags, epochs))
    show(f"MLflow per trial ({n} trials, SQLite, in-process)",
         ["path", "MLflow calls / trial", "CPU ms / trial", "wall ms / trial", "per call"],
         [[r["path"], f"{r['calls']:.1f}", f"{r['cpu_ms']:.0f}", f"{r['wall_ms']:.0f}",
           ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["by_call"].items()))] for r in rows])
    print("(per call: the client path's CPU ms per call; the tracker path's calls per trial)")
    print(machine_line("cpu"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
