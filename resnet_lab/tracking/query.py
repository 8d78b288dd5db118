"""Reading a sweep back from MLflow as plain dataclasses (for reports and the UI); the writer's mirror image.

Nothing here returns an MLflow object: callers (the report) never import mlflow, so swapping the tracking backend
touches this package only.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from sqlalchemy.exc import SQLAlchemyError

from resnet_lab.outcome import Outcome
from resnet_lab.tracking.writer import (
    TAG_CELL,
    TAG_OUTCOME,
    TAG_ROLE,
    TAG_SEED,
    TAG_STAGE,
    TAG_SWEEP,
    quiet_mlflow,
)

PAGE = 10_000  # runs per search request (SQLite stores cap a page at 50,000)


class SweepNotFound(LookupError):
    """The experiment or sweep asked for is not in the tracking store (the message says what is)."""


class TrackingError(RuntimeError):
    """The tracking store refused a write (read-only store, unreachable artifact store)."""


@dataclass(frozen=True)
class ParentRun:
    """The sweep's parent run."""

    run_id: str
    name: str  # `<spec name>-<YYYYmmdd-HHMMSS>`, also the report's directory name
    status: str
    params: dict[str, str]
    tags: dict[str, str]
    start_ms: int


@dataclass(frozen=True)
class TrialRun:
    """One child run: identity, outcome, params and the last logged value of every metric."""

    run_id: str
    name: str
    status: str  # FINISHED | KILLED | FAILED | RUNNING
    cell: str
    stage: str  # search | confirm
    seed: int | None
    outcome: str  # an Outcome (resnet_lab.outcome), or running | unknown for a run without its tag
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, float]  # latest value per key (the final epoch's, for per-epoch metrics)
    start_ms: int
    end_ms: int | None


@dataclass
class SweepRuns:
    """A sweep as stored in MLflow: its parent, its child runs, and per-run metric histories on demand."""

    uri: str
    experiment_id: str
    experiment_name: str
    parent: ParentRun
    runs: list[TrialRun]
    _client: Any = field(repr=False, compare=False, default=None)
    _histories: dict[str, dict[str, dict[int, float]]] = field(repr=False, compare=False, default_factory=dict)

    def history(self, run_id: str, keys: Iterable[str]) -> list[dict[str, float]]:
        """One dict per logged step (epoch), ascending, with `epoch` and every key logged at that step.

        The first request for a key reads that key for every trial run of the sweep at once (`_bulk_history`:
        one query per key per chunk of runs, not one per run per key), because the report asks for the same keys
        of every run; later calls for other runs are answered from the cache."""
        cache = self._histories.setdefault(run_id, {})
        for key in keys:
            if key in cache:
                continue
            ids = list(dict.fromkeys([run_id, *(r.run_id for r in self.runs)]))
            ids = [i for i in ids if key not in self._histories.get(i, {})]
            bulk = _bulk_history(self._client, ids, key)
            if bulk is None:  # a store with no batched read (file store): one request per run, this run only
                cache[key] = {int(m.step): float(m.value) for m in self._client.get_metric_history(run_id, key)}
                continue
            for i in ids:
                self._histories.setdefault(i, {})[key] = bulk.get(i, {})
        steps = sorted({step for series in cache.values() for step in series})
        return [{"epoch": float(step), **{k: s[step] for k, s in cache.items() if step in s}} for step in steps]

    def spec_text(self) -> str | None:
        """The resolved spec the sweep ran (`spec.yaml` artifact of the parent run), if it was logged."""
        with tempfile.TemporaryDirectory() as tmp, _no_progress_bar():
            try:
                path = self._client.download_artifacts(self.parent.run_id, "spec.yaml", tmp)
            except (MlflowException, OSError):
                return None
            return Path(path).read_text()

    def log_artifacts(self, paths: Sequence[Path], artifact_path: str) -> None:
        """Upload files to the parent run under `artifact_path` (a finished run accepts artifacts too)."""
        try:
            for path in paths:
                self._client.log_artifact(self.parent.run_id, str(path), artifact_path)
        except (MlflowException, OSError) as exc:
            raise TrackingError(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)) from exc


BULK_RUNS = 500  # run ids per batched history query (SQLite binds at most 32,766 parameters per statement)
REST_BULK_RUNS = 100  # the server's get-history-bulk endpoint refuses more than 100 run ids per request
REST_BULK_ROWS = 25_000  # ... and returns at most 25,000 values per request


