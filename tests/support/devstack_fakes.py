"""Stand-ins for worker.app and api.main, so the devstack tests run without the real services.

The Celery app is the real shared one (same broker settings, same "ready." log line); it just
has no tasks.
"""

from __future__ import annotations

from fastapi import FastAPI

from shared import Settings, create_celery_app

app = create_celery_app(Settings())


def create_app() -> FastAPI:
    api = FastAPI()

    @api.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    return api
