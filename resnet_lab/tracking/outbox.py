"""The driver's MLflow writes, kept in order and retried while the tracking store is away.

A sweep must outlive its tracking server: on a cluster that is an `mlflow server` (Postgres behind it) that restarts
now and then. Every write of the driver goes through one `Outbox` per (store, sweep): a bounded FIFO applied by one
thread. A write returns as soon as it is queued (write-behind): Tune hands a trial its next step only after the
driver has handled its last result, so a driver waiting on MLflow (~40 ms a request on SQLite, more behind a server)
is a trial waiting too (benchmarks/scaling.py measured it). Writes to one run that are queued within `LINGER_S` of
each other go as one request (a trial's create and params with its first epochs, epochs that follow each other
closely): each request costs the driver CPU whatever its size. Reads (`SweepTracker._read`) wait for the queue
first, without lingering, so the driver always reads what it wrote. A SIGKILLed driver loses what was still queued
(with a healthy store, about the last second of writes), but Tune saves its experiment state only after the queue
is stored (`MlflowRuns.get_state`), so those writes are of results newer than any state `--resume` restores: the
resumed trials report them again. (Not while the store is away: nothing waits for it then.)
Once a write fails with a transient error (connection refused, HTTP 5xx, a locked SQLite file, Postgres
restarting), later writes queue behind it; the head of the queue is retried with back-off until it is stored.
When the store stays away longer than the give-up deadline the queue is saved to a spool file, the sweep is stopped
the way Ctrl-C stops it (Tune saves its state) and `--resume` sends the spooled writes first.

Replays are idempotent, so a write that reached the store before its connection broke is not stored twice:
- a trial's run is created only after searching for its trial-id tag under the sweep (a retried create would
  otherwise make a second run);
- params and tags are upserts in MLflow (an identical param may be logged again);
- metrics keep the timestamp taken when the epoch arrived, so a replay sends identical (key, value, timestamp,
  step) rows. MLflow's SQL stores (SQLite, Postgres, and a server in front of either) make those four fields part of
  the primary key and skip exact repeats (SqlAlchemyStore._log_metrics), but that is a property of one store
  family, not of `log_batch`: so a replayed batch is first checked against the stored history of its first key (one
  request, and only after a failure) and its metrics are left out when that step is there with that timestamp.
  A batch is one transaction in the SQL stores, so its first key stands for the whole batch.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import itertools
import json
import logging
import os
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

GIVE_UP_ENV = "RESNET_LAB_TRACKING_GIVE_UP_S"
DEFAULT_GIVE_UP_S = 600.0  # 10 minutes of a store that does not answer: longer than a server restart or failover
SPOOL_ENV = "RESNET_LAB_TRACKING_SPOOL"  # directory of the spool files (default ~/.cache/resnet_lab/tracking-spool)
MAX_PENDING = 10_000  # queued writes (about one per trial-epoch): past this, callers wait (back-pressure, no loss)
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)  # between retries of the head write; 15 s: a returning server is seen soon
# A run's write waits up to this long in the queue for more writes to the same run, sent with it in one request (a
# trial's epochs of a second or less, its params and first epoch). Each request costs the driver ~25 ms of CPU on
# SQLite whatever its size, CPU the trials share on a small machine (benchmarks/README.md). Reads and the sweep's
# end do not wait for it; an epoch reaches the MLflow UI at most this much later.
LINGER_S = 1.0
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # per log_batch request (MLflow's limits)
TAG_TRIAL_ID = "resnet_lab.trial_id"
PENDING_PREFIX = "trial:"  # a trial run not created yet is named by its trial id until it is
# MLflow error codes that no retry can fix (the request itself is wrong); any other failure is retried.
PERMANENT_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                             "INVALID_STATE", "ENDPOINT_NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED"})

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrackingUnavailable(RuntimeError):
    """The tracking store did not answer within the give-up deadline."""


def chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    """`items` in consecutive lists of at most `size` (MLflow's per-request limits)."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def give_up_s() -> float:
    """The give-up deadline: $RESNET_LAB_TRACKING_GIVE_UP_S seconds, else 10 minutes."""
    raw = os.environ.get(GIVE_UP_ENV)
    if not raw:
        return DEFAULT_GIVE_UP_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"${GIVE_UP_ENV} must be a number of seconds (got {raw!r})") from None
    if not value > 0 or value == float("inf"):
        raise ValueError(f"${GIVE_UP_ENV} must be > 0 and finite (got {raw!r})")
    return value


