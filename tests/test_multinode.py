"""A real 2-node Ray cluster on this machine (head and worker as separate `ray start` processes on 127.0.0.2), and
`python sweep.py SPEC --address` running a sweep on it: trials land on both nodes and MLflow has every run."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from mlflow.tracking import MlflowClient

from resnet_lab.tracking import TAG_OUTCOME, TAG_ROLE, TAG_TRIAL_ID

ROOT = Path(__file__).resolve().parent.parent

# One CPU per node and two trials at once: the second trial can only run on the other node. Six tiny trials so
# that both nodes run several (reuse_actors keeps one trial actor per node).
SPEC = """
name: multinode
experiment: multinode
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 64}, val_fraction: 0.25}
model: {name: resnet, depth: 8, width: 0.125}
trainer: {epochs: 2, batch_size: 64, threads: 1}
grid:
  skip: [true, false]
search:
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
samples_per_cell: 3
seeds: [0]
resources: {cpu: 1}
max_concurrent: 2
"""
TRIALS = 6


def load_helper() -> ModuleType:
    """clusters/local_cluster.py is a script, not part of the package."""
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "clusters" / "local_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


lc = load_helper()


def test_start_refuses_a_root_too_long_for_rays_sockets(tmp_path: Path) -> None:
    with pytest.raises(lc.ClusterError, match="107-byte limit"):
        lc.start(tmp_path / ("x" * 40))
    assert not list(tmp_path.iterdir())  # nothing started, nothing created


def test_start_refuses_a_root_that_still_records_a_cluster() -> None:
    root = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    try:
        (root / lc.STATE_FILE).write_text("{}")
        with pytest.raises(lc.ClusterError, match="still recorded"):
            lc.start(root)
        assert sorted(p.name for p in root.iterdir()) == [lc.STATE_FILE]  # nothing started, nothing removed
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="module")
def cluster() -> Iterator[lc.LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths live below it
    try:
        started = lc.start(root, workers=1, cpus_per_node=1)  # stops what it started when it fails
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    print(f"\nloopback cluster: {started.address}, up in {started.startup_s:.1f} s "
          f"({', '.join(f'{n.role} {n.start_s:.1f} s' for n in started.nodes)})")
    try:
        yield started
    finally:
        survivors = lc.stop(started)
        if not survivors:
            shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"cluster processes survived teardown: {sorted(survivors)}"


@pytest.fixture(scope="module")
def sweep(cluster: lc.LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("multinode")
    spec = tmp / "multinode.yaml"
    spec.write_text(SPEC)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = cluster.driver_env()
    env.pop("RAY_ADDRESS", None)
    begin = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "sweep.py"), str(spec), "--address", cluster.address,
                           "--tracking-uri", uri, "--storage", str(tmp / "ray_results")],
                          capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
    wall_s = time.perf_counter() - begin
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    done = next((line.strip() for line in proc.stdout.splitlines() if "done in" in line), "")
    print(f"sweep on the cluster: {wall_s:.1f} s wall, driver start-up included (sweep.py: {done})")
    return {"tmp": tmp, "uri": uri, "proc": proc, "wall_s": wall_s}


def trial_results(storage: Path) -> dict[str, dict]:
    """Tune trial id -> the trial's first result (Ray writes pid, node_ip and hostname into every result)."""
    out = {}
    for path in storage.glob("*/*/result.json"):
        first = json.loads(path.read_text().splitlines()[0])
        out[first["trial_id"]] = first
    return out


@pytest.mark.slow
def test_sweep_on_the_cluster_logs_every_trial_to_mlflow(sweep: dict) -> None:
    client = MlflowClient(sweep["uri"])
    exp = client.get_experiment_by_name("multinode")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(kids) == TRIALS
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags[TAG_OUTCOME] == "completed", kid.info.run_name
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "val/acc")] == [1, 2]
        assert kid.data.tags.get("node_ip") == lc.NODE_IP
    results = trial_results(sweep["tmp"] / "ray_results")
    assert {k.data.tags[TAG_TRIAL_ID] for k in kids} == set(results)


@pytest.mark.slow
def test_trials_ran_on_both_nodes(cluster: lc.LocalCluster, sweep: dict) -> None:
    results = trial_results(sweep["tmp"] / "ray_results")
    assert len(results) == TRIALS
    # Ray's node id of each trial's process, from that worker's own log in its node's temp dir.
    node_of_trial = {trial: lc.node_of_pid(cluster, int(result["pid"])) for trial, result in results.items()}
    known = {n.node_id: n.role for n in cluster.nodes}
    assert set(node_of_trial.values()) <= set(known), node_of_trial
    for trial, result in results.items():
        if "node_id" in result:  # once the trainable reports Ray's node id itself, the two routes must agree
            assert result["node_id"] == node_of_trial[trial]
    spread = Counter(known[node] for node in node_of_trial.values())
    print(f"trials per node: {dict(sorted(spread.items()))}")
    assert set(spread) == {"head", "worker-1"}, spread


