"""A TCP relay on loopback that can hold back what clients send: for catching a remote reply in flight.

The bot talks to its engine over HTTP; put this relay between them and it passes every byte both
ways unchanged (keep-alive and streaming included), keeping a copy of what the clients sent
(`sent`: the engine requests, prompts and all). `hold()` makes it keep the next bytes a client sends
(a request) until `release()`; `held` is set once something is waiting. While the server behind it
is down, a new connection is closed unanswered, and an open one ends when the server's end does:
the client sees an unreachable server, as without the relay.
"""

from __future__ import annotations

import asyncio
import contextlib


class Relay:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.sent = bytearray()  # every byte clients sent through, in order
        self.held = asyncio.Event()  # something a client sent is being held
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._connected, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self._open.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def hold(self) -> None:
        self.held.clear()
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:  # the server is down
                return
            self._writers.add(up_writer)
            try:
                await asyncio.gather(self._pump(reader, up_writer, client=True), self._pump(up_reader, writer))
            finally:
                self._writers.discard(up_writer)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, client: bool = False) -> None:
        """Copy `source` to `sink` until either end closes; then close `sink` (which ends the other pump too)."""
        try:
            while data := await source.read(65536):
                if client:
                    if not self._open.is_set():
                        self.held.set()
                        await self._open.wait()
                    self.sent += data
                sink.write(data)
                await sink.drain()
        except OSError:  # a reset from either end: the connection is over
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.close()
