"""`/docs` (Swagger UI) and `/redoc` from assets shipped in the package, so both work offline.

FastAPI's built-in pages load their JavaScript and CSS from a CDN (and ReDoc its fonts from Google);
this follows FastAPI's "self-hosting JavaScript and CSS for docs": build the app with
``docs_url=None, redoc_url=None`` and include `router`. The assets and their licences are in
``static/docs/`` (see its README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = [
    "ASSETS_DIR",
    "ASSETS_PATH",
    "CONTENT_SECURITY_POLICY",
    "DOCS_PATH",
    "OAUTH2_REDIRECT_PATH",
    "REDOC_PATH",
    "router",
]

DOCS_PATH = "/docs"
REDOC_PATH = "/redoc"
OAUTH2_REDIRECT_PATH = "/docs/oauth2-redirect"
ASSETS_PATH = "/docs/assets"
ASSETS_DIR = Path(__file__).resolve().parent / "static" / "docs"

# Swagger UI shows a badge fetched from validator.swagger.io unless the validator is turned off.
_SWAGGER_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
# The pages may load from this server only. ReDoc's menu always shows an <img> from
# cdn.redoc.ly (hidden when it fails to load): this keeps the browser from even asking. Both UIs
# need inline scripts and styles; ReDoc runs its search in a worker made from a blob: URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline' blob:; worker-src 'self' blob:; "
    "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'self'"
)

router = APIRouter(include_in_schema=False)
router.mount(ASSETS_PATH, StaticFiles(directory=ASSETS_DIR), name="docs-assets")


def _urls(request: Request) -> tuple[str, str]:
    """The root path the app is served under, and its OpenAPI URL below it."""
    root = str(request.scope.get("root_path", "")).rstrip("/")
    return root, root + (request.app.openapi_url or "/openapi.json")


@router.get(DOCS_PATH)
async def swagger_ui(request: Request) -> HTMLResponse:
    root, openapi_url = _urls(request)
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
        oauth2_redirect_url=root + OAUTH2_REDIRECT_PATH,
        swagger_ui_parameters={**_SWAGGER_PARAMETERS, **(request.app.swagger_ui_parameters or {})},
    )
    return _self_only(page)


@router.get(OAUTH2_REDIRECT_PATH)
async def swagger_ui_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(REDOC_PATH)
async def redoc(request: Request) -> HTMLResponse:
    root, openapi_url = _urls(request)
    page = get_redoc_html(
        openapi_url=openapi_url,
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{ASSETS_PATH}/redoc.standalone.js",
        redoc_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
        with_google_fonts=False,
    )
    return _self_only(page)


def _self_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
