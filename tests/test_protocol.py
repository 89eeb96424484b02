"""Protocol edges the core owns (issue 9), end to end on every provider route.

Each test runs the real app against the loopback fakes and checks what the client got (status,
the route's error envelope, headers) and what the fake upstream received. One test per kind,
each with several inputs of that kind:

- request bodies with Content-Encoding (zstd, gzip, deflate; unknown coding, bomb, corrupt);
- repeated header lines (RFC 9110 §5.3);
- upstream redirects, which are never relayed;
- hostile bodies and headers, which get a 4xx in the envelope, never a 500;
- cooldowns after 5xx / 529 / unreachable (one data point never benches an account);
- GET …/v1/models/{id}, the Anthropic list's paging, unknown routes logged.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import zlib

import pytest
import zstandard

from runtime import ManualClock
from tests.conftest import wait_for
from tests.fakes import Reply

MODELS = {"codex": "gpt-5.5", "claude": "claude-sonnet-4-5", "copilot": "gpt-4.1"}
ROUTES = {
    "codex": "/openai/v1/responses",
    "claude": "/anthropic/v1/messages",
    "copilot": "/copilot/v1/chat/completions",
}
UPSTREAM_PATHS = {"codex": "/responses", "claude": "/v1/messages", "copilot": "/chat/completions"}


def body_for(provider: str, text: str = "hello", **extra) -> dict:
    if provider == "codex":
        return {"model": MODELS[provider], "input": text, **extra}
    body = {"model": MODELS[provider], "messages": [{"role": "user", "content": text}], **extra}
    if provider == "claude":
        body["max_tokens"] = 64
    return body


@pytest.fixture
def fakes(codex_fake, claude_fake, copilot_fake) -> dict:
    return {"codex": codex_fake, "claude": claude_fake, "copilot": copilot_fake}


async def with_accounts(start_kleis, fakes: dict, **config):
    kleis = await start_kleis(**config)
    for name, fake in fakes.items():
        await kleis.import_account(name, fake.grant(), label=f"{name}-main")
    key, _ = await kleis.create_key(label="laptop")
    return kleis, key


async def post(kleis, key: str, provider: str, data: bytes, headers: dict | None = None):
    sent = {"content-type": "application/json", "authorization": f"Bearer {key}", **(headers or {})}
    async with kleis.http.post(kleis.url + ROUTES[provider], data=data, headers=sent) as resp:
        return resp.status, resp.headers, await resp.read()


def envelope_error(provider: str, status: int, raw: bytes, expect: int) -> dict:
    """The route's envelope: Anthropic's `{"type": "error", "error": {...}}` on the Claude
    route, OpenAI's `{"error": {...}}` elsewhere; returns the inner error object."""
    assert status == expect, (status, raw[:400])
    body = json.loads(raw)
    if provider == "claude":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}, body
    else:
        assert set(body) == {"error"} and {"message", "type", "code"} <= set(body["error"]), body
    assert "Traceback" not in body["error"]["message"]
    return body["error"]


def upstream(fakes: dict, provider: str) -> list:
    return fakes[provider].calls(UPSTREAM_PATHS[provider])


# ── Content-Encoding ─────────────────────────────────────────────────────────


