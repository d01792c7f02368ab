"""Settings: every environment variable of the product contract, validated once at start-up.

The `Settings` object is created by the CLI (or a test) and passed down explicitly; no other module
reads the environment.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Annotated, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url

__all__ = ["Settings", "SettingsError", "load_settings", "mask_url"]


class SettingsError(ValueError):
    """A setting has a bad value; the message is one line that names the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        frozen=True,
    )

    database_url: str = "postgresql+asyncpg://postgres:postgres@localhost:5432/depthflow"
    # Empty means no Redis: the counters then live in this process only.
    redis_url: str = "redis://localhost:6379/0"
    # Namespace of every Redis key; processes sharing it sum into the same counters.
    redis_prefix: str = "depthflow:"
    symbols: Annotated[tuple[str, ...], NoDecode] = ("btcusdt",)
    binance_ws_url: str = "wss://stream.binance.com:9443"
    binance_rest_url: str = "https://api.binance.com"
    depth_interval_ms: int = 100
    snapshot_limit: int = Field(default=1000, ge=1, le=5000)
    sma_short: int = Field(default=5, ge=1)
    sma_long: int = Field(default=20, ge=2, le=10_000)
    batch_max_rows: int = Field(default=5000, ge=1)
    batch_max_delay_ms: int = Field(default=250, ge=1)
    buffer_max_rows: int = Field(default=1_000_000, ge=1)
    # Batches written at once while the writer is behind, one connection each (they still commit
    # in order). 2 nearly doubles what one PostgreSQL backend stores; more rarely helps on a
    # machine whose cores the database shares (`python -m bench throughput`).
    write_connections: int = Field(default=2, ge=1, le=16)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    # None (unset or empty): `console` when stdout is a terminal, else `json` (one object a line).
    log_format: Literal["console", "json"] | None = None
    # Binance closes every connection after 24 h; we rotate a little before that on our own.
    ws_max_age_s: float = Field(default=23.5 * 3600, gt=0)
    metrics_flush_ms: int = Field(default=1000, ge=10)
    # A live book that sees only stale events this long while frames keep arriving is resynced:
    # its update id ran ahead of the exchange's (a hostile or corrupt event), so it would
    # otherwise ignore everything until the next reconnect.
    stale_resync_s: float = Field(default=5.0, gt=0)
    # A connected feed that receives nothing this long is stalled: /live says so and the
    # connection is replaced (Binance sends every 100 ms for any active symbol).
    feed_stall_s: float = Field(default=30.0, gt=0)
    # Total deadline of one snapshot request (connect + headers + body), so a server that
    # trickles its answer cannot hold a resync.
    snapshot_timeout_s: float = Field(default=10.0, gt=0)
    # A supervised task that dies this many times within the window makes the process exit
    # non-zero, for the orchestrator to restart it.
    task_restart_limit: int = Field(default=5, ge=1)
    task_restart_window_s: float = Field(default=300.0, gt=0)
    # HTTP server limits (uvicorn): concurrent connections and tasks beyond the limit get a 503,
    # idle keep-alive connections are closed, a request's head must arrive in time and fit.
    http_limit_concurrency: int = Field(default=512, ge=1)
    http_timeout_keep_alive_s: float = Field(default=5.0, gt=0)
    http_header_timeout_s: float = Field(default=10.0, gt=0)
    http_max_header_bytes: int = Field(default=16_384, ge=1024)
    # Every API query runs under this statement timeout (503 when it fires).
    api_statement_timeout_ms: int = Field(default=5000, ge=1)
    # Binance allows 1024 streams per connection; fewer keep a reconnect's resync small and the
    # URL short (200 streams ~ 5 KB).
    streams_per_connection: int = Field(default=200, ge=1, le=1024)
    # Binance allows 300 connection attempts per 5 minutes per IP; one every 2 s is half that.
    connect_interval_s: float = Field(default=2.0, ge=0)
    # REST request weight per minute for every snapshot and exchangeInfo request of this
    # process: half of Binance's 6,000 per IP, leaving room for other clients on the IP.
    rest_weight_per_minute: int = Field(default=3000, ge=10, le=6000)
    rest_max_concurrency: int = Field(default=4, ge=1, le=64)
    # One audit (a fresh snapshot compared with the live book) every this many seconds, round
    # robin over the symbols, with spare budget only; 0 turns audits off.
    audit_interval_s: float = Field(default=30.0, ge=0)
    # price_ticks, orders, trading_signals and book_checkpoints are partitioned on event_time
    # in spans of this many days; RETENTION_DAYS (None: keep everything) drops whole spans
    # that ended that many days ago.
    partition_days: int = Field(default=1, ge=1, le=366)
    retention_days: int | None = Field(default=None, ge=1)
    # Each live book is stored whole (book_checkpoints) when it syncs and then every this many
    # seconds, so `GET /book/{symbol}?at=` replays at most this long a stretch of `orders`.
    checkpoint_interval_s: float = Field(default=300.0, gt=0)
    # How often `SYMBOLS` patterns are resolved again through exchangeInfo (listings, delistings).
    symbols_refresh_s: float = Field(default=3600.0, gt=0)

    @field_validator("symbols", mode="before")
    @classmethod
    def _split_symbols(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list | tuple):
            symbols = tuple(str(s).strip().lower() for s in value if str(s).strip())
            if not symbols:
                raise ValueError("at least one symbol is required")
            for symbol in symbols:
                # A name, or a pattern resolved through exchangeInfo: `*`, `*usdt`, `btc*`.
                if not symbol.strip("*?").replace("*", "").replace("?", "").isalnum() and (
                    symbol.strip("*?") != ""
                ):
                    raise ValueError(
                        f"{symbol!r} is not a symbol or pattern (letters, digits, * and ?)"
                    )
            return tuple(dict.fromkeys(symbols))
        return value

    @field_validator("retention_days", mode="before")
    @classmethod
    def _retention_off(cls, value: object) -> object:
        # RETENTION_DAYS= (empty), 0 or "off" keep everything, as unset does.
        if isinstance(value, str) and value.strip().lower() in {"", "0", "off", "none"}:
            return None
        return None if value == 0 else value

    @field_validator("depth_interval_ms")
    @classmethod
    def _binance_interval(cls, value: int) -> int:
        # A Literal[100, 1000] would refuse the string "100" that the environment gives.
        if value not in (100, 1000):
            raise ValueError("must be 100 or 1000")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        if isinstance(value, str):
            return value.strip().lower() or None
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        if value.startswith(("postgresql://", "postgres://")):
            value = "postgresql+asyncpg://" + value.split("://", 1)[1]
        if not value.startswith("postgresql+asyncpg://"):
            raise ValueError("must be a postgresql+asyncpg:// URL")
        try:
            url = make_url(value)
        except ValueError as exc:
            raise ValueError(f"not a URL ({exc}); expected {_DATABASE_URL_SHAPE}") from None
        if url.port is not None and not 0 < url.port < 65536:
            raise ValueError(f"port {url.port} is out of range; expected {_DATABASE_URL_SHAPE}")
        if not url.database:
            raise ValueError(f"names no database; expected {_DATABASE_URL_SHAPE}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_shape(cls, value: str) -> str:
        if not value:
            return value
        parts = _split_url(value, "redis://localhost:6379/0")
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "must start with redis://, rediss:// or unix:// (e.g. redis://localhost:6379/0), "
                "or be empty to keep the counters in the process"
            )
        database = parts.path.strip("/")
        if parts.scheme != "unix" and database and not database.isdigit():
            raise ValueError(
                f"database {database!r} is not a number (e.g. redis://localhost:6379/0)"
            )
        return value

    @field_validator("binance_ws_url")
    @classmethod
    def _ws_shape(cls, value: str) -> str:
        return _check_base_url(value, ("ws", "wss"), "wss://stream.binance.com:9443")

    @field_validator("binance_rest_url")
    @classmethod
    def _rest_shape(cls, value: str) -> str:
        return _check_base_url(value, ("http", "https"), "https://api.binance.com")

    @model_validator(mode="after")
    def _windows_ordered(self) -> Settings:
        if self.sma_short >= self.sma_long:
            raise ValueError(
                f"SMA_SHORT ({self.sma_short}) must be smaller than SMA_LONG ({self.sma_long})"
            )
        return self

    def stream_url(self, symbols: Sequence[str]) -> str:
        """The combined-stream URL of ``symbols`` (one connection's worth)."""
        # Binance documents `<symbol>@depth` (1000 ms) and `<symbol>@depth@100ms`.
        suffix = "@depth@100ms" if self.depth_interval_ms == 100 else "@depth"
        streams = "/".join(f"{s.lower()}{suffix}" for s in symbols)
        return f"{self.binance_ws_url.rstrip('/')}/stream?streams={streams}"


