"""Test model: rejects every input the way a validating handler does (422 with a message)."""

from __future__ import annotations

from typing import Any

from ts.utils.util import PredictionException

MESSAGE = "input rejected: field 'x' must be positive"


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    raise PredictionException(MESSAGE, 422)
