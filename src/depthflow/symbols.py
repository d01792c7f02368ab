"""Which symbols to follow: `SYMBOLS` names and patterns resolved through Binance's exchangeInfo.

Pure: the caller fetches ``GET /api/v3/exchangeInfo`` (weight 20) and hands the body in. A
pattern (``*``, ``*usdt``, ``btc*``; fnmatch syntax, case-insensitive) matches the listed
symbols whose status is TRADING; a plain name must be listed at all, else start-up stops with a
line that names it (a retry loop would only starve the other symbols).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence

import msgspec

__all__ = [
    "SymbolsError",
    "is_pattern",
    "listed_symbols",
    "request_weight_per_minute",
    "resolve",
]

TRADING = "TRADING"


class SymbolsError(ValueError):
    """`SYMBOLS` names symbols the exchange does not list."""

    def __init__(self, missing: Sequence[str]) -> None:
        super().__init__(f"not listed by the exchange: {', '.join(missing)}")
        self.missing = list(missing)


class _Symbol(msgspec.Struct):
    symbol: str
    status: str


class _RateLimit(msgspec.Struct):
    rateLimitType: str
    interval: str
    intervalNum: int
    limit: int


class _ExchangeInfo(msgspec.Struct):
    symbols: list[_Symbol]
    rateLimits: list[_RateLimit] = msgspec.field(default_factory=list)


_decoder = msgspec.json.Decoder(_ExchangeInfo)


def request_weight_per_minute(body: str | bytes) -> int | None:
    """The ``REQUEST_WEIGHT`` limit per minute that exchangeInfo announces, if any."""
    for limit in _decoder.decode(body).rateLimits:
        if limit.rateLimitType == "REQUEST_WEIGHT" and limit.interval == "MINUTE":
            return limit.limit // max(1, limit.intervalNum)
    return None


def is_pattern(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def listed_symbols(body: str | bytes) -> dict[str, str]:
    """Symbol -> status from an exchangeInfo body; raises msgspec errors if it is not one."""
    return {s.symbol.upper(): s.status for s in _decoder.decode(body).symbols}


def resolve(spec: Sequence[str], listed: Mapping[str, str], *, strict: bool = True) -> list[str]:
    """The symbols ``spec`` selects, upper case, in a stable order (names first, as given).

    ``strict``: a name the exchange does not list raises `SymbolsError`; otherwise (a refresh,
    long after start) it is kept as it is: a delisting of a name someone asked for is logged by
    the caller, not acted on."""
    chosen: dict[str, None] = {}
    missing = []
    for item in spec:
        if is_pattern(item):
            pattern = item.upper()
            chosen.update(
                dict.fromkeys(
                    sorted(
                        s
                        for s, status in listed.items()
                        if status == TRADING and fnmatch.fnmatchcase(s, pattern)
                    )
                )
            )
        elif item.upper() in listed or not strict:
            chosen[item.upper()] = None
        else:
            missing.append(item.upper())
    if missing:
        raise SymbolsError(missing)
    return list(chosen)
