"""Gradient flow measured so that it can test the claim "without shortcuts, early-layer gradients vanish".

Two quantities, both on one fixed batch of validation images, model in eval mode (no dropout, BN running
statistics), computed with `torch.autograd.grad` so training's `.grad` fields, BN buffers and RNG are untouched:

- per block (stem, every residual or plain block, head): the mean over images of ||dl_i / d h_i||, the norm of one
  image's loss gradient with respect to that block's output. This is the signal backpropagation carries between
  blocks; a vanishing gradient shows as this norm falling toward the input. (With eval-mode BN the images are
  independent, so the per-image gradient of the summed loss is exactly each image's own.)
- per weighted layer: ||dL/dW|| / ||W|| (Frobenius norms, L the mean loss of the batch), the relative update a step
  would make. The mean |dL/dW| the reference study plotted is dominated by layer width (BN makes a conv
  scale-invariant, so its gradient shrinks with fan-in and weight norm); the ratio removes the weight-norm part.

Metric keys (MLflow charts them): `gradflow/<phase>/block/<NN>.<name>`, `gradflow/<phase>/layer/<NNN>.<name>` and
`gradflow/<phase>/first_last` (stem-output over last-block-output gradient norm: two feature maps, like with like;
the head's logits are left out of the ratio). Phases: `init` (before training), `epoch1`, `final` (the weights that
were tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PHASES = ("init", "epoch1", "final")
PREFIX = "gradflow/"
PROBE_IMAGES = 256  # fixed validation images per measurement: one forward and backward, negligible next to an epoch


def block_key(phase: str, index: int, name: str) -> str:
    """`gradflow/init/block/03.layer2.0`."""
    return f"{PREFIX}{phase}/block/{index:02d}.{name}"


def layer_key(phase: str, index: int, name: str) -> str:
    """`gradflow/final/layer/007.layer2.0.conv1`."""
    return f"{PREFIX}{phase}/layer/{index:03d}.{name}"


def ratio_key(phase: str) -> str:
    """`gradflow/final/first_last`."""
    return f"{PREFIX}{phase}/first_last"


def flow_points(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs are measured, input to output: stem, every block, head.

    The zoo has two shapes: the ResNet family (`stage_names`, `maxpool` ending the stem, `fc`) and the plain CNN
    (`features` of conv blocks, `fc`). The plain CNN has no separate stem: its first conv block plays that part.
    """
    if hasattr(model, "stage_names"):
        points: list[tuple[str, nn.Module]] = [("stem", model.maxpool)]
        for stage in model.stage_names:
            points += [(f"{stage}.{i}", block) for i, block in enumerate(getattr(model, stage))]
        return [*points, ("head", model.fc)]
    if hasattr(model, "features"):
        return [*((f"features.{i}", m) for i, m in enumerate(model.features)), ("head", model.fc)]
    raise TypeError(f"{type(model).__name__} has no known block structure; add it to resnet_lab.gradflow.flow_points")


def weighted_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv and linear layers of the main path, in definition order (the zoo keeps it = forward order).

    Projection shortcuts (`downsample`) are left out: they are not counted in a ResNet's depth, and without them the
    layer profiles of skip on and skip off line up layer by layer.
    """
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and "downsample" not in name.split(".")]


@dataclass(frozen=True)
class Flow:
    """One measurement: per-block gradient norms and per-layer relative gradients, input to output."""

    blocks: list[tuple[str, float]]
    layers: list[tuple[str, float]]

    @property
    def first_last(self) -> float:
        """Stem-output gradient norm over the last block's (the head excluded): < 1 means it shrank toward the input."""
        features = self.blocks[:-1] if len(self.blocks) > 2 else self.blocks
        last = features[-1][1]
        return features[0][1] / last if last > 0 else float("inf")

    def metrics(self, phase: str) -> dict[str, float]:
        """The measurement as metric keys of `phase`."""
        out = {block_key(phase, i, name): v for i, (name, v) in enumerate(self.blocks)}
        out.update({layer_key(phase, i, name): v for i, (name, v) in enumerate(self.layers)})
        out[ratio_key(phase)] = self.first_last
        return out


def measure(model: nn.Module, x: Tensor, y: Tensor, points: list[tuple[str, nn.Module]] | None = None) -> Flow:
    """Block-output gradient norms and relative layer gradients of `model` on the batch (x, y), in eval mode.

    The model's train/eval mode is restored afterwards; no `.grad` field is written.
    """
    points = flow_points(model) if points is None else points
    layers = weighted_layers(model)
    outputs: dict[int, Tensor] = {}
    hooks = [module.register_forward_hook(_keep(outputs, i)) for i, (_, module) in enumerate(points)]
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            # The input requires grad so every block output is in the graph, even one that no weight feeds yet.
            logits = model(x.detach().requires_grad_(True)).float()
            loss = F.cross_entropy(logits, y, reduction="sum")  # sum: each image's gradient is its own
            captured = [outputs[i] for i in range(len(points))]
            weights = [m.weight for _, m in layers]
            # Frozen layers (model.freeze) cannot be differentiated against: their gradient is reported as none.
            found = iter(torch.autograd.grad(loss, [*captured, *(w for w in weights if w.requires_grad)],
                                             allow_unused=True))
            grads = [next(found) for _ in captured] + [next(found) if w.requires_grad else None for w in weights]
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    n = len(y)
    blocks = [(name, _per_image_norm(g)) for (name, _), g in zip(points, grads[: len(points)], strict=True)]
    relative = []
    for (name, m), g in zip(layers, grads[len(points):], strict=True):
        w_norm = float(m.weight.detach().float().norm())
        g_norm = float(g.float().norm()) / n if g is not None else 0.0  # of the mean loss
        relative.append((name, g_norm / w_norm if w_norm > 0 else float("inf")))
    return Flow(blocks, relative)


def _keep(store: dict[int, Tensor], index: int) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
    def hook(_module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
        store[index] = output

    return hook


def _per_image_norm(grad: Tensor | None) -> float:
    if grad is None:
        return 0.0
    return float(grad.detach().float().flatten(1).norm(dim=1).mean())
