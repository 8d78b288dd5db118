"""The MLflow callback against a real SQLite store and real Tune `Trial` objects, driven the way Tune drives it.

The end-to-end resume tests (test_reliability) hit the race below only sometimes; here it is made to happen.
"""

from __future__ import annotations

import pickle
from pathlib import Path

from mlflow.tracking import MlflowClient
from ray.tune.experiment import Trial

from resnet_lab.spec.load import load_spec
from resnet_lab.tracking import SweepTracker
from resnet_lab.tune.callbacks import TrackingCallback

SPEC = """
name: cb
experiment: cb
dataset: {name: synthetic, subset: 64}
model: {name: baseline_cnn}
trainer: {epochs: 4, batch_size: 32}
search:
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
samples_per_cell: 1
"""


def result(epoch: int, acc: float) -> dict:
    # What a trial reports (trainer metrics) plus keys Ray adds, which must not reach MLflow.
    return {"epoch": epoch, "val/acc": acc, "train/loss": 1.0 / epoch, "grad/ratio_first_last": 0.5,
            "training_iteration": epoch, "time_total_s": 1.0 * epoch, "pid": 1234, "config/lr": 0.001}


def test_resume_from_a_snapshot_older_than_mlflow_records_each_epoch_once(tmp_path: Path) -> None:
    spec = tmp_path / "cb.yaml"
    spec.write_text(SPEC)
    loaded = load_spec(str(spec))
    cells = {c.label: c for c in loaded.cells}
    (cell,) = cells
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "cb")
    tracker.start_sweep("cb-1", {}, {}, {})
    trial = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 0, "trainer.lr": 0.001},
                  trial_id="t0001", stub=True)

    first = TrackingCallback(tracker, cells, None)
    pickled = pickle.dumps(first)  # Tune pickles the callbacks with the run config at the start
    first.on_trial_start(0, [trial], trial)
    first.on_trial_result(1, [trial], trial, result(1, 0.50))
    snapshot = first.get_state()  # Tune's last experiment snapshot: taken after epoch 1 ...
    snapshot = pickle.loads(pickle.dumps(snapshot))
    first.on_trial_result(2, [trial], trial, result(2, 0.60))  # ... but MLflow also got epoch 2; then Ctrl-C

    # --resume: a new driver unpickles the callback, restores the old snapshot, and the trial re-runs epoch 2
    # from its epoch-1 checkpoint, then goes on.
    second = pickle.loads(pickled)
    second.set_state(snapshot)
    second.on_trial_start(0, [trial], trial)
    for epoch, acc in [(2, 0.61), (3, 0.70), (4, 0.75)]:
        second.on_trial_result(epoch, [trial], trial, result(epoch, acc))
    assert [h["epoch"] for h in second.history[trial.trial_id]] == [1, 2, 3, 4]  # the figure's curve: once each
    assert second.history[trial.trial_id][1]["val/acc"] == 0.61  # the curve follows the training that went on

    client = MlflowClient(uri)
    run_id = second.runs[trial.trial_id]
    assert run_id == first.runs[trial.trial_id]  # re-attached, not a second run
    history = client.get_metric_history(run_id, "val/acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.75}  # the first record stands
    logged = client.get_run(run_id).data.metrics
    assert "time_total_s" not in logged and "pid" not in logged and "config/lr" not in logged


def test_a_trial_without_history_in_mlflow_logs_every_epoch(tmp_path: Path) -> None:
    spec = tmp_path / "cb.yaml"
    spec.write_text(SPEC)
    loaded = load_spec(str(spec))
    cells = {c.label: c for c in loaded.cells}
    (cell,) = cells
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "cb")
    tracker.start_sweep("cb-1", {}, {}, {})
    callback = TrackingCallback(tracker, cells, None)
    trials = [Trial("train_trial", config={"cell": cell, "stage": "search", "seed": s, "trainer.lr": 0.001},
                    trial_id=f"t{s}", stub=True) for s in range(2)]
    for epoch in (1, 2, 3):
        for trial in trials:
            callback.on_trial_result(epoch, trials, trial, result(epoch, 0.1 * epoch))
    client = MlflowClient(uri)
    for trial in trials:
        steps = [m.step for m in client.get_metric_history(callback.runs[trial.trial_id], "train/loss")]
        assert sorted(steps) == [1, 2, 3]
