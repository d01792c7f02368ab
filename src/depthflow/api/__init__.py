"""FastAPI application: the lifespan owns the `Service`; routes only read from it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from depthflow import __version__
from depthflow.api import dashboard, data, docs, monitoring
from depthflow.config import Settings
from depthflow.service import Service

__all__ = ["create_app"]


def create_app(
    settings: Settings, *, with_feed: bool = True, owns_process: bool = False
) -> FastAPI:
    """Build the app; the service starts with the lifespan and stops, in order, on shutdown.
    ``owns_process``: see `Service`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings, with_feed=with_feed, owns_process=owns_process)
        app.state.service = service
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="depthflow",
        version=__version__,
        description="Binance order-book ingestion: local books, WAP ticks, SMA-crossover signals.",
        lifespan=lifespan,
        # Served by `docs.router` from the package's own assets, so they work offline.
        docs_url=None,
        redoc_url=None,
    )
    app.include_router(monitoring.router)
    app.include_router(data.router)
    app.include_router(docs.router)
    # Its lifespan (the frame producer) runs inside the service's: started after, stopped before.
    app.include_router(dashboard.router)
    return app
