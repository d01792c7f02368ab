"""Requests to the simulator: Binance's stream paths and its REST routes.

Parsing is pure; `process_request` answers the plain HTTP ones, given a `Routes` context (how to
read the book and the listings, the rate limiter, the connection rules).

Rules enforced, as on Binance's spot endpoints:

* a request URL longer than ``max_url_bytes`` (~8 KB, like the usual front-end servers) gets 414;
* a stream path naming more than ``max_streams`` streams (Binance: 1024 per connection) is
  refused at the handshake with 400 and a JSON error body;
* REST routes are weighed (`weight`): ``/api/v3/depth`` 5-250, ``/api/v3/exchangeInfo`` 20,
  ``/api/v3/ping`` and ``/api/v3/time`` 1; every answer of theirs carries
  ``X-MBX-USED-WEIGHT-1M``, over the limit a 429 and then 418 bans with ``Retry-After``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.http11 import Request, Response

from depthflow.simulate.weight import (
    EXCHANGE_INFO_WEIGHT,
    PING_WEIGHT,
    RETRY_AFTER_HEADER,
    USED_WEIGHT_HEADER,
    RateLimiter,
    Verdict,
    depth_weight,
)

__all__ = [
    "DEFAULT_MAX_STREAMS",
    "DEFAULT_MAX_URL_BYTES",
    "BadRequest",
    "DepthQuery",
    "Routes",
    "Subscription",
    "TooManyStreams",
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
DEFAULT_MAX_STREAMS = 1024  # Binance: "A single connection can listen to a maximum of 1024 streams"
DEFAULT_MAX_URL_BYTES = 8192

# The JSON body of a ``symbol`` book snapshot with at most ``limit`` levels a side; None if unknown.
SnapshotBody = Callable[[str, int], str | None]


class BadRequest(ValueError):
    """A request to refuse with 400 and this message."""


class TooManyStreams(BadRequest):
    """A stream path naming more streams than one connection may carry."""


@dataclass(frozen=True)
class Subscription:
    """``combined``: ``/stream?streams=`` (enveloped) or ``/ws/`` (raw); symbol -> stream name."""

    combined: bool
    streams: dict[str, str]


@dataclass(frozen=True)
class DepthQuery:
    symbol: str
    limit: int


def parse_subscription(
    path: str, symbols: set[str], max_streams: int | None = None
) -> Subscription:
    """The streams a websocket path asks for; `BadRequest` unless all are known depth streams,
    `TooManyStreams` if it names more than ``max_streams`` distinct ones."""
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
    if max_streams is not None and len({name.lower() for name in names}) > max_streams:
        raise TooManyStreams(
            f"Too many streams requested: {len(names)}; at most {max_streams} per connection."
        )
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
    return HTTPStatus.BAD_REQUEST, _error_body(code, message)


def _error_body(code: int, message: str) -> str:
    return msgspec.json.encode({"code": code, "msg": message}).decode()


def json_response(connection: ServerConnection, status: HTTPStatus, body: str) -> Response:
    """A plain HTTP answer from ``process_request``, labelled as JSON."""
    response = connection.respond(status, body)
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json;charset=UTF-8"
    return response


@dataclass
class Routes:
    """What `process_request` answers from: the listed symbols, the book and listing bodies, the
    limiter (None: weight neither counted nor reported) and the connection rules."""

    symbols: set[str]
    snapshot_body: SnapshotBody
    exchange_info_body: Callable[[list[str] | None], str] | None = None
    limiter: RateLimiter | None = None
    max_streams: int | None = DEFAULT_MAX_STREAMS
    max_url_bytes: int | None = DEFAULT_MAX_URL_BYTES
    server_time_ms: Callable[[], int] = field(default=lambda: 0)


def process_request(
    connection: ServerConnection, request: Request, routes: Routes
) -> Response | None:
    """websockets' ``process_request``: answer REST calls and bad paths; None lets a valid
    stream path through to the websocket handshake."""
    if routes.max_url_bytes is not None and len(request.path) > routes.max_url_bytes:
        return connection.respond(HTTPStatus.REQUEST_URI_TOO_LONG, "Request-URI Too Long\n")
    url = urlsplit(request.path)
    path = url.path
    if path == "/stream" or path.startswith("/ws/"):
        try:
            parse_subscription(request.path, routes.symbols, routes.max_streams)
        except TooManyStreams as exc:
            return json_response(connection, HTTPStatus.BAD_REQUEST, _error_body(-1101, str(exc)))
        except BadRequest as exc:
            return connection.respond(HTTPStatus.BAD_REQUEST, f"{exc}\n")
        return None
    weight = _weight(path, url.query, routes)
    if weight is None:
        return connection.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
    verdict = None
    if routes.limiter is not None:
        verdict = routes.limiter.admit(_client(connection), weight)
        routes.limiter.stats.requests_by_path[path] += 1
    if verdict is not None and verdict.status != HTTPStatus.OK:
        status, body = _refusal(verdict, routes)
    else:
        status, body = _serve(path, url.query, routes)
    response = json_response(connection, status, body)
    if verdict is not None:
        response.headers[USED_WEIGHT_HEADER] = str(verdict.used)
        if verdict.retry_after is not None:
            response.headers[RETRY_AFTER_HEADER] = str(verdict.retry_after)
        routes.limiter.stats.statuses[status] += 1  # type: ignore[union-attr]
    return response


def _weight(path: str, query: str, routes: Routes) -> int | None:
    """The route's weight; None for a path that is not served."""
    if path == "/api/v3/depth":
        return depth_weight(requested_limit(query))
    if path == "/api/v3/exchangeInfo" and routes.exchange_info_body is not None:
        return EXCHANGE_INFO_WEIGHT
    if path in ("/api/v3/ping", "/api/v3/time"):
        return PING_WEIGHT
    return None


