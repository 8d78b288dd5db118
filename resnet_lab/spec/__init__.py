"""The only place raw YAML exists: specs and configs in, frozen typed objects out."""

from __future__ import annotations

from resnet_lab.spec.catalog import MODEL_CATALOG, ModelEntry, model_names
from resnet_lab.spec.datasets import DATASET_NAMES
from resnet_lab.spec.trial import (
    RECIPES,
    DatasetConfig,
    ModelConfig,
    ResolvedTrainer,
    SyntheticConfig,
    TrainerConfig,
    TrialConfig,
    default_data_root,
)

__all__ = [
    "DATASET_NAMES", "MODEL_CATALOG", "RECIPES", "DatasetConfig", "ModelConfig", "ModelEntry", "ResolvedTrainer",
    "SyntheticConfig", "TrainerConfig", "TrialConfig", "default_data_root", "model_names",
]
