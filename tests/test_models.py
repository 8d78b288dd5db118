"""Tests for resnet_lab.models: every registered model, depth and block trains a step; counts and skip are honest."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnet_lab.gradflow import weighted_layers
from resnet_lab.models import build_model, count_params, model_names, register
from resnet_lab.spec.catalog import MODEL_CATALOG

# Structural tests run at width 0.25: layer counts, order and shortcuts do not depend on width, and it is ~16x cheaper,
# which keeps ResNet-152 affordable on 2 CPU cores.
SMALL_WIDTH = 0.25


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def variants() -> list[tuple[str, dict[str, Any]]]:
    """Every architecture the catalogue offers: each model, each supported depth, natural and pre-activation block."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name in model_names():
        entry = MODEL_CATALOG[name]
        blocks = (None, "preact") if "block" in entry.params else (None,)
        for depth in entry.depths or (None,):
            for block in blocks:
                params = {k: v for k, v in (("depth", depth), ("block", block)) if v is not None}
                out.append((name, params))
    return out


def variant_id(variant: tuple[str, dict[str, Any]]) -> str:
    name, params = variant
    return "-".join([name, *(str(v) for v in params.values())])


def with_skip(cases: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """Each case with skip on, and off too where the model has a skip switch; the skip value rides in the params."""
    out = []
    for name, params in cases:
        out.append(pytest.param(name, params, id=variant_id((name, params))))
        if MODEL_CATALOG[name].residual:
            out.append(pytest.param(name, {**params, "skip": False}, id=variant_id((name, params)) + "-plain"))
    return out


VARIANTS = variants()
RESIDUAL_VARIANTS = [v for v in VARIANTS if MODEL_CATALOG[v[0]].residual]
DEPTH_VARIANTS = [v for v in VARIANTS if "depth" in v[1]]


def build(name: str, params: dict[str, Any], **extra: Any) -> nn.Module:
    return build_model(name, **params, **extra)


def is_shortcut(name: str) -> bool:
    return "downsample" in name.split(".")


def train_step(model: nn.Module, in_channels: int, size: int, num_classes: int, batch: int = 2) -> torch.Tensor:
    """One forward/backward on random data; returns the logits."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, in_channels, size, size, generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    model.train()
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    assert torch.isfinite(loss), f"loss is {loss.item()}"
    loss.backward()
    return logits


def assert_gradients_reach_every_layer(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    first_name, first = weighted_layers(model)[0]
    assert first.weight.grad.abs().sum() > 0, f"the gradient vanished before the first layer ({first_name})"


# --------------------------------------------------------------------------------------------------------------------
# Every model trains


@pytest.mark.parametrize(("name", "params"), with_skip([(name, {}) for name in model_names()]))
def test_every_model_trains_a_step_at_default_size(name: str, params: dict[str, Any]) -> None:
    model = build(name, params, num_classes=7, in_channels=1)
    logits = train_step(model, in_channels=1, size=32, num_classes=7, batch=4)
    assert logits.shape == (4, 7)
    assert_gradients_reach_every_layer(model)


@pytest.mark.parametrize(("name", "params"), with_skip(VARIANTS))
def test_every_depth_and_block_trains_a_step(name: str, params: dict[str, Any]) -> None:
    model = build(name, params, width=SMALL_WIDTH, num_classes=5, in_channels=3, dropout=0.1)
    logits = train_step(model, in_channels=3, size=16, num_classes=5)
    assert logits.shape == (2, 5)
    assert_gradients_reach_every_layer(model)


@pytest.mark.parametrize("size", [8, 28], ids=["synthetic8", "digits28"])
@pytest.mark.parametrize("name", model_names())
def test_every_model_accepts_the_smallest_and_odd_image_sizes(name: str, size: int) -> None:
    model = build_model(name, width=SMALL_WIDTH, num_classes=3, in_channels=1)
    assert train_step(model, in_channels=1, size=size, num_classes=3).shape == (2, 3)


# --------------------------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize(
    ("name", "params", "target", "tolerance"),
    [
        ("baseline_cnn", {}, 392_000, 0.05),
        ("mini_resnet", {}, 2_800_000, 0.05),
        ("resnet", {"depth": 18}, 11_173_962, 0.01),  # torchvision-style CIFAR ResNet-18
        ("resnet_cifar", {"depth": 20}, 270_000, 0.02),  # He et al. 2015, Table 6: 0.27M
    ],
    ids=["baseline_cnn", "mini_resnet", "resnet18", "resnet_cifar20"],
)
def test_param_count_matches_the_documented_size(
    name: str, params: dict[str, Any], target: int, tolerance: float
) -> None:
    n = count_params(build_model(name, **params))
    assert abs(n - target) <= tolerance * target, f"{name} {params}: {n:,} params, want {target:,} +-{tolerance:.0%}"


def test_count_params_can_skip_frozen_parameters() -> None:
    model = build_model("resnet_cifar", depth=20)
    total = count_params(model)
    model.fc.requires_grad_(False)
    assert count_params(model) == total - (64 * 10 + 10)
    assert count_params(model, trainable_only=False) == total


# --------------------------------------------------------------------------------------------------------------------
# skip=False is the plain-net ablation and nothing else


@pytest.mark.parametrize("variant", RESIDUAL_VARIANTS, ids=variant_id)
def test_skip_false_removes_exactly_the_shortcut_parameters(variant: tuple[str, dict[str, Any]]) -> None:
    name, params = variant
    with_skip = build(name, params, width=SMALL_WIDTH, skip=True)
    plain = build(name, params, width=SMALL_WIDTH, skip=False)
    shortcut_params = sum(p.numel() for n, p in with_skip.named_parameters() if is_shortcut(n))
    assert count_params(plain) == count_params(with_skip) - shortcut_params
    assert not [n for n, _ in plain.named_modules() if is_shortcut(n)], "skip=False must not build a downsample"
    if name == "resnet_cifar":  # option A shortcuts are parameter-free
        assert shortcut_params == 0
    else:
        assert shortcut_params > 0


@pytest.mark.parametrize("variant", RESIDUAL_VARIANTS, ids=variant_id)
def test_skip_changes_no_other_weight_for_the_same_seed(variant: tuple[str, dict[str, Any]]) -> None:
    name, params = variant
    torch.manual_seed(123)
    with_skip = build(name, params, width=SMALL_WIDTH, skip=True)
    after_skip = torch.rand(3)
    torch.manual_seed(123)
    plain = build(name, params, width=SMALL_WIDTH, skip=False)
    after_plain = torch.rand(3)

    kept = {k: v for k, v in with_skip.state_dict().items() if not is_shortcut(k)}
    plain_state = plain.state_dict()
    assert list(kept) == list(plain_state)
    for key, value in kept.items():
        assert value.shape == plain_state[key].shape, key
        assert torch.equal(value, plain_state[key]), f"{key} differs between skip on and off"
    # Building draws the same amount from the global RNG either way, so dropout masks etc. line up afterwards too.
    assert torch.equal(after_skip, after_plain)


def test_the_global_seed_fixes_the_initial_weights() -> None:
    def weights(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        model = build_model("resnet_cifar", depth=20)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(weights(1), weights(1))
    assert not torch.equal(weights(1), weights(2))


# --------------------------------------------------------------------------------------------------------------------
# Depth is honest and layers are listed in forward order


@pytest.mark.parametrize("variant", DEPTH_VARIANTS, ids=variant_id)
def test_depth_counts_weighted_layers_without_projection_shortcuts(variant: tuple[str, dict[str, Any]]) -> None:
    name, params = variant
    model = build(name, params, width=SMALL_WIDTH)
    assert len(weighted_layers(model)) == params["depth"]  # gradflow's list: projection shortcuts left out


@pytest.mark.parametrize(("name", "params"), with_skip(VARIANTS))
def test_weighted_layers_are_listed_in_forward_order(name: str, params: dict[str, Any]) -> None:
    model = build(name, params, width=SMALL_WIDTH)
    called: list[str] = []
    layers = weighted_layers(model)
    for layer_name, layer in layers:
        layer.register_forward_hook(lambda *_, layer_name=layer_name: called.append(layer_name))
    with torch.no_grad():
        model.eval()(torch.randn(1, 3, 16, 16))
    assert called == [n for n, _ in layers]


# --------------------------------------------------------------------------------------------------------------------
# Registry and catalogue


def test_registry_and_catalogue_list_the_same_models() -> None:
    assert set(model_names()) == set(MODEL_CATALOG)
    assert model_names() == sorted(model_names())


@pytest.mark.parametrize("name", sorted(MODEL_CATALOG))
def test_every_catalogue_param_and_depth_is_accepted(name: str) -> None:
    entry = MODEL_CATALOG[name]
    values: dict[str, Any] = {"width": SMALL_WIDTH, "skip": False, "dropout": 0.2, "block": "preact",
                              "stem": "imagenet"}
    params = {p: values[p] for p in entry.params if p != "depth"}
    for depth in entry.depths or (None,):
        depth_param = {} if depth is None else {"depth": depth}
        assert isinstance(build_model(name, **params, **depth_param, num_classes=4, in_channels=2), nn.Module)


def test_unknown_model_suggests_the_closest_name() -> None:
    with pytest.raises(ValueError, match=r"'resnt' is not a known model; did you mean 'resnet'\?"):
        build_model("resnt")


def test_unsupported_depth_lists_the_allowed_depths() -> None:
    with pytest.raises(ValueError, match=r"depth 19 .*supported: 8, 10, 18, 34, 50, 101, 152"):
        build_model("resnet", depth=19)
    with pytest.raises(ValueError, match=r"supported: 20, 32, 44, 56, 110"):
        build_model("resnet_cifar", depth=18)


def test_unsupported_param_is_named() -> None:
    with pytest.raises(ValueError, match=r"'baseline_cnn' does not accept 'depth', 'skip'"):
        build_model("baseline_cnn", depth=18, skip=False)
    with pytest.raises(ValueError, match=r"does not accept 'lr'"):
        build_model("resnet", lr=0.1)


def test_block_that_would_change_the_depth_is_refused() -> None:
    with pytest.raises(ValueError, match=r"depth 18 is built from basic blocks.*bottleneck depth: 50, 101, 152"):
        build_model("resnet", depth=18, block="bottleneck")
    with pytest.raises(ValueError, match=r"depth 50 is built from bottleneck blocks"):
        build_model("resnet", depth=50, block="basic")
    with pytest.raises(ValueError, match=r"unknown block 'wide'"):
        build_model("resnet", block="wide")


def test_natural_block_named_explicitly_is_the_default() -> None:
    torch.manual_seed(0)
    named = build_model("resnet", depth=50, block="bottleneck", width=SMALL_WIDTH)
    torch.manual_seed(0)
    default = build_model("resnet", depth=50, width=SMALL_WIDTH)
    assert str(named) == str(default)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(ValueError, match="'resnet' is already registered"):
        register("resnet")


def test_registering_a_name_missing_from_the_catalogue_raises() -> None:
    with pytest.raises(ValueError, match=r"missing from resnet_lab\.spec\.catalog\.MODEL_CATALOG"):
        register("resnet9000")
    assert "resnet9000" not in model_names()


# --------------------------------------------------------------------------------------------------------------------
# stem: imagenet is torchvision's ResNet


@pytest.mark.parametrize("depth", [18, 34, 50])
def test_imagenet_stem_has_torchvisions_parameter_count(depth: int) -> None:
    torchvision = pytest.importorskip("torchvision")
    theirs = count_params(getattr(torchvision.models, f"resnet{depth}")(weights=None))
    ours = build_model("resnet", depth=depth, stem="imagenet", num_classes=1000, in_channels=3)
    assert count_params(ours) == theirs
    # Dropout adds no parameters, so the count holds whatever the recipe's dropout.
    assert count_params(build_model("resnet", depth=depth, stem="imagenet", num_classes=1000, dropout=0.3)) == theirs


def test_imagenet_stem_matches_torchvisions_state_dict_shapes() -> None:
    torchvision = pytest.importorskip("torchvision")
    theirs = {k: tuple(v.shape) for k, v in torchvision.models.resnet18(weights=None).state_dict().items()}
    ours = {k: tuple(v.shape) for k, v in build_model("resnet", depth=18, stem="imagenet",
                                                      num_classes=1000).state_dict().items()}
    assert ours == theirs  # same names and shapes: torchvision's ResNet-18 weights load as they are


@pytest.mark.parametrize("size", [64, 96, 128])
@pytest.mark.parametrize("params", [{"depth": 18}, {"depth": 18, "skip": False}, {"depth": 50, "block": "preact"}],
                         ids=["resnet18", "resnet18-plain", "resnet50-preact"])
def test_imagenet_stem_trains_a_step_at_higher_resolution(params: dict[str, Any], size: int) -> None:
    model = build("resnet", params, stem="imagenet", width=SMALL_WIDTH, num_classes=6, in_channels=3)
    assert train_step(model, in_channels=3, size=size, num_classes=6).shape == (2, 6)
    assert_gradients_reach_every_layer(model)
    # 7x7/2 conv + 3x3/2 max-pool: layer1 runs at a quarter of the input's side.
    seen: list[tuple[int, ...]] = []
    model.layer1.register_forward_hook(lambda _m, _i, out: seen.append(tuple(out.shape[-2:])))
    model.eval()
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    assert seen == [(size // 4, size // 4)]


def test_cifar_stem_is_the_default_and_unchanged() -> None:
    torch.manual_seed(3)
    default = build_model("resnet", depth=10, width=SMALL_WIDTH)
    torch.manual_seed(3)
    cifar = build_model("resnet", depth=10, width=SMALL_WIDTH, stem="cifar")
    assert default.conv1.kernel_size == (3, 3) and isinstance(default.maxpool, nn.Identity)
    pairs = zip(default.state_dict().values(), cifar.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_unknown_stem_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown stem 'imgnet'; choose one of: cifar, imagenet"):
        build_model("resnet", depth=18, stem="imgnet")
