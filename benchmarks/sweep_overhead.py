"""Sweep overhead: N trials of fixed cost through `python sweep.py` (MLflow, checkpoints, live view) vs the same
trials through a bare Ray Tune `Tuner` (no logging, no checkpoints), each a fresh process, measured back to back.

The trials: a small baseline CNN on synthetic 16x16 images for a fixed number of epochs, no early stopping, one per
seed, 1 CPU each, 2 at a time. Their known cost C is measured in this process: `fit()` of the same config on one
thread, alone, before and after the sweeps (median). Figures:
- wall s: process start to exit (interpreter, imports, Ray start, trials, shutdown);
- span s: first trial start to last trial end (Ray's timestamps in each trial's result.json);
- reported work s: the trials' training time as the trainer measured it inside the sweep (`epoch_time_s`, summed);
  above N x C when trials slow each other or the driver takes CPU from them;
- per-trial overhead s: (concurrency x span - N x C) / N: what each trial costs beyond its known cost, in
  trial-slot seconds (worker start, data load, model build, checkpoint, reporting, scheduling gaps, and CPU taken
  from the trials by the driver); start-up and shutdown (wall - span) are counted apart;
- worker start s: what the first trial of each slot waited before its first epoch (a new Ray worker process:
  importing torch, whose first optimizer imports torch._dynamo); paid once per worker, so the per-trial overhead
  is also shown without it (the cost of one more trial);
- ratio: wall time over the bare Tuner's (default settings, a new worker process per trial), and over a bare
  Tuner with `reuse_actors=True` (full runs only; --quick runs ours and the default bare Tuner).

    python benchmarks/sweep_overhead.py [--quick] [--device cpu|cuda] [--trials N]
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine_line, median, parser, show

HERE = Path(__file__).resolve().parent
CONCURRENCY = 2

# The fixed-cost workload of the overhead benchmarks (scaling.py runs it too): a str.format template.
WORKLOAD = """\
dataset:
  name: synthetic
  augment: false
  val_fraction: 0.25
  synthetic: {{train_size: {images}, test_size: 64, image_size: 16}}
