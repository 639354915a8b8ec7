"""The docs a newcomer reads: generated pages are fresh, links resolve, the README is short."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.support.paths import REPO

PAGES = sorted(
    [
        *(REPO / "docs").glob("*.md"),
        *(REPO / name / "README.md" for name in (".", "deploy", "client")),
        REPO / "CHANGELOG.md",
    ]
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def gen_docs() -> ModuleType:
    """scripts/gen_docs.py, loaded from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gen_docs", REPO / "scripts" / "gen_docs.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gen_docs", module)
    spec.loader.exec_module(module)
    return module


def test_generated_docs_are_fresh() -> None:
    """CI's `gen_docs.py --check` as a test: a changed description or key needs a re-run."""
    generator = gen_docs()
    stale = {
        str(path.relative_to(REPO)): "differs" if path.exists() else "missing"
        for path, text in generator.expected().items()
        if not path.exists() or path.read_text(encoding="utf-8") != text
    }
    assert stale == {}, "run .venv/bin/python scripts/gen_docs.py"


def test_the_check_notices_a_stale_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The freshness check above can fail: an edited copy of the page is reported stale."""
    generator = gen_docs()
    page = tmp_path / "configuration.md"
    page.write_text(generator.CONFIGURATION.read_text(encoding="utf-8") + "hand edit\n")
    expected = {page: generator.CONFIGURATION.read_text(encoding="utf-8")}
    monkeypatch.setattr(generator, "expected", lambda: expected)
    assert generator.stale() == [page]
    assert generator.main(["--check"]) == 1


def test_env_example_comments_are_the_descriptions() -> None:
    from shared.settings import Settings

    text = (REPO / ".env.example").read_text(encoding="utf-8")
    comments = " ".join(
        line.removeprefix("# ") for line in text.splitlines() if line.startswith("# ")
    )
    field = Settings.model_fields["max_deliveries"]
    assert field.description is not None
    assert field.description.replace("`", "") in comments


def _slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    headings = re.findall(r"^#{1,6} (.+)$", page.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {_slug(heading) for heading in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    """Every link to a file of the repository names one that exists, and its #anchor a heading."""
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)  # code blocks hold no links
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        linked = (page.parent / path_part).resolve() if path_part else page
        if not linked.exists():
            broken.append(target)
            continue
        if anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
            broken.append(target)
    assert broken == []


# A repository path named in the text: `worker/broker_fixes.py`, tests/e2e/test_client.py...
REPO_PATH = re.compile(
    r"(?<![\w/.-])((?:api|worker|shared|tests|devstack|bench|scripts|client|deploy|docker|models)"
    r"/[\w/.-]*\w\.(?:py|lua|yml|yaml|json|sh|png))"
)


@pytest.mark.parametrize(
    "page",
    # History names old paths, and a benchmark report the code of the run it profiled.
    [page for page in PAGES if page.name not in ("CHANGELOG.md", "BENCHMARKS.md")],
    ids=lambda page: str(page.relative_to(REPO)),
)
def test_named_files_exist(page: Path) -> None:
    """A renamed or moved module leaves no page pointing at its old path."""
    named = set(REPO_PATH.findall(page.read_text(encoding="utf-8")))
    assert sorted(path for path in named if not (REPO / path).exists()) == []


def test_the_readme_stays_short() -> None:
    """The README is an overview; reference text belongs on a docs/ page."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150
