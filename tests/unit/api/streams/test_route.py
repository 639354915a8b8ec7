"""`GET /tasks/{id}/stream` through the real app (ASGI) on a real redis-server: the worker's side
is simulated by appending with the real script (AppendToStream), as a streaming worker does.

httpx's ASGITransport hands back a response once its body is complete, so a stream is read
whole: entries appended while it is open (a concurrent task) show the hub's live delivery.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from api import sse
from api.routes.streams import SYNTHETIC_ID
from shared.settings import Settings
from tests.unit.api.streams.harness import (
    AUTH,
    DONE,
    ERROR,
    OTHER_KEY,
    OUTPUT,
    RESTART,
    Worker,
    api,
    events_of,
    parse,
    submit,
)


def test_live_events_in_order_with_their_ids_then_done(config: Settings, run: Any) -> None:
    async def main() -> tuple[list[str], list[dict[str, str]]]:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            reading = asyncio.create_task(client.get(f"/tasks/{task_id}/stream", headers=AUTH))
            await asyncio.sleep(0.3)  # the reader waits in the hub before anything is appended
            assert not reading.done()
            ids = [
                await worker(task_id, OUTPUT, '{"text": "Hel"}'),
                await worker(task_id, OUTPUT, "line one\nline two"),
                await worker(task_id, RESTART, '{"attempt": 2}', attempt=2),
                await worker(task_id, OUTPUT, '{"text": "Hello"}', attempt=2),
                await worker(task_id, DONE, '{"status": "succeeded"}', attempt=2),
            ]
            response = await reading
        await worker.aclose()
        return ids, events_of(response)

    ids, events = run(main())
    restart_mark = events[2]["id"]  # the restart mark's own id (the script writes it first)
    assert [e["event"] for e in events] == ["output", "output", "restart", "output", "done"]
    assert [e["id"] for e in events] == [ids[0], ids[1], restart_mark, ids[3], ids[4]]
    assert events[0]["data"] == '{"text": "Hel"}'  # JSON as the worker wrote it
    assert events[1]["data"] == "line one\nline two"  # one data line per line, joined back
    assert events[4]["data"] == '{"status": "succeeded"}'


def test_resume_after_last_event_id_header_wins_over_query(config: Settings, run: Any) -> None:
    async def main() -> tuple[list[str], dict[str, list[dict[str, str]]]]:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            ids = [await worker(task_id, OUTPUT, f'"{n}"') for n in range(4)]
            ids.append(await worker(task_id, ERROR, '{"status": 502, "code": "backend_failed"}'))
            url = f"/tasks/{task_id}/stream"
            seen = {
                "header": events_of(
                    await client.get(url, headers={**AUTH, "Last-Event-ID": ids[1]})
                ),
                "query": events_of(
                    await client.get(url, params={"last_event_id": ids[2]}, headers=AUTH)
                ),
                "both": events_of(
                    await client.get(
                        url,
                        params={"last_event_id": ids[0]},
                        headers={**AUTH, "Last-Event-ID": ids[3]},
                    )
                ),
                "late": events_of(await client.get(url, headers=AUTH)),
                "empty id": events_of(await client.get(url, headers={**AUTH, "Last-Event-ID": ""})),
            }
        await worker.aclose()
        return ids, seen

    ids, seen = run(main())
    assert [e["id"] for e in seen["header"]] == ids[2:]
    assert [e["id"] for e in seen["query"]] == ids[3:]
    assert [e["id"] for e in seen["both"]] == ids[4:]
    # A reader after the end gets the whole history, then the ending (here the error).
    assert [e["id"] for e in seen["late"]] == ids
    assert [e["id"] for e in seen["empty id"]] == ids  # an empty id is none: from the first
    assert [e["event"] for e in seen["late"]] == ["output"] * 4 + ["error"]
    assert json.loads(seen["late"][-1]["data"])["code"] == "backend_failed"


def test_a_reconnect_after_the_end_gets_204_not_a_hang(config: Settings, run: Any) -> None:
    async def main() -> list[int]:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            first = await worker(task_id, OUTPUT, '"a"')
            done = await worker(task_id, DONE, "{}")
            url = f"/tasks/{task_id}/stream"
            statuses = [
                (await client.get(url, headers={**AUTH, "Last-Event-ID": done})).status_code,
                (await client.get(url, params={"last_event_id": done}, headers=AUTH)).status_code,
                (await client.get(url, headers={**AUTH, "Last-Event-ID": first})).status_code,
            ]
        await worker.aclose()
        return statuses

    assert run(main()) == [204, 204, 200]


def test_keep_alive_comments_while_the_stream_is_idle(
    config: Settings, run: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_SECONDS", 0.05)

    async def main() -> str:
        worker = Worker(config.redis_url)
        async with api(config) as client:
            task_id = await submit(client)
            reading = asyncio.create_task(client.get(f"/tasks/{task_id}/stream", headers=AUTH))
            await worker(task_id, OUTPUT, '"a"')
            await asyncio.sleep(0.4)
            await worker(task_id, DONE, "{}")
            response = await reading
        await worker.aclose()
        return response.text

    body = run(main())
    blocks = parse(body)
    assert blocks[0] == {"retry": str(sse.RETRY_MS)}
    after_output = blocks[[b.get("event") for b in blocks].index("output") + 1 :]
    keepalives = [b for b in after_output if b.get("comment") == "keep-alive"]
    assert len(keepalives) >= 3  # ~8 in 0.4 s at one per 0.05 s
    assert after_output[-1]["event"] == "done"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_task_canceled_while_queued_gets_one_final_event(
    config: Settings, run: Any, streamed: bool
) -> None:
    """Not streamed: one event from the record (SYNTHETIC_ID). Streamed: its cancel wrote the
    stream's `done` (lib.lua end_stream), whose view the API reads from the record."""

    async def main() -> tuple[str, list[dict[str, str]], int, list[dict[str, str]]]:
        async with api(config) as client:
            task_id = await submit(client, stream=streamed)  # no worker runs: it stays queued
            url = f"/tasks/{task_id}/stream"
            reading = asyncio.create_task(client.get(url, headers=AUTH))
            await asyncio.sleep(0.3)
            canceled = await client.delete(f"/tasks/{task_id}", headers=AUTH)
            assert canceled.status_code == 200, canceled.text
            waiting = events_of(await reading)
            last = waiting[-1]["id"]
            again = await client.get(url, headers={**AUTH, "Last-Event-ID": last})
            late = events_of(await client.get(url, headers=AUTH))
        return task_id, waiting, again.status_code, late

    task_id, waiting, again, late = run(main())
    assert waiting == late
    assert [e["event"] for e in waiting] == ["done"]
    assert (waiting[0]["id"] == SYNTHETIC_ID) is not streamed
    view = json.loads(waiting[0]["data"])
    assert (view["task_id"], view["status"]) == (task_id, "canceled")
    assert again == 204


