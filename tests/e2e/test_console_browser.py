"""The operator console in a real browser against the real stack (issue 20).

One worker serves the interactive class only, so tasks of the default and batch classes stay
queued for as long as the test runs: the counts per class are exact, not a race. Tasks: three
that succeed, one for a model TorchServe does not have (yet), one for the `failing` model (its
handler raises), and three queued ones. Headless Chromium, driven over the DevTools protocol
(tests/support/cdp.py), signs in with an operator key and reads the rendered DOM: the counts per
class, the worker, the failures with their codes. Then the test fixes the unknown model's cause
(registers a model under that name) and presses "retry" on its task page: the new task is linked
both ways and succeeds. Throughout, the browser logs no console error and no CSP violation; a
control at the end shows that a violation would have been seen. With CONSOLE_SCREENSHOTS=1 the
overview and a task page are saved to docs/images/.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack import PAYLOAD_MODULE, archive_model
from tests.support.cdp import CHROMIUM, Page, chromium_page
from tests.support.paths import REPO
from tests.support.stack import TEST_MODELS_DIR, StackFactory, require_tool

TENANT = "console-e2e-tenant-key"
OPERATOR = "console-e2e-operator-key-0123456789"
AUTH = {"X-API-Key": TENANT}
IMAGES = REPO / "docs" / "images"
REFRESH_TIMEOUT = 20.0  # console.js refreshes every 5 s


def _submit(http: httpx.Client, body: dict[str, Any]) -> str:
    answer = http.post("/dispatch_model", json=body, headers={**AUTH, "Prefer": "respond-async"})
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


def _ended(http: httpx.Client, task_id: str) -> dict[str, Any]:
    view: dict[str, Any] = http.get(f"/tasks/{task_id}?wait=90", headers=AUTH).json()
    assert view["status"] in ("succeeded", "failed"), view
    return view


def _row(dom: str, attribute: str, value: str) -> str:
    found = re.search(rf'<tr [^>]*{attribute}="{re.escape(value)}"[^>]*>(.*?)</tr>', dom, re.S)
    assert found, f"no row {attribute}={value} in {dom[:3000]}"
    return found.group(1)


def _figure(row: str, name: str) -> str:
    found = re.search(rf'data-figure="classes\.\d+\.{re.escape(name)}"[^>]*>([^<]*)<', row)
    assert found, (name, row)
    return found.group(1)


def _shoot(page: Page, name: str) -> None:
    if os.environ.get("CONSOLE_SCREENSHOTS") == "1":
        page.screenshot(IMAGES / name)


@pytest.mark.e2e
def test_console_in_a_browser(stack_factory: StackFactory, tmp_path: Path) -> None:
    require_tool(CHROMIUM is not None, "no `chromium` binary: apt-get install chromium")
    torchserve = stack_factory.torchserve
    late = f"console_late_{uuid.uuid4().hex[:8]}"
    stack = stack_factory.start(
        workers=0,
        interactive_workers=1,
        env={"DISPATCHER_API_KEYS": TENANT, "OPERATOR_API_KEYS": OPERATOR},
    )
    registered = False
    with httpx.Client(base_url=stack.api_url, timeout=120) as http:
        try:
            tasks = _make_tasks(http, late)
            with chromium_page(tmp_path / "profile", tmp_path / "chromium.log") as page:
                _sign_in(page, stack.api_url)
                _check_overview(page, stack.api_url, tasks)
                _check_workers_and_failures(page, stack.api_url, tasks)
                archive_model(
                    late, TEST_MODELS_DIR / "mirror.py", torchserve.model_store,
                    extra_files=[PAYLOAD_MODULE],
                )  # fmt: skip
                torchserve.register(f"{late}.mar")
                registered = True
                _check_retry(page, http, stack.api_url, tasks["late"])
                assert page.problems == [], page.problems
                _control_a_violation_is_seen(page)
        finally:
            if registered:
                httpx.delete(f"{torchserve.management_url}/models/{late}", timeout=30)


def _make_tasks(http: httpx.Client, late: str) -> dict[str, Any]:
    succeeded = []
    for i in range(3):
        answer = http.post(
            "/dispatch_model",
            json={"model_name": "echo", "input": {"i": i}, "priority": "interactive"},
            headers=AUTH,
        )
        assert answer.status_code == 200, answer.text
        succeeded.append(answer.json()["task_id"])
    late_id = _submit(http, {"model_name": late, "input": {"x": 1}, "priority": "interactive"})
    failing_id = _submit(http, {"model_name": "failing", "input": {}, "priority": "interactive"})
    codes = {}
    for task_id in (late_id, failing_id):
        view = _ended(http, task_id)
        assert view["status"] == "failed", view
        codes[task_id] = view["error"]["code"]
    queued = [
        _submit(http, {"model_name": "echo", "input": {}, "priority": p, "timeout": 600})
        for p in ("default", "default", "batch")
    ]
    return {"succeeded": succeeded, "late": late_id, "failing": failing_id, "codes": codes,
            "queued": queued}  # fmt: skip


def _sign_in(page: Page, api_url: str) -> None:
    page.navigate(f"{api_url}/console")
    assert "/console/signin" in page.url(), page.url()
    page.evaluate(f"document.getElementById('key').value = {OPERATOR!r}")
    page.click_and_load("#sign-in-button")
    assert page.url() == f"{api_url}/console", page.url()


def _check_overview(page: Page, api_url: str, tasks: dict[str, Any]) -> None:
    dom = page.dom()
    interactive = _row(dom, "data-class", "interactive")
    assert _figure(interactive, "queued") == "0"
    assert _figure(interactive, "in_flight") == "0"
    assert _figure(interactive, "endings_5m.succeeded") == "3"
    assert _figure(interactive, "endings_5m.failed") == "2"
    assert _figure(_row(dom, "data-class", "default"), "queued") == "2"
    assert _figure(_row(dom, "data-class", "batch"), "queued") == "1"
    for code in set(tasks["codes"].values()):
        assert f'data-class="interactive" data-code="{code}"' in dom, code
    assert "<polyline" in dom  # the charts drew a line
    _shoot(page, "console-overview.png")
    # console.js refreshes the figures from /console/status.json: a figure scribbled over comes
    # back with its value.
    page.evaluate("document.querySelector('[data-figure$=\".queued\"]').textContent = 'X'")
    deadline = time.monotonic() + REFRESH_TIMEOUT
    while page.evaluate("document.querySelector('[data-figure$=\".queued\"]').textContent") == "X":
        assert time.monotonic() < deadline, "console.js did not refresh the figures"
        time.sleep(0.2)  # polling the page until its deadline
    assert page.evaluate("document.querySelector('[data-figure$=\".queued\"]').textContent") == "0"


def _check_workers_and_failures(page: Page, api_url: str, tasks: dict[str, Any]) -> None:
    page.navigate(f"{api_url}/console/workers")
    dom = page.dom()
    workers = re.findall(r'<tr class="(live|gone)" data-worker="([^"]+)"', dom)
    assert any(state == "live" and name.startswith("interactive1@") for state, name in workers), dom
    page.navigate(f"{api_url}/console/tasks?list=failed")
    dom = page.dom()
    for task_id, code in tasks["codes"].items():
        row = re.search(rf'<tr data-task="{task_id}" data-status="failed" data-code="([^"]+)"', dom)
        assert row, (task_id, dom)
        assert row.group(1) == code, (task_id, code)
    assert not any(f'data-task="{t}"' in dom for t in tasks["succeeded"] + tasks["queued"])


def _check_retry(page: Page, http: httpx.Client, api_url: str, late_id: str) -> None:
    page.navigate(f"{api_url}/console/tasks/{late_id}")
    _shoot(page, "console-task.png")
    assert 'id="error-code"' in page.dom()
    page.click_and_load("#retry-button")
    found = re.fullmatch(rf"{re.escape(api_url)}/console/tasks/([A-Za-z0-9-]+)", page.url())
    assert found, page.url()
    new_id = found.group(1)
    assert new_id != late_id
    view = _ended(http, new_id)
    assert view["status"] == "succeeded", view
    assert view["retry_of"] == late_id
    assert http.get(f"/tasks/{late_id}", headers=AUTH).json()["retried_as"] == new_id
    page.navigate(f"{api_url}/console/tasks/{new_id}")
    dom = page.dom()
    assert 'class="status status-succeeded"' in dom
    assert f'<p id="retry-of">Retries <a href="/console/tasks/{late_id}">' in dom
    page.navigate(f"{api_url}/console/tasks/{late_id}")
    assert f'<p id="retried-as">Retried as <a href="/console/tasks/{new_id}">' in page.dom()


def _control_a_violation_is_seen(page: Page) -> None:
    """An inline script is refused and reported: the empty problem list above means something."""
    page.evaluate(
        "const s = document.createElement('script'); s.textContent = 'window.ran = 1';"
        "document.body.appendChild(s); 0"
    )
    deadline = time.monotonic() + 10
    while not page.problems:
        assert time.monotonic() < deadline, "the CSP violation was not reported"
        page.wait_event("Log.entryAdded", timeout=10)
    assert "Content Security Policy" in " ".join(page.problems), page.problems
    assert page.evaluate("window.ran === undefined")
