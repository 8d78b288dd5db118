"""`CheckpointPruner`: delete a trial's old checkpoints only once Tune's saved experiment state no longer needs them.

Why not `CheckpointConfig(num_to_keep=1)`: Tune deletes the previous checkpoint as soon as a new one registers, but
uploads the experiment state that points at checkpoints afterwards and asynchronously. A driver killed in between
(SIGKILL, power loss) leaves a saved state that points at a deleted checkpoint, and `--resume` then fails that trial
on every retry ("Could not recover from checkpoint as it does not exist on storage anymore"; seen in
tests/test_reliability.py). Ray's own code calls its forced sync a workaround for this. So Tune keeps every
checkpoint (`num_to_keep=None`, which also drops the forced sync after every checkpoint) and this callback deletes a
checkpoint when a newer one of the same trial existed at an experiment snapshot that began `safe_after_s` ago, time
enough for that snapshot to have reached storage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ray.tune import Callback, Checkpoint
from ray.tune.experiment import Trial

log = logging.getLogger(__name__)


@dataclass
class _Kept:
    checkpoint: Checkpoint
    superseded_at: float | None = None  # start of the first snapshot taken after a newer checkpoint registered


class CheckpointPruner(Callback):
    """Keeps each trial's newest checkpoint, and older ones until a saved snapshot has moved past them."""

    def __init__(self, safe_after_s: float = 120.0) -> None:
        self.safe_after_s = safe_after_s
        self._kept: dict[str, list[_Kept]] = {}  # trial id -> its checkpoints, oldest first
        # Trials holding more than their newest checkpoint: the only ones with anything to mark or delete, so a
        # checkpoint costs the running trials, not every trial the sweep has seen (linear in N at 1,000 trials).
        self._older: set[str] = set()
        self.deleted = 0

    def __getstate__(self) -> dict[str, Any]:
        # Pickled with the run config at the start: what it tracks belongs to this driver process only.
        return {"safe_after_s": self.safe_after_s, "_kept": {}, "_older": set(), "deleted": 0}

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint,
                      **info: Any) -> None:
        kept = self._kept.setdefault(trial.trial_id, [])
        kept.append(_Kept(checkpoint))
        if len(kept) > 1:
            self._older.add(trial.trial_id)
        self.prune()

    def get_state(self) -> dict[str, Any] | None:
        # Tune calls this while it writes an experiment snapshot: that snapshot points at each trial's newest
        # checkpoint (or a newer one), so every older checkpoint is superseded as of now.
        now = time.monotonic()
        for trial_id in self._older:
            for entry in self._kept[trial_id][:-1]:
                if entry.superseded_at is None:
                    entry.superseded_at = now
        self.prune(now)
        return None  # nothing to restore: a new driver starts tracking anew

    def prune(self, now: float | None = None) -> None:
        """Delete the checkpoints superseded in a snapshot that began at least `safe_after_s` ago."""
        now = time.monotonic() if now is None else now
        for trial_id in list(self._older):
            keep = []
            for entry in self._kept[trial_id]:
                if entry.superseded_at is not None and now - entry.superseded_at >= self.safe_after_s:
                    self._delete(trial_id, entry.checkpoint)
                else:
                    keep.append(entry)
            self._kept[trial_id] = keep
            if len(keep) <= 1:
                self._older.discard(trial_id)

    def _delete(self, trial_id: str, checkpoint: Checkpoint) -> None:
        try:
            checkpoint.filesystem.delete_dir(checkpoint.path)
            self.deleted += 1
        except FileNotFoundError:
            pass
        except OSError as exc:  # storage hiccup: a leftover checkpoint costs space, never a result
            log.warning("could not delete old checkpoint %s of trial %s: %s", checkpoint.path, trial_id, exc)
