"""`depthflow export` without a database: arguments, queries, writers and the progress line."""

from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from depthflow.book_history import PastBook
from depthflow.errors import UserError
from depthflow.export.book import book_instants, book_rows
from depthflow.export.files import Column, CsvSink, ParquetFromCsv
from depthflow.export.queries import SOURCES, Filters, count_query, select_query
from depthflow.export.request import ExportResult, build_request, parse_instant, parse_time
from depthflow.progress import Progress

AUG8 = datetime(2024, 8, 8, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "moment"),
    [
        ("2024-08-08", AUG8),
        ("2024-08-08T23:59:30Z", AUG8 + timedelta(hours=23, minutes=59, seconds=30)),
        ("2024-08-08T02:00:00.5+02:00", AUG8 + timedelta(microseconds=500_000)),
        (" 2024-08-08 00:00:01+00:00 ", AUG8 + timedelta(seconds=1)),
    ],
)
def test_times_need_a_zone_and_a_date_is_midnight_utc(text: str, moment: datetime) -> None:
    parsed = parse_time(text, "--start")
    assert parsed == moment
    assert parsed.tzinfo is UTC


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2024-08-08T10:00:00", "--end '2024-08-08T10:00:00' has no time zone (add Z or +00:00)"),
        ("last tuesday", "--end 'last tuesday' is not an ISO-8601 time"),
    ],
)
def test_bad_times_are_usage_errors(text: str, message: str) -> None:
    with pytest.raises(UserError, match="^" + re.escape(message)) as e:
        parse_time(text, "--end")
    assert e.value.exit_code == 2


def test_an_instant_is_an_update_id_or_a_time() -> None:
    assert parse_instant("123456789") == 123456789
    assert parse_instant("2024-08-08") == AUG8


def test_queries_filter_and_order_deterministically() -> None:
    start, end = AUG8, AUG8 + timedelta(days=1)
    query = select_query(SOURCES["orders"], Filters("BTCUSDT", start, end))
    assert query.sql == (
        "SELECT id, symbol, event_time, last_update_id, side, price, quantity FROM orders "
        "WHERE symbol = $1 AND event_time >= $2 AND event_time < $3 "
        "ORDER BY symbol, event_time, id"
    )
    assert query.args == ("BTCUSDT", start, end)
    gaps = select_query(SOURCES["gaps"], Filters(end=end), text_times=True)
    assert "WHERE to_time < $1 ORDER BY symbol, to_time, id" in gaps.sql
    assert (
        "to_char(from_time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS" in gaps.sql
    )
    assert gaps.args == (end,)
    everything = count_query(SOURCES["ticks"], Filters())
    assert (everything.sql, everything.args) == ("SELECT count(*) FROM price_ticks", ())


def test_requests_are_checked_before_any_connection(tmp_path: Path) -> None:
    out = tmp_path / "x.parquet"
    request = build_request("orders", tmp_path / "o.csv.gz", symbol=" btcusdt ", end="2024-08-09")
    assert request.format == "csv"
    assert request.filters == Filters("BTCUSDT", None, AUG8 + timedelta(days=1))
    assert build_request("ticks", out).format == "parquet"
    book = build_request("book", out, symbol="ethusdt", at="42", depth=3)
    assert (book.at, book.depth, book.filters.symbol) == (42, 3, "ETHUSDT")
    bad = {
        ("trades", ()): "cannot export 'trades'",
        ("book", (("at", "1"),)): "export book needs --symbol",
        ("book", (("symbol", "x"),)): "needs either --at, or --every",
        ("book", (("symbol", "x"), ("every_s", 1.0))): "--every needs --start and --end",
        ("book", (("symbol", "x"), ("at", "1"), ("start", "2024-08-08"))): "takes no --start",
        ("ticks", (("depth", 5),)): "for `depthflow export book` only",
        ("ticks", (("format", "json"),)): "choose parquet or csv",
        ("ticks", (("start", "2024-08-09"), ("end", "2024-08-09"))): "is not before --end",
    }
    for (what, options), message in bad.items():
        with pytest.raises(UserError, match=message) as e:
            build_request(what, out, **dict(options))  # type: ignore[arg-type]
        assert e.value.exit_code == 2
    with pytest.raises(UserError, match=r"directory .* does not exist"):
        build_request("ticks", tmp_path / "missing" / "x.csv")


def test_the_summary_names_rows_file_size_and_time() -> None:
    result = ExportResult(1_234_567, Path("o.parquet"), 45_600_000, 3.04)
    assert result.summary() == "exported 1,234,567 rows to o.parquet (45.6 MB) in 3.0 s"
    assert "(999 B)" in ExportResult(1, Path("x"), 999, 0.0).summary()
    assert "(1.0 kB)" in ExportResult(1, Path("x"), 1000, 0.0).summary()
    skipped = ExportResult(10, Path("b.csv"), 2_500, 1.0, skipped=3).summary()
    assert skipped.endswith("(2.5 kB) in 1.0 s; 3 unknowable instant(s) skipped")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_on_a_terminal_redraws_one_line_with_an_eta() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(stream, "export orders", tty=True, clock=clock)
    clock.now += 3.0  # counting the rows: not part of the rate
    progress.begin(1_000_000, exact=False)
    progress.advance(50_000)  # too soon to draw
    assert stream.getvalue() == ""
    clock.now += 1.0
    progress.advance(150_000)
    assert stream.getvalue() == (
        "\r\x1b[2Kexport orders: 200,000 / ~1,000,000 rows (20%)  200,000 rows/s  ETA 0:04"
    )
    progress.finish()
    assert stream.getvalue().endswith("\r\x1b[2K")


