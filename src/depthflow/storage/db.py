"""Engine construction, database creation and Alembic migrations.

The URL is always passed in (from `Settings.database_url`); nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

__all__ = [
    "alembic_config",
    "asyncpg_dsn",
    "downgrade",
    "drop_database",
    "ensure_database",
    "head_revision",
    "make_engine",
    "migrate",
    "upgrade",
]

# src/depthflow/storage/db.py -> the repository root (editable install / checkout).
_REPO_ROOT = Path(__file__).resolve().parents[3]
_MAINTENANCE_DB = "postgres"
# Fail fast when the server is away instead of asyncpg's 60 s default; the writer retries anyway.
_CONNECT_TIMEOUT_S = 10.0


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy) -> ``postgresql://...`` (raw asyncpg)."""
    return _render(make_url(url).set(drivername="postgresql"))


def make_engine(
    url: str,
    *,
    pool_size: int = 5,
    pre_ping: bool = True,
    statement_timeout_ms: int | None = None,
    pool_timeout_s: float | None = None,
) -> AsyncEngine:
    """An asyncpg-backed engine; pooled connections are checked before use unless `pre_ping`
    is off (the writer's: it invalidates a failed connection itself and saves the round trip).

    `statement_timeout_ms` makes the server cancel any statement (lock waits included) running
    longer on this engine's connections (the API's; never the writer's, whose COPYs must finish).
    `pool_timeout_s` bounds the wait for a free pooled connection: by default as long as the
    statement timeout when there is one (a drained pool then fails as fast as a slow query),
    else SQLAlchemy's 30 s.
    """
    connect_args: dict[str, object] = {"timeout": _CONNECT_TIMEOUT_S}
    if statement_timeout_ms is not None:
        connect_args["server_settings"] = {"statement_timeout": str(statement_timeout_ms)}
    if pool_timeout_s is None:
        pool_timeout_s = statement_timeout_ms / 1000 if statement_timeout_ms is not None else 30.0
    return create_async_engine(
        url,
        pool_size=pool_size,
        pool_pre_ping=pre_ping,
        pool_timeout=pool_timeout_s,
        connect_args=connect_args,
    )


def quote_ident(name: str) -> str:
    """A PostgreSQL identifier quoted for any name (database names come from user URLs)."""
    return '"' + name.replace('"', '""') + '"'


async def ensure_database(url: str) -> bool:
    """Create the database named in ``url`` if it is missing; True if this call created it."""
    name = _database_name(url)
    conn = await _connect_maintenance(url)
    try:
        exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name)
        if exists:
            return False
        try:
            await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
        except asyncpg.DuplicateDatabaseError:
            # Another process (a second replica migrating) won the race: the database exists.
            return False
        return True
    finally:
        await conn.close()


async def drop_database(url: str) -> None:
    """Drop the database named in ``url`` (if it exists), disconnecting its sessions."""
    name = _database_name(url)
    conn = await _connect_maintenance(url)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
    finally:
        await conn.close()


def alembic_config(url: str) -> Config:
    """Alembic config for ``url``: ``alembic.ini`` from the CWD, else from the repository root."""
    for candidate in (Path.cwd() / "alembic.ini", _REPO_ROOT / "alembic.ini"):
        if candidate.is_file():
            break
    else:
        raise FileNotFoundError(
            f"alembic.ini not found in {Path.cwd()} or {_REPO_ROOT}; run from the project root"
        )
    config = Config(str(candidate))
    # ConfigParser interpolation would treat a '%' of a URL-encoded password as a reference.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # Keep the application's logging; env.py applies alembic.ini's [loggers] only for the CLI.
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str:
    """The newest migration's revision id."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(alembic_config("postgresql://unused/x")).get_current_head()
    assert head is not None, "no migrations found"
    return head


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate ``url`` up to ``revision`` (blocking; env.py runs its own event loop)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate ``url`` down to ``revision`` (blocking)."""
    command.downgrade(alembic_config(url), revision)


async def migrate(url: str) -> None:
    """Create the database if missing, then upgrade it to head."""
    await ensure_database(url)
    # env.py calls asyncio.run(), which cannot nest inside the caller's running loop.
    await asyncio.to_thread(upgrade, url)


def _database_name(url: str) -> str:
    name = make_url(url).database
    if not name:
        raise ValueError("the database URL names no database")
    return name


async def _connect_maintenance(url: str) -> asyncpg.Connection:
    server = make_url(url).set(drivername="postgresql", database=_MAINTENANCE_DB)
    return await asyncpg.connect(_render(server), timeout=_CONNECT_TIMEOUT_S)


def _render(url: URL) -> str:
    return url.render_as_string(hide_password=False)
