"""What the dispatcher images install, read from the repository without a Docker engine: the
project's dependencies (pyproject.toml) and their pins (requirements.lock), the packages a wheel
carries, and the modules the containers' entry points start."""

from __future__ import annotations

import ast
import importlib.util
import posixpath
import tomllib
from collections.abc import Iterable
from fnmatch import fnmatchcase
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.deploy_files import LOCK, PYPROJECT, REPO


@cache
def pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def packaged() -> set[str]:
    """The top-level packages `pip install .` ships (pyproject.toml's packages.find)."""
    patterns = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return {
        path.name
        for path in REPO.iterdir()
        if (path / "__init__.py").is_file()
        and any(fnmatchcase(path.name, pattern) for pattern in patterns)
    }


@cache
def locked() -> dict[str, str]:
    """requirements.lock as {canonical name: pinned version}."""
    pins = {}
    for raw in LOCK.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep, f"requirements.lock: not a pin: {raw!r}"
            pins[canonicalize_name(name)] = version.split(";")[0].strip()
    return pins


def requirement_closure(requirements: Iterable[str]) -> dict[str, str]:
    """Every distribution `requirements` install here (markers for this interpreter, extras
    followed), as {canonical name: installed version}: read from the installed metadata."""
    found: dict[str, str] = {}
    seen: set[tuple[str, frozenset[str]]] = set()
    pending = [(Requirement(text), frozenset({""})) for text in requirements]
    while pending:
        requirement, wanted_by = pending.pop()
        marker = requirement.marker
        if marker and not any(marker.evaluate({"extra": extra}) for extra in wanted_by):
            continue
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        dist = metadata.distribution(name)
        found[name] = dist.version
        extras = frozenset({"", *requirement.extras})
        pending += [(Requirement(text), extras) for text in dist.requires or []]
    return found


def module_defines(module: str, name: str) -> bool:
    """Whether `module` (found by import machinery, not imported) defines `name` at top level."""
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"no module {module}"
    assert spec.origin, f"no module {module}"
    tree = ast.parse(Path(spec.origin).read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
    return False


def entry_points(argv: list[str]) -> list[tuple[str, str | None]]:
    """(module, attribute) that a container's command names: `celery -A m[:attr]` (Celery's
    default attribute: `app`), `python -m m`, `uvicorn m:attr`; none for other programs."""
    words = [str(word) for word in argv]
    found: list[tuple[str, str | None]] = []
    program = posixpath.basename(words[0]) if words else ""
    if program.startswith("python") and "-m" in words:
        module = words[words.index("-m") + 1]
        if module not in ("celery", "uvicorn"):
            found.append((module, None))
        words = words[words.index("-m") + 1 :]
        program = module
    if program == "celery":
        for flag in ("-A", "--app"):
            if flag in words:
                module, _, attribute = words[words.index(flag) + 1].partition(":")
                found.append((module, attribute or "app"))
    elif program == "uvicorn":
        target = next(word for word in words[1:] if not word.startswith("-"))
        module, _, attribute = target.partition(":")
        found.append((module, attribute))
    return found


def check_entry_points(argv: list[str], where: str) -> list[str]:
    """Assert that every module `argv` starts is one of the packages the images ship, defines
    what is named, and runs as `python -m` where that is how it starts; the modules, checked."""
    entries = entry_points(argv)
    assert entries, f"{where}: {argv} starts none of the dispatcher's modules"
    checked = []
    for module, attribute in entries:
        top = module.partition(".")[0]
        assert top in packaged(), f"{where}: {module} is not in a package the images install"
        spec = importlib.util.find_spec(module)
        assert spec is not None, f"{where}: no module {module} (renamed or moved?)"
        assert spec.origin, f"{where}: no module {module}"
        assert Path(spec.origin).is_relative_to(REPO / top), f"{where}: {module}: {spec.origin}"
        if attribute is None:  # python -m: a module, or a package with a __main__
            if spec.submodule_search_locations is not None:
                assert importlib.util.find_spec(f"{module}.__main__"), f"{where}: {module}"
        else:
            assert module_defines(module, attribute), f"{where}: {module} has no {attribute}"
        checked.append(module if attribute is None else f"{module}:{attribute}")
    return checked


def first_party_imports(package: str) -> dict[str, set[str]]:
    """{file: top-level repository packages it imports} for every module of `package`."""
    top_level = {path.name for path in REPO.iterdir() if path.is_dir()}
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.partition(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.partition(".")[0])
        found[path.relative_to(REPO).as_posix()] = names & top_level
    return found
