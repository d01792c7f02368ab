"""Engine construction, database creation and Alembic migrations.

The URL is always passed in (from `Settings.database_url`); nothing here reads the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from depthflow.errors import DependencyUnreachable, UserError
from depthflow.storage.partitions import create_ahead

__all__ = [
    "alembic_config",
    "asyncpg_dsn",
    "check_migrated",
    "database_error",
    "downgrade",
    "drop_database",
    "ensure_database",
    "explain_errors",
    "head_revision",
    "make_engine",
    "migrate",
    "migrations_dir",
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


def migrations_dir() -> Path:
    """The package's own migrations: ``depthflow/migrations`` of an installed wheel, else the
    repository's ``alembic/`` (an editable install or a checkout). Never the working directory's:
    another project's ``alembic.ini`` there must not decide depthflow's schema."""
    packaged = Path(__file__).resolve().parents[1] / "migrations"
    for candidate in (packaged, _REPO_ROOT / "alembic"):
        if (candidate / "env.py").is_file():
            return candidate
    raise FileNotFoundError(f"depthflow's migrations are missing (looked in {packaged})")


def alembic_config(url: str) -> Config:
    """Alembic config for ``url`` over the package's migrations (no ``alembic.ini`` needed)."""
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("path_separator", "os")
    # ConfigParser interpolation would treat a '%' of a URL-encoded password as a reference.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    # Keep the application's logging; env.py applies alembic.ini's [loggers] only for the CLI.
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str:
    """The newest migration's revision id."""
    head = _scripts().get_current_head()
    assert head is not None, "no migrations found"
    return head


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config("postgresql://unused/x"))


async def check_migrated(url: str) -> str | None:
    """Make sure the database of ``url`` exists, answers and is at the head revision of the
    package's migrations; raise a `UserError` saying what to do otherwise
    (`DependencyUnreachable` when the server cannot be reached). The database's revision, or
    None when the migrations cannot be found (``alembic.ini`` missing: not compared)."""
    with explain_errors(url):
        conn = await asyncpg.connect(asyncpg_dsn(url), timeout=_CONNECT_TIMEOUT_S)
        try:
            try:
                current: str | None = await conn.fetchval("SELECT version_num FROM alembic_version")
            except asyncpg.UndefinedTableError:
                current = None
        finally:
            await conn.close()
    try:
        scripts = _scripts()
    except FileNotFoundError:
        return None
    head = scripts.get_current_head()
    if current == head:
        return current
    name = _database_name(url)
    if current is not None:
        try:
            known = scripts.get_revision(current) is not None
        except CommandError:
            known = False
        if not known:
            raise UserError(
                f"database {name!r} is at revision {current}, which this depthflow does not know "
                f"(its head is {head}): upgrade depthflow, or point DATABASE_URL elsewhere"
            )
    raise UserError(
        f"database {name!r} is not migrated (at rev {current or 'none'}, head {head}): "
        "run `depthflow migrate`"
    )


# What a connection or a statement raises when the server is away or refuses (SQLAlchemy wraps
# the driver's errors in DBAPIError).
_DATABASE_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    DBAPIError,
)


@contextlib.contextmanager
def explain_errors(url: str) -> Iterator[None]:
    """Turn a failure to reach or use the database of ``url`` into `database_error`'s one line."""
    try:
        yield
    except _DATABASE_ERRORS as exc:
        raise database_error(url, exc) from exc


def database_error(url: str, exc: BaseException) -> UserError:
    """One line naming what went wrong with the database of ``url`` and what to do about it."""
    parsed = make_url(url)
    server = f"{parsed.host or 'localhost'}:{parsed.port or 5432}"
    name = parsed.database
    cause = _root_cause(exc)
    reach = f"cannot reach PostgreSQL at {server} (DATABASE_URL)"
    if isinstance(cause, socket.gaierror):
        return DependencyUnreachable(
            f"{reach}: host {parsed.host!r} does not resolve: fix the host in DATABASE_URL"
        )
    if isinstance(cause, TimeoutError):
        return DependencyUnreachable(
            f"{reach}: no answer within {_CONNECT_TIMEOUT_S:g} s: check that PostgreSQL runs "
            "there and that no firewall is in the way"
        )
    if isinstance(cause, ConnectionRefusedError):
        return DependencyUnreachable(
            f"{reach}: connection refused (is it running, on that port?): start PostgreSQL or "
            "fix DATABASE_URL"
        )
    if isinstance(cause, OSError):
        reason = (cause.strerror or str(cause)).lower()
        return DependencyUnreachable(f"{reach}: {reason}: start PostgreSQL or fix DATABASE_URL")
    if isinstance(cause, asyncpg.CannotConnectNowError):
        return DependencyUnreachable(f"{reach}: {cause}: try again once it has started")
    if isinstance(cause, asyncpg.InvalidCatalogNameError):
        return UserError(
            f"database {name!r} does not exist on {server}: run `depthflow migrate` (it creates it)"
        )
    if isinstance(
        cause, asyncpg.InvalidPasswordError | asyncpg.InvalidAuthorizationSpecificationError
    ):
        return UserError(
            f"PostgreSQL at {server} refused user {parsed.username!r}: {cause}: "
            "fix the user or password in DATABASE_URL"
        )
    if isinstance(cause, asyncpg.InsufficientPrivilegeError):
        return UserError(
            f"PostgreSQL at {server}: {cause}: use a user with that privilege in DATABASE_URL, "
            f"or create database {name!r} yourself"
        )
    return UserError(f"PostgreSQL at {server}, database {name!r}: {cause}")


def _root_cause(exc: BaseException) -> BaseException:
    """The driver's own exception under SQLAlchemy's wrappers (``DBAPIError.orig`` and what it
    was raised from), else ``exc`` itself."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError | TimeoutError | asyncpg.PostgresError):
            return current
        seen.add(id(current))
        orig = current.orig if isinstance(current, DBAPIError) else None
        current = current.__cause__ or orig
    return exc


def upgrade(url: str, revision: str = "head", *, partition_days: int = 1) -> None:
    """Migrate ``url`` up to ``revision`` (blocking; env.py runs its own event loop)."""
    config = alembic_config(url)
    config.attributes["partition_days"] = partition_days
    command.upgrade(config, revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Migrate ``url`` down to ``revision`` (blocking)."""
    command.downgrade(alembic_config(url), revision)


async def migrate(url: str, *, partition_days: int = 1) -> None:
    """Create the database if missing, upgrade it to head, then create the time partitions of
    today and the next days (the service keeps creating them ahead while it runs)."""
    await ensure_database(url)
    # env.py calls asyncio.run(), which cannot nest inside the caller's running loop.
    await asyncio.to_thread(partial(upgrade, url, partition_days=partition_days))
    conn = await asyncpg.connect(asyncpg_dsn(url), timeout=_CONNECT_TIMEOUT_S)
    try:
        await create_ahead(conn, partition_days)
    finally:
        await conn.close()


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
