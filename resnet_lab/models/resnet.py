"""torchvision's ResNet with a CIFAR stem (32x32) or its ImageNet stem, pre-activation blocks and a `skip` switch.

Depth counts weighted layers (stem conv + 2 per basic or 3 per bottleneck block + fc), not the 1x1 projection
shortcuts, as He et al. 2015 (Table 1) count them. `skip=False` is their plain-net ablation: the same stacked layers
with the whole shortcut branch removed (no `downsample` module at all), everything else unchanged, initial weights
included (see `weight_init_scope`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from resnet_lab.models.registry import register
from resnet_lab.spec.catalog import BLOCKS, MODEL_CATALOG

# (in_planes, out_planes, stride) -> the module that maps a block's input onto its output shape.
ShortcutFactory = Callable[[int, int, int], nn.Module]


# --------------------------------------------------------------------------------------------------------------------
# Initialisation


@contextmanager
def weight_init_scope(model: nn.Module) -> Iterator[None]:
    """Build `model`'s layers inside this block; on exit every weight is initialised from one global-RNG draw."""
    # One draw, whatever the architecture: torch.manual_seed(s) before a build fixes all weights, and the global
    # stream after the build (dropout masks, anything else) is the same for skip on and off.
    seed = int(torch.randint(0, 2**62, ()).item())
    # The layers' own default inits are overwritten below; forking hides how many numbers they drew.
    with torch.random.fork_rng(devices=[]):
        yield
    init_weights(model, seed)


def init_weights(model: nn.Module, seed: int) -> None:
    """torchvision's init: Kaiming-normal convs (fan_out, ReLU), BN as identity, PyTorch's default for linear."""
    # Shortcut modules (anything under a `downsample`) draw from their own generator, so removing them (skip=False)
    # leaves every other weight bit-identical for the same seed.
    main = torch.Generator().manual_seed(seed)
    side = torch.Generator().manual_seed(seed + 1)
    for name, module in model.named_modules():
        gen = side if "downsample" in name.split(".") else main
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            # nn.Linear's own default, U(+-1/sqrt(fan_in)) for weight and bias, which torchvision keeps.
            bound = 1.0 / math.sqrt(module.in_features)
            nn.init.uniform_(module.weight, -bound, bound, generator=gen)
            if module.bias is not None:
                nn.init.uniform_(module.bias, -bound, bound, generator=gen)


# --------------------------------------------------------------------------------------------------------------------
# Blocks


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias (a BN follows or precedes it)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


def projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """He et al. 2015's option B: a strided 1x1 conv + BN where the shape changes, identity elsewhere."""
    return nn.Sequential(conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes))


def preact_projection_shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    """Projection for pre-activation blocks: a bare 1x1 conv, as its input is already BN-ReLU'd (He et al. 2016b)."""
    return conv1x1(in_planes, out_planes, stride)


# Every block passes its residual branch through `residual_out` and its shortcut through `shortcut_out` (identities,
# no parameters) right before the addition, so hooks and Captum's layer attributions can read or replace exactly the
# two summands (resnet_lab.analysis.attribution).