def test_same_rules_as_the_task_bad_ids_unknown_and_other_tenants(
    config: Settings, run: Any
) -> None:
    async def main() -> dict[str, httpx.Response]:
        async with api(config) as client:
            task_id = await submit(client)
            url = f"/tasks/{task_id}/stream"
            return {
                "no key": await client.get(url),
                "other tenant": await client.get(url, headers={"X-API-Key": OTHER_KEY}),
                "unknown": await client.get("/tasks/0000-unknown/stream", headers=AUTH),
                "bad header": await client.get(url, headers={**AUTH, "Last-Event-ID": "x\x01"}),
                "bad query": await client.get(url, params={"last_event_id": "12"}, headers=AUTH),
                "out of range": await client.get(
                    url, params={"last_event_id": f"{2**64}-0"}, headers=AUTH
                ),
            }

    answers = run(main())
    assert answers["no key"].status_code == 401
    for name in ("other tenant", "unknown"):
        assert answers[name].status_code == 404, name
        assert answers[name].json()["code"] == "task_not_found"
    for name in ("bad query", "out of range"):
        assert answers[name].status_code == 422, name
        assert "last_event_id: not an event id of this stream" in answers[name].json()["msg"]
        assert "12" not in answers[name].json()["msg"]  # the value is not echoed
    assert answers["bad header"].status_code == 422
    assert "Last-Event-ID: not an event id" in answers["bad header"].json()["msg"]
