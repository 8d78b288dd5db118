"""Load: 200 short trials through the whole stack; every run and every per-epoch metric must land in MLflow."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent
EPOCH_KEYS = ("train/loss", "train/acc", "val/loss", "val/acc", "lr", "epoch_time_s", "train_time_s", "eval_time_s",
              "throughput_img_s")

SPEC = """
name: stress
experiment: stress
dataset: {name: synthetic, synthetic: {train_size: 128, test_size: 32, image_size: 8}}
model: {name: baseline_cnn, width: 0.125}
trainer: {epochs: 2, batch_size: 32, threads: 1}
grid:
  dropout: [0.0, 0.1]
search:
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
samples_per_cell: 100
max_concurrent: 2
"""


@pytest.mark.slow
@pytest.mark.stress
def test_200_trials_all_land_with_every_epoch_metric(tmp_path: Path) -> None:
    spec = tmp_path / "stress.yaml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", uri,
                           "--storage", str(tmp_path / "ray_results")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=1200)
    wall_s = time.perf_counter() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("stress")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    kids = [r for r in runs if r.data.tags.get("resnet_lab.role") == "trial"]
    assert len(kids) == 200
    assert {k.info.status for k in kids} == {"FINISHED"}
    missing = []
    for kid in kids:
        for key in EPOCH_KEYS:
            if [m.step for m in client.get_metric_history(kid.info.run_id, key)] != [1, 2]:
                missing.append((kid.info.run_name, key))
    assert missing == [], missing[:10]
    train_s = sum(k.data.metrics["epoch_time_s"] for k in kids)  # last epoch only; a lower bound on work
    print(f"\nstress: 200 trials in {wall_s:.0f} s wall; {wall_s * 2 / 200:.2f} s per trial slot "
          f"(2 concurrent), measured epoch time {train_s / 200:.2f} s per trial (last epoch)")
