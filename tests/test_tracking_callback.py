"""The MLflow callback against a real SQLite store and real Tune `Trial` objects, driven the way Tune drives it.

The end-to-end resume tests (test_reliability) hit the race below only sometimes; here it is made to happen.
"""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from ray.tune import Checkpoint
from ray.tune.experiment import Trial

from resnet_lab.outcome import OUTCOME_KEY
from resnet_lab.spec.load import load_spec
from resnet_lab.spec.sweep import Cell
from resnet_lab.tracking import SweepTracker
from resnet_lab.tune import callbacks, figures
from resnet_lab.tune.callbacks import TrackingCallback
from resnet_lab.tune.checkpoints import CheckpointPruner
from resnet_lab.tune.figures import FigureRenderer, wait_for_spare_cpu

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


def test_resume_from_a_snapshot_older_than_mlflow_records_each_epoch_once(tmp_path: Path) -> None:
    uri, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
    trial = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 0, "trainer.lr": 0.001},
                  trial_id="t0001", stub=True)

    first = TrackingCallback(tracker, cells, None)
    pickled = pickle.dumps(first)  # Tune pickles the callbacks with the run config at the start
    first.on_trial_start(0, [trial], trial)
    first.on_trial_result(1, [trial], trial, result(1, 0.50))
    snapshot = first.get_state()  # Tune's last experiment snapshot: taken after epoch 1 ...
    snapshot = pickle.loads(pickle.dumps(snapshot))
    first.on_trial_result(2, [trial], trial, result(2, 0.60))  # ... but MLflow also got epoch 2
    late = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 1, "trainer.lr": 0.002},
                 trial_id="t0002", stub=True)
    first.on_trial_start(0, [trial, late], late)  # pending at the snapshot, started after it
    first.on_trial_result(1, [trial, late], late, result(1, 0.40))
    ghost = Trial("train_trial", config={"cell": cell, "stage": "search", "seed": 2, "trainer.lr": 0.003},
                  trial_id="t0003", stub=True)
    first.on_trial_start(0, [trial, late, ghost], ghost)  # created after the snapshot: Tune will not know it
    ghost_run = first.runs[ghost.trial_id]
    # SIGKILL here.

    # --resume: a new driver unpickles the callback, restores the old snapshot, and the trial re-runs epoch 2
    # from its epoch-1 checkpoint, then goes on.
    second = pickle.loads(pickled)
    second.set_state(snapshot)
    second.on_step_begin(0, [trial, late])  # the trials Tune restored
    second.on_trial_start(0, [trial], trial)
    for epoch, acc in [(2, 0.61), (3, 0.70), (4, 0.75)]:
        second.on_trial_result(epoch, [trial], trial, result(epoch, acc))
    second.on_trial_start(0, [trial, late], late)
    second.on_trial_result(1, [trial, late], late, result(1, 0.41))
    second.on_trial_result(2, [trial, late], late, result(2, 0.45))
    assert second.runs[late.trial_id] == first.runs[late.trial_id]  # found in MLflow and re-attached
    assert [h["epoch"] for h in second.history[trial.trial_id]] == [1, 2, 3, 4]  # the figure's curve: once each
    assert second.history[trial.trial_id][1]["val/acc"] == 0.61  # the curve follows the training that went on

    client = MlflowClient(uri)
    run_id = second.runs[trial.trial_id]
    assert run_id == first.runs[trial.trial_id]  # re-attached, not a second run
    history = client.get_metric_history(run_id, "val/acc")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert {m.step: m.value for m in history} == {1: 0.50, 2: 0.60, 3: 0.70, 4: 0.75}  # the first record stands
    assert sorted(m.step for m in client.get_metric_history(second.runs[late.trial_id], "val/acc")) == [1, 2]
    assert len(client.search_runs([tracker.experiment_id], "tags.resnet_lab.role = 'trial'")) == 2
    discarded = client.get_run(ghost_run)  # soft-deleted: out of searches and the UI, restorable, reason kept
    assert discarded.info.lifecycle_stage == "deleted" and discarded.info.status == "KILLED"
    assert "last state snapshot" in discarded.data.tags["resnet_lab.discarded"]
    logged = client.get_run(run_id).data.metrics
    assert "time_total_s" not in logged and "pid" not in logged and "config/lr" not in logged


def test_a_trial_without_history_in_mlflow_logs_every_epoch(tmp_path: Path) -> None:
    uri, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
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


