"""Real HTTP fakes of the upstream providers, served by aiohttp on 127.0.0.1:<random port>.

Every fake records what it received (`requests`) and answers API calls from a queue of
scripted replies (`queue(...)`); when the queue is empty it uses its default reply.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass
class Recorded:
    """One request as the fake saw it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-case names
    body: bytes
    at: float = field(default_factory=time.monotonic)  # when it arrived (monotonic clock)

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    @property
    def form(self) -> dict[str, str]:
        from urllib.parse import parse_qsl

        return dict(parse_qsl(self.body.decode()))


@dataclass
class Reply:
    """A scripted reply: JSON, an SSE stream, or a dropped connection."""

    status: int = 200
    body: Any = None  # JSON-able object for JSON replies
    events: list[bytes] | None = None  # raw SSE event bytes for stream replies
    headers: dict[str, str] = field(default_factory=dict)
    first_byte_delay: float = 0.0  # seconds before the status line
    event_delay: float = 0.0  # seconds between events
    cut_after: int | None = None  # close the connection after this many events
    drop: bool = False  # close the connection without answering
    content_type: str | None = None  # override (None = json or text/event-stream)


def sse(payload: dict | str, event: str | None = None, crlf: bool = False) -> bytes:
    """One SSE event: `event: X` (optional) and `data: <json>` followed by a blank line."""
    nl = "\r\n" if crlf else "\n"
    data = payload if isinstance(payload, str) else json.dumps(payload)
    head = f"event: {event}{nl}" if event else ""
    return f"{head}data: {data}{nl}{nl}".encode()


class FakeServer:
    """Base class: start/stop, request recording, reply queue, reply rendering."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.requests: list[Recorded] = []
        self.replies: deque[Reply] = deque()
        self.server: TestServer | None = None
        self.url = ""
        self.cancelled = 0  # streams whose client went away mid-reply
        self.open_streams = 0

    async def start(self) -> FakeServer:
        self.server = TestServer(self.app, host="127.0.0.1", port=0)
        await self.server.start_server()
        self.url = str(self.server.make_url("")).rstrip("/")
        return self

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.close()

    def queue(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    def calls(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    async def record(self, request: web.Request) -> Recorded:
        body = await request.read()
        rec = Recorded(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
        )
        self.requests.append(rec)
        return rec

    async def render(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.first_byte_delay:
            await asyncio.sleep(reply.first_byte_delay)
        if reply.drop:
            request.transport.close()
            return web.Response(status=500)
        if reply.events is None:
            return web.json_response(
                reply.body,
                status=reply.status,
                headers=reply.headers,
                content_type=reply.content_type or "application/json",
            )
        resp = web.StreamResponse(status=reply.status, headers=reply.headers)
        if reply.content_type != "":
            resp.content_type = reply.content_type or "text/event-stream"
        await resp.prepare(request)
        self.open_streams += 1
        try:
            for i, event in enumerate(reply.events):
                if reply.cut_after is not None and i >= reply.cut_after:
                    request.transport.close()
                    return resp
                if reply.event_delay and i:
                    await asyncio.sleep(reply.event_delay)
                await resp.write(event)
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled += 1
            raise
        finally:
            self.open_streams -= 1
        return resp

    def next_reply(self, default: Reply) -> Reply:
        return self.replies.popleft() if self.replies else default
