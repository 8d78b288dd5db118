#!/usr/bin/env python
"""A real multi-node Ray cluster on one machine, over loopback: `python clusters/local_cluster.py up|down`.

Each node is its own `ray start ... --block` process in a new session, so every process of that node (GCS, raylet,
agents, the trial workers the raylet forks) shares that session id: stopping a node means signalling the PIDs of
its session, never `ray stop` (which kills every Ray process on the host, other users' clusters included).

Facts this relies on (Ray 2.60, measured on these machines):
- `--node-ip-address=127.0.0.1` is silently replaced by the host's address; 127.0.0.2 stays on loopback.
- Ray 2.60 has token auth on: head, workers and every driver need the same `RAY_AUTH_MODE=token` and token. Each
  cluster writes its own token under its root and points `RAY_AUTH_TOKEN_PATH` at it (so a fresh home without
  `~/.ray/auth_token` works, and no other cluster on the host shares the secret); `LocalCluster.driver_env()` gives
  a driver that environment.
- Each node gets its own `--temp-dir`, so a worker process's log (`python-core-worker-<id>_<pid>.log`, which
  records Ray's `node_id`) says which node ran it: `node_of_pid()`.
- Fixed default ports (Ray client 10001, dashboard agent 52365) would collide with other clusters on the host;
  every node gets free ones.

Linux only: processes are found through /proc. Standard library only: the nodes run Ray's own CLI.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

NODE_IP = "127.0.0.2"
STATE_FILE = "cluster.json"
AUTOSCALING_FILE = "autoscaling.json"
TOKEN_FILE = "auth_token"
DEFAULT_ROOT = Path(tempfile.gettempdir()) / "resnet-lab-cluster"
# Ray's unix sockets live under <temp-dir>/session_<date>_<pid>/sockets/...: about 70 characters below the root,
# and a socket path may be at most 107 bytes.
MAX_ROOT_CHARS = 32
# Object store per node: Ray's default is 30% of RAM per node; trials here pass only configs and file checkpoints.
OBJECT_STORE_BYTES = 256 * 2**20
STARTED = "Ray runtime started"
NODE_ID_RE = re.compile(r"node_id=([0-9a-f]{56})")


class ClusterError(RuntimeError):
    """A node did not come up, or did not go away."""


@dataclass
class Node:
    """One `ray start --block` process and where its session lives."""

    role: str  # "head" or "worker-<i>"
    pid: int  # the `ray start --block` process; it leads the session of every process of this node
    temp_dir: str
    log: str
    node_id: str = ""  # Ray's node id (56 hex digits), from the raylet's log
    start_s: float = 0.0


@dataclass
class LocalCluster:
    """A running loopback cluster: its GCS address, root directory and nodes."""

    address: str
    root: str
    nodes: list[Node] = field(default_factory=list)
    startup_s: float = 0.0

    def driver_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for a driver process (`python sweep.py ... --address`): the nodes' auth mode and token."""
        return node_env(Path(self.root), base)

    def save(self) -> Path:
        """Write the cluster's state next to its nodes, for `down` from another process."""
        path = Path(self.root) / STATE_FILE
        path.write_text(json.dumps(asdict(self), indent=2))
        return path

    @classmethod
    def load(cls, root: Path) -> LocalCluster:
        """Read the state `up` wrote."""
        data = json.loads((Path(root) / STATE_FILE).read_text())
        return cls(data["address"], data["root"], [Node(**n) for n in data["nodes"]], data["startup_s"])


