"""Run `depthflow serve` as a real subprocess for end-to-end tests."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families


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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServeProcess:
    """`python -m depthflow serve` with the given environment; stdout kept in a file."""

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: asyncio.subprocess.Process | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, wait_s: float = 60.0) -> None:
        env = {**os.environ, **self.env}
        self._log = self.log_path.open("wb")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "depthflow",
            "serve",
            "--port",
            str(self.port),
            env=env,
            stdout=self._log,
            stderr=asyncio.subprocess.STDOUT,
        )
        deadline = time.monotonic() + wait_s
        async with httpx.AsyncClient(base_url=self.base_url) as client:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise RuntimeError(f"serve exited early:\n{self.log_path.read_text()}")
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"serve did not answer /health:\n{self.log_path.read_text()}")

    async def stop(self, wait_s: float = 60.0) -> int:
        """SIGTERM (what Docker and systemd send) and wait for a clean exit."""
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), wait_s)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        self._log.close()
        code = self.process.returncode
        assert code is not None
        return code

    def log_text(self) -> str:
        return self.log_path.read_text()


# -- reading a running service ---------------------------------------------------------------------


def log_lines(serve: ServeProcess) -> list[dict[str, Any]]:
    """Every JSON log line the service printed so far."""
    return [json.loads(line) for line in serve.log_text().splitlines() if line.startswith("{")]


def events_named(serve: ServeProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(serve) if line.get("event") == event]


async def prometheus(client: httpx.AsyncClient) -> dict[str, float]:
    """``/prometheus`` samples as ``{'name{label="v"}': value}`` (labels in the key only if any)."""
    response = await client.get("/prometheus")
    assert response.status_code == 200
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples
