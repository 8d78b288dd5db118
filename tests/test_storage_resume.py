"""`--resume` finds the newest run of a sweep in any storage Ray accepts: an S3 bucket (a real S3-compatible server,
moto's standalone server, started here on 127.0.0.1), a `file://` URI, a local path.

The end-to-end tests SIGKILL the sweep driver mid-sweep, then resume from the bucket and check the MLflow record:
finished trials untouched (same end time, each epoch once), interrupted trials continued from their checkpoints
(`resumed_from_epoch`), nothing left RUNNING.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from mlflow.tracking import MlflowClient
from procs import descendants, kill_all

from resnet_lab.spec.load import load_spec
from resnet_lab.tracking import TAG_OUTCOME, TAG_ROLE, TAG_TRIAL_ID
from resnet_lab.tune.runner import PreflightError, experiment_uri, previous_runs
from resnet_lab.tune.trainable import RESUMED_KEY

ROOT = Path(__file__).resolve().parent.parent
BUCKET = "resnet-lab"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               # no instance-metadata lookups (169.254.169.254): tests never touch the network
               "AWS_EC2_METADATA_DISABLED": "true"}

SPEC = """
name: NAME
experiment: storage
dataset: {name: synthetic, synthetic: {train_size: 1024, test_size: 64, image_size: 16}}
model: {name: resnet, depth: 8, width: 0.125}
trainer: {epochs: 8, batch_size: 64, threads: 1}
grid:
  skip: [true, false]
search:
  lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