def _check_shortcut(in_planes: int, out_planes: int, stride: int, downsample: nn.Module | None, skip: bool) -> None:
    if not skip and downsample is not None:
        raise ValueError("skip=False removes the whole shortcut branch; pass downsample=None")
    if skip and downsample is None and (stride != 1 or in_planes != out_planes):
        raise ValueError(
            f"an identity shortcut cannot map {in_planes} channels at stride {stride} to {out_planes} channels; "
            "pass a downsample module"
        )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN, ReLU after the addition (He et al. 2015, Fig. 2)."""

    expansion: ClassVar[int] = 1
    weighted_layers: ClassVar[int] = 2
    preact: ClassVar[bool] = False

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *, skip: bool = True
    ) -> None:
        super().__init__()
        _check_shortcut(inplanes, planes * self.expansion, stride, downsample, skip)
        self.skip = skip
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual_out, self.shortcut_out = nn.Identity(), nn.Identity()  # the two summands, for hooks

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (N, inplanes, H, W) -> (N, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))  # -> (N, planes, H/s, W/s)
        out = self.residual_out(out)
        if self.skip:
            out = out + self.shortcut_out(x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride, torchvision's "v1.5"), 1x1 expand x4; ReLU after the addition."""

    expansion: ClassVar[int] = 4
    weighted_layers: ClassVar[int] = 3
    preact: ClassVar[bool] = False

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *, skip: bool = True
    ) -> None:
        super().__init__()
        _check_shortcut(inplanes, planes * self.expansion, stride, downsample, skip)
        self.skip = skip
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual_out, self.shortcut_out = nn.Identity(), nn.Identity()  # the two summands, for hooks

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (N, inplanes, H, W) -> (N, planes, H, W)
        out = self.relu(self.bn2(self.conv2(out)))  # -> (N, planes, H/s, W/s)
        out = self.bn3(self.conv3(out))  # -> (N, 4*planes, H/s, W/s)
        out = self.residual_out(out)
        if self.skip:
            out = out + self.shortcut_out(x if self.downsample is None else self.downsample(x))
        return self.relu(out)

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


