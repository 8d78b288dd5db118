"""clusters/: the cluster launcher configs validate against the schema inside the installed `ray` package (and pass
the preparation `ray up` does before it touches a cloud); the KubeRay manifest has what KubeRay needs."""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from mlflow import MlflowClient
from procs import cmdline, descendants, kill_all, wait_until
from ray.autoscaler._private.util import prepare_config, validate_config

from resnet_lab.spec.load import load_spec
from resnet_lab.spec.sweep import Resources
from resnet_lab.tune.capacity import (
    HEAD_MARKER,
    Capacity,
    concurrency_limit,
    node_types_from_config,
    reachable_slots,
    resource_problems,
)

ROOT = Path(__file__).resolve().parent.parent
CLUSTERS = ROOT / "clusters"
SCHEMA_PATH = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
KUBERAY = CLUSTERS / "kuberay-raycluster.yaml"
LAUNCHERS = sorted(p for p in CLUSTERS.glob("*.yaml") if p != KUBERAY)
STORAGE_SCHEME = {"aws": "s3://", "gcp": "gs://"}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def head_commands(config: dict[str, Any]) -> str:
    return "\n".join(config["head_start_ray_commands"])


def test_every_cluster_file_is_checked_here() -> None:
    assert {p.name for p in LAUNCHERS} == {"aws-gpu.yaml", "gcp-gpu.yaml"}
    assert KUBERAY.exists() and (CLUSTERS / "README.md").exists() and (CLUSTERS / "local_cluster.py").exists()


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_config_validates_against_rays_schema(path: Path, schema: dict[str, Any]) -> None:
    jsonschema.validate(load(path), schema)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launcher_config_passes_the_preparation_ray_up_does(path: Path) -> None:
    """Provider defaults merged in, docker and node types checked, then the schema again (no cloud calls)."""
    prepared = prepare_config(load(path))
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_schema_check_rejects_a_misspelled_field(schema: dict[str, Any]) -> None:
    config = load(LAUNCHERS[0])
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_worker"]["min_worker"] = 0  # not min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        jsonschema.validate(broken, schema)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_gpu_workers_autoscale_from_zero_under_a_cpu_head(path: Path) -> None:
    config = load(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert "--num-cpus=0" in head_commands(config)  # trials never land on the head
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu, f"{path.name}: no worker type with a GPU"
    for worker in gpu:
        assert worker["min_workers"] == 0 and 1 <= worker["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_dashboard_and_mlflow_listen_only_on_the_head_loopback(path: Path) -> None:
    config = load(path)
    commands = head_commands(config)
    assert "--dashboard-host=127.0.0.1" in commands
    assert re.search(r"mlflow server --host 127\.0\.0\.1 ", commands)
    assert "0.0.0.0" not in path.read_text()
    # AWS: no inbound rule beyond the SSH and intra-cluster ones Ray adds itself.
    assert not config["provider"].get("security_group", {}).get("IpPermissions")


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_project_is_installed_on_every_node(path: Path) -> None:
    config = load(path)
    remote = next(r for r, local in config["file_mounts"].items() if local == ".")
    # setup_commands run on head and workers alike (head_/worker_setup_commands only on one kind).
    assert any(c.startswith("pip install") and remote in c for c in config["setup_commands"])
    assert ".gitignore" in config["rsync_filter"]  # datasets, mlflow.db, ray_results stay home


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_sweep_storage_and_mlflow_artifacts_live_in_the_clouds_bucket(path: Path) -> None:
    config = load(path)
    scheme = STORAGE_SCHEME[config["provider"]["type"]]
    commands = head_commands(config)
    storage = re.search(r"RESNET_LAB_STORAGE=(\S+);", commands)
    assert storage and storage.group(1).startswith(scheme)
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000;" in commands
    assert f"--artifacts-destination {scheme}" in commands


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_token_auth_is_on_for_every_node(path: Path) -> None:
    config = load(path)
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        start = next(c for c in commands if "ray start" in c)
        assert "export RAY_AUTH_MODE=token;" in start
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_every_image_runs_the_same_ray() -> None:
    versions = set()
    for path in LAUNCHERS:
        docker = load(path)["docker"]
        for image in (docker["head_image"], docker["worker_image"]):
            versions.add(re.fullmatch(r"rayproject/ray:([\d.]+)-py311-(cpu|gpu)", image).group(1))
    versions.add(re.search(r"^FROM rayproject/ray:([\d.]+)-", (CLUSTERS / "Dockerfile").read_text(), re.M).group(1))
    versions.add(kuberay_docs()["RayCluster"]["spec"]["rayVersion"])
    assert len(versions) == 1, versions


# --- what the autoscaler may launch: preflight and concurrency -------------------------------------------------

HEAD_NO_CPUS = {HEAD_MARKER: 1.0, "memory": 2.0**34}  # `ray start --num-cpus=0`: the head advertises no CPU at all


def grown(path: Path) -> Capacity:
    """The cluster right after `ray up`: the head alone, and the worker types the autoscaler reads from the
    prepared config (what `ray up` writes to the head's ~/ray_bootstrap_config.yaml)."""
    types, cap = node_types_from_config(prepare_config(load(path)))
    return Capacity([HEAD_NO_CPUS], HEAD_NO_CPUS, types, cap, path.name, True)


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_the_documented_sweep_is_accepted_on_a_cluster_that_starts_with_no_workers(path: Path) -> None:
    res = load_spec(str(ROOT / "sweeps" / "depth_ablation.yaml")).spec.resources
    live_only = Capacity([HEAD_NO_CPUS], HEAD_NO_CPUS)
    # What issue 16 saw: judged by the live head alone, the guide's own command was refused.
    assert resource_problems(res, live_only) == [
        "resources.cpu: 4 per worker, but the largest node has 0 CPUs",
        "resources.gpu: 0.5 per worker, but the largest node has 0 GPUs"]
    assert resource_problems(res, grown(path)) == []
    # 4 GPU workers of {CPU: 8, GPU: 1}, two trials of {cpu: 4, gpu: 0.5} on each (the yaml's own comment).
    assert concurrency_limit(res, grown(path), total=1000) == 8
    assert concurrency_limit(res, live_only, total=1000) == 1  # the old answer: one trial, the cluster never grew


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_a_trial_no_node_type_can_hold_is_still_refused(path: Path) -> None:
    problems = resource_problems(Resources(cpu=16, gpu=1), grown(path))
    assert problems == ["resources.cpu: 16 per worker, but the largest node (live, or of the autoscaler node types "
                        f"gpu_worker x4 {{CPU: 8, GPU: 1}} (from {path.name})) has 8 CPUs"]
    problems = resource_problems(Resources(cpu=8, gpu=1, workers=5), grown(path))  # DDP over more than 4 nodes
    assert len(problems) == 1 and "5 workers x (8 CPU, 1 GPU) exceed what the cluster holds" in problems[0]
    assert resource_problems(Resources(cpu=8, gpu=1, workers=4), grown(path)) == []


def test_reachable_slots_respect_the_cluster_wide_worker_cap() -> None:
    types, cap = node_types_from_config({
        "max_workers": 3, "head_node_type": "head",
        "available_node_types": {"head": {"resources": {"CPU": 2}}, "big": {"resources": {"CPU": 8}, "max_workers": 2},
                                 "small": {"resources": {"CPU": 2}, "max_workers": 5}, "default": {"resources": {}}}})
    assert [(t.name, t.max_workers) for t in types] == [("big", 2), ("small", 5), ("default", 3)]
    head = {"CPU": 2.0, HEAD_MARKER: 1.0}
    capacity = Capacity([head], head, types, cap, "test", True)
    # head 2 + big 2 x 8 + small 1 x 2 (3 workers in all): the roomiest types first.
    assert reachable_slots(capacity, {"CPU": 1}) == 2 + 16 + 2
    assert reachable_slots(capacity, {"CPU": 4, "GPU": 0}) == 4
    assert reachable_slots(capacity, {"CPU": 1, "GPU": 0.5}) == 0  # no GPU anywhere


# --- KubeRay ------------------------------------------------------------------------------------------------------


def kuberay_docs() -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(KUBERAY.read_text()) if d]
    by_kind = {d["kind"]: d for d in docs}
    assert len(by_kind) == len(docs), "one object of each kind"
    return by_kind


def pod_spec(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]


def test_kuberay_manifest_has_the_fields_kuberay_requires() -> None:
    cluster = kuberay_docs()["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["metadata"]["name"]
    spec = cluster["spec"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        # KubeRay's CRD types rayStartParams as map[string]string: an unquoted 0 is rejected.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        ray_container = pod_spec(group)["containers"][0]  # KubeRay runs Ray in the first container
        assert ray_container["name"] and ray_container["image"]
    names = [g["groupName"] for g in spec["workerGroupSpecs"]]
    assert len(names) == len(set(names))
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_kuberay_gpu_group_autoscales_from_zero_with_requests_equal_to_limits() -> None:
    spec = kuberay_docs()["RayCluster"]["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if "nvidia.com/gpu" in pod_spec(g)["containers"][0]["resources"]["limits"]]
    assert gpu_groups and all(g["minReplicas"] == 0 for g in gpu_groups)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        for container in pod_spec(group)["containers"]:
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], container["name"]  # Guaranteed QoS
            assert {"cpu", "memory"} <= set(resources["limits"])
    head = pod_spec(spec["headGroupSpec"])["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_head_is_reachable_only_inside_the_cluster() -> None:
    docs = kuberay_docs()
    head = docs["RayCluster"]["spec"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP"
    assert not {"Ingress", "Service"} & set(docs)  # no extra exposure next to KubeRay's own head service
    mlflow = next(c for c in pod_spec(head)["containers"] if c["name"] == "mlflow")
    assert mlflow["command"][mlflow["command"].index("--host") + 1] == "127.0.0.1"


def test_kuberay_pods_run_the_project_image_and_their_references_resolve() -> None:
    docs = kuberay_docs()
    spec = docs["RayCluster"]["spec"]
    pods = [pod_spec(g) for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    images = {c["image"] for pod in pods for c in pod["containers"]}
    assert len(images) == 1 and "resnet-lab" in images.pop()
    for pod in pods:
        assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        assert claims <= {docs["PersistentVolumeClaim"]["metadata"]["name"]}
        mounted = {m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert mounted <= {v["name"] for v in pod.get("volumes", [])}


# --- the guide ----------------------------------------------------------------------------------------------------


def test_guide_names_only_files_that_exist() -> None:
    guide = (CLUSTERS / "README.md").read_text()
    paths = set(re.findall(r"\b((?:clusters|sweeps)/[\w.-]+\.(?:yaml|py|md)|clusters/Dockerfile)\b", guide))
    assert {"clusters/aws-gpu.yaml", "sweeps/depth_ablation.yaml"} <= paths
    assert all((ROOT / p).exists() for p in paths), sorted(p for p in paths if not (ROOT / p).exists())
    for command in ("ray up clusters/aws-gpu.yaml", "ray job submit --address", "ray down clusters/aws-gpu.yaml"):
        assert command in guide


# --- the MLflow server each cluster starts ---------------------------------------------------------------------

JOB_EXECUTION_OFF = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false"


@pytest.mark.parametrize("path", LAUNCHERS, ids=lambda p: p.stem)
def test_launchers_start_mlflow_without_its_job_runner(path: Path) -> None:
    """MLflow 3.17's server starts a job runner and 7 huey consumers unless told not to (~2 GB, ~45 CPU-s)."""
    command = next(c for c in load(path)["head_start_ray_commands"] if "mlflow server" in c)
    assert command.startswith(f"{JOB_EXECUTION_OFF} nohup mlflow server "), command
    assert re.search(r" --workers [12] ", command), command


def _bytes(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:]]


@pytest.mark.slow
def test_kuberay_mlflow_container_command_serves_within_its_memory_limit(tmp_path: Path) -> None:
    """The mlflow container's own command and env, run here (paths and port swapped for local ones): it serves a
    run, starts no job runner, and its processes together stay well inside the container's memory limit (the
    default server, 3.2 GB here, would be OOM-killed at 2Gi)."""
    head = pod_spec(kuberay_docs()["RayCluster"]["spec"]["headGroupSpec"])
    container = next(c for c in head["containers"] if c["name"] == "mlflow")
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    assert env.get("MLFLOW_SERVER_ENABLE_JOB_EXECUTION") == "false"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    local = {"--backend-store-uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
             "--artifacts-destination": (tmp_path / "artifacts").as_uri(), "--port": str(port)}
    argv = list(container["command"])
    assert argv[:2] == ["mlflow", "server"]
    for flag, value in local.items():
        argv[argv.index(flag) + 1] = value
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", *argv[1:]], cwd=tmp_path, env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, "the mlflow container's command exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(healthy, 300, "the mlflow container's server")
        client = MlflowClient(f"http://127.0.0.1:{port}")
        run = client.create_run(client.create_experiment("k8s"))
        client.log_metric(run.info.run_id, "val/acc", 0.5)
        assert client.get_run(run.info.run_id).data.metrics == {"val/acc": 0.5}
        pids = [proc.pid, *descendants(proc.pid)]
        assert not [cmdline(p) for p in pids if "huey" in cmdline(p) or "_job_runner" in cmdline(p)]
        rss = 0
        for pid in pids:
            with open(f"/proc/{pid}/status") as f:
                rss += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        limit = _bytes(container["resources"]["limits"]["memory"])
        print(f"mlflow container: {len(pids)} processes, {rss / 2**30:.2f} GiB resident of a {limit / 2**30:.0f} GiB "
              "limit")
        assert rss < 0.6 * limit
    finally:
        kill_all([proc.pid, *descendants(proc.pid)], grace_s=10)
        proc.wait(timeout=30)
