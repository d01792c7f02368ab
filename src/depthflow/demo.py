"""`depthflow demo`: a first look on a machine with only Python.

One process runs everything, in one event loop: an embedded PostgreSQL (`EmbeddedPostgres`, a
child process), the counters in the process (no Redis), the simulator (a stand-in for Binance on a
free loopback port) and the service with its HTTP API and dashboard. SIGINT (Ctrl-C), SIGTERM and
SIGHUP stop it in order: the service (its last rows flushed), the simulator, then PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from depthflow.api import create_app
from depthflow.config import Settings, load_settings
from depthflow.embedded_postgres import (
    Account,
    EmbeddedPostgres,
    pgserver_site,
    reachable_by,
    server_account,
)
from depthflow.errors import UserError
from depthflow.simulate.server import Simulator
from depthflow.storage import db

__all__ = ["DemoOptions", "data_dir", "run_demo"]

log = logging.getLogger("depthflow.demo")

# Root's home is usually 0700, out of reach of the account the server then runs as: root's demo
# cluster lives here instead (FHS: state of programs run by root).
_ROOT_DATA_DIR = Path("/var/lib/depthflow/demo-pg")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_SHUTDOWN_GRACE_S = 10


@dataclass(frozen=True)
class DemoOptions:
    """What `depthflow demo` was asked for."""

    port: int
    symbols: Sequence[str]
    rate: float
    data_dir: Path | None = None  # None: `data_dir` of the environment
    host: str = "127.0.0.1"


def data_dir(environ: Mapping[str, str]) -> Path:
    """Where the demo keeps its cluster by default: ``$XDG_DATA_HOME/depthflow/demo-pg``, else
    ``~/.local/share/depthflow/demo-pg``."""
    xdg = environ.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        share = Path(xdg)
    else:
        share = Path(environ.get("HOME") or Path.home()) / ".local" / "share"
    return share / "depthflow" / "demo-pg"


async def run_demo(options: DemoOptions, environ: Mapping[str, str]) -> int:
    """Run the demo until a stop signal; 0 after a clean stop, else the failure's exit code.

    Settings the demo does not choose itself (SMA windows, batch sizes, ...) come from the
    environment as usual. Set-up problems raise a one-line `UserError` (pgserver missing, the port
    taken, a directory refused, PostgreSQL failing to start) or `SettingsError`.
    """
    site = pgserver_site()
    _check_port(options.host, options.port)
    account = server_account()
    postgres = EmbeddedPostgres(_cluster_dir(options, environ, account), site, account)
    simulator = Simulator(options.symbols, rate=options.rate)
    stopper = _Stopper()
    with stopper.installed():
        try:
            return await _run(options, postgres, simulator, stopper)
        except asyncio.CancelledError:
            if stopper.signalled is None:
                raise
            _uncancel()
            return 0
        finally:
            await simulator.stop()
            await postgres.stop()


def _check_port(host: str, port: int) -> None:
    """Fail before the slow part when the HTTP port is taken (uvicorn would, after it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As asyncio's server does: a port whose last connections linger in TIME_WAIT is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(
                f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port"
            ) from None


def _cluster_dir(options: DemoOptions, environ: Mapping[str, str], account: Account) -> Path:
    if options.data_dir is not None:
        chosen = options.data_dir.absolute()
    else:
        chosen = data_dir(environ)
        if not account.is_current and not reachable_by(chosen, account):
            chosen = _ROOT_DATA_DIR
    if not account.is_current:
        # The one line that says the server does not run as the user who started the demo.
        log.info(
            "embedded_postgres_unprivileged",
            extra={
                "fields": {
                    "user": account.name,
                    "dir": str(chosen),
                    "why": "PostgreSQL refuses to run as root; the directory is that user's, 0700",
                }
            },
        )
    return chosen


async def _run(
    options: DemoOptions, postgres: EmbeddedPostgres, simulator: Simulator, stopper: _Stopper
) -> int:
    sim_port = await simulator.start("127.0.0.1", 0)
    settings = _settings(options, postgres.url, f"127.0.0.1:{sim_port}")
    await postgres.start()
    await db.migrate(postgres.url)
    app = create_app(settings, owns_process=True)
    server = _Server(
        uvicorn.Config(
            app,
            host=options.host,
            port=options.port,
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=_SHUTDOWN_GRACE_S,
        )
    )
    stopper.server = server
    try:
        await server.serve()
    except SystemExit as exc:  # uvicorn's way of reporting a failed start-up (port taken...)
        return exc.code if isinstance(exc.code, int) else 1
    service = getattr(app.state, "service", None)
    return 1 if service is not None and service.fatal is not None else 0


def _settings(options: DemoOptions, database_url: str, exchange: str) -> Settings:
    """The environment's settings, with the demo's database, exchange and no Redis."""
    return load_settings(
        database_url=database_url,
        redis_url="",
        symbols=tuple(options.symbols),
        binance_ws_url=f"ws://{exchange}",
        binance_rest_url=f"http://{exchange}",
    )


class _Server(uvicorn.Server):
    """uvicorn's server, without its own signal handlers (the demo's `_Stopper` owns them, so that
    PostgreSQL stops after the server, not before), announcing the dashboard once it listens."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        url = f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"
        log.info("demo_ready", extra={"fields": {"dashboard": url}})
        print(f"\ndepthflow demo: open {url} (Ctrl-C to stop)\n", file=sys.stderr, flush=True)


class _Stopper:
    """Stop signals: before the server runs, cancel the start-up (the caller cleans up); then
    ask the server to shut down (a second signal: at once)."""

    def __init__(self) -> None:
        self.server: uvicorn.Server | None = None
        self.signalled: signal.Signals | None = None
        self._task: asyncio.Task[object] | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        for sig in _STOP_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            yield
        finally:
            for sig in _STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        first = self.signalled is None
        self.signalled = self.signalled or sig
        log.info("demo_stopping", extra={"fields": {"signal": sig.name}})
        if self.server is not None:
            self.server.force_exit = self.server.should_exit
            self.server.should_exit = True
        elif first and self._task is not None:
            self._task.cancel()


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
