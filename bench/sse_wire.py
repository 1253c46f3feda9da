"""The SSE side of the load generators (bench/loadgen.py, bench/chat_load.py): a raw HTTP/1.0
response, read as it arrives, split into events. HTTP/1.0 because it has no chunked framing to
undo, and raw because a thousand subscribers through a full HTTP client would cost the generator
more CPU than the server spends."""

from __future__ import annotations


class SseRefused(RuntimeError):
    """The subscribe request was answered with something other than 200."""


class SseParser:
    def __init__(self) -> None:
        self.buffer = b""
        self.status: bytes | None = None  # the status line, once the headers are in

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """The (event name, data) pairs completed by ``data``: the name is ``b"message"`` when
        the event has none, the data its ``data:`` lines joined; events without data are left
        out (comments, ``retry:``)."""
        self.buffer += data
        if self.status is None:
            head, sep, rest = self.buffer.partition(b"\r\n\r\n")
            if not sep:
                return []
            self.status = head.split(b"\r\n", 1)[0]
            if b" 200" not in self.status:
                raise SseRefused(f"SSE subscribe failed: {self.status!r}")
            self.buffer = rest
        *events, self.buffer = self.buffer.split(b"\n\n")
        parsed = []
        for event in events:
            name = b"message"
            lines: list[bytes] = []
            for line in event.split(b"\n"):
                if line.startswith(b"data:"):
                    lines.append(line[5:].lstrip(b" "))
                elif line.startswith(b"event:"):
                    name = line[6:].strip()
            if lines:
                parsed.append((name, b"\n".join(lines)))
        return parsed