def node_env(root: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every node and driver of the cluster under `root` shares."""
    env = dict(os.environ if base is None else base)
    env["RAY_AUTH_MODE"] = "token"  # must match on head, workers and drivers, or workers fail with InvalidAuthToken
    env["RAY_AUTH_TOKEN_PATH"] = str(root / TOKEN_FILE)
    env.pop("RAY_AUTH_TOKEN", None)  # a token in the environment may win over the file
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def write_token(root: Path) -> None:
    """A fresh token for this cluster, readable by its owner only (256 bits, as `ray get-auth-token --generate`)."""
    path = root / TOKEN_FILE
    path.touch(mode=0o600, exist_ok=True)
    path.write_text(secrets.token_hex(32))


def free_port(host: str = NODE_IP) -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ray_cli() -> list[str]:
    """The `ray` command of this interpreter (the same Ray the driver imports)."""
    return [sys.executable, "-m", "ray.scripts.scripts"]


# --- processes ----------------------------------------------------------------------------------------------------


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a live process, None when it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[3])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def node_pids(node: Node) -> set[int]:
    """Live processes of a node: its session, plus anything whose command line names its temp dir."""
    names_dir = re.compile(re.escape(node.temp_dir) + r"(?=[/\s]|$)")
    found = set()
    for pid in _all_pids():
        stat = _proc_stat(pid)
        if stat is None:
            continue
        if stat[1] == node.pid or (pid != os.getpid() and names_dir.search(_cmdline(pid))):
            found.add(pid)
    return found


def alive(pids: Iterable[int]) -> set[int]:
    """The PIDs that still run (zombies count as gone)."""
    return {pid for pid in pids if _proc_stat(pid) is not None}


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: set[int], timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    left = alive(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = alive(left)
    return left


# --- start --------------------------------------------------------------------------------------------------------


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _read_node_id(temp_dir: str) -> str:
    """Ray's id of the node whose raylet logs under temp_dir ("" until the raylet has written it)."""
    for log in Path(temp_dir).glob("session_*/logs/raylet.out"):
        match = NODE_ID_RE.search(log.read_text(errors="replace"))
        if match:
            return match.group(1)
    return ""


def _wait_started(proc: subprocess.Popen[bytes], node: Node, timeout_s: float) -> None:
    """Until `ray start` says the node runs and its raylet has logged its node id."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ClusterError(f"{node.role}: `ray start` exited with {proc.returncode}; its log "
                               f"({node.log}) ends:\n{_tail(node.log)}")
        if STARTED in Path(node.log).read_text(errors="replace"):
            node.node_id = node.node_id or _read_node_id(node.temp_dir)
            if node.node_id:
                return
        time.sleep(0.2)
    raise ClusterError(f"{node.role}: not up after {timeout_s:.0f} s; its log ({node.log}) ends:\n{_tail(node.log)}")


def start_node(role: str, args: list[str], root: Path, timeout_s: float,
               extra_env: dict[str, str] | None = None) -> Node:
    """Run `ray start <args> --block` as the leader of a new session and wait until the node is up."""
    temp_dir = root / role
    shutil.rmtree(temp_dir, ignore_errors=True)  # a stopped cluster's logs would confuse node_of_pid()
    temp_dir.mkdir(parents=True)
    log = root / f"{role}.log"
    begin = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen([*ray_cli(), "start", *args, f"--temp-dir={temp_dir}", "--block"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**node_env(root), **(extra_env or {})},
                                start_new_session=True)
    node = Node(role, proc.pid, str(temp_dir), str(log))
    try:
        _wait_started(proc, node, timeout_s)
    except BaseException:
        stop_node(node)
        raise
    node.start_s = time.perf_counter() - begin
    return node


def _common_args(cpus: int, object_store_bytes: int) -> list[str]:
    return [f"--num-cpus={cpus}", "--num-gpus=0", f"--node-ip-address={NODE_IP}",
            f"--object-store-memory={object_store_bytes}", f"--dashboard-agent-listen-port={free_port()}"]


def _check_root(root: Path | str | None) -> Path:
    """The absolute root, created; refused when too long for Ray's sockets or still holding a cluster."""
    root = Path(root or DEFAULT_ROOT).absolute()
    if len(str(root)) > MAX_ROOT_CHARS:
        raise ClusterError(f"cluster root {root} is {len(str(root))} characters; Ray's unix sockets under it would "
                           f"pass the 107-byte limit: use a root of at most {MAX_ROOT_CHARS}, e.g. /tmp/rl-XXXX")
    if (root / STATE_FILE).exists():
        raise ClusterError(f"a cluster started under {root} is still recorded ({root / STATE_FILE}); stop it first: "
                           f"python clusters/local_cluster.py down --root {root}")
    root.mkdir(parents=True, exist_ok=True)
    return root


def start(root: Path | str | None = None, workers: int = 1, cpus_per_node: int = 1, timeout_s: float = 120.0,
          object_store_bytes: int = OBJECT_STORE_BYTES) -> LocalCluster:
    """Start a head and `workers` worker nodes on 127.0.0.2, each with `cpus_per_node` CPUs and its own temp dir.

    root must be short (Ray's socket paths live below it); it is created if missing, and must not hold a running
    cluster. On any failure the nodes already started are stopped before the error propagates.
    """
    root = _check_root(root)
    write_token(root)
    port = free_port()
    begin = time.perf_counter()
    cluster = LocalCluster(f"{NODE_IP}:{port}", str(root))
    try:
        cluster.nodes.append(start_node(
            "head", ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
                     "--include-dashboard=false", "--disable-usage-stats",
                     *_common_args(cpus_per_node, object_store_bytes)], root, timeout_s))
        for i in range(workers):
            cluster.nodes.append(start_node(
                f"worker-{i + 1}", [f"--address={cluster.address}", *_common_args(cpus_per_node, object_store_bytes)],
                root, timeout_s))
    except BaseException:
        stop(cluster)
        raise
    cluster.startup_s = time.perf_counter() - begin
    cluster.save()
    return cluster


