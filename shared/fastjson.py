"""JSON parsing where it is hot: pydantic-core's parser, with exactly `json.loads`'s results.

Predictions come back as JSON, often lists of floats, and the standard library parses floats
several times slower than pydantic-core's `from_json` (Rust; already a dependency through
pydantic), whatever the size (tests/unit/shared/test_fastjson.py checks the results). orjson
is a little faster still but turns integers beyond 64 bits into floats, a silent change of the
value; `from_json` keeps them exact, and accepts NaN and Infinity as `json.loads` does.
What it refuses that `json.loads` accepts (lone surrogate escapes, a UTF-8 BOM, UTF-16/32 bytes)
is parsed again by `json.loads`, so the result, and every error, is the standard library's.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic_core import from_json


def loads(data: str | bytes | bytearray) -> Any:
    """`json.loads(data)`, faster: the same value, or the same ValueError."""
    try:
        # No string cache: a prediction's strings rarely repeat across answers.
        return from_json(data, cache_strings=False)
    except ValueError:
        return json.loads(data)