@pytest.mark.slow
def test_stopping_the_nodes_by_pid_leaves_no_process_behind(cluster: lc.LocalCluster, sweep: dict) -> None:
    before = lc.cluster_pids(cluster)
    trial_pids = {int(r["pid"]) for r in trial_results(sweep["tmp"] / "ray_results").values()}
    assert {n.pid for n in cluster.nodes} <= before
    begin = time.perf_counter()
    assert lc.stop(cluster) == set()
    print(f"cluster stopped in {time.perf_counter() - begin:.1f} s")
    assert lc.alive(before | trial_pids) == set()
    assert lc.cluster_pids(cluster) == set()
    assert not (Path(cluster.root) / lc.STATE_FILE).exists()


NODE_LOSS_SPEC = """
name: nodeloss
experiment: nodeloss
dataset: {name: synthetic, synthetic: {train_size: 1024, test_size: 64, image_size: 16}, val_fraction: 0.25}
model: {name: resnet, depth: 8, width: 0.125}
trainer: {epochs: 8, batch_size: 32, threads: 1}
grid:
  skip: [true, false]
resources: {cpu: 1}
max_concurrent: 2
max_failures: 3
# every epoch: these tests resume from mid-trial checkpoints ("auto" saves sub-second epochs at the last only)
checkpoint_every: 1
"""


@pytest.mark.slow
def test_losing_a_worker_node_resumes_its_trial_on_the_survivor_from_its_checkpoint(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    cluster = lc.start(root, workers=1, cpus_per_node=1)
    try:
        spec = tmp_path / "nodeloss.yaml"
        spec.write_text(NODE_LOSS_SPEC)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = cluster.driver_env()
        env.pop("RAY_ADDRESS", None)
        proc = subprocess.Popen([sys.executable, str(ROOT / "sweep.py"), str(spec), "--address", cluster.address,
                                 "--tracking-uri", uri, "--storage", str(tmp_path / "ray_results")],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        worker = next(n for n in cluster.nodes if n.role != "head")
        client = MlflowClient(uri)
        victim, at_epoch = None, 0
        deadline = time.monotonic() + 300
        # A trial on the worker node with 2 epochs done, as MLflow records them (the driver logs each epoch with the
        # node at once; result.json reaches storage only when Tune next syncs, every few seconds).
        while victim is None and time.monotonic() < deadline:
            exp = client.get_experiment_by_name("nodeloss")
            for run in client.search_runs([exp.experiment_id]) if exp else []:
                at_epoch = len(client.get_metric_history(run.info.run_id, "val/acc"))
                if run.data.tags.get("node_id") == worker.node_id and at_epoch >= 2:
                    victim = run.data.tags[TAG_TRIAL_ID]
                    break
            time.sleep(0.2)
        assert victim is not None, "no trial reached epoch 2 on the worker node"
        raylets = [p for p in lc.node_pids(worker) if "raylet" in lc._cmdline(p).split(" ", 1)[0]]
        assert raylets, "the worker node has no raylet"
        lost = time.perf_counter()
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)  # the node dies: its raylet and, with it, the node's workers
        out, err = proc.communicate(timeout=600)
        print(f"\nnode lost at epoch {at_epoch}; sweep finished {time.perf_counter() - lost:.0f} s later")
        assert proc.returncode == 0, out[-3000:] + err[-3000:]
        exp = client.get_experiment_by_name("nodeloss")
        kids = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get(TAG_ROLE) == "trial"]
        assert len(kids) == 2 and {k.info.status for k in kids} == {"FINISHED"}
        moved = next(k for k in kids if k.data.tags[TAG_TRIAL_ID] == victim)
        assert int(moved.data.tags["retries"]) >= 1
        # Resumed from its checkpoint, not from scratch (the new process reports where it started), every epoch
        # logged exactly once.
        assert int(moved.data.tags["resumed_from_epoch"]) >= 2
        assert [m.step for m in client.get_metric_history(moved.info.run_id, "val/acc")] == list(range(1, 9))
        results = [json.loads(line) for line in
                   next((tmp_path / "ray_results").glob(f"nodeloss-*/*{victim}/result.json"))
                   .read_text().splitlines() if line.strip()]
        head = next(n for n in cluster.nodes if n.role == "head")
        assert results[-1]["node_id"] == head.node_id  # finished on the surviving node
    finally:
        survivors = lc.stop(cluster)
        if not survivors:
            shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"cluster processes survived teardown: {sorted(survivors)}"