def autoscaling_config(address: str, head_cpus: int, worker_types: dict[str, dict[str, Any]], max_workers: int,
                       idle_timeout_minutes: float = 5.0) -> dict[str, Any]:
    """A cluster launcher config for Ray's `fake_multinode` provider: the real autoscaler (Ray's monitor), which
    launches worker nodes as local processes with the resources each node type declares (`GPU` included).

    worker_types: name -> {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 2} (min_workers defaults to 0).
    Keys follow Ray's fake_multi_node/example.yaml (not shipped in the wheel); the head type needs max_workers 0.
    """
    types: dict[str, dict[str, Any]] = {
        "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0}}
    for name, kind in worker_types.items():
        resources = {"object_store_memory": OBJECT_STORE_BYTES, **kind["resources"]}
        types[name] = {"resources": resources, "node_config": {}, "min_workers": kind.get("min_workers", 0),
                       "max_workers": kind["max_workers"]}
    return {
        "cluster_name": "resnet-lab-fake", "max_workers": max_workers, "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        # One node per launch request whatever its count (the provider's default, as in Ray's v1 tests): the
        # autoscaler asks again for what is still missing. launch_multiple starts them together, and on 2 busy
        # cores their start-ups timed out ("Failed to get node info ... Deadline Exceeded").
        "provider": {"type": "fake_multinode", "gcs_address": address, "use_node_id_as_ip": True,
                     "disable_node_updaters": True, "disable_launch_config_check": True},
        "available_node_types": types, "head_node_type": "ray.head.default", "auth": {}, "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [], "file_mounts": {},
        "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def start_autoscaling(root: Path | str, worker_types: dict[str, dict[str, Any]], head_cpus: int = 0,
                      max_workers: int | None = None, idle_timeout_minutes: float = 5.0,
                      timeout_s: float = 120.0) -> LocalCluster:
    """A head on 127.0.0.2 with `head_cpus` CPUs and Ray's autoscaler, which adds worker nodes of `worker_types`
    (from 0) while trials wait for resources, as on a cloud cluster; no worker node at the start.

    The autoscaler's worker nodes are processes it forks (raylet, agents, trial workers): they run in the head's
    session and log under the head's temp dir, so `stop()` and `node_of_pid()` cover them through the head.
    `scaling_events()` reads the autoscaler's log for when it added or removed which node.
    """
    root = _check_root(root)
    write_token(root)
    port = free_port()
    address = f"{NODE_IP}:{port}"
    cap = max_workers if max_workers is not None else sum(k["max_workers"] for k in worker_types.values())
    config = root / AUTOSCALING_FILE
    config.write_text(json.dumps(autoscaling_config(address, head_cpus, worker_types, cap, idle_timeout_minutes)))
    begin = time.perf_counter()
    cluster = LocalCluster(address, str(root))
    # RAY_FAKE_CLUSTER lets the fake provider load; the autoscaler updates every second instead of every 5 s.
    extra_env = {"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    try:
        cluster.nodes.append(start_node(
            "head", ["--head", f"--port={port}", f"--ray-client-server-port={free_port()}",
                     "--include-dashboard=false", "--disable-usage-stats", f"--autoscaling-config={config}",
                     *_common_args(head_cpus, OBJECT_STORE_BYTES)], root, timeout_s, extra_env))
    except BaseException:
        stop(cluster)
        raise
    cluster.startup_s = time.perf_counter() - begin
    cluster.save()
    return cluster


# What the autoscaler logs in monitor.log (autoscaler/_private/node_launcher.py, autoscaler.py), each line with a
# timestamp: "NodeLauncher0: Got 2 nodes to launch.", then "... Launching 2 nodes, type gpu_worker." once the
# provider has created them or "... Failed to launch {} node(s) of type gpu_worker." (a node whose start timed out
# may still join later), and "StandardAutoscaler: Terminating the node with id ... (reason)".
EVENT_RE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+).*?(?:"
    r"Got (?P<request>\d+) nodes to launch\.|"
    r"Launching (?P<count>\d+) nodes, type (?P<type>[\w.-]+)\.|"
    r"Failed to launch \S+ node\(s\) of type (?P<failed>[\w.-]+)\.|"
    r"Terminating the node with id (?P<node>\S+) .*?\((?P<why>.*)\))$", re.M)


@dataclass(frozen=True)
class ScalingEvent:
    """One step of the autoscaler, from its log."""

    time: str  # as the autoscaler logged it (local time, milliseconds)
    action: str  # "request", "launch", "launch failed" or "terminate"
    count: int
    detail: str  # the node type, or the reason for terminating


def scaling_events(cluster: LocalCluster) -> list[ScalingEvent]:
    """What the autoscaler of an autoscaling cluster has requested, launched and terminated so far, in order."""
    head = cluster.nodes[0]
    found: list[ScalingEvent] = []
    for session in sorted(Path(head.temp_dir).glob("session_*")):
        log = session / "logs" / "monitor.log"
        if session.is_symlink() or not log.exists():  # session_latest points at the same session
            continue
        for m in EVENT_RE.finditer(log.read_text(errors="replace")):
            if m["request"]:
                found.append(ScalingEvent(m["time"], "request", int(m["request"]), ""))
            elif m["count"]:
                found.append(ScalingEvent(m["time"], "launch", int(m["count"]), m["type"]))
            elif m["failed"]:
                found.append(ScalingEvent(m["time"], "launch failed", 0, m["failed"]))
            else:
                found.append(ScalingEvent(m["time"], "terminate", 1, m["why"]))
    return found


# --- stop ---------------------------------------------------------------------------------------------------------


def stop_node(node: Node, grace_s: float = 30.0) -> set[int]:
    """Stop one node by PID: SIGTERM to `ray start --block` (it stops its services), then SIGTERM, then SIGKILL
    to whatever of its session is left. Returns the PIDs still alive afterwards (empty when all went)."""
    pids = node_pids(node) | {node.pid}
    _signal([node.pid], signal.SIGTERM)
    left = _wait_gone(pids, grace_s / 2)
    left |= node_pids(node)  # a process forked while we waited
    if left:
        _signal(left, signal.SIGTERM)  # gcs_server may ignore SIGTERM for 20 s+ (PLATFORM_NOTES)
        left = _wait_gone(left, grace_s / 2)
    if left:
        _signal(left, signal.SIGKILL)
        left = _wait_gone(left, 5.0)
    return left


def stop(cluster: LocalCluster, grace_s: float = 30.0) -> set[int]:
    """Stop every node, workers first, the head (GCS) last. Returns the PIDs that survived (empty on success)."""
    survivors: set[int] = set()
    for node in reversed(cluster.nodes):
        survivors |= stop_node(node, grace_s)
    state = Path(cluster.root) / STATE_FILE
    if not survivors and state.exists():
        state.unlink()
    return survivors


def cluster_pids(cluster: LocalCluster) -> set[int]:
    """Every live process that belongs to the cluster's nodes."""
    return set().union(*(node_pids(n) for n in cluster.nodes)) if cluster.nodes else set()


# --- which node ran a process -------------------------------------------------------------------------------------


def node_of_pid(cluster: LocalCluster, pid: int) -> str | None:
    """Ray's node id of the node that ran worker process `pid`, from that worker's own log, or None if no node
    logged such a worker. Works after the process has exited: the log stays in the node's temp dir."""
    for node in cluster.nodes:
        for log in Path(node.temp_dir).glob(f"session_*/logs/python-core-worker-*_{pid}.log"):
            match = NODE_ID_RE.search(log.read_text(errors="replace"))
            if match:
                return match.group(1)
    return None


# --- CLI ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`up` starts a cluster and prints how to use it; `down` stops the one `up` started under the same root."""
    parser = argparse.ArgumentParser(prog="python clusters/local_cluster.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a head and worker nodes on 127.0.0.2")
    up.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default 1)")
    up.add_argument("--cpus", type=int, default=1, help="CPUs each node advertises (default 1)")
    up.add_argument("--autoscale", type=int, metavar="MAX", default=0,
                    help="instead: a head with 0 CPUs and Ray's autoscaler adding up to MAX worker nodes while trials "
                         "wait (fake_multinode provider), each with --cpus CPUs and --gpus declared GPUs")
    up.add_argument("--gpus", type=int, default=1, help="GPUs each autoscaled worker declares (default 1; not real: "
                                                       "train with device: cpu)")
    down = sub.add_parser("down", help="stop the nodes `up` started, by PID")
    for p in (up, down):
        p.add_argument("--root", type=Path, default=DEFAULT_ROOT, help=f"nodes' temp dirs (default {DEFAULT_ROOT})")
    args = parser.parse_args(argv)
    if args.command == "up":
        try:
            if args.autoscale:
                worker = {"resources": {"CPU": args.cpus, "GPU": args.gpus}, "max_workers": args.autoscale}
                cluster = start_autoscaling(args.root, {"gpu_worker": worker})
            else:
                cluster = start(args.root, args.workers, args.cpus)
        except ClusterError as exc:
            print(exc, file=sys.stderr)
            return 1
        for node in cluster.nodes:
            print(f"{node.role:>9}: pid {node.pid}, node id {node.node_id[:12]}, up in {node.start_s:.1f} s")
        print(f"cluster at {cluster.address} up in {cluster.startup_s:.1f} s\n"
              f"  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={Path(cluster.root) / TOKEN_FILE}\n"
              f"  python sweep.py SPEC --address {cluster.address}\n"
              f"  python clusters/local_cluster.py down --root {cluster.root}")
        return 0
    try:
        cluster = LocalCluster.load(args.root)
    except FileNotFoundError:
        print(f"no cluster recorded under {args.root}", file=sys.stderr)
        return 1
    survivors = stop(cluster)
    if survivors:
        print(f"still running after SIGKILL: {sorted(survivors)}", file=sys.stderr)
        return 1
    print(f"stopped {len(cluster.nodes)} nodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
