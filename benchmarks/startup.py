"""Start-up: how long `python sweep.py` takes to print a spec error, and to get the first trial's first epoch.

Every figure is a fresh process, timed from launch:
- a spec error (a mistyped model name and a negative lr): until the process exits with the error printed;
  baselines in the same run: a bare `python -c pass` and `python sweep.py --help`;
- `--dry-run` on a valid spec (plan printed, nothing started);
- the first epoch: a one-trial sweep (a small CNN on synthetic images), with its timeline read back from MLflow
  (parent run created, first trial started, first epoch logged); baseline: a bare Ray Tune `Tuner` running the same
  trial (`_raw_tune.py`), until its driver receives the first epoch's result. Run 1 creates the MLflow database
  (schema migrations), run 2 reuses it.

    python benchmarks/startup.py [--quick] [--device cpu|cuda]
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import ROOT, machine_line, median, parser, show

HERE = Path(__file__).resolve().parent
GOAL_SPEC_ERROR_S = 2.0

GOOD = """\
name: startup
experiment: startup
dataset:
  name: synthetic
  augment: false
  synthetic: {{train_size: 256, test_size: 64, image_size: 16}}
model: {{name: baseline_cnn, width: 0.5}}
trainer: {{recipe: paper, epochs: 2, batch_size: 64, device: {device}}}
seeds: [0]
resources: {{cpu: 1, gpu: {gpu}}}
max_concurrent: 1
"""

BAD = """\
name: startup
model: {name: resnt, depth: 18}
trainer: {lr: -0.001}
"""


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    return time.perf_counter() - start, proc


def stream(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, float, list[tuple[float, str]], int]:
    """Run `cmd`; returns (launch unix time, wall s, [(unix time, stdout line)], exit code)."""
    launch = time.time()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[tuple[float, str]] = []
    err: list[str] = []
    drain = threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)  # never block on stderr
    drain.start()
    for line in proc.stdout or []:
        lines.append((time.time(), line.rstrip()))
    code = proc.wait(timeout=900)
    drain.join(timeout=5)
    if code != 0:
        tail = "\n".join(text for _, text in lines[-30:]) + "".join(err[-30:])
        sys.exit(f"{' '.join(cmd)} failed ({code}):\n{tail}")
    return launch, time.perf_counter() - start, lines, code


def mlflow_timeline(db: Path) -> dict[str, float]:
    """Unix times (s) of the newest sweep's milestones, from the MLflow SQLite store."""
    con = sqlite3.connect(db)
    try:
        parent_id, parent_start = con.execute(
            "SELECT r.run_uuid, r.start_time FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
            "WHERE t.key = 'resnet_lab.role' AND t.value = 'sweep' ORDER BY r.start_time DESC LIMIT 1").fetchone()
        children = [row[0] for row in con.execute(
            "SELECT run_uuid FROM tags WHERE key = 'mlflow.parentRunId' AND value = ?", (parent_id,))]
        marks = ",".join("?" * len(children))
        child_start = con.execute(f"SELECT MIN(start_time) FROM runs WHERE run_uuid IN ({marks})",
                                  children).fetchone()[0]
        first_epoch, epoch_time = con.execute(
            f"SELECT m.timestamp, (SELECT value FROM metrics e WHERE e.run_uuid = m.run_uuid AND "
            f"e.key = 'epoch_time_s' AND e.step = 1) FROM metrics m WHERE m.run_uuid IN ({marks}) AND "
            "m.key = 'epoch' AND m.step = 1 ORDER BY m.timestamp LIMIT 1", children).fetchone()
    finally:
        con.close()
    return {"parent": parent_start / 1000, "child": child_start / 1000, "first_epoch": first_epoch / 1000,
            "epoch_time_s": float(epoch_time)}


def first_epoch_ours(tmp: Path, spec: Path, env: dict[str, str], run: int) -> dict[str, Any]:
    work = tmp / f"ours{run}"
    work.mkdir(exist_ok=True)
    db = tmp / "mlflow.db"  # shared by the runs: run 1 creates it, run 2 finds it migrated
    cmd = [sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", f"sqlite:///{db}", "--storage",
           str(work / "results"), "--ray-temp-dir", str(work / "ray")]
    launch, wall, lines, _ = stream(cmd, work, env)
    started = next((t for t, line in lines if "sweep 'startup'" in line), float("nan"))
    marks = mlflow_timeline(db)
    return {"starting": started - launch, "parent": marks["parent"] - launch, "child": marks["child"] - launch,
            "first_epoch": marks["first_epoch"] - launch, "epoch_time_s": marks["epoch_time_s"], "wall": wall}


