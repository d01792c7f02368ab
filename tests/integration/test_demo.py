"""`depthflow demo` as a user runs it: one command, then Ctrl-C, and nothing left behind.

Each run is a real ``python -m depthflow demo`` subprocess with HOME and XDG_DATA_HOME in a fresh
directory of the test's own, so it creates (then reuses) a cluster there and never touches the
user's. Needs the optional `pgserver` package: skipped without it, failed under ``CI=true``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.conftest import CI
from tests.harness.processes import free_port

# Generous: the CI machine is a loaded 2-core box and a cold start runs initdb.
_READY_S = 240.0
_EXIT_S = 120.0


@pytest.fixture
def demo_home() -> Iterator[Path]:
    """A fresh HOME of the test's own. Mode 0755 rather than mkdtemp's 0700: as root the demo's
    server runs as `nobody`, which must be able to reach the cluster's directory inside it."""
    if importlib.util.find_spec("pgserver") is None:
        message = "pgserver is not installed (pip install -e '.[demo]')"
        if CI:
            pytest.fail(message + " (CI=true: the demo is tested)", pytrace=False)
        pytest.skip(message)
    home = Path(tempfile.mkdtemp(prefix="depthflow-demo-test-"))
    home.chmod(0o755)
    try:
        yield home
    finally:
        _kill_servers_of(home)
        shutil.rmtree(home, ignore_errors=True)


@dataclass
class Demo:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    started_at: datetime

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(line) for line in self.output().splitlines() if line.startswith("{"))
        return [line for line in lines if line.get("event") == name]


def start_demo(home: Path, run: str) -> Demo:
    port = free_port()
    log_path = home / f"demo-{run}.log"
    env = {
        **os.environ,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "share"),
        "LOG_FORMAT": "json",
    }
    started_at = datetime.now(UTC)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "depthflow", "demo", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Demo(process, port, log_path, started_at)


def wait_for_ticks(demo: Demo, limit: int = 100) -> list[dict[str, Any]]:
    """Poll until /health says the database is ok and /ticks has btcusdt ticks received by this
    run (not only kept from an earlier one); the newest `limit` ticks then."""
    deadline = time.monotonic() + _READY_S
    with httpx.Client(base_url=demo.base_url, timeout=10.0) as client:
        while time.monotonic() < deadline:
            if demo.process.poll() is not None:
                pytest.fail(f"demo exited {demo.process.returncode}:\n{demo.output()}")
            try:
                health = client.get("/health").json()
                ticks = client.get("/ticks", params={"symbol": "btcusdt", "limit": limit})
            except (httpx.TransportError, json.JSONDecodeError):
                time.sleep(0.2)
                continue
            rows: list[dict[str, Any]] = ticks.json() if ticks.status_code == 200 else []
            fresh = any(datetime.fromisoformat(r["received_at"]) > demo.started_at for r in rows)
            if health["checks"]["database"] == "ok" and fresh:
                return rows
            time.sleep(0.2)
    pytest.fail(f"no ticks within {_READY_S} s:\n{demo.output()}")


def descendants(demo: Demo) -> list[psutil.Process]:
    """Every process the demo started, at any depth (PostgreSQL and its backends)."""
    return psutil.Process(demo.process.pid).children(recursive=True)


def stop_demo(demo: Demo, sig: signal.Signals) -> tuple[int, list[psutil.Process]]:
    """Send `sig`, wait for the exit; its code and the processes it started still alive after a
    generous wait (none expected)."""
    started = descendants(demo)
    assert any(p.name() == "postgres" for p in started), "the demo's PostgreSQL should run"
    demo.process.send_signal(sig)
    try:
        code = demo.process.wait(_EXIT_S)
    except subprocess.TimeoutExpired:
        demo.process.kill()
        demo.process.wait()
        pytest.fail(f"demo did not exit within {_EXIT_S} s of {sig.name}:\n{demo.output()}")
    deadline = time.monotonic() + _EXIT_S
    while (left := [p for p in started if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    return code, left


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_servers_of(home: Path) -> None:
    """Whatever a failed test left running from under `home` (the postmaster names its data
    directory on its command line; its backends exit with it)."""
    for process in psutil.process_iter(["cmdline"]):
        if any(str(home) in part for part in process.info["cmdline"] or []):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                continue


def test_demo_starts_serves_and_stops_cleanly(demo_home: Path) -> None:
    cluster = demo_home / "share" / "depthflow" / "demo-pg"

    # Cold start: the cluster is created in the fresh data directory; Ctrl-C stops it all.
    first = start_demo(demo_home, "cold")
    first_ticks = wait_for_ticks(first)
    assert {row["symbol"] for row in first_ticks} == {"BTCUSDT"}
    assert f"http://127.0.0.1:{first.port}/" in first.output()
    assert [e["created"] for e in first.events("embedded_postgres_started")] == [True]
    assert (cluster / "data" / "PG_VERSION").is_file()
    code, left = stop_demo(first, signal.SIGINT)
    assert code == 0, first.output()
    assert left == []
    assert [e["code"] for e in first.events("embedded_postgres_stopped")] == [0]
    assert not (cluster / "data" / "postmaster.pid").exists()

    # Warm start: the same cluster, the first run's rows kept; `kill` stops it all.
    second = start_demo(demo_home, "warm")
    second_ticks = wait_for_ticks(second, limit=1000)
    assert [e["created"] for e in second.events("embedded_postgres_started")] == [False]
    assert {row["id"] for row in first_ticks} <= {row["id"] for row in second_ticks}
    code, left = stop_demo(second, signal.SIGTERM)
    assert code == 0, second.output()
    assert left == []

    # Even `kill -9` of the demo leaves no server behind (Linux: the kernel has PostgreSQL stop).
    if sys.platform.startswith("linux"):
        third = start_demo(demo_home, "killed")
        wait_for_ticks(third)
        code, left = stop_demo(third, signal.SIGKILL)
        assert code == -signal.SIGKILL
        assert left == []
        assert not (cluster / "data" / "postmaster.pid").exists()


def test_without_pgserver_the_demo_says_what_to_install() -> None:
    # sys.modules[name] = None is how importlib spells "this module cannot be imported".
    hide = "import sys; sys.modules['pgserver'] = None; from depthflow.cli import main; "
    result = subprocess.run(
        [sys.executable, "-c", hide + "raise SystemExit(main(['demo']))"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [
        "depthflow: demo needs the pgserver package (an embedded PostgreSQL): "
        "pip install 'depthflow[demo]'"
    ]
