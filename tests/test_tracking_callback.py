"""The MLflow callback against a real SQLite store and real Tune `Trial` objects, driven the way Tune drives it.

The end-to-end resume tests (test_reliability) hit the race below only sometimes; here it is made to happen.
"""

from __future__ import annotations

import pickle
import sqlite3
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray.tune import Checkpoint
from ray.tune.callback import CallbackList
from ray.tune.experiment import Trial

from resnet_lab.outcome import OUTCOME_KEY
from resnet_lab.spec.cells import Cell
from resnet_lab.spec.load import load_spec
from resnet_lab.tracking import GIVE_UP_ENV, SPOOL_ENV, SweepTracker, outbox
from resnet_lab.tune.callbacks import sweep_callbacks
from resnet_lab.tune.checkpoints import CheckpointPruner

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
    return {"epoch": epoch, "val/acc": acc, "train/loss": 1.0 / epoch, "gradflow/init/block/00.stem": 0.5,
            "gradflow/init/block/01.head": 1.0,
            "training_iteration": epoch, "time_total_s": 1.0 * epoch, "pid": 1234, "config/lr": 0.001}


def new_sweep(tmp_path: Path) -> tuple[str, SweepTracker, dict[str, Cell]]:
    """A sweep's parent run in a new SQLite store, and the spec's cells by label."""
    spec = tmp_path / "cb.yaml"
    spec.write_text(SPEC)
    loaded = load_spec(str(spec))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = SweepTracker(uri, "cb")
    tracker.start_sweep("cb-1", {}, {}, {})
    return uri, tracker, {c.label: c for c in loaded.cells}


def started(callbacks: list, trials: list[Trial]) -> CallbackList:
    """The callbacks as Tune drives them: one list, set up, then its first step (`trials`: what Tune holds then,
    none for a new sweep, the restored ones for a resumed sweep)."""
    driven = CallbackList(callbacks)
    driven.setup()
    driven.on_step_begin(iteration=0, trials=trials)
    return driven


def test_resume_from_a_snapshot_older_than_mlflow_records_each_epoch_once(tmp_path: Path) -> None:
    uri, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
    trial = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 0, "trainer.lr": 0.001},
                  trial_id="t0001", stub=True)

    callbacks = sweep_callbacks(tracker.ref, cells, None, None)
    pickled = pickle.dumps(callbacks)  # Tune pickles the callbacks with the run config at the start
    first = started(callbacks, [])
    runs = callbacks[1]
    first.on_trial_start(iteration=0, trials=[trial], trial=trial)
    first.on_trial_result(iteration=1, trials=[trial], trial=trial, result=result(1, 0.50))
    # Tune's last experiment snapshot is taken here: it holds `trial` (after epoch 1) and `late` (pending) ...
    first.on_trial_result(iteration=2, trials=[trial], trial=trial, result=result(2, 0.60))  # ... MLflow has more
    late = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 1, "trainer.lr": 0.002},
                 trial_id="t0002", stub=True)
    first.on_trial_start(iteration=0, trials=[trial, late], trial=late)  # pending at the snapshot, started after it
    first.on_trial_result(iteration=1, trials=[trial, late], trial=late, result=result(1, 0.40))
    ghost = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 2, "trainer.lr": 0.003},
                  trial_id="t0003", stub=True)
    first.on_trial_start(iteration=0, trials=[trial, late, ghost], trial=ghost)  # created after the snapshot
    assert tracker.flush()
    first_ids = {t: tracker.resolve(h) for t, h in runs.runs.items()}
    # SIGKILL here.

    # --resume: a new driver unpickles the callbacks as they were pickled at the start, Tune restores the trials of
    # its old snapshot, and the trial re-runs epoch 2 from its epoch-1 checkpoint, then goes on.
    resumed = pickle.loads(pickled)
    second = started(resumed, [trial, late])
    second.on_trial_start(iteration=0, trials=[trial], trial=trial)
    for epoch, acc in [(2, 0.61), (3, 0.70), (4, 0.75)]:
        second.on_trial_result(iteration=epoch, trials=[trial], trial=trial, result=result(epoch, acc))
    second.on_trial_start(iteration=0, trials=[trial, late], trial=late)
    second.on_trial_result(iteration=1, trials=[trial, late], trial=late, result=result(1, 0.41))
    second.on_trial_result(iteration=2, trials=[trial, late], trial=late, result=result(2, 0.45))
    assert tracker.flush()  # writes are queued (write-behind): a reader beside the driver waits for them
    second_ids = {t: tracker.resolve(h) for t, h in resumed[1].runs.items()}
    assert second_ids == {t: first_ids[t] for t in ("t0001", "t0002")}  # found in MLflow and re-attached

    client = MlflowClient(uri)
    run_id = second_ids[trial.trial_id]
    history = client.get_metric_history(run_id, "val/acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.75}  # the first record stands
    assert sorted(m.step for m in client.get_metric_history(second_ids[late.trial_id], "val/acc")) == [1, 2]
    assert len(client.search_runs([tracker.experiment_id], "tags.resnet_lab.role = 'trial'")) == 2
    discarded = client.get_run(first_ids[ghost.trial_id])  # soft-deleted: out of searches, restorable, reason kept
    assert discarded.info.lifecycle_stage == "deleted" and discarded.info.status == "KILLED"
    assert "last state snapshot" in discarded.data.tags["resnet_lab.discarded"]
    assert client.get_run(run_id).info.status == "RUNNING"  # re-opened for the epochs it trains now
    logged = client.get_run(run_id).data.metrics
    assert "time_total_s" not in logged and "pid" not in logged and "config/lr" not in logged


def test_a_trial_without_history_in_mlflow_logs_every_epoch(tmp_path: Path) -> None:
    uri, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
    callbacks = sweep_callbacks(tracker.ref, cells, None, None)
    trials = [Trial("train_trial", config={"cell": cell, "stage": "search", "seed": s, "trainer.lr": 0.001},
                    trial_id=f"t{s}", stub=True) for s in range(2)]
    driven = started(callbacks, [])
    for epoch in (1, 2, 3):
        for trial in trials:
            driven.on_trial_result(iteration=epoch, trials=trials, trial=trial, result=result(epoch, 0.1 * epoch))
    assert tracker.flush()
    client = MlflowClient(uri)
    for trial in trials:
        run_id = tracker.resolve(callbacks[1].runs[trial.trial_id])
        assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == [1, 2, 3]


def test_each_run_is_tagged_with_the_outcome_its_trainer_reported(tmp_path: Path) -> None:
    uri, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
    callbacks = sweep_callbacks(tracker.ref, cells, None, (3, "val/acc", "max"))
    trials = [Trial("train_trial", config={"cell": cell, "stage": "search", "seed": s, "trainer.lr": 0.001},
                    trial_id=f"t{s}", stub=True) for s in range(3)]
    driven = started(callbacks, [])
    # t0 trains out, t1 diverges at epoch 2, t2 is stopped from outside (no outcome in its last result).
    ends = {"t0": (4, {"test/acc": 0.3, "diverged": 0.0, OUTCOME_KEY: "completed"}),
            "t1": (2, {"test/acc": 0.1, "diverged": 1.0, OUTCOME_KEY: "diverged"}), "t2": (3, {})}
    for trial in trials:
        last, final = ends[trial.trial_id]
        for epoch in range(1, last + 1):
            reported = {**result(epoch, 0.1 * epoch), **(final if epoch == last else {})}
            trial.update_last_result(reported)  # as Tune does before it calls the callbacks
            driven.on_trial_result(iteration=epoch, trials=trials, trial=trial, result=reported)
        driven.on_trial_complete(iteration=last, trials=trials, trial=trial)
    driven.on_experiment_end(trials=trials)
    assert tracker.flush()
    client = MlflowClient(uri)
    runs = {t.trial_id: client.get_run(tracker.resolve(callbacks[1].runs[t.trial_id])) for t in trials}
    assert {t: (r.info.status, r.data.tags["resnet_lab.outcome"]) for t, r in runs.items()} == {
        "t0": ("FINISHED", "completed"), "t1": ("FINISHED", "diverged"), "t2": ("KILLED", "stopped")}
    assert runs["t2"].data.tags["stopped_by"] == "tune"
    view = callbacks[2].view  # the live view counts the same outcomes
    assert view.outcomes == {"completed": 1, "diverged": 1, "stopped": 1} and view.done == 3
    assert list(client.list_artifacts(runs["t0"].info.run_id)) == []  # no per-trial figures: MLflow charts the metrics


def test_a_resumed_sweeps_live_view_starts_at_the_trials_that_had_ended(tmp_path: Path) -> None:
    _, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
    trials = [Trial("train_trial", config={"cell": cell, "stage": "search", "seed": s, "trainer.lr": 0.001},
                    trial_id=f"t{s}", stub=True) for s in range(3)]
    trials[0].set_status(Trial.TERMINATED)
    trials[1].set_status(Trial.ERROR)  # t2 is still PENDING
    callbacks = pickle.loads(pickle.dumps(sweep_callbacks(tracker.ref, cells, None, (5, "val/acc", "max"))))
    started(callbacks, trials)
    assert callbacks[2].view.done == 2 and callbacks[2].view.total == 5


def test_tune_saving_its_state_stores_the_queued_writes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outbox, "LINGER_S", 3600.0)  # left alone, a write would wait an hour for company
    uri, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
    callbacks = started(sweep_callbacks(tracker.ref, cells, None, None), [])
    trial = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 0, "trainer.lr": 0.001},
                  trial_id="t0001", stub=True)
    callbacks.on_trial_start(iteration=1, trials=[trial], trial=trial)
    callbacks.on_trial_result(iteration=1, trials=[trial], trial=trial, result=result(1, 0.5))
    assert tracker.outbox.pending() == 2  # the run's create and its epoch, lingering
    # What TuneController.save_to_dir does after taking the trials' state and before uploading it.
    assert callbacks.get_state() is None  # no state of its own: Tune writes no callback file
    assert tracker.outbox.pending() == 0
    client = MlflowClient(uri)  # read directly: a tracker's read would flush the queue itself
    (run,) = client.search_runs([tracker.experiment_id], filter_string="tags.resnet_lab.trial_id = 't0001'")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1]


