"""Failures a user causes and can fix, and the one-line explanations the CLI prints for them.

A leaf module: everything may import it. `depthflow.cli.main` catches `UserError` and prints
``depthflow: <message>`` on stderr, exiting with its `exit_code`; anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import socket
from urllib.parse import urlsplit

__all__ = [
    "EXIT_FAILURE",
    "EXIT_USAGE",
    "DependencyUnreachable",
    "UserError",
    "offline_hint",
    "one_line",
    "unresolved_host",
]

# Exit codes: 2 for a bad setting, argument or file (argparse's own code for usage errors), 1 for
# an environment that is not ready (a server down, a database not migrated, a corrupt recording).
EXIT_USAGE = 2
EXIT_FAILURE = 1


class UserError(Exception):
    """A failure the user can fix; the message is one line naming the cause and the fix."""

    def __init__(self, message: str, *, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(one_line(message))
        self.exit_code = exit_code


class DependencyUnreachable(UserError):
    """A server (PostgreSQL, Redis) that cannot be reached now: it may come back by itself, so a
    long-running service may choose to go on without it where a one-shot command stops."""


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines included) collapsed to one space."""
    return " ".join(text.split())


def unresolved_host(exc: BaseException) -> bool:
    """Whether ``exc``, or an exception it was raised from, is a failed name lookup."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, socket.gaierror):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def offline_hint(url: str) -> str:
    """What to say when the host of ``url`` (a Binance endpoint) does not resolve."""
    host = urlsplit(url).hostname or url
    return (
        f"host {host} does not resolve (no network or DNS?); to run offline, start "
        "`depthflow simulate` and set BINANCE_WS_URL=ws://127.0.0.1:8765 "
        "BINANCE_REST_URL=http://127.0.0.1:8765"
    )