class PreActBlock(nn.Module):
    """Pre-activation basic block, BN-ReLU-conv twice, nothing after the addition (He et al. 2016b, Fig. 4e)."""

    expansion: ClassVar[int] = 1
    weighted_layers: ClassVar[int] = 2
    preact: ClassVar[bool] = True

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *, skip: bool = True
    ) -> None:
        super().__init__()
        _check_shortcut(inplanes, planes * self.expansion, stride, downsample, skip)
        self.skip = skip
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample
        self.residual_out, self.shortcut_out = nn.Identity(), nn.Identity()  # the two summands, for hooks

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))  # (N, inplanes, H, W), shared by conv1 and a projection shortcut
        out = self.conv1(pre)  # -> (N, planes, H/s, W/s)
        out = self.residual_out(self.conv2(self.relu(self.bn2(out))))  # -> (N, planes, H/s, W/s)
        if self.skip:
            # A projection reads the activated input, an identity the raw one, which keeps the identity path clean
            # from block to block (He et al. 2016b, Sec. 4; their Torch code does the same).
            out = out + self.shortcut_out(x if self.downsample is None else self.downsample(pre))
        return out

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-ReLU before each of 1x1, 3x3 (strided), 1x1 x4 (He et al. 2016b)."""

    expansion: ClassVar[int] = 4
    weighted_layers: ClassVar[int] = 3
    preact: ClassVar[bool] = True

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *, skip: bool = True
    ) -> None:
        super().__init__()
        _check_shortcut(inplanes, planes * self.expansion, stride, downsample, skip)
        self.skip = skip
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv1x1(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.downsample = downsample
        self.residual_out, self.shortcut_out = nn.Identity(), nn.Identity()  # the two summands, for hooks

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))  # (N, inplanes, H, W)
        out = self.conv1(pre)  # -> (N, planes, H, W)
        out = self.conv2(self.relu(self.bn2(out)))  # -> (N, planes, H/s, W/s)
        out = self.residual_out(self.conv3(self.relu(self.bn3(out))))  # -> (N, 4*planes, H/s, W/s)
        if self.skip:
            out = out + self.shortcut_out(x if self.downsample is None else self.downsample(pre))
        return out

    def extra_repr(self) -> str:
        return f"skip={self.skip}"


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBlock] | type[PreActBottleneck]


# --------------------------------------------------------------------------------------------------------------------
# Network


Stem = Literal["cifar", "imagenet"]
STEMS: tuple[str, ...] = ("cifar", "imagenet")


class ResNet(nn.Module):
    """ResNet: stem, one stage per entry of `layers`, GAP, dropout, fc.

    `stem="cifar"`: a 3x3 conv at stride 1, no max-pool, for 32x32 images. `stem="imagenet"`: torchvision's 7x7 conv
    at stride 2 + BN-ReLU + 3x3 max-pool at stride 2 (4x less resolution before layer1), for 64 px and up.

    Stage i has `base_channels * 2**i * width` planes and stride 2 except the first. `shortcut` builds the
    `downsample` modules (default: 1x1 projection, bare for pre-activation blocks); with `skip=False` none is built.
    Pre-activation nets have a bare stem conv and a final BN-ReLU before pooling (He et al. 2016b).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        *,
        width: float = 1.0,
        skip: bool = True,
        dropout: float = 0.0,
        num_classes: int = 10,
        in_channels: int = 3,
        base_channels: int = 64,
        shortcut: ShortcutFactory | None = None,
        stem: Stem = "cifar",
    ) -> None:
        super().__init__()
        if not layers or min(layers) < 1:
            raise ValueError(f"layers must list at least one block per stage (got {list(layers)})")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of: {', '.join(STEMS)}")
        self.stem = stem
        self.skip = skip
        self._shortcut = shortcut or (preact_projection_shortcut if block.preact else projection_shortcut)
        planes = [max(1, round(base_channels * 2**i * width)) for i in range(len(layers))]
        features = planes[-1] * block.expansion
        with weight_init_scope(self):
            self.inplanes = planes[0]
            if stem == "imagenet":
                # torchvision's stem, BN-ReLU kept for pre-activation nets too (as fb.resnet.torch's ImageNet
                # preresnet.lua does): the max-pool wants activated input.
                self.conv1 = nn.Conv2d(in_channels, planes[0], kernel_size=7, stride=2, padding=3, bias=False)
                self.bn1 = nn.BatchNorm2d(planes[0])
                self.relu = nn.ReLU(inplace=True)
                self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            else:
                self.conv1 = conv3x3(in_channels, planes[0])
                self.bn1 = nn.Identity() if block.preact else nn.BatchNorm2d(planes[0])
                self.relu = nn.Identity() if block.preact else nn.ReLU(inplace=True)
                self.maxpool = nn.Identity()
            self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
            for i, (name, n_blocks) in enumerate(zip(self.stage_names, layers, strict=True)):
                self.add_module(name, self._make_layer(block, planes[i], n_blocks, stride=1 if i == 0 else 2))
            self.final_act = (
                nn.Sequential(nn.BatchNorm2d(features), nn.ReLU(inplace=True)) if block.preact else nn.Identity()
            )
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.dropout = nn.Dropout(dropout)
            self.fc = nn.Linear(features, num_classes)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if self.skip and (stride != 1 or self.inplanes != out_planes):
            downsample = self._shortcut(self.inplanes, out_planes, stride)
        layers = [block(self.inplanes, planes, stride, downsample, skip=self.skip)]
        self.inplanes = out_planes
        layers += [block(self.inplanes, planes, skip=self.skip) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        # Shapes for resnet-18 on CIFAR (cifar stem); e = block expansion (1 basic, 4 bottleneck), width 1. With the
        # imagenet stem at 224 px: (N, 3, 224, 224) -> conv1 (N, 64, 112, 112) -> maxpool (N, 64, 56, 56), then
        # layer1..4 at 56, 28, 14, 7.
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (N, 3, 32, 32) -> (N, 64, 32, 32)
        for name in self.stage_names:
            # layer1 -> (N, 64e, 32, 32), layer2 -> (N, 128e, 16, 16), layer3 -> (N, 256e, 8, 8),
            # layer4 -> (N, 512e, 4, 4)
            x = getattr(self, name)(x)
        x = self.final_act(x)
        x = torch.flatten(self.avgpool(x), 1)  # (N, 512e, 4, 4) -> (N, 512e)
        return self.fc(self.dropout(x))  # -> (N, num_classes)


# --------------------------------------------------------------------------------------------------------------------
# Builders

# depth -> blocks per stage; depth = 1 stem conv + weighted_layers * blocks + 1 fc. Each depth's natural block
# (basic up to 34, bottleneck from 50) is the catalogue's (`spec/catalog.py`), the one table the spec checks too.
_STAGES: dict[int, tuple[int, ...]] = {
    8: (1, 1, 1),  # 1 + 2*3 + 1: three stages (64-128-256); four stages need at least 10 layers
    10: (1, 1, 1, 1),
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# depth -> (natural block, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, ...]]] = {
    depth: (block, _STAGES[depth]) for depth, block in MODEL_CATALOG["resnet"].blocks.items()}

_BLOCK_CLASSES: dict[tuple[str, bool], Block] = {
    ("basic", False): BasicBlock,
    ("basic", True): PreActBlock,
    ("bottleneck", False): Bottleneck,
    ("bottleneck", True): PreActBottleneck,
}


def resolve_block(depth: int, block: str | None) -> Block:
    """The block class for `resnet(depth, block)`; a block that cannot give `depth` layers honestly raises."""
    natural, _ = RESNET_LAYOUTS[depth]
    if block is None or block == natural:
        return _BLOCK_CLASSES[(natural, False)]
    if block == "preact":
        return _BLOCK_CLASSES[(natural, True)]
    if block in BLOCKS:
        # Changing the block kind changes the layers per block (2 vs 3), so the same stage layout would no longer
        # have `depth` layers: 18 basic -> 26 with bottlenecks, 50 bottleneck -> 34 with basic blocks.
        same = [d for d, (kind, _) in RESNET_LAYOUTS.items() if kind == block]
        raise ValueError(
            f"resnet depth {depth} is built from {natural} blocks; {block} blocks would change its layer count. "
            f"Use block '{natural}', 'preact' or leave it unset, or pick a {block} depth: {', '.join(map(str, same))}"
        )
    raise ValueError(f"unknown block {block!r}; choose one of: {', '.join(BLOCKS)}")


@register("resnet")
def resnet(
    depth: int = 18,
    block: str | None = None,
    width: float = 1.0,
    skip: bool = True,
    dropout: float = 0.0,
    num_classes: int = 10,
    in_channels: int = 3,
    stem: Stem = "cifar",
) -> ResNet:
    """ResNet-`depth`: basic blocks for 8-34 (8 has three stages, [1, 1, 1]), bottlenecks for 50-152.

    `block='preact'` gives the pre-activation version of the depth's own block (basic or bottleneck) with the same
    layer counts; asking for the other kind ('bottleneck' at 18, 'basic' at 50) raises, as it would change the depth.
    ResNet-18 has 11,173,962 parameters (10 classes, 3 channels). `stem='imagenet'` is torchvision's 7x7 stem with
    max-pool; with 1000 classes resnet-18/34/50 then have torchvision's counts exactly (11,689,512, 21,797,672,
    25,557,032).
    """
    if depth not in RESNET_LAYOUTS:
        raise ValueError(f"resnet depth {depth} is not supported; supported: {', '.join(map(str, RESNET_LAYOUTS))}")
    _, layers = RESNET_LAYOUTS[depth]
    return ResNet(
        resolve_block(depth, block), layers, width=width, skip=skip, dropout=dropout, num_classes=num_classes,
        in_channels=in_channels, stem=stem,
    )


@register("mini_resnet")
def mini_resnet(
    width: float = 1.0, skip: bool = True, dropout: float = 0.0, num_classes: int = 10, in_channels: int = 3
) -> ResNet:
    """ResNet-14, 2.78M params: stem + three stages of 2 basic blocks (64-128-256, strides 1-2-2) + fc.

    That is ResNet-18 without its last stage (which holds 8.4M of its 11.2M parameters).
    """
    return ResNet(
        BasicBlock, (2, 2, 2), width=width, skip=skip, dropout=dropout, num_classes=num_classes,
        in_channels=in_channels,
    )