def test_figure_renderer_draws_pngs_in_a_low_priority_process_and_survives_its_death(tmp_path: Path) -> None:
    history = [{"epoch": e, "train/loss": 1.0 / e, "val/loss": 1.1 / e, "train/acc": 0.1 * e, "val/acc": 0.09 * e}
               for e in (1, 2, 3)]
    grads = {"gradflow/init/block/00.stem": 0.5, "gradflow/init/block/01.layer1.0": 0.05,
             "gradflow/final/block/00.stem": 0.2, "gradflow/final/block/01.layer1.0": 0.1,
             "gradflow/final/first_last": 2.0}
    renderer = FigureRenderer()
    try:
        files = renderer.render(str(tmp_path), "trial-a", history, grads)
        assert [Path(f).name for f in files] == ["learning_curves.png", "gradient_flow.png"]
        for f in files:
            with Image.open(f) as image:
                assert image.format == "PNG" and image.width > 300
        proc = renderer._proc
        assert proc is not None and os.getpriority(os.PRIO_PROCESS, proc.pid) == 19
        assert os.sched_getscheduler(proc.pid) == os.SCHED_IDLE  # below Ray's workers (nice 15), not beside them
        with pytest.raises(RuntimeError, match="KeyError"):  # a bad job is an error, and the renderer goes on
            renderer.render(str(tmp_path / "x"), "trial-b", [{"no epoch": 1.0}], {})
        proc.kill()
        proc.wait()
        (tmp_path / "again").mkdir()
        files = renderer.render(str(tmp_path / "again"), "trial-c", history, {})  # a new renderer is started
        assert [Path(f).name for f in files] == ["learning_curves.png"] and Path(files[0]).stat().st_size > 1000
    finally:
        renderer.close()
    assert renderer._proc is None


def test_waiting_for_a_spare_core_ends_when_one_is_idle_or_when_told_to_stop() -> None:
    stop = threading.Event()
    start = time.perf_counter()
    wait_for_spare_cpu(stop, poll_s=0.2, cores=0.0)  # any machine has >= 0 idle cores: one poll
    assert time.perf_counter() - start < 2
    start = time.perf_counter()
    threading.Timer(1.0, stop.set).start()
    wait_for_spare_cpu(stop, poll_s=0.2, cores=(os.cpu_count() or 1) + 1)  # more than the machine has: until stop
    assert 0.9 < time.perf_counter() - start < 5


def test_trial_figures_wait_for_a_spare_core_and_are_all_drawn_when_the_sweep_ends(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(figures, "SPARE_CORES", 1e6)  # a machine whose cores are always busy with trials
    waiting = threading.Event()  # set once the figure thread is inside the real wait for a spare core

    def wait_for_spare_cpu_and_say_so(stop: threading.Event, *args: object, **kwargs: object) -> None:
        waiting.set()
        wait_for_spare_cpu(stop, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(callbacks, "wait_for_spare_cpu", wait_for_spare_cpu_and_say_so)
    uri, tracker, cells = new_sweep(tmp_path)
    (cell,) = cells
    callback = TrackingCallback(tracker, cells, None)
    trials = [Trial("train_trial", config={"cell": cell, "stage": "search", "seed": s, "trainer.lr": 0.001},
                    trial_id=f"t{s}", stub=True) for s in range(3)]
    for trial in trials:
        for epoch in (1, 2, 3, 4):
            reported = {**result(epoch, 0.1 * epoch), **({"test/acc": 0.3, OUTCOME_KEY: "completed"} if epoch == 4
                                                           else {})}
            trial.update_last_result(reported)  # as Tune does before it calls the callbacks
            callback.on_trial_result(epoch, trials, trial, reported)
        callback.on_trial_complete(4, trials, trial)
        assert callback.outcomes[trial.trial_id] == "completed"  # the trainer's word, read off the last result
    client = MlflowClient(uri)
    run_ids = [callback.runs[t.trial_id] for t in trials]
    assert waiting.wait(timeout=60), "the figure thread never started waiting for a spare core"
    assert all(client.get_run(r).info.status == "FINISHED" for r in run_ids)  # the record does not wait
    # The figures do: their thread is in a wait no machine can end (1e6 idle cores) until the sweep ends.
    assert [client.list_artifacts(r) for r in run_ids] == [[], [], []]
    callback.on_experiment_end(trials)
    for r in run_ids:
        assert sorted(a.path for a in client.list_artifacts(r)) == ["gradient_flow.png", "learning_curves.png"]


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
