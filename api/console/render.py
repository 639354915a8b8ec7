"""The console's templates (Jinja2, rendered on the server) and how figures read on a page.

Server-side rendering, so a page shows everything with scripts off and the CSP can forbid every
inline script: static/console.js only refreshes figures. Autoescape is on for every template:
task fields (model names, error messages) are text from callers, never markup.

The formatting filters have twins in static/console.js (`FORMATS`), so a refreshed figure reads
as the server rendered it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from shared.errors import DispatchError

TEMPLATES = Path(__file__).parent / "templates"
DASH = "\u2013"  # an en dash: "not measured"


def seconds(value: float | None) -> str:
    """A duration: 0.8 ms, 12.4 ms, 1.25 s, 3.2 min; a dash when not measured."""
    if value is None:
        return DASH
    if value < 1:
        return f"{value * 1000:.1f} ms"
    if value < 120:
        return f"{value:.2f} s"
    return f"{value / 60:.1f} min"


def rate(value: float | None) -> str:
    """Per second, with the precision a small rate needs."""
    if value is None:
        return DASH
    return f"{value:.2f}/s" if value < 100 else f"{value:.0f}/s"


def age(value: float | None) -> str:
    """How long ago / how old: 4 s, 3 min, 2.5 h."""
    if value is None:
        return DASH
    if value < 120:
        return f"{value:.0f} s"
    if value < 7200:
        return f"{value / 60:.0f} min"
    return f"{value / 3600:.1f} h"


def when(value: datetime | None) -> str:
    """A moment, in UTC to the millisecond (the timeline's differences are small)."""
    if value is None:
        return DASH
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(TEMPLATES),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(seconds=seconds, rate=rate, age=age, when=when)
    return env


ENV = _environment()


def render(
    request: Request, template: str, context: dict[str, Any], status: int = 200
) -> HTMLResponse:
    """An HTML page; `context` gets the request (for URLs) on top."""
    html = ENV.get_template(template).render(request=request, **context)
    return HTMLResponse(html, status_code=status)


def error_page(request: Request, error: DispatchError) -> HTMLResponse:
    """A DispatchError as a page: its status, code and message, and a way back."""
    return render(
        request,
        "error.html",
        {"error": error.body(), "page": "error", "viewer": None},
        error.status,
    )
