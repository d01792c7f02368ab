"""Help of the `depthflow` commands: every option's default, and the environment variables each
command reads (one mapping, derived from `Settings`' fields)."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from depthflow.config import Settings, mask_url

__all__ = ["COMMAND_SETTINGS", "CommandParser", "HelpFormatter", "env_epilog", "env_names"]

_ALL = tuple(Settings.model_fields)
_LOGGING = ("log_level", "log_format")
# What the websocket feed and its snapshot requests read.
_FEED = (
    "symbols",
    "binance_ws_url",
    "binance_rest_url",
    "depth_interval_ms",
    "snapshot_limit",
    "snapshot_timeout_s",
    "streams_per_connection",
    "connect_interval_s",
    "ws_max_age_s",
    "feed_stall_s",
)
# A replay has no network (feed, REST, symbol listings, audits), no HTTP server and no Redis.
_NOT_IN_REPLAY = frozenset(
    {
        *(name for name in _FEED if name != "symbols"),
        "redis_url",
        "redis_prefix",
        "metrics_flush_ms",
        "rest_weight_per_minute",
        "rest_max_concurrency",
        "audit_interval_s",
        "symbols_refresh_s",
        *(name for name in _ALL if name.startswith("http_")),
    }
)
# The demo chooses its own database, exchange and symbols, and has no Redis.
_CHOSEN_BY_DEMO = frozenset(
    {
        "database_url",
        "redis_url",
        "redis_prefix",
        "metrics_flush_ms",
        "symbols",
        "binance_ws_url",
        "binance_rest_url",
    }
)

# Command -> the settings (field names) it reads; the variable is the name in upper case.
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "config": _ALL,
    "serve": _ALL,
    "migrate": ("database_url", *_LOGGING),
    "simulate": _LOGGING,
    "record": (*_FEED, *_LOGGING),
    "replay": tuple(name for name in _ALL if name not in _NOT_IN_REPLAY),
    "demo": tuple(name for name in _ALL if name not in _CHOSEN_BY_DEMO),
    "export": ("database_url", *_LOGGING),
}
# Lists longer than this are given as names only (`depthflow config` shows the values).
_WITH_DEFAULTS_UP_TO = 12
_DEFAULT_TEXT = {"log_format": "console on a terminal, else json"}


def env_names(command: str) -> list[str]:
    """The environment variables ``command`` reads."""
    return [name.upper() for name in COMMAND_SETTINGS.get(command, ())]


def env_epilog(command: str) -> str | None:
    """The help epilog naming the environment variables of ``command`` (None if unknown)."""
    fields = COMMAND_SETTINGS.get(command)
    if not fields:
        return None
    head = "environment variables read (a .env file in the working directory too):"
    if len(fields) <= _WITH_DEFAULTS_UP_TO:
        lines = [f"  {name.upper():<22} default: {_default(name)}" for name in fields]
        return "\n".join([head, *lines])
    names = textwrap.fill(
        ", ".join(name.upper() for name in fields),
        width=78,
        initial_indent="  ",
        subsequent_indent="  ",
        break_on_hyphens=False,
    )
    return f"{head}\n{names}\n`depthflow config` prints their effective values."


def _default(name: str) -> str:
    if name in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[name]
    value = Settings.model_fields[name].default
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if value == "":
        return "(empty)"
    return mask_url(str(value)) if isinstance(value, str) else str(value)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default after its help, except when there is none to show (None, a flag's
    False) or the help already says it; the epilog's lines are kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "%(default)" in text or "(default:" in text:
            return text
        default = action.default
        # Identity, not equality: a default of 0 (== False) is worth showing.
        if default is None or default is False or default is argparse.SUPPRESS:
            return text
        if not action.option_strings:
            return text
        if default == "":
            return f"{text} (default: empty)"
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """The parser of one command: `HelpFormatter`, and the epilog of `env_epilog`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if self.epilog is None:
            self.epilog = env_epilog(self.prog.rsplit(" ", 1)[-1])