def zstd_streamed(data: bytes) -> bytes:
    """zstd without a content size in the frame header, as a streaming compressor writes it."""
    compressor = zstandard.ZstdCompressor().compressobj()
    return compressor.compress(data) + compressor.flush()


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    "provider,coding,encode",
    [
        ("codex", "zstd", lambda d: zstandard.ZstdCompressor().compress(d)),
        ("codex", "zstd", zstd_streamed),
        ("claude", "gzip", gzip.compress),
        ("copilot", "deflate", zlib.compress),
        ("copilot", "deflate", raw_deflate),
        ("claude", "gzip, zstd", lambda d: zstandard.ZstdCompressor().compress(gzip.compress(d))),
        ("codex", "identity", lambda d: d),
        ("codex", "gzip", lambda d: gzip.compress(d[:100]) + gzip.compress(d[100:])),
        (
            "claude",
            "zstd",
            lambda d: (
                zstandard.ZstdCompressor().compress(d[:50]) + zstandard.ZstdCompressor().compress(d[50:])
            ),
        ),
    ],
    ids=[
        "zstd",
        "zstd-streamed",
        "gzip",
        "deflate-zlib",
        "deflate-raw",
        "gzip-then-zstd",
        "identity",
        "gzip-two-members",
        "zstd-two-frames",
    ],
)
async def test_encoded_request_bodies_are_decoded(start_kleis, fakes, provider, coding, encode):
    kleis, key = await with_accounts(start_kleis, {provider: fakes[provider]})
    sent = body_for(provider, "hello " + "x" * 2000)
    status, _, raw = await post(
        kleis, key, provider, encode(json.dumps(sent).encode()), {"content-encoding": coding}
    )
    assert status == 200, raw[:400]
    (call,) = upstream(fakes, provider)
    assert "content-encoding" not in call.headers  # re-serialised by the adapter, sent plain
    assert call.json["model"] == MODELS[provider]
    assert b"x" * 2000 in call.body


async def test_bad_encodings_are_4xx_in_the_envelope(start_kleis, fakes):
    kleis, key = await with_accounts(start_kleis, fakes, server={"max_body_mb": 1})
    plain = json.dumps(body_for("codex")).encode()
    bomb = b'{"model": "gpt-5.5", "input": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    cases = [
        ("codex", "br", plain, 415, "unsupported_content_encoding"),
        ("copilot", "compress", plain, 415, "unsupported_content_encoding"),
        ("codex", "zstd", zstandard.ZstdCompressor().compress(bomb), 413, "request_too_large"),
        ("copilot", "gzip", gzip.compress(bomb), 413, "request_too_large"),
        ("codex", "zstd", b"not zstd at all", 400, "bad_request"),
        ("copilot", "gzip", gzip.compress(plain)[:-6], 400, "bad_request"),
        ("claude", "gzip", b"\x1f\x8b garbage", 400, None),
        ("claude", "zstd", zstandard.ZstdCompressor().compress(bomb), 413, None),
        ("codex", "gzip", gzip.compress(plain) + b"trailing junk", 400, "bad_request"),
        ("codex", "zstd", zstandard.ZstdCompressor().compress(plain * 50)[:-7], 400, "bad_request"),
    ]
    for provider, coding, data, status, code in cases:
        got, _, raw = await post(kleis, key, provider, data, {"content-encoding": coding})
        error = envelope_error(provider, got, raw, status)
        if code is not None:
            assert error["code"] == code, (coding, error)
        if status == 415:
            assert "zstd" in error["message"] and "gzip" in error["message"]
        if status == 400:
            assert coding in error["message"], error  # names the coding, not "invalid JSON"
    assert all(upstream(fakes, p) == [] for p in fakes)


# ── Repeated header lines ────────────────────────────────────────────────────


async def test_repeated_header_lines_arrive_as_one_list(start_kleis, fakes):
    kleis, key = await with_accounts(start_kleis, fakes)
    base = [("Content-Type", "application/json"), ("Authorization", f"Bearer {key}")]
    betas = [
        ("anthropic-beta", "context-1m-2025-08-07"),
        ("Anthropic-Beta", "files-api-2025-04-14,  token-efficient-tools-2025-02-19"),
    ]
    data = json.dumps(body_for("claude")).encode()
    status, raw = await raw_request(kleis, ROUTES["claude"], base + betas, data)
    assert status == 200, raw[:300]
    got = [b.strip() for b in upstream(fakes, "claude")[0].headers["anthropic-beta"].split(",")]
    for beta in ("context-1m-2025-08-07", "files-api-2025-04-14", "token-efficient-tools-2025-02-19"):
        assert beta in got, got
    assert "oauth-2025-04-20" in got and len(got) == len(set(got))

    traces = [("x-trace", "a"), ("X-Trace", "b"), ("x-trace", "c")]
    for provider in ("codex", "copilot"):
        data = json.dumps(body_for(provider)).encode()
        status, raw = await raw_request(kleis, ROUTES[provider], base + traces, data)
        assert status == 200, raw[:300]
        assert upstream(fakes, provider)[-1].headers["x-trace"] == "a, b, c"


