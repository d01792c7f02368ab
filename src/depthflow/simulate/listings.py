"""The symbols the simulator lists, and ``GET /api/v3/exchangeInfo`` built from them.

Listings change at run time (`Listings.set_status`, `Listings.remove`), so a client's periodic
symbol refresh can be tested; the encoded ``symbols`` array is cached until they do, because
a whole-market listing is megabytes of JSON.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import msgspec

from depthflow.simulate.weight import DEFAULT_WEIGHT_LIMIT

__all__ = ["BREAK", "STATUSES", "TRADING", "Listings", "split_symbol"]

TRADING = "TRADING"
BREAK = "BREAK"
# Binance's symbol statuses (SymbolStatus).
STATUSES = frozenset({"PRE_TRADING", TRADING, "POST_TRADING", "END_OF_DAY", "HALT", "AUCTION_MATCH",
                      BREAK})  # fmt: skip
# Longest first, so "FDUSD" wins over "USD"-like endings.
_QUOTES = ("FDUSD", "USDT", "USDC", "TUSD", "BUSD", "BTC", "ETH", "BNB", "EUR", "TRY", "BRL",
           "JPY", "DAI")  # fmt: skip
_DEFAULT_TICK = "0.01000000"
_STEP = "0.00001000"  # the simulated markets' lot: quantities are multiples of 0.00001
_MAX_QTY = "9000.00000000"


def split_symbol(symbol: str) -> tuple[str, str]:
    """``BTCUSDT`` -> ``("BTC", "USDT")``: the longest known quote asset it ends with."""
    upper = symbol.upper()
    for quote in _QUOTES:
        if upper.endswith(quote) and len(upper) > len(quote):
            return upper[: -len(quote)], quote
    return upper[:-4] or upper, upper[-4:]


def _symbol_info(symbol: str, status: str, tick: str) -> dict[str, object]:
    base, quote = split_symbol(symbol)
    return {
        "symbol": symbol.upper(),
        "status": status,
        "baseAsset": base,
        "baseAssetPrecision": 8,
        "quoteAsset": quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET", "STOP_LOSS_LIMIT", "TAKE_PROFIT_LIMIT"],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": tick,
                "maxPrice": "1000000.00000000",
                "tickSize": tick,
            },
            {"filterType": "LOT_SIZE", "minQty": _STEP, "maxQty": _MAX_QTY, "stepSize": _STEP},
        ],
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"],
    }


class Listings:
    """Symbol (lower case) -> Binance status, in listing order, with their tick sizes."""

    def __init__(
        self,
        symbols: Iterable[str],
        *,
        statuses: Mapping[str, str] | None = None,
        ticks: Mapping[str, str] | None = None,
        weight_limit: int | None = DEFAULT_WEIGHT_LIMIT,
    ) -> None:
        self._status: dict[str, str] = {}
        self._ticks: dict[str, str] = {}
        self._weight_limit = weight_limit if weight_limit is not None else DEFAULT_WEIGHT_LIMIT
        self._cached: str | None = None
        for symbol in symbols:
            self.set_status(symbol, TRADING, tick=(ticks or {}).get(symbol.lower()))
        for symbol, status in (statuses or {}).items():
            self.set_status(symbol, status)

    def __contains__(self, symbol: object) -> bool:
        return isinstance(symbol, str) and symbol.lower() in self._status

    def status(self, symbol: str) -> str | None:
        return self._status.get(symbol.lower())

    def trading(self, symbol: str) -> bool:
        return self._status.get(symbol) == TRADING

    @property
    def statuses(self) -> dict[str, str]:
        """Symbol (lower case) -> status, a copy."""
        return dict(self._status)

    def set_status(self, symbol: str, status: str, *, tick: str | None = None) -> None:
        """List ``symbol`` (if new) with ``status``; ``tick``: its PRICE_FILTER tickSize."""
        if status not in STATUSES:
            raise ValueError(f"unknown symbol status {status!r}")
        lower = symbol.lower()
        self._status[lower] = status
        if tick is not None or lower not in self._ticks:
            self._ticks[lower] = tick or _DEFAULT_TICK
        self._cached = None

    def remove(self, symbol: str) -> None:
        """Delist ``symbol`` (no-op if it is not listed)."""
        lower = symbol.lower()
        if self._status.pop(lower, None) is not None:
            self._ticks.pop(lower, None)
            self._cached = None

    def rate_limits(self) -> list[dict[str, object]]:
        return [
            {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1,
             "limit": self._weight_limit},
            {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
            {"rateLimitType": "ORDERS", "interval": "DAY", "intervalNum": 1, "limit": 200000},
            {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5,
             "limit": 61000},
        ]  # fmt: skip

    def body(self, server_time_ms: int, only: Iterable[str] | None = None) -> str:
        """The exchangeInfo JSON; ``only``: just these (listed, lower-case) symbols."""
        if only is None:
            if self._cached is None:
                self._cached = self._encode(self._status)
            symbols = self._cached
        else:
            symbols = self._encode({s: self._status[s] for s in only})
        head = msgspec.json.encode(
            {"timezone": "UTC", "serverTime": server_time_ms, "rateLimits": self.rate_limits(),
             "exchangeFilters": []}
        ).decode()  # fmt: skip
        return head[:-1] + ',"symbols":' + symbols + "}"

    def _encode(self, statuses: Mapping[str, str]) -> str:
        infos = [_symbol_info(s, status, self._ticks[s]) for s, status in statuses.items()]
        return msgspec.json.encode(infos).decode()