def _bulk_history(client: MlflowClient, run_ids: list[str], key: str) -> dict[str, dict[int, float]] | None:
    """Every logged value of `key` for many runs in a few requests: {run id: {step: value}}; None where the store
    has no batched read (the caller then reads run by run).

    MlflowClient has no public batched metric-history call in MLflow 3.17 (`get_metric_history` takes one run, and
    `get_metric_history_bulk_interval` samples at most a few hundred steps per run and loops over runs). What
    MLflow does batch, and serves its own UI's charts with:
    - SQL stores (sqlite, postgresql, mysql URIs): `SqlAlchemyStore.get_metric_history_bulk(run_ids, key,
      max_results)`, a single `SELECT ... WHERE key = ? AND run_uuid IN (...)` ordered by run, timestamp, step,
      value: the same order as `get_metric_history`, so the last value logged at a step wins in both paths. We
      run that same SELECT through the store's own session as plain rows (`_sql_history`), ~10x faster than the
      method's per-row entities, and fall back to the method if the table differs;
    - an `mlflow server` (http/https URIs): the `/ajax-api/2.0/mlflow/metrics/get-history-bulk` endpoint over that
      same store method, at most 100 run ids and 25,000 values per request (a chunk that fills the cap is split).
    The store object is the client's own (`_tracking_client.store`, cached per URI by MLflow), so no second
    database engine or HTTP session is opened."""
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    out: dict[str, dict[int, float]] = {}
    if isinstance(store, SqlAlchemyStore):
        for start in range(0, len(run_ids), BULK_RUNS):
            chunk = run_ids[start:start + BULK_RUNS]
            try:
                rows = _sql_history(store, chunk, key)
            except (AttributeError, SQLAlchemyError):  # another schema than MLflow 3.17's metrics table
                rows = [(m.run_id, m.step, m.value, False) for m in store.get_metric_history_bulk(chunk, key, None)]
            for run_id, step, value, is_nan in rows:
                out.setdefault(run_id, {})[int(step)] = math.nan if is_nan else float(value)
        return out
    if isinstance(store, RestStore):
        chunks = [run_ids[i:i + REST_BULK_RUNS] for i in range(0, len(run_ids), REST_BULK_RUNS)]
        while chunks:
            chunk = chunks.pop()
            rows = _rest_bulk(store, chunk, key)
            if rows is None:
                return None
            if len(rows) >= REST_BULK_ROWS:  # capped: some values were left out
                if len(chunk) > 1:
                    chunks += [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]
                else:  # one run with more values than a request returns: its own paged history
                    out[chunk[0]] = {int(m.step): float(m.value) for m in client.get_metric_history(chunk[0], key)}
                continue
            for row in rows:
                out.setdefault(row["run_id"], {})[int(row.get("step", 0))] = float(row["value"])
        return out
    return None


def _sql_history(store: Any, run_ids: list[str], key: str) -> list[Any]:
    """(run id, step, value, is_nan) rows of `key` for `run_ids`: the query of `get_metric_history_bulk` (same
    filter, same order: the last value logged at a step wins), as plain rows. The store method builds an ORM object
    and two Metric entities per row: 20.6 s for the 140,000 values of a 1,000-run report here, 1.8 s as rows."""
    from mlflow.store.tracking.dbmodels.models import SqlMetric
    from sqlalchemy import select

    table = SqlMetric.__table__
    query = (select(table.c.run_uuid, table.c.step, table.c.value, table.c.is_nan)
             .where(table.c.key == key, table.c.run_uuid.in_(run_ids))
             .order_by(table.c.run_uuid, table.c.timestamp, table.c.step, table.c.value))
    with store.ManagedSessionMaker() as session:
        return list(session.execute(query).all())


def _rest_bulk(store: Any, run_ids: list[str], key: str) -> list[dict[str, Any]] | None:
    """One GET of the server's get-history-bulk endpoint; None if the server does not serve it."""
    from mlflow.utils.rest_utils import http_request

    response = http_request(store.get_host_creds(), "/ajax-api/2.0/mlflow/metrics/get-history-bulk", "GET",
                            params={"run_id": run_ids, "metric_key": key, "max_results": REST_BULK_ROWS})
    if response.status_code != 200:
        return None
    return list(response.json().get("metrics", []))


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a tqdm bar on stderr for every download, even of one small file."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    previous = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _search(client: MlflowClient, experiment_id: str, filter_string: str,
            order_by: list[str] | None = None) -> list[Any]:
    out: list[Any] = []
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string=filter_string, max_results=PAGE,
                                  order_by=order_by, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def _seed(tags: dict[str, str], params: dict[str, str]) -> int | None:
    text = tags.get(TAG_SEED, params.get("seed"))
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def _outcome(status: str, tags: dict[str, str]) -> str:
    if TAG_OUTCOME in tags:
        return tags[TAG_OUTCOME]
    return {"FAILED": Outcome.FAILED, "RUNNING": "running", "KILLED": Outcome.STOPPED}.get(status, "unknown")