samples_per_cell: 2
max_concurrent: 2
max_failures: 2
# every epoch: these tests resume from mid-trial checkpoints ("auto" saves sub-second epochs at the last only)
checkpoint_every: 1
"""
TRIALS, EPOCHS = 4, 8


@dataclass(frozen=True)
class S3Server:
    """A moto S3 server on 127.0.0.1 with one bucket."""

    port: int

    def uri(self, prefix: str) -> str:
        """The storage URI Ray and pyarrow take for `prefix` in the bucket (plain HTTP to this server)."""
        return f"s3://{BUCKET}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http&region=us-east-1"

    def fs(self, allow_bucket_creation: bool = False) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1", scheme="http",
                                 endpoint_override=f"127.0.0.1:{self.port}",
                                 allow_bucket_creation=allow_bucket_creation)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto_server not listening on {port} after {timeout_s} s")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    server = shutil.which("moto_server")
    if server is None:
        pytest.skip('moto_server is not installed (pip install "moto[server]", in the dev extras)')
    port = free_port()
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, proc)
        with pytest.MonkeyPatch.context() as mp:  # pyarrow in this process (previous_runs) reads them too
            for key, value in CREDENTIALS.items():
                mp.setenv(key, value)
            S3Server(port).fs(allow_bucket_creation=True).create_dir(BUCKET)
            yield S3Server(port)
    finally:
        kill_all([proc.pid])


def write_spec(tmp: Path, name: str) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(SPEC.replace("NAME", name))
    return path


# --- listing: fast, against the real server -----------------------------------------------------------------------


def make_run(fs: pafs.FileSystem, root: str, name: str, restorable: bool = True) -> None:
    """An experiment dir as Tune leaves it: restorable when it holds the Tuner's pickle (what Tuner.can_restore
    looks for)."""
    fs.create_dir(f"{root}/{name}")
    if restorable:
        with fs.open_output_stream(f"{root}/{name}/tuner.pkl") as out:
            out.write(b"not read by can_restore")
    else:
        with fs.open_output_stream(f"{root}/{name}/note.txt") as out:
            out.write(b"not a Tune experiment")


def test_previous_runs_lists_the_bucket_newest_last_and_keeps_the_uri_query(s3: S3Server, tmp_path: Path) -> None:
    loaded = load_spec(str(write_spec(tmp_path, "listing")))
    fs, root = s3.fs(), f"{BUCKET}/listing"
    for name in ("listing-20261201-100000", "listing-20261130-235959", "listing-20261201-090000"):
        make_run(fs, root, name)
    make_run(fs, root, "listing-20261201-110000", restorable=False)  # no experiment state: not resumable
    make_run(fs, root, "listing2-20261201-120000")  # another sweep whose name starts the same
    make_run(fs, root, "listing-latest")  # not a run directory name
    runs = previous_runs(loaded, s3.uri("listing"))
    assert runs == [s3.uri(f"listing/{n}") for n in
                    ("listing-20261130-235959", "listing-20261201-090000", "listing-20261201-100000")]
    assert runs[-1].endswith(f"/listing-20261201-100000?endpoint_override=127.0.0.1:{s3.port}&scheme=http"
                             "&region=us-east-1")


def test_previous_runs_is_empty_for_a_prefix_that_does_not_exist(s3: S3Server, tmp_path: Path) -> None:
    loaded = load_spec(str(write_spec(tmp_path, "nothing")))
    assert previous_runs(loaded, s3.uri("no/such/prefix")) == []


def test_previous_runs_reads_file_uris_and_local_paths_alike(tmp_path: Path) -> None:
    loaded = load_spec(str(write_spec(tmp_path, "local")))
    fs = pafs.LocalFileSystem()
    make_run(fs, str(tmp_path / "results"), "local-20261201-100000")
    make_run(fs, str(tmp_path / "results"), "local-20261201-090000")
    assert previous_runs(loaded, str(tmp_path / "results")) == [
        str(tmp_path / "results" / n) for n in ("local-20261201-090000", "local-20261201-100000")]
    assert previous_runs(loaded, f"file://{tmp_path}/results") == [
        f"file://{tmp_path}/results/{n}" for n in ("local-20261201-090000", "local-20261201-100000")]


def test_unreadable_storage_is_one_clear_preflight_error(tmp_path: Path) -> None:
    loaded = load_spec(str(write_spec(tmp_path, "bad")))
    with pytest.raises(PreflightError, match="cannot list storage"):
        previous_runs(loaded, "s3://")


def test_experiment_uri_joins_before_the_query() -> None:
    assert experiment_uri("s3://b/p?endpoint_override=h:1", "run") == "s3://b/p/run?endpoint_override=h:1"
    assert experiment_uri("gs://b/p/", "run") == "gs://b/p/run"
    assert experiment_uri("file:///tmp/x", "run") == "file:///tmp/x/run"
    assert experiment_uri("/tmp/x", "run") == "/tmp/x/run"


# --- SIGKILL mid-sweep, then --resume -----------------------------------------------------------------------------


def children(client: MlflowClient, name: str) -> tuple[list, list]:
    exp = client.get_experiment_by_name("storage")
    if exp is None:
        return [], []
    every = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in every if r.data.tags.get(TAG_ROLE) == "sweep"
               and r.data.tags.get("resnet_lab.sweep", "").startswith(name + "-")]
    ids = {p.info.run_id for p in parents}
    return parents, [r for r in every if r.data.tags.get("mlflow.parentRunId") in ids]


def epochs(client: MlflowClient, run_id: str) -> list:
    return sorted(client.get_metric_history(run_id, "val/acc"), key=lambda m: m.step)


def newest_snapshot_s(fs: pafs.FileSystem, experiment: str) -> float:
    """Modification time (epoch seconds) of the newest experiment-state file Tune has put in storage; 0 if none."""
    infos = fs.get_file_info(pafs.FileSelector(experiment, allow_not_found=True))
    times = [i.mtime.timestamp() for i in infos if i.base_name.startswith("experiment_state") and i.mtime]
    return max(times, default=0.0)


def wait_for_kill_point(client: MlflowClient, name: str, fs: pafs.FileSystem, root: str,
                        proc: subprocess.Popen[str], log: Path, timeout_s: float = 600) -> tuple[dict, str]:
    """Until >= 2 trials have finished, another has logged >= 2 epochs and not all, and storage holds a Tune snapshot
    written after both (so the restored state knows those trials finished and that epoch's checkpoint exists).
    Returns finished trial id -> end time (ms), and the running trial's id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the sweep ended before the kill point:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(Exception):  # SQLite busy while the driver writes
            _, kids = children(client, name)
            finished = {k.data.tags[TAG_TRIAL_ID]: k.info.end_time for k in kids if k.info.status == "FINISHED"}
            running = [(k, epochs(client, k.info.run_id)) for k in kids if k.info.status == "RUNNING"]
            running = [(k, h) for k, h in running if 2 <= len(h) < EPOCHS - 1]
            if len(finished) >= 2 and running:
                kid, history = running[0]
                # Its 2nd epoch, not its latest: under load an upload can take longer than an epoch, and a goal
                # that moves with every epoch may never be reached.
                after_s = max([*finished.values(), history[1].timestamp]) / 1000
                dirs = [i.path for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
                        if i.base_name.startswith(name + "-")]
                # +1 s: S3 keeps whole seconds
                if dirs and newest_snapshot_s(fs, dirs[0]) >= after_s + 1:
                    return finished, kid.data.tags[TAG_TRIAL_ID]
        time.sleep(0.2)
    raise AssertionError(f"no kill point within {timeout_s} s")


def sweep_cmd(tmp: Path, spec: Path, storage: str, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweep.py"), str(spec), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}",
            "--storage", storage, *extra]


def kill_driver_then_resume(tmp: Path, name: str, storage: str, fs: pafs.FileSystem, root: str) -> None:
    spec = write_spec(tmp, name)
    env = {**os.environ, **CREDENTIALS,
           # A Tune snapshot every second (default: every >= 10 s) so the kill point comes soon after the trials.
           "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    log = tmp / "driver.log"  # a file, not a pipe: nothing to drain, and the reason is there when it fails
    with open(log, "w") as out:
        proc = subprocess.Popen(sweep_cmd(tmp, spec, storage), cwd=tmp, env=env, stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    try:
        finished, interrupted = wait_for_kill_point(client, name, fs, root, proc, log)
    finally:
        orphans = descendants(proc.pid)  # local Ray's GCS, raylet and workers outlive a SIGKILLed driver
        proc.kill()
        proc.wait(timeout=60)
        kill_all(orphans)
    _, kids = children(client, name)
    assert any(k.info.status == "RUNNING" for k in kids)  # what a SIGKILL leaves behind
    logged = max(len(epochs(client, k.info.run_id)) for k in kids if k.data.tags[TAG_TRIAL_ID] == interrupted)
    print(f"\n{name}: killed with {len(finished)} trials finished, trial {interrupted} at epoch {logged}")

    resumed = subprocess.run(sweep_cmd(tmp, spec, storage, "--resume"), cwd=tmp, env=env, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "nothing to resume" not in resumed.stderr

    parents, kids = children(client, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"  # the same sweep, re-attached
    assert len(kids) == TRIALS and all(k.info.status == "FINISHED" for k in kids), [k.info.status for k in kids]
    assert Counter(k.data.tags[TAG_TRIAL_ID] for k in kids).most_common(1)[0][1] == 1
    for kid in kids:
        assert [m.step for m in epochs(client, kid.info.run_id)] == list(range(1, EPOCHS + 1)), kid.info.run_name
        assert kid.data.tags[TAG_OUTCOME] == "completed"
    by_trial = {k.data.tags[TAG_TRIAL_ID]: k for k in kids}
    for trial, end_ms in finished.items():  # finished trials were not re-run: not re-opened, same end time
        assert by_trial[trial].info.end_time == end_ms, trial
        assert RESUMED_KEY not in by_trial[trial].data.tags
    resumed_from = int(by_trial[interrupted].data.tags[RESUMED_KEY])
    print(f"{name}: resumed; {len(finished)} finished trials untouched, trial {interrupted} resumed_from_epoch="
          f"{resumed_from}, {sum(RESUMED_KEY in k.data.tags for k in kids)} trials resumed from checkpoints")
    # From a checkpoint at least as new as the snapshot we waited for, and no newer than what it had done.
    assert 2 <= resumed_from <= logged < EPOCHS


@pytest.mark.slow
@pytest.mark.timeout(1200)  # ~7 min measured on 2 busy cores
def test_sigkill_then_resume_from_an_s3_bucket(s3: S3Server, tmp_path: Path) -> None:
    kill_driver_then_resume(tmp_path, "s3kill", s3.uri("results"), s3.fs(), f"{BUCKET}/results")
    assert [i.base_name for i in s3.fs().get_file_info(pafs.FileSelector(f"{BUCKET}/results"))
            if i.base_name.startswith("s3kill-")]  # the state really lived in the bucket
    assert not (tmp_path / "ray_results").exists()


# soak: the S3 test in the default run covers resume from a URI; this is the file:// variant
@pytest.mark.soak
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_sigkill_then_resume_from_a_file_uri(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    kill_driver_then_resume(tmp_path, "filekill", f"file://{tmp_path}/results", pafs.LocalFileSystem(),
                            str(tmp_path / "results"))
