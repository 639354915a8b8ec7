"""The demo models of `make run` and where they live in the repository."""

from __future__ import annotations

from pathlib import Path

from devstack.torchserve import archive_model

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS_DIR = REPO_ROOT / "models"
DEMO_MODELS = ("echo", "linear")
# The handlers' shared helpers (the request body), archived next to every handler that imports
# it: TorchServe puts the model's directory on the worker's sys.path (`from payload import ...`).
PAYLOAD_MODULE = DEMO_MODELS_DIR / "payload.py"


def archive_demo_model(name: str, store: Path) -> Path:
    """Archive the demo model `name` (models/<name>/handler.py) into `store`."""
    handler = DEMO_MODELS_DIR / name / "handler.py"
    return archive_model(name, handler, store, extra_files=[PAYLOAD_MODULE])


def archive_demo_models(store: Path) -> list[str]:
    """Archive every demo model into `store`; returns the archive file names to load."""
    return [archive_demo_model(name, store).name for name in DEMO_MODELS]
