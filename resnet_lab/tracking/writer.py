"""MLflow: one parent run per sweep, one child run per trial. The only module that imports mlflow.

Why not Ray's MLflowLoggerCallback: it neither nests runs (ray#19978) nor names them (ray#23228), echoes the
config as metrics and drops string values. We log from the driver with MlflowClient, batched once per epoch.

Writes to runs go through the sweep's outbox (outbox.py): in order, retried while the store is away, buffered so the
trials keep training, spooled and resumable when it never comes back. Reads wait for the queued writes first.
"""

from __future__ import annotations

import base64
import logging
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Param
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from resnet_lab.tracking.outbox import (
    BATCH_LIMITS,
    PENDING_PREFIX,
    Outbox,
    TrackingUnavailable,
    Write,
    chunks,
    give_up_s,
    outbox_for,
    retrying,
)

TAG_SWEEP = "resnet_lab.sweep"
TAG_SPEC_HASH = "resnet_lab.spec_hash"
TAG_ROLE = "resnet_lab.role"  # "sweep" or "trial"
TAG_TRIAL_ID = "resnet_lab.trial_id"
TAG_CELL = "resnet_lab.cell"
TAG_STAGE = "resnet_lab.stage"
TAG_SEED = "resnet_lab.seed"
TAG_CONFIG = "resnet_lab.config"  # the configuration's label: the run name without seed and stage
TAG_GRID = "resnet_lab.grid"  # the cell's grid values as the spec sets them (JSON): what sets the cell apart
TAG_OUTCOME = "resnet_lab.outcome"  # an Outcome (resnet_lab.outcome)
TAG_STOPPED_BY = "stopped_by"
TAG_RUNG = "stopped_at_epoch"
TAG_ERROR = "error"
TAG_RETRIES = "retries"  # how often the trial's process failed and was resumed from its checkpoint
TAG_RESUMED_FROM = "resumed_from_epoch"  # the checkpoint epoch the trial's latest process continued from
TAG_DISCARDED = "resnet_lab.discarded"  # why a run was soft-deleted (a trial the resumed sweep never knew of)


def resolve_tracking_uri(uri: str | None, cwd: Path | None = None) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite in the working directory; always absolute.

    Trials run in other directories, so a relative SQLite path would scatter databases across trial dirs.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    base = (cwd or Path.cwd()).absolute()
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return f"sqlite:///{(base / uri[len('sqlite:///'):]).absolute()}"
    if "://" not in uri:
        raise ValueError(f"tracking URI '{uri}' is a plain path; MLflow 3's file store is in maintenance mode: "
                         f"use sqlite:///{Path(uri).absolute()}.db or an http:// server")
    return uri


def quick_http_retries() -> None:
    """MLflow's HTTP client retries a request 7 times with back-off factor 2 (MLflow 3.17: about 4 minutes) and waits
    120 s for an answer; the outbox retries with its own back-off and deadline, so one request may give up after
    2 quick retries and 30 s. Values set by the user win."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def quiet_mlflow() -> None:
    """Keep MLflow's and alembic's INFO chatter (database migrations on first use) out of the console."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # Each failed SQL request is also logged there with its whole traceback (mlflow.store.db.utils); the error is
    # raised all the same and the outbox prints one line per outage instead of a traceback per retry.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _params(params: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)) for k, v in sorted(params.items())]


@dataclass(frozen=True)
class SweepRef:
    """What names a started sweep's runs: plain, picklable data (Tune pickles the callbacks that hold it)."""

    uri: str
    experiment_name: str
    experiment_id: str
    parent_id: str


