"""MLflow: one parent run per sweep, one child run per trial. The only module that imports mlflow.

Why not Ray's MLflowLoggerCallback: it neither nests runs (ray#19978) nor names them (ray#23228), echoes the
config as metrics and drops string values. We log from the driver with MlflowClient, batched once per epoch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

TAG_SWEEP = "resnet_lab.sweep"
TAG_SPEC_HASH = "resnet_lab.spec_hash"
TAG_ROLE = "resnet_lab.role"  # "sweep" or "trial"
TAG_TRIAL_ID = "resnet_lab.trial_id"
TAG_CELL = "resnet_lab.cell"
TAG_STAGE = "resnet_lab.stage"
TAG_SEED = "resnet_lab.seed"
TAG_OUTCOME = "resnet_lab.outcome"  # completed | early_stopped | diverged | stopped | failed
TAG_STOPPED_BY = "stopped_by"
TAG_RUNG = "stopped_at_epoch"
TAG_ERROR = "error"
TAG_RETRIES = "retries"  # how often the trial's process failed and was resumed from its checkpoint
TAG_RESUMED_FROM = "resumed_from_epoch"  # the checkpoint epoch the trial's latest process continued from
TAG_DISCARDED = "resnet_lab.discarded"  # why a run was soft-deleted (a trial the resumed sweep never knew of)
BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}  # per log_batch request (MLflow's limits)


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


def quiet_mlflow() -> None:
    """Keep MLflow's and alembic's INFO chatter (database migrations on first use) out of the console."""
    for name in ("mlflow", "alembic", "alembic.runtime.migration"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _chunks(items: list[Any], size: int) -> Iterable[list[Any]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class SweepTracker:
    """Creates and updates the runs of one sweep in one experiment."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        quiet_mlflow()
        self.uri, self.experiment_name = tracking_uri, experiment
        self.client = MlflowClient(tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        self.experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        self.parent_id: str | None = None
        self.reopened = False  # the parent run was re-opened (--resume): trial runs may exist already

    def check_writable(self) -> None:
        """Write an experiment tag: fails now, not mid-sweep, when the store is read-only."""
        self.client.set_experiment_tag(self.experiment_id, "resnet_lab.last_checked", time.strftime("%FT%T"))

    # -- runs --------------------------------------------------------------------------------------------------
    def start_sweep(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any],
                    artifacts: Mapping[str, str], parent_id: str | None = None) -> str:
        """Create the sweep's parent run (or re-open `parent_id` when resuming); returns its id."""
        if parent_id is not None:
            self.parent_id, self.reopened = parent_id, True
            self.client.update_run(parent_id, status="RUNNING")
            return parent_id
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={TAG_ROLE: "sweep", TAG_SWEEP: name, **tags})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        for file_name, text in artifacts.items():
            self.client.log_text(self.parent_id, text, file_name)
        return self.parent_id

    def start_trial(self, trial_id: str, run_name: str, params: Mapping[str, Any],
                    tags: Mapping[str, str]) -> str:
        """The child run of a trial: re-attached if one exists for this trial id under the parent, else created."""
        assert self.parent_id is not None, "start_sweep first"
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{TAG_TRIAL_ID} = '{trial_id}' and tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}'",
            max_results=1) if self.reopened else []  # a parent created by this process has only our runs
        if existing:
            run_id = existing[0].info.run_id
            self.client.update_run(run_id, status="RUNNING")
            return run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={
            MLFLOW_PARENT_RUN_ID: self.parent_id, MLFLOW_RUN_NAME: run_name, TAG_ROLE: "trial",
            TAG_TRIAL_ID: trial_id, **tags})
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Params in batches of MLflow's limit; values as strings (MLflow stores them so)."""
        items = [Param(k, str(v)) for k, v in sorted(params.items())]
        for chunk in _chunks(items, BATCH_LIMITS["params"]):
            self.client.log_batch(run_id, params=chunk)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int,
                    tags: Mapping[str, str] | None = None) -> None:
        """One epoch's metrics (and any tags) in one request (chunked only past MLflow's 1000-metric limit)."""
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        tag_items = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        chunks = list(_chunks(items, BATCH_LIMITS["metrics"] - len(tag_items))) or [[]]  # 1000 entities a request
        for i, chunk in enumerate(chunks):
            self.client.log_batch(run_id, metrics=chunk, tags=tag_items if i == 0 else [])

    def last_step(self, run_id: str) -> int:
        """The highest epoch already recorded on a run (0 for none): MLflow's latest value of `epoch`."""
        return int(self.client.get_run(run_id).data.metrics.get("epoch", 0))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Tags in one request."""
        if tags:
            self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        """Upload local files as run artifacts."""
        for path in paths:
            self.client.log_artifact(run_id, str(path))

    def log_text(self, run_id: str, text: str, file_name: str) -> None:
        """A text artifact (error reports, resolved spec)."""
        self.client.log_text(run_id, text, file_name)

    def end_run(self, run_id: str, status: str) -> None:
        """Mark a run FINISHED, KILLED or FAILED."""
        self.client.set_terminated(run_id, status=status)

    def close_running(self, status: str = "KILLED") -> list[str]:
        """End every child run still RUNNING under the parent (the sweep's last word, however it ends)."""
        if self.parent_id is None:
            return []
        running = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}' and attributes.status = 'RUNNING'",
            max_results=10_000)
        for run in running:
            self.client.set_terminated(run.info.run_id, status=status)
        return [r.info.run_id for r in running]

    def find_sweep(self, name: str) -> mlflow.entities.Run | None:
        """The parent run of the sweep named `name` (its Ray experiment dir name), if any."""
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.{TAG_ROLE} = 'sweep' and tags.{TAG_SWEEP} = '{name}'"), max_results=1)
        return found[0] if found else None

    def latest_sweep(self, spec_name: str) -> mlflow.entities.Run | None:
        """The newest parent run of a spec (names are `<spec name>-<YYYYmmdd-HHMMSS>`)."""
        found = self.client.search_runs([self.experiment_id], filter_string=(
            f"tags.{TAG_ROLE} = 'sweep' and tags.{TAG_SWEEP} LIKE '{spec_name}-%'"),
            order_by=["attributes.start_time DESC"], max_results=1)
        return found[0] if found else None

    def discard(self, run_id: str, reason: str) -> None:
        """Soft-delete a child run with the reason as a tag: hidden from searches and the UI, restorable with
        `mlflow runs restore --run-id ...` (nothing is erased until `mlflow gc`)."""
        self.client.set_tag(run_id, TAG_DISCARDED, reason)
        self.client.set_terminated(run_id, status="KILLED")
        self.client.delete_run(run_id)

    def children(self) -> list[mlflow.entities.Run]:
        """Every child run of the sweep."""
        return self.client.search_runs([self.experiment_id],
                                       filter_string=f"tags.{MLFLOW_PARENT_RUN_ID} = '{self.parent_id}'",
                                       max_results=50_000)

    def experiment_url(self, base: str) -> str:
        """The runs table of this experiment in the MLflow UI (MLflow 3 opens in GenAI mode otherwise)."""
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs"
