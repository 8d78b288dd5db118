"""A sweep on a cluster that starts with no worker nodes: Ray's own autoscaler (the `fake_multinode` provider, which
launches worker nodes as local processes with the CPUs and GPUs their node type declares) grows it while trials wait.

The cluster is the documented one in miniature: a head with 0 CPUs on 127.0.0.2 (token auth, stopped by PID, as
clusters/local_cluster.py does), and a GPU worker type {CPU: 4, GPU: 1} from 0 to 2 nodes. The spec sets no
max_concurrent and asks {cpu: 1, gpu: 0.5} per trial: the preflight must accept it from the node types, allow 4
trials at once (2 nodes x 2 trials), and Ray must pack 2 trials per node by their GPU fraction (4 would fit by CPUs).
The GPUs are declared, not real: trials train with `device: cpu`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
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
WORKER = {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2}
SPEC = """
name: autoscale
experiment: autoscale
dataset: {name: synthetic, synthetic: {train_size: 512, test_size: 64, image_size: 16}, val_fraction: 0.25}
model: {name: resnet, depth: 8, width: 0.125}
trainer: {epochs: 4, batch_size: 64, threads: 1, device: cpu}
grid:
  skip: [true, false]
search:
  lr: {type: loguniform, low: 1.0e-3, high: 1.0e-2}
samples_per_cell: 2
seeds: [0]
resources: {cpu: 1, gpu: 0.5}
"""
TRIALS, EPOCHS = 4, 4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]  # head start and node launches included


def load_helper() -> ModuleType:
    """clusters/local_cluster.py is a script, not part of the package."""
    spec = importlib.util.spec_from_file_location("local_cluster", ROOT / "clusters" / "local_cluster.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


lc = load_helper()


@pytest.fixture(scope="module")
def cluster() -> Iterator[lc.LocalCluster]:
    root = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))  # short: Ray's socket paths live below it
    try:
        started = lc.start_autoscaling(root, {"gpu_worker": WORKER}, head_cpus=0)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    print(f"\nautoscaling cluster: head at {started.address} up in {started.startup_s:.1f} s")
    try:
        yield started
    finally:
        survivors = lc.stop(started)
        if not survivors:
            shutil.rmtree(root, ignore_errors=True)
        assert not survivors, f"cluster processes survived teardown: {sorted(survivors)}"


def sweep_cmd(tmp: Path, cluster: lc.LocalCluster, spec: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "sweep.py"), str(spec), "--address", cluster.address,
            "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", "--storage", str(tmp / "ray_results"), *extra]


def driver_env(cluster: lc.LocalCluster) -> dict[str, str]:
    env = cluster.driver_env()
    env.pop("RAY_ADDRESS", None)
    return env


def test_a_trial_no_node_type_can_hold_is_refused_before_anything_launches(cluster: lc.LocalCluster,
                                                                           tmp_path: Path) -> None:
    spec = tmp_path / "autoscale.yaml"
    spec.write_text(SPEC)
    proc = subprocess.run(sweep_cmd(tmp_path, cluster, spec, "--set", "resources.cpu=6"), cwd=tmp_path,
                          env=driver_env(cluster), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert ("resources.cpu: 6 per worker, but the largest node (live, or of the autoscaler node types gpu_worker x2 "
            "{CPU: 4, GPU: 1}") in proc.stderr and "Traceback" not in proc.stderr
    assert lc.scaling_events(cluster) == []  # refused before any demand reached the autoscaler


@pytest.fixture(scope="module")
def sweep(cluster: lc.LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("autoscale")
    spec = tmp / "autoscale.yaml"
    spec.write_text(SPEC)
    before = lc.scaling_events(cluster)
    begin = time.time()
    proc = subprocess.run(sweep_cmd(tmp, cluster, spec), cwd=tmp, env=driver_env(cluster), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "proc": proc, "begin": begin, "wall_s": time.time() - begin, "before": before}


def cluster_nodes(cluster: lc.LocalCluster) -> list[dict]:
    """ray.nodes() of the cluster, read by a short-lived driver of its own (this process stays out of Ray)."""
    keys = ("NodeID", "Alive", "Resources")
    code = (f"import json, ray; ray.init(address={cluster.address!r}, log_to_driver=False); "
            f"print(json.dumps([{{k: n[k] for k in {keys!r}}} for n in ray.nodes()]))")
    proc = subprocess.run([sys.executable, "-c", code], env=driver_env(cluster), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def trial_results(storage: Path) -> dict[str, list[dict]]:
    """Tune trial id -> every result the trial reported."""
    out = {}
    for path in storage.glob("*/*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out[rows[0]["trial_id"]] = rows
    return out


def test_the_sweep_ran_every_trial_on_nodes_the_autoscaler_launched(cluster: lc.LocalCluster, sweep: dict) -> None:
    assert sweep["before"] == []  # no worker node before the sweep
    out = sweep["proc"].stdout
    assert "cluster: 1 live node(s); autoscaler node types gpu_worker x2 {CPU: 4, GPU: 1}" in out
    events = lc.scaling_events(cluster)

    client = MlflowClient(f"sqlite:///{sweep['tmp'] / 'mlflow.db'}")
    exp = client.get_experiment_by_name("autoscale")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(TAG_ROLE) == "sweep"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    kids = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(kids) == TRIALS
    for kid in kids:
        assert kid.info.status == "FINISHED" and kid.data.tags[TAG_OUTCOME] == "completed", kid.info.run_name
        assert [m.step for m in client.get_metric_history(kid.info.run_id, "val/acc")] == list(range(1, EPOCHS + 1))

    head = cluster.nodes[0].node_id
    node_of_trial = {k.data.tags[TAG_TRIAL_ID]: k.data.tags["node_id"] for k in kids}
    per_node = Counter(node_of_trial.values())
    assert set(trial_results(sweep["tmp"] / "ray_results")) == set(node_of_trial)
    # When each trial ran: its MLflow run, opened when Tune started the trial and ended when it completed (the
    # driver's clock, in ms; Ray's result rows carry whole seconds only).
    spans = {k.data.tags[TAG_TRIAL_ID]: (k.info.start_time / 1000, k.info.end_time / 1000) for k in kids}
    timeline = [f"  {time.strftime('%H:%M:%S', time.localtime(sweep['begin']))} sweep submitted"]
    timeline += [f"  {e.time[11:19]} autoscaler: {e.action} {e.count} x {e.detail}" for e in events]
    for trial, (start, end) in sorted(spans.items(), key=lambda item: item[1]):
        timeline.append(f"  {time.strftime('%H:%M:%S', time.localtime(start))}-"
                        f"{time.strftime('%H:%M:%S', time.localtime(end))} trial {trial} on node "
                        f"{node_of_trial[trial][-5:]}")
    print(f"\ntimeline ({sweep['wall_s']:.0f} s):\n" + "\n".join(timeline)
          + f"\ntrials per node: {dict((n[-5:], c) for n, c in per_node.items())}")

    registered = cluster_nodes(cluster)  # every node that ever joined, alive or not
    print("nodes joined: " + "; ".join(f"{n['NodeID'][-5:]} {n['Resources'].get('CPU', 0):g} CPU "
                                       f"{n['Resources'].get('GPU', 0):g} GPU" for n in registered))
    joined = {n["NodeID"]: n["Resources"] for n in registered if n["NodeID"] != head}
    # Four trials pending at once (no max_concurrent: 2 nodes x 2 trials) made it ask for two nodes at once; one
    # pending trial at a time would have grown the cluster by one.
    assert max(e.count for e in events if e.action == "request") == 2
    assert set(per_node) <= set(joined)
    for node in per_node:  # nodes of the gpu_worker type, as the config declares
        assert joined[node].get("CPU") == 4 and joined[node].get("GPU") == 1, joined[node]
    assert head not in per_node  # the head has 0 CPUs: no trial there
    assert len(per_node) == 2, per_node  # trials spread over both launched nodes
    # GPU fractions accounted: never more than 2 trials of gpu 0.5 at once on a node of 1 GPU, though 4 CPUs
    # would hold 4 of cpu 1.
    for node in per_node:
        mine = [spans[t] for t, n in node_of_trial.items() if n == node]
        most = max(sum(1 for s, e in mine if s <= start < e) for start, _ in mine)
        assert most <= 2, (node, mine)


GCS_CONFIG_DRIVER = """
import ray
from ray._raylet import GcsClient
from ray.core.generated import autoscaler_pb2