class SweepTracker:
    """Creates and updates the runs of one sweep in one experiment."""

    def __init__(self, tracking_uri: str, experiment: str, experiment_id: str | None = None) -> None:
        quiet_mlflow()
        quick_http_retries()
        give_up_s()  # a bad $RESNET_LAB_TRACKING_GIVE_UP_S fails here, in the preflight, not mid-sweep
        self.uri, self.experiment_name = tracking_uri, experiment
        self.client = MlflowClient(tracking_uri)
        if experiment_id is None:
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.experiment_id = experiment_id
        self.parent_id: str | None = None

    @classmethod
    def attach(cls, ref: SweepRef) -> SweepTracker:
        """A tracker of a started sweep; it shares the sweep's outbox with every other tracker of it here."""
        tracker = cls(ref.uri, ref.experiment_name, ref.experiment_id)
        tracker.parent_id = ref.parent_id
        return tracker

    @property
    def ref(self) -> SweepRef:
        assert self.parent_id is not None, "start_sweep first"
        return SweepRef(self.uri, self.experiment_name, self.experiment_id, self.parent_id)

    @property
    def outbox(self) -> Outbox:
        """The sweep's queue of writes (shared by every tracker of this sweep in the process)."""
        assert self.parent_id is not None, "start_sweep first"
        return outbox_for(self.client, self.uri, self.experiment_id, self.parent_id)

    def _put(self, op: str, run_id: str, **args: Any) -> None:
        self.outbox.put(Write(op, run_id, args))

    def _read(self, call: Any, what: str) -> Any:
        """A read sees every write queued before it: wait for the outbox, then ask (retried like the writes)."""
        if self.parent_id is not None:
            box = self.outbox
            if not box.flush():
                raise TrackingUnavailable(f"MLflow at {self.uri} is unreachable ({what}): {box.last_error}")
        return retrying(call, what, self.uri)

    def _given_up(self) -> bool:
        return self.parent_id is not None and self.outbox.given_up

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued write is stored; False when the store was given up on (writes spooled)."""
        return self.parent_id is None or self.outbox.flush(timeout_s)

    def settle(self, timeout_s: float = 30.0) -> bool:
        """Store what is queued while the store answers; return at once while it does not (the writes stay queued,
        retried, and spooled at a give-up). True when nothing is left queued."""
        if self.parent_id is None:
            return True
        box = self.outbox
        if box.failing_since is not None or box.given_up:
            return False
        return box.flush(timeout_s)

    def check_writable(self) -> None:
        """Write an experiment tag: fails now, not mid-sweep, when the store is read-only."""
        self.client.set_experiment_tag(self.experiment_id, "resnet_lab.last_checked", time.strftime("%FT%T"))

    # -- runs --------------------------------------------------------------------------------------------------
    def start_sweep(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
                    artifacts: Mapping[str, str], parent_id: str | None = None) -> str:
        """Create the sweep's parent run (or re-open `parent_id` when resuming); returns its id."""
        if parent_id is not None:
            self.parent_id = parent_id
            retrying(lambda: self.client.update_run(parent_id, status="RUNNING"), "re-opening the sweep run", self.uri)
            box = outbox_for(self.client, self.uri, self.experiment_id, parent_id, fresh=True)
            replayed = box.replay_spool()  # writes an earlier driver could not store (it gave up on the store)
            if replayed:
                logging.getLogger(__name__).warning("stored %d MLflow writes spooled by the interrupted run",
                                                    replayed)
            return parent_id
        run = retrying(lambda: self.client.create_run(self.experiment_id, run_name=name,
                                                      tags={TAG_ROLE: "sweep", TAG_SWEEP: name, **tags}),
                       "creating the sweep run", self.uri)
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        for file_name, text in artifacts.items():
            self.log_text(self.parent_id, text, file_name)
        return self.parent_id

    def start_trial(self, trial_id: str, run_name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str], reuse: bool = False) -> str:
        """The child run of a trial: created, or with `reuse` (a trial an earlier driver may have started: a
        resumed sweep's) re-attached when one exists for this trial id under the parent.

        Returns a handle for the run: its id once the run exists, else `trial:<trial id>` (the run is created when
        the outbox reaches this write); every method here accepts either, in this process or after a resume.
        """
        assert self.parent_id is not None, "start_sweep first"
        handle = f"{PENDING_PREFIX}{trial_id}"
        self._put("create_trial", handle, run_name=run_name, reuse=reuse,
                  params=[(p.key, p.value) for p in _params(params)],
                  tags={TAG_ROLE: "trial", TAG_TRIAL_ID: trial_id, **{k: str(v) for k, v in tags.items()}})
        return self.outbox.run_ids.get(handle, handle)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params in batches of MLflow's limit; values as strings (MLflow stores them so)."""
        for chunk in chunks(_params(params), BATCH_LIMITS["params"]):
            self._put("batch", run_id, params=[(p.key, p.value) for p in chunk])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    tags: Mapping[str, str] | None = None) -> None:
        """One epoch's metrics (and any tags) in one request (chunked only past MLflow's 1000-metric limit).

        The timestamp is taken now, when the epoch arrived, not when the store takes it: a replay is identical.
        """
        now = int(time.time() * 1000)
        items = [(k, float(v), now, step) for k, v in metrics.items()]
        tag_items = [(k, str(v)) for k, v in (tags or {}).items()]
        parts = list(chunks(items, BATCH_LIMITS["metrics"] - len(tag_items))) or [[]]  # 1000 entities a request
        for i, chunk in enumerate(parts):
            self._put("batch", run_id, metrics=chunk, tags=tag_items if i == 0 else [])

    def last_step(self, run_id: str) -> int:
        """The highest epoch already recorded on a run (0 for none): MLflow's latest value of `epoch`."""
        return int(self._read(lambda: self.client.get_run(self.resolve(run_id)).data.metrics.get("epoch", 0),
                              "reading a run's last epoch"))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Tags in one request."""
        if tags:
            self._put("batch", run_id, tags=[(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        """Upload local files as run artifacts (read now: the caller may delete them once this returns)."""
        for path in paths:
            self._put("artifact", run_id, name=Path(path).name,
                      data=base64.b64encode(Path(path).read_bytes()).decode("ascii"))

    def log_text(self, run_id: str, text: str, file_name: str) -> None:
        """A text artifact (error reports, resolved spec)."""
        self._put("text", run_id, text=text, file=file_name)

    def end_run(self, run_id: str, status: str) -> None:
        """Mark a run FINISHED, KILLED or FAILED; the sweep's own run last, after every queued write is stored."""
        self._put("terminate", run_id, status=status)
        if run_id == self.parent_id:
            self.flush()

    def close_running(self, status: str = "KILLED") -> list[str]:
        """End every child run still RUNNING under the parent (the sweep's last word, however it ends).

        With the store given up on, nothing can be read: [] (the runs stay RUNNING until `--resume`).
        """
        if self.parent_id is None or self._given_up():
            return []
        running = self._read(lambda: self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}' and attributes.status = 'RUNNING'",
            max_results=10_000), "listing the sweep's running trials")
        for run in running:
            self.end_run(run.info.run_id, status)
        return [r.info.run_id for r in running]

    def resolve(self, run_id: str) -> str:
        """The MLflow run id of a handle `start_trial` returned (after the writes before it are stored)."""
        if self.parent_id is not None and run_id.startswith(PENDING_PREFIX):
            self._read(lambda: None, "creating a trial's run")
        resolved = self.outbox.resolve(run_id) if self.parent_id is not None else run_id
        if resolved is None:
            raise ValueError(f"{run_id} has no MLflow run under sweep run {self.parent_id}")
        return resolved

    def find_sweep(self, name: str) -> mlflow.entities.Run | None:
        """The parent run of the sweep named `name` (its Ray experiment dir name), if any."""
        found = self._read(lambda: self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.{TAG_ROLE} = 'sweep' and tags.{TAG_SWEEP} = '{name}'"), max_results=1), "finding the sweep run")
        return found[0] if found else None

    def latest_sweep(self, spec_name: str) -> mlflow.entities.Run | None:
        """The newest parent run of a spec (names are `<spec name>-<YYYYmmdd-HHMMSS>`)."""
        found = self._read(lambda: self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.{TAG_ROLE} = 'sweep' and tags.{TAG_SWEEP} LIKE '{spec_name}-%'"),
            order_by=["attributes.start_time DESC"], max_results=1), "finding the latest sweep run")
        return found[0] if found else None

    def discard(self, run_id: str, reason: str) -> None:
        """Soft-delete a child run with the reason as a tag: hidden from searches and the UI, restorable with
        `mlflow runs restore --run-id ...` (nothing is erased until `mlflow gc`)."""
        self._read(lambda: None, "discarding a run")  # the run's queued writes first
        retrying(lambda: self.client.set_tag(run_id, TAG_DISCARDED, reason), "discarding a run", self.uri)
        retrying(lambda: self.client.set_terminated(run_id, status="KILLED"), "discarding a run", self.uri)
        retrying(lambda: self.client.delete_run(run_id), "discarding a run", self.uri)

    def children(self) -> list[mlflow.entities.Run]:
        """Every child run of the sweep ([] once the store was given up on: nothing can be read)."""
        if self._given_up():
            return []
        return self._read(lambda: self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}'",
            max_results=50_000), "listing the sweep's trial runs")
