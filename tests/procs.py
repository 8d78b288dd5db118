"""Process helpers for tests that kill real processes: only ever the PIDs a test started (or their children).

Waits here always end: on the condition, or at a deadline with an AssertionError saying what never happened.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def children_of() -> dict[int, list[int]]:
    """ppid -> child pids, read from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, depth first."""
    tree, out, stack = children_of(), [], [pid]
    while stack:
        for child in tree.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


def cmdline(pid: int) -> str:
    """The process's command line (a Ray worker shows its task there, e.g. `ray::ImplicitFunc.train`); "" if gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text().split("State:", 1)[1].split("\n", 1)[0]
    except (OSError, IndexError):
        return False


def kill_all(pids: list[int], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `grace_s` (gcs_server may ignore SIGTERM for 20 s+)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_until(condition: Callable[[], T | None], timeout_s: float, what: str, poll_s: float = 0.2,
               retry_on: tuple[type[BaseException], ...] = ()) -> T:
    """Poll `condition` until it returns something truthy (returned), or fail after `timeout_s` naming `what`.

    `retry_on`: exceptions that mean "not yet" (a store still being created), retried like a falsy result.
    """
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except retry_on as exc:
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"after {timeout_s:.0f} s still waiting for {what}"
                                 + (f" (last error: {type(last).__name__}: {last})" if last else ""))
        time.sleep(poll_s)


class Watched:
    """A child process whose stdout and stderr are read line by line by two threads.

    A wait for a line has a real deadline (a blocked `readline()` has none), and neither pipe is ever left unread,
    so a chatty child cannot fill one and stall.
    """

    def __init__(self, cmd: Sequence[str], cwd: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self._lines: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self._closed: set[str] = set()
        self._changed = threading.Condition()
        self._readers = [threading.Thread(target=self._read, args=(name, pipe), daemon=True, name=f"read-{name}")
                         for name, pipe in (("stdout", self.proc.stdout), ("stderr", self.proc.stderr))]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self, name: str, pipe: Any) -> None:
        for line in pipe:
            with self._changed:
                self._lines[name].append(line)
                self._changed.notify_all()
        with self._changed:
            self._closed.add(name)
            self._changed.notify_all()

    @property
    def stdout(self) -> str:
        with self._changed:
            return "".join(self._lines["stdout"])

    @property
    def stderr(self) -> str:
        with self._changed:
            return "".join(self._lines["stderr"])

    def wait_for_line(self, needle: str, timeout_s: float) -> str:
        """The first stdout line containing `needle`; AssertionError (with the output so far) at the deadline or
        when stdout closes first."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            seen = 0
            while True:
                for line in self._lines["stdout"][seen:]:
                    if needle in line:
                        return line
                seen = len(self._lines["stdout"])
                remaining = deadline - time.monotonic()
                if "stdout" in self._closed or remaining <= 0:
                    why = "stdout closed" if "stdout" in self._closed else f"{timeout_s:.0f} s passed"
                    raise AssertionError(f"{why} before a line with {needle!r}; stdout:\n"
                                         f"{''.join(self._lines['stdout'])}\nstderr:\n{''.join(self._lines['stderr'])}")
                self._changed.wait(remaining)

    def finish(self, timeout_s: float) -> tuple[int, str, str]:
        """Wait for the exit (subprocess.TimeoutExpired after `timeout_s`); (exit code, stdout, stderr)."""
        code = self.proc.wait(timeout=timeout_s)
        for reader in self._readers:  # orphans that inherited the pipes (Ray after a SIGKILL) may hold them open
            reader.join(timeout=10)
        return code, self.stdout, self.stderr
