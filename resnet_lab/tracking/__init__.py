"""MLflow integration: the only package that imports mlflow (writer: the sweep's runs; outbox: its queue of writes
through store outages; query: reading them back)."""

from __future__ import annotations

from resnet_lab.tracking.outbox import GIVE_UP_ENV, SPOOL_ENV, TrackingUnavailable
from resnet_lab.tracking.writer import (
    TAG_CELL,
    TAG_CONFIG,
    TAG_DISCARDED,
    TAG_ERROR,
    TAG_GRID,
    TAG_OUTCOME,
    TAG_RESUMED_FROM,
    TAG_RETRIES,
    TAG_ROLE,
    TAG_RUNG,
    TAG_SEED,
    TAG_SPEC_HASH,
    TAG_STAGE,
    TAG_STOPPED_BY,
    TAG_SWEEP,
    TAG_TRIAL_ID,
    SweepRef,
    SweepTracker,
    quiet_mlflow,
    resolve_tracking_uri,
)

__all__ = [
    "GIVE_UP_ENV", "SPOOL_ENV", "TAG_CELL", "TAG_CONFIG", "TAG_DISCARDED", "TAG_ERROR", "TAG_GRID", "TAG_OUTCOME",
    "TAG_RESUMED_FROM", "TAG_RETRIES", "TAG_ROLE", "TAG_RUNG", "TAG_SEED", "TAG_SPEC_HASH", "TAG_STAGE",
    "TAG_STOPPED_BY", "TAG_SWEEP", "TAG_TRIAL_ID", "SweepRef", "SweepTracker", "TrackingUnavailable", "quiet_mlflow",
    "resolve_tracking_uri",
]
