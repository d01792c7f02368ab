"""`depthflow.symbols`: `SYMBOLS` names and patterns resolved through exchangeInfo (pure)."""

from __future__ import annotations

import msgspec
import pytest

from depthflow.simulate.listings import Listings
from depthflow.symbols import SymbolsError, is_pattern, listed_symbols, resolve

LISTED = {
    "BTCUSDT": "TRADING",
    "ETHUSDT": "TRADING",
    "BNBUSDT": "BREAK",
    "BTCFDUSD": "TRADING",
    "ETHBTC": "TRADING",
    "BTCEUR": "HALT",
    "SOLUSDT": "TRADING",
}


# -- is_pattern ------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["*", "*usdt", "btc*", "b?cusdt", "[be]thusdt", "*BTC*"])
def test_patterns_are_recognised(spec: str) -> None:
    assert is_pattern(spec)


@pytest.mark.parametrize("spec", ["btcusdt", "BTCUSDT", "s0001usdt", ""])
def test_plain_names_are_not_patterns(spec: str) -> None:
    assert not is_pattern(spec)


# -- names -----------------------------------------------------------------------------------------


def test_names_are_upper_cased_whatever_the_case_given() -> None:
    assert resolve(["btcusdt", "EthUsdt"], LISTED) == ["BTCUSDT", "ETHUSDT"]


def test_a_listed_name_is_kept_even_when_not_trading() -> None:
    # Only patterns filter on status: a name someone asked for is followed as it is.
    assert resolve(["bnbusdt", "btceur"], LISTED) == ["BNBUSDT", "BTCEUR"]


def test_an_unknown_name_raises_symbols_error_naming_it() -> None:
    with pytest.raises(SymbolsError) as caught:
        resolve(["btcusdt", "nosuchusdt"], LISTED)
    assert caught.value.missing == ["NOSUCHUSDT"]
    assert "NOSUCHUSDT" in str(caught.value)
    assert "BTCUSDT" not in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_every_unknown_name_is_named_once_in_order() -> None:
    with pytest.raises(SymbolsError) as caught:
        resolve(["zzzusdt", "btcusdt", "aaausdt", "*usdt"], LISTED)
    assert caught.value.missing == ["ZZZUSDT", "AAAUSDT"]
    assert str(caught.value) == "not listed by the exchange: ZZZUSDT, AAAUSDT"


def test_not_strict_keeps_unknown_names_as_given() -> None:
    assert resolve(["nosuchusdt", "btcusdt"], LISTED, strict=False) == ["NOSUCHUSDT", "BTCUSDT"]


def test_not_strict_with_nothing_listed_keeps_names_and_drops_patterns() -> None:
    assert resolve(["btcusdt", "*"], {}, strict=False) == ["BTCUSDT"]


def test_strict_with_nothing_listed_raises_for_names_only() -> None:
    assert resolve(["*"], {}) == []
    with pytest.raises(SymbolsError):
        resolve(["btcusdt"], {})


# -- patterns --------------------------------------------------------------------------------------


def test_star_selects_every_trading_symbol_sorted() -> None:
    assert resolve(["*"], LISTED) == sorted(
        s for s, status in LISTED.items() if status == "TRADING"
    )


def test_suffix_pattern_case_insensitive() -> None:
    assert resolve(["*usdt"], LISTED) == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]
    assert resolve(["*USDT"], LISTED) == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def test_prefix_pattern_skips_symbols_not_trading() -> None:
    # BTCEUR is HALT: a pattern does not select it.
    assert resolve(["btc*"], LISTED) == ["BTCFDUSD", "BTCUSDT"]


@pytest.mark.parametrize(
    "status", ["BREAK", "HALT", "PRE_TRADING", "POST_TRADING", "END_OF_DAY", "AUCTION_MATCH"]
)
def test_patterns_select_trading_only(status: str) -> None:
    listed = {"AAAUSDT": status, "BBBUSDT": "TRADING"}
    assert resolve(["*"], listed) == ["BBBUSDT"]
    assert resolve(["aaa*"], listed) == []


def test_a_pattern_matching_nothing_is_no_error() -> None:
    assert resolve(["xyz*"], LISTED) == []
    assert resolve(["xyz*"], LISTED, strict=False) == []


def test_question_mark_and_brackets() -> None:
    assert resolve(["?thusdt"], LISTED) == ["ETHUSDT"]
    assert resolve(["[bs]*usdt"], LISTED) == ["BTCUSDT", "SOLUSDT"]


def test_pattern_matches_the_whole_name() -> None:
    # fnmatch anchors both ends: "btc" alone is a name, "*btc" only names ending in BTC.
    assert resolve(["*btc"], LISTED) == ["ETHBTC"]


# -- order and duplicates --------------------------------------------------------------------------


def test_order_is_names_and_patterns_as_given_without_duplicates() -> None:
    chosen = resolve(["solusdt", "*usdt", "ethbtc", "btc*", "SOLUSDT"], LISTED)
    assert chosen == ["SOLUSDT", "BTCUSDT", "ETHUSDT", "ETHBTC", "BTCFDUSD"]
    assert len(chosen) == len(set(chosen))


