"""The `depthflow` command: serve, migrate, simulate, record, replay."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from depthflow import __version__
from depthflow.config import Settings, SettingsError, load_settings, mask_url
from depthflow.logs import configure_logging

__all__ = ["main"]

log = logging.getLogger("depthflow.cli")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"depthflow: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        result: int = args.run(settings, args)
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="depthflow", description=__doc__)
    parser.add_argument("--version", action="version", version=f"depthflow {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    config = commands.add_parser("config", help="print the effective settings (secrets masked)")
    config.set_defaults(run=_config)

    serve = commands.add_parser("serve", help="run the service (feed + HTTP)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="create the database if missing, then migrate")
    migrate.set_defaults(run=_migrate)

    sim = commands.add_parser("simulate", help="a local stand-in for Binance (WS + REST)")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--symbols", default="btcusdt,ethusdt", help="comma separated")
    sim.add_argument("--rate", type=float, default=10.0, help="events/s per symbol; 0 = max")
    sim.add_argument("--seed", type=int, default=1)
    sim.add_argument("--gap-every", type=int, default=0, metavar="N")
    sim.add_argument("--disconnect-every", type=int, default=0, metavar="N")
    sim.add_argument("--malformed-every", type=int, default=0, metavar="N")
    sim.add_argument("--max-events", type=int, default=None, metavar="N", help="per symbol")
    sim.add_argument(
        "--prebuild",
        type=int,
        default=0,
        metavar="N",
        help="pre-generate N events per symbol and send them at full speed",
    )
    sim.add_argument("--replay", type=Path, default=None, metavar="FILE")
    sim.add_argument(
        "--symbols-count",
        type=int,
        default=0,
        metavar="N",
        help="serve N symbols: --symbols first, then generated s0001usdt, s0002usdt, ...",
    )
    sim.add_argument(
        "--total-rate",
        type=float,
        default=None,
        metavar="R",
        help="R events/s over all symbols, Zipf-skewed (a few busy, a long quiet tail; at most "
        "10/s each), shaped like real Binance events; replaces --rate",
    )
    sim.add_argument(
        "--break-symbols", default="", metavar="LIST", help="listed with status BREAK (no events)"
    )
    sim.add_argument(
        "--weight-limit",
        type=int,
        default=6000,
        metavar="W",
        help="REST request weight per IP per (fixed) minute, then 429 and 418 bans; 0 = no limit",
    )
    sim.add_argument(
        "--ban-base-s",
        type=float,
        default=120.0,
        metavar="S",
        help="first 418 ban for ignoring a 429's Retry-After; doubles per repeat (Binance: 2 min)",
    )
    sim.add_argument(
        "--max-streams-per-connection",
        type=int,
        default=1024,
        metavar="N",
        help="refuse handshakes naming more streams (HTTP 400; Binance: 1024)",
    )
    sim.set_defaults(run=_simulate)

    record = commands.add_parser("record", help="store every frame and snapshot as NDJSON")
    record.add_argument("file", type=Path, help="output; gzip when it ends in .gz")
    record.add_argument("--duration", type=float, default=None, help="seconds (default: forever)")
    record.set_defaults(run=_record)

    replay = commands.add_parser("replay", help="run a recording through the pipeline")
    replay.add_argument("file", type=Path)
    replay.set_defaults(run=_replay)
    return parser


def _config(settings: Settings, args: argparse.Namespace) -> int:
    shown = {
        name.upper(): mask_url(value) if isinstance(value, str) else value
        for name, value in settings.model_dump(mode="json").items()
    }
    print(json.dumps(shown, indent=2))
    return 0


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from typing import cast

    import uvicorn

    from depthflow.api import create_app
    from depthflow.api.http_server import header_timeout_protocol, raise_open_files_limit

    raise_open_files_limit()
    app = create_app(settings, owns_process=True)
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=30,
        # h11 based: uvicorn's httptools protocol ignores h11_max_incomplete_event_size.
        http=header_timeout_protocol(settings.http_header_timeout_s),
        limit_concurrency=settings.http_limit_concurrency,
        # Annotated int, but uvicorn only hands it to loop.call_later: a float is fine.
        timeout_keep_alive=cast(int, settings.http_timeout_keep_alive_s),
        h11_max_incomplete_event_size=settings.http_max_header_bytes,
    )
    uvicorn.Server(config).run()
    service = getattr(app.state, "service", None)
    if service is not None and service.fatal is not None:
        # A supervised task kept dying: exit non-zero so the orchestrator restarts us.
        log.critical("exiting_after_task_failures", extra={"fields": {"task": service.fatal}})
        return 1
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import make_url

    from depthflow.storage import db

    asyncio.run(db.migrate(settings.database_url))
    database = make_url(settings.database_url).render_as_string(hide_password=True)
    log.info("migrated", extra={"fields": {"database": database}})
    return 0


def _simulate(settings: Settings, args: argparse.Namespace) -> int:
    from depthflow.simulate.server import serve

    symbols = [s.strip().lower() for s in args.symbols.split(",") if s.strip()]
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            serve(
                symbols=symbols,
                host=args.host,
                port=args.port,
                rate=args.rate,
                seed=args.seed,
                gap_every=args.gap_every,
                disconnect_every=args.disconnect_every,
                malformed_every=args.malformed_every,
                max_events=args.max_events,
                prebuild=args.prebuild,
                replay=args.replay,
                symbols_count=args.symbols_count,
                total_rate=args.total_rate,
                break_symbols=[s.strip() for s in args.break_symbols.split(",") if s.strip()],
                weight_limit=args.weight_limit or None,
                ban_base_s=args.ban_base_s,
                max_streams_per_connection=args.max_streams_per_connection,
            )
        )
    return 0


def _record(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_record_async(settings, args.file, args.duration))
    return 0


async def _record_async(settings: Settings, path: Path, duration: float | None) -> None:
    import httpx

    from depthflow.feed import Feed
    from depthflow.metrics import Metrics
    from depthflow.pipeline import Pipeline
    from depthflow.recording import RecordingWriter
    from depthflow.snapshots import DirectSnapshots

    metrics = Metrics()
    # The books are kept (they decide when a snapshot is needed) but nothing is stored.
    pipeline = Pipeline(settings.symbols, _Discard(), _Discard(), metrics)
    started = time.monotonic()
    with RecordingWriter(path) as writer:
        async with httpx.AsyncClient(timeout=10.0) as http:
            snapshots = DirectSnapshots(
                http, settings.binance_rest_url, timeout_s=settings.snapshot_timeout_s
            )
            feed = Feed(settings, pipeline, metrics, snapshots, tap=writer)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(duration):
                    await feed.run()
    log.info(
        "recorded",
        extra={
            "fields": {
                "file": str(path),
                "frames": metrics.messages,
                "seconds": round(time.monotonic() - started, 3),
            }
        },
    )


class _Discard:
    """Row and tick sink of `depthflow record`, which keeps frames, not rows."""

    def add_event(self, tick: object, orders: object) -> bool:
        return True

    def add_gap(self, row: object) -> bool:
        return True

    def add_tick(self, symbol: str, wap: float, event_time: datetime, last_update_id: int) -> None:
        return None


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_replay_async(settings, args.file))
    return 0


async def _replay_async(settings: Settings, path: Path) -> None:
    from depthflow.replay import run_replay

    summary = await run_replay(settings, path, owns_process=True)
    log.info("replayed", extra={"fields": summary})
    print(json.dumps(summary))
