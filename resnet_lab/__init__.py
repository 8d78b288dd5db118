"""resnet-lab: hyperparameter sweeps for residual-learning ablation studies.

Importing this package does no work: torch, ray and mlflow are imported by the modules that need them.
"""

from __future__ import annotations

__version__ = "0.1.0"
