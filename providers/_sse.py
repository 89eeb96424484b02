"""Incremental SSE framing shared by the adapters.

Upstreams split events anywhere (mid-line, mid-terminator) and use `\\n`, `\\r\\n` or a mix.
`EventSplitter` finds complete events without copying the stream more than once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

# An event ends at a blank line; each newline may be CRLF or LF.
BOUNDARY = re.compile(rb"\r?\n\r?\n")
DATA_LINE = re.compile(rb"^data: ?(.*?)\r?$", re.M)


class EventSplitter:
    """Feed bytes, get back complete events (each including its terminator)."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    @property
    def pending(self) -> bool:
        """True while an incomplete event is buffered."""
        return bool(self._tail)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        buf = self._tail + chunk if self._tail else chunk
        start = 0
        for match in BOUNDARY.finditer(buf):
            yield buf[start : match.end()]
            start = match.end()
        self._tail = buf[start:]

    def rest(self) -> bytes:
        """Whatever is left at EOF (an event without its blank line)."""
        tail, self._tail = self._tail, b""
        return tail


def event_data(event: bytes) -> bytes:
    """The event's data lines joined with newlines (the SSE rule)."""
    lines = DATA_LINE.findall(event)
    return b"\n".join(lines)


def event_json(event: bytes) -> dict | None:
    """The event's data parsed as a JSON object, or None ([DONE], comments, junk)."""
    data = event_data(event).strip()
    if not data or data == b"[DONE]":
        return None
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def sse_frame(payload: dict, event: str | None = None) -> bytes:
    """One SSE event carrying `payload` as compact JSON."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def is_sse(content_type: str | None, requested_stream: bool) -> bool:
    """Treat a response as SSE when it says so, or when it says nothing and a stream was asked
    for (the Codex backend sometimes omits Content-Type)."""
    if content_type:
        return "text/event-stream" in content_type.lower()
    return requested_stream


def to_int(value) -> int:
    """A non-negative int from whatever an upstream put in a usage field."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return max(value, 0)
    if isinstance(value, float):
        return max(int(value), 0)
    return 0
