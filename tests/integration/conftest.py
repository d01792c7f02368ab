"""Fixtures of the integration tests that start their own servers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.integration.private_services import private_postgres, private_redis

__all__ = ["private_postgres", "private_redis", "running"]


@pytest.fixture
async def running() -> AsyncIterator[contextlib.AsyncExitStack]:
    """Stops what a test starts (the service before the simulator), whatever happens."""
    async with contextlib.AsyncExitStack() as stack:
        yield stack