def spool_path(parent_id: str) -> Path:
    """Where the unsent writes of the sweep run `parent_id` are kept after a give-up."""
    base = os.environ.get(SPOOL_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "resnet_lab",
                                                      "tracking-spool")
    return Path(base) / f"{parent_id}.jsonl"


def is_transient(exc: BaseException) -> bool:
    """True for failures a retry can cure: the store unreachable, restarting, locked or overloaded."""
    if isinstance(exc, MlflowException):
        return exc.error_code not in PERMANENT_CODES
    return isinstance(exc, OSError | TimeoutError | ConnectionError) or "OperationalError" in type(exc).__name__


def describe(exc: BaseException) -> str:
    """The first line of an error, short enough for one console line."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


@dataclass
class Write:
    """One pending MLflow write: `op` on run `run` (a run id, or `trial:<id>` until the trial's run exists)."""

    op: str  # create_trial | batch | text | artifact | terminate | status
    run: str
    args: dict[str, Any]
    attempts: int = 0  # failed tries so far (replays from a spool count as tried: they may be stored already)
    queued_at: float = 0.0  # time.monotonic() when put (0: a replay, sent without lingering)

    @property
    def tags_key(self) -> str:
        """Where this write's run tags are: a create's own `tags` go on the new run, merged ones after it."""
        return "more_tags" if self.op == "create_trial" else "tags"

    def absorb(self, later: Write) -> bool:
        """Take `later`'s metrics, params and tags into this write (a batch, or a trial's create whose params
        follow it) when the sum fits one `log_batch`; False when it does not (nothing changes)."""
        if self.op not in ("batch", "create_trial") or later.op != "batch" or self.attempts or later.attempts:
            return False
        a, b = self.args, later.args
        sizes = {key: len(a.get(key, [])) + len(b.get(key, [])) for key in ("metrics", "params")}
        sizes["tags"] = len(a.get(self.tags_key, [])) + len(b.get("tags", []))
        if any(sizes[k] > BATCH_LIMITS[k] for k in sizes) or sum(sizes.values()) > BATCH_LIMITS["metrics"]:
            return False
        if {k for k, _ in a.get("params", [])} & {k for k, _ in b.get("params", [])}:
            return False  # MLflow refuses a batch naming a param twice (a tag named twice: the later one wins)
        for key, into in (("metrics", "metrics"), ("params", "params"), ("tags", self.tags_key)):
            if b.get(key):
                a[into] = [*a.get(into, []), *b[key]]
        return True

    def to_json(self) -> str:
        return json.dumps({"op": self.op, "run": self.run, "args": self.args, "attempts": max(1, self.attempts)})

    @classmethod
    def from_json(cls, line: str) -> Write:
        data = json.loads(line)
        return cls(data["op"], data["run"], data["args"], max(1, int(data.get("attempts", 1))))


class Outbox:
    """Applies the writes of one sweep in order on one thread; retries, buffers, gives up (see the module doc)."""

    def __init__(self, client: MlflowClient, uri: str, experiment_id: str, parent_id: str) -> None:
        self.client, self.uri, self.experiment_id, self.parent_id = client, uri, experiment_id, parent_id
        self.give_up_s = give_up_s()
        self.spool = spool_path(parent_id)
        self.run_ids: dict[str, str] = {}  # trial:<id> -> run id
        self.stats = {"stored": 0, "retries": 0, "replayed": 0, "dropped": 0, "spooled": 0, "max_pending": 0,
                      "merged": 0}
        self.failing_since: float | None = None  # when the current outage began: its first unanswered request
        self.last_error = ""
        self.given_up = False
        self._queue: deque[Write] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._flushing = 0  # callers waiting in flush(): the head is sent without lingering
        self._thread = threading.Thread(target=self._run, name=f"mlflow-outbox-{parent_id[:8]}", daemon=True)
        self._thread.start()

    # -- callers' side -----------------------------------------------------------------------------------------
    def put(self, write: Write) -> None:
        """Queue a write and return; only a full queue (`MAX_PENDING`) makes the caller wait."""
        with self._cond:
            while len(self._queue) >= MAX_PENDING and not self.given_up:
                self._cond.wait(1.0)
            if self.given_up:
                self._append_spool([write])
                return
            write.queued_at = write.queued_at or time.monotonic()
            self._queue.append(write)
            self.stats["max_pending"] = max(self.stats["max_pending"], len(self._queue))
            self._cond.notify_all()

    def pending(self) -> int:
        """Writes not stored yet (the one being tried included)."""
        with self._cond:
            return len(self._queue)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write is stored; False when given up (the writes are in the spool) or timed out."""
        with self._cond:
            self._flushing += 1
            self._cond.notify_all()
            try:
                self._cond.wait_for(lambda: not self._queue or self.given_up, timeout=timeout_s)
            finally:
                self._flushing -= 1
            return not self._queue and not self.given_up

    def wait_until(self, condition: Callable[[Outbox], bool], timeout_s: float) -> bool:
        """Block until `condition(self)` holds (checked whenever the queue changes); False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: condition(self), timeout=timeout_s)

    def resolve(self, run: str) -> str | None:
        """The MLflow run id of `run` (a run id or `trial:<id>`), or None when that trial has no run yet."""
        if not run.startswith(PENDING_PREFIX):
            return run
        if run in self.run_ids:
            return self.run_ids[run]
        trial_id = run[len(PENDING_PREFIX):]
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.{TAG_TRIAL_ID} = '{trial_id}' and tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}'"),
            max_results=1)
        if found:
            self.run_ids[run] = found[0].info.run_id
            return self.run_ids[run]
        return None

    def replay_spool(self) -> int:
        """Queue the writes a give-up saved for this sweep (oldest first) and store them; returns how many."""
        if not self.spool.exists():
            return 0
        writes = [Write.from_json(line) for line in self.spool.read_text().splitlines() if line.strip()]
        with self._cond:
            self._queue.extend(writes)
            self.stats["replayed"] += len(writes)
            self._cond.notify_all()
        if not self.flush():
            raise TrackingUnavailable(f"MLflow at {self.uri} did not take the {len(writes)} spooled writes of "
                                      f"{self.spool}: {self.last_error}")
        # Every spooled write is stored: the file goes. (A give-up during the replay appended the queue to it again;
        # replaying those twice is harmless, see the module doc.)
        self.spool.unlink(missing_ok=True)
        return len(writes)

    def close(self) -> None:
        """Stop the thread once the queue is empty or given up (what is left goes to the spool)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def save_unsent(self) -> None:
        """Spool whatever is still queued (the driver is exiting with the store away)."""
        with self._cond:
            if self._queue:
                self._append_spool(list(self._queue))
                self._queue.clear()
                self._cond.notify_all()

    # -- the writer thread -------------------------------------------------------------------------------------
    def _run(self) -> None:
        streak = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                head = self._coalesced()
            error: BaseException | None = None
            asked_at = time.monotonic()  # an outage is counted from the first unanswered request's start
            try:
                self._apply(head)
            except Exception as exc:  # MLflow raises MlflowException, requests' and SQLAlchemy's errors, OSError
                error = exc
            with self._cond:
                if error is None or not is_transient(error):
                    if error is not None:
                        self.stats["dropped"] += 1
                        log.error("MLflow refused %s on run %s (dropped, not retried): %s", head.op, head.run,
                                  describe(error))
                    else:
                        self.stats["stored"] += 1
                    if self.failing_since is not None:
                        log.warning("MLflow at %s answers again after %.0f s; storing the %d buffered write(s)",
                                    self.uri, time.monotonic() - self.failing_since, len(self._queue))
                    if self._queue and self._queue[0] is head:
                        self._queue.popleft()
                    self.failing_since, streak = None, 0
                    self._cond.notify_all()
                    continue
                head.attempts += 1
                self.stats["retries"] += 1
                self.last_error = describe(error)
                now = time.monotonic()
                if self.failing_since is None:
                    # When it was asked, not when it failed: a locked SQLite store answers only after MLflow's
                    # 20 s busy timeout, and "has not answered for N s" should mean N s.
                    self.failing_since = asked_at
                    log.warning("MLflow at %s is not answering (%s); buffering writes and retrying for up to %.0f s",
                                self.uri, self.last_error, self.give_up_s)
                self._cond.notify_all()
                if now - self.failing_since >= self.give_up_s:
                    self._give_up()
                    return
                delay = min(BACKOFF_S[min(streak, len(BACKOFF_S) - 1)],
                            self.give_up_s - (now - self.failing_since))
                streak += 1
                self._cond.wait(max(0.05, delay))

    def _coalesced(self) -> Write:
        """The head of the queue, with the later writes to its run merged into it (called with the lock held).

        A new batch (or trial create) waits up to `LINGER_S` for more, unless someone is flushing or closing, or its
        run has an end or a file queued (nothing more can join it: a finished trial shows as finished at once).
        Only batches merge, and none across another kind of write to the same run, so each run's writes keep their
        order; writes to other runs are independent. The merged write replaces its parts in the queue: a retry or
        a spool holds exactly what was tried.
        """
        head = self._queue[0]
        if head.attempts or head.op not in ("batch", "create_trial"):
            return head

        def done_waiting() -> bool:
            return bool(self._flushing or self._closed or len(self._queue) >= MAX_PENDING
                        or any(w.run == head.run and w.op != "batch" for w in itertools.islice(self._queue, 1, None)))

        self._cond.wait_for(done_waiting,
                            timeout=max(0.0, head.queued_at + LINGER_S - time.monotonic()) if head.queued_at else 0)
        absorbed = set()
        for later in list(self._queue)[1:]:
            if later.run != head.run:
                continue  # another run's write: independent of this one
            if not head.absorb(later):
                break  # an end or a file of this run, or a full request: later writes wait their turn
            absorbed.add(id(later))
        if absorbed:
            self.stats["merged"] += len(absorbed)
            self._queue = deque(w for w in self._queue if id(w) not in absorbed)
            self._cond.notify_all()  # room in the queue
        return head

    def _give_up(self) -> None:
        """Save the queue to the spool and stop the sweep as Ctrl-C would (called with the lock held)."""
        self.given_up = True
        unsent = list(self._queue)
        self._queue.clear()
        self._append_spool(unsent)
        self._cond.notify_all()
        from resnet_lab import console

        console.error(
            f"MLflow at {self.uri} has not answered for {self.give_up_s:.0f} s (last error: {self.last_error}). "
            f"Stopping the sweep as Ctrl-C would: Ray Tune saves the trials' state. The {len(unsent)} MLflow "
            f"write(s) not yet stored are kept in {self.spool}; `--resume` sends them first once MLflow answers. "
            f"(Deadline: ${GIVE_UP_ENV}.)")
        # Tune's SIGINT handler (installed while tuner.fit() runs) stops the experiment gracefully and saves its
        # state. Outside a sweep (a test, a notebook) SIGINT would raise KeyboardInterrupt at a random point: only
        # signal when someone other than Python's default handler is listening.
        if signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, signal.SIG_DFL, signal.SIG_IGN, None):
            os.kill(os.getpid(), signal.SIGINT)

    def _append_spool(self, writes: Iterable[Write]) -> None:
        writes = list(writes)
        if not writes:
            return
        self.spool.parent.mkdir(parents=True, exist_ok=True)
        with self.spool.open("a") as f:
            f.writelines(w.to_json() + "\n" for w in writes)
            f.flush()
            os.fsync(f.fileno())
        self.stats["spooled"] += len(writes)

    def _apply(self, w: Write) -> None:
        if w.op == "create_trial":
            self._create_trial(w)
            return
        run_id = self.resolve(w.run)
        if run_id is None:
            raise MlflowException(f"no run for {w.run} under sweep run {self.parent_id}",
                                  error_code=RESOURCE_DOES_NOT_EXIST)
        a = w.args
        if w.op == "batch":
            metrics, params, tags = self._entities(run_id, w)
            if metrics or params or tags:
                self.client.log_batch(run_id, metrics=metrics, params=params, tags=tags)
        elif w.op == "text":
            self.client.log_text(run_id, a["text"], a["file"])
        elif w.op == "artifact":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / a["name"]
                path.write_bytes(base64.b64decode(a["data"]))
                self.client.log_artifact(run_id, str(path))
        elif w.op == "terminate":
            self.client.set_terminated(run_id, status=a["status"])
        elif w.op == "status":
            self.client.update_run(run_id, status=a["status"])
        else:
            raise AssertionError(f"unknown write {w.op}")

    def _entities(self, run_id: str, w: Write) -> tuple[list[Metric], list[Param], list[RunTag]]:
        """A batch's (or a create's merged) metrics, params and tags; metrics an earlier try stored left out."""
        a = w.args
        metrics = [Metric(k, v, ts, step) for k, v, ts, step in a.get("metrics", [])]
        if metrics and w.attempts and self._stored(run_id, metrics[0]):
            metrics = []  # an earlier try reached the store (see the module doc)
        tags = [RunTag(k, v) for k, v in a.get(w.tags_key, [])]
        return metrics, [Param(k, v) for k, v in a.get("params", [])], tags

    def _stored(self, run_id: str, metric: Metric) -> bool:
        history = self.client.get_metric_history(run_id, metric.key)
        return any(m.step == metric.step and m.timestamp == metric.timestamp for m in history)

    def _create_trial(self, w: Write) -> None:
        a = w.args
        run_id = None
        if a.get("reuse") or w.attempts:  # a resumed sweep, or a create that may have reached the store
            run_id = self.resolve(w.run)
            if run_id is not None and a.get("reuse"):
                self.client.update_run(run_id, status="RUNNING")
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=a["run_name"], tags={
                MLFLOW_PARENT_RUN_ID: self.parent_id, MLFLOW_RUN_NAME: a["run_name"], **a["tags"]})
            run_id = run.info.run_id
        self.run_ids[w.run] = run_id
        # Epochs and tags queued behind the create were merged into it (`Write.absorb`): they go with the last
        # request of params. An identical param re-logged by a retry is accepted.
        metrics, params, tags = self._entities(run_id, w)
        parts = list(chunks(params, BATCH_LIMITS["params"])) or [[]]
        for i, chunk in enumerate(parts):
            last = i == len(parts) - 1
            if chunk or (last and (metrics or tags)):
                self.client.log_batch(run_id, params=chunk, metrics=metrics if last else [], tags=tags if last else [])


_outboxes: dict[tuple[str, str], Outbox] = {}
_registry_lock = threading.Lock()


def outbox_for(client: MlflowClient, uri: str, experiment_id: str, parent_id: str, fresh: bool = False) -> Outbox:
    """The one outbox of a sweep in this process (the runner's and the unpickled callback's trackers share it).

    An outbox that gave up keeps spooling (the sweep is stopping); `fresh` (a resume) replaces it with a new one.
    """
    with _registry_lock:
        box = _outboxes.get((uri, parent_id))
        if box is None or (fresh and box.given_up):
            box = _outboxes[(uri, parent_id)] = Outbox(client, uri, experiment_id, parent_id)
        return box


def retrying(call: Callable[[], T], what: str, uri: str) -> T:
    """Run a read (or a write that must not wait in a queue) with the outbox's back-off and deadline."""
    deadline, attempt = time.monotonic() + give_up_s(), 0
    while True:
        try:
            return call()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if time.monotonic() >= deadline:
                raise TrackingUnavailable(f"MLflow at {uri} did not answer for {give_up_s():.0f} s ({what}): "
                                          f"{describe(exc)}") from None
            if attempt == 0:
                log.warning("MLflow at %s is not answering (%s: %s); retrying", uri, what, describe(exc))
            time.sleep(min(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)], max(0.05, deadline - time.monotonic())))
            attempt += 1


@atexit.register
def _save_unsent_at_exit() -> None:
    # A driver leaving with writes still queued (the store away, the user pressed Ctrl-C twice) keeps them.
    for box in list(_outboxes.values()):
        with contextlib.suppress(Exception):
            box.save_unsent()
