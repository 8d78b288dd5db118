"""`--dry-run --estimate`: the epoch arithmetic against hand-computed values, and measured epoch times read from
earlier runs of the same cells in a real SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from resnet_lab.cli import main
from resnet_lab.estimate import cell_epochs, estimate, expected_epochs
from resnet_lab.spec.load import load_spec
from resnet_lab.tracking.writer import TAG_CELL, TAG_ROLE, TAG_SWEEP

SPEC = """
name: est
experiment: est-exp
dataset: {name: synthetic, synthetic: {train_size: 320, image_size: 16, channels: 1}, val_fraction: 0.2}
model: {name: resnet, depth: 10, width: 0.125}
trainer: {epochs: 27, batch_size: 32, lr: 0.01}
grid:
  skip: [true, false]
search:
  lr: {type: loguniform, low: 0.001, high: 0.1}
samples_per_cell: 6
seeds: [0, 1]
confirm: {seeds: [5]}
scheduler: {type: asha, grace_period: 1, reduction_factor: 3}
resources: {cpu: 1}
max_concurrent: 4
"""


@pytest.fixture
def spec_path(tmp_path: Path) -> Path:
    path = tmp_path / "est.yaml"
    path.write_text(SPEC)
    return path


def test_expected_epochs_by_hand() -> None:
    # rungs 1, 3, 9 up to 27, rf 3: 1 + (3-1)/3 + (9-3)/9 + (27-9)/27 = 3
    assert expected_epochs(27, [1, 3, 9], 3) == pytest.approx(3.0)
    # rungs 2, 4, 8 up to 16, rf 2: 2 + 2/2 + 4/4 + 8/8 = 5
    assert expected_epochs(16, [2, 4, 8], 2) == pytest.approx(5.0)
    assert expected_epochs(5, [], 3) == 5.0  # no rung before the budget: every trial runs it all
    assert expected_epochs(5, [5, 15], 3) == 5.0


def test_cell_epochs_on_a_spec(spec_path: Path) -> None:
    """12 searched trials (6 configs x 2 seeds) stopped by ASHA, 1 confirm trial at the full 27 epochs."""
    loaded = load_spec(str(spec_path))
    assert len(loaded.cells) == 2
    for cell in loaded.cells:
        assert cell_epochs(loaded.spec, cell) == (13, 1, 12 * 27 + 27, pytest.approx(12 * 3.0 + 27))
    capped = load_spec(str(spec_path), ["scheduler.max_t=10"])  # rungs 1, 3, 9 up to 10
    per_trial = 1 + 2 / 3 + 6 / 9 + 1 / 27
    assert cell_epochs(capped.spec, capped.cells[0]) == (13, 1, 12 * 10 + 27, pytest.approx(12 * per_trial + 27))
    plain = spec_path.with_name("plain.yaml")
    plain.write_text(SPEC.replace("{type: asha, grace_period: 1, reduction_factor: 3}", "{type: none}"))
    none = load_spec(str(plain))
    assert cell_epochs(none.spec, none.cells[0]) == (13, 1, 13 * 27, 13 * 27)


def test_estimate_uses_measured_epoch_times(spec_path: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """One cell has earlier runs in the store: their median epoch_time_s over all epochs is its cost; the other
    cell has none and is timed."""
    loaded = load_spec(str(spec_path))
    measured_cell, timed_cell = loaded.cells[0].label, loaded.cells[1].label
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("est-exp")
    parent = client.create_run(exp, run_name="est-1", tags={TAG_ROLE: "sweep", TAG_SWEEP: "est-1"})
    for i, times in enumerate([(10.0, 11.0, 12.0), (30.0, 40.0), (13.0,)]):  # median of all 6 epochs: 12.5
        rid = client.create_run(exp, run_name=f"t{i}", tags={
            MLFLOW_PARENT_RUN_ID: parent.info.run_id, TAG_ROLE: "trial", TAG_CELL: measured_cell}).info.run_id
        client.log_batch(rid, metrics=[Metric("epoch_time_s", t, 1, e) for e, t in enumerate(times)]
                         + [Metric("train_time_s", t - 2, 1, e) for e, t in enumerate(times)]
                         + [Metric("eval_time_s", 1.0, 1, e) for e in range(len(times))])
        client.set_terminated(rid)
    client.set_terminated(parent.info.run_id)

    cells = {c.label: c for c in estimate(loaded, uri, time_steps=False)}
    assert cells[measured_cell].epoch_s == pytest.approx(12.5)
    assert cells[measured_cell].measured_work_s == pytest.approx(11.5)  # train (t - 2) + eval (1)
    assert cells[measured_cell].source == "measured (3 runs)"
    assert cells[measured_cell].timed_epoch_s is None
    assert cells[measured_cell].device_hours == pytest.approx((12 * 3.0 + 27) * 12.5 / 3600)
    assert cells[timed_cell].source.startswith("timed")
    assert 0 < cells[timed_cell].epoch_s < 60

    assert main([str(spec_path), "--dry-run", "--estimate", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "measured (3 runs)" in out and "at 4 trials at once (max_concurrent)" in out
    assert "estimate/actual" in out  # the earlier sweep finished: its wall time is compared


def test_estimate_needs_dry_run(spec_path: Path) -> None:
    assert main([str(spec_path), "--estimate"]) == 2