model: {{name: baseline_cnn, width: 0.5}}
trainer: {{recipe: paper, epochs: {epochs}, batch_size: 64, early_stopping_patience: 0, device: {device}}}
"""

SPEC = "name: overhead\nexperiment: overhead\n" + WORKLOAD + """\
seeds: {seeds}
scheduler: {{type: none}}
resources: {{cpu: 1, gpu: {gpu}}}
max_concurrent: {concurrency}
"""


def trial_results(storage: Path) -> list[list[dict[str, Any]]]:
    """Every trial's reported results (one dict per epoch), from Ray's result.json files under `storage`."""
    out = []
    for path in glob.glob(str(storage / "**" / "result.json"), recursive=True):
        lines = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            out.append(lines)
    return out


def summarize(name: str, wall: float, storage: Path, trials: int, cost: float) -> dict[str, Any]:
    results = trial_results(storage)
    if len(results) != trials:
        raise RuntimeError(f"{name}: expected {trials} trials under {storage}, found {len(results)}")
    work = sum(r.get("epoch_time_s", 0.0) for trial in results for r in trial)
    def started(trial: list[dict[str, Any]]) -> float:
        return trial[0]["timestamp"] - trial[0]["time_this_iter_s"]

    results.sort(key=started)
    span = max(trial[-1]["timestamp"] for trial in results) - started(results[0])
    cold = [t[0]["time_this_iter_s"] - t[0].get("epoch_time_s", 0.0) for t in results[:CONCURRENCY]]  # per slot
    per_trial = (CONCURRENCY * span - trials * cost) / trials
    return {"name": name, "wall": wall, "span": span, "work": work, "trials": trials, "per_trial": per_trial,
            "cold": sum(cold) / len(cold), "per_trial_warm": per_trial - sum(cold) / trials,
            "epochs": sum(len(t) for t in results)}


def known_cost(spec: Path, repeats: int) -> list[float]:
    """Seconds of `fit()` for the spec's trial config in this process, one thread, one trial at a time."""
    from resnet_lab.data import load_data
    from resnet_lab.spec import TrialConfig
    from resnet_lab.spec.load import load_spec
    from resnet_lab.trainer import fit

    base = load_spec(str(spec), []).cells[0].base.model_dump(exclude_none=True)
    base["trainer"]["threads"] = 1
    cfg = TrialConfig.model_validate(base)
    data = load_data(cfg.dataset, "cpu")
    fit(cfg, data=data)  # warm-up: the first optimizer imports torch._dynamo (seconds, once per process)
    times = []
    for seed in range(repeats):
        start = time.perf_counter()
        fit(cfg.model_copy(update={"seed": seed}), data=data)
        times.append(time.perf_counter() - start)
    return times


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=None, help="trials per run (default 16; --quick 6)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per trial (default 3)")
    p.add_argument("--images", type=int, default=None, help="synthetic training images (default 1024; --quick 256)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (specs, MLflow, Ray results)")
    args = p.parse_args()
    device = args.device or "cpu"  # trials are tiny: CPU unless asked
    trials = args.trials or (6 if args.quick else 16)
    images = args.images or (256 if args.quick else 1024)
    print(machine_line(device))
    tmp = Path(tempfile.mkdtemp(prefix="rlb-", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    spec = tmp / "overhead.yaml"
    spec.write_text(SPEC.format(images=images, epochs=args.epochs, seeds=list(range(trials)), device=device,
                                gpu=0.5 if device == "cuda" else 0, concurrency=CONCURRENCY))
    print(f"{trials} trials x {args.epochs} epochs (baseline_cnn w0.5, {images} synthetic 16x16 images), "
          f"{CONCURRENCY} at a time, 1 CPU each; work dir {tmp}\n", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    runs = {
        "sweep.py (ours)": lambda d: [sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri",
                                      f"sqlite:///{d}/mlflow.db", "--storage", str(d / "results"),
                                      "--ray-temp-dir", str(d / "ray")],
        "bare Tuner": lambda d: [sys.executable, str(HERE / "_raw_tune.py"), str(spec), "--storage",
                                 str(d / "results"), "--ray-temp-dir", str(d / "ray")],
        "bare Tuner, reuse_actors": lambda d: [sys.executable, str(HERE / "_raw_tune.py"), str(spec), "--storage",
                                               str(d / "results"), "--ray-temp-dir", str(d / "ray"),
                                               "--reuse-actors"],
    }
    costs = known_cost(spec, 3)
    order = ["bare Tuner", "sweep.py (ours)"] + ([] if args.quick else ["bare Tuner, reuse_actors"])
    results: dict[str, tuple[float, Path]] = {}
    for i, name in enumerate(order):
        work_dir = tmp / f"run{i}"
        work_dir.mkdir()
        wall, _ = run(runs[name](work_dir), work_dir, env)
        results[name] = (wall, work_dir / "results")
        print(f"  {name}: wall {wall:.1f} s", flush=True)
        shutil.rmtree(work_dir / "ray", ignore_errors=True)
    costs += known_cost(spec, 3)
    cost = median(costs)
    print(f"  known cost C of one trial (fit() in-process, 1 thread, alone): median {cost:.2f} s "
          f"(range {min(costs):.2f}-{max(costs):.2f} s over {len(costs)} runs)\n", flush=True)
    stats = {name: summarize(name, wall, storage, trials, cost) for name, (wall, storage) in results.items()}
    ours, raw = stats["sweep.py (ours)"], stats["bare Tuner"]
    raw_reuse = stats.get("bare Tuner, reuse_actors")  # full runs only
    rows = []
    for s in stats.values():
        rows.append([s["name"], f"{s['wall']:.1f}", f"{s['wall'] - s['span']:.0f}", f"{s['span']:.0f}",
                     f"{s['work']:.1f}", f"{s['per_trial']:.2f}", f"{s['cold']:.1f}", f"{s['per_trial_warm']:.2f}",
                     f"{s['wall'] / raw['wall']:.2f}",
                     f"{s['wall'] / raw_reuse['wall']:.2f}" if raw_reuse else "-"])
    show(f"sweep_overhead: {trials} trials x {args.epochs} epochs, {CONCURRENCY} concurrent, known cost "
         f"N x C = {trials * cost:.1f} s (goal: ratio <= 1.2 vs the bare Tuner, per-trial overhead <= 1 s)",
         ["path", "wall s", "start-up + shutdown s", "span s", "reported work s", "per-trial overhead s",
          "worker start s", "per trial without it s", "ratio vs bare", "ratio vs bare+reuse"], rows)
    versus = raw_reuse or raw
    extra = (ours["span"] - versus["span"]) * CONCURRENCY / trials
    print(f"ours' per-trial overhead {ours['per_trial']:.2f} s (goal <= 1 s): "
          f"{'met' if ours['per_trial'] <= 1 else 'not met'}; {extra:+.2f} s per trial over the {versus['name']}; "
          f"wall ratio {ours['wall'] / raw['wall']:.2f} vs the bare Tuner (goal <= 1.2): "
          f"{'met' if ours['wall'] / raw['wall'] <= 1.2 else 'not met'}")
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
