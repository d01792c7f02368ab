"""Settings: names and defaults of the contract, one clear line for a bad value."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from depthflow.config import Settings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SYMBOLS", "SMA_SHORT", "SMA_LONG", "DATABASE_URL", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir("/")  # no stray .env


def test_defaults_follow_the_contract() -> None:
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert s.database_url == "postgresql+asyncpg://postgres:postgres@localhost:5432/depthflow"
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.symbols == ("btcusdt",)
    assert s.binance_ws_url == "wss://stream.binance.com:9443"
    assert s.binance_rest_url == "https://api.binance.com"
    assert (s.depth_interval_ms, s.snapshot_limit) == (100, 1000)
    assert (s.sma_short, s.sma_long) == (5, 20)
    assert (s.batch_max_rows, s.batch_max_delay_ms, s.buffer_max_rows) == (5000, 250, 1_000_000)
    assert s.log_level == "INFO"


def test_symbols_are_split_lowercased_and_deduplicated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYMBOLS", " BTCUSDT,ethusdt, btcusdt ,")
    s = load_settings()
    assert s.symbols == ("btcusdt", "ethusdt")
    assert s.stream_url(s.symbols) == (
        "wss://stream.binance.com:9443/stream?streams=btcusdt@depth@100ms/ethusdt@depth@100ms"
    )


def test_slow_interval_uses_the_plain_depth_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEPTH_INTERVAL_MS", "1000")
    assert load_settings().stream_url(["BTCUSDT"]).endswith("/stream?streams=btcusdt@depth")


def test_plain_postgres_url_gets_the_async_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@db:5432/x")
    assert load_settings().database_url == "postgresql+asyncpg://u@db:5432/x"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SMA_SHORT", "abc"),
        ("SMA_LONG", "0"),
        ("DEPTH_INTERVAL_MS", "250"),
        ("SYMBOLS", "btc-usdt"),
        ("BATCH_MAX_ROWS", "-1"),
        ("LOG_LEVEL", "chatty"),
        ("DATABASE_URL", "mysql://x"),
    ],
)
def test_a_bad_value_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    message = str(info.value)
    assert name in message
    assert "\n" not in message


def test_a_rejected_url_never_shows_its_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "mysql://admin:S3cr3tPW@db.example:3306/x")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert "S3cr3tPW" not in str(info.value)
    assert "mysql://admin:***@db.example:3306/x" in str(info.value)


def test_short_window_must_be_below_long(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMA_SHORT", "20")
    monkeypatch.setenv("SMA_LONG", "20")
    with pytest.raises(SettingsError, match=r"SMA_SHORT.*SMA_LONG"):
        load_settings()


def test_serve_with_a_bad_setting_exits_with_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "depthflow", "serve"],
        env={"SMA_SHORT": "abc", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "SMA_SHORT" in lines[0]


def test_config_command_prints_the_settings_with_secrets_masked() -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": "postgresql://admin:S3cr3tPW@db.example:5432/x",
        "REDIS_URL": "redis://:R3disPW@cache:6379/0",
        "SYMBOLS": "btcusdt,*fdusd",
    }
    done = subprocess.run(
        [sys.executable, "-m", "depthflow", "config"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd="/",
    )
    assert "S3cr3tPW" not in done.stdout
    assert "R3disPW" not in done.stdout
    shown = json.loads(done.stdout)
    assert shown["DATABASE_URL"] == "postgresql+asyncpg://admin:***@db.example:5432/x"
    assert shown["SYMBOLS"] == ["btcusdt", "*fdusd"]
    assert shown["STREAMS_PER_CONNECTION"] == 200
