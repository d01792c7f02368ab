"""The vocabulary of accounting: why data was lost, what went wrong, why a book was resynced,
what a health check says. One leaf module, imported by everything and importing nothing of ours,
so the pipeline, book, writer, feed, service, metrics and API cannot drift apart.

Each value is the label the outside world sees (Prometheus ``reason``/``kind`` labels, the keys of
``/metrics``, the ``reason`` column of ``data_gaps``, the states of ``/health``): renaming one is a
change of the product contract.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AuditResult",
    "CheckState",
    "ErrorKind",
    "GapReason",
    "LossReason",
    "ResyncReason",
    "SnapshotReason",
]


class LossReason(StrEnum):
    """Why a received event (or rows computed from it) did not end up stored."""

    MALFORMED = "malformed"  # not JSON, wrong types, out-of-range values
    UNKNOWN_EVENT = "unknown_event"  # valid JSON that is not a depth event
    UNKNOWN_SYMBOL = "unknown_symbol"  # a depth event of a symbol not configured
    INTERNAL = "internal"  # handling the frame raised: a bug, counted instead of fatal
    STALE = "stale"  # already in the book (u <= local update id)
    DUPLICATE = "duplicate"  # received on both connections during a rotation: applied once
    GAP = "gap"  # U > local id + 1: book discarded, resynced
    SYNC_BUFFER = "sync_buffer"  # too many events buffered while snapshots kept failing
    RECONNECT = "reconnect"  # buffered for a snapshot when the connection dropped
    DELISTED = "delisted"  # buffered for a snapshot when the symbol left the exchange's list
    SHUTDOWN = "shutdown"  # buffered or unwritten when the service stopped
    EMPTY_SIDE = "empty_side"  # applied, but a side of the book was empty: no tick
    CROSSED = "crossed"  # applied, but best bid >= best ask: no tick, book resynced
    OVERFLOW = "overflow"  # the writer's buffer was full (database away or slow)
    REJECTED = "rejected"  # the database refused the batch's rows for good


class ErrorKind(StrEnum):
    """What went wrong (the ``kind`` label of errors)."""

    MALFORMED = "malformed"
    UNKNOWN_EVENT = "unknown_event"
    UNKNOWN_SYMBOL = "unknown_symbol"
    INTERNAL = "internal"  # an exception while handling a frame
    CONNECT = "connect"  # a websocket connection attempt failed
    CONNECTION = "connection"  # an open websocket closed or stalled
    SNAPSHOT = "snapshot"  # a REST snapshot failed, timed out or was unusable
    DATABASE = "database"  # a write attempt failed
    REDIS = "redis"  # a Redis push, ping or read failed
    TASK = "task"  # a supervised task ended unexpectedly
    CHECKPOINT = "checkpoint"  # a book checkpoint refused by a full writer buffer (no event lost)


class ResyncReason(StrEnum):
    """Why a symbol's book was discarded and rebuilt from a new snapshot."""

    GAP = "gap"
    RECONNECT = "reconnect"
    CROSSED = "crossed"
    STALE = "stale"  # only stale events for STALE_RESYNC_S while frames kept arriving
    INTERNAL = "internal"  # handling an event raised: the book may be half updated
    AUDIT = "audit"  # a fresh snapshot disagreed with the local book at the same update id


class GapReason(StrEnum):
    """Why update ids are missing from a symbol's stored sequence (``data_gaps.reason``)."""

    GAP = "gap"
    RECONNECT = "reconnect"
    RESYNC = "resync"
    OVERFLOW = "overflow"
    SHUTDOWN = "shutdown"
    RESTART = "restart"  # between the last stored tick of an earlier run and this run's first
    NO_TICK = "no_tick"  # applied events that gave no tick (empty side, crossed)
    REJECTED = "rejected"


class RunStatus(StrEnum):
    """``runs.status``: how an ingesting process or replay ended (or that it has not)."""

    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CRASHED = "crashed"  # its heartbeat stopped without a finish (kill -9, power loss)


class CheckState(StrEnum):
    """States of the ``checks`` of ``/health``, ``/ready`` and ``/live``."""

    OK = "ok"
    DOWN = "down"
    SLOW = "slow"  # answering, but a write attempt took longer than a few seconds
    DISABLED = "disabled"
    DISCONNECTED = "disconnected"
    SYNCING = "syncing"
    STALLED = "stalled"  # connected, but no frame for FEED_STALL_S
    STOPPED = "stopped"
    RESTARTING = "restarting"


class SnapshotReason(StrEnum):
    """Why a REST snapshot was requested (the ``reason`` label of snapshots); the order is the
    REST scheduler's priority: a book with no data first, audits only with budget to spare."""

    SYNC = "sync"  # first sync of a book (start, new listing, reconnect)
    RESYNC = "resync"  # after a gap, a crossed or stale book
    AUDIT = "audit"  # a periodic check of a live book


class AuditResult(StrEnum):
    """Outcome of a book audit (the ``result`` label of ``depthflow_book_audits_total``)."""

    MATCH = "match"
    MISMATCH = "mismatch"  # resynced
    SKIPPED = "skipped"  # the snapshot and the book could not be compared at one update id
