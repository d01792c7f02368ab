"""Requests to the simulator: Binance's stream paths and ``GET /api/v3/depth``.

Parsing is pure; `process_request` answers the plain HTTP ones, given a way to read the book.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from depthflow.simulate.weight import USED_WEIGHT_HEADER, UsedWeight, depth_weight

__all__ = [
    "BadRequest",
    "DepthQuery",
    "Subscription",
    "binance_error",
    "json_response",
    "parse_depth_query",
    "parse_subscription",
    "process_request",
    "requested_limit",
]

_STREAM_NAME = re.compile(r"^([a-z0-9]+)@depth(?:@100ms|@1000ms)?$")
_DEFAULT_LIMIT = 100  # Binance: "Default 100; Maximum 5000"
_MAX_LIMIT = 5000

# The JSON body of a ``symbol`` book snapshot with at most ``limit`` levels a side; None if unknown.
SnapshotBody = Callable[[str, int], str | None]


class BadRequest(ValueError):
    """A request to refuse with 400 and this message."""


@dataclass(frozen=True)
class Subscription:
    """``combined``: ``/stream?streams=`` (enveloped) or ``/ws/`` (raw); symbol -> stream name."""

    combined: bool
    streams: dict[str, str]


@dataclass(frozen=True)
class DepthQuery:
    symbol: str
    limit: int


def parse_subscription(path: str, symbols: set[str]) -> Subscription:
    """The streams a websocket path asks for; `BadRequest` unless all are known depth streams."""
    url = urlsplit(path)
    if url.path == "/stream":
        query = parse_qs(url.query).get("streams", [])
        names = [name for value in query for name in value.split("/") if name]
        combined = True
    else:
        names = [name for name in url.path.removeprefix("/ws/").split("/") if name]
        combined = False
    if not names:
        raise BadRequest("no stream requested")
    streams: dict[str, str] = {}
    for name in names:
        match = _STREAM_NAME.match(name.lower())
        if match is None or match.group(1) not in symbols:
            raise BadRequest(f"invalid stream name {name!r}")
        streams[match.group(1)] = name.lower()
    return Subscription(combined, streams)


def parse_depth_query(query: str, symbols: set[str]) -> DepthQuery | tuple[HTTPStatus, str]:
    """The symbol (lower case) and limit asked for, or a Binance-style error response."""
    params = parse_qs(query)
    symbol = (params.get("symbol") or [""])[0].lower()
    raw_limit = (params.get("limit") or [str(_DEFAULT_LIMIT)])[0]
    if not symbol:
        return binance_error(-1102, "Mandatory parameter 'symbol' was not sent.")
    if not raw_limit.isdigit():
        return binance_error(-1100, "Illegal characters found in parameter 'limit'.")
    if symbol not in symbols:
        return binance_error(-1121, "Invalid symbol.")
    # Binance answers limits above the maximum with the maximum rather than an error.
    return DepthQuery(symbol, requested_limit(query))


def requested_limit(query: str) -> int:
    """The depth limit a query is served (and charged) with; the default when it is not valid."""
    raw_limit = (parse_qs(query).get("limit") or [""])[0]
    if not raw_limit.isdigit():
        return _DEFAULT_LIMIT
    return min(max(int(raw_limit), 1), _MAX_LIMIT)


def _client(connection: ServerConnection) -> str:
    """The client's IP address, which Binance counts weight by."""
    address = connection.remote_address
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


def binance_error(code: int, message: str) -> tuple[HTTPStatus, str]:
    """Binance's error body: ``{"code": -1121, "msg": "Invalid symbol."}`` with a 400."""
    return HTTPStatus.BAD_REQUEST, msgspec.json.encode({"code": code, "msg": message}).decode()


def json_response(connection: ServerConnection, status: HTTPStatus, body: str) -> Response:
    """A plain HTTP answer from ``process_request``, labelled as JSON."""
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json;charset=UTF-8"
    return response


def process_request(
    connection: ServerConnection,
    request: Request,
    symbols: set[str],
    snapshot_body: SnapshotBody,
    used_weight: UsedWeight | None = None,
) -> Response | None:
    """websockets' ``process_request``: answer depth REST calls and bad paths; None lets a valid
    stream path through to the websocket handshake.

    With ``used_weight``, every depth answer (errors too) carries ``X-MBX-USED-WEIGHT-1M``: the
    weight the client's address spent in the last minute, this request included.
    """
    url = urlsplit(request.path)
    if url.path == "/api/v3/depth":
        status, body = _depth(url.query, symbols, snapshot_body)
        response = json_response(connection, status, body)
        if used_weight is not None:
            used = used_weight.add(_client(connection), depth_weight(requested_limit(url.query)))
            response.headers[USED_WEIGHT_HEADER] = str(used)
        return response
    if url.path == "/stream" or url.path.startswith("/ws/"):
        try:
            parse_subscription(request.path, symbols)
        except BadRequest as exc:
            return connection.respond(HTTPStatus.BAD_REQUEST, f"{exc}\n")
        return None
    return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")


def _depth(query: str, symbols: set[str], snapshot_body: SnapshotBody) -> tuple[HTTPStatus, str]:
    """``GET /api/v3/depth``: status and JSON body, errors shaped like Binance's."""
    parsed = parse_depth_query(query, symbols)
    if not isinstance(parsed, DepthQuery):
        return parsed
    body = snapshot_body(parsed.symbol, parsed.limit)
    if body is None:
        return binance_error(-1121, "Invalid symbol.")
    return HTTPStatus.OK, body
