"""Schemathesis over the live OpenAPI schema of a real `depthflow serve`: no request gives a 5xx.

The service is fed by the simulator, so `/book`, `/ticks` and `/signals` answer with real data.
Schemathesis runs as its CLI in a subprocess (its pytest plugin is not needed, and the CLI keeps
its own event loop and threads out of ours), bounded in examples per operation.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from depthflow.simulate.server import Simulator
from tests.conftest import CI
from tests.harness.processes import ServeProcess, exchange_env

SYMBOLS = ("btcusdt", "ethusdt")
MAX_EXAMPLES = 30
# A run takes ~10 s; the limit only stops a hung one.
RUN_LIMIT_S = 120
SEED = 1


def schemathesis_cli() -> list[str]:
    """The `schemathesis` command of this interpreter's environment."""
    local = Path(sys.executable).with_name("schemathesis")
    found = str(local) if local.exists() else shutil.which("schemathesis")
    if found is None:
        message = "schemathesis is not installed (pip install -e '.[dev]')"
        if CI:
            pytest.fail(message + " (CI=true: dev tools are required)", pytrace=False)
        pytest.skip(message)
    return [found]


@pytest.fixture
async def live_service(
    clean_db: str, redis_url: str, redis_prefix: str, tmp_path: Path
) -> AsyncIterator[ServeProcess]:
    """`depthflow serve` fed by the simulator, with ticks already stored."""
    sim = Simulator(SYMBOLS, seed=9, rate=50)
    await sim.start()
    serve = ServeProcess(
        env=exchange_env(
            sim.port,
            SYMBOLS,
            database_url=clean_db,
            redis_url=redis_url,
            redis_prefix=redis_prefix,
            SMA_SHORT="2",
            SMA_LONG="4",
            BATCH_MAX_DELAY_MS="50",
        ),
        log_path=tmp_path / "serve.log",
    )
    try:
        await serve.start()
        async with httpx.AsyncClient(base_url=serve.base_url, timeout=10) as client:
            for _ in range(100):
                if (await client.get("/signals", params={"limit": 1})).json():
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError("no signal stored within 10 s")
        yield serve
    finally:
        if serve.process is not None:
            await serve.stop()
        await sim.stop()


async def test_no_request_gives_a_server_error(live_service: ServeProcess, tmp_path: Path) -> None:
    command = schemathesis_cli()
    async with httpx.AsyncClient(base_url=live_service.base_url, timeout=10) as client:
        schema = (await client.get("/openapi.json")).json()
    proc = await asyncio.create_subprocess_exec(
        *command,
        "run",
        f"{live_service.base_url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--request-timeout",
        "10",
        # NUL bytes are test_nul_byte_in_symbol_is_a_client_error's; here they would hide the rest.
        "--generation-allow-x00",
        "false",
        "--generation-database",
        "none",
        "--no-color",
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_LIMIT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
    # Every operation of the schema was exercised (a run that tests nothing exits 0 too).
    operations = sum(len(methods) for methods in schema["paths"].values())
    assert operations >= 7
    assert f"Tested: {operations}" in report, report
    assert "generated" in report, report


@pytest.mark.parametrize("route", ["/ticks", "/signals"])
async def test_nul_byte_in_symbol_is_a_client_error(live_service: ServeProcess, route: str) -> None:
    async with httpx.AsyncClient(base_url=live_service.base_url, timeout=10) as client:
        response = await client.get(route, params={"symbol": "btc\x00usdt"})
        health = (await client.get("/health")).json()
    assert health["checks"]["database"] == "ok"
    assert 400 <= response.status_code < 500, response.text
