"""py-spy profiles of the API and a Celery worker under load, summarized as percentages.

py-spy samples the running processes from outside (no code change, no restart); `--format raw`
gives collapsed stacks ("frame;frame;... count") that are summed here two ways: the library the
sampled (leaf) frame is in ("self" time), and the functions most samples pass through
("inclusive" time). `--gil` samples only the thread holding the GIL: py-spy's idle detection
does not work in this container (threads blocked on locks and sockets counted as busy), and the
GIL holder is exactly where a Python process spends its CPU.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 100
# Frames on most stacks (the server's middleware chain, run_forever) say nothing about cost.
OUTER = 0.6
MIN_SHARE = 0.03
# Libraries whose frames only carry the call (thread start, CLI, event loop, context managers).
PLUMBING = frozenset({"threading", "concurrent", "runpy", "click", "asyncio", "contextlib"})
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def py_spy() -> str:
    """The venv's py-spy (a dev dependency of the benchmark), else PATH's, else explain."""
    candidate = Path(sys.executable).with_name("py-spy")
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed: run `.venv/bin/pip install py-spy`")
    return found


def start_recording(pid: int, seconds: float, output: Path) -> subprocess.Popen[bytes]:
    """Start sampling `pid` for `seconds` into `output` (raw collapsed stacks); returns at once."""
    output.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        py_spy(), "record",
        "--gil",
        "--pid", str(pid),
        "--duration", str(max(1, round(seconds))),
        "--rate", str(SAMPLE_RATE),
        "--format", "raw",
        "--output", str(output),
    ]  # fmt: skip
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish_recording(process: subprocess.Popen[bytes], seconds: float) -> None:
    _, stderr = process.communicate(timeout=seconds + 30)
    if process.returncode != 0:
        raise RuntimeError(f"py-spy failed ({process.returncode}): {stderr.decode()[-2000:]}")


@dataclass(frozen=True)
class Frame:
    function: str
    file: str

    @property
    def library(self) -> str:
        """`redis` for redis/asyncio/client.py, `runpy` for <frozen runpy>, `api` for api/x.py."""
        name = self.file.strip("<>").removeprefix("frozen ")
        return name.split("/")[0].removesuffix(".py")

    def __str__(self) -> str:
        return f"{self.function} ({self.file})"


def _frame(text: str) -> Frame:
    match = _FRAME.match(text.strip())
    if match is None:
        return Frame(text.strip(), "?")
    return Frame(match["func"], match["file"])


@dataclass(frozen=True)
class Profile:
    """Collapsed stacks (root first) with their sample counts."""

    stacks: list[tuple[tuple[Frame, ...], int]]
    seconds: float

    @classmethod
    def load(cls, path: Path, seconds: float) -> Profile:
        stacks = []
        for line in path.read_text().splitlines():
            text, _, count = line.rpartition(" ")
            if text and count.isdigit():
                stacks.append((tuple(_frame(part) for part in text.split(";")), int(count)))
        return cls(stacks, seconds)

    @property
    def samples(self) -> int:
        return sum(count for _, count in self.stacks)

    @property
    def busy(self) -> float:
        """Busy samples per possible sample of one thread: ~ cores kept busy by Python."""
        return self.samples / (SAMPLE_RATE * self.seconds)

    def self_by_library(self) -> Counter[str]:
        shares: Counter[str] = Counter()
        for frames, count in self.stacks:
            shares[frames[-1].library] += count
        return shares

    def inclusive(self) -> Counter[Frame]:
        shares: Counter[Frame] = Counter()
        for frames, count in self.stacks:
            for frame in set(frames):
                shares[frame] += count
        return shares

    def depth(self) -> dict[Frame, int]:
        """How far from the root each frame first appears (to prefer outer frames of a chain)."""
        depths: dict[Frame, int] = {}
        for frames, _ in self.stacks:
            for index, frame in enumerate(frames):
                depths[frame] = min(index, depths.get(frame, index))
        return depths

    def hot_spots(self, top: int) -> list[tuple[Frame, float]]:
        """The heaviest functions below the outer chain, one per chain of wrappers.

        A wrapper and what it wraps have the same count; only the outermost of them is kept.
        """
        total = self.samples
        depths = self.depth()
        candidates = sorted(self.inclusive().items(), key=lambda item: (-item[1], depths[item[0]]))
        spots: list[tuple[Frame, float]] = []
        seen_counts: set[int] = set()
        for frame, count in candidates:
            share = count / total
            if count in seen_counts:
                continue
            seen_counts.add(count)
            # Entry points and plumbing are skipped with their whole chain (same count): the
            # Celery CLI's `main` would otherwise show up as `worker` or `asynloop` instead.
            entry = frame.function in ("<module>", "main")
            if share >= OUTER or frame.library in PLUMBING or entry:
                continue
            if share < MIN_SHARE or len(spots) == top:
                break
            spots.append((frame, share))
        return spots


def summarize(name: str, profile: Profile, top: int = 10) -> list[str]:
    """Markdown lines: busy share, self time by library, and the heaviest inclusive functions."""
    total = profile.samples
    if total == 0:
        return [f"**{name}**: no busy samples (the process was idle)"]
    libraries = ", ".join(
        f"{library} {count / total:.0%}"
        for library, count in profile.self_by_library().most_common(top)
    )
    lines = [
        f"**{name}**: {total} busy samples in {profile.seconds:.0f} s "
        f"(the GIL was held {profile.busy:.0%} of the time).",
        f"- self time by library: {libraries}",
        "- inclusive hot spots: "
        + "; ".join(f"`{frame}` {share:.0%}" for frame, share in profile.hot_spots(top)),
    ]
    return lines
