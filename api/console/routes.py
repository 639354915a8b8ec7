"""The console's router, as api/main.py includes it, and `GET /` for browsers.

`GET /` was a JSON 404; a browser (Accept: text/html) is now sent to the console, everything
else still gets the same 404 body, so API clients that probe `/` see no change.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import RedirectResponse
from starlette.exceptions import HTTPException

from api.console import actions, pages

router = APIRouter()
router.include_router(pages.router)
router.include_router(actions.router)


def wants_html(request: Request) -> bool:
    """A browser's navigation: text/html among the accepted types (curl sends */*)."""
    return any(
        part.split(";")[0].strip() == "text/html"
        for part in request.headers.get("accept", "").split(",")
    )


@router.get("/", include_in_schema=False)
async def root(request: Request) -> Response:
    if wants_html(request):
        return RedirectResponse("/console", status_code=303)
    raise HTTPException(404, "Not Found")
