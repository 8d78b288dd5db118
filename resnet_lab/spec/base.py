"""The pydantic base every spec object derives from: frozen, strict, unknown keys rejected."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen, strict pydantic model: unknown keys are errors and nothing is coerced silently."""

    # strict=True: "3" is not an int and 1 is not True; ints are still accepted for float fields.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
