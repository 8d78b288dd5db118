"""The model zoo, built by name: `build_model("resnet", depth=18, skip=False)`.

Importing this package imports each family module, whose `@register` decorators fill the registry; nothing else.
"""

from __future__ import annotations

from resnet_lab.models import baseline_cnn, resnet, resnet_cifar  # noqa: F401  (imported to register their builders)
from resnet_lab.models.registry import build_model, count_params, model_names, register

__all__ = ["build_model", "count_params", "model_names", "register"]
