"""The console's security headers, on every answer of its routes, errors included.

The policy allows nothing inline: scripts and styles come only from /console/static (vendored
files served by the API, no CDN: the console works offline), so an injected `<script>` or
`style=""` would not run even if a template escaped something wrongly. SVG charts use
presentation attributes (fill, stroke, width), which CSP does not count as inline style.

`ConsoleRoute` is the route class of the console's router: it adds the headers to whatever the
endpoint returns, and turns a DispatchError (404 task, 403 CSRF, 409 finished) into an HTML
page with the same status, so a browser shows a page under the same policy, not bare JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from api.console.render import error_page
from shared.errors import DispatchError

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Pages show task data of a moment and may be a tenant's: never stored by a shared cache.
    "Cache-Control": "no-store",
}


def secure(response: Response) -> Response:
    for name, value in HEADERS.items():
        response.headers.setdefault(name, value)
    return response


class ConsoleRoute(APIRoute):
    """An APIRoute whose answers (and errors) carry the console's headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def with_headers(request: Request) -> Response:
            try:
                response = await handler(request)
            except DispatchError as error:
                if request.url.path.endswith(".json"):
                    raise  # the JSON error body, as the API answers
                response = error_page(request, error)
            return secure(response)

        return with_headers
