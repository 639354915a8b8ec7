"""The demo models of `make run` and where they live in the repository."""

from __future__ import annotations

from pathlib import Path

from devstack.torchserve import archive_model

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS_DIR = REPO_ROOT / "models"
DEMO_MODELS = ("echo", "linear")


def archive_demo_models(store: Path) -> list[str]:
    """Archive every demo model into `store`; returns the archive file names to load."""
    return [
        archive_model(name, DEMO_MODELS_DIR / name / "handler.py", store).name
        for name in DEMO_MODELS
    ]
