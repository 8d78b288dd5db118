"""How much of a trained ResNet's output flows through each shortcut vs each residual branch (Captum).

Per residual block, Captum's LayerIntegratedGradients attributes the target logit to the two summands of the
block's addition at once (the `shortcut_out` and `residual_out` taps of `resnet_lab.models.resnet`'s blocks):
both are moved together from their values on a baseline image (the dataset's mean colour, 0 after normalization) to
their values on the real image. By completeness the two attributions sum to the logit's change, so each block's
split is exact, whatever the rest of the network does. The shortcut's share is its absolute attribution mass,
sum |A_shortcut| / (sum |A_shortcut| + sum |A_residual|), over the fixed image set: 1 when the residual branch
contributes nothing, 0 when the shortcut does not (skip off has no shortcut; no share is reported).

Input attribution maps: Captum's IntegratedGradients on a few images, |attribution| summed over channels.
Cost: blocks x images x `n_steps` forward and backward passes (ResNet-18, 64 images, 16 steps: 8,192 image passes,
under a tenth of a CIFAR-10 epoch).
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resnet_lab.analysis.common import EvalSet, block_key, residual_blocks

ATTRIBUTION_IMAGES = 64  # fixed test images for the per-block shares
MAP_IMAGES = 8  # images in the input attribution grid
N_STEPS = 16  # Gauss-Legendre points (Captum's default method): converged to <1% of the shares in our checks


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value to compare
class InputMaps:
    """Input attribution maps: uint8 (N, C, H, W) images, float (N, H, W) |IG| summed over channels, labels."""

    images: Tensor
    maps: Tensor
    labels: Tensor
    predictions: Tensor


def _batch(data: EvalSet, n: int) -> tuple[Tensor, Tensor]:
    """The first `n` images of `data`, normalized, and their labels."""
    loader = data.loader()
    return loader.normalize(data.images[:n]).float(), data.labels[:n]


def shortcut_shares(model: nn.Module, data: EvalSet, n_images: int = ATTRIBUTION_IMAGES,
                    n_steps: int = N_STEPS) -> dict[str, float]:
    """`attribution/blockNN.shortcut_share` per residual block with skip on (and `attribution/images`)."""
    from captum.attr import LayerIntegratedGradients  # imported only by a run that asked for attributions

    model.eval()
    x, y = _batch(data, n_images)
    out = {"attribution/images": float(y.shape[0])}
    for i, (_, block) in enumerate(residual_blocks(model)):
        if not block.skip:
            continue
        with warnings.catch_warnings():
            # Captum warns that one listed layer must not depend solely on another's output: the two summands
            # are parallel (neither feeds the other), which is what the warning asks.
            warnings.filterwarnings("ignore", "Multiple layers provided", UserWarning)
            lig = LayerIntegratedGradients(model, [block.shortcut_out, block.residual_out])
        a_short, a_res = lig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=n_steps,
                                       internal_batch_size=max(n_steps, 64))
        short, res = a_short.abs().sum().item(), a_res.abs().sum().item()
        out[f"attribution/{block_key(i)}.shortcut_share"] = short / (short + res) if short + res > 0 else float("nan")
    return out


def input_maps(model: nn.Module, data: EvalSet, n_images: int = MAP_IMAGES, n_steps: int = 32) -> InputMaps:
    """Integrated gradients of each image's true-class logit w.r.t. its pixels, from the mean-colour baseline."""
    from captum.attr import IntegratedGradients

    model.eval()
    x, y = _batch(data, n_images)
    attributions = IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=n_steps)
    with torch.no_grad():
        predictions = model(x).argmax(1)
    return InputMaps(data.images[:n_images].cpu(), attributions.abs().sum(1).detach().cpu(), y.cpu(),
                     predictions.cpu())


def render_maps(maps: InputMaps, title: str = "") -> bytes:
    """The maps as a PNG: images on top, their |IG| heatmaps below, label and prediction over each column."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a trial process
    from matplotlib.figure import Figure

    n = maps.images.shape[0]
    fig = Figure(figsize=(1.3 * n, 3.0), dpi=100)
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        image = maps.images[j].permute(1, 2, 0).numpy()
        axes[0][j].imshow(image[..., 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None)
        axes[0][j].set_title(f"y={int(maps.labels[j])} p={int(maps.predictions[j])}", fontsize=7)
        heat = maps.maps[j]
        axes[1][j].imshow((heat / heat.max().clamp_min(1e-12)).numpy(), cmap="inferno", vmin=0, vmax=1)
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[1][0].set_ylabel("|IG|", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.82 if title else 0.9, bottom=0.02, wspace=0.05, hspace=0.2)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()
