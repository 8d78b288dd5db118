"""Transfer: start a trial from another run's weights (`model.init`), with a new head and frozen early layers.

Plain PyTorch. The checkpoint is a `TrainState` (`train_state.pt`, what every trial saves); its tested weights are
taken: the best-validation weights when early stopping kept them, else the last epoch's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from resnet_lab.checkpoint import STATE_FILE, TrainState
from resnet_lab.spec import ModelConfig

HEAD = "fc"  # every model of the zoo ends in `fc`, its classifier


class TransferError(ValueError):
    """A checkpoint that cannot initialise this model; the message names the file and what differs."""


def checkpoint_path(init: str, seed: int) -> Path:
    """The checkpoint directory `model.init` names for `seed` ("{seed}" replaced), accepting the file itself."""
    path = Path(init.replace("{seed}", str(seed)))
    return path.parent if path.name == STATE_FILE else path


def tested_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights a finished run was tested with."""
    if not (directory / STATE_FILE).is_file():
        raise TransferError(f"model.init: no {STATE_FILE} in {directory}; point it at a trial's checkpoint "
                            "directory (or the file)")
    state = TrainState.load(directory)
    return state.best_model if state.best_model is not None else state.model


def initialize(model: nn.Module, cfg: ModelConfig, seed: int) -> Path:
    """Load `cfg.init`'s weights into `model` (head reset unless `head: keep`), then freeze what `cfg.freeze` names.

    Returns the checkpoint directory used.
    """
    assert cfg.init is not None
    directory = checkpoint_path(cfg.init, seed)
    weights = tested_weights(directory)
    if cfg.head != "keep":  # the new head keeps the fresh initialisation its seed gave it
        weights = {k: v for k, v in weights.items() if k.split(".", 1)[0] != HEAD}
    own = model.state_dict()
    unknown = sorted(set(weights) - set(own))
    missing = sorted(k for k in set(own) - set(weights) if cfg.head == "keep" or k.split(".", 1)[0] != HEAD)
    wrong = sorted(k for k in set(weights) & set(own) if weights[k].shape != own[k].shape)
    if unknown or missing or wrong:
        detail = "; ".join(f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                           for what, keys in (("not in this model", unknown), ("missing", missing),
                                              ("other shape", wrong)) if keys)
        raise TransferError(f"model.init: {directory / STATE_FILE} does not fit this model ({detail}); the "
                            "architecture must match the checkpoint's (head: keep also needs the same classes)")
    model.load_state_dict(weights, strict=False)
    if cfg.freeze is not None:
        freeze(model, cfg.freeze)
    return directory


def frozen_modules(model: nn.Module, freeze_spec: str | int) -> list[nn.Module]:
    """The stem (everything before the first stage), plus the first N stages for an int."""
    stages = list(getattr(model, "stage_names", []))
    if not stages:
        raise TransferError(f"model.freeze: {type(model).__name__} has no stages to freeze")
    n = 0 if freeze_spec == "stem" else int(freeze_spec)
    if n > len(stages):
        raise TransferError(f"model.freeze: {n} stages asked, the model has {len(stages)}")
    first = list(model.named_children()).index((stages[0], getattr(model, stages[0])))
    stem = [m for _, m in list(model.named_children())[:first]]
    return stem + [getattr(model, name) for name in stages[:n]]


def freeze(model: nn.Module, freeze_spec: str | int) -> None:
    """No gradients for the frozen parts, and their BatchNorms stay in eval mode (running statistics fixed)."""
    for part in frozen_modules(model, freeze_spec):
        part.requires_grad_(False)
        for m in part.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.register_forward_pre_hook(_stay_in_eval)


def _stay_in_eval(module: nn.Module, _inputs: tuple[torch.Tensor, ...]) -> None:
    # model.train() at each epoch would switch a frozen BatchNorm back to batch statistics; this undoes it per call.
    module.eval()
