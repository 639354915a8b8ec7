"""How long a request waits for its result: RFC 7240 `Prefer` and the `?wait=` query."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import Settings


@dataclass(frozen=True)
class WaitPreference:
    """Seconds to wait, and the `Preference-Applied` header value that says so."""

    seconds: float
    applied: str | None


def _parse_prefer(header: str) -> tuple[bool, float | None]:
    """(respond-async asked, wait=N asked) from a Prefer header; unknown preferences are ignored."""
    respond_async = False
    wait: float | None = None
    for preference in header.split(","):
        name, _, value = preference.split(";")[0].strip().partition("=")
        name = name.strip().lower()
        if name == "respond-async":
            respond_async = True
        elif name == "wait":
            try:
                number = float(value.strip().strip('"'))
            except ValueError:
                continue
            if number >= 0 and number == number:  # not NaN
                wait = number
    return respond_async, wait


def wait_preference(
    prefer: str | None, wait_query: float | None, settings: Settings
) -> WaitPreference:
    """`?wait=N` wins over `Prefer`; `respond-async` alone means 0; else the configured default.

    With both `respond-async` and `wait=N` the request waits N seconds, then answers 202 (RFC 7240).
    """
    cap = settings.dispatch_max_wait
    if wait_query is not None:
        return WaitPreference(min(wait_query, cap), None)
    respond_async, wait = _parse_prefer(prefer or "")
    if wait is not None:
        seconds = min(wait, cap)
        return WaitPreference(seconds, f"wait={seconds:g}")
    if respond_async:
        return WaitPreference(0.0, "respond-async")
    return WaitPreference(settings.dispatch_default_wait, None)
