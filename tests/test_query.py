"""SweepRuns.history reads a key for every run of the sweep in batched queries and returns what one request per
run per key returned (a real SQLite MLflow store, written with MlflowClient)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from resnet_lab.tracking import query
from resnet_lab.tracking.query import load_sweep
from resnet_lab.tracking.writer import TAG_CELL, TAG_ROLE, TAG_SWEEP

KEYS = ("val/acc", "train/loss", "train_time_s", "never_logged")


def per_run(client: MlflowClient, run_id: str, keys: tuple[str, ...]) -> list[dict[str, float]]:
    """The pre-batching history: one get_metric_history per run per key."""
    cache = {k: {int(m.step): float(m.value) for m in client.get_metric_history(run_id, k)} for k in keys}
    steps = sorted({s for series in cache.values() for s in series})
    return [{"epoch": float(s), **{k: v[s] for k, v in cache.items() if s in v}} for s in steps]


@pytest.fixture
def store(tmp_path: Path) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("q")
    parent = client.create_run(exp, run_name="s-1", tags={TAG_ROLE: "sweep", TAG_SWEEP: "s-1"})
    for i in range(7):
        rid = client.create_run(exp, run_name=f"t{i}", start_time=1000 + i, tags={
            MLFLOW_PARENT_RUN_ID: parent.info.run_id, TAG_ROLE: "trial", TAG_CELL: f"c{i % 2}"}).info.run_id
        epochs = i + 1  # histories of different lengths; run 0 has one epoch
        metrics = [Metric("val/acc", 0.1 * i + 0.01 * e, 10 + e, e) for e in range(epochs)]
        metrics += [Metric("train/loss", 2.0 / (e + 1) + i, 10 + e, e) for e in range(0, epochs, 2)]  # every 2nd
        if i % 3 == 0:
            metrics.append(Metric("train_time_s", 5.0 + i, 10, 0))
        if i == 4:  # a resumed trial logged epoch 1 again later: the later value wins in both paths
            metrics.append(Metric("val/acc", 0.99, 99, 1))
        client.log_batch(rid, metrics=metrics)
    return uri


def test_batched_history_equals_per_run_history(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(query, "BULK_RUNS", 3)  # 7 runs: three chunks, the last one short
    sweep = load_sweep(store, "q")
    assert len(sweep.runs) == 7
    client = MlflowClient(store)
    for run in reversed(sweep.runs):  # the first call fills the cache for all runs; order must not matter
        assert sweep.history(run.run_id, KEYS) == per_run(client, run.run_id, KEYS), run.name
    resumed = next(r for r in sweep.runs if r.name == "t4")
    assert sweep.history(resumed.run_id, ("val/acc",))[1]["val/acc"] == 0.99
    assert set(sweep._histories) == {r.run_id for r in sweep.runs}


def test_history_reads_each_key_once_for_all_runs(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report asks run by run; the store is asked once per key per chunk of runs, not once per run."""
    calls: list[tuple[int, str]] = []
    real = query._bulk_history

    def counting(client: MlflowClient, run_ids: list[str], key: str) -> dict[str, dict[int, float]] | None:
        calls.append((len(run_ids), key))
        return real(client, run_ids, key)

    monkeypatch.setattr(query, "_bulk_history", counting)
    sweep = load_sweep(store, "q")
    for run in sweep.runs:
        sweep.history(run.run_id, KEYS)
    assert sorted(calls) == sorted((7, k) for k in KEYS)


@pytest.mark.slow
def test_batched_history_through_an_mlflow_server(store: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Over http the batched read is the server's get-history-bulk endpoint; a chunk that fills the per-request cap
    is split, and a single run over the cap is read on its own: the histories equal the per-run ones."""
    from test_tracking_outage import MlflowServer

    server = MlflowServer(store, tmp_path)
    try:
        monkeypatch.setattr(query, "REST_BULK_RUNS", 4)
        monkeypatch.setattr(query, "REST_BULK_ROWS", 5)  # the server then returns at most 5 values per request
        sweep = load_sweep(server.uri, "q")
        assert query._bulk_history(sweep._client, [r.run_id for r in sweep.runs], "val/acc") is not None  # batched
        client = MlflowClient(store)
        for run in sweep.runs:
            assert sweep.history(run.run_id, KEYS) == per_run(client, run.run_id, KEYS), run.name
    finally:
        server.close()
