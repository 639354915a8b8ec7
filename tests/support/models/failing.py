"""Test model: every prediction raises, which TorchServe answers with 503 "Prediction failed"."""

from __future__ import annotations

from typing import Any


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    if data is None:
        return None
    raise RuntimeError("the failing test model always fails")
