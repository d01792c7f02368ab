"""A private PostgreSQL server for `depthflow demo`, from the binaries of the `pgserver` wheel.

Only the wheel's files are used (``pgserver/pginstall`` and the ``pgserver.libs`` its tools link
against), driven by the small code here: its Python wrapper, when run as root, creates a system
user and widens the permissions of the directories above its data. Here nothing outside the
server's own directory is created or changed:

- the cluster lives in one directory of the account running the server (mode 0700): the data,
  the Unix socket (no TCP port is opened) and the log;
- PostgreSQL refuses to run as root, so as root the server runs as ``nobody`` (its privileges are
  dropped in the child only) and the binaries it needs are copied once into that directory, since
  ``nobody`` usually cannot reach them (``/root`` is 0700 and a venv often lives under it);
- the postmaster is a child of this process in its own process group (a terminal's Ctrl-C must not
  stop the database before the service's last flush), and on Linux it gets SIGINT (fast shutdown)
  should this process die without stopping it.
"""

from __future__ import annotations

import asyncio
import ctypes
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy.engine import URL

from depthflow.errors import EXIT_USAGE, UserError

__all__ = [
    "Account",
    "EmbeddedPostgres",
    "EmbeddedPostgresError",
    "PgserverMissing",
    "pgserver_site",
    "server_account",
]

log = logging.getLogger("depthflow.embedded_postgres")

_UNPRIVILEGED_USER = "nobody"
_DATABASE = "depthflow"
_SUPERUSER = "postgres"
_START_TIMEOUT_S = 120.0  # a cold initdb on a loaded 2-core machine takes a few seconds
# Fast shutdown first; immediate (crash-like, recovered at the next start) if it hangs.
_STOP_STEPS = ((signal.SIGINT, 30.0), (signal.SIGQUIT, 10.0), (signal.SIGKILL, 10.0))
# The Unix socket's path must fit sockaddr_un.sun_path (108 bytes on Linux).
_MAX_SOCKET_PATH = 100
# What the server needs of the wheel's pginstall tree (18 MB of its 34 MB).
_NEEDED = ("bin/initdb", "bin/postgres", "lib/postgresql", "share")
_PR_SET_PDEATHSIG = 1


