"""A loopback TCP proxy that tests can cut and restore, to make a real server "go away" for one
client (the code under test) without stopping the shared server."""

from __future__ import annotations

import asyncio

__all__ = ["TcpProxy"]

_CHUNK = 64 * 1024


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target_host:target_port``.

    `cut` aborts every proxied connection and closes the listener, so new connections are refused;
    `restore` listens again on the same port.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> int:
        """Listen (on a free port the first time, the same one afterwards); returns the port."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self._port)
        self._port = self._server.sockets[0].getsockname()[1]
        return self._port

    async def stop(self) -> None:
        """Close the listener and every connection."""
        await self.cut()

    async def cut(self) -> None:
        """Drop every open connection (RST) and refuse new ones until `restore`."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        # The aborts end every pump (EOF), so the handlers finish on their own; cancelling them
        # would make asyncio's stream machinery log the cancellation as an error.
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if server is not None:
            # After the aborts: from Python 3.12 on this also waits for open connections.
            await server.wait_closed()

    async def restore(self) -> None:
        """Accept connections again on the same port."""
        if self._server is None:
            await self.start()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(client_w)
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self._target)
        except OSError:
            self._close(client_w)
            self._tasks.discard(task)
            return
        self._writers.add(upstream_w)
        pumps = [
            asyncio.create_task(_pump(client_r, upstream_w)),
            asyncio.create_task(_pump(upstream_r, client_w)),
        ]
        try:
            # Either side closing ends the connection as a whole.
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._close(client_w)
            self._close(upstream_w)
            self._tasks.discard(task)

    def _close(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        writer.transport.abort()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except OSError:
        # A reset on either side ends this connection; the caller closes both ends.
        return
