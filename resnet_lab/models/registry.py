"""The model registry: builders registered by name at import, read-only afterwards (timm's register_model).

Every name must exist in `resnet_lab.spec.catalog.MODEL_CATALOG`, and a builder's keyword parameters must be exactly
the catalogue's params plus `num_classes` / `in_channels`, so the torch-free spec and the registry cannot drift apart.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from resnet_lab.spec.catalog import MODEL_CATALOG

Builder = Callable[..., nn.Module]

# Parameters every builder takes on top of its catalogue entry; the trainer fills them from the dataset.
DATA_PARAMS: frozenset[str] = frozenset({"num_classes", "in_channels"})

_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator that registers a builder `(**params) -> nn.Module` under `name`."""
    entry = MODEL_CATALOG.get(name)
    if entry is None:
        raise ValueError(
            f"model '{name}' is missing from resnet_lab.spec.catalog.MODEL_CATALOG; add an entry there first"
        )
    if name in _REGISTRY:
        raise ValueError(f"model '{name}' is already registered (by {_REGISTRY[name].__module__})")

    def decorator(builder: Builder) -> Builder:
        accepted = set(inspect.signature(builder).parameters)
        expected = entry.params | DATA_PARAMS
        if accepted != expected:
            raise ValueError(
                f"builder for '{name}' takes {sorted(accepted)} but the catalogue says {sorted(expected)}; "
                "make them agree"
            )
        _REGISTRY[name] = builder
        return builder

    return decorator


def model_names() -> list[str]:
    """Names of every registered model, sorted."""
    return sorted(_REGISTRY)


def build_model(name: str, **params: Any) -> nn.Module:
    """Build the registered model `name`; the params are checked against its catalogue entry first."""
    builder = _REGISTRY.get(name)
    if builder is None:
        known = model_names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"'{name}' is not a known model{hint} (known: {', '.join(known)})")
    entry = MODEL_CATALOG[name]
    allowed = entry.params | DATA_PARAMS
    unsupported = sorted(set(params) - allowed)
    if unsupported:
        raise ValueError(
            f"model '{name}' does not accept {', '.join(map(repr, unsupported))}; "
            f"it accepts: {', '.join(sorted(allowed))}"
        )
    if "depth" in params and params["depth"] not in entry.depths:
        raise ValueError(
            f"depth {params['depth']} is not supported by '{name}'; supported: {', '.join(map(str, entry.depths))}"
        )
    return builder(**params)


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters in `model` (only those with requires_grad when `trainable_only`)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
