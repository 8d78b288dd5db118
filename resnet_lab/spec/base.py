"""The pydantic base every spec object derives from (frozen, strict, unknown keys rejected), and its error text."""

from __future__ import annotations

import functools
import operator
import re
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Frozen, strict pydantic model: unknown keys are errors and nothing is coerced silently."""

    # strict=True: "3" is not an int and 1 is not True; ints are still accepted for float fields.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def clean_message(message: str) -> str:
    """A pydantic error message as a rule that reads after `field: ` ("Value error, " dropped, lower-case start)."""
    message = re.sub(r"^(Value error|Assertion failed), ", "", message)
    return message[:1].lower() + message[1:]


def without_none(annotation: Any) -> Any:
    """`X | None` -> `X` (`int | float | None` -> `int | float`); any other annotation as it is."""
    if typing.get_origin(annotation) not in (typing.Union, types.UnionType):
        return annotation
    return functools.reduce(operator.or_, [a for a in typing.get_args(annotation) if a is not type(None)])