def test_checkpoint_pruner_deletes_only_what_a_snapshot_taken_long_enough_ago_has_moved_past(tmp_path: Path) -> None:
    def checkpoint(i: int) -> Checkpoint:
        path = tmp_path / "trial" / f"checkpoint_{i:06d}"
        path.mkdir(parents=True)
        (path / "state.pt").write_bytes(b"x" * 100)
        return Checkpoint.from_directory(str(path))

    # No sleeps: prune(now) is given the times at which the rule must and must not delete (monotonic clock).
    safe_s = 60.0
    trial = Trial("train_trial", config={}, trial_id="t0001", stub=True)
    pruner = pickle.loads(pickle.dumps(CheckpointPruner(safe_after_s=safe_s)))  # as Tune hands it back
    c1, c2, c3 = checkpoint(1), checkpoint(2), checkpoint(3)
    pruner.on_checkpoint(1, [trial], trial, c1)
    pruner.on_checkpoint(2, [trial], trial, c2)
    pruner.prune(time.monotonic() + 10 * safe_s)
    assert pruner.deleted == 0  # no snapshot yet: the saved state may still point at c1, however long ago
    assert pruner.get_state() is None  # a snapshot starts: it points at c2, so c1 is superseded from now on
    first_snapshot = time.monotonic()  # c1 was superseded at or before this
    pruner.on_checkpoint(3, [trial], trial, c3)
    pruner.prune(first_snapshot + safe_s - 1.0)
    assert Path(c1.path).exists()  # too soon: that snapshot may not have reached storage
    second_snapshot = time.monotonic()  # c2 is superseded at or after this
    pruner.get_state()  # a second snapshot: it points at c3, so c2 is superseded from now on
    pruner.prune(first_snapshot + safe_s)  # safe_s after the first snapshot, less than that after the second
    assert not Path(c1.path).exists() and Path(c2.path).exists() and Path(c3.path).exists()
    pruner.prune(second_snapshot + safe_s - 1.0)
    assert Path(c2.path).exists()
    pruner.prune(time.monotonic() + safe_s)
    assert not Path(c2.path).exists() and Path(c3.path).exists()  # the newest always stays
    assert pruner.deleted == 2


def test_orphan_check_with_the_store_given_up_leaves_the_stop_to_the_outbox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The store stops answering at the first step: the orphan check says so and returns instead of raising out of
    Tune's loop (the writes that follow go through the outbox, which rides out or gives up on the outage)."""
    monkeypatch.setenv(SPOOL_ENV, str(tmp_path / "spool"))
    monkeypatch.setenv(GIVE_UP_ENV, "1")
    _, tracker, cells = new_sweep(tmp_path)
    callbacks = sweep_callbacks(tracker.ref, cells, None, None)
    lock = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, timeout=30)
    lock.execute("BEGIN EXCLUSIVE")  # every other connection now fails with 'database is locked'
    try:
        started(callbacks, [])
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert callbacks[0].checked
    assert "could not look for runs of trials lost with an earlier driver" in caplog.text
    assert "did not answer for 1 s" in caplog.text
