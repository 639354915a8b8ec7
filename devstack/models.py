"""The demo models of `make run` and where they live in the repository."""

from __future__ import annotations

from pathlib import Path

from devstack.torchserve import archive_model

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_MODELS_DIR = REPO_ROOT / "models"
DEMO_MODELS = ("echo", "linear", "image_info", "grayscale")
# The handlers' shared helpers (the request body), archived next to every handler that imports
# it: TorchServe puts the model's directory on the worker's sys.path (`from payload import ...`).
PAYLOAD_MODULE = DEMO_MODELS_DIR / "payload.py"
# The image models' shared helper (the picture a request carries, read with Pillow).
IMAGE_MODULE = DEMO_MODELS_DIR / "image.py"
IMAGE_MODELS = ("image_info", "grayscale")
# The picture the curl examples of `make run` send.
EXAMPLE_IMAGE = DEMO_MODELS_DIR / "example.png"


def archive_demo_model(name: str, store: Path) -> Path:
    """Archive the demo model `name` (models/<name>/handler.py) into `store`."""
    handler = DEMO_MODELS_DIR / name / "handler.py"
    extra = [PAYLOAD_MODULE, *([IMAGE_MODULE] if name in IMAGE_MODELS else [])]
    return archive_model(name, handler, store, extra_files=extra)


def archive_demo_models(store: Path) -> list[str]:
    """Archive every demo model into `store`; returns the archive file names to load."""
    return [archive_demo_model(name, store).name for name in DEMO_MODELS]
