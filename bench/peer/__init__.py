"""The "common pattern" peer: FastAPI + Celery `send_task` + `AsyncResult.get()` in a threadpool.

Not part of the service: the benchmark runs it on its own Redis as the comparison for scenario 3.
"""
