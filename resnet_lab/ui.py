"""`python sweep.py ui [SPEC_OR_EXPERIMENT]`: the MLflow UI for the sweep's tracking store, on 127.0.0.1.

Starts `mlflow server` as a child process (its own process group, so Ctrl-C reaches us and we stop all of it),
waits until it answers, prints the URL of the experiment's runs table and waits. MLflow 3 opens in GenAI mode at
`/`; the runs table is at `/#/experiments/<id>/runs`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType

from resnet_lab import console

EXIT_USAGE, EXIT_SERVER = 2, 1
READY_TIMEOUT_S = 120.0  # measured: ~15 s to answer on 2 loaded cores
STOP_GRACE_S = 10.0


def build_parser() -> argparse.ArgumentParser:
    """The `sweep.py ui` command line."""
    p = argparse.ArgumentParser(prog="python sweep.py ui",
                                description="Serve the MLflow UI for a sweep's tracking store; Ctrl-C stops it.")
    p.add_argument("target", nargs="?", default=None, metavar="SPEC_OR_EXPERIMENT",
                   help="the sweep's spec (YAML) or MLflow experiment; default: the experiment of the newest sweep")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///./mlflow.db)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default 5000)")
    return p


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout_s: float = READY_TIMEOUT_S) -> bool:
    """Poll the server's /health until it answers; False if it exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL after a grace period."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def server_command(uri: str, host: str, port: int) -> list[str]:
    """`mlflow server` for one local user: one worker is plenty and leaves the cores to training."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--registry-store-uri", uri,
            "--host", host, "--port", str(port), "--workers", "1",
            # An open browser tab keeps connections alive; without a bound uvicorn waits for it to close.
            "--uvicorn-opts", "--log-level warning --no-access-log --timeout-graceful-shutdown 3"]


def server_env() -> dict[str, str]:
    """The server's environment: MLflow's INFO lines and Python's deprecation warnings kept off the console."""
    env = dict(os.environ)
    env.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow 3.17's server otherwise starts a job runner and 7 huey consumers for GenAI jobs (evaluation, prompt
    # optimisation) that a runs table never submits: ~2 GB of memory and ~45 CPU-s at every start.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    # MLflow 3.17's own import of starlette.middleware.wsgi warns on every start; nothing a user can act on.
    env.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore:starlette.middleware.wsgi is deprecated")
    return env


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def resolve(args: argparse.Namespace) -> tuple[str, tuple[str, str] | None] | str:
    """(tracking URI, (experiment id, name) or None), or an error message."""
    from resnet_lab.report import resolve_target
    from resnet_lab.spec.errors import SpecError
    from resnet_lab.tracking import resolve_tracking_uri
    from resnet_lab.tracking.query import SweepNotFound, experiment_id

    try:
        experiment = resolve_target(args.target)[0] if args.target else None
        uri = resolve_tracking_uri(args.tracking_uri)
    except SpecError as exc:
        return str(exc)
    except ValueError as exc:
        return f"--tracking-uri: {exc}"
    try:
        found = experiment_id(uri, experiment)
    except SweepNotFound as exc:
        return str(exc)
    if experiment is not None and found is None:
        return f"no MLflow experiment '{experiment}' in {uri}; run the sweep first, or pass --tracking-uri"
    return uri, found


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sweep.py ui`; returns the exit code (0 after Ctrl-C)."""
    args = build_parser().parse_args(argv)
    resolved = resolve(args)
    if isinstance(resolved, str):
        console.error(resolved)
        return EXIT_USAGE
    uri, experiment = resolved
    if uri.startswith(("http://", "https://")):  # already an MLflow server: its UI is right there
        page = f"#/experiments/{experiment[0]}/runs" if experiment else ""
        console.info(f"{uri} is an MLflow server; open {uri.rstrip('/')}/{page}")
        return 0
    if not port_free(args.host, args.port):
        console.error(f"port {args.port} on {args.host} is in use; pick another with --port")
        return EXIT_USAGE
    shown_host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host  # a bind-all address is no URL
    base = f"http://{shown_host}:{args.port}"
    # SIGINT too: a process started in the background by a non-interactive shell (`sweep.py ui &`, nohup) inherits
    # SIGINT ignored, and Python then installs no KeyboardInterrupt handler: Ctrl-C / kill -INT would do nothing.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    proc = subprocess.Popen(server_command(uri, args.host, args.port), env=server_env(), start_new_session=True)
    try:
        console.info(f"starting the MLflow UI for {uri} ...")
        if not wait_ready(base, proc):
            console.error(f"the MLflow server did not start (exit code {proc.poll()}); see its output above")
            return EXIT_SERVER
        if experiment is None:
            console.info(f"MLflow UI: {base}/ (no sweep in this store yet)")
        else:
            console.info(f"runs of experiment '{experiment[1]}': {base}/#/experiments/{experiment[0]}/runs")
        console.info("Ctrl-C stops the server")
        code = proc.wait()
        console.error(f"the MLflow server exited with code {code}")
        return EXIT_SERVER
    except KeyboardInterrupt:
        console.info("stopping the MLflow UI")
        return 0
    finally:
        stop(proc)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
