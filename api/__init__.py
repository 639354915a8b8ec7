"""The HTTP front: accepts prediction requests, enqueues them, waits for or reports results."""

from api.main import create_app

__all__ = ["create_app"]
