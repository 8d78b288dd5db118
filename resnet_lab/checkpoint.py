"""The full training state: everything needed to continue a run exactly where it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

STATE_FILE = "train_state.pt"


def to_cpu(value: Any) -> Any:
    """`value` with every tensor inside dicts, lists and tuples on the CPU (host tensors are not copied)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_cpu(v) for v in value)
    return value


@dataclass
class TrainState:
    """Model, optimizer, scheduler, early-stopping and RNG state after `epoch` completed epochs.

    Saved as plain dicts of tensors and numbers, so it loads with `torch.load(weights_only=True)`: a checkpoint
    can never execute code.
    """

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, torch.Tensor]  # generator states by purpose ("order", "augment", "torch", "cuda")
    best_val_loss: float = float("inf")
    best_epoch: int = 0
    bad_epochs: int = 0
    best_model: dict[str, torch.Tensor] | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)  # the flat TrialConfig that produced it

    def save(self, directory: str | Path) -> Path:
        """Write the state into `directory` (created if needed) and return the file path."""
        path = Path(directory) / STATE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        # Each tensor goes straight to the host (no copy when it is there already): dataclasses.asdict deep-copied
        # model, optimizer and best-model state on the GPU first, three extra copies in a packed trial's share.
        torch.save({f.name: to_cpu(getattr(self, f.name)) for f in fields(self)}, path)
        return path

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> TrainState:
        """Read a state written by `save` (weights_only: tensors and plain data only)."""
        raw = torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)
        return cls(**raw)
