"""Nothing a user does or a machine suffers loses results or corrupts the MLflow record.

Each test kills real processes it started (the sweep driver, a trial's worker) and asserts on the MLflow store and
Ray's results afterwards. Nothing waits by sleeping: each wait is for the condition the next step needs (a line
from the driver, an epoch in MLflow, a checkpoint in Tune's saved state), with a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from procs import Watched, cmdline, descendants, kill_all, wait_until
from ray import tune

from resnet_lab.tune.trainable import train_trial

ROOT = Path(__file__).resolve().parent.parent

SPEC = """
name: NAME
experiment: reliability
dataset: {name: synthetic, synthetic: {train_size: TRAIN_SIZE, test_size: 64, image_size: 16}}
model: {name: resnet, depth: 8, width: 0.125}
trainer: {epochs: EPOCHS, batch_size: 64, threads: 1}
grid:
  skip: [true, false]
search:
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
samples_per_cell: SAMPLES
max_concurrent: 2
max_failures: 2
# every epoch: these tests resume from mid-trial checkpoints ("auto" saves sub-second epochs at the last only)
checkpoint_every: EVERY
"""

pytestmark = pytest.mark.slow
TAG_RESUMED = "resumed_from_epoch"


def write_spec(tmp: Path, name: str, epochs: int = 5, samples: int = 3, extra: str = "",
               train_size: int = 1024, checkpoint_every: int = 1) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SPEC.replace("NAME", name).replace("EPOCHS", str(epochs)).replace("SAMPLES", str(samples))
                    .replace("TRAIN_SIZE", str(train_size)).replace("EVERY", str(checkpoint_every)) + extra)
    return path


def sweep_cmd(tmp: Path, spec: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--storage", str(tmp / "ray_results"), *extra]


def start(tmp: Path, cmd: list[str]) -> Watched:
    """The driver, its stdout and stderr read by threads (tests/procs.py): waits time out, pipes never fill."""
    return Watched(cmd, tmp)


def runs(tmp: Path, sweep_prefix: str) -> tuple[list, list]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("reliability")
    every = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in every if r.data.tags.get("resnet_lab.role") == "sweep"
               and r.data.tags["resnet_lab.sweep"].startswith(sweep_prefix + "-")]
    ids = {p.info.run_id for p in parents}
    return parents, [r for r in every if r.data.tags.get("mlflow.parentRunId") in ids]


def steps(tmp: Path, run_id: str, key: str = "val/acc") -> list[int]:
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def assert_complete_record(tmp: Path, name: str, planned: int, epochs: int) -> list:
    """One parent, exactly one FINISHED child per trial, every epoch logged exactly once."""
    parents, kids = runs(tmp, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(kids) == planned, [k.info.run_name for k in kids]
    assert Counter(k.data.tags["resnet_lab.trial_id"] for k in kids).most_common(1)[0][1] == 1
    for kid in kids:
        assert kid.info.status == "FINISHED", (kid.info.run_name, kid.info.status)
        assert steps(tmp, kid.info.run_id) == list(range(1, epochs + 1)), kid.info.run_name  # no epoch twice
    lrs = [(k.data.tags["resnet_lab.cell"], k.data.params["lr"]) for k in kids]
    assert len(set(lrs)) == planned  # the searcher's history survived: no configuration proposed twice
    return kids


def trial_runs(tmp: Path, name: str) -> dict[str, Any]:
    """The sweep's child runs by Tune trial id."""
    return {k.data.tags["resnet_lab.trial_id"]: k for k in runs(tmp, name)[1]}


