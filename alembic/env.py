"""Alembic environment: async migrations over asyncpg.

The URL comes from the config's ``sqlalchemy.url`` (set by `depthflow.storage.db.alembic_config`);
when it is unset (a plain ``alembic upgrade head``) it falls back to the application's settings.
"""

from __future__ import annotations

import asyncio
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from depthflow.storage.models import Base
from depthflow.storage.partitions import is_partition

config = context.config
target_metadata = Base.metadata

if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from depthflow.config import load_settings

    return load_settings().database_url


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Autogenerate compares the parents only: a time partition is data, not schema."""
    return not (type_ == "table" and name is not None and is_partition(name))


def run_migrations_offline() -> None:
    """Emit the SQL to stdout (``alembic upgrade head --sql``) without connecting."""
    context.configure(
        url=database_url(),
        target_metadata=target_metadata,
        include_name=include_name,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def do_run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection, target_metadata=target_metadata, include_name=include_name
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    # NullPool: a one-shot process (or worker thread) must not leave pooled connections behind.
    engine = create_async_engine(database_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(do_run_migrations)
    finally:
        await engine.dispose()


def run_migrations_online() -> None:
    asyncio.run(run_async_migrations())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
