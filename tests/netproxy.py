"""A tiny TCP proxy for tests that need a connection to break: ``cut()`` drops every open
connection, and ``hold_responses`` swallows what the server answers (the client times out)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.hold_responses = False
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test-tcp-proxy", daemon=True)
        self.port = 0

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, server_writer}

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: bool) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await reader.read(65536):
                    if response and self.hold_responses:
                        continue
                    writer.write(data)
                    await writer.drain()
            writer.close()

        await asyncio.gather(
            pipe(client_reader, server_writer, False),
            pipe(server_reader, client_writer, True),
            return_exceptions=True,
        )
        self._writers -= {client_writer, server_writer}

    def cut(self) -> None:
        """Drop every connection open now (as a network failure would: a reset, no goodbye)."""

        def drop() -> None:
            for writer in list(self._writers):
                writer.transport.abort()

        self._loop.call_soon_threadsafe(drop)


@contextlib.contextmanager
def proxy_to(url: str) -> Iterator[TcpProxy]:
    host, port = url.removeprefix("http://").split(":")
    with TcpProxy(host, int(port)) as proxy:
        yield proxy
