"""A virtual environment per model server, built from a committed lock, once per lock.

MLServer pins fastapi 0.115, llama-cpp-python brings its own server stack, and KServe pulls
grpcio, pandas and kubernetes: none of them can share the project's .venv without moving its
pins. Each gets a venv of its own instead, installed by the tests themselves (a fresh CI clone
has nothing else), from `locks/<name>.txt`: every distribution pinned with `==` and its sha256,
installed with `--no-deps --require-hashes`, so a build next month installs the very files CI
passed with and pip never resolves anything. `python -m tests.support.servers.locking NAME`
writes a lock from `locks/<name>.in`.

Venvs live in `<repo>/.local/venvs/<name>-<key>`: the key hashes the lock (and the Python
version: the pins name cp311 wheels), so an edited lock builds a new venv beside the old one.
A stamp file written last marks a complete build (an interrupted one is rebuilt), and a file
lock keeps two pytest sessions from building the same venv at once. A failed build raises
BuildError with the end of pip's output; the fixtures turn it into a test failure, never a skip:
these servers must run in CI.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.paths import REPO

LOCKS = Path(__file__).resolve().parent / "locks"
LOCAL = REPO / ".local"
VENVS = LOCAL / "venvs"
WHEELS = LOCAL / "wheels"
STAMP = ".complete.json"
TAIL_LINES = 40
# pip's settings that make a build quiet and non-interactive; the machine's own pip
# configuration (its local indexes and find-links) is kept.
PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1", "PYTHONUNBUFFERED": "1"}


class BuildError(RuntimeError):
    """A venv or wheel could not be built; the message ends with the tail of the build's log."""


@dataclass(frozen=True)
class Venv:
    """A built server venv: its interpreter, scripts and site-packages."""

    name: str
    path: Path
    build_seconds: float  # how long the build took (when it was built, maybe in an earlier run)

    @property
    def bin(self) -> Path:
        return self.path / "bin"

    @property
    def python(self) -> Path:
        return self.bin / "python"

    def script(self, name: str) -> Path:
        return self.bin / name

    @property
    def site_packages(self) -> Path:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self.path / "lib" / version / "site-packages"


def lock_path(name: str) -> Path:
    return LOCKS / f"{name}.txt"


