"""A shutdown that has to wait says what it waits for and for how long."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

import pytest

from depthflow import service as service_module
from depthflow.config import Settings
from depthflow.service import Service

# Nothing listens there: every write attempt is refused at once.
UNREACHABLE_URL = "postgresql+asyncpg://postgres@127.0.0.1:1/depthflow"


async def test_the_last_flush_with_the_database_down_is_announced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A short budget: the writer's last flush gets max(1, budget - 5) = 2 s of retries.
    monkeypatch.setattr(service_module, "_SHUTDOWN_BUDGET_S", 7.0)
    monkeypatch.setattr(service_module, "_STOP_STEP_REPORT_S", 0.2)
    settings = Settings(  # type: ignore[call-arg]
        _env_file=None, database_url=UNREACHABLE_URL, redis_url="", symbols="btcusdt"
    )
    service = Service(settings, with_feed=False)
    now = datetime.now(UTC)
    for n in range(3):
        assert service.writer.add_signal(("BTCUSDT", "open", 1.0, 1.0, 1.0, now, n))
    caplog.set_level(logging.INFO, logger="depthflow")

    await service.stop()

    by_event = {r.getMessage(): r for r in caplog.records if r.name == "depthflow.service"}
    waiting = by_event["shutdown_waiting"].fields  # type: ignore[attr-defined]
    assert waiting["step"] == "writer"
    assert waiting["waiting_for"] == (
        "the writer's last flush of 3 buffered rows, the database is not answering"
    )
    assert 0 < waiting["up_to_s"] <= 7.0
    waited = by_event["shutdown_waited"].fields  # type: ignore[attr-defined]
    assert waited["step"] == "writer"
    assert waited["seconds"] >= 0.2
    # The rows it could not write are counted, not silently dropped.
    assert service.metrics.local_totals()["data_loss:shutdown"] == 3
