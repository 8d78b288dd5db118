"""A data-parallel trial (2 CPU workers, gloo DDP through Ray Train) runs end to end inside a sweep."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parent.parent

SPEC = """
name: ddp
experiment: ddp
dataset: {name: synthetic, synthetic: {train_size: 384, test_size: 64, image_size: 16}}
model: {name: resnet, depth: 8, width: 0.125}
trainer: {epochs: 2, batch_size: 32}
resources: {cpu: 1, workers: 2}
"""


@pytest.mark.slow
def test_two_worker_ddp_trial_reports_like_a_single_worker_trial(tmp_path: Path) -> None:
    spec = tmp_path / "ddp.yaml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", uri,
                           "--storage", str(tmp_path / "ray_results")], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("ddp")
    kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("resnet_lab.role") == "trial"]
    assert len(kids) == 1
    kid = kids[0]
    assert kid.info.status == "FINISHED" and kid.data.tags["resnet_lab.outcome"] == "completed"
    assert kid.data.metrics["workers"] == 2.0  # the process group really had two ranks
    for key in ("train/loss", "val/acc", "grad/ratio_first_last", "lr"):
        assert [m.step for m in client.get_metric_history(kid.info.run_id, key)] == [1, 2], key
    assert "test/acc" in kid.data.metrics
    # Ray Train kept the checkpoint that a retried trial would resume from.
    assert list((tmp_path / "ray_results").glob("ddp-*-ddp-*/checkpoint_*"))
