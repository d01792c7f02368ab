"""`depthflow export`: a replayed recording exported in both formats and read back, compared with
the database row by row; the book at past instants compared with `book_at`; the command line's
exit codes and one-line errors; memory that does not grow with the row count."""

from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from depthflow.book_history import PastBook
from depthflow.config import Settings
from depthflow.export import SOURCES, build_request, run_export
from depthflow.progress import Progress
from depthflow.recording import RecordingWriter
from depthflow.replay import run_replay
from depthflow.simulate.market import Market
from depthflow.storage import db
from depthflow.storage.book_at import book_at

T0_MS = 1_723_075_200_000  # 2024-08-08T00:00:00Z
T0 = datetime.fromtimestamp(T0_MS / 1000, UTC)
STEPS = 400
STEP_MS = 100
GAP_AT = 200  # BTCUSDT's event of this step is never sent: a gap, then a resync
ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")
ARROW_TYPES = {
    "timestamp with time zone": pa.timestamp("us", tz="UTC"),
    "double precision": pa.float64(),
    "bigint": pa.int64(),
    "text": pa.string(),
}


def write_recording(path: Path) -> None:
    """Two simulated books, an event every 100 ms from T0, a snapshot after the first event
    of each and after BTCUSDT's gap."""
    markets = [Market("btcusdt", seed=5), Market("ethusdt", seed=6)]
    with RecordingWriter(path) as writer:
        for step in range(STEPS):
            event_ms = T0_MS + step * STEP_MS
            for market in markets:
                event = market.next_event(event_ms)
                if market.symbol == "BTCUSDT" and step == GAP_AT:
                    continue
                stream = f"{market.stream_symbol}@depth@100ms"
                frame = json.dumps({"stream": stream, "data": event})
                writer.write_frame(event_ms / 1000 + 0.01, frame)
                if step in (0, GAP_AT + 1):
                    snapshot = json.dumps(market.snapshot(1000))
                    writer.write_snapshot(event_ms / 1000 + 0.02, market.stream_symbol, snapshot)


@dataclass(frozen=True)
class Stored:
    url: str
    tmp: Path


@pytest.fixture
async def stored(make_settings: Callable[..., Settings], tmp_path: Path) -> Stored:
    path = tmp_path / "two-books.ndjson"
    write_recording(path)
    summary = await run_replay(make_settings(symbols="btcusdt,ethusdt"), path)
    assert summary["resync_count"] == 1
    return Stored(make_settings().database_url, tmp_path)


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(db.asyncpg_dsn(url))
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def table_columns(url: str, table: str) -> list[tuple[str, str]]:
    rows = await fetch(
        url,
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_name = $1 AND table_schema = 'public' ORDER BY ordinal_position",
        table,
    )
    return [(r["column_name"], r["data_type"]) for r in rows]


async def export(url: str, what: str, out: Path, **options: Any) -> int:
    request = build_request(what, out, **options)
    result = await run_export(url, request, Progress(io.StringIO(), what, tty=False))
    assert result.path == out
    assert result.bytes == (await asyncio.to_thread(out.stat)).st_size
    return result.rows


def read_csv(path: Path, types: dict[str, str]) -> list[dict[str, Any]]:
    """Rows of an exported CSV, decoded by the database's column types."""

    def decode(kind: str, text: str) -> Any:
        if kind == "timestamp with time zone":
            if text == "":
                return None
            assert ISO_Z.match(text), text
            return datetime.fromisoformat(text)
        return {"bigint": int, "double precision": float, "text": str}[kind](text)

    with path.open(newline="", encoding="utf-8") as file:
        reader = csv.DictReader(file)
        assert reader.fieldnames == list(types)
        return [{name: decode(types[name], row[name]) for name in types} for row in reader]


