"""`/docs` and `/redoc` work offline: their pages name only the app's own URLs, which it serves."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from depthflow.api import create_app
from depthflow.api.docs import ASSETS_DIR
from depthflow.config import Settings
from tests.conftest import CI
from tests.harness.processes import free_port

CHROMIUM = os.environ.get("DEPTHFLOW_TEST_CHROMIUM", "/usr/bin/chromium")
# src="...", href="...", spec-url="...", and Swagger UI's `url: '...'`.
_REFERENCES = re.compile(r"""(?:src|href|spec-url)="([^"]+)"|\burl: '([^']+)'""")
_CONTENT_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".json": "application/json",
}


@pytest.fixture
def app() -> FastAPI:
    # No lifespan is run (neither by the ASGI transport nor with lifespan="off"): the docs need
    # no database, Redis or feed.
    return create_app(Settings(_env_file=None, redis_url=""), with_feed=False)  # type: ignore[call-arg]


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


def references(html: str) -> list[str]:
    return [a or b for a, b in _REFERENCES.findall(html)]


@pytest.mark.parametrize(("page", "expected"), [("/docs", 4), ("/redoc", 3)])
async def test_docs_pages_name_only_local_urls_that_are_served(
    client: httpx.AsyncClient, page: str, expected: int
) -> None:
    response = await client.get(page)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in response.headers["content-security-policy"]
    html = response.text
    # No CDN, no Google fonts, no validator badge: nothing that names another host.
    assert "http://" not in html
    assert "https://" not in html
    assert "fonts.googleapis" not in html
    urls = references(html)
    assert len(urls) == expected, urls
    assert "/openapi.json" in urls
    for url in urls:
        assert url.startswith("/"), url
        assert not url.startswith("//"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        kind = _CONTENT_TYPES[Path(urlsplit(url).path).suffix]
        assert asset.headers["content-type"].startswith(kind), (url, asset.headers)
        assert len(asset.content) > 50, url


async def test_swagger_ui_validator_badge_is_off(client: httpx.AsyncClient) -> None:
    # Swagger UI would otherwise load a badge image from validator.swagger.io.
    assert '"validatorUrl": null' in (await client.get("/docs")).text


async def test_the_vendored_assets_are_the_whole_bundles(client: httpx.AsyncClient) -> None:
    for name, marker in (
        ("swagger-ui-bundle.js", b"SwaggerUIBundle"),
        ("redoc.standalone.js", b"Redoc"),
        ("swagger-ui.css", b".swagger-ui"),
    ):
        body = (await client.get(f"/docs/assets/{name}")).content
        assert body == (ASSETS_DIR / name).read_bytes()
        assert marker in body, name
        assert len(body) > 100_000, name
    # ReDoc's menu logo would come from its CDN: the vendored bundle names it no more.
    assert b"cdn.redoc.ly" not in (ASSETS_DIR / "redoc.standalone.js").read_bytes()
    notes = (ASSETS_DIR / "README.md").read_text()
    assert "Apache-2.0" in notes
    assert "MIT" in notes
    assert (ASSETS_DIR / "LICENSE-swagger-ui").is_file()
    assert (ASSETS_DIR / "LICENSE-redoc").is_file()


async def test_oauth2_redirect_page_and_no_builtin_cdn_routes(client: httpx.AsyncClient) -> None:
    assert (await client.get("/docs/oauth2-redirect")).status_code == 200
    assert (await client.get("/docs/assets/nope.js")).status_code == 404
    schema = (await client.get("/openapi.json")).json()
    assert not any(path.startswith(("/docs", "/redoc")) for path in schema["paths"])


# -- in a real browser ---------------------------------------------------------------------------


def _browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed"
    if shutil.which(CHROMIUM) is None:
        return f"no Chromium at {CHROMIUM}"
    return None


@pytest.fixture
async def live_server(app: FastAPI) -> AsyncIterator[str]:
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="off", log_config=None)
    )
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(60):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(30):
                await asyncio.wait([task])
        if not task.done():
            task.cancel()
            await asyncio.wait([task])


async def test_swagger_ui_and_redoc_render_offline_in_chromium(live_server: str) -> None:
    missing = _browser_missing()
    if missing is not None:
        if CI:
            pytest.fail(f"{missing} (CI=true: the browser test must run)", pytrace=False)
        pytest.skip(missing)
    from playwright.async_api import Route, async_playwright

    left: list[str] = []
    requested: list[str] = []

    async def local_only(route: Route) -> None:
        # Anything not for our server is recorded and refused: the page must not need it.
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            await route.continue_()
        else:
            left.append(route.request.url)
            await route.abort()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("request", lambda request: requested.append(request.url))
            await page.route("**/*", local_only)

            await page.goto(f"{live_server}/docs", timeout=60_000)
            title = page.locator(".swagger-ui .info .title")
            await title.wait_for(timeout=60_000)
            assert "depthflow" in await title.inner_text()
            # The operations are listed, so the schema was loaded and rendered too.
            await page.locator(".opblock").first.wait_for(timeout=60_000)

            await page.goto(f"{live_server}/redoc", timeout=60_000)
            heading = page.locator(".api-info h1")
            await heading.wait_for(timeout=60_000)
            assert "depthflow" in await heading.inner_text()
        finally:
            await browser.close()
    assert left == [], left
    assert errors == [], errors
    # Not even asked for (a request a Content-Security-Policy blocks is still reported here).
    foreign = [
        url
        for url in requested
        if not url.startswith(("data:", "blob:")) and urlsplit(url).hostname != "127.0.0.1"
    ]
    assert foreign == [], foreign
    assert f"{live_server}/docs/assets/redoc.standalone.js" in requested
