"""Image demo model: what is in the picture it receives (format, size, mode, mean per channel)."""

from __future__ import annotations

from typing import Any

from image import open_image
from PIL import ImageStat


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe entry point: one answer per request of the batch."""
    if data is None:  # TorchServe's initialization call
        return None
    answers = []
    for request in data:
        image = open_image(request)
        rgb = image.convert("RGBA" if "A" in image.getbands() else "RGB")
        answers.append(
            {
                "format": image.format,
                "width": image.width,
                "height": image.height,
                "mode": image.mode,
                "mean": {
                    band: round(mean, 2)
                    for band, mean in zip(rgb.getbands(), ImageStat.Stat(rgb).mean, strict=True)
                },
            }
        )
    return answers