def test_progress_elsewhere_writes_a_line_every_five_seconds() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = Progress(stream, "export ticks", tty=False, clock=clock)
    for _ in range(12):
        clock.now += 1.0
        progress.advance(1000)
    # No total: no ETA; a total passed (an estimate) gives none either.
    assert stream.getvalue().splitlines() == [
        "export ticks: 5,000 rows  1,000 rows/s",
        "export ticks: 10,000 rows  1,000 rows/s",
    ]
    progress.total, progress.exact = 2000, True
    assert progress.line(clock.now) == "export ticks: 12,000 / 2,000 rows (100%)  1,000 rows/s"
    progress.finish()
    assert stream.getvalue().count("\n") == 2


def test_csv_rows_read_back_exactly(tmp_path: Path) -> None:
    columns = [Column("at", "time"), Column("n", "int"), Column("x", "float"), Column("s", "text")]
    path = tmp_path / "rows.csv"
    sink = CsvSink(path.open("wb"), columns)
    east = timezone(timedelta(hours=3))
    sink.write([(datetime(2024, 8, 8, 3, 0, 0, 123, tzinfo=east), 1, 0.1 + 0.2, "bid")])
    sink.write([(None, -2, 1e-05, "a,b")])
    sink.close()
    assert path.read_text() == (
        'at,n,x,s\n2024-08-08T00:00:00.000123Z,1,0.30000000000000004,bid\n,-2,1e-05,"a,b"\n'
    )


async def test_parquet_from_csv_makes_row_groups_and_typed_columns(tmp_path: Path) -> None:
    columns = [Column("id", "int"), Column("t", "time"), Column("x", "float"), Column("s", "text")]
    path = tmp_path / "p.parquet"
    lines = b"".join(
        b"%d,2024-08-08 00:00:0%d.5+00,%d.25,bid\n" % (i, i % 10, i) for i in range(25)
    )
    async with ParquetFromCsv(path, columns, chunk_rows=10) as parquet:
        # Cut mid-line: blocks are bytes, not rows.
        for i in range(0, len(lines), 7):
            await parquet.feed(lines[i : i + 7])
    table = pq.read_table(path)
    assert table.schema == pa.schema(
        [("id", pa.int64()), ("t", pa.timestamp("us", tz="UTC")), ("x", pa.float64()),
         ("s", pa.string())]
    )  # fmt: skip
    assert table.column("id").to_pylist() == list(range(25))
    assert table.column("x").to_pylist()[3] == 3.25
    assert table.column("t").to_pylist()[3] == AUG8 + timedelta(seconds=3.5)
    metadata = pq.ParquetFile(path).metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert sizes == [10, 10, 5]


async def test_parquet_from_nothing_is_the_schema_alone(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    async with ParquetFromCsv(path, [Column("id", "int")], chunk_rows=10):
        pass
    table = pq.read_table(path)
    assert (table.num_rows, table.schema.names) == (0, ["id"])


async def test_a_parse_failure_surfaces_and_never_blocks_the_producer(tmp_path: Path) -> None:
    async def bad_row() -> None:
        async with ParquetFromCsv(tmp_path / "a.parquet", [Column("a", "int")], 10) as parquet:
            await parquet.feed(b"1\n2,3\n")

    with pytest.raises(pa.ArrowInvalid, match="Expected 1 columns"):
        await bad_row()

    async def many_bad_blocks() -> None:
        async with ParquetFromCsv(tmp_path / "b.parquet", [Column("a", "int")], 10) as parquet:
            # Far more blocks than the queue holds: the thread fails on the first, and the
            # producer hears of it at a later feed instead of waiting on a full queue.
            for _ in range(100):
                await parquet.feed(b"x\n" * 600_000)

    with pytest.raises(RuntimeError, match=r"writing .*b\.parquet failed: .*int64"):
        await many_bad_blocks()


def test_book_rows_are_levels_best_first_bids_then_asks() -> None:
    book = PastBook(
        "BTCUSDT", 7, AUG8, {99.0: 1.0, 100.0: 2.0, 98.0: 3.0}, {101.0: 4.0, 102.5: 5.0}
    )
    at = AUG8 + timedelta(seconds=1)
    assert book_rows(at, book, depth=2) == [
        (at, "BTCUSDT", 7, AUG8, "bid", 1, 100.0, 2.0),
        (at, "BTCUSDT", 7, AUG8, "bid", 2, 99.0, 1.0),
        (at, "BTCUSDT", 7, AUG8, "ask", 1, 101.0, 4.0),
        (at, "BTCUSDT", 7, AUG8, "ask", 2, 102.5, 5.0),
    ]
    assert len(book_rows(at, book)) == 5


def test_book_instants_stop_before_the_end() -> None:
    end = AUG8 + timedelta(seconds=2)
    assert list(book_instants(AUG8, end, 0.75)) == [
        AUG8,
        AUG8 + timedelta(seconds=0.75),
        AUG8 + timedelta(seconds=1.5),
    ]
