"""What the Ray cluster can hold: the nodes alive now, plus the node types its autoscaler may launch.

The documented cluster launches (clusters/aws-gpu.yaml, gcp-gpu.yaml, the KubeRay manifest) start a head with 0 CPUs
and GPU workers autoscaling from 0: judged by live nodes alone, such a cluster can hold no trial at all. Trials that
fit a launchable node type must be accepted and queued, so that their pending resource demands make the autoscaler
add nodes.

Where the launchable node types come from (Ray 2.60), first found wins:
1. The cluster config an autoscaler reports to the GCS (`ReportClusterConfig`), read with
   `ray._private.state.state.get_cluster_config()`: the call Ray Data's autoscaler uses
   (`ray/data/_internal/cluster_autoscaler/util.py`). Node groups with their resources and max_count. Ray 2.60's
   own autoscalers do not report it yet; later ones do.
2. The config file the autoscaler was started with: `ray start --head --autoscaling-config=PATH` (the cluster
   launcher writes `~/ray_bootstrap_config.yaml` on the head). The running autoscaler (`monitor.py`) publishes its
   status in the GCS key `__autoscaling_status` (`ray_constants.DEBUG_AUTOSCALING_STATUS`, what `ray status` reads)
   with its `monitor_pid`; on the head, where `ray job submit` runs the driver, that process's command line names
   the file and the GCS it serves (`ray/_private/services.py: start_monitor`). A monitor without a config file is
   the read-only autoscaler every plain `ray start --head` / `ray.init()` runs: it launches nothing.
3. Neither (KubeRay, whose autoscaler reads the RayCluster from the Kubernetes API in its own container; or a
   driver on another machine than the autoscaler): an autoscaler may add nodes, but which is unknown. Preflight
   then only warns, and concurrency comes from the spec's max_concurrent (or the live nodes).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml

from resnet_lab.spec.sweep import Resources

HEAD_MARKER = "node:__internal_head__"  # a resource only the head node has
UNLIMITED = -1  # a node group's max_count when the autoscaler sets no cap
MEMORY = ("memory", "object_store_memory")  # bytes: left out of what people read


@dataclass(frozen=True)
class NodeType:
    """A kind of worker node the autoscaler may launch: its resources and how many of it at most."""

    name: str
    resources: Mapping[str, float]
    max_workers: int  # UNLIMITED when uncapped


@dataclass(frozen=True)
class Capacity:
    """The cluster as the preflight sees it."""

    live: list[Mapping[str, float]]  # resources of each alive node
    head: Mapping[str, float] | None  # the live head node's resources (also in `live`)
    launchable: list[NodeType] = field(default_factory=list)
    max_workers: int = UNLIMITED  # the autoscaler's cap on worker nodes of all types together
    source: str = ""  # where `launchable` came from ("" when no autoscaler's node types were found)
    autoscaling: bool = False  # an autoscaler runs (even when its node types could not be read)


def node_fits(node: Mapping[str, float], demand: Mapping[str, float]) -> int:
    """How many bundles of `demand` one node holds (Ray packs by each resource separately)."""
    counts = [math.floor(node.get(key, 0.0) / need + 1e-9) for key, need in demand.items() if need > 0]
    return min(counts) if counts else 0


def reachable_slots(capacity: Capacity, demand: Mapping[str, float]) -> int:
    """Bundles of `demand` the cluster holds at once once the autoscaler has launched every node it may; the
    live nodes alone when it launches nothing; sys.maxsize when a node type is uncapped."""
    live = sum(node_fits(node, demand) for node in capacity.live)
    if not capacity.launchable:
        return live
    head = node_fits(capacity.head, demand) if capacity.head else 0
    per_type = sorted(((node_fits(t.resources, demand), t.max_workers) for t in capacity.launchable), reverse=True)
    budget = capacity.max_workers
    grown = head
    for fits, count in per_type:  # the roomiest types first, within the cluster-wide worker cap
        if fits == 0:
            continue
        if count == UNLIMITED and budget == UNLIMITED:
            return sys.maxsize
        take = budget if count == UNLIMITED else count if budget == UNLIMITED else min(count, budget)
        grown += fits * take
        if budget != UNLIMITED:
            budget -= take
    return max(live, grown)


def largest(capacity: Capacity, key: str) -> float:
    """The most of one resource a single node has or can be launched with."""
    nodes = [*capacity.live, *(t.resources for t in capacity.launchable if t.max_workers != 0)]
    return max((n.get(key, 0.0) for n in nodes), default=0.0)


def describe(capacity: Capacity) -> str:
    """One line for people: the launchable node types and where they were read."""
    if not capacity.launchable:
        return "no autoscaler node types known"
    kinds = ", ".join(f"{t.name} x{'unlimited' if t.max_workers == UNLIMITED else t.max_workers} "
                      f"{{{', '.join(f'{k}: {v:g}' for k, v in sorted(t.resources.items()) if k not in MEMORY)}}}"
                      for t in capacity.launchable)
    return f"autoscaler node types {kinds} (from {capacity.source})"


def resource_problems(res: Resources, capacity: Capacity) -> list[str]:
    """Why a trial of `res` could never start on this cluster, nodes the autoscaler may launch included ([] when
    it can)."""
    nodes = "the largest node" + (f" (live, or of the {describe(capacity)})" if capacity.launchable else "")
    best_cpu, best_gpu = largest(capacity, "CPU"), largest(capacity, "GPU")
    problems = []
    if res.cpu > best_cpu:
        problems.append(f"resources.cpu: {res.cpu:g} per worker, but {nodes} has {best_cpu:g} CPUs")
    if res.gpu > best_gpu:
        problems.append(f"resources.gpu: {res.gpu:g} per worker, but {nodes} has {best_gpu:g} GPUs")
    if not problems and reachable_slots(capacity, {"CPU": res.cpu, "GPU": res.gpu}) < res.workers:
        what = "no single node holds" if res.workers == 1 else f"{res.workers} workers x"
        problems.append(f"resources: {what} ({res.cpu:g} CPU, {res.gpu:g} GPU) exceed what the cluster holds "
                        f"({describe(capacity) if capacity.launchable else 'live nodes only'})")
    return problems


def concurrency_limit(res: Resources, capacity: Capacity, total: int) -> int:
    """Trials at once when the spec sets none: as many as the cluster holds once the autoscaler has launched every
    node it may (pending trials are the demand that makes it launch them), at least 1, at most `total`."""
    slots = reachable_slots(capacity, {"CPU": res.cpu, "GPU": res.gpu})
    return max(1, min(slots // res.workers, total))


# --- reading the cluster ------------------------------------------------------------------------------------------


def read_capacity() -> Capacity:
    """The connected cluster's live nodes and, when an autoscaler runs, the node types it may launch."""
    live = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
    head = next((r for r in live if HEAD_MARKER in r), None)
    found = _from_gcs_cluster_config()
    if found is not None:
        return Capacity(live, head, found[0], found[1], "the GCS cluster config", True)
    status = _autoscaler_status()
    if status is None:
        return Capacity(live, head)
    options = _local_monitor_options(int(status.get("monitor_pid", -1)))
    if options is None:  # the autoscaler runs elsewhere (another machine, KubeRay's own container)
        return Capacity(live, head, autoscaling=True)
    path = options.get("--autoscaling-config")
    if not path:  # Ray's read-only autoscaler of a plain `ray start` / `ray.init()` cluster: it launches nothing
        return Capacity(live, head)
    path = os.path.expanduser(path)
    try:
        config = yaml.safe_load(Path(path).read_text())  # YAML or JSON, as the autoscaler itself accepts
    except (OSError, yaml.YAMLError):
        return Capacity(live, head, autoscaling=True)
    types, cap = node_types_from_config(config)
    return Capacity(live, head, types, cap, f"the autoscaler's config file {path}", True)


