"""Lesion study (Veit et al. 2016, "Residual networks behave like ensembles of relatively shallow networks").

After training, the test accuracy with one block removed at a time, on the final weights:
- residual block (skip on): the residual branch is deleted and the shortcut kept. A post-activation block
  (BasicBlock, Bottleneck) then outputs relu(shortcut(x)), a pre-activation block shortcut(x); shortcut(x) is x
  or the block's projection (`downsample`). For an identity shortcut both equal x (x is already post-ReLU).
- plain block (skip off): the block is bypassed, output = input, where input and output shapes match. A block that
  changes the shape (stride 2, more channels) has no bypass: it is reported as not applicable (its key is absent).

Veit et al. found that deleting one block of a ResNet barely hurts and deleting a layer of a plain net destroys
it. Cost: one test pass per block plus one for the intact model, on a fixed subset of the test set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from resnet_lab.analysis.common import EvalSet, accuracy, block_key, residual_blocks, shortcut

LESION_IMAGES = 2000  # fixed test subset: per-block accuracies to +-1 pp (binomial std at 90%: 0.7 pp)


def lesioned_output(block: nn.Module, x: Tensor) -> Tensor:
    """The block's output with its residual branch removed (skip on) or bypassed (skip off)."""
    if not block.skip:
        return x
    kept = shortcut(block, x)
    return kept if block.preact else torch.relu(kept)


@contextmanager
def lesioned(block: nn.Module) -> Iterator[None]:
    """Within this context, `block` outputs `lesioned_output(block, x)` (a forward hook; weights untouched)."""
    handle = block.register_forward_hook(lambda module, inputs, _output: lesioned_output(module, inputs[0]))
    try:
        yield
    finally:
        handle.remove()


def bypassable(model: nn.Module, data: EvalSet) -> list[bool]:
    """Per residual block: True where its lesion is defined (skip on, or input and output shapes equal)."""
    blocks = residual_blocks(model)
    same: dict[str, bool] = {}
    hooks = [m.register_forward_hook(
        lambda _m, inputs, output, name=name: same.__setitem__(name, inputs[0].shape == output.shape))
        for name, m in blocks]
    try:
        model.eval()
        with torch.no_grad():
            model(data.loader().normalize(data.images[:1]))
    finally:
        for h in hooks:
            h.remove()
    return [bool(m.skip) or same[name] for name, m in blocks]


def lesion_study(model: nn.Module, data: EvalSet) -> dict[str, float]:
    """`lesion/full.test_acc`, `lesion/blockNN.test_acc` per applicable block, `lesion/num_blocks`, `lesion/images`.

    A block missing from the keys (below `lesion/num_blocks`) could not be bypassed (a plain block changing shape).
    `lesion/mean_drop` is the full accuracy minus the mean over the applicable blocks.
    """
    blocks = residual_blocks(model)
    out = {"lesion/full.test_acc": accuracy(model, data), "lesion/num_blocks": float(len(blocks)),
           "lesion/images": float(data.labels.shape[0])}
    accs = []
    for i, ((_, block), ok) in enumerate(zip(blocks, bypassable(model, data), strict=True)):
        if ok:
            with lesioned(block):
                accs.append(accuracy(model, data))
            out[f"lesion/{block_key(i)}.test_acc"] = accs[-1]
    if accs:
        out["lesion/mean_drop"] = out["lesion/full.test_acc"] - sum(accs) / len(accs)
    return out
