"""Incremental SSE framing shared by the adapters.

Upstreams split events anywhere (mid-line, mid-terminator) and use `\\n`, `\\r\\n` or a mix.
`EventSplitter` finds complete events without copying the stream more than once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import orjson

# An event ends at a blank line, and each of its two newlines may be LF or CRLF. Every such
# boundary contains b"\n\n" or b"\n\r\n"; two bytes.find calls beat a regex that has to look
# at every byte (this runs on every chunk of every stream). Most upstreams send LF only, and a
# memchr for b"\r" lets the CRLF search be skipped entirely then.


def next_boundary_end(buf: bytes, start: int = 0) -> int:
    """The index just past the first blank line at or after `start`, or -1."""
    lf = buf.find(b"\n\n", start)
    crlf = buf.find(b"\n\r\n", start) if b"\r" in buf else -1
    if crlf < 0:
        return lf + 2 if lf >= 0 else -1
    if lf < 0 or crlf < lf:
        return crlf + 3
    return lf + 2


def event_start(buf: bytes, pos: int) -> int:
    """Where the event holding byte `pos` begins (just past the blank line before it)."""
    lf = buf.rfind(b"\n\n", 0, pos)
    crlf = buf.rfind(b"\n\r\n", 0, pos) if b"\r" in buf else -1
    return max(lf + 2 if lf >= 0 else 0, crlf + 3 if crlf >= 0 else 0)


def marked_events(buf: bytes, markers: tuple[bytes, ...], region: int = 0) -> list[tuple[int, int]]:
    """(start, end) of each event in `buf` (whole events only) that contains one of `markers`
    at or after `region`, in order, each once. Substring searches run at memchr speed, so a
    chunk of many events costs a few passes, not an event-by-event parse."""
    spans: dict[int, int] = {}
    for marker in markers:
        pos = buf.find(marker, region)
        while pos >= 0:
            end = next_boundary_end(buf, pos)
            end = len(buf) if end < 0 else end
            spans[event_start(buf, pos)] = end
            pos = buf.find(marker, end)
    return sorted(spans.items())


def last_boundary_end(buf: bytes | bytearray, start: int = 0) -> int:
    """The index just past the last blank line in `buf` that begins at or after `start`, or -1."""
    lf = buf.rfind(b"\n\n", start)
    if buf.find(b"\r", max(lf, start)) < 0:  # no CRLF boundary can end after the last LF one
        return lf + 2 if lf >= 0 else -1
    crlf = buf.rfind(b"\n\r\n", max(lf, start))
    return max(lf + 2 if lf >= 0 else -1, crlf + 3 if crlf >= 0 else -1)


BLANK_LINE = re.compile(rb"\n\r?\n")


def matching_events(buf: bytes, pattern: re.Pattern[bytes]) -> list[bytes]:
    """Each event of `buf` (whole events; the last may lack its blank line) in which `pattern`
    matches, in order, each once: one regex pass over the bytes instead of splitting every
    event (a collected Codex answer is ~50 events of which one or two decide it). Linear: each
    boundary search covers only the bytes between the last event taken and the next one."""
    events, after, size = [], 0, len(buf)
    cr = b"\r" in buf  # no CRLF boundary anywhere: skip those searches
    for match in pattern.finditer(buf):
        pos = match.start()
        if pos < after:  # a second match inside an event already taken
            continue
        lf = buf.rfind(b"\n\n", after, pos)
        start = lf + 2 if lf >= 0 else after
        if cr:
            crlf = buf.rfind(b"\n\r\n", max(start - 1, after), pos)
            start = max(start, crlf + 3) if crlf >= 0 else start
        boundary = BLANK_LINE.search(buf, match.end())  # stops at the first one, LF or CRLF
        end = boundary.end() if boundary else size
        events.append(buf[start:end])
        after = end
    return events


def split_events(buf: bytes) -> list[bytes]:
    """`buf` (whole events only) cut into events, each with its terminator. Linear: each
    search resumes where the last one stopped, so a chunk of many events costs one pass."""
    events, start, size = [], 0, len(buf)
    lf, crlf = buf.find(b"\n\n"), buf.find(b"\n\r\n")
    while start < size:
        if 0 <= lf < start:
            lf = buf.find(b"\n\n", start)
        if 0 <= crlf < start:
            crlf = buf.find(b"\n\r\n", start)
        if lf < 0 and crlf < 0:
            events.append(buf[start:])
            break
        end = lf + 2 if crlf < 0 or 0 <= lf < crlf else crlf + 3
        events.append(buf[start:end])
        start = end
    return events


class EventSplitter:
    """Feed bytes, get back complete events (each including its terminator).

    Linear in the bytes fed, however an event is cut: each chunk is searched only where the
    previous search could not look (the new bytes and the two before them, where a blank line
    may have started), and an incomplete event past SMALL_TAIL bytes grows in a bytearray
    (appended to, never copied whole per chunk). Smaller ones stay bytes: cheaper to join."""

    __slots__ = ("_tail",)
    SMALL_TAIL = 65536

    def __init__(self) -> None:
        self._tail: bytes | bytearray = b""

    @property
    def pending(self) -> bool:
        """True while an incomplete event is buffered."""
        return bool(self._tail)

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete event held (0 at an event boundary)."""
        return len(self._tail)

    def feed(self, chunk: bytes) -> Iterator[bytes]:
        out = self.whole(chunk)
        return iter(split_events(out)) if out else iter(())

    def whole(self, chunk: bytes) -> bytes:
        """The complete events now available as one bytes object (the rest is kept)."""
        tail = self._tail
        if not tail:  # the common case: no copy unless the chunk ends mid-event
            cut = last_boundary_end(chunk)
            if cut == len(chunk):
                return chunk
            if cut < 0:
                self._tail = chunk
                return b""
            self._tail = chunk[cut:]
            return chunk[:cut]
        searched = max(len(tail) - 2, 0)  # the tail holds no whole blank line
        if len(tail) < self.SMALL_TAIL:
            buf = tail + chunk
        else:
            buf = tail if type(tail) is bytearray else bytearray(tail)
            buf += chunk
        cut = last_boundary_end(buf, searched)
        if cut < 0:
            self._tail = buf
            return b""
        if type(buf) is bytes:
            self._tail = buf[cut:]
            return buf[:cut] if cut < len(buf) else buf
        out = bytes(memoryview(buf)[:cut])
        self._tail = bytes(buf[cut:])  # what is left came with this chunk: at most its length
        return out

    def rest(self) -> bytes:
        """Whatever is left at EOF (an event without its blank line)."""
        tail, self._tail = bytes(self._tail), b""
        return tail


