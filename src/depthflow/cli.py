"""The `depthflow` command: serve, migrate, simulate, record, replay."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from depthflow import __version__
from depthflow.cli_help import CommandParser, HelpFormatter
from depthflow.config import Settings, SettingsError, load_settings, mask_url
from depthflow.errors import EXIT_USAGE, DependencyUnreachable, UserError
from depthflow.logs import configure_logging

if TYPE_CHECKING:
    from depthflow.metrics import Metrics

__all__ = ["main"]

log = logging.getLogger("depthflow.cli")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"depthflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format)
    try:
        result: int = args.run(settings, args)
    except UserError as exc:
        # A cause the user can fix: one line saying what to do, no traceback.
        print(f"depthflow: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthflow", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"depthflow {__version__}")
    # Each command's help shows its defaults and the environment variables it reads.
    commands = parser.add_subparsers(required=True, metavar="COMMAND", parser_class=CommandParser)

    config = commands.add_parser("config", help="print the effective settings (secrets masked)")
    config.set_defaults(run=_config)

    serve = commands.add_parser("serve", help="run the service (feed + HTTP)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.set_defaults(run=_serve)

    migrate = commands.add_parser("migrate", help="create the database if missing, then migrate")
    migrate.set_defaults(run=_migrate)

    sim = commands.add_parser("simulate", help="a local stand-in for Binance (WS + REST)")
    sim.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sim.add_argument("--port", type=int, default=8765, help="port of the WS and REST paths")
    sim.add_argument("--symbols", default="btcusdt,ethusdt", help="comma separated")
    sim.add_argument("--rate", type=float, default=10.0, help="events/s per symbol; 0 = max")
    sim.add_argument("--seed", type=int, default=1, help="random seed of the books' walk")
    sim.add_argument(
        "--gap-every",
        type=int,
        default=0,
        metavar="N",
        help="drop every Nth event from the stream (clients see a gap); 0 = never",
    )
    sim.add_argument(
        "--disconnect-every",
        type=int,
        default=0,
        metavar="N",
        help="close each connection after N frames; 0 = never",
    )
    sim.add_argument(
        "--malformed-every",
        type=int,
        default=0,
        metavar="N",
        help="send a broken frame after every N frames; 0 = never",
    )
    sim.add_argument("--max-events", type=int, default=None, metavar="N", help="per symbol")
    sim.add_argument(
        "--prebuild",
        type=int,
        default=0,
        metavar="N",
        help="pre-generate N events per symbol and send them at full speed",
    )
    sim.add_argument(
        "--replay",
        type=Path,
        default=None,
        metavar="FILE",
        help="serve this recording (from `depthflow record`) instead of a random walk",
    )
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
    replay.add_argument("file", type=Path, help="a recording from `depthflow record`")
    replay.add_argument(
        "--force",
        action="store_true",
        help="store the file's rows even if its update ids are stored already (twice, then)",
    )
    replay.set_defaults(run=_replay)

    _add_export(commands)

    demo = commands.add_parser(
        "demo",
        help="embedded PostgreSQL + simulator + service in one command, for a first look",
        description="Run an embedded PostgreSQL, the simulator and the service in one process "
        "(no Docker, PostgreSQL or Redis needed; pip install 'depthflow[demo]'). The database "
        "is kept between runs. Ctrl-C stops everything.",
    )
    demo.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    demo.add_argument(
        "--symbols",
        type=_symbol_names,
        default="btcusdt,ethusdt",
        help="simulated symbols, comma separated (default: %(default)s)",
    )
    demo.add_argument(
        "--rate", type=float, default=5.0, help="events/s per symbol (default: %(default)s)"
    )
    demo.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="the database's directory (default: $XDG_DATA_HOME/depthflow/demo-pg, else "
        "~/.local/share/depthflow/demo-pg; as root /var/lib/depthflow/demo-pg when the former "
        "is out of the unprivileged server's reach)",
    )
    demo.set_defaults(run=_demo)
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

    _check_database(settings)
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


def _check_database(settings: Settings) -> None:
    """Refuse to serve a database that is missing or not migrated; one that cannot be reached
    now is only reported: the service keeps rows until it answers."""
    from depthflow.storage import db

    try:
        revision = asyncio.run(db.check_migrated(settings.database_url))
    except DependencyUnreachable as exc:
        log.warning("database_unreachable_at_start", extra={"fields": {"error": str(exc)}})
        return
    if revision is None:
        log.warning(
            "database_revision_not_checked",
            extra={"fields": {"reason": "alembic.ini not found: run from the project directory"}},
        )


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import make_url

    from depthflow.storage import db

    with db.explain_errors(settings.database_url):
        asyncio.run(db.migrate(settings.database_url, partition_days=settings.partition_days))
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
            shown = asyncio.create_task(_show_recorded(metrics, path, duration))
            try:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(duration):
                        await feed.run()
            finally:
                shown.cancel()
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


async def _show_recorded(metrics: Metrics, path: Path, duration: float | None) -> None:
    """Frames recorded so far, and the ETA of a `--duration`, on stderr."""
    from depthflow.progress import Progress

    progress = Progress(sys.stderr, f"record {path.name}", unit="frames")
    started = time.monotonic()
    try:
        while True:
            await asyncio.sleep(0.2)
            progress.advance(metrics.messages - progress.rows)
            if duration:
                # Frames arrive at the rate so far: the ETA of the frames in the whole duration.
                elapsed = max(time.monotonic() - started, 1e-3)
                progress.total = round(progress.rows * duration / elapsed) or None
    finally:
        progress.finish()


class _Discard:
    """Row and tick sink of `depthflow record`, which keeps frames, not rows."""

    def add_event(self, tick: object, orders: object) -> bool:
        return True

    def add_gap(self, row: object) -> bool:
        return True

    def add_checkpoint(self, row: object) -> bool:
        return True

    def add_tick(self, symbol: str, wap: float, event_time: datetime, last_update_id: int) -> None:
        return None


def _replay(settings: Settings, args: argparse.Namespace) -> int:
    asyncio.run(_replay_async(settings, args.file, force=args.force))
    return 0


async def _replay_async(settings: Settings, path: Path, *, force: bool = False) -> None:
    from depthflow.progress import Progress
    from depthflow.replay import run_replay

    progress = Progress(sys.stderr, f"replay {path.name}", unit="frames")
    summary = await run_replay(settings, path, owns_process=True, force=force, progress=progress)
    log.info("replayed", extra={"fields": summary})
    print(json.dumps(summary))


def _add_export(commands: argparse._SubParsersAction[CommandParser]) -> None:
    export = commands.add_parser(
        "export",
        help="stored rows, or a past book, to a Parquet or CSV file",
        description="Stream one table's stored rows (ticks, orders, signals, gaps), or the\n"
        "stored book of a symbol at past instants (book), to a Parquet or CSV file, in\n"
        "constant memory. Rows are ordered by symbol, time and id. Times are ISO-8601\n"
        "with a zone (Z accepted); a date alone is midnight UTC.\n"
        "Parquet needs pyarrow: pip install 'depthflow[export]'.",
    )
    export.add_argument("what", metavar="{ticks,orders,signals,gaps,book}", help="what to export")
    export.add_argument("--out", type=Path, required=True, metavar="FILE", help="the file")
    export.add_argument(
        "--format",
        default=None,
        metavar="{parquet,csv}",
        help="parquet or csv (default: csv when FILE ends in .csv or .csv.gz, gzipped for .gz; "
        "else parquet)",
    )
    export.add_argument(
        "--symbol", default=None, help="only this symbol, case-insensitive (book: required)"
    )
    export.add_argument(
        "--start",
        default=None,
        metavar="ISO",
        help="from this event time, inclusive (gaps: their to_time) (default: the first row)",
    )
    export.add_argument(
        "--end", default=None, metavar="ISO", help="before this time (default: after the last)"
    )
    export.add_argument(
        "--at", default=None, metavar="ID|ISO", help="book: the instant, an update id or a time"
    )
    export.add_argument(
        "--every",
        type=_positive(float),
        default=None,
        metavar="SECONDS",
        help="book: one book every SECONDS from --start to --end (unknowable ones skipped)",
    )
    export.add_argument(
        "--depth",
        type=_positive(int),
        default=None,
        metavar="N",
        help="book: at most N levels a side (default: all)",
    )
    export.add_argument(
        "--chunk-rows",
        type=_positive(int),
        default=50_000,
        metavar="N",
        help="rows per Parquet row group",
    )
    export.set_defaults(run=_export)


def _positive(kind: type[int] | type[float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
        return value

    return parse


def _export(settings: Settings, args: argparse.Namespace) -> int:
    from depthflow.export import build_request, run_export
    from depthflow.progress import Progress

    request = build_request(
        args.what,
        args.out,
        format=args.format,
        symbol=args.symbol,
        start=args.start,
        end=args.end,
        at=args.at,
        every_s=args.every,
        depth=args.depth,
        chunk_rows=args.chunk_rows,
    )
    progress = Progress(sys.stderr, f"export {args.what}")
    result = asyncio.run(run_export(settings.database_url, request, progress))
    print(result.summary(), file=sys.stderr)
    return 0


def _symbol_names(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(s.strip().lower() for s in text.split(",") if s.strip()))
    if not names or not all(name.isalnum() for name in names):
        raise argparse.ArgumentTypeError(f"expected names such as btcusdt,ethusdt, got {text!r}")
    return names


def _demo(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from depthflow.demo import DemoOptions, run_demo

    options = DemoOptions(
        port=args.port, symbols=args.symbols, rate=args.rate, data_dir=args.data_dir
    )
    try:
        # Set-up failures (pgserver missing, a directory refused) are `UserError`s for `main`.
        return asyncio.run(run_demo(options, os.environ))
    except SettingsError as exc:
        print(f"depthflow: {exc}", file=sys.stderr)
        return EXIT_USAGE