# ── Upstream redirects ───────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "provider,status", [("codex", 302), ("claude", 307), ("copilot", 301), ("codex", 308)]
)
async def test_upstream_redirect_is_a_502_never_relayed(start_kleis, fakes, provider, status, caplog):
    kleis, key = await with_accounts(start_kleis, {provider: fakes[provider]})
    fakes[provider].queue(
        Reply(status=status, body={"moved": True}, headers={"Location": "http://elsewhere.invalid/steal?x=1"})
    )
    with caplog.at_level(logging.WARNING, logger="kleis"):
        got, headers, raw = await post(kleis, key, provider, json.dumps(body_for(provider)).encode())
    error = envelope_error(provider, got, raw, 502)
    assert "redirect" in error["message"]
    assert "location" not in {k.lower() for k in headers}
    assert len(upstream(fakes, provider)) == 1  # not followed
    logged = [r.getMessage() for r in caplog.records if "redirect" in r.getMessage()]
    assert logged and "http://elsewhere.invalid" in logged[0] and "steal" not in logged[0]
    await kleis.flush()
    (row,) = await kleis.buckets()
    assert row["request_count"] == 1 and row["success_count"] == 0


# ── Hostile input: a 4xx in the envelope, never a 500 ────────────────────────


async def raw_request(kleis, path: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request over a plain socket: aiohttp's client refuses to send control
    characters in headers, which is exactly the input this needs."""
    host, port = kleis.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    head, _, rest = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"transfer-encoding: chunked" in head.lower():
        chunks, rest2 = [], rest
        while rest2:
            size_line, _, rest2 = rest2.partition(b"\r\n")
            size = int(size_line, 16)
            if not size:
                break
            chunks.append(rest2[:size])
            rest2 = rest2[size + 2 :]
        rest = b"".join(chunks)
    return status, rest


@pytest.mark.parametrize("provider", ["codex", "claude", "copilot"])
async def test_hostile_bodies_and_headers_are_4xx(start_kleis, fakes, provider):
    kleis, key = await with_accounts(start_kleis, {provider: fakes[provider]})
    deep_list = (
        b'{"model": "%s", "input": ' % MODELS[provider].encode() + b"[" * 10_000 + b"]" * 10_000 + b"}"
    )
    plain = json.dumps(body_for(provider)).encode()
    deep_object = plain[:-1] + b', "metadata": ' + b'{"a": ' * 5_000 + b'"x"' + b"}" * 5_000 + b"}"
    for data in (deep_list, deep_object):
        got, _, raw = await post(kleis, key, provider, data)
        error = envelope_error(provider, got, raw, 400)
        assert "nested" in error["message"] or "Recursion" in error["message"], error
    assert upstream(fakes, provider) == []
    # 240 levels parse and are forwarded as they are (no walk of the body may fail on them);
    # 900 parse but cannot be written again by orjson (254 levels): a 400, nothing sent
    medium = plain[:-1] + b', "metadata": ' + b'{"a": ' * 240 + b'"x"' + b"}" * 240 + b"}"
    got, _, raw = await post(kleis, key, provider, medium)
    assert got == 200, raw[:300]
    assert len(upstream(fakes, provider)) == 1
    fakes[provider].requests.clear()
    deeper = plain[:-1] + b', "metadata": ' + b'{"a": ' * 900 + b'"x"' + b"}" * 900 + b"}"
    got, _, raw = await post(kleis, key, provider, deeper)
    assert "nested too deeply" in envelope_error(provider, got, raw, 400)["message"]
    assert upstream(fakes, provider) == []

    base = [("Content-Type", "application/json"), ("Authorization", f"Bearer {key}")]
    for bad in [
        ("X-Note", "a\x01b"),
        ("X-Note", "del\x7f"),
        ("Anthropic-Beta", "x\x00y"),
        ("X-Note", "a\x1bb"),
    ]:
        status, raw = await raw_request(kleis, ROUTES[provider], [*base, bad], plain)
        assert 400 <= status < 500, (bad, status, raw[:300])
        if raw:
            error = envelope_error(provider, status, raw, status)
            assert "control character" in error["message"] or status != 400
    assert upstream(fakes, provider) == []
    # Horizontal tab is allowed inside a field value, and non-ASCII (obs-text) passes too.
    status, raw = await raw_request(kleis, ROUTES[provider], [*base, ("X-Note", "tab\there")], plain)
    assert status == 200, raw[:300]


# ── Cooldowns after 5xx, 529 and unreachable upstreams ───────────────────────


async def account_rows(kleis, provider: str) -> list[dict]:
    return sorted(await kleis.rows("provider_accounts", provider=provider), key=lambda r: r["label"])


async def test_one_overload_or_5xx_never_benches_an_account(start_kleis, claude_fake, codex_fake, http):
    kleis, key = await with_accounts(start_kleis, {"claude": claude_fake, "codex": codex_fake})
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    claude_fake.queue(Reply(status=529, body=overloaded))
    got, _, raw = await post(kleis, key, "claude", json.dumps(body_for("claude")).encode())
    assert got == 529 and json.loads(raw)["error"]["type"] == "overloaded_error"  # relayed as it came
    # The next request reaches the upstream at once instead of a local 503.
    got, _, raw = await post(kleis, key, "claude", json.dumps(body_for("claude")).encode())
    assert got == 200, raw[:300]
    assert len(upstream({"claude": claude_fake}, "claude")) == 2

    codex_fake.queue(Reply(status=500, body={"error": {"message": "boom"}}), Reply(status=503, body={}))
    for expected in (500, 503, 200):
        got, _, _ = await post(kleis, key, "codex", json.dumps(body_for("codex")).encode())
        assert got == expected
    for provider in ("claude", "codex"):
        (row,) = await account_rows(kleis, provider)
        assert row["cooldown_until"] is None, row


async def test_a_5xx_fails_over_and_a_streak_benches(start_kleis, codex_fake):
    kleis = await start_kleis()
    first = await kleis.import_account("codex", codex_fake.grant("acct_1", "one@example.com"), label="a-one")
    await kleis.import_account("codex", codex_fake.grant("acct_2", "two@example.com"), label="b-two")
    await kleis.admin("POST", f"/admin/accounts/{first['id']}/primary", expect=200)
    key, _ = await kleis.create_key(label="laptop")
    data = json.dumps(body_for("codex")).encode()

    codex_fake.queue(Reply(status=502, body={}))  # acct_1 fails once; acct_2 answers
    got, _headers, _ = await post(kleis, key, "codex", data)
    assert got == 200
    seen = [c.headers["chatgpt-account-id"] for c in codex_fake.calls("/responses")]
    assert seen == ["acct_1", "acct_2"]
    rows = await account_rows(kleis, "codex")
    assert [r["cooldown_until"] for r in rows] == [None, None]

    # The third 5xx in a row from acct_1 benches it (10 s); acct_2 serves meanwhile.
    for status in (500, 503):
        codex_fake.queue(Reply(status=status, body={}))
        assert (await post(kleis, key, "codex", data))[0] == 200

    async def benched():
        rows = await account_rows(kleis, "codex")
        return rows[0]["cooldown_until"] is not None and rows[0]["cooldown_kind"] == "error"

    await wait_for(benched)
    before = len(codex_fake.calls("/responses"))
    assert (await post(kleis, key, "codex", data))[0] == 200
    assert [c.headers["chatgpt-account-id"] for c in codex_fake.calls("/responses")[before:]] == ["acct_2"]


# ── Model routes ─────────────────────────────────────────────────────────────


async def test_model_by_id_on_every_route(start_kleis, fakes, http):
    kleis, key = await with_accounts(start_kleis, fakes)
    auth = {"authorization": f"Bearer {key}"}
    for base, style in (("/openai/v1", "openai"), ("/copilot/v1", "openai"), ("/anthropic/v1", "anthropic")):
        async with http.get(kleis.url + base + "/models", headers=auth) as resp:
            listed = await resp.json()
        first = listed["data"][0]["id"]
        async with http.get(kleis.url + f"{base}/models/{first}", headers=auth) as resp:
            assert resp.status == 200
            one = await resp.json()
        assert one == listed["data"][0]
        async with http.get(kleis.url + f"{base}/models/no-such-model-9", headers=auth) as resp:
            assert resp.status == 404
            body = await resp.json()
        provider = "claude" if style == "anthropic" else "codex"
        error = envelope_error(provider, 404, json.dumps(body).encode(), 404)
        assert "no-such-model-9" in error["message"]
        if style == "openai":
            assert error["code"] == "model_not_found"
        async with http.get(kleis.url + f"{base}/models/{first}") as resp:
            assert resp.status == 401  # key required, like the list


async def test_anthropic_model_list_pages(start_kleis, fakes, http):
    kleis, key = await with_accounts(start_kleis, {"claude": fakes["claude"]})
    auth = {"x-api-key": key}
    url = kleis.url + "/anthropic/v1/models"
    async with http.get(url, headers=auth, params={"limit": "1000"}) as resp:
        everything = [m["id"] for m in (await resp.json())["data"]]
    assert len(everything) > 3
    async with http.get(url, headers=auth) as resp:
        page = await resp.json()
    assert len(page["data"]) == min(20, len(everything))  # Anthropic's default page size
    seen, after = [], None
    while True:
        params = {"limit": "2", **({"after_id": after} if after else {})}
        async with http.get(url, headers=auth, params=params) as resp:
            page = await resp.json()
        seen += [m["id"] for m in page["data"]]
        assert page["first_id"] == page["data"][0]["id"] and page["last_id"] == page["data"][-1]["id"]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert seen == everything
    async with http.get(url, headers=auth, params={"limit": "2", "before_id": everything[3]}) as resp:
        page = await resp.json()
    assert [m["id"] for m in page["data"]] == everything[1:3] and page["has_more"] is True
    for bad in ({"limit": "0"}, {"limit": "1001"}, {"limit": "x"}, {"after_id": "nope"}):
        async with http.get(url, headers=auth, params=bad) as resp:
            body = await resp.json()
            assert resp.status == 400, (bad, body)
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


async def test_unknown_routes_are_logged_with_their_path(start_kleis, http, caplog):
    kleis = await start_kleis()
    with caplog.at_level(logging.INFO, logger="kleis"):
        async with http.post(kleis.url + "/anthropic/v1/messages/batches", json={}) as resp:
            assert resp.status == 404
            body = await resp.json()
        async with http.get(kleis.url + "/openai/v1/files/kleis_" + "a" * 40) as resp:
            assert resp.status == 404
    assert body["type"] == "error"  # the Anthropic envelope under /anthropic
    lines = [
        r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "no route" in r.getMessage()
    ]
    assert any("POST /anthropic/v1/messages/batches" in line for line in lines), lines
    assert not any("a" * 40 in line for line in lines), lines  # token-like segments are masked


async def test_an_error_inside_a_collected_answer_fails_over_like_a_refusal(start_kleis, codex_fake):
    """Codex collects the stream for a client that did not ask for one, so an in-stream
    usage_limit_reached is known before anything is sent: the next account serves, and the
    exhausted one rests until its window resets."""
    kleis = await start_kleis()
    first = await kleis.import_account("codex", codex_fake.grant("acct_1", "one@example.com"), label="a-one")
    second = await kleis.import_account("codex", codex_fake.grant("acct_2", "two@example.com"), label="b-two")
    await kleis.admin("POST", f"/admin/accounts/{first['id']}/primary", expect=200)
    key, _ = await kleis.create_key(label="laptop")
    codex_fake.queue(
        codex_fake.error_event_reply(
            "usage_limit_reached", "The usage limit has been reached", nested=True, resets_in_seconds=1800
        )
    )
    got, headers, raw = await post(kleis, key, "codex", json.dumps(body_for("codex")).encode())
    assert got == 200 and headers["x-kleis-account"] == second["id"], raw[:300]
    assert json.loads(raw)["object"] == "response"
    state = kleis.services.pool.accounts[first["id"]]
    assert state.cooldown_kind == "window"
    assert 1_790_000 <= state.cooldown_until - kleis.clock.now() <= 1_800_000

    # With no account left, the client hears the upstream's refusal in the OpenAI envelope.
    codex_fake.queue(codex_fake.error_event_reply("usage_limit_reached", "Limit reached.", nested=True))
    got, _, raw = await post(kleis, key, "codex", json.dumps(body_for("codex")).encode())
    error = envelope_error("codex", got, raw, 429)
    assert error["code"] == "usage_limit_reached" and error["message"] == "Limit reached."


# ── Found in review: more inputs of the same kinds ───────────────────────────


async def test_an_unknown_error_code_in_a_collected_answer_is_this_requests(start_kleis, codex_fake):
    """Kind 1/7: a code Kleis does not know (`invalid_image_format`) is the request's problem:
    a 400 with the upstream's code, one upstream call, no failover and no cooldown."""
    kleis = await start_kleis()
    for i in (1, 2):
        await kleis.import_account("codex", codex_fake.grant(f"acct_{i}", f"u{i}@example.com"), label=f"a{i}")
    key, _ = await kleis.create_key(label="laptop")
    for _ in range(4):
        codex_fake.queue(codex_fake.error_event_reply("invalid_image_format", "The image could not be read."))
        got, _, raw = await post(kleis, key, "codex", json.dumps(body_for("codex")).encode())
        error = envelope_error("codex", got, raw, 400)
        assert error["code"] == "invalid_image_format" and error["message"] == "The image could not be read."
    assert len(codex_fake.calls("/responses")) == 4  # never re-sent to the other account
    assert [r["cooldown_until"] for r in await account_rows(kleis, "codex")] == [None, None]
    assert (await post(kleis, key, "codex", json.dumps(body_for("codex")).encode()))[0] == 200


async def test_a_failure_streak_needs_failures_close_together(start_kleis, claude_fake):
    """Kind 7: three 529s an hour apart are three passing overloads, not a state; a cleared
    cooldown starts from nothing."""
    clock = ManualClock()
    kleis, key = await with_accounts(start_kleis, {"claude": claude_fake}, clock=clock)
    account = (await account_rows(kleis, "claude"))[0]
    overloaded = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    data = json.dumps(body_for("claude")).encode()
    for _ in range(4):
        claude_fake.queue(Reply(status=529, body=overloaded))
        assert (await post(kleis, key, "claude", data))[0] == 529
        clock.advance(61_000)
    assert (await post(kleis, key, "claude", data))[0] == 200

    for _ in range(2):
        claude_fake.queue(Reply(status=529, body=overloaded))
        assert (await post(kleis, key, "claude", data))[0] == 529
    await kleis.admin("DELETE", f"/admin/accounts/{account['id']}/cooldown", expect=200)
    claude_fake.queue(Reply(status=529, body=overloaded))
    assert (await post(kleis, key, "claude", data))[0] == 529
    assert (await post(kleis, key, "claude", data))[0] == 200  # reached the upstream: not benched
    assert not kleis.services.pool.accounts[account["id"]].cooling(clock.now())


async def test_a_count_tokens_refusal_leaves_messages_alone(start_kleis, claude_fake):
    """Kind 6/7: count_tokens has limits of its own; its 429 must not rest the account."""
    kleis, key = await with_accounts(start_kleis, {"claude": claude_fake})
    limited = {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down."}}
    claude_fake.queue(Reply(status=429, body=limited, headers={"retry-after": "60"}))
    count = {"model": MODELS["claude"], "messages": [{"role": "user", "content": "hi"}]}
    async with kleis.http.post(
        kleis.url + "/anthropic/v1/messages/count_tokens", json=count, headers={"x-api-key": key}
    ) as resp:
        assert resp.status == 429
    got, _, raw = await post(kleis, key, "claude", json.dumps(body_for("claude")).encode())
    assert got == 200, raw[:300]
    (row,) = await account_rows(kleis, "claude")
    assert row["cooldown_until"] is None


def deep_json(levels: int) -> bytes:
    return b'{"a": ' * levels + b"1" + b"}" * levels


@pytest.mark.parametrize(
    "provider,stream", [("claude", False), ("claude", True), ("codex", False), ("copilot", True)]
)
async def test_deeply_nested_upstream_answers_never_make_a_500(start_kleis, fakes, provider, stream):
    """Kind 10, upstream side: an answer nested ~990 levels (a tool input the model was steered
    into) is relayed or refused cleanly, never a 500."""
    kleis, key = await with_accounts(start_kleis, {provider: fakes[provider]})
    deep = deep_json(990)
    if provider == "claude" and not stream:
        payload = (
            b'{"type":"message","role":"assistant","content":[{"type":"tool_use","name":"mcp_Read","input":'
        )
        reply = Reply(events=[payload + deep + b'}],"usage":{"input_tokens":1,"output_tokens":1}}'],
                      content_type="application/json")  # fmt: skip
    elif provider == "claude":
        event = b'event: content_block_start\ndata: {"type":"content_block_start","index":0,"content_block":'
        reply = Reply(events=[event + b'{"type":"tool_use","name":"mcp_Read","input":' + deep + b"}}\n\n"])
    elif provider == "codex":
        reply = Reply(events=[b'data: {"type":"response.completed","response":' + deep + b"}\n\n"])
    else:
        reply = Reply(events=[b'data: {"choices":[],"usage":' + deep + b"}\n\n", b"data: [DONE]\n\n"])
    fakes[provider].queue(reply)
    extra = {"stream": True} if stream else {}
    got, _, raw = await post(kleis, key, provider, json.dumps(body_for(provider, **extra)).encode())
    assert got != 500 and got in (200, 502), (got, raw[:300])
    assert b"Traceback" not in raw


async def test_two_content_encoding_lines_are_one_list(start_kleis, fakes):
    """Kinds 4 and 5: `Content-Encoding: gzip` and `Content-Encoding: zstd` on two lines equal
    `gzip, zstd`: gzip applied first, then zstd."""
    kleis, key = await with_accounts(start_kleis, {"claude": fakes["claude"]})
    data = zstandard.ZstdCompressor().compress(gzip.compress(json.dumps(body_for("claude")).encode()))
    base = [("Content-Type", "application/json"), ("X-Api-Key", key)]
    codings = [("Content-Encoding", "gzip"), ("Content-Encoding", "zstd")]
    status, raw = await raw_request(kleis, ROUTES["claude"], base + codings, data)
    assert status == 200, raw[:300]


async def test_retrieve_takes_the_ids_api_json_hands_out(start_kleis, fakes, sdk_clients):
    """Kind 6: `models.retrieve("anthropic/claude-…")` (percent-encoded by the SDK) names the
    same model as the bare id."""
    import anthropic
    import openai

    kleis, key = await with_accounts(start_kleis, fakes)
    claude = sdk_clients(
        anthropic.AsyncAnthropic(base_url=kleis.url + "/anthropic", api_key=key, max_retries=0)
    )
    gpt = sdk_clients(openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0))
    first = (await claude.models.list()).data[0].id
    assert (await claude.models.retrieve(f"anthropic/{first}")).id == first
    assert (await claude.models.retrieve(first)).id == first
    assert (await gpt.models.retrieve("openai/gpt-5.5")).id == "gpt-5.5"
    with pytest.raises(anthropic.NotFoundError) as missing:
        await claude.models.retrieve("anthropic/no-such-model")
    assert "'no-such-model'" in missing.value.message and "%2F" not in missing.value.message


async def test_head_works_wherever_get_does(start_kleis, http):
    """RFC 9110 §9.3.2: uptime monitors and `curl -I` ask with HEAD."""
    kleis = await start_kleis()
    for path in ("/", "/healthz", "/readyz", "/api.json", "/admin/"):
        async with http.head(kleis.url + path) as resp:
            assert resp.status == 200 and await resp.read() == b"", path
