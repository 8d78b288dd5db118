"""Per-trial figures rendered in a helper process at the lowest CPU priority.

A trial's two PNGs cost ~0.8 s of CPU (matplotlib layout and Agg drawing, profiled) plus ~0.7 s to import
matplotlib. On one machine the trials hold every core, so rendering in the driver would take that CPU from them
(and hold the GIL Tune's event loop needs). A separate process at idle priority renders on spare CPU.

Why not `multiprocessing`/`ProcessPoolExecutor`: spawn and forkserver re-import the driver's `__main__`, which
re-runs a user's script that has no `if __name__ == "__main__":` guard (a whole second sweep), and fork copies a
process full of Ray and gRPC threads. A plain child process running this module, fed one JSON line per job, has
neither problem.

Idle priority alone was not enough: with every core held by a trial, the renderer still slowed the trials' epochs
(`benchmarks/sweep_overhead.py`, figures on vs off: 0.4 s more per trial on 2 cores). So the callback also waits,
before each job, until this machine has a spare core (`wait_for_spare_cpu`); jobs left when the sweep ends are drawn
then.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def render_trial_figures(directory: str, name: str, history: list[dict[str, float]],
                         grads: dict[str, float]) -> list[str]:
    """A trial's learning curves and (when measured) gradient flow as PNGs in `directory`; their paths."""
    from resnet_lab import plots  # matplotlib: only in the renderer process

    files = [plots.learning_curves(history, Path(directory) / "learning_curves.png", name)]
    flow = plots.trial_gradient_flow(grads, Path(directory) / "gradient_flow.png", name) if grads else None
    if flow is not None:
        files.append(flow)
    return [str(f) for f in files]


SPARE_CORES = 0.75  # idle cores (of this machine, averaged over one poll) that let a figure job start


def _cpu_times() -> tuple[float, float] | None:
    """(idle, total) jiffies of all CPUs since boot, from /proc/stat; None where there is no /proc (not Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal (guest time is already inside user and nice)
    return fields[3] + fields[4], sum(fields[:8])


def wait_for_spare_cpu(stop: threading.Event, poll_s: float = 1.0, cores: float | None = None) -> None:
    """Return once this machine had `cores` (default SPARE_CORES) idle over the last `poll_s` (Ray's workers at
    nice 15 count as busy), or as soon as `stop` is set (the sweep ended: draw what is left). Returns at once
    where /proc is missing."""
    cores = SPARE_CORES if cores is None else cores
    ncpu = os.cpu_count() or 1
    before = _cpu_times()
    while before is not None and not stop.wait(poll_s):
        after = _cpu_times()
        if after is None:
            return
        idle, total = after[0] - before[0], after[1] - before[1]
        if total > 0 and idle / total * ncpu >= cores:
            return
        before = after


class FigureRenderer:
    """The driver's handle on the renderer process; one caller at a time (the callback's upload thread)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def render(self, directory: str, name: str, history: list[dict[str, float]],
               grads: dict[str, float]) -> list[str]:
        """Render one trial's figures into `directory`; raises RuntimeError when the renderer fails."""
        if self._proc is None or self._proc.poll() is not None:
            package_root = str(Path(__file__).resolve().parents[2])  # importable even from an uninstalled checkout
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root,
                                                                            os.environ.get("PYTHONPATH")]))}
            self._proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, text=True, start_new_session=True, env=env)
        assert self._proc.stdin is not None and self._proc.stdout is not None
        job = {"directory": directory, "name": name, "history": history, "grads": grads}
        try:
            self._proc.stdin.write(json.dumps(job) + "\n")
            self._proc.stdin.flush()
            answer = self._proc.stdout.readline()
        except (BrokenPipeError, OSError) as exc:
            raise RuntimeError(f"the figure renderer exited ({exc})") from None
        if not answer:
            raise RuntimeError(f"the figure renderer exited (code {self._proc.wait()})")
        reply: dict[str, Any] = json.loads(answer)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return list(reply["files"])

    def close(self) -> None:
        """End the renderer (it exits when its input closes)."""
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
            self._proc = None


def _idle_priority() -> None:
    """Run only on otherwise idle CPU. Ray starts its workers at nice 15, so nice 19 alone would still take ~30% of
    a core from a trial (measured: the renderer at 74% CPU beside two trials); Linux's SCHED_IDLE runs after both."""
    if hasattr(os, "nice"):
        os.nice(19)
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        with contextlib.suppress(OSError):  # not permitted in some containers: nice 19 stays
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def main() -> int:
    """Renderer loop: one JSON job per input line, one JSON answer per output line, until input closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle (its own session anyway)
    _idle_priority()
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w")  # the protocol's channel; stray prints go to stderr
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    for line in sys.stdin:
        job = json.loads(line)
        try:
            files = render_trial_figures(job["directory"], job["name"], job["history"], job["grads"])
            reply: dict[str, Any] = {"files": files}
        except Exception as exc:  # one bad figure must not end the renderer
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        answers.write(json.dumps(reply) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
