"""The one result table: a row per scenario measure, printed and written to docs/BENCHMARKS.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

HEADER = ("scenario", "measure", "direct TorchServe", "dispatcher", "ratio", "target", "met?")


@dataclass(frozen=True)
class Row:
    """One measure of one scenario; `figures` are its raw numbers (finite, positive by design)."""

    key: str  # stable id, e.g. "latency_p50" (the smoke test looks rows up by it)
    scenario: str
    measure: str
    direct: str
    dispatcher: str
    ratio: str = "-"
    target: str = "report"
    met: bool | None = None  # None: nothing to meet, only reported
    figures: dict[str, float] = field(default_factory=dict)

    def cells(self) -> tuple[str, ...]:
        verdict = {True: "yes", False: "**no**", None: "-"}[self.met]
        return (
            self.scenario,
            self.measure,
            self.direct,
            self.dispatcher,
            self.ratio,
            self.target,
            verdict,
        )

    @property
    def figures_ok(self) -> bool:
        return bool(self.figures) and all(
            math.isfinite(value) and value > 0 for value in self.figures.values()
        )


def markdown(rows: list[Row]) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too)."""
    lines = [
        "| " + " | ".join(HEADER) + " |",
        "| " + " | ".join("---" for _ in HEADER) + " |",
    ]
    lines += [
        "| " + " | ".join(cell.replace("|", "/") for cell in row.cells()) + " |" for row in rows
    ]
    return "\n".join(lines)


def number(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"