def test_a_name_first_keeps_its_place_before_the_pattern() -> None:
    assert resolve(["ethusdt", "*usdt"], LISTED) == ["ETHUSDT", "BTCUSDT", "SOLUSDT"]


def test_a_pattern_first_then_a_name_it_matched_does_not_move_it() -> None:
    assert resolve(["*usdt", "btcusdt"], LISTED) == ["BTCUSDT", "ETHUSDT", "SOLUSDT"]


def test_overlapping_patterns_dedupe() -> None:
    assert resolve(["*", "*usdt", "btc*"], LISTED) == resolve(["*"], LISTED)


def test_resolve_is_stable_whatever_the_listing_order() -> None:
    reversed_listing = dict(reversed(list(LISTED.items())))
    assert resolve(["*usdt", "btc*"], reversed_listing) == resolve(["*usdt", "btc*"], LISTED)


def test_resolve_does_not_change_its_inputs() -> None:
    spec = ("btc*", "ethusdt")
    listed = dict(LISTED)
    resolve(spec, listed)
    assert listed == LISTED
    assert spec == ("btc*", "ethusdt")


# -- listed_symbols --------------------------------------------------------------------------------

# Shaped like Binance's GET /api/v3/exchangeInfo (fields trimmed from a real answer).
REAL_SHAPED = b"""{
  "timezone": "UTC",
  "serverTime": 1723100000000,
  "rateLimits": [
    {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
    {"rateLimitType": "ORDERS", "interval": "SECOND", "intervalNum": 10, "limit": 100},
    {"rateLimitType": "RAW_REQUESTS", "interval": "MINUTE", "intervalNum": 5, "limit": 61000}
  ],
  "exchangeFilters": [],
  "symbols": [
    {
      "symbol": "ETHBTC",
      "status": "TRADING",
      "baseAsset": "ETH",
      "baseAssetPrecision": 8,
      "quoteAsset": "BTC",
      "quotePrecision": 8,
      "quoteAssetPrecision": 8,
      "orderTypes": ["LIMIT", "LIMIT_MAKER", "MARKET"],
      "icebergAllowed": true,
      "ocoAllowed": true,
      "isSpotTradingAllowed": true,
      "isMarginTradingAllowed": true,
      "filters": [
        {"filterType": "PRICE_FILTER", "minPrice": "0.00001000", "maxPrice": "922327.00000000",
         "tickSize": "0.00001000"},
        {"filterType": "LOT_SIZE", "minQty": "0.00010000", "maxQty": "100000.00000000",
         "stepSize": "0.00010000"}
      ],
      "permissions": [],
      "permissionSets": [["SPOT", "MARGIN"]],
      "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
      "allowedSelfTradePreventionModes": ["EXPIRE_TAKER", "EXPIRE_MAKER", "EXPIRE_BOTH"]
    },
    {"symbol": "BTCUSDT", "status": "TRADING", "baseAsset": "BTC", "quoteAsset": "USDT",
     "filters": [], "permissions": []},
    {"symbol": "LUNAUSDT", "status": "BREAK", "baseAsset": "LUNA", "quoteAsset": "USDT",
     "filters": [], "permissions": []}
  ]
}"""


def test_listed_symbols_parses_a_real_shaped_body() -> None:
    listed = listed_symbols(REAL_SHAPED)
    assert listed == {"ETHBTC": "TRADING", "BTCUSDT": "TRADING", "LUNAUSDT": "BREAK"}
    assert list(listed) == ["ETHBTC", "BTCUSDT", "LUNAUSDT"]
    assert listed_symbols(REAL_SHAPED.decode()) == listed
    assert resolve(["*usdt"], listed) == ["BTCUSDT"]
    assert resolve(["lunausdt"], listed) == ["LUNAUSDT"]


def test_listed_symbols_upper_cases_names() -> None:
    body = b'{"symbols": [{"symbol": "btcusdt", "status": "TRADING"}]}'
    assert listed_symbols(body) == {"BTCUSDT": "TRADING"}


def test_listed_symbols_of_the_simulators_exchange_info() -> None:
    listings = Listings(["btcusdt", "ethusdt", "s0001usdt"], statuses={"ethusdt": "BREAK"})
    listed = listed_symbols(listings.body(1_700_000_000_000))
    assert listed == {"BTCUSDT": "TRADING", "ETHUSDT": "BREAK", "S0001USDT": "TRADING"}
    assert resolve(["*"], listed) == ["BTCUSDT", "S0001USDT"]


def test_listed_symbols_of_an_empty_listing() -> None:
    assert listed_symbols(b'{"symbols": []}') == {}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b"{}",  # no symbols at all
        b'{"symbols": {}}',
        b'{"symbols": [{"symbol": "BTCUSDT"}]}',  # no status
        b'{"symbols": [{"symbol": 1, "status": "TRADING"}]}',
        b'{"code": -1003, "msg": "Too much request weight used"}',
    ],
)
def test_listed_symbols_refuses_what_is_not_an_exchange_info(body: bytes) -> None:
    with pytest.raises((msgspec.DecodeError, msgspec.ValidationError)):
        listed_symbols(body)