def _serve(path: str, query: str, routes: Routes) -> tuple[HTTPStatus, str]:
    if path == "/api/v3/depth":
        return _depth(query, routes.symbols, routes.snapshot_body)
    if path == "/api/v3/exchangeInfo" and routes.exchange_info_body is not None:
        return _exchange_info(query, routes.symbols, routes.exchange_info_body)
    if path == "/api/v3/time":
        return HTTPStatus.OK, '{"serverTime":' + str(routes.server_time_ms()) + "}"
    return HTTPStatus.OK, "{}"  # ping


def _refusal(verdict: Verdict, routes: Routes) -> tuple[HTTPStatus, str]:
    limit = routes.limiter.limit if routes.limiter is not None else None
    if verdict.status == HTTPStatus.TOO_MANY_REQUESTS:
        message = (
            f"Too much request weight used; current limit is {limit} request weight per 1 "
            "MINUTE. Please use WebSocket Streams for live updates to avoid polling the API."
        )
    else:
        message = (
            f"Way too much request weight used; IP banned until {verdict.banned_until_ms}. "
            "Please use WebSocket Streams for live updates to avoid bans."
        )
    return verdict.status, _error_body(-1003, message)


def _exchange_info(
    query: str, symbols: set[str], body: Callable[[list[str] | None], str]
) -> tuple[HTTPStatus, str]:
    """``GET /api/v3/exchangeInfo``, optionally ``?symbol=X`` or ``?symbols=["X","Y"]``."""
    params = parse_qs(query)
    wanted: list[str] | None = None
    if "symbol" in params:
        wanted = [params["symbol"][0]]
    elif "symbols" in params:
        try:
            decoded = msgspec.json.decode(params["symbols"][0])
        except msgspec.DecodeError:
            decoded = None
        if not isinstance(decoded, list) or not all(isinstance(s, str) for s in decoded):
            return binance_error(-1100, "Illegal characters found in parameter 'symbols'.")
        wanted = decoded
    if wanted is not None:
        wanted = [s.lower() for s in wanted]
        if not all(s in symbols for s in wanted):
            return binance_error(-1121, "Invalid symbol.")
    return HTTPStatus.OK, body(wanted)


def _depth(query: str, symbols: set[str], snapshot_body: SnapshotBody) -> tuple[HTTPStatus, str]:
    """``GET /api/v3/depth``: status and JSON body, errors shaped like Binance's."""
    parsed = parse_depth_query(query, symbols)
    if not isinstance(parsed, DepthQuery):
        return parsed
    body = snapshot_body(parsed.symbol, parsed.limit)
    if body is None:
        return binance_error(-1121, "Invalid symbol.")
    return HTTPStatus.OK, body