class PgserverMissing(UserError):
    """The optional `pgserver` package (the PostgreSQL binaries) is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "demo needs the pgserver package (an embedded PostgreSQL): "
            "pip install 'depthflow[demo]'",
            exit_code=EXIT_USAGE,
        )


class EmbeddedPostgresError(UserError):
    """The embedded server could not be set up or started; the message says why and what to do."""


@dataclass(frozen=True)
class Account:
    """The OS account that owns the cluster and runs its processes."""

    name: str
    uid: int
    gid: int

    @property
    def is_current(self) -> bool:
        return self.uid == os.geteuid()


def server_account() -> Account:
    """This process's own account, or `nobody` when running as root."""
    entry = pwd.getpwuid(os.geteuid())
    if entry.pw_uid == 0:
        try:
            entry = pwd.getpwnam(_UNPRIVILEGED_USER)
        except KeyError:
            raise EmbeddedPostgresError(
                f"PostgreSQL refuses to run as root and there is no {_UNPRIVILEGED_USER!r} account"
                "; run depthflow demo as an ordinary user"
            ) from None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def pgserver_site() -> Path:
    """The directory holding the installed ``pgserver`` package (not imported: it has import-time
    side effects, and only its files are needed)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PgserverMissing
    return Path(next(iter(spec.submodule_search_locations))).parent


def reachable_by(path: Path, account: Account) -> bool:
    """Whether `account` may search `path` and each existing directory above it (mode bits;
    extra groups are dropped for the server, so only its primary group counts)."""
    for directory in (path, *path.parents):
        try:
            info = directory.stat()
        except FileNotFoundError:
            continue
        if info.st_uid == account.uid:
            bit = stat.S_IXUSR
        elif info.st_gid == account.gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not info.st_mode & bit:
            return False
    return True


class EmbeddedPostgres:
    """A PostgreSQL 16 cluster in `base` (created on the first start, reused afterwards), run by
    `account`, reachable over a Unix socket only; `url` names its ``depthflow`` database."""

    def __init__(self, base: Path, site: Path, account: Account) -> None:
        self.base = base
        self.account = account
        self.data_dir = base / "data"
        self.socket_dir = base / "run"
        self.log_path = base / "postgres.log"
        self._site = site
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the ``depthflow`` database over the private socket, no password."""
        url = URL.create(
            "postgresql+asyncpg",
            username=_SUPERUSER,
            database=_DATABASE,
            query={"host": str(self.socket_dir)},
        )
        return url.render_as_string(hide_password=False)

    async def start(self) -> bool:
        """Start the server (initialising the cluster first if needed) and wait until it accepts
        connections; True when the cluster was created by this call. Cancellable."""
        started = time.monotonic()
        bindir = await asyncio.to_thread(self._prepare)
        created = not (self.data_dir / "PG_VERSION").is_file()
        if created:
            await self._initdb(bindir)
        await self._spawn(bindir)
        await self._wait_ready()
        log.info(
            "embedded_postgres_started",
            extra={
                "fields": {
                    "dir": str(self.base),
                    "created": created,
                    "seconds": round(time.monotonic() - started, 3),
                }
            },
        )
        return created

    async def stop(self) -> None:
        """Stop the server: fast shutdown, escalating if it does not finish in time."""
        process = self._process
        if process is None or process.returncode is not None:
            return
        for sig, wait_s in _STOP_STEPS:
            process.send_signal(sig)
            try:
                await asyncio.wait_for(process.wait(), wait_s)
                break
            except TimeoutError:
                log.warning("embedded_postgres_slow_stop", extra={"fields": {"signal": sig.name}})
        log.info("embedded_postgres_stopped", extra={"fields": {"code": process.returncode}})

    # -- setting up ---------------------------------------------------------------------------

    def _prepare(self) -> Path:
        """Create the private directories; the directory of the binaries the server runs."""
        if len(str(self.socket_dir)) > _MAX_SOCKET_PATH:
            raise EmbeddedPostgresError(
                f"{self.base} is too deep for a Unix socket path; choose a shorter --data-dir"
            )
        self.base.parent.mkdir(parents=True, exist_ok=True)
        for directory in (self.base, self.socket_dir):
            _private_dir(directory, self.account)
        if not reachable_by(self.base, self.account):
            raise EmbeddedPostgresError(
                f"{self.account.name} cannot reach {self.base} (a directory above it is not "
                "searchable); choose another --data-dir"
            )
        site = self._site if self.account.is_current else _copy_binaries(self._site, self.base)
        return site / "pgserver" / "pginstall" / "bin"

    async def _initdb(self, bindir: Path) -> None:
        # Into a temporary name, renamed once complete: an interrupted initdb leaves no cluster
        # that looks usable.
        partial = self.data_dir.with_name("data.partial")
        await asyncio.to_thread(shutil.rmtree, partial, ignore_errors=True)
        argv = [
            str(bindir / "initdb"),
            *("-D", str(partial), "-U", _SUPERUSER, "-A", "trust", "-E", "UTF8"),
            *("--locale=C", "--no-instructions"),
        ]
        process = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            **self._child_options(),
        )
        try:
            out, _ = await process.communicate()
        except asyncio.CancelledError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb exited {process.returncode}: {out.decode(errors='replace').strip()}"
            )
        partial.rename(self.data_dir)

    async def _spawn(self, bindir: Path) -> None:
        argv = [
            str(bindir / "postgres"),
            *("-D", str(self.data_dir), "-k", str(self.socket_dir)),
            # The socket in the private directory is the only way in.
            *("-c", "listen_addresses="),
            # Demo data: a crash may lose the last few commits, never consistency.
            *("-c", "synchronous_commit=off"),
        ]
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=fd,
                stderr=fd,
                process_group=0,
                preexec_fn=_stop_with_parent(),
                **self._child_options(),
            )
        finally:
            os.close(fd)

    def _child_options(self) -> dict[str, Any]:
        """Environment and, as root, the unprivileged account of the server's processes."""
        options: dict[str, Any] = {"env": {"PATH": os.defpath, "LC_ALL": "C"}}
        if not self.account.is_current:
            options.update(user=self.account.uid, group=self.account.gid, extra_groups=[])
        return options

    async def _wait_ready(self) -> None:
        process = self._process
        assert process is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.returncode is not None:
                raise EmbeddedPostgresError(
                    f"PostgreSQL exited {process.returncode} while starting: {self._last_error()}"
                    f" (log: {self.log_path})"
                )
            try:
                conn = await asyncpg.connect(
                    host=str(self.socket_dir), user=_SUPERUSER, database="postgres", timeout=5
                )
            except (OSError, TimeoutError, asyncpg.PostgresError):
                await asyncio.sleep(0.1)
                continue
            await conn.close()
            self._check_ours(process.pid)
            return
        raise EmbeddedPostgresError(
            f"PostgreSQL did not accept connections within {_START_TIMEOUT_S:.0f} s "
            f"(log: {self.log_path})"
        )

    def _check_ours(self, pid: int) -> None:
        """Raise unless the server that answered is the one this process started: a second demo
        on the same directory reaches the first one's socket while its own server gives up."""
        try:
            owner = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0].strip()
        except OSError:
            owner = ""
        if owner != str(pid):
            raise EmbeddedPostgresError(
                f"another PostgreSQL (pid {owner or '?'}) already runs on {self.data_dir}: is "
                "another depthflow demo running? Stop it, or choose another --data-dir"
            )

    def _last_error(self) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "no log"
        errors = [line for line in lines if "FATAL" in line or "ERROR" in line]
        return (errors or lines or ["empty log"])[-1].strip()


