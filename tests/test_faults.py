"""Hostile input and upstream faults on the proxy routes (issue 13, points 6, 7, 8 and the
proxy fuzzing), end to end: the real app over HTTP against the loopback fakes.

- an upstream event past `[server] max_event_mb` ends the stream with the protocol's error
  event, is recorded incomplete, and costs linear time (the loop keeps answering);
- request heads Sanic refuses (too large, a long request line, a bad field name) get 431 /
  414 / 400 in the route's envelope, not the admin envelope or a body-size message;
- a persistent upstream 401 (after the forced refresh) is a 502 naming the account, and the
  account is marked;
- hypothesis over the three proxy routes' bodies and headers: no 5xx, no traceback.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from providers import _sse
from providers._openai import OpenAIStream
from providers._sse import EventSplitter
from providers.claude import ClaudeStream
from tests.fakes import Reply
from tests.fakes.codex import FakeCodex
from tests.test_protocol import (
    MODELS,
    ROUTES,
    body_for,
    envelope_error,
    post,
    raw_request,
    with_accounts,
)


@pytest.fixture
def fakes(codex_fake, claude_fake, copilot_fake) -> dict:
    return {"codex": codex_fake, "claude": claude_fake, "copilot": copilot_fake}


def huge_event(provider: str, size: int, piece: int = 64 * 1024) -> list[bytes]:
    """One SSE event of about `size` bytes cut in `piece`-sized writes, after one normal event."""
    if provider == "claude":
        first = b'event: message_start\ndata: {"type":"message_start","message":{"usage":{}}}\n\n'
        head = b'event: content_block_delta\ndata: {"type":"content_block_delta","delta":{"text":"'
    else:
        first = b'data: {"type":"response.created","response":{}}\n\n'
        head = b'data: {"type":"response.output_text.delta","delta":"'
    data = head + b"x" * size
    return [first] + [data[i : i + piece] for i in range(0, len(data), piece)]


async def read_sse(resp) -> bytes:
    return await resp.content.read()


@pytest.mark.parametrize("provider", ["codex", "claude", "copilot"])
async def test_an_event_past_max_event_mb_ends_the_stream_with_an_error_event(start_kleis, fakes, provider):
    kleis, key = await with_accounts(start_kleis, {provider: fakes[provider]}, server={"max_event_mb": 2})
    fakes[provider].queue(Reply(events=huge_event(provider, 3 * 1024 * 1024)))
    body = json.dumps(body_for(provider, stream=True)).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    async with kleis.http.post(kleis.url + ROUTES[provider], data=body, headers=headers) as resp:
        assert resp.status == 200
        raw = await read_sse(resp)
    assert len(raw) < 64 * 1024  # the huge event never reached the client, not even in part
    assert b"larger than 2 MB" in raw
    last = raw.rstrip().rsplit(b"\n\n", 1)[-1]
    payload = json.loads(last.split(b"data: ", 1)[1])
    if provider == "claude":
        assert last.startswith(b"event: error") and payload["type"] == "error"
    elif provider == "codex":
        assert payload["type"] == "error" and payload["code"] == "stream_interrupted"
    else:
        assert payload["error"]["code"] == "stream_interrupted"
    (row,) = await kleis.buckets()
    assert row["incomplete_count"] == 1 and row["success_count"] == 0


async def test_a_20_mb_event_keeps_the_loop_responsive(start_kleis, codex_fake):
    """Default cap (16 MB): a 20 MB event in 64 KB writes is refused once it passes the cap,
    and /healthz keeps answering while it streams (linear work per chunk, no stall)."""
    kleis, key = await with_accounts(start_kleis, {"codex": codex_fake})
    codex_fake.queue(Reply(events=huge_event("codex", 20 * 1024 * 1024), event_delay=0.0005))
    body = json.dumps(body_for("codex", stream=True)).encode()
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    health: list[int] = []

    async def probe():
        while True:
            async with kleis.http.get(kleis.url + "/healthz") as resp:
                health.append(resp.status)
            await asyncio.sleep(0.01)

    async with kleis.http.post(kleis.url + ROUTES["codex"], data=body, headers=headers) as resp:
        prober = asyncio.create_task(probe())
        try:
            raw = await read_sse(resp)
        finally:
            prober.cancel()
    assert b"larger than 16 MB" in raw and b'"code":"stream_interrupted"' in raw
    assert len(health) >= 5 and set(health) == {200}  # answered all along the stream


@pytest.mark.parametrize(
    "transformer",
    [
        lambda: OpenAIStream("responses", sse=True),  # Codex
        lambda: OpenAIStream("chat_completions", sse=True, strip_usage=True),  # Copilot
        lambda: ClaudeStream("sse", lambda: None, "mcp_"),
    ],
    ids=["codex", "copilot", "claude"],
)
def test_sse_transformers_report_the_unfinished_event_they_hold(transformer):
    """The contract the core's max_event_mb check relies on (it no longer scans chunks
    itself): `buffered` is the size of the event begun but not finished, whatever its line
    endings and however its blank line is split, and 0 at a boundary."""
    t = transformer()
    assert t.buffered == 0
    head = b'event: ping\ndata: {"type":"ping"}\n\n'
    part = b'event: ping\r\ndata: {"type":'
    assert t.feed(head + part) == head and t.buffered == len(part)
    assert t.feed(b'"ping"}\r\n') == b"" and t.buffered == len(part) + len(b'"ping"}\r\n')
    assert t.feed(b"\r\n") == part + b'"ping"}\r\n\r\n' and t.buffered == 0
    assert t.feed(b"x" * 100_000) == b"" and t.buffered == 100_000


def test_event_splitter_is_linear_and_exact(monkeypatch):
    """Many small chunks of one big event: each byte is searched a bounded number of times
    (the buffer is never re-scanned from its start), and events come out whole and in order."""
    scanned = [0]
    real = _sse.last_boundary_end

    def counting(buf, start=0):
        scanned[0] += len(buf) - start
        return real(buf, start) if start else real(buf)

    monkeypatch.setattr(_sse, "last_boundary_end", counting)
    splitter = EventSplitter()
    big = b"data: " + b"y" * 4_000_000 + b"\r\n\r\n"
    stream = b"data: 1\n\n" + big + b"data: 2\n\ndata: 3\n"
    out = b""
    for i in range(0, len(stream), 4096):
        out += splitter.whole(stream[i : i + 4096])
        assert splitter.buffered < len(big) + 4096
    assert out == b"data: 1\n\n" + big + b"data: 2\n\n" and splitter.rest() == b"data: 3\n"
    assert scanned[0] < 2 * len(stream)  # re-scanning the growing buffer would be ~1,000x
    # A blank line cut across two chunks, in every place.
    for cut in range(1, 5):
        s = EventSplitter()
        text = b"data: a\r\n\r\ndata: b\n\n"
        assert s.whole(text[: 7 + cut]) + s.whole(text[7 + cut :]) == text


@pytest.mark.parametrize("provider", ["codex", "claude"])
async def test_oversized_heads_are_431_or_414_in_the_routes_envelope(start_kleis, fakes, provider):
    kleis, key = await with_accounts(start_kleis, {provider: fakes[provider]})
    body = json.dumps(body_for(provider)).encode()
    auth = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json")]
    status, raw = await raw_request(kleis, ROUTES[provider], [*auth, ("X-Big", "a" * 20000)], body)
    error = envelope_error(provider, status, raw, 431)
    assert "headers are larger than 8 KB" in error["message"] and "body" not in error["message"]
    status, raw = await raw_request(kleis, ROUTES[provider] + "?" + "q" * 9000, auth, body)
    error = envelope_error(provider, status, raw, 414)
    assert "request line" in error["message"]
    for bad in ("Bad Name", "x\xff"):  # not a field name: 400, never forwarded
        status, raw = await raw_request(kleis, ROUTES[provider], [*auth, (bad, "1")], body)
        error = envelope_error(provider, status, raw, 400)
        assert "field name" in error["message"], error
    status, raw = await raw_request(kleis, ROUTES[provider], [*auth, ("X-A", "x\r\n folded")], body)
    envelope_error(provider, status, raw, 400)
    assert fakes[provider].calls({"codex": "/responses", "claude": "/v1/messages"}[provider]) == []
    # An admin path keeps the admin envelope.
    status, raw = await raw_request(kleis, "/admin/keys", [("X-Big", "a" * 20_000)], b"")
    assert status == 431 and json.loads(raw)["error"] == "request_header_fields_too_large"


@pytest.mark.parametrize("provider", ["codex", "claude", "copilot"])
async def test_a_persistent_upstream_401_names_the_account_not_the_key(start_kleis, fakes, provider):
    fake = fakes[provider]
    kleis = await start_kleis()
    account = await kleis.import_account(provider, fake.grant(), label="work mac")
    key, _ = await kleis.create_key(label="laptop")
    denied = Reply(status=401, body={"error": {"message": "invalid token", "type": "authentication_error"}})
    fake.queue(denied, denied)
    status, _, raw = await post(kleis, key, provider, json.dumps(body_for(provider)).encode())
    error = envelope_error(provider, status, raw, 502)
    assert "'work mac'" in error["message"] and "Kleis key is fine" in error["message"]
    assert "accounts login" in error["message"]
    if provider != "claude":
        assert error["code"] == "upstream_account_rejected"
    state = kleis.services.pool.accounts[account["id"]]
    assert state.cooling(kleis.clock.now()) and "401" in state.last_error
    _, listed = await kleis.admin("GET", "/admin/accounts", expect=200)
    shown = next(a for a in listed["accounts"] if a["id"] == account["id"])
    assert "HTTP 401" in shown["lastError"] and "log in again" in shown["lastError"]
    (row,) = await kleis.buckets()
    assert row["server_error_count"] == 1 and row["upstream_error_count"] == 1
    assert row["proxy_error_count"] == 0  # not counted against Kleis


async def test_a_single_upstream_401_still_recovers_with_a_refresh(start_kleis, codex_fake):
    kleis, key = await with_accounts(start_kleis, {"codex": codex_fake})
    codex_fake.queue(FakeCodex.error_reply(401, "expired", code="invalid_token"))
    status, _, raw = await post(kleis, key, "codex", json.dumps(body_for("codex")).encode())
    assert status == 200, raw


# ── fuzzing ──────────────────────────────────────────────────────────────────

JSON_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40),
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
FIELDS = {
    "codex": ["model", "input", "instructions", "stream", "tools", "prompt_cache_key", "reasoning"],
    "claude": ["model", "messages", "system", "stream", "tools", "metadata", "max_tokens", "tool_choice"],
    "copilot": ["model", "messages", "stream", "tools", "stream_options", "tool_choice"],
}


def encoded(value) -> bytes:
    """JSON as a client might send it, lone surrogates and NaN literals included."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