def cache_key(*parts: bytes | str) -> str:
    """A short sha256 of `parts`: what a cached venv or wheel was built from."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def venv_path(name: str, extra_key: str = "") -> Path:
    """Where the venv for `locks/<name>.txt` lives (`extra_key`: anything else it depends on)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return VENVS / f"{name}-{cache_key(lock_path(name).read_bytes(), python, extra_key)}"


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` (created if missing), held for the `with` block.

    Blocks while another process builds the same thing; the kernel releases it if that process
    dies, so a killed build never leaves a stale lock behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def read_stamp(directory: Path) -> dict[str, object] | None:
    """The stamp of a complete build in `directory`, or None if there is none."""
    try:
        data = json.loads((directory / STAMP).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_stamp(directory: Path, **facts: object) -> None:
    # Through a temporary file: a stamp is either absent or whole.
    temporary = directory / f"{STAMP}.tmp"
    temporary.write_text(json.dumps(facts, indent=2, sort_keys=True))
    temporary.replace(directory / STAMP)


def tail(text: str, lines: int = TAIL_LINES) -> str:
    """The last `lines` lines, less this machine's pip noise about absent local index folders."""
    kept = [line for line in text.splitlines() if not line.startswith("WARNING: Location '")]
    return "\n".join(kept[-lines:])


def run_logged(
    argv: Sequence[str | Path],
    log: Path,
    what: str,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> None:
    """Run a build step with its output appended to `log`; BuildError with the tail if it fails."""
    words = [str(word) for word in argv]
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(words)}\n")
        out.flush()
        result = subprocess.run(
            words,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **PIP_ENV, **(env or {})},
            cwd=cwd,
            check=False,
        )
    if result.returncode != 0:
        raise BuildError(
            f"{what} failed (exit {result.returncode}); full log: {log}\n"
            f"--- last {TAIL_LINES} lines ---\n{tail(log.read_text(errors='replace'))}"
        )


def locked_requirements(name: str, exclude: Sequence[str] = ()) -> list[str]:
    """The lock's requirement lines (continuations joined), less the distributions `exclude`s."""
    joined = lock_path(name).read_text().replace("\\\n", " ")
    lines = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        distribution = line.split("==", 1)[0].strip()
        if _canonical(distribution) not in {_canonical(x) for x in exclude}:
            lines.append(line)
    return lines


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def ensure_venv(
    name: str,
    *,
    extra_key: str = "",
    exclude: Sequence[str] = (),
    wheels: Sequence[Path] = (),
) -> Venv:
    """The venv for `locks/<name>.txt`, built now unless a complete one exists.

    `exclude`: distributions of the lock not installed from the index (`wheels` brings them:
    local wheel files, installed without hashes after the lock). `extra_key` names what else
    the venv depends on (a locally built wheel), so a different one gets a different venv.
    """
    path = venv_path(name, extra_key)
    stamp = read_stamp(path)
    if stamp is None:
        with file_lock(path.with_name(f"{path.name}.lock")):
            stamp = read_stamp(path)  # built by another session while this one waited
            if stamp is None:
                stamp = _build(name, path, exclude, wheels)
    seconds = stamp.get("build_seconds", 0.0)
    return Venv(name, path, float(seconds) if isinstance(seconds, int | float) else 0.0)


def _build(
    name: str, path: Path, exclude: Sequence[str], wheels: Sequence[Path]
) -> dict[str, object]:
    started = time.monotonic()
    shutil.rmtree(path, ignore_errors=True)  # what an interrupted build left
    path.parent.mkdir(parents=True, exist_ok=True)
    log = path.with_name(f"{path.name}.log")
    log.write_text(f"building {path} from {lock_path(name)}\n")
    # `python -m venv` from any venv creates one on the base interpreter (sys._base_executable).
    run_logged([sys.executable, "-m", "venv", path], log, f"{name}: python -m venv")
    requirements = path / "locked-requirements.txt"
    requirements.write_text("\n".join(locked_requirements(name, exclude)) + "\n")
    pip: list[str | Path] = [
        path / "bin" / "python",
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-cache-dir",
    ]
    run_logged([*pip, "--require-hashes", "-r", requirements], log, f"{name}: pip install (lock)")
    if wheels:
        run_logged([*pip, *wheels], log, f"{name}: pip install (local wheels)")
    seconds = round(time.monotonic() - started, 1)
    facts: dict[str, object] = {
        "lock": str(lock_path(name).relative_to(REPO)),
        "build_seconds": seconds,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wheels": [wheel.name for wheel in wheels],
    }
    write_stamp(path, **facts)  # last: only a complete venv has one
    return facts


def ensure_wheel(
    name: str,
    requirement: str,
    key: str,
    *,
    env: Mapping[str, str] | None = None,
) -> Path:
    """A wheel of `requirement` (a pinned, hashed line) built from its sdist, cached by `key`.

    Built into `.local/wheels/<name>-<key>/` once; later calls (and other sessions, after
    waiting on the file lock) reuse it. pip runs with `--no-cache-dir` so that pip's own cache
    never hands a wheel compiled on one machine to another; the key is what decides reuse.
    """
    directory = WHEELS / f"{name}-{key}"
    if read_stamp(directory) is None:
        with file_lock(directory.with_name(f"{directory.name}.lock")):
            if read_stamp(directory) is None:
                _build_wheel(name, requirement, directory, env or {})
    found = sorted(directory.glob("*.whl"))
    if len(found) != 1:
        raise BuildError(f"{directory}: expected one wheel, found {[p.name for p in found]}")
    return found[0]


def _build_wheel(name: str, requirement: str, directory: Path, env: Mapping[str, str]) -> None:
    started = time.monotonic()
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    log = directory.with_name(f"{directory.name}.log")
    log.write_text(f"building {requirement.split()[0]} into {directory}\n")
    pinned = directory / "requirement.txt"
    pinned.write_text(requirement + "\n")
    distribution = requirement.split("==", 1)[0].strip()
    argv: list[str | Path] = [
        sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir",
        "--no-binary", distribution, "--require-hashes", "-r", pinned, "-w", directory,
    ]  # fmt: skip
    run_logged(argv, log, f"{name}: pip wheel {distribution} (from its sdist)", env=env)
    pinned.unlink()
    write_stamp(
        directory,
        requirement=requirement.split()[0],
        build_seconds=round(time.monotonic() - started, 1),
        built_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
