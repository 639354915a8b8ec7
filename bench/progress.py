"""Progress lines on stderr (stdout carries the table): one line per scenario phase."""

from __future__ import annotations

import sys
import time

_STARTED = time.monotonic()


def say(message: str) -> None:
    """Print `message` with the seconds since the run started, at once (not buffered)."""
    print(f"[bench {time.monotonic() - _STARTED:6.1f}s] {message}", file=sys.stderr, flush=True)
