"""`/docs` (Swagger UI), `/redoc` and `/openapi.json`, served without any CDN.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so they are blank on a machine without
internet. Here the JavaScript and CSS come from the `fastapi-offline` package's bundled copies,
served under /docs/static. The pages stay public when API keys are set (the schema is no secret,
and a browser cannot send a key to load it); DOCS_PUBLIC=false removes them. The schema
(api/openapi.py) declares the API-key schemes, so Swagger's Authorize button sends a key with
"Try it out".
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from shared.settings import Settings

STATIC_URL = "/docs/static"
OPENAPI_URL = "/openapi.json"


def static_dir() -> Path:
    """Swagger UI's and ReDoc's files as fastapi-offline ships them."""
    return Path(str(files("fastapi_offline") / "static"))


def install_docs(app: FastAPI, settings: Settings) -> None:
    """Serve the docs; create the app with openapi_url/docs_url/redoc_url None."""
    if not settings.docs_public:
        return
    title = f"{app.title} - docs"
    app.mount(STATIC_URL, StaticFiles(directory=static_dir()), name="docs-static")

    @app.get(OPENAPI_URL, include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())  # built once, by api/openapi.py

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=OPENAPI_URL,
            title=title,
            swagger_js_url=f"{STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{STATIC_URL}/favicon.png",
            # A key entered under Authorize survives a reload of the page.
            swagger_ui_parameters={"persistAuthorization": True},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=OPENAPI_URL,
            title=title,
            redoc_js_url=f"{STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )
