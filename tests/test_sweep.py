"""End to end: `python sweep.py SPEC` with a real local Ray, real Optuna and a real MLflow SQLite store."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from resnet_lab.tracking import TAG_CELL, TAG_OUTCOME, TAG_RUNG, TAG_STOPPED_BY

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")

SPEC = """
name: e2e
experiment: e2e
dataset: {name: fashion_mnist, subset: 400, val_fraction: 0.25, root: DATA_ROOT}
model: {name: resnet, width: 0.125}
trainer: {epochs: 3, batch_size: 50, threads: 1}
grid:
  depth: [8]
  skip: [true, false]
search:
  lr: {type: loguniform, low: 1.0e-5, high: 1.0e-1}
samples_per_cell: 6
seeds: [0]
scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
max_concurrent: 2
"""

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not DEBIAN_FASHION.exists(), reason="needs apt-get install dataset-fashion-mnist")]


def run_sweep(tmp: Path, name: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], str]:
    spec = tmp / f"{name}.yaml"
    spec.write_text(SPEC.replace("DATA_ROOT", str(tmp / "data")).replace("name: e2e", f"name: {name}"))
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", uri,
                           "--storage", str(tmp / "ray_results"), *extra], capture_output=True, text=True, cwd=tmp,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, uri


def children(uri: str, run_name: str) -> tuple[list, list]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("resnet_lab.role") == "sweep"
               and r.data.tags.get("resnet_lab.sweep", "").startswith(run_name)]
    assert len(parents) == 1
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents, kids


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("sweep")
    first, uri = run_sweep(tmp, "e2e")
    # The second sweep only re-draws the seeded start-up proposals (the first 2 per cell): 4 one-epoch trials.
    second, _ = run_sweep(tmp, "e2e_again", "--set", "samples_per_cell=2", "--set", "trainer.epochs=1")
    return {"tmp": tmp, "uri": uri, "first": first, "second": second}


def test_one_parent_with_one_child_per_trial_and_nothing_running(two_sweeps: dict) -> None:
    parents, kids = children(two_sweeps["uri"], "e2e-")
    assert len(kids) == 12
    assert parents[0].info.status == "FINISHED"
    assert all(k.info.status in ("FINISHED", "KILLED") for k in kids)
    assert parents[0].data.params["git_commit"] and "version.torch" in parents[0].data.params
    client = MlflowClient(two_sweeps["uri"])
    assert "spec.yaml" in [a.path for a in client.list_artifacts(parents[0].info.run_id)]


def test_every_epoch_is_logged_with_its_step(two_sweeps: dict) -> None:
    _, kids = children(two_sweeps["uri"], "e2e-")
    client = MlflowClient(two_sweeps["uri"])
    for kid in kids:
        history = client.get_metric_history(kid.info.run_id, "val/acc")
        steps = sorted(m.step for m in history)
        assert steps == list(range(1, len(steps) + 1)) and steps, kid.info.run_name
        if kid.data.tags[TAG_OUTCOME] == "completed":
            assert len(steps) == 3 and "test/acc" in kid.data.metrics
        for key in ("train/loss", "val/loss", "lr", "train_time_s", "eval_time_s", "throughput_img_s"):
            assert len(client.get_metric_history(kid.info.run_id, key)) == len(steps), key
        # gradient flow: at initialisation and after epoch 1 (logged with epoch 1), on the tested weights at the end
        for phase in ("init", "epoch1"):
            assert [m.step for m in client.get_metric_history(kid.info.run_id, f"gradflow/{phase}/first_last")] == [1]
        if kid.data.tags[TAG_OUTCOME] == "completed":
            assert "gradflow/final/first_last" in kid.data.metrics


def test_tune_writes_json_and_csv_results_but_no_tensorboard_files(two_sweeps: dict) -> None:
    storage = two_sweeps["tmp"] / "ray_results"
    trial_dirs = [d for d in storage.glob("e2e-*/*") if d.is_dir() and (d / "params.json").exists()]
    assert len(trial_dirs) == 12
    for d in trial_dirs:
        epochs = [line for line in (d / "result.json").read_text().splitlines() if line.strip()]
        assert epochs and len((d / "progress.csv").read_text().splitlines()) == len(epochs) + 1  # header + rows
    assert not list(storage.rglob("events.out.tfevents*"))  # the driver runs no TensorBoardX writer


def test_asha_stops_trials_within_each_cell_and_every_cell_finishes_some(two_sweeps: dict) -> None:
    _, kids = children(two_sweeps["uri"], "e2e-")
    by_cell: dict[str, list] = defaultdict(list)
    for kid in kids:
        by_cell[kid.data.tags[TAG_CELL]].append(kid)
    assert set(by_cell) == {"resnet8-w0.125", "resnet8-w0.125-noskip"}
    stopped = [k for k in kids if k.data.tags.get(TAG_STOPPED_BY) == "asha"]
    assert stopped, "ASHA stopped no trial"
    for kid in stopped:
        assert kid.info.status == "KILLED" and int(kid.data.tags[TAG_RUNG]) in (1, 2)
        assert len(MlflowClient(two_sweeps["uri"]).get_metric_history(kid.info.run_id, "val/acc")) == int(
            kid.data.tags[TAG_RUNG])
    for cell, runs in by_cell.items():
        assert len(runs) == 6
        assert any(r.data.tags[TAG_OUTCOME] == "completed" for r in runs), cell


def test_runs_have_readable_names_and_comparable_params(two_sweeps: dict) -> None:
    _, kids = children(two_sweeps["uri"], "e2e-")
    for kid in kids:
        params = kid.data.params
        assert kid.info.run_name == f"{params['cell']}-lr{float(params['lr']):.1e}-s0"
        assert params["arch"] in ("resnet8-w0.125", "resnet8-w0.125-noskip")
        assert params["depth"] == "8" and params["skip"] in ("True", "False") and params["seed"] == "0"
        assert params["trainer.optimizer"] == "adam" and params["dataset.name"] == "fashion_mnist"


def test_same_spec_and_seeds_propose_the_same_learning_rates(two_sweeps: dict) -> None:
    def lrs(name: str) -> dict[str, list[str]]:
        """Each cell's proposals in the order the searcher made them (Tune starts trials in that order)."""
        _, kids = children(two_sweeps["uri"], name)
        kids.sort(key=lambda k: k.info.start_time)
        out: dict[str, list[str]] = defaultdict(list)
        for kid in kids:
            out[kid.data.tags[TAG_CELL]].append(kid.data.params["lr"])
        return out

    first, second = lrs("e2e-"), lrs("e2e_again-")
    # 6 configurations per cell: 2 seeded random start-up draws, then TPE, whose proposals depend on the order
    # results arrive in (README: "Cells are independent").
    assert {c: v[:2] for c, v in first.items()} == {c: v[:2] for c, v in second.items()}
    assert len(set(first["resnet8-w0.125"])) == 6  # six distinct proposals per cell
    # Each cell has its own study, all seeded alike (common random numbers): the skip and no-skip cells start from
    # the same learning rates, so the start-up draws are not a difference between the arms.
    assert first["resnet8-w0.125"][:2] == first["resnet8-w0.125-noskip"][:2]


def test_console_prints_progress_and_the_ui_command(two_sweeps: dict) -> None:
    out = two_sweeps["first"].stdout
    assert "[12/12]" in out and "done in" in out
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri sqlite:///" in out
    assert "#/experiments/" in out
    assert "Traceback" not in two_sweeps["first"].stderr