def event_data(event: bytes) -> bytes:
    """The event's data lines joined with newlines (the SSE rule)."""
    parts = []
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            line = line[6:] if line.startswith(b"data: ") else line[5:]
            parts.append(line[:-1] if line.endswith(b"\r") else line)
    return parts[0] if len(parts) == 1 else b"\n".join(parts)


def tail_events_start(buf: bytes, count: int) -> int:
    """Where the last `count` events of `buf` (whole events only) begin."""
    end = len(buf) - 1  # skip the final terminator
    has_cr = b"\r" in buf
    for _ in range(count):
        lf = buf.rfind(b"\n\n", 0, end)
        crlf = buf.rfind(b"\n\r\n", 0, end) if has_cr else -1
        if lf < 0 and crlf < 0:
            return 0
        end = max(lf, crlf)
    return max(end + 2 if buf.startswith(b"\n\n", end) else end + 3, 0)


def event_json(event: bytes) -> dict | None:
    """The event's data parsed as a JSON object, or None ([DONE], comments, junk)."""
    data = event_data(event).strip()
    if not data or data == b"[DONE]":
        return None
    try:
        value = json_loads(data)
    except (ValueError, RecursionError):  # junk, or nesting deeper than the parser goes
        return None
    return value if isinstance(value, dict) else None


def json_loads(raw: bytes | str) -> Any:
    """JSON from UTF-8 bytes (or str), read by orjson: ~4x faster than the standard library
    on an agent's 30-150 KB request, and the only JSON library on the request path. What it
    refuses (lone surrogate escapes, integers past 64 bits, NaN/Infinity literals, nesting
    past 1024 levels, invalid UTF-8) raises ValueError (`orjson.JSONDecodeError`) with its
    reason, which the core answers as a 400."""
    return orjson.loads(raw)


class JsonUnwritable(ValueError):
    """A value orjson cannot write: nesting past its 254 levels (it read up to 1024)."""


def compact_json(value) -> bytes:
    """Compact JSON bytes (UTF-8, keys in insertion order) from orjson. Raises JsonUnwritable
    for what it cannot write; everything `json_loads` returns is writable but for depth."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise JsonUnwritable(str(exc)) from None


def sse_frame(payload: dict, event: str | None = None) -> bytes:
    """One SSE event carrying `payload` as compact JSON."""
    head = b"event: %s\n" % event.encode() if event else b""
    return b"%sdata: %s\n\n" % (head, compact_json(payload))


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