def bodies(provider: str):
    model = st.one_of(st.just(MODELS[provider]), st.text(max_size=30), JSON_LEAVES)
    obj = st.fixed_dictionaries(
        {"model": model},
        optional={name: JSON_VALUES for name in FIELDS[provider] if name != "model"},
    ).map(encoded)
    deep = st.integers(min_value=1, max_value=5000).map(
        lambda n: b'{"model": "%s", "input": ' % MODELS[provider].encode() + b"[" * n + b"]" * n + b"}"
    )
    junk = st.binary(max_size=200)
    literals = st.sampled_from([b"NaN", b"-Infinity", b'{"model": NaN}', b"1e400", b'{"model": "\\ud800"}'])
    return st.one_of(obj, deep, junk, literals)


HEADER_VALUES = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=40)
HEADER_NAMES = st.sampled_from(
    ["x-session-id", "session-id", "anthropic-beta", "x-initiator", "openai-intent", "originator",
     "content-encoding", "anthropic-version", "x-custom", "user-agent"]
)  # fmt: skip


@pytest.mark.parametrize("provider", ["codex", "claude", "copilot"])
async def test_fuzz_proxy_routes_never_answer_5xx(start_kleis, fakes, provider):
    """Random bodies (nesting, huge ints, NaN, surrogates, junk) and header values (control
    characters over a raw socket) on each proxy route: always a non-5xx answer in the route's
    envelope, never a traceback. Bounded to ~8 s per route."""
    fake = fakes[provider]
    kleis, key = await with_accounts(start_kleis, {provider: fake})
    loop = asyncio.get_running_loop()
    seen: list[tuple[int, bytes]] = []

    @settings(
        max_examples=150, deadline=None, database=None, derandomize=True,
        suppress_health_check=list(HealthCheck),
    )  # fmt: skip
    @given(body=bodies(provider), extra=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=3))
    def run(body: bytes, extra: list[tuple[str, str]]):
        headers = [("Authorization", f"Bearer {key}"), ("Content-Type", "application/json"), *extra]
        future = asyncio.run_coroutine_threadsafe(raw_request(kleis, ROUTES[provider], headers, body), loop)
        status, raw = future.result(timeout=20)
        seen.append((status, raw))
        assert status < 500, (status, raw[:300], body[:200], extra)
        assert b"Traceback" not in raw
        if status >= 400:
            envelope_error(provider, status, raw, status)

    # hypothesis drives a blocking function: run it in a thread, the server on this loop.
    await asyncio.to_thread(run)
    assert len(seen) >= 50 and any(s == 200 for s, _ in seen) and any(s == 400 for s, _ in seen)
    # Whatever was accepted can be stored: the usage flush goes through (nothing held back).
    rows = await kleis.buckets()
    assert sum(r["success_count"] for r in rows) == sum(1 for s, _ in seen if s == 200)
    assert kleis.services.usage.depth == 0


@pytest.mark.parametrize("model", ["\\ud800", "gpt-5.5\\u001b[31m", "a\\u0085b"])
async def test_a_model_with_lone_surrogates_or_control_characters_is_400(start_kleis, codex_fake, model):
    """Such a model name could not be stored as UTF-8 (the usage flush would fail for good,
    holding every other bucket back) or would forge log lines."""
    kleis, key = await with_accounts(start_kleis, {"codex": codex_fake})
    raw = ('{"model": "' + model + '", "input": "hi"}').encode()
    status, _, answer = await post(kleis, key, "codex", raw)
    message = envelope_error("codex", status, answer, 400)["message"]
    assert "control characters or lone surrogate" in message or "surrogate in string" in message
    assert not codex_fake.calls("/responses")
    status, _, _ = await post(kleis, key, "codex", json.dumps(body_for("codex")).encode())
    assert status == 200
    (row,) = await kleis.buckets()
    assert row["model"] == MODELS["codex"] and row["request_count"] == 1
