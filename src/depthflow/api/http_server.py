"""uvicorn's HTTP/1.1 protocol with a deadline for every request head, and the open-files limit.

uvicorn (checked up to 0.54) arms no timer before a request head is complete: the keep-alive timer
starts only after a response and is cancelled by the first byte of the next request. A client that
connects and sends part of a head (or nothing) holds its socket forever, so enough of them exhaust
the file descriptors of the whole process. `header_timeout_protocol` closes such a connection once
its head has taken longer than the deadline (the first head from the connection's start, every
later one from its first byte).

It is based on the h11 implementation because only that one honours
``h11_max_incomplete_event_size`` (httptools buffers a head of any size). Connections still waiting
for their head do not count toward ``limit_concurrency``: they do no work and the deadline bounds
them, while counting them would let a few hundred idle sockets turn every real request into a 503.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["HeaderTimeoutProtocol", "header_timeout_protocol", "raise_open_files_limit"]

log = logging.getLogger(__name__)


class HeaderTimeoutProtocol(H11Protocol):
    """Closes the connection when a request head is not complete within `header_timeout_s`."""

    header_timeout_s: ClassVar[float] = 10.0
    # Per subclass (see `header_timeout_protocol`): the connections whose head is in progress.
    awaiting_head: ClassVar[set[HeaderTimeoutProtocol]] = set()
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.config.limit_concurrency is not None:
            # uvicorn compares len(connections) with this; leave out the others awaiting a head.
            others = len(self.awaiting_head) - (self in self.awaiting_head)
            self.limit_concurrency = self.config.limit_concurrency + others
        super().data_received(data)
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            self._cancel_head_timer()  # the head is complete (or the connection is done)
        else:
            self._arm_head_timer()  # the first bytes of a keep-alive connection's next head

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)
            self.awaiting_head.add(self)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self.awaiting_head.discard(self)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.awaiting_head.discard(self)
        log.debug("http_header_timeout", extra={"fields": {"client": self.client}})
        if not self.transport.is_closing():
            self.transport.close()


def header_timeout_protocol(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with its own deadline and registry."""
    attributes = {"header_timeout_s": timeout_s, "awaiting_head": set()}
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), attributes)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (logged once); the (soft, hard) now in force.

    Every connection, including a slow one waiting for its deadline, costs a descriptor, and the
    common soft default of 1024 is far below what the hard limit allows.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            # e.g. an unlimited hard limit above the kernel's nr_open: keep what we have.
            log.warning(
                "open_files_limit_not_raised",
                extra={"fields": {"soft": soft, "hard": hard, "error": repr(exc)}},
            )
    log.info(
        "open_files_limit",
        extra={"fields": {"soft_before": before, "soft": soft, "hard": hard}},
    )
    return soft, hard
