"""One request to the console: its viewer (from the session cookie), and the answer's cookie.

A visitor without a valid session gets a fresh one (anonymous where keys are configured, an
operator where none are), set on whatever the page answers: so the sign-in form, like every
other form, has a session-bound CSRF token to carry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.responses import RedirectResponse

from api.console.auth import (
    COOKIE,
    COOKIE_PATH,
    SESSION_SECONDS,
    Viewer,
    anonymous_role,
    csrf_token,
    keyed,
    new_session,
    read_session,
)
from api.console.render import render
from api.deps import SettingsDep
from shared.settings import Settings

SIGN_IN = "/console/signin"


@dataclass(slots=True)
class Visit:
    request: Request
    settings: Settings
    viewer: Viewer
    cookie: str | None  # a new session's cookie, to set on the answer

    @property
    def csrf(self) -> str:
        return csrf_token(self.settings, self.viewer)

    def replace(self, viewer: Viewer, cookie: str) -> None:
        """A sign-in or sign-out: the answer sets this session instead."""
        self.viewer, self.cookie = viewer, cookie

    def finish(self, response: Response) -> Response:
        if self.cookie is not None:
            response.set_cookie(
                COOKIE,
                self.cookie,
                max_age=SESSION_SECONDS,
                path=COOKIE_PATH,
                secure=self.request.url.scheme == "https",
                httponly=True,
                samesite="strict",
            )
        return response

    def page(self, template: str, context: dict[str, Any], status: int = 200) -> Response:
        base = {
            "viewer": self.viewer,
            "csrf": self.csrf,
            "keyed": keyed(self.settings),
        }
        return self.finish(render(self.request, template, {**base, **context}, status))

    def redirect(self, url: str) -> Response:
        """303: after a POST the browser GETs `url` (a reload does not repeat the action)."""
        return self.finish(RedirectResponse(url, status_code=303))

    def needs_sign_in(self) -> Response | None:
        """The sign-in redirect for an anonymous visitor, else None."""
        if self.viewer.signed_in:
            return None
        return self.redirect(f"{SIGN_IN}?next={self.request.url.path}")


async def _visit(request: Request, settings: SettingsDep) -> Visit:
    viewer = read_session(settings, request.cookies.get(COOKIE))
    cookie = None
    if viewer is None:
        viewer, cookie = new_session(settings, anonymous_role(settings), "")
    return Visit(request, settings, viewer, cookie)


VisitDep = Annotated[Visit, Depends(_visit)]
