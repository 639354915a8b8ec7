"""A real browser reads a task's stream, loses the connection once and resumes by itself (issue 18).

Headless Chromium (Debian's `chromium`) opens a page (tests/support/sse_page.py) whose script
dispatches a job to the TorchServe model `streaming` and follows its stream with `EventSource`.
The page server in between cuts the first stream response mid-stream, while the model is still
producing; nothing in the page reconnects: the browser does, with `Last-Event-ID`, after the
`retry:` the API sent. The test checks, on the server side, that the reconnect carried the id of
the last event the page saw, and that the page got every chunk exactly once, in order, as the
stream holds them, then `done` with the same answer a non-streamed request gives; that after
`done` a resume gets 204, which makes the browser give up; and that no JavaScript error happened.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import Stack
from tests.support.sse_page import SsePageServer, StreamRequest
from tests.support.stack import require_tool

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# 16 pieces 0.5 s apart: 7.5 s of streaming. The cut comes after the 3rd event (~1 s in) and the
# browser reconnects `retry` (2 s) later, so it resumes while the model still produces: the
# events it missed come from the stream's history, the rest live.
CHUNKS, DELAY = 16, 0.5
CUT_AFTER = 3
JOB = {"model_name": "streaming", "input": {"chunks": CHUNKS, "delay": DELAY}, "stream": True}
REPORT_TIMEOUT = 90.0
RETRY_SECONDS = 2.0  # api/sse.py RETRY_MS: the browser's wait before a reconnect
EVENT_SOURCE_CLOSED = 2
# Even if this process is killed before its cleanup runs, the browser goes: setpriv makes
# `timeout` get SIGTERM when this process dies, and timeout passes it to its whole group; and
# whatever happens, timeout kills the group BROWSER_CAP seconds after the start.
BROWSER_CAP = 240
OUTLIVES_NOTHING = f"setpriv --pdeathsig TERM -- timeout -s KILL {BROWSER_CAP}".split()


@contextmanager
def chromium(url: str, profile: Path, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Headless Chromium on `url`, in a process group of its own, killed (the group) on exit."""
    assert CHROMIUM is not None
    argv = [
        *OUTLIVES_NOTHING,
        CHROMIUM,
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}",
        # No network but this machine: any other host name resolves to nothing.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        url,
    ]  # fmt: skip
    with log.open("wb") as output:
        browser = subprocess.Popen(
            argv, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield browser
    finally:
        # The group is the browser's own session: its renderer and helper processes go too.
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait(10)


def server_history(api_url: str, task_id: str) -> list[dict[str, str]]:
    """The task's whole stream as a late reader (httpx, no browser) reads it from the API."""
    events: list[dict[str, str]] = []
    with httpx.stream("GET", f"{api_url}/tasks/{task_id}/stream", timeout=30) as answer:
        assert answer.status_code == 200
        body = answer.read().decode()
    for block in body.split("\n\n"):
        fields: dict[str, list[str]] = {}
        for line in block.split("\n"):
            if line and not line.startswith(":"):
                name, _, value = line.partition(":")
                fields.setdefault(name, []).append(value.removeprefix(" "))
        if "event" in fields:
            events.append(
                {
                    "type": fields["event"][0],
                    "id": fields["id"][0],
                    "data": "\n".join(fields["data"]),
                }
            )
    return events


def id_ms(event_id: str) -> float:
    """The Redis time (s) an event id `<ms>-<seq>` was appended at."""
    return int(event_id.split("-")[0]) / 1000


@pytest.mark.e2e
def test_browser_eventsource_resumes_after_a_dropped_stream(stack: Stack, tmp_path: Path) -> None:
    require_tool(
        CHROMIUM is not None,
        "no `chromium` binary: apt-get install chromium (scripts/bootstrap.sh)",
    )
    with (
        SsePageServer(stack.api_url, JOB, cut_after=CUT_AFTER) as page,
        chromium(page.url, tmp_path / "profile", tmp_path / "chromium.log"),
    ):
        report = page.wait_report(REPORT_TIMEOUT)
        assert report is not None, (
            f"no report from the page in {REPORT_TIMEOUT} s; requests: {page.paths}; "
            f"streams: {page.stream_requests()}"
        )
        # The page closed its EventSource at `done` and the probe's 204 stopped the other:
        # past a retry delay, the browser has asked for no stream again.
        settled = len(page.stream_requests())
        time.sleep(RETRY_SECONDS + 1.5)
        streams = page.stream_requests()
    context = f"report: {json.dumps(report)[:3000]}; streams: {streams}"
    assert report["jsErrors"] == [], context
    assert report["outcome"] == "done", context
    assert len(streams) == settled == 3, context

    first, resumed, probe = streams
    task_id = first.path.split("/")[2]
    events: list[dict[str, str]] = report["events"]
    _check_the_drop_and_the_resume(first, resumed, events, report, context)
    _check_the_events(stack.api_url, task_id, events, context)
    # The resume after `done`: the API's 204, and the browser gave up (no event, CLOSED).
    assert probe.last_event_id is None, context
    assert probe.path.endswith(f"?last_event_id={events[-1]['id']}"), context
    assert probe.status == 204, context
    assert report["probe"] == {"events": [], "readyState": EVENT_SOURCE_CLOSED}, context


def _check_the_drop_and_the_resume(
    first: StreamRequest,
    resumed: StreamRequest,
    events: list[dict[str, str]],
    report: dict[str, Any],
    context: str,
) -> None:
    # The first request came without an id and was cut after CUT_AFTER events.
    assert first.last_event_id is None, context
    assert first.status == 200, context
    assert first.cut, context
    assert len(first.sent_ids) == CUT_AFTER, context
    assert [event["id"] for event in events[:CUT_AFTER]] == first.sent_ids, context
    # The browser noticed once (still CONNECTING: it will retry), after exactly those events,
    # and reconnected by itself with the last id it had seen.
    assert report["connectionErrors"] == [{"readyState": 0, "after": CUT_AFTER}], context
    assert report["opens"] == [0, CUT_AFTER], context
    assert resumed.last_event_id == first.sent_ids[-1], context
    assert resumed.status == 200, context
    assert not resumed.cut, context
    assert resumed.sent_ids == [event["id"] for event in events[CUT_AFTER:]], context
    # Mid-stream: the reconnect came before the model's last piece was appended.
    last_output = [event for event in events if event["type"] == "output"][-1]
    assert resumed.started < id_ms(last_output["id"]), context


def _check_the_events(
    api_url: str, task_id: str, events: list[dict[str, str]], context: str
) -> None:
    # Every chunk exactly once, in order, then done: as the model sent them.
    assert [event["type"] for event in events] == ["output"] * CHUNKS + ["done"], context
    pieces = [json.loads(event["data"]) for event in events[:-1]]
    assert [piece["i"] for piece in pieces] == list(range(CHUNKS)), context
    assert {piece["of"] for piece in pieces} == {CHUNKS}, context
    ids = [event["id"] for event in events]
    assert len(set(ids)) == len(ids), context
    # ... and as the stream holds them: a late reader without a browser gets the same.
    history = server_history(api_url, task_id)
    assert [(e["type"], e["id"]) for e in history] == [(e["type"], e["id"]) for e in events]
    assert [e["data"] for e in history[:-1]] == [e["data"] for e in events[:-1]]
    # `done` carries the final view: succeeded, with the answer a non-streamed request gives.
    final = json.loads(events[-1]["data"])
    assert final["task_id"] == task_id, context
    assert final["status"] == "succeeded", context
    unstreamed = httpx.post(f"{api_url}/dispatch_model", json={**JOB, "stream": False}, timeout=60)
    assert unstreamed.status_code == 200, unstreamed.text
    # The final answer is the pieces the page got; the non-streamed one differs in send times.
    assert _pieces(final["prediction_value"]) == pieces, context
    assert _untimed(_pieces(unstreamed.json()["prediction_value"])) == _untimed(pieces)


def _pieces(value: Any) -> list[Any]:
    """The model's pieces in a final answer: its body, one JSON line per piece."""
    assert isinstance(value, str), value
    return [json.loads(line) for line in value.splitlines()]


def _untimed(pieces: list[Any]) -> list[Any]:
    return [{**piece, "t": None} for piece in pieces]
