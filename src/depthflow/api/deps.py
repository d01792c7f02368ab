"""Shared route dependencies."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Request

from depthflow.service import Service


async def _service(request: Request) -> Service:
    # async: a plain def would cost every request a hop through the thread pool.
    return cast(Service, request.app.state.service)


ServiceDep = Annotated[Service, Depends(_service)]
