"""Image demo model that answers bytes: the picture it receives as a grayscale PNG."""

from __future__ import annotations

import io
from typing import Any

from image import open_image


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe entry point: one PNG per request, sent back with Content-Type image/png."""
    if data is None:  # TorchServe's initialization call
        return None
    answers = []
    for index, request in enumerate(data):
        out = io.BytesIO()
        open_image(request).convert("L").save(out, format="PNG")
        context.set_response_content_type(index, "image/png")
        answers.append(out.getvalue())
    return answers
