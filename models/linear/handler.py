"""Linear demo model: a fixed `nn.Linear(3, 2)` mapping {"inputs": [[x1, x2, x3], ...]} to outputs.

The weights come from `torch.manual_seed(0)`, so every worker (and every test run) computes the
same numbers without a weights file in the archive.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import torch
from ts.utils.util import PredictionException

IN_FEATURES = 3
_USAGE = 'send {"inputs": [[x1, x2, x3], ...]}: a non-empty list of rows of 3 numbers'
_model: torch.nn.Linear | None = None


def _get_model() -> torch.nn.Linear:
    global _model
    if _model is None:
        torch.manual_seed(0)
        _model = torch.nn.Linear(IN_FEATURES, 2).eval()
    return _model


def _body(request: dict[str, Any]) -> Any:
    body = request.get("body", request.get("data"))
    if isinstance(body, bytes | bytearray | str):
        try:
            return json.loads(body)
        except ValueError:
            raise PredictionException(f"the body is not JSON; {_USAGE}", 422) from None
    return body


def _is_row(row: Any) -> bool:
    # bool is an int subclass, but True as a feature is almost certainly a mistake.
    return (
        isinstance(row, list)
        and len(row) == IN_FEATURES
        and all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in row)
    )


def _inputs(body: Any) -> torch.Tensor:
    if not isinstance(body, dict) or "inputs" not in body:
        raise PredictionException(f"missing 'inputs'; {_USAGE}", 422)
    rows = body["inputs"]
    if not isinstance(rows, list) or not rows or not all(_is_row(row) for row in rows):
        raise PredictionException(f"'inputs' has the wrong shape; {_USAGE}", 422)
    return torch.tensor(rows, dtype=torch.float32)


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe entry point: one {"outputs": [[y1, y2], ...]} per request of the batch."""
    if data is None:  # TorchServe's initialization call
        _get_model()
        return None
    model = _get_model()
    answers = []
    with torch.no_grad():
        for request in data:
            outputs = model(_inputs(_body(request)))
            answers.append({"outputs": outputs.tolist()})
    return answers
