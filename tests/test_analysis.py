"""resnet_lab.analysis: lesion study and Captum attributions on hand-built blocks and tiny trained models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from resnet_lab.analysis import EvalSet, analyse, lesion_study, lesioned, lesioned_output, residual_blocks
from resnet_lab.analysis.lesion import bypassable
from resnet_lab.models import build_model
from resnet_lab.models.resnet import BasicBlock, Bottleneck, PreActBlock, PreActBottleneck, projection_shortcut
from resnet_lab.spec import TrialConfig
from resnet_lab.trainer import EpochMetrics, fit

Expected = Callable[[nn.Module, torch.Tensor], torch.Tensor]  # (block, input) -> the lesioned block's output
SYNTHETIC = {"name": "synthetic", "synthetic": {"train_size": 512, "test_size": 128, "image_size": 16, "noise": 1.0}}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def randomized(block: nn.Module) -> nn.Module:
    """`block` in eval mode with random BN statistics and affine terms, so no part of it is an identity."""
    gen = torch.Generator().manual_seed(0)
    for m in block.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = torch.rand(m.num_features, generator=gen) + 0.5
            m.bias.data = torch.randn(m.num_features, generator=gen)
            m.running_mean = torch.randn(m.num_features, generator=gen)
            m.running_var = torch.rand(m.num_features, generator=gen) + 0.5
    return block.eval()


# --- lesion: hook level ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("block", "expected"), [
    (BasicBlock(8, 8), lambda b, x: torch.relu(x)),
    (BasicBlock(8, 16, 2, projection_shortcut(8, 16, 2)), lambda b, x: torch.relu(b.downsample(x))),
    (Bottleneck(16, 4), lambda b, x: torch.relu(x)),
    (PreActBlock(8, 8), lambda b, x: x),
    (PreActBlock(8, 16, 2, nn.Conv2d(8, 16, 1, 2, bias=False)), lambda b, x: b.downsample(torch.relu(b.bn1(x)))),
    (PreActBottleneck(8, 4, 2, nn.Conv2d(8, 16, 1, 2, bias=False)),
     lambda b, x: b.downsample(torch.relu(b.bn1(x)))),
], ids=["basic-identity", "basic-projection", "bottleneck-identity", "preact-identity", "preact-projection",
        "preact-bottleneck-projection"])
def test_lesioned_residual_block_outputs_its_shortcut_only(block: nn.Module, expected: Expected) -> None:
    block = randomized(block)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    with torch.no_grad():
        intact = block(x)
        with lesioned(block):
            lesioned_out = block(x)
        after = block(x)
        want = expected(block, x)
    torch.testing.assert_close(lesioned_out, want)
    torch.testing.assert_close(lesioned_output(block, x), want)
    assert not torch.allclose(intact, want)  # the branch mattered, so the test can fail
    torch.testing.assert_close(after, intact)  # the hook is gone after the context


def test_lesioned_plain_block_is_bypassed_where_shapes_match() -> None:
    block = randomized(BasicBlock(8, 8, skip=False))
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad(), lesioned(block):
        assert torch.equal(block(x), x)


def test_plain_blocks_that_change_shape_are_not_applicable() -> None:
    model = build_model("resnet", depth=18, width=0.25, skip=False, num_classes=3)
    data = EvalSet(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.int64),
                   torch.zeros(3), torch.ones(3))
    # layer2.0, layer3.0 and layer4.0 halve the size and double the channels.
    assert bypassable(model, data) == [True, True, False, True, False, True, False, True]
    metrics = lesion_study(model, data)
    assert sorted(k for k in metrics if k.startswith("lesion/block")) == [
        f"lesion/block{i:02d}.test_acc" for i in (0, 1, 3, 5, 7)]
    assert metrics["lesion/num_blocks"] == 8 and metrics["lesion/images"] == 4
    residual = build_model("resnet", depth=18, width=0.25, num_classes=3)
    assert bypassable(residual, data) == [True] * 8


def test_models_without_blocks_have_nothing_to_lesion() -> None:
    model = build_model("baseline_cnn", width=0.25, num_classes=3)
    assert residual_blocks(model) == []
    data = EvalSet(torch.zeros(4, 3, 16, 16, dtype=torch.uint8), torch.arange(4) % 3, torch.zeros(3), torch.ones(3))
    assert set(lesion_study(model, data)) == {"lesion/full.test_acc", "lesion/num_blocks", "lesion/images"}


# --- attribution: hand-built answers ------------------------------------------------------------------------------

def tiny_resnet() -> tuple[nn.Module, EvalSet]:
    torch.manual_seed(0)
    model = build_model("resnet", depth=10, width=0.25, num_classes=4).eval()
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=gen)
    return model, EvalSet(images, torch.arange(6) % 4, torch.full((3,), 0.5), torch.full((3,), 0.25))


def test_zeroed_residual_branch_gives_the_shortcut_the_whole_share() -> None:
    from resnet_lab.analysis.attribution import shortcut_shares

    model, data = tiny_resnet()
    nn.init.zeros_(model.layer2[0].bn2.weight)  # the branch's last BN outputs its bias: zero
    nn.init.zeros_(model.layer2[0].bn2.bias)
    nn.init.zeros_(model.layer3[0].downsample[1].weight)  # the projection shortcut outputs zero
    nn.init.zeros_(model.layer3[0].downsample[1].bias)
    shares = shortcut_shares(model, data, n_images=6, n_steps=8)
    assert shares["attribution/block01.shortcut_share"] == pytest.approx(1.0)
    assert shares["attribution/block02.shortcut_share"] == pytest.approx(0.0)
    for key in ("attribution/block00.shortcut_share", "attribution/block03.shortcut_share"):
        assert 0.0 < shares[key] < 1.0
    assert shares["attribution/images"] == 6


def test_two_summands_attributions_add_up_to_the_logit_change() -> None:
    """Completeness: the shortcut's and the branch's attributions sum to the logit change from their baselines."""
    from captum.attr import LayerIntegratedGradients

    model, data = tiny_resnet()
    x, y = data.loader().normalize(data.images), data.labels
    block = model.layer2[0]
    lig = LayerIntegratedGradients(model, [block.shortcut_out, block.residual_out])
    (a_short, a_res), delta = lig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=64,
                                            return_convergence_delta=True)
    assert delta.abs().max() < 1e-2 * (a_short.flatten(1).sum(1) + a_res.flatten(1).sum(1)).abs().max()


def test_plain_nets_report_no_shortcut_share() -> None:
    from resnet_lab.analysis.attribution import shortcut_shares

    torch.manual_seed(0)
    model = build_model("resnet", depth=10, width=0.25, num_classes=4, skip=False)
    _, data = tiny_resnet()
    assert shortcut_shares(model, data, n_images=2, n_steps=4) == {"attribution/images": 2.0}


def test_input_maps_render_as_a_png() -> None:
    model, data = tiny_resnet()
    result = analyse(["attribution"], model, data, title="tiny")
    png = result.artifacts["attribution_maps.png"]
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000


# --- through the trainer --------------------------------------------------------------------------------------------

def train(skip: bool, analysis: list[str], seed: int = 0) -> tuple[dict[str, float], dict[str, bytes]]:
    cfg = TrialConfig.model_validate({
        "dataset": SYNTHETIC, "model": {"name": "resnet_cifar", "depth": 20, "width": 0.5, "skip": skip},
        "trainer": {"epochs": 4, "batch_size": 64, "device": "cpu", "threads": 1}, "seed": seed,
        "analysis": analysis})
    final: list[EpochMetrics] = []
    result = fit(cfg, lambda e: final.append(e) if e.final else None)
    return result.metrics, final[0].artifacts


def test_trainer_logs_lesion_and_attribution_metrics_and_the_map_figure() -> None:
    metrics, artifacts = train(True, ["lesion", "attribution"])
    blocks = [f"block{i:02d}" for i in range(9)]  # resnet_cifar-20: 3 stages x 3 blocks
    assert {f"lesion/{b}.test_acc" for b in blocks} <= set(metrics)
    assert {f"attribution/{b}.shortcut_share" for b in blocks} <= set(metrics)
    assert metrics["lesion/full.test_acc"] == pytest.approx(metrics["test/acc"])  # 128 test images: all of them
    assert metrics["lesion/images"] == 128 and metrics["attribution/images"] == 64
    assert set(artifacts) == {"attribution_maps.png"}
    plain, none = train(False, [])
    assert not any(k.startswith(("lesion/", "attribution/")) for k in plain) and none == {}


@pytest.mark.slow
def test_deleting_a_block_hurts_a_resnet_less_than_bypassing_one_hurts_a_plain_net() -> None:
    """Veit et al. 2016, on the blocks both nets can lose (shape-keeping), over 2 seeds."""
    drops = {True: [], False: []}
    for seed in (0, 1):
        for skip in (True, False):
            metrics, _ = train(skip, ["lesion"], seed)
            kept = [k for k in metrics if k.startswith("lesion/block")]
            assert len(kept) == (9 if skip else 7)
            drops[skip].append(metrics["lesion/mean_drop"])
    assert max(drops[True]) < min(drops[False]), drops


# --- report: rows and figures from runs' final metrics ---------------------------------------------------------------

def lesion_run(full: float, blocks: dict[int, float], shares: dict[int, float] | None = None) -> dict[str, float]:
    run = {"lesion/full.test_acc": full, "lesion/num_blocks": 4.0, "lesion/images": 100.0,
           "lesion/mean_drop": full - sum(blocks.values()) / len(blocks),
           **{f"lesion/block{i:02d}.test_acc": v for i, v in blocks.items()}}
    if shares is not None:
        run["attribution/images"] = 64.0
        run.update({f"attribution/block{i:02d}.shortcut_share": v for i, v in shares.items()})
    return run


def test_lesion_rows_average_over_seeds_with_t_intervals() -> None:
    from scipy import stats as scipy_stats

    from resnet_lab.report.analysis import lesion_rows

    skip = [lesion_run(0.9, {0: 0.85, 1: 0.88, 2: 0.80, 3: 0.89}), lesion_run(0.92, {0: 0.86, 1: 0.9, 2: 0.7, 3: 0.9})]
    plain = [lesion_run(0.8, {0: 0.2, 1: 0.3, 3: 0.1}), lesion_run(0.82, {0: 0.25, 1: 0.35, 3: 0.15})]
    rows = lesion_rows({"skip": skip, "plain": plain, "no lesion": [{"test/acc": 0.5}]})
    assert [r.label for r in rows] == ["skip", "plain"]
    res, pl = rows
    assert res.runs == 2 and res.worst_block == 2 and pl.block_acc[2] is None and pl.worst_block == 3
    values = [0.80, 0.7]
    half = scipy_stats.t.ppf(0.975, 1) * scipy_stats.sem(values)
    assert res.block_acc[2].mean == pytest.approx(0.75)
    assert (res.block_acc[2].low, res.block_acc[2].high) == pytest.approx((0.75 - half, 0.75 + half))
    assert res.mean_drop.mean < pl.mean_drop.mean


def test_attribution_rows_give_the_mean_share_per_block_and_none_without_shortcuts() -> None:
    from resnet_lab.report.analysis import attribution_rows, attribution_table

    runs = [lesion_run(0.9, {0: 0.8}, {0: 0.2, 1: 0.6}), lesion_run(0.9, {0: 0.8}, {0: 0.4, 1: 0.8})]
    plain = [{**lesion_run(0.8, {0: 0.1}), "attribution/images": 64.0}]
    rows = attribution_rows({"skip": runs, "plain": plain})
    assert rows[0].shares[0].mean == pytest.approx(0.3) and rows[0].shares[1].mean == pytest.approx(0.7)
    assert rows[0].mean_share.mean == pytest.approx(0.5) and rows[1].shares == () and rows[1].mean_share is None
    header, body = attribution_table(rows)
    assert header[:3] == ["cell", "seeds", "shortcut share"] and body[1][2] == "n/a"


def test_lesion_and_attribution_figures_are_drawn(tmp_path: Path) -> None:
    from resnet_lab.report.analysis import attribution_figure, lesion_figure, lesion_rows, lesion_table

    cells = {"resnet skip": [lesion_run(0.9, {0: 0.85, 1: 0.88}, {0: 0.3, 1: 0.5}),
                             lesion_run(0.91, {0: 0.8, 1: 0.9}, {0: 0.35, 1: 0.55})],
             "resnet plain": [lesion_run(0.8, {1: 0.3}), lesion_run(0.82, {1: 0.2})]}
    for draw, name in ((lesion_figure, "lesion.png"), (attribution_figure, "shares.png")):
        path = draw(cells, tmp_path / name, dashed={"resnet plain"})
        assert path is not None and path.read_bytes()[:4] == b"\x89PNG"
    assert lesion_figure({"x": [{"test/acc": 0.5}]}, tmp_path / "none.png") is None
    header, body = lesion_table(lesion_rows(cells))
    assert header == ["cell", "seeds", "intact", "mean drop", "worst", "-00", "-01"]
    assert body[1][5] == "n/a"


# --- through a real sweep: Ray reports, the driver logs to MLflow ----------------------------------------------------

SWEEP = """
name: lesions
experiment: lesions
dataset: {name: synthetic, synthetic: {train_size: 256, test_size: 96, image_size: 16}}
model: {name: resnet_cifar, depth: 20, width: 0.25}
trainer: {epochs: 2, batch_size: 64, threads: 1}
grid:
  skip: [true, false]
seeds: [0]
max_concurrent: 2
analysis: [lesion, attribution]
"""


@pytest.mark.slow
def test_sweep_logs_analysis_metrics_and_the_map_figure_to_mlflow(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "lesions.yaml").write_text(SWEEP)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run([sys.executable, str(root / "sweep.py"), str(tmp_path / "lesions.yaml"), "--tracking-uri",
                           uri, "--storage", str(tmp_path / "ray_results")], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lesions").experiment_id])
    kids = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(kids) == 2
    for kid in kids:
        metrics = kid.data.metrics
        assert metrics["lesion/num_blocks"] == 9 and "lesion/block00.test_acc" in metrics
        has_share = "attribution/block00.shortcut_share" in metrics
        assert has_share == (kid.data.params["model.skip"] == "True")
        assert "attribution_maps.png" in [a.path for a in client.list_artifacts(kid.info.run_id)]
    # The figure's bytes went to MLflow, not into Ray's per-trial result logs.
    results = list((tmp_path / "ray_results").rglob("result.json"))
    assert results and all("attribution_maps.png" not in json.dumps(f.read_text()) for f in results)