_DATABASE_URL_SHAPE = "postgresql+asyncpg://user:password@host:5432/depthflow"


def _split_url(value: str, example: str) -> SplitResult:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
    except ValueError as exc:
        raise ValueError(f"{exc} (e.g. {example})") from None
    return parts


def _check_base_url(value: str, schemes: tuple[str, ...], example: str) -> str:
    parts = _split_url(value, example)
    if parts.scheme not in schemes or not parts.hostname:
        wanted = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValueError(f"must start with {wanted} and name a host (e.g. {example})")
    if parts.query or parts.fragment:
        raise ValueError(f"must be a base URL without ?query or #fragment (e.g. {example})")
    return value


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment (and `.env`), or raise a one-line `SettingsError`."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if isinstance(part, str)]
    message = str(first["msg"]).removeprefix("Value error, ")
    if loc:
        got = first.get("input")
        if isinstance(got, str):
            got = mask_url(got)
        return f"invalid setting {loc[0].upper()}={got!r}: {message}"
    # Model-level checks name their variables in the message itself.
    return f"invalid settings: {message}"


# scheme://user:password@host -> the password, whatever the scheme (mysql, redis, postgres, ...).
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<password>[^@\s]*)@")


def mask_url(value: str) -> str:
    """`value` with the password of any URL in it replaced by ``***`` (for logs and errors)."""
    return _URL_PASSWORD.sub(lambda m: f"{m.group('head')}***@", value)
