"""Mistakes a user can make, as a user makes them: one line on stderr naming the cause and the fix,
a non-zero exit code, no traceback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from depthflow.storage import db
from tests.conftest import PG_SERVER_URL

# A port nothing listens on: connecting is refused at once.
UNREACHABLE_URL = "postgresql+asyncpg://postgres@127.0.0.1:1/depthflow"


def depthflow(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "depthflow", *args],
        env={**os.environ, "REDIS_URL": "", **env},
        capture_output=True,
        text=True,
        # Generous: a loaded 2-core CI machine imports numba and friends slowly.
        timeout=180,
        check=False,
    )


async def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(depthflow, *args, **env)


def one_line(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """The single stderr line of a failed command; checks the exit code and what it names."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    assert line.startswith("depthflow: "), line
    for needle in needles:
        assert needle in line, line
    return line


def scratch_url() -> str:
    """A database name nobody uses (never created unless a test does)."""
    return PG_SERVER_URL.rsplit("/", 1)[0] + f"/depthflow_scratch_{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def unmigrated_url(database_url: str) -> AsyncIterator[str]:
    """An existing, empty database (`database_url` makes sure the server is there)."""
    url = scratch_url()
    assert await db.ensure_database(url)
    try:
        yield url
    finally:
        await db.drop_database(url)


@pytest.fixture
def corrupt_recording(tmp_path: Path) -> Path:
    path = tmp_path / "corrupt.ndjson"
    path.write_text('\n{"kind":"snapshot","t":1.0,"symbol":"btcusdt","raw":"{}"}\n{"kind": "fr\n')
    return path


# -- settings: exit 2, the variable named ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432", "names no database"),
        ("DATABASE_URL", "postgresql://postgres@127.0.0.1:port/x", "not a URL"),
        ("REDIS_URL", "foo://x", "redis://"),
        ("BINANCE_WS_URL", "https://stream.binance.com", "ws://"),
        ("BINANCE_REST_URL", "api.binance.com", "http://"),
        ("LOG_FORMAT", "xml", "console"),
    ],
)
async def test_a_bad_url_or_format_names_the_variable(name: str, value: str, says: str) -> None:
    one_line(await run("migrate", **{name: value}), 2, f"invalid setting {name}=", says)


# -- migrate -------------------------------------------------------------------------------------


async def test_migrate_with_postgres_unreachable() -> None:
    line = one_line(
        await run("migrate", DATABASE_URL=UNREACHABLE_URL), 1, "127.0.0.1:1", "DATABASE_URL"
    )
    assert "connection refused" in line
    assert "start PostgreSQL" in line


async def test_migrate_with_an_unknown_host() -> None:
    url = "postgresql+asyncpg://postgres@no-such-host.invalid:5432/depthflow"
    one_line(await run("migrate", DATABASE_URL=url), 1, "does not resolve", "DATABASE_URL")


# -- replay --------------------------------------------------------------------------------------


async def test_replay_of_a_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ndjson"
    one_line(await run("replay", str(missing), DATABASE_URL=UNREACHABLE_URL), 2, str(missing))


async def test_replay_into_a_database_that_does_not_exist(
    database_url: str, corrupt_recording: Path
) -> None:
    url = scratch_url()
    line = one_line(await run("replay", str(corrupt_recording), DATABASE_URL=url), 1)
    assert "does not exist" in line
    assert "depthflow migrate" in line


async def test_replay_with_postgres_unreachable(corrupt_recording: Path) -> None:
    one_line(
        await run("replay", str(corrupt_recording), DATABASE_URL=UNREACHABLE_URL),
        1,
        "cannot reach PostgreSQL at 127.0.0.1:1",
    )


async def test_replay_into_an_unmigrated_database(
    unmigrated_url: str, corrupt_recording: Path
) -> None:
    line = one_line(await run("replay", str(corrupt_recording), DATABASE_URL=unmigrated_url), 1)
    assert "is not migrated (at rev none, head " in line
    assert "depthflow migrate" in line


async def test_replay_of_a_corrupt_recording_names_the_line(
    clean_db: str, corrupt_recording: Path
) -> None:
    line = one_line(await run("replay", str(corrupt_recording), DATABASE_URL=clean_db), 1)
    assert f"{corrupt_recording}:3:" in line
    assert "bad recording line" in line


# -- serve ---------------------------------------------------------------------------------------


async def test_serve_refuses_an_unmigrated_database(unmigrated_url: str) -> None:
    line = one_line(
        await run("serve", "--port", "1", DATABASE_URL=unmigrated_url),
        1,
        f"database {unmigrated_url.rsplit('/', 1)[1]!r} is not migrated",
    )
    assert f"head {db.head_revision()}" in line
    assert "run `depthflow migrate`" in line


async def test_serve_refuses_a_database_that_does_not_exist(database_url: str) -> None:
    line = one_line(await run("serve", "--port", "1", DATABASE_URL=scratch_url()), 1)
    assert "does not exist" in line
    assert "depthflow migrate" in line


async def test_serve_refuses_a_database_at_an_unknown_revision(unmigrated_url: str) -> None:
    conn = await asyncpg.connect(db.asyncpg_dsn(unmigrated_url))
    try:
        await conn.execute("CREATE TABLE alembic_version (version_num varchar(32) PRIMARY KEY)")
        await conn.execute("INSERT INTO alembic_version VALUES ('9999_from_the_future')")
    finally:
        await conn.close()
    one_line(
        await run("serve", "--port", "1", DATABASE_URL=unmigrated_url),
        1,
        "9999_from_the_future",
        "upgrade depthflow",
    )
