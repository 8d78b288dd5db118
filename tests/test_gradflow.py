"""Gradient-flow measurement on hand-built nets whose gradients are known, and on every registered model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_lab import gradflow
from resnet_lab.models import build_model, model_names


class Scale(nn.Module):
    """y = c * x: the gradient with respect to the input is c times the gradient with respect to the output."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c * x


def chain(scales: list[float], features: int = 6, classes: int = 3) -> tuple[nn.Module, list[tuple[str, nn.Module]]]:
    """blocks of y = c_i * x, then a linear head; the measurement points are the blocks and the head."""
    torch.manual_seed(0)
    blocks = nn.Sequential(*(Scale(c) for c in scales))
    head = nn.Linear(features, classes)
    model = nn.Sequential(blocks, head)
    points = [*((f"b{i}", b) for i, b in enumerate(blocks)), ("head", head)]
    return model, points


def batch(n: int = 16, features: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, features, generator=g), torch.randint(0, classes, (n,), generator=g)


def test_identity_chain_preserves_the_gradient_norm() -> None:
    model, points = chain([1.0] * 5)
    x, y = batch()
    flow = gradflow.measure(model, x, y, points)
    norms = [v for _, v in flow.blocks[:-1]]
    assert norms == pytest.approx([norms[-1]] * 5, rel=1e-6)
    assert flow.first_last == pytest.approx(1.0, rel=1e-6)


def test_half_scaled_chain_halves_the_gradient_per_block_toward_the_input() -> None:
    model, points = chain([0.5] * 5)
    x, y = batch()
    norms = [v for _, v in gradflow.measure(model, x, y, points).blocks[:-1]]
    # dL/d(out of block i) = 0.5 * dL/d(out of block i+1): each step toward the input halves it.
    for earlier, later in itertools.pairwise(norms):
        assert earlier == pytest.approx(0.5 * later, rel=1e-6)
    assert gradflow.measure(model, x, y, points).first_last == pytest.approx(0.5**4, rel=1e-6)


def test_block_norm_is_the_mean_per_image_gradient_norm_computed_by_hand() -> None:
    model, points = chain([2.0, 1.0])
    x, y = batch()
    flow = gradflow.measure(model, x, y, points)
    logits = model(x)
    probs = F.softmax(logits, dim=1)
    dlogits = probs - F.one_hot(y, 3).float()  # d(CE_i)/d(logits_i)
    head = points[-1][1]
    expected_last_block = (dlogits @ head.weight).norm(dim=1).mean().item()
    assert flow.blocks[-1][1] == pytest.approx(dlogits.norm(dim=1).mean().item(), rel=1e-5)
    assert flow.blocks[1][1] == pytest.approx(expected_last_block, rel=1e-5)


def test_relative_layer_gradient_matches_autograd_on_the_mean_loss() -> None:
    model, points = chain([1.0])
    x, y = batch()
    flow = gradflow.measure(model, x, y, points)
    head = points[-1][1]
    loss = F.cross_entropy(model(x), y)
    (grad,) = torch.autograd.grad(loss, [head.weight])
    assert flow.layers == [("1", pytest.approx((grad.norm() / head.weight.norm()).item(), rel=1e-5))]


def test_measurement_leaves_training_state_untouched() -> None:
    model = build_model("resnet", depth=10, width=0.125, dropout=0.5, num_classes=4)
    model.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    gradflow.measure(model, x, y)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in buffers.items())  # BN running stats unchanged
    assert torch.equal(rng, torch.get_rng_state())  # eval mode: no dropout draws


@pytest.mark.parametrize("name", model_names())
@pytest.mark.parametrize("skip", [True, False])
def test_every_model_has_stem_blocks_and_head_measured(name: str, skip: bool) -> None:
    kwargs = {"skip": skip} if "skip" in _params(name) else {}
    if not skip and "skip" not in _params(name):
        pytest.skip("no skip switch")
    kwargs |= {"depth": 20} if name == "resnet_cifar" else {"depth": 10} if name == "resnet" else {}
    model = build_model(name, width=0.25, num_classes=5, in_channels=1, **kwargs)
    flow = gradflow.measure(model, torch.randn(4, 1, 32, 32), torch.randint(0, 5, (4,)))
    names = [n for n, _ in flow.blocks]
    assert names[-1] == "head"
    assert len(names) >= 4
    assert all(math.isfinite(v) and v > 0 for _, v in flow.blocks)
    metrics = flow.metrics("init")
    assert gradflow.ratio_key("init") in metrics
    assert sum(k.startswith("gradflow/init/block/") for k in metrics) == len(names)


def _params(name: str) -> frozenset[str]:
    from resnet_lab.spec.catalog import MODEL_CATALOG

    return MODEL_CATALOG[name].params
