"""Shared by the image demo models (archived next to each): the picture a request carries.

TorchServe hands a raw body over as `body` and a multipart file part under its name (`data` by
convention), as bytes; its stock vision handlers also accept base64 text, and so do these.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from PIL import Image, UnidentifiedImageError
from ts.utils.util import PredictionException

# Decompression bombs: a few MB of PNG can claim gigapixels.
Image.MAX_IMAGE_PIXELS = 40_000_000


def open_image(request: dict[str, Any]) -> Image.Image:
    """The request's picture (PNG, JPEG, ...), or a 422 that says what to send."""
    value = request.get("data") or request.get("body")
    if isinstance(value, str):
        try:
            value = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            value = None
    if not isinstance(value, bytes | bytearray) or not value:
        raise PredictionException("send an image: -F data=@picture.png, or its raw bytes", 422)
    try:
        image = Image.open(io.BytesIO(value))
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as error:
        raise PredictionException(f"not an image Pillow can read: {error}", 422) from None
    return image
