"""The overview's 15-minute charts as SVG geometry, computed on the server.

The page draws them with `<svg>`, `<polyline points=...>` and `<rect>` elements: no script, no
chart library, nothing inline for the CSP to refuse, and they render with scripts off. Each
chart is a fixed viewBox; values are scaled to the largest one shown (named on the axis), and a
point with no value (no task ended in that slice) breaks the line rather than drawing a zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from api.console.render import rate, seconds
from api.status import ChartPoint

WIDTH, HEIGHT = 600, 120
PAD = 4  # keeps a line at 0 or at the top inside the frame


@dataclass(frozen=True, slots=True)
class Series:
    """One line: its name, its CSS class (colour, from console.css) and its segments."""

    name: str
    css: str
    segments: list[str]  # each a polyline's `points`


@dataclass(frozen=True, slots=True)
class Chart:
    title: str
    top_label: str  # the value at the top edge
    series: list[Series]
    start_label: str
    end_label: str
    empty: bool
    width: int = WIDTH
    height: int = HEIGHT


def _segments(values: Sequence[float | None], top: float) -> list[str]:
    """Polyline `points` strings, split where a value is missing."""
    step = (WIDTH - 2 * PAD) / max(len(values) - 1, 1)
    segments: list[list[str]] = [[]]
    for index, value in enumerate(values):
        if value is None:
            if segments[-1]:
                segments.append([])
            continue
        x = PAD + index * step
        y = HEIGHT - PAD - (HEIGHT - 2 * PAD) * (value / top if top else 0.0)
        segments[-1].append(f"{x:.1f},{y:.1f}")
    # A lone point gets a second one beside it, so it shows as a short dash.
    return [" ".join(s if len(s) > 1 else [*s, _beside(s[0])]) for s in segments if s]


def _beside(point: str) -> str:
    x, y = point.split(",")
    return f"{float(x) + 2:.1f},{y}"


def _labels(points: Sequence[ChartPoint]) -> tuple[str, str]:
    if not points:
        return "", ""
    return points[0].start.strftime("%H:%M"), points[-1].start.strftime("%H:%M UTC")


def throughput(points: Sequence[ChartPoint], bucket_seconds: int) -> Chart:
    """Submitted, finished and failed per second, one value per chart point."""
    per = float(bucket_seconds)
    lines = {
        ("submitted", "s-submitted"): [p.submitted / per for p in points],
        ("finished", "s-finished"): [p.finished / per for p in points],
        ("failed", "s-failed"): [p.failed / per for p in points],
    }
    top = max((v for values in lines.values() for v in values), default=0.0)
    start, end = _labels(points)
    return Chart(
        title="Throughput (tasks per second)",
        top_label=rate(top),
        series=[
            Series(name, css, _segments(list(values), top)) for (name, css), values in lines.items()
        ],
        start_label=start,
        end_label=end,
        empty=top == 0,
    )


def latency(points: Sequence[ChartPoint]) -> Chart:
    """End-to-end p50 and p95 of the tasks that finished in each slice."""
    lines = {
        ("p50", "s-p50"): [p.end_to_end_p50 for p in points],
        ("p95", "s-p95"): [p.end_to_end_p95 for p in points],
    }
    top = max((v for values in lines.values() for v in values if v is not None), default=0.0)
    start, end = _labels(points)
    return Chart(
        title="End to end (accepted to finished)",
        top_label=seconds(top),
        series=[Series(name, css, _segments(values, top)) for (name, css), values in lines.items()],
        start_label=start,
        end_label=end,
        empty=top == 0,
    )