def first_epoch_bare(tmp: Path, spec: Path, env: dict[str, str], run: int) -> dict[str, Any]:
    work = tmp / f"bare{run}"
    work.mkdir(exist_ok=True)
    cmd = [sys.executable, str(HERE / "_raw_tune.py"), str(spec), "--storage", str(work / "results"),
           "--ray-temp-dir", str(work / "ray"), "--max-concurrent", "1"]
    launch, wall, lines, _ = stream(cmd, work, env)
    first = next(float(line.split()[1]) for _, line in lines if line.startswith("FIRST_RESULT"))
    return {"first_epoch": first - launch, "wall": wall}


def main() -> int:
    p = parser(__doc__.split("\n\n")[0])
    args = p.parse_args()
    device = args.device or "cpu"
    repeats = 3 if args.quick else 7
    runs = 1 if args.quick else 2
    print(machine_line(device) + "\n", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="rlb-", dir="/tmp"))
    good, bad = tmp / "startup.yaml", tmp / "bad.yaml"
    good.write_text(GOOD.format(device=device, gpu=1 if device == "cuda" else 0))
    bad.write_text(BAD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    sweep = [sys.executable, str(ROOT / "sweep.py")]
    cases = {"python -c pass": [sys.executable, "-c", "pass"],
             "sweep.py --help": [*sweep, "--help"],
             "sweep.py BAD_SPEC (error)": [*sweep, str(bad)],
             "sweep.py SPEC --dry-run": [*sweep, str(good), "--dry-run"]}
    times: dict[str, list[float]] = {name: [] for name in cases}
    error_text = ""
    for _ in range(repeats):  # interleaved, so a burst of load hits every case alike
        for name, cmd in cases.items():
            seconds, proc = timed(cmd, tmp, env)
            times[name].append(seconds)
            if "BAD_SPEC" in name:
                if proc.returncode != 2 or "error" not in proc.stderr:
                    sys.exit(f"expected exit code 2 and an error, got {proc.returncode}: {proc.stderr[-2000:]}")
                error_text = proc.stderr.strip()
    print("the spec error as printed:\n" + "\n".join("  " + line for line in error_text.splitlines()) + "\n")
    interpreter = median(times["python -c pass"])
    show(f"startup: fresh processes, median of {repeats} interleaved runs (goal: spec error < "
         f"{GOAL_SPEC_ERROR_S:g} s)",
         ["command", "median s", "min s", "max s", "vs python -c pass", "vs goal"],
         [[name, f"{median(v):.2f}", f"{min(v):.2f}", f"{max(v):.2f}", f"{median(v) / interpreter:.1f}x",
           f"{median(v) / GOAL_SPEC_ERROR_S:.2f}" if "error" in name else ""] for name, v in times.items()])

    rows = []
    ours_first, bare_first = [], []
    for run in range(1, runs + 1):
        bare = first_epoch_bare(tmp, good, env, run)
        ours = first_epoch_ours(tmp, good, env, run)
        ours_first.append(ours["first_epoch"])
        bare_first.append(bare["first_epoch"])
        db = "new MLflow db" if run == 1 else "existing db"
        rows.append([f"sweep.py, run {run} ({db})", f"{ours['starting']:.1f}", f"{ours['parent']:.1f}",
                     f"{ours['child']:.1f}", f"{ours['first_epoch']:.1f}", f"{ours['epoch_time_s']:.2f}",
                     f"{ours['wall']:.1f}", f"{ours['first_epoch'] / bare['first_epoch']:.2f}"])
        rows.append([f"bare Tuner, run {run}", "", "", "", f"{bare['first_epoch']:.1f}", "", f"{bare['wall']:.1f}",
                     "1.00"])
    show("time to the first trial's first epoch, seconds from launch (one trial, 2 epochs of a small CNN)",
         ["process", "'starting sweep' printed", "parent run created", "first trial started", "first epoch logged",
          "of which the epoch", "exit", "first epoch vs bare"], rows)
    error_s = median(times["sweep.py BAD_SPEC (error)"])
    print(f"spec error in {error_s:.2f} s (goal < {GOAL_SPEC_ERROR_S:g} s): "
          f"{'met' if error_s < GOAL_SPEC_ERROR_S else 'not met'}; first epoch {median(ours_first):.1f} s vs bare "
          f"Tuner {median(bare_first):.1f} s (ratio {median(ours_first) / median(bare_first):.2f})")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
