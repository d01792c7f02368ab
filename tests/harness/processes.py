"""`depthflow serve` and `depthflow simulate` as real subprocesses, for tests and benchmarks.

Each child writes stdout and stderr to one log file; `Child.stop` sends SIGTERM (what Docker and
systemd send), waits, then kills. `stop` may be called any number of times (also after the process
died or was killed); a child is also an async context manager that starts and stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import httpx
import psutil

__all__ = [
    "REPO_ROOT",
    "Child",
    "ServeProcess",
    "SimulatorProcess",
    "events_named",
    "exchange_env",
    "free_port",
    "log_lines",
]

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def exchange_env(
    sim_port: int,
    symbols: Sequence[str],
    *,
    database_url: str,
    redis_url: str,
    redis_prefix: str,
    **extra: str,
) -> dict[str, str]:
    """What a user sets to run depthflow against a simulator listening on `sim_port`."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": redis_prefix,
        "SYMBOLS": ",".join(symbols),
        "BINANCE_WS_URL": f"ws://127.0.0.1:{sim_port}",
        "BINANCE_REST_URL": f"http://127.0.0.1:{sim_port}",
        **extra,
    }


class Child:
    """One subprocess (run from the repository root) with stdout+stderr in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], log_path: Path):
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        if self.process is not None:
            raise RuntimeError(f"{self.name} was started already")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self.process = await asyncio.create_subprocess_exec(
            *self.argv,
            env={**os.environ, **self.env},
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
        )

    async def stop(self, wait_s: float = 60.0) -> int:
        """SIGTERM and wait for the exit (SIGKILL after ``wait_s``); the exit code.

        Idempotent: a process that already exited (or was killed) just has its code returned."""
        process = self.process
        if process is None:
            raise RuntimeError(f"{self.name} was never started")
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), wait_s)
            except TimeoutError:
                process.kill()
                await process.wait()
        else:
            await process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        code = process.returncode
        assert code is not None
        return code

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.process is not None:
            await self.stop()

    # -- reading it ----------------------------------------------------------------------------

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def cpu_seconds(self) -> float:
        """User + system CPU seconds the process has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        """Resident set size now."""
        return int(psutil.Process(self.pid).memory_info().rss)

    def peak_rss_bytes(self) -> int:
        """VmHWM (peak resident set size) of the process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("VmHWM not found in /proc status")

    async def wait_http(
        self, url: str, wait_s: float, ok: Callable[[int], bool] = lambda status: status == 200
    ) -> None:
        """Poll ``url`` until its status satisfies ``ok``; fail early if the process exits."""
        deadline = time.monotonic() + wait_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.name} exited early:\n{self.tail(40)}")
                with contextlib.suppress(httpx.TransportError):
                    if ok((await client.get(url)).status_code):
                        return
                await asyncio.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer {url} within {wait_s} s:\n{self.tail(40)}")


class ServeProcess(Child):
    """`python -m depthflow serve` with ``env`` on ``port`` (a free one by default)."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, port: int | None = None):
        self.port = port if port is not None else free_port()
        argv = [sys.executable, "-m", "depthflow", "serve", "--port", str(self.port)]
        super().__init__("serve", argv, env, log_path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, wait_s: float = 60.0) -> None:
        """Start it and return once ``/health`` answers 200."""
        await self.spawn()
        await self.wait_healthy(wait_s)

    async def spawn(self) -> None:
        """Start the process and return at once (`wait_healthy` then waits for it)."""
        await super().start()

    async def wait_healthy(self, wait_s: float = 60.0) -> None:
        await self.wait_http(f"{self.base_url}/health", wait_s)


class SimulatorProcess(Child):
    """`python -m depthflow simulate` on a free port with ``args`` (``--symbols``, ``--rate``,
    ``--prebuild``, ``--replay``, ...); `start` returns once it answers HTTP, so prebuilt
    frames or a recording are ready (they wait for the first websocket subscriber)."""

    def __init__(
        self, args: Sequence[str], log_path: Path, *, env: Mapping[str, str] | None = None
    ):
        self.port = free_port()
        argv = [sys.executable, "-m", "depthflow", "simulate", "--port", str(self.port), *args]
        super().__init__("simulate", argv, {"LOG_LEVEL": "WARNING", **(env or {})}, log_path)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, wait_s: float = 180.0) -> None:
        await super().start()
        # An unknown path: 404, no REST weight used and no market advanced.
        await self.wait_http(f"{self.rest_url}/probe", wait_s, lambda status: status == 404)


def log_lines(child: Child) -> list[dict[str, Any]]:
    """Every JSON log line the process printed so far."""
    return [json.loads(line) for line in child.log_text().splitlines() if line.startswith("{")]


def events_named(child: Child, event: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(child) if line.get("event") == event]