def snapshot_checkpoints(storage: Path, name: str) -> dict[str, int]:
    """Trials still running in Tune's newest saved experiment state (what --resume restores), with the epoch of
    the checkpoint it holds for each: {trial id: epoch}. Read with Tune's own classes."""
    from ray.tune.experiment.trial import Trial, _TrainingRunMetadata

    states = sorted(storage.glob(f"{name}-*/experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    out: dict[str, int] = {}
    for trial_json, metadata_json in json.loads(states[-1].read_text())["trial_data"]:
        trial = Trial.from_json_state(trial_json, stub=True)
        latest = _TrainingRunMetadata.from_json_state(metadata_json).checkpoint_manager.latest_checkpoint_result
        if trial.status != Trial.TERMINATED and latest is not None:
            out[trial.trial_id] = int(latest.metrics["epoch"])
    return out


def running_trial_with_an_epoch(tmp: Path, name: str) -> bool:
    """Whether a trial started after the first two (which have ended: their end may still be on its way to MLflow)
    is running and has logged (and so checkpointed) at least one epoch."""
    later = sorted(runs(tmp, name)[1], key=lambda k: k.info.start_time)[2:]
    return any(len(steps(tmp, k.info.run_id)) >= 1 for k in later if k.info.status == "RUNNING")


def interrupt_after_first_trials(tmp: Path, spec: Path, sig: signal.Signals,
                                 mid_trial: bool = False) -> tuple[int, str, str]:
    """Start the sweep, send `sig` once two trials have ended (and, with `mid_trial`, once a running trial has a
    checkpoint: at "[2/" the next trials have often just started, and a resume would then test nothing)."""
    driver = start(tmp, sweep_cmd(tmp, spec))
    driver.wait_for_line("[2/", timeout_s=300)  # two trials have ended
    if mid_trial:
        wait_until(lambda: running_trial_with_an_epoch(tmp, spec.stem), 300, "a running trial's first epoch",
                   retry_on=(MlflowException,))
    driver.proc.send_signal(sig)
    return driver.finish(timeout_s=180)


def assert_resumed_from_checkpoints(after: dict[str, Any], saved: dict[str, int], epochs: int) -> None:
    """Each trial that Tune's saved state (what --resume read) held mid-way with a checkpoint continued from it,
    not from scratch: its run carries `resumed_from_epoch` >= that checkpoint's epoch (a retry may move it on),
    and < `epochs`. A trial whose saved checkpoint is its last epoch (stopped between its last report and Tune
    marking it done) has nothing left to train and reports nothing: the complete record checks it."""
    mid_way = {trial_id: epoch for trial_id, epoch in saved.items() if epoch < epochs}
    assert mid_way, f"no unfinished trial held a mid-way checkpoint when the sweep was stopped ({saved}): the " \
                    "test proves nothing"
    for trial_id, epoch in mid_way.items():
        tags = after[trial_id].data.tags
        assert TAG_RESUMED in tags, f"{trial_id} restarted from scratch (no {TAG_RESUMED} tag; checkpoint: {epoch})"
        assert epoch <= int(tags[TAG_RESUMED]) < epochs, (trial_id, tags[TAG_RESUMED], epoch)


@pytest.mark.timeout(1500)
def test_ctrl_c_stops_cleanly_and_resume_finishes_the_same_sweep(tmp_path: Path) -> None:
    # 4x the images per epoch: a trial lasts a few seconds, not under two, so the Ctrl-C sent once a running trial
    # has an epoch in MLflow still finds it running (it once ended first, and the saved state held no checkpoint).
    spec = write_spec(tmp_path, "sigint", train_size=4096)
    rc, out, err = interrupt_after_first_trials(tmp_path, spec, signal.SIGINT, mid_trial=True)
    assert rc == 130, out + err
    assert "continue with:" in out and "--resume" in out and "Traceback" not in err
    parents, kids = runs(tmp_path, "sigint")
    assert parents[0].info.status == "KILLED" and parents[0].data.tags["interrupted"] == "true"
    assert all(k.info.status != "RUNNING" for k in kids)  # nothing left RUNNING after Ctrl-C
    finished = {k.data.tags["resnet_lab.trial_id"]: k for k in kids if k.info.status == "FINISHED"}
    assert len(finished) >= 2
    saved = snapshot_checkpoints(tmp_path / "ray_results", "sigint")  # Ctrl-C saves the state before exiting

    resumed = subprocess.run(sweep_cmd(tmp_path, spec, "--resume"), cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_complete_record(tmp_path, "sigint", planned=6, epochs=5)
    after = trial_runs(tmp_path, "sigint")
    # Finished trials were not re-run: the same run, its end time untouched to the millisecond, never resumed.
    for trial_id, before in finished.items():
        again = after[trial_id]
        assert again.info.run_id == before.info.run_id
        assert again.info.end_time == before.info.end_time, trial_id
        assert TAG_RESUMED not in again.data.tags
    assert_resumed_from_checkpoints(after, saved, epochs=5)


# soak: test_storage_resume's S3 test in the default run kills the driver and resumes the same way (from a bucket);
# the Ctrl-C test covers resume from a local path
@pytest.mark.soak
@pytest.mark.timeout(1500)
def test_sigkill_of_the_driver_then_resume_reattaches_runs(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "sigkill")
    # Tune saves its experiment state at most every 10 s by default, longer than these 5-epoch trials: in CI every
    # trial once ended between two saves and no saved state ever held a running trial. Save every second instead.
    driver = Watched(sweep_cmd(tmp_path, spec), tmp_path, env={**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"})
    driver.wait_for_line("[2/", timeout_s=300)
    # Kill only once Tune's saved state (what --resume reads) holds a mid-way checkpoint of a trial still training.
    wait_until(lambda: any(epoch < 5 for epoch in snapshot_checkpoints(tmp_path / "ray_results", "sigkill").values()),
               180, "a saved experiment state with a mid-way checkpoint of a running trial",
               retry_on=(OSError, ValueError, KeyError))
    orphans = descendants(driver.pid)  # local Ray's GCS, raylet and workers, which outlive a SIGKILLed driver
    driver.proc.kill()
    driver.proc.wait(timeout=60)
    kill_all(orphans)
    driver.finish(timeout_s=60)
    saved = snapshot_checkpoints(tmp_path / "ray_results", "sigkill")  # the state --resume will read
    _, kids = runs(tmp_path, "sigkill")
    assert any(k.info.status == "RUNNING" for k in kids)  # what a SIGKILL leaves behind
    finished = {k.data.tags["resnet_lab.trial_id"]: k for k in kids if k.info.status == "FINISHED"}

    resumed = subprocess.run(sweep_cmd(tmp_path, spec, "--resume"), cwd=tmp_path, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_complete_record(tmp_path, "sigkill", planned=6, epochs=5)
    after = trial_runs(tmp_path, "sigkill")
    for trial_id, before in finished.items():  # a trial the saved state knew as done is not re-run
        if trial_id not in saved:
            assert after[trial_id].info.run_id == before.info.run_id
            assert after[trial_id].info.end_time == before.info.end_time, trial_id
    assert_resumed_from_checkpoints(after, saved, epochs=5)


@pytest.mark.timeout(1500)
def test_sigterm_is_a_clean_stop_and_a_plain_rerun_is_a_new_sweep(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, "sigterm", epochs=3, samples=2)
    rc, out, _ = interrupt_after_first_trials(tmp_path, spec, signal.SIGTERM)
    assert rc == 130 and "--resume" in out
    _, kids = runs(tmp_path, "sigterm")
    assert all(k.info.status != "RUNNING" for k in kids)

    # A plain rerun says so and starts a new sweep (its own parent run); once it has, a SIGTERM stops it as well.
    again = start(tmp_path, sweep_cmd(tmp_path, spec))
    again.wait_for_line("did not finish; this starts a new sweep", timeout_s=300)
    again.wait_for_line("[1/", timeout_s=300)
    again.proc.send_signal(signal.SIGTERM)
    rc, out, err = again.finish(timeout_s=180)
    assert rc == 130 and "--resume" in out, out + err
    parents, _ = runs(tmp_path, "sigterm")
    assert len(parents) == 2 and {p.info.status for p in parents} == {"KILLED"}


@pytest.mark.timeout(1200)
def test_a_killed_trial_process_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    # A checkpoint every 3 epochs (and at the last): the retried trial repeats the epochs since its checkpoint.
    spec = write_spec(tmp_path, "retry", epochs=8, samples=1, checkpoint_every=3)
    driver = start(tmp_path, sweep_cmd(tmp_path, spec))

    def both_trials_logged_three_epochs() -> bool:
        # MLflow, not result.json, which Tune syncs to storage only every few seconds. The store may not exist yet.
        kids = runs(tmp_path, "retry")[1]
        return len(kids) == 2 and all(len(steps(tmp_path, k.info.run_id)) >= 3 for k in kids)

    wait_until(both_trials_logged_three_epochs, 300, "both trials to log (and so checkpoint) 3 epochs",
               retry_on=(MlflowException, AttributeError, KeyError))
    training = [pid for pid in descendants(driver.pid) if "ray::ImplicitFunc.train" in cmdline(pid)]
    assert training, "no trial process found training"
    os.kill(training[0], signal.SIGKILL)  # one trial's Ray worker process, mid-training
    rc, out, err = driver.finish(timeout_s=600)
    assert rc == 0, out + err
    kids = assert_complete_record(tmp_path, "retry", planned=2, epochs=8)
    retried = [k for k in kids if k.data.tags.get("retries")]
    assert len(retried) == 1 and retried[0].data.tags["retries"] == "1"
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert any(a.path.startswith("error-attempt") for a in client.list_artifacts(retried[0].info.run_id))
    # Resumed from its checkpoint, not from scratch: the new process reported where it started (MLflow keeps each
    # epoch once whatever happens, so the epochs alone cannot tell).
    assert int(retried[0].data.tags["resumed_from_epoch"]) in (3, 6)
    # Tune's own record of the checkpoints (public API, no Ray started): epochs 3 and 6, and 8, the last; the
    # retried trial's first process and its second together wrote each once.
    (experiment,) = (tmp_path / "ray_results").iterdir()
    results = tune.Tuner.restore(str(experiment), train_trial).get_results()
    assert [sorted(int(m["epoch"]) for _, m in r.best_checkpoints) for r in results] == [[3, 6, 8], [3, 6, 8]]


@pytest.mark.timeout(900)
def test_divergence_is_a_result_and_a_failing_trial_ends_failed_with_its_error(tmp_path: Path) -> None:
    # lr 10 with weight decay 1.0 overflows float32 within two epochs; subset 99999 is larger than the data.
    spec = tmp_path / "mixed.yaml"
    spec.write_text("""
name: mixed
experiment: reliability
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64, image_size: 16}}
model: {name: baseline_cnn, width: 0.25}
trainer: {epochs: 4, batch_size: 8, optimizer: sgd, momentum: 0.0, weight_decay: 1.0, schedule: none, threads: 1}
grid:
  lr: [10.0, 0.001]
  dataset.subset: [200, 99999]
max_concurrent: 2
max_failures: 1
""")
    proc = subprocess.run(sweep_cmd(tmp_path, spec), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parents, kids = runs(tmp_path, "mixed")
    by_cell = {k.data.tags["resnet_lab.cell"]: k for k in kids}
    assert len(kids) == 4
    diverged = by_cell["baseline_cnn-w0.25-lr10-subset200"]
    assert diverged.data.tags["resnet_lab.outcome"] == "diverged" and diverged.info.status == "FINISHED"
    assert diverged.data.metrics["diverged"] == 1.0 and len(steps(tmp_path, diverged.info.run_id)) < 4
    assert by_cell["baseline_cnn-w0.25-lr1.0e-03-subset200"].data.tags["resnet_lab.outcome"] == "completed"
    for label in ("baseline_cnn-w0.25-lr10-subset99999", "baseline_cnn-w0.25-lr1.0e-03-subset99999"):
        failed = by_cell[label]
        assert failed.info.status == "FAILED" and failed.data.tags["resnet_lab.outcome"] == "failed"
        assert "subset" in failed.data.tags["error"]
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert "error.txt" in [a.path for a in client.list_artifacts(failed.info.run_id)]
    assert parents[0].info.status == "FINISHED" and parents[0].data.tags["trials_failed"] == "2"
    assert "2 failed" in proc.stdout and "1 diverged" in proc.stdout


@pytest.mark.parametrize(("args", "expected"), [
    (["--tracking-uri", "http://127.0.0.1:9"], "MLflow tracking store http://127.0.0.1:9 is not usable"),
    (["--tracking-uri", "sqlite:///{tmp}/afile/mlflow.db"], "MLflow tracking store sqlite:///"),
    (["--storage", "{tmp}/afile/results"], "is not writable"),
    (["--address", "127.0.0.2:1"], "cannot reach the Ray cluster at 127.0.0.2:1"),
    (["--set", "resources.cpu=64"], "resources.cpu: 64 per worker, but the largest node has"),
    (["--set", "dataset.name=cifar10", "--set", "dataset.download=false", "--set", "dataset.root={tmp}/nodata"],
     "cifar10: not found in"),
])
def test_preflight_refuses_to_start_with_one_clear_message(tmp_path: Path, args: list[str], expected: str) -> None:
    (tmp_path / "afile").write_text("a file where a directory is expected")
    spec = write_spec(tmp_path, "preflight")
    cmd = [sys.executable, str(ROOT / "sweep.py"), str(spec), *[a.replace("{tmp}", str(tmp_path)) for a in args]]
    if "--tracking-uri" not in args:
        cmd += ["--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    if "--storage" not in args:
        cmd += ["--storage", str(tmp_path / "ray_results")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not list((tmp_path / "ray_results").glob("preflight-*/*/result.json"))  # no trial ran
