"""What a long response needs of its connection beyond ASGI, and the uvicorn protocol that gives it.

ASGI lets an app write and learn of a disconnect, but not see how many bytes wait unsent, nor
drop a connection at once: after an error uvicorn closes the transport gracefully, which waits
for every buffered byte to reach a reader that may never read (the connection, its buffers and
the kernel's stay until the client goes). So our protocol hands each request its
:class:`Connection` in the ASGI scope (extension ``threadline.connection``), and tells it when
the server shuts down so streams can end at once instead of at uvicorn's graceful timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from starlette.types import Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["EXTENSION", "SERVER_SEND", "Connection", "HttpProtocol", "connection_of"]

EXTENSION = "threadline.connection"
# The server's own ``send``, put in the scope by the request edge (api/middleware.py) before any
# wrapper: an SSE response writes its body with it, since every wrapper above looks at the
# response start only, and a thousand deliveries of one commit should not pay for them.
SERVER_SEND = "threadline.server_send"


class Connection:
    """One client connection: its transport's unsent bytes, and a way to end it without waiting."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.closing = asyncio.Event()  # set when the server begins to shut down

    def unsent_bytes(self) -> int:
        """Bytes written to the transport that the kernel has not taken yet."""
        return self.transport.get_write_buffer_size()

    def limit_kernel_buffer(self, size: int) -> None:
        """Cap the kernel's send buffer (Linux autotunes it up to 4 MiB per connection)."""
        self._setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def abort(self) -> None:
        """Close now, discarding what is unsent, here and in the kernel (RST, no lingering)."""
        self._setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _setsockopt(self, level: int, option: int, value: int | bytes) -> None:
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(level, option, value)


def connection_of(scope: Scope) -> Connection | None:
    """The request's connection, when it is served by :class:`HttpProtocol`."""
    found = scope.get("extensions", {}).get(EXTENSION, {}).get("connection")
    return found if isinstance(found, Connection) else None


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request's :class:`Connection` in its scope."""

    _connection: Connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._connection = Connection(transport)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {EXTENSION: {"connection": self._connection}}

    def shutdown(self) -> None:
        self._connection.closing.set()
        super().shutdown()
