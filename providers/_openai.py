"""OpenAI-protocol response handling shared by Codex and Copilot.

Streams pass through byte for byte; on the side the transformer frames events just enough to
spot usage and the terminal event. Only the few events that can carry usage are parsed, and
only usage Kleis forced for itself is ever taken out again (`strip_usage`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

from . import Usage
from ._sse import (
    EventSplitter,
    compact_json,
    event_json,
    is_sse,
    json_loads,
    marked_events,
    sse_frame,
    tail_events_start,
    to_int,
)

# Responses API: events that end a response (and carry its usage).
RESPONSES_TERMINAL = re.compile(rb'"type":\s*"(response\.(?:completed|done|failed|incomplete)|error)"')
RESPONSES_MARKERS = (
    b"response.completed",
    b"response.done",
    b"response.incomplete",
    b"response.failed",
    b'"type":"error"',
    b'"type": "error"',
)
CHAT_MARKERS = (b"[DONE]", b'"usage":{', b'"usage": {', b'"finish_reason":"', b'"finish_reason": "')
CHAT_USAGE = re.compile(rb'"usage":\s*\{')
CHAT_FINISH = re.compile(rb'"finish_reason":\s*"')
# A stripping stream reads usage itself, so its terminal scan only looks for the end markers.
CHAT_END_MARKERS = (b"[DONE]", b'"finish_reason":"', b'"finish_reason": "')
# A JSON key can only appear unescaped outside strings, so these find every chunk carrying a usage
# object (a `"usage":null` placeholder does not match and is left alone).
USAGE_MARKERS = (b'"usage":{', b'"usage": {')
# The fields of a chat.completion.chunk that say nothing by themselves (OpenAI API reference,
# "The chat completion chunk object"): a chunk without choices and with nothing beyond these
# exists only to carry usage.
CHUNK_ENVELOPE = frozenset(
    {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "service_tier",
        "choices",
        "usage",
        "obfuscation",
    }
)
MAX_JSON_BODY = 64 * 1024 * 1024


def _usage(usage: Mapping | None, input_key: str, output_key: str, details_key: str) -> Usage | None:
    if not isinstance(usage, Mapping):
        return None
    details = usage.get(details_key) or {}
    cached = to_int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    return Usage(
        input_tokens=max(to_int(usage.get(input_key)) - cached, 0),
        output_tokens=to_int(usage.get(output_key)),
        cache_read_tokens=cached,
    )


def responses_usage(usage: Mapping | None) -> Usage | None:
    """Usage from a Responses `usage` object (input excludes cached tokens)."""
    return _usage(usage, "input_tokens", "output_tokens", "input_tokens_details")


def chat_usage(usage: Mapping | None) -> Usage | None:
    """Usage from a Chat Completions `usage` object (input excludes cached tokens)."""
    return _usage(usage, "prompt_tokens", "completion_tokens", "prompt_tokens_details")


def terminal_payload(event: bytes) -> dict | None:
    """The JSON of a Responses event that ends the response (completed, done, failed,
    incomplete, error), else None."""
    return event_json(event) if RESPONSES_TERMINAL.search(event) else None


_DECODER = json.JSONDecoder()


def terminal_usage(event: bytes) -> Usage | None:
    """Usage of a terminal Responses event without parsing the whole response (whose `output`
    repeats everything streamed): decode just the object after the last `"usage":`."""
    at = event.rfind(b'"usage":')
    if at < 0:
        return None
    text = event[at + 8 :].decode("utf-8", "replace").lstrip()
    try:
        value, _ = _DECODER.raw_decode(text)
    except (ValueError, RecursionError):
        payload = event_json(event)
        response = payload.get("response") if payload else None
        return responses_usage(response.get("usage")) if isinstance(response, Mapping) else None
    return responses_usage(value)


class OpenAIStream:
    """Pass-through transformer for `responses` and `chat_completions` endpoints.

    With `strip_usage` (chat streams only) the stream also hides usage the client did not ask
    for: Kleis forces `stream_options.include_usage` upstream to count tokens, so a chunk that
    only carries usage (`choices` empty) is dropped and a `usage` object on a chunk with choices
    is removed. Usage is still read from them. Only those chunks are parsed and re-encoded;
    every other byte passes through unchanged."""

    def __init__(self, endpoint: str, sse: bool, strip_usage: bool = False):
        self.endpoint = endpoint
        self.is_sse = sse
        self.strip_usage = strip_usage and endpoint == "chat_completions"
        self.usage = Usage()
        self.terminal = False
        self.at_boundary = True
        self._splitter = EventSplitter()
        self._json = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished event held (SSE; a JSON body is counted by the core)."""
        return self._splitter.buffered

    def feed(self, chunk: bytes) -> bytes:
        if not self.is_sse:
            if len(self._json) < MAX_JSON_BODY:
                self._json += chunk
            return chunk
        # Only whole events go out: a keepalive or a closing error event can then never land
        # inside an event, and a cut stream never leaves half a JSON line at the client.
        out = self._splitter.whole(chunk)
        if out:
            if self.strip_usage:
                out = self._strip(out)
            self._scan(out)
        return out

    def _scan(self, out: bytes) -> None:
        """Inspect only the events that may end the stream or carry usage. They come last, so
        a chunk holding many events only has its last three searched."""
        if self.endpoint == "responses":
            markers = RESPONSES_MARKERS
        else:
            markers = CHAT_END_MARKERS if self.strip_usage else CHAT_MARKERS
        region = tail_events_start(out, 3) if len(out) > 2048 else 0
        for start, end in marked_events(out, markers, region):
            self._inspect(out[start:end])

    def _strip(self, out: bytes) -> bytes:
        """`out` (whole events) without the usage the client did not ask for; reads it into
        `self.usage`. Every usage-bearing event in `out` is found (two substring searches), not
        only the last ones: a hidden usage object must never slip through."""
        spans = marked_events(out, USAGE_MARKERS)
        if not spans:
            return out
        parts: list[bytes] = []
        pos = 0
        for start, end in spans:
            event = out[start:end]
            payload = event_json(event)
            usage = payload.get("usage") if payload is not None else None
            if not isinstance(usage, Mapping):
                continue  # not a chunk with a top-level usage object: leave it as it is
            self.usage = chat_usage(usage) or self.usage
            parts.append(out[pos:start])
            pos = end
            if payload.get("choices") or not CHUNK_ENVELOPE.issuperset(payload):
                del payload["usage"]
                parts.append(replace_data(event, payload))
        parts.append(out[pos:])
        return b"".join(parts)

    def close(self) -> bytes:
        if not self.is_sse:
            self._read_json(bytes(self._json))
            return b""
        tail = self._splitter.rest()
        if tail.strip():
            if self.strip_usage:
                tail = self._strip(tail)
            self._inspect(tail)
        return tail

    def _inspect(self, event: bytes) -> None:
        if self.endpoint == "responses":
            if RESPONSES_TERMINAL.search(event):
                self.terminal = True
                self.usage = terminal_usage(event) or self.usage
            return
        # chat completions
        if b"[DONE]" in event and event_json(event) is None:
            self.terminal = True
            return
        if CHAT_FINISH.search(event):
            self.terminal = True
        if not self.strip_usage and CHAT_USAGE.search(event):  # a stripping stream read it in _strip
            payload = event_json(event)
            if payload is not None:
                self.usage = chat_usage(payload.get("usage")) or self.usage

    def _read_json(self, body: bytes) -> None:
        self.terminal = True
        try:
            payload = json_loads(body)
        except (ValueError, RecursionError):
            return
        if not isinstance(payload, Mapping):
            return
        read = responses_usage if self.endpoint == "responses" else chat_usage
        self.usage = read(payload.get("usage")) or self.usage

    def error_event(self, message: str) -> bytes:
        if self.endpoint == "responses":
            payload = {"type": "error", "code": "stream_interrupted", "message": message, "param": None}
            return sse_frame(payload, event="error")
        payload = {"error": {"message": message, "type": "server_error", "code": "stream_interrupted"}}
        return sse_frame(payload)


def replace_data(event: bytes, payload: Mapping) -> bytes:
    """`event` with its data line(s) replaced by one line carrying `payload` as compact JSON;
    other fields (`event:`, `id:`), the line ending style and the terminator are kept."""
    body = event.rstrip(b"\r\n")
    terminator = event[len(body) :]
    newline = b"\r\n" if b"\r\n" in body or terminator.startswith(b"\r") else b"\n"
    lines: list[bytes] = []
    data = b"data: " + compact_json(payload)
    for line in body.split(b"\n"):
        line = line.removesuffix(b"\r")
        if line.startswith(b"data:"):
            if data:
                lines.append(data)
                data = b""
            continue
        lines.append(line)
    return newline.join(lines) + terminator


def openai_transformer(
    endpoint: str, request_stream: bool, headers: Mapping[str, str], *, strip_usage: bool = False
) -> OpenAIStream:
    """The transformer for an OpenAI-protocol response with these headers; `strip_usage` hides
    chat-stream usage the client did not ask for (see OpenAIStream)."""
    content_type = None
    for name, value in headers.items():
        if name.lower() == "content-type":
            content_type = value
            break
    return OpenAIStream(endpoint, is_sse(content_type, request_stream), strip_usage)