from resnet_lab.tune.capacity import describe, reachable_slots, read_capacity

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
before = read_capacity()
config = autoscaler_pb2.ClusterConfig()
group = autoscaler_pb2.NodeGroupConfig(name="gpu_worker", max_count=4)
group.resources["CPU"], group.resources["GPU"] = 8, 1
config.node_group_configs.append(group)
GcsClient(address=ray.get_runtime_context().gcs_address).report_cluster_config(config.SerializeToString())
after = read_capacity()
print(before.autoscaling, bool(before.launchable))
print(describe(after))
print(reachable_slots(after, {"CPU": 4, "GPU": 0.5}))
"""


def test_node_types_an_autoscaler_reports_to_the_gcs_are_read_first(tmp_path: Path) -> None:
    # Ray's ReportClusterConfig, the record Ray Data's autoscaler reads (Ray 2.60's own autoscalers do not write it
    # yet): reported here the way Ray's own test_get_cluster_config does, on a plain local Ray.
    proc = subprocess.run([sys.executable, "-c", GCS_CONFIG_DRIVER], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain, described, slots = proc.stdout.strip().splitlines()[-3:]
    assert plain == "False False"  # ray.init()'s read-only autoscaler launches nothing
    assert described == "autoscaler node types gpu_worker x4 {CPU: 8, GPU: 1} (from the GCS cluster config)"
    assert slots == "8"  # 4 nodes x 2 trials of {cpu: 4, gpu: 0.5}; the local node's 1 CPU holds none