@pytest.mark.parametrize("what", ["ticks", "orders", "signals", "gaps"])
async def test_every_table_round_trips_in_both_formats(stored: Stored, what: str) -> None:
    source = SOURCES[what]
    columns = await table_columns(stored.url, source.table)
    names = [name for name, _ in columns]
    expected = [
        dict(r)
        for r in await fetch(
            stored.url,
            f"SELECT {', '.join(names)} FROM {source.table} "
            f"ORDER BY symbol, {source.time_column}, id",
        )
    ]
    assert expected, f"the replay stored no {source.table}"
    # Small row groups: the file is written a chunk at a time.
    chunk = 1000
    parquet = stored.tmp / f"{what}.parquet"
    assert await export(stored.url, what, parquet, chunk_rows=chunk) == len(expected)
    table = pq.read_table(parquet)
    assert table.schema == pa.schema([(n, ARROW_TYPES[t]) for n, t in columns])
    assert table.to_pylist() == expected
    metadata = pq.ParquetFile(parquet).metadata
    assert metadata.num_row_groups == -(-len(expected) // chunk)
    assert all(metadata.row_group(i).num_rows <= chunk for i in range(metadata.num_row_groups))

    for name in (f"{what}.csv", f"{what}.csv.gz"):
        path = stored.tmp / name
        assert await export(stored.url, what, path) == len(expected)
        if name.endswith(".gz"):
            plain = stored.tmp / f"{what}.unzipped.csv"
            plain.write_bytes(gzip.decompress(path.read_bytes()))
            path = plain
        assert read_csv(path, dict(columns)) == expected


async def test_symbol_and_time_filters(stored: Stored) -> None:
    ticks = await fetch(
        stored.url, "SELECT event_time FROM price_ticks WHERE symbol = 'ETHUSDT' ORDER BY id"
    )
    start, end = ticks[50]["event_time"], ticks[150]["event_time"]
    sql = (
        "SELECT id FROM {} WHERE symbol = 'ETHUSDT' AND event_time >= $1 AND event_time < $2 "
        "ORDER BY event_time, id"
    )
    for what, table in (("ticks", "price_ticks"), ("orders", "orders")):
        ids = [r["id"] for r in await fetch(stored.url, sql.format(table), start, end)]
        for fmt in ("parquet", "csv"):
            out = stored.tmp / f"{what}-window.{fmt}"
            # Lower case, a Z zone, an inclusive start and an exclusive end.
            window = {"start": start.isoformat().replace("+00:00", "Z"), "end": end.isoformat()}
            rows = await export(stored.url, what, out, format=fmt, symbol="ethusdt", **window)
            assert rows == len(ids)
            if fmt == "parquet":
                got = pq.read_table(out, columns=["id", "symbol", "event_time"]).to_pylist()
            else:
                with out.open(newline="") as file:
                    got = [
                        {
                            **r,
                            "id": int(r["id"]),
                            "event_time": datetime.fromisoformat(r["event_time"]),
                        }
                        for r in csv.DictReader(file)
                    ]
            assert [r["id"] for r in got] == ids
            assert {r["symbol"] for r in got} == {"ETHUSDT"}
            assert got[0]["event_time"] == start
            assert all(start <= r["event_time"] < end for r in got)
    # A date alone is midnight UTC: the whole recording is on 2024-08-08.
    everything = stored.tmp / "all-btc.parquet"
    btc = await fetch(stored.url, "SELECT count(*) AS n FROM orders WHERE symbol = 'BTCUSDT'")
    day = {"start": "2024-08-08", "end": "2024-08-09"}
    assert await export(stored.url, "orders", everything, symbol="BTCUSDT", **day) == btc[0]["n"]
    after = {"start": "2024-08-09"}
    assert await export(stored.url, "orders", stored.tmp / "none.parquet", **after) == 0
    assert pq.read_table(stored.tmp / "none.parquet").num_rows == 0
    # Gaps are placed by their to_time.
    (gap,) = await fetch(stored.url, "SELECT id, to_time FROM data_gaps")
    gaps_after = {"start": (gap["to_time"] + timedelta(microseconds=1)).isoformat()}
    assert await export(stored.url, "gaps", stored.tmp / "g.csv", **gaps_after) == 0
    gaps_at = {"start": gap["to_time"].isoformat()}
    assert await export(stored.url, "gaps", stored.tmp / "g.csv", **gaps_at) == 1


def expected_book(at: datetime, past: PastBook, depth: int | None = None) -> list[dict[str, Any]]:
    bids = sorted(past.bids.items(), reverse=True)[:depth]
    asks = sorted(past.asks.items())[:depth]
    head = {"at": at, "symbol": past.symbol, "last_update_id": past.last_update_id}
    return [
        {
            **head,
            "event_time": past.event_time,
            "side": side,
            "level": level,
            "price": p,
            "quantity": q,
        }
        for side, levels in (("bid", bids), ("ask", asks))
        for level, (p, q) in enumerate(levels, start=1)
    ]


async def books_at(url: str, symbol: str, instants: list[int | datetime]) -> list[object]:
    engine = db.make_engine(url)
    try:
        async with engine.connect() as conn:
            return [await book_at(conn, symbol, at) for at in instants]
    finally:
        await engine.dispose()


async def test_book_at_is_the_rebuilt_book(stored: Stored) -> None:
    ticks = await fetch(
        stored.url,
        "SELECT last_update_id, event_time FROM price_ticks WHERE symbol = 'BTCUSDT' ORDER BY id",
    )
    by_id = [ticks[i]["last_update_id"] for i in (3, 120, 250, len(ticks) - 1)]
    by_time = [T0 + timedelta(seconds=s) for s in (1.05, 12.3, 35.0)]
    pasts = await books_at(stored.url, "BTCUSDT", [*by_id, *by_time])
    for n, (at, past) in enumerate(zip([*by_id, *by_time], pasts, strict=True)):
        assert isinstance(past, PastBook), (at, past)
        assert min(len(past.bids), len(past.asks)) > 20
        moment = at if isinstance(at, datetime) else past.event_time
        text = str(at) if isinstance(at, int) else at.isoformat()
        out = stored.tmp / f"book-{n}.parquet"
        rows = await export(stored.url, "book", out, symbol="btcusdt", at=text)
        assert rows == len(past.bids) + len(past.asks)
        assert pq.read_table(out).to_pylist() == expected_book(moment, past)
        if isinstance(at, int):
            assert past.last_update_id == at
        out = stored.tmp / f"book-{n}.csv"
        await export(stored.url, "book", out, symbol="BTCUSDT", at=text, depth=5)
        with out.open(newline="") as file:
            got = list(csv.DictReader(file))
        want = expected_book(moment, past, 5)
        assert len(got) == 10
        assert [
            (r["side"], int(r["level"]), float(r["price"]), float(r["quantity"])) for r in got
        ] == [(w["side"], w["level"], w["price"], w["quantity"]) for w in want]
        assert {datetime.fromisoformat(r["at"]) for r in got} == {moment}


async def test_book_every_seconds_skips_the_unknowable_instants(stored: Stored) -> None:
    start, end, every = T0 - timedelta(seconds=1), T0 + timedelta(seconds=30), 0.5
    instants: list[int | datetime] = []
    moment = start
    while moment < end:
        instants.append(moment)
        moment += timedelta(seconds=every)
    pasts = await books_at(stored.url, "BTCUSDT", instants)
    known = [(at, p) for at, p in zip(instants, pasts, strict=True) if isinstance(p, PastBook)]
    # Before the first checkpoint, and inside the gap: both kinds are skipped.
    assert 0 < len(known) < len(instants) - 2
    out = stored.tmp / "books.parquet"
    options = {"start": start.isoformat(), "end": end.isoformat(), "every_s": every}
    request = build_request("book", out, symbol="BTCUSDT", chunk_rows=500, **options)
    result = await run_export(stored.url, request, Progress(io.StringIO(), "book", tty=False))
    assert result.skipped == len(instants) - len(known)
    want = [row for at, past in known for row in expected_book(at, past)]  # type: ignore[arg-type]
    assert result.rows == len(want)
    assert pq.read_table(out).to_pylist() == want


# -- the command line -----------------------------------------------------------------------------


async def depthflow(*args: str, url: str, prelude: str = "") -> tuple[int, str, str]:
    """``python -m depthflow ARGS`` (or, with ``prelude``, `main` after that code)."""
    command = ["-m", "depthflow", *args]
    if prelude:
        command = ["-c", f"{prelude}\nimport sys\nfrom depthflow.cli import main\n"
                   f"sys.exit(main({list(args)!r}))"]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable, *command,
        env={**os.environ, "DATABASE_URL": url, "LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_command_line(stored: Stored) -> None:
    out = stored.tmp / "orders.csv"
    code, _, err = await depthflow(
        "export", "orders", "--symbol", "BTCUSDT", "--out", str(out), url=stored.url
    )
    assert code == 0, err
    (n,) = await fetch(stored.url, "SELECT count(*) FROM orders WHERE symbol = 'BTCUSDT'")
    assert err.strip().splitlines()[-1].startswith(f"exported {n[0]:,} rows to {out} (")
    with out.open(newline="") as file:
        assert sum(1 for _ in csv.DictReader(file)) == n[0]

    (gap,) = await fetch(stored.url, "SELECT from_update_id FROM data_gaps")
    failures = {
        # A hole in the stored sequence, and an instant before anything was stored.
        ("book", "--symbol", "btcusdt", "--at", str(gap[0])): (1, "is unknowable: update ids"),
        ("book", "--symbol", "btcusdt", "--at", "2024-08-07"): (1, "no stored book of BTCUSDT"),
        ("book", "--at", "2024-08-08T00:00:10Z"): (2, "export book needs --symbol"),
        ("trades",): (2, "cannot export 'trades': choose one of ticks, orders"),
        ("ticks", "--start", "2024-08-08T00:00:00"): (2, "has no time zone"),
        ("ticks", "--end", "yesterday"): (2, "--end 'yesterday' is not an ISO-8601 time"),
        ("ticks", "--start", "2024-08-09", "--end", "2024-08-08"): (2, "is not before --end"),
        ("ticks", "--format", "xlsx"): (2, "--format 'xlsx': choose parquet or csv"),
    }
    for args, (want_code, message) in failures.items():
        target = stored.tmp / "failed.parquet"
        code, _, err = await depthflow("export", *args, "--out", str(target), url=stored.url)
        assert (code, len(err.strip().splitlines())) == (want_code, 1), (args, err)
        assert err.startswith("depthflow: "), (args, err)
        assert message in err, (args, err)
        # Neither the file nor its partial one is left behind.
        assert not target.exists()
        assert not list(stored.tmp.glob(".*.partial"))

    unreachable = "postgresql+asyncpg://postgres@127.0.0.1:1/depthflow"
    code, _, err = await depthflow("export", "ticks", "--out", str(out), url=unreachable)
    assert code == 1
    assert err.strip().count("\n") == 0, err
    assert "cannot reach PostgreSQL at 127.0.0.1:1" in err

    code, _, err = await depthflow(
        "export", "ticks", "--out", str(stored.tmp / "t.parquet"), url=stored.url,
        prelude="import sys; sys.modules['pyarrow'] = None",
    )  # fmt: skip
    assert code == 2
    assert err.strip() == (
        "depthflow: --format parquet needs pyarrow: pip install 'depthflow[export]' "
        "(or use --format csv)"
    )


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's VmHWM")
async def test_memory_does_not_grow_with_the_rows(stored: Stored) -> None:
    """Peak RSS of a 500k-row export minus that of a 50k-row one: a few MB when streamed, over
    100 MB if the rows were held (as Python objects) whatever the format."""
    conn = await asyncpg.connect(db.asyncpg_dsn(stored.url))
    try:
        await conn.execute(
            "INSERT INTO orders (symbol, event_time, last_update_id, side, price, quantity) "
            "SELECT 'BULKUSDT', $1::timestamptz + g * interval '1 ms', g, "
            "CASE WHEN g % 2 = 0 THEN 'bid' ELSE 'ask' END, 100 + g % 977 * 0.01, g % 13 * 0.1 "
            "FROM generate_series(1, 500000) AS g",
            T0 + timedelta(hours=1),
        )
    finally:
        await conn.close()
    # VmHWM, not ru_maxrss: Linux keeps the latter across exec, so it would be the forking
    # pytest process's own peak.
    peak = (
        "import atexit, pathlib, sys\n"
        "status = pathlib.Path('/proc/self/status')\n"
        "atexit.register(lambda: print('maxrss', [line.split()[1] for line in "
        "status.read_text().splitlines() if line.startswith('VmHWM:')][0], file=sys.stderr))"
    )
    # Parquet: Arrow and the writer warm up over the first row groups (small ones here, so
    # both exports have several); then nothing grows but the file. Arrow's allocator keeps
    # more or fewer pools depending on how the two threads interleave (43 MB seen on a machine
    # with both cores taken by other work): the bounds leave room for that, still well below
    # the 100 MB and more of holding the 450,000 extra rows.
    for fmt, bound_kb in (("csv", 30_000), ("parquet", 65_000)):
        peaks = []
        for seconds in (50, 500):
            end = (T0 + timedelta(hours=1, seconds=seconds, microseconds=1)).isoformat()
            out = stored.tmp / f"bulk.{fmt}"
            code, _, err = await depthflow(
                "export", "orders", "--symbol", "bulkusdt", "--end", end, "--out", str(out),
                "--chunk-rows", "10000",
                url=stored.url, prelude=peak,
            )  # fmt: skip
            assert code == 0, err
            assert f"exported {seconds * 1000:,} rows" in err
            peaks.append(int(err.rsplit("maxrss", 1)[1]))
        assert peaks[1] - peaks[0] < bound_kb, (fmt, peaks)
