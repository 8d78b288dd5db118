"""How a trial ended, in one vocabulary: the trainer decides it, the trial reports it, and the searcher, the MLflow
callback and the report read it (tag `resnet_lab.outcome`)."""

from __future__ import annotations

from enum import StrEnum


class Outcome(StrEnum):
    COMPLETED = "completed"  # trained every epoch
    EARLY_STOPPED = "early_stopped"  # early stopping ended it: tested on its best-validation weights
    DIVERGED = "diverged"  # a non-finite loss: a result of the method, counted at its measured (chance) accuracy
    STOPPED = "stopped"  # cut short from outside: ASHA (tag stopped_by=asha), the time budget or the user
    FAILED = "failed"  # the trial raised: a bug or the machine, not a result

    @property
    def trained_out(self) -> bool:
        """It ran to its natural end (and was tested)."""
        return self in (Outcome.COMPLETED, Outcome.EARLY_STOPPED)

    @property
    def is_result(self) -> bool:
        """A result of the method, counted in every mean (diverged runs included: no survivorship)."""
        return self.trained_out or self is Outcome.DIVERGED


# The key of a trial's last Tune result that carries its Outcome (a string; absent until the trial has ended).
OUTCOME_KEY = "outcome"