def _autoscaler_status() -> dict[str, Any] | None:
    """The status the v1 autoscaler publishes in the GCS every update (None when no autoscaler has written it)."""
    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    with contextlib.suppress(ValueError):
        return json.loads(raw)
    return None


def _from_gcs_cluster_config() -> tuple[list[NodeType], int] | None:
    """Node groups from the cluster config an autoscaler reported to the GCS (none do in Ray 2.60's own
    autoscalers; later ones and custom ones may)."""
    from ray._private import state

    try:
        config = state.state.get_cluster_config()
    except Exception:  # an older GCS without the key: not an error of ours
        return None
    if config is None or not config.node_group_configs:
        return None
    types = [NodeType(g.name, {k: float(v) for k, v in g.resources.items()}, int(g.max_count))
             for g in config.node_group_configs if HEAD_MARKER not in g.resources]
    return types, UNLIMITED


def _local_monitor_options(pid: int) -> dict[str, str] | None:
    """`--option=value` arguments of process `pid` if it is Ray's autoscaler (monitor.py) for the GCS we are
    connected to, running on this machine; None otherwise (a PID from another machine may name anything here)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not any(a.endswith("monitor.py") for a in argv):
        return None
    options = dict(a.split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if options.get("--gcs-address") != ray.get_runtime_context().gcs_address:
        return None
    return options


def node_types_from_config(config: Mapping[str, Any]) -> tuple[list[NodeType], int]:
    """Worker node types and the cluster-wide worker cap of a cluster launcher config (the autoscaler's
    defaults: a type's max_workers falls back to the cluster's max_workers, which defaults to 2)."""
    cap = int(config.get("max_workers", 2))
    head_type = config.get("head_node_type")
    types = [NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                      int(spec.get("max_workers", cap)))
             for name, spec in (config.get("available_node_types") or {}).items() if name != head_type]
    return types, cap

