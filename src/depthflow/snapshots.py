"""The simplest `SnapshotSource`: one HTTP request per call, under one total deadline.

Used by `depthflow record`, which follows a handful of symbols; the service itself uses the REST
scheduler, which keeps every request of the process inside Binance's weight budget.
"""

from __future__ import annotations

import asyncio

import httpx

from depthflow.accounting import SnapshotReason

__all__ = ["DirectSnapshots"]


class DirectSnapshots:
    def __init__(self, client: httpx.AsyncClient, base_url: str, *, timeout_s: float) -> None:
        self._client = client
        self._url = f"{base_url.rstrip('/')}/api/v3/depth"
        self._timeout_s = timeout_s

    async def depth(self, symbol: str, limit: int, reason: SnapshotReason) -> str:
        # One deadline for connect, headers and body: httpx's timeouts are per read, so a
        # server trickling a byte every few seconds would never trip them.
        async with asyncio.timeout(self._timeout_s):
            response = await self._client.get(
                self._url, params={"symbol": symbol.upper(), "limit": limit}
            )
        response.raise_for_status()
        return response.text
