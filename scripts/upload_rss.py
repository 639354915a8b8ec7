"""Peak API memory while it takes N concurrent uploads of S bytes, per request form.

    .venv/bin/python scripts/upload_rss.py [--uploads 50] [--size 6000000]

Starts its own redis-server, TorchServe (the `digest` test model), one Celery worker and the API
(devstack, in a temporary directory), then for each form sends the uploads at once with
`Prefer: respond-async` (the API reads, checks and claim-checks each payload, then answers 202)
and reads the API process's peak RSS (VmHWM, reset between forms through /proc/PID/clear_refs).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import tempfile
import time
from pathlib import Path

import httpx

from devstack import PAYLOAD_MODULE, RedisServer, TorchServe, archive_model, start_stack

REPO = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


def _status(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # 5: reset the peak RSS (VmHWM)


def _request(form: str, data: bytes) -> dict[str, object]:
    headers = {"Prefer": "respond-async"}
    if form == "multipart":
        return {
            "data": {"model_name": "digest"},
            "files": {"data": ("upload.bin", data, "application/octet-stream")},
            "headers": headers,
        }
    if form == "raw":
        return {
            "params": {"model_name": "digest"},
            "content": data,
            "headers": {**headers, "content-type": "application/octet-stream"},
        }
    uri = "data:application/octet-stream;base64," + base64.b64encode(data).decode()
    return {"json": {"model_name": "digest", "data": uri}, "headers": headers}


async def _burst(url: str, form: str, uploads: int, data: bytes) -> tuple[list[int], float]:
    limits = httpx.Limits(max_connections=uploads)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        kwargs = _request(form, data)
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(http.post("/dispatch_model", **kwargs) for _ in range(uploads))  # type: ignore[arg-type]
        )
        return [r.status_code for r in responses], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--uploads", type=int, default=50)
    parser.add_argument("--size", type=int, default=6_000_000)
    args = parser.parse_args()
    data = os.urandom(args.size)
    with tempfile.TemporaryDirectory(prefix="upload-rss-") as tmp:
        root = Path(tmp)
        store = root / "store"
        archive_model(
            "digest", REPO / "tests/models/digest.py", store, extra_files=[PAYLOAD_MODULE]
        )
        with (
            RedisServer(root / "redis", appendonly=False) as redis_server,
            TorchServe(root / "ts", store, ["digest.mar"]) as torchserve,
        ):
            env = {
                "REDIS_URL": redis_server.url,
                "TORCHSERVE_URL": torchserve.inference_url,
                "MAX_QUEUE_DEPTH": "100000",
            }
            stack = start_stack(env, root / "logs", workers=1)
            try:
                pid = stack.api.pid
                client = redis_server.client()
                print(f"{args.uploads} concurrent uploads of {args.size:,} bytes each")
                print(f"API RSS at rest: {_status(pid, 'VmRSS') / MIB:.0f} MiB")
                for form in ("multipart", "raw", "data_uri"):
                    client.flushdb()  # the stored payloads of the previous form
                    _reset_peak(pid)
                    base = _status(pid, "VmRSS")
                    statuses, seconds = asyncio.run(_burst(stack.api_url, form, args.uploads, data))
                    peak = _status(pid, "VmHWM")
                    print(
                        f"  {form:<9} peak RSS {peak / MIB:6.0f} MiB "
                        f"(+{(peak - base) / MIB:.0f} MiB over {base / MIB:.0f}; "
                        f"{(peak - base) / args.uploads / MIB:.1f} MiB per upload) "
                        f"statuses {sorted(set(statuses))} in {seconds:.1f} s"
                    )
            finally:
                stack.stop()


if __name__ == "__main__":
    main()
