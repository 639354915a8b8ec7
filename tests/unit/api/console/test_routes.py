"""The console's pages, actions, headers and access rules through the real app on a real
redis-server (tests/unit/api/console/harness.py)."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable
from typing import TypeVar

import httpx

from api.auth import key_owner
from api.console.csp import CSP
from shared.redis_state.task_scripts import StartTasks, StartTerms
from tests.unit.api.console.harness import (
    OPERATOR,
    TENANT_A,
    TENANT_B,
    TERMS,
    console,
    settings,
)

T = TypeVar("T")
PAGES = ("/console", "/console/workers", "/console/backends", "/console/batches", "/console/tasks")


def run(main: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(main, 60)

    return asyncio.run(bounded())


def secured(answer: httpx.Response) -> None:
    assert answer.headers["content-security-policy"] == CSP
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"


def no_inline(html: str) -> None:
    """Nothing the CSP would refuse: no style attribute or element, no script without src."""
    assert not re.search(r"\sstyle\s*=", html), html
    assert "<style" not in html
    for script in re.findall(r"<script[^>]*>", html):
        assert 'src="/console/static/' in script, script
    assert not re.search(r"\son[a-z]+\s*=", html), html  # no inline event handlers


def test_open_console_pages_are_whole_and_secured(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=False)) as c:
            queued = await c.submit(priority="batch")
            failed = await c.submit(model_name="nope", priority="interactive")
            await c.fail(failed)
            for path in (*PAGES, f"/console/tasks/{failed}", "/console/signin"):
                answer = await c.http.get(path)
                assert answer.status_code == 200, (path, answer.text[:300])
                secured(answer)
                no_inline(answer.text)
            overview = (await c.http.get("/console")).text
            assert re.search(
                r'data-class="batch">\s*<th scope="row">batch</th>\s*<td class="num">'
                r'<span data-figure="classes.2.queued" data-format="int">1</span>',
                overview,
            )
            assert 'data-code="model_not_found"' in overview
            assert "<polyline" in overview
            task = (await c.http.get(f"/console/tasks/{failed}")).text
            assert 'id="error-code">model_not_found<' in task
            assert 'id="retry-button"' in task
            listed = (await c.http.get("/console/tasks")).text
            assert f'data-task="{queued}"' in listed
            assert f'data-task="{failed}"' in listed
            for asset, kind in (("console.css", "text/css"), ("console.js", "text/javascript")):
                answer = await c.http.get(f"/console/static/{asset}")
                assert answer.status_code == 200
                assert answer.headers["content-type"].startswith(kind)
                secured(answer)
            missing = await c.http.get("/console/static/../main.py")
            assert missing.status_code == 404
            gone = await c.http.get("/console/tasks/no-such-task")
            assert gone.status_code == 404
            assert "task_not_found" in gone.text
            secured(gone)
            # /status is open too, as the API is without keys.
            assert (await c.http.get("/status")).json()["classes"][2]["queued"] == 1

    run(main())


def test_root_redirects_browsers_and_keeps_the_json_404(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=False)) as c:
            browser = await c.http.get("/", headers={"accept": "text/html,application/xhtml+xml"})
            assert browser.status_code == 303
            assert browser.headers["location"] == "/console"
            for accept in ("*/*", "application/json"):
                other = await c.http.get("/", headers={"accept": accept})
                assert other.status_code == 404
                assert other.json() == {"status": 404, "msg": "Not Found", "code": "not_found"}

    run(main())


def test_status_needs_an_operator_key(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=True)) as c:
            missing = await c.http.get("/status")
            assert missing.status_code == 401
            assert missing.json()["code"] == "unauthorized"
            tenant = await c.http.get("/status", headers={"X-API-Key": TENANT_A})
            assert tenant.status_code == 403
            assert tenant.json()["code"] == "operator_key_required"
            ok = await c.http.get("/status", headers={"Authorization": f"Bearer {OPERATOR}"})
            assert ok.status_code == 200
            assert len(ok.json()["classes"]) == 3
            schema = (await c.http.get("/openapi.json")).json()
            assert {"200", "401", "403"} <= set(schema["paths"]["/status"]["get"]["responses"])
            assert not any(p.startswith("/console") for p in schema["paths"])

    run(main())


def test_sign_in_sets_a_strict_cookie_and_roles_see_what_they_may(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=True)) as c:
            mine = await c.submit(TENANT_A)
            theirs = await c.submit(TENANT_B)
            first = await c.http.get("/console")
            assert first.status_code == 303
            assert first.headers["location"].startswith("/console/signin")
            secured(first)
            wrong = await c.sign_in("not-a-key")
            assert wrong.status_code == 401
            assert "not valid" in wrong.text
            signed = await c.sign_in(TENANT_A)
            assert signed.status_code == 303
            cookie = signed.headers["set-cookie"]
            for attribute in ("HttpOnly", "SameSite=strict", "Path=/console"):
                assert attribute.lower() in cookie.lower(), cookie
            assert "secure" not in cookie.lower()  # plain http here
            assert TENANT_A not in cookie
            # A tenant: its own tasks only; the global pages say why not.
            listed = (await c.http.get("/console/tasks")).text
            assert f'data-task="{mine}"' in listed
            assert f'data-task="{theirs}"' not in listed
            assert (await c.http.get(f"/console/tasks/{theirs}")).status_code == 404
            assert (await c.http.get(f"/console/tasks/{mine}")).status_code == 200
            for page in ("/console", "/console/workers", "/console/backends"):
                restricted = await c.http.get(page)
                assert restricted.status_code == 403
                assert 'id="restricted"' in restricted.text
            assert (await c.http.get("/console/status.json")).status_code == 403
            # An operator: everything, every owner in the filter.
            await c.sign_in(OPERATOR)
            listed = (await c.http.get("/console/tasks")).text
            assert f'data-task="{mine}"' in listed
            assert f'data-task="{theirs}"' in listed
            overview = await c.http.get("/console")
            assert overview.status_code == 200
            assert 'id="classes"' in overview.text
            assert (await c.http.get("/console/status.json")).json()["classes"][1]["queued"] == 2
            only_b = await c.http.get("/console/tasks", params={"owner": key_owner(TENANT_B)})
            assert f'data-task="{theirs}"' in only_b.text
            assert f'data-task="{mine}"' not in only_b.text

    run(main())


def test_actions_need_the_sessions_csrf_token(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=True)) as c:
            task = await c.submit(TENANT_A)
            await c.sign_in(OPERATOR)
            token = await c.csrf()
            for data in ({}, {"csrf": "0" * 64}):
                refused = await c.http.post(f"/console/tasks/{task}/cancel", data=data)
                assert refused.status_code == 403, refused.text
                assert "csrf_rejected" in refused.text
                assert "reload the console page" in refused.text
                secured(refused)
            # Another browser (no cookie) with this session's token: refused too.
            async with httpx.AsyncClient(
                transport=c.http._transport, base_url="http://api"
            ) as other:
                stranger = await other.post(f"/console/tasks/{task}/cancel", data={"csrf": token})
                assert stranger.status_code == 403
            view = (await c.http.get(f"/tasks/{task}", headers={"X-API-Key": TENANT_A})).json()
            assert view["status"] == "queued"
            done = await c.http.post(f"/console/tasks/{task}/cancel", data={"csrf": token})
            assert done.status_code == 303
            assert done.headers["location"] == f"/console/tasks/{task}"
            view = (await c.http.get(f"/tasks/{task}", headers={"X-API-Key": TENANT_A})).json()
            assert view["status"] == "canceled"

    run(main())


def test_retry_from_the_console_links_both_ways(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=True)) as c:
            failed = await c.submit(TENANT_A, model_name="nope")
            await c.fail(failed)
            await c.sign_in(OPERATOR)
            token = await c.csrf(f"/console/tasks/{failed}")
            retried = await c.http.post(f"/console/tasks/{failed}/retry", data={"csrf": token})
            assert retried.status_code == 303, retried.text
            new_id = retried.headers["location"].rsplit("/", 1)[1]
            assert new_id != failed
            page = (await c.http.get(retried.headers["location"])).text
            assert f'href="/console/tasks/{failed}"' in page
            assert 'id="retry-of"' in page
            old = (await c.http.get(f"/console/tasks/{failed}")).text
            assert f'href="/console/tasks/{new_id}"' in old
            assert 'id="retry-button"' not in old
            # The new task is the tenant's, as the first one was.
            view = (await c.http.get(f"/tasks/{new_id}", headers={"X-API-Key": TENANT_A})).json()
            assert view["retry_of"] == failed
            assert view["status"] == "queued"

    run(main())


def test_task_filters(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=False)) as c:
            echo = await c.submit(priority="interactive")
            nope = await c.submit(model_name="nope", priority="batch")
            await c.fail(nope)
            done = await c.submit(model_name="linear")
            await c.run(done)

            async def shown(**params: str) -> set[str]:
                page = (await c.http.get("/console/tasks", params=params)).text
                return set(re.findall(r'<tr data-task="([^"]+)"', page))

            assert await shown() == {echo, nope, done}
            assert await shown(model="linear") == {done}
            assert await shown(status="queued") == {echo}
            assert await shown(code="model_not_found") == {nope}
            assert await shown(priority="batch") == {nope}
            assert await shown(list="failed") == {nope}
            assert await shown(list="failed", model="echo") == set()
            assert (await c.http.get("/console/tasks", params={"list": "all"})).status_code == 422

    run(main())


def test_batch_cancel_from_the_console(redis_url: str) -> None:
    async def main() -> None:
        async with console(settings(redis_url, keyed=False)) as c:
            body = {
                "requests": [
                    {"custom_id": f"c{i}", "model_name": "echo", "input": {"i": i}}
                    for i in range(3)
                ]
            }
            created = await c.http.post("/batches", json=body)
            assert created.status_code == 202, created.text
            batch_id = created.json()["batch_id"]
            page = (await c.http.get("/console/batches")).text
            assert f'data-batch="{batch_id}"' in page
            assert 'max="3" value="0"' in page
            token = await c.csrf("/console/batches")
            canceled = await c.http.post(
                f"/console/batches/{batch_id}/cancel", data={"csrf": token}
            )
            assert canceled.status_code == 303
            view = (await c.http.get(f"/batches/{batch_id}")).json()
            assert view["request_counts"]["canceled"] == 3

    run(main())


def test_a_task_page_shows_each_delivery(redis_url: str) -> None:
    """A task redelivered (its first worker lost) shows both starts, each with its worker."""

    async def main() -> None:
        async with console(settings(redis_url, keyed=False)) as c:
            task = await c.submit()
            redis = c.app.state.store.redis
            lost = StartTerms(3, 600, "lost@host", TERMS.expired_error, TERMS.overran_error)
            [(verdict, _)] = await StartTasks(redis)([task], lost, time.time())
            assert verdict == "run"
            await c.run(task)  # the redelivery, on w1@host, succeeds
            page = (await c.http.get(f"/console/tasks/{task}")).text
            rows = re.findall(r"<th>Delivery (\d)</th><td>started [^<]+ on <code>([^<]+)<", page)
            assert rows == [("1", "lost@host"), ("2", "w1@host")]
            assert 'data-deliveries="2"' in page

    run(main())