def _trial(run: Any) -> TrialRun:
    tags, params = dict(run.data.tags), dict(run.data.params)
    return TrialRun(
        run_id=run.info.run_id, name=run.info.run_name or run.info.run_id, status=run.info.status,
        cell=tags.get(TAG_CELL, params.get("cell", "?")), stage=tags.get(TAG_STAGE, params.get("stage", "search")),
        seed=_seed(tags, params), outcome=_outcome(run.info.status, tags), params=params, tags=tags,
        metrics={k: float(v) for k, v in run.data.metrics.items() if math.isfinite(v)},
        start_ms=int(run.info.start_time or 0), end_ms=run.info.end_time)


def _parent(run: Any) -> ParentRun:
    tags = dict(run.data.tags)
    return ParentRun(run.info.run_id, tags.get(TAG_SWEEP, run.info.run_name or run.info.run_id), run.info.status,
                     dict(run.data.params), tags, int(run.info.start_time or 0))


def _client(uri: str) -> MlflowClient:
    """A client for an existing store: reading must not leave an empty SQLite database behind."""
    quiet_mlflow()
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        if not path.exists():
            raise SweepNotFound(f"no MLflow database at {path}; run the sweep first, or pass --tracking-uri")
    return MlflowClient(uri)


def _experiment(client: MlflowClient, name: str) -> Any:
    found = client.get_experiment_by_name(name)
    if found is None:
        known = sorted(e.name for e in client.search_experiments())
        raise SweepNotFound(f"no MLflow experiment '{name}' in this tracking store; it has: "
                            f"{', '.join(known) or 'none'}")
    return found


def list_sweeps(uri: str, experiment: str) -> list[ParentRun]:
    """Every sweep (parent run) of an experiment, newest first."""
    client = _client(uri)
    exp = _experiment(client, experiment)
    runs = _search(client, exp.experiment_id, f"tags.`{TAG_ROLE}` = 'sweep'", ["attributes.start_time DESC"])
    return [_parent(r) for r in runs]


def load_sweep(uri: str, experiment: str, sweep: str | None = None, spec_name: str | None = None) -> SweepRuns:
    """The sweep `sweep` (parent run id or name) of an experiment, with its child runs; by default the newest
    sweep, or the newest sweep of the spec named `spec_name` (sweeps are named `<spec name>-<timestamp>`)."""
    client = _client(uri)
    exp = _experiment(client, experiment)
    parents = _search(client, exp.experiment_id, f"tags.`{TAG_ROLE}` = 'sweep'", ["attributes.start_time DESC"])
    if sweep is not None:
        parents = [p for p in parents if sweep in (p.info.run_id, p.info.run_name, p.data.tags.get(TAG_SWEEP))]
    elif spec_name is not None:
        parents = [p for p in parents if _parent(p).name.startswith(f"{spec_name}-")]
    if not parents:
        names = [p.name for p in list_sweeps(uri, experiment)][:10]
        wanted = f"sweep '{sweep}'" if sweep else f"sweep of spec '{spec_name}'" if spec_name else "sweep"
        raise SweepNotFound(f"no {wanted} in experiment '{experiment}'"
                            + (f"; sweeps there: {', '.join(names)}" if names else "; run a sweep first"))
    parent = parents[0]
    children = _search(client, exp.experiment_id, f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.info.run_id}'",
                       ["attributes.start_time ASC"])
    trials = [_trial(r) for r in children if r.data.tags.get(TAG_ROLE, "trial") == "trial"]
    return SweepRuns(uri, exp.experiment_id, exp.name, _parent(parent), trials, _client=client)


def experiment_id(uri: str, experiment: str | None) -> tuple[str, str] | None:
    """(id, name) of an experiment; with no name, of the experiment holding the newest sweep. None if none."""
    client = _client(uri)
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        return (found.experiment_id, found.name) if found else None
    newest: tuple[int, str, str] | None = None
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`{TAG_ROLE}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
        if runs and (newest is None or runs[0].info.start_time > newest[0]):
            newest = (runs[0].info.start_time, exp.experiment_id, exp.name)
    return (newest[1], newest[2]) if newest else None
