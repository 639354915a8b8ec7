"""wrk as the load generator: found (or installed with apt-get) and run with our Lua report."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from bench.progress import say

WRK_SCRIPT = Path(__file__).with_name("wrk_report.lua")
JSON_PREFIX = "BENCH-JSON "
# wrk threads: one per core is what wrk wants; the servers share these cores.
WRK_THREADS = 2


def ensure_wrk() -> str:
    """Path of `wrk`; installs Debian's package when missing and we are root, else explains."""
    found = shutil.which("wrk")
    if found:
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise RuntimeError(
            "wrk is not installed and cannot be installed from here: run "
            "`sudo apt-get install -y wrk` (Debian/Ubuntu) or install wrk from your OS packages"
        )
    say("wrk not found: installing it with apt-get (Debian package `wrk`) ...")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = [apt, "install", "-y", "--no-install-recommends", "wrk"]
    if subprocess.run(install, env=env, capture_output=True, check=False).returncode != 0:
        # A fresh image has no package lists yet.
        subprocess.run([apt, "update"], env=env, capture_output=True, check=False)
        result = subprocess.run(install, env=env, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"apt-get install wrk failed:\n{result.stdout}{result.stderr}")
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("apt-get installed wrk but it is not on PATH")
    return found


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: responses per status code, socket errors, and latency percentiles (ms)."""

    requests: int
    seconds: float
    statuses: dict[int, int]
    errors: dict[str, int]
    latency_ms: dict[str, float] = field(default_factory=dict)

    def rate(self, status: int = 200) -> float:
        """Responses with `status` per second: failures do not count as throughput."""
        return self.statuses.get(status, 0) / self.seconds

    @property
    def failures(self) -> int:
        ok = sum(n for status, n in self.statuses.items() if 200 <= status < 300)
        socket_errors = sum(v for k, v in self.errors.items() if k != "status")
        return self.requests - ok + socket_errors

    def describe(self, status: int = 200) -> str:
        others = {code: n for code, n in self.statuses.items() if code != status}
        bad = {k: v for k, v in self.errors.items() if v and k != "status"}
        return (
            f"{self.rate(status):,.0f} req/s ({self.statuses.get(status, 0)} x {status}"
            f"{f', others {others}' if others else ''}{f', errors {bad}' if bad else ''}), "
            f"p50 {self.latency_ms['p50']:.1f} ms, p99 {self.latency_ms['p99']:.1f} ms"
        )


def parse_wrk_output(output: str) -> WrkResult:
    """The JSON line our Lua `done()` prints; raises with the output if it is missing."""
    for line in output.splitlines():
        if line.startswith(JSON_PREFIX):
            data = json.loads(line[len(JSON_PREFIX) :])
            return WrkResult(
                requests=int(data["requests"]),
                seconds=data["duration_us"] / 1e6,
                statuses={int(code): int(n) for code, n in data["statuses"].items()},
                errors={name: int(n) for name, n in data["errors"].items()},
                latency_ms={name: value / 1000 for name, value in data["latency_us"].items()},
            )
    raise RuntimeError(f"wrk printed no result line:\n{output}")


def run_wrk(
    url: str,
    body: str,
    *,
    connections: int,
    seconds: float,
    headers: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> WrkResult:
    """POST `body` to `url` from `connections` keep-alive connections for `seconds` seconds."""
    argv = [
        ensure_wrk(),
        "-t", str(min(WRK_THREADS, connections)),
        "-c", str(connections),
        "-d", f"{max(1, round(seconds))}s",
        "--timeout", f"{timeout:g}s",
        "-s", str(WRK_SCRIPT),
        url,
        "--", body, *headers,
    ]  # fmt: skip
    # wrk stops itself after -d; the extra margin only guards against a hung wrk.
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + timeout + 30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"wrk failed ({result.returncode}):\n{result.stdout}{result.stderr}")
    return parse_wrk_output(result.stdout)