def _private_dir(path: Path, account: Account) -> None:
    """Create `path` as `account`'s, mode 0700, or check that it already is."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        info = path.stat()
        if info.st_uid != account.uid or info.st_mode & 0o077 or not stat.S_ISDIR(info.st_mode):
            raise EmbeddedPostgresError(
                f"{path} exists but is not a private directory of {account.name} (owner uid "
                f"{info.st_uid}, mode {stat.S_IMODE(info.st_mode):o}); remove it or choose "
                "another --data-dir"
            ) from None
        return
    path.chmod(0o700)  # mkdir's mode is filtered by the umask; this is our own new directory
    if not account.is_current:
        os.chown(path, account.uid, account.gid)


def _copy_binaries(site: Path, base: Path) -> Path:
    """The `_NEEDED` parts of the wheel, copied once per pgserver version into `base` (root-owned,
    read-only to the server's account), laid out as in site-packages so the tools' RPATH
    (``$ORIGIN/../../../pgserver.libs``) still finds their libraries. Measured: 0.13 s, 18 MB."""
    version = importlib.metadata.version("pgserver")
    target = base / f"pgserver-{version}"
    if target.is_dir():
        return target
    partial = base / f"pgserver-{version}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    source = site / "pgserver" / "pginstall"
    copy = partial / "pgserver" / "pginstall"
    for part in _NEEDED:
        if (source / part).is_dir():
            shutil.copytree(source / part, copy / part, symlinks=True)
        else:
            (copy / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / part, copy / part)
    if (site / "pgserver.libs").is_dir():
        shutil.copytree(site / "pgserver.libs", partial / "pgserver.libs", symlinks=True)
    partial.rename(target)
    for old in base.glob("pgserver-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _stop_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has the kernel send the child SIGINT when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        # Runs in the child after its privileges are dropped (a uid change would clear it).
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGINT))
        if os.getppid() != parent:  # the parent died before the request took effect
            os._exit(1)

    return arm
