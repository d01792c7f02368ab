"""Throwaway PostgreSQL and Redis servers of a test's own, which it may stop and start at will.

The shared servers (5432, 6379) must never be stopped: other people test against them. A fault
test starts its private servers here instead, on free loopback ports, and both are torn down (data
directories included) whatever happens. With ``CI=true`` a server that cannot start fails the test;
elsewhere it is skipped with the reason (the `_unavailable` rule of ``tests/conftest.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from depthflow.storage import db
from tests.conftest import _unavailable
from tests.harness.processes import free_port

__all__ = [
    "PrivatePostgres",
    "PrivateRedis",
    "ServiceUnavailable",
    "find_pg_bindir",
    "private_postgres",
    "private_redis",
]

_PG_OS_USER = "postgres"
_START_TIMEOUT_S = 30.0
# initdb refuses to run as root; the cluster then belongs to this OS user.
_AS_ROOT = os.geteuid() == 0


class ServiceUnavailable(RuntimeError):
    """A private server could not be set up on this machine (binary missing, start failed)."""


def find_pg_bindir() -> Path:
    """Directory of the newest ``initdb``/``pg_ctl`` on this machine (Debian layout, else PATH)."""
    versions = sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").is_file()),
        key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)] or [0],
    )
    if versions:
        return versions[-1]
    initdb = shutil.which("initdb")
    if initdb is None:
        raise ServiceUnavailable("no initdb found (/usr/lib/postgresql/*/bin nor PATH)")
    return Path(initdb).parent


async def _run(*argv: str, as_user: str | None = None, wait_s: float = _START_TIMEOUT_S) -> str:
    """Run a command (as `as_user` via runuser when given); its output, or raise on failure."""
    if as_user is not None:
        argv = ("runuser", "-u", as_user, "--", *argv)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), wait_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise ServiceUnavailable(f"{argv!r} did not finish within {wait_s} s") from None
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise ServiceUnavailable(f"{argv!r} exited {proc.returncode}: {text}")
    return text


class PrivatePostgres:
    """A PostgreSQL cluster in a temporary directory, listening on 127.0.0.1:`port` (trust auth).

    `start` runs initdb the first time; `stop` and `start` again keep the data and the port.
    `cleanup` stops it (immediately) and removes the directory.
    """

    def __init__(self, database: str = "depthflow") -> None:
        self.bindir: Path | None = None
        self.port = free_port()
        self.database = database
        self.base = Path(tempfile.mkdtemp(prefix="depthflow-pg-"))
        self.data_dir = self.base / "data"
        self.socket_dir = self.base / "sock"
        self.log_file = self.base / "postgres.log"
        self._user = _PG_OS_USER if _AS_ROOT else None
        self._initialised = False
        self.running = False

    @property
    def url(self) -> str:
        """SQLAlchemy URL of `database` on this cluster."""
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/{self.database}"

    async def start(self) -> None:
        if not self._initialised:
            await self._initdb()
        await _run(
            str(self._bin("pg_ctl")),
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(_START_TIMEOUT_S)),
            "start",
            as_user=self._user,
        )
        self.running = True

    async def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode>``: fast (sessions terminated) or immediate (like a crash)."""
        await _run(
            str(self._bin("pg_ctl")),
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "stop",
            as_user=self._user,
        )
        self.running = False

    async def migrate(self) -> None:
        """Create `database` and bring it to Alembic head (the product's own migration path)."""
        await db.migrate(self.url)

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    async def cleanup(self) -> None:
        try:
            if self.running:
                await self.stop("immediate")
        finally:
            shutil.rmtree(self.base, ignore_errors=True)

    def _bin(self, name: str) -> Path:
        if self.bindir is None:
            self.bindir = find_pg_bindir()
        return self.bindir / name

    async def _initdb(self) -> None:
        if self._user is not None:
            try:
                owner = pwd.getpwnam(self._user)
            except KeyError:
                raise ServiceUnavailable(f"no {self._user!r} OS user to own the cluster") from None
            self.socket_dir.mkdir()
            for path in (self.base, self.socket_dir):
                os.chown(path, owner.pw_uid, owner.pw_gid)
        else:
            self.socket_dir.mkdir()
        await _run(
            str(self._bin("initdb")),
            "-D",
            str(self.data_dir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            as_user=self._user,
            wait_s=120,
        )
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            # Durability is pointless for a throwaway cluster; speed is not.
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "max_connections": "50",
            "shared_buffers": "32MB",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.writelines(f"{key} = {value}\n" for key, value in settings.items())
        self._initialised = True


class PrivateRedis:
    """``redis-server`` on 127.0.0.1:`port`, no persistence but an explicit `stop(save=True)`."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="depthflow-redis-"))
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start on the same port as before and wait until it answers PING."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServiceUnavailable("redis-server is not on PATH")
        log = (self.dir / "redis.log").open("ab")
        try:
            self.process = await asyncio.create_subprocess_exec(
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.dir),
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )
        finally:
            log.close()
        await self._wait_ready()

    async def stop(self, *, save: bool = True) -> None:
        """Shut down: with `save`, like a maintenance restart (SHUTDOWN SAVE: the keys survive the
        next `start`); without, SIGKILL (the keys are gone)."""
        proc = self.process
        if proc is None or proc.returncode is not None:
            return
        if save:
            client = aioredis.from_url(self.url)
            try:
                # redis-py treats the connection dropping as SHUTDOWN's success.
                await client.shutdown(save=True)
            finally:
                await client.aclose()
        else:
            proc.kill()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def cleanup(self) -> None:
        try:
            proc = self.process
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace") if path.exists() else ""

    async def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        client = aioredis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise ServiceUnavailable(f"redis-server exited:\n{self.log_text()}")
                with contextlib.suppress(OSError, aioredis.RedisError):
                    if await client.ping():
                        return
                await asyncio.sleep(0.05)
        finally:
            await client.aclose()
        raise ServiceUnavailable(f"redis-server did not answer PING:\n{self.log_text()}")


@pytest.fixture
async def private_postgres() -> AsyncIterator[PrivatePostgres]:
    """A started, migrated private PostgreSQL cluster; removed afterwards."""
    server = PrivatePostgres()
    try:
        try:
            await server.start()
            await server.migrate()
        except (ServiceUnavailable, OSError, asyncpg.PostgresError) as exc:
            _unavailable("private PostgreSQL", exc)
        yield server
    finally:
        await server.cleanup()


@pytest.fixture
async def private_redis() -> AsyncIterator[PrivateRedis]:
    """A started private redis-server; killed and its directory removed afterwards."""
    server = PrivateRedis()
    try:
        try:
            await server.start()
        except (ServiceUnavailable, OSError) as exc:
            _unavailable("private Redis", exc)
        yield server
    finally:
        await server.cleanup()
