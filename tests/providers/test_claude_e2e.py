"""Claude end to end: clients → Kleis over HTTP → the fake Anthropic upstream.

Every test runs the real app on a loopback port and checks four things: what the client got
(bodies, headers, SSE framing), what the fake upstream received, the account rows, and the
usage buckets (flushed explicitly, never slept for).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anthropic
import orjson
import pytest

from tests.conftest import wait_for
from tests.fakes.claude import DEFAULT_EMAIL, DEFAULT_UUID, FakeClaude
from tests.fakes.claude import count_of as claude_count

DATA = Path(__file__).parent.parent / "data"
MESSAGES = "/anthropic/v1/messages"
IDENTITY = "You are Claude Code, Anthropic's official CLI for Claude."
REQUIRED_BETAS = [
    "claude-code-20250219",
    "oauth-2025-04-20",
    "interleaved-thinking-2025-05-14",
    "fine-grained-tool-streaming-2025-05-14",
]
MODEL = "claude-sonnet-4-5"
SHELL_TOOL = {
    "name": "Shell",
    "description": "Run a command",
    "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
}


# ── helpers ──────────────────────────────────────────────────────────────────


async def kleis_with_account(start_kleis, fake: FakeClaude, db_url: str | None = None, **grant):
    kleis = await start_kleis(db_url=db_url)
    account = await kleis.import_account("claude", fake.grant(**grant), label="main")
    key, key_view = await kleis.create_key(label="laptop")
    return kleis, key, key_view, account


@pytest.fixture
def sdk(sdk_clients):
    """The official SDK client pointed at Kleis (closed after the test)."""
    return lambda kleis, key: sdk_clients(
        anthropic.AsyncAnthropic(base_url=kleis.url + "/anthropic", api_key=key, max_retries=0)
    )


def simple_body(**extra) -> dict:
    return {"model": MODEL, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **extra}


async def account_rows(kleis) -> list[dict]:
    return await kleis.rows("provider_accounts", provider="claude")


def parse_sse(raw: bytes) -> list[tuple[str | None, dict]]:
    """Split a Messages stream into (event name, data) pairs, insisting on well-formed SSE:
    LF-terminated events separated by blank lines, one JSON data line each, nothing trailing."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        lines = [line for line in block.split("\n") if not line.startswith(":")]
        if not lines:
            continue  # a keepalive comment
        name = None
        data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        for line in lines:
            if line.startswith("event: "):
                name = line[len("event: ") :]
            else:
                assert line.startswith("data: "), f"unexpected SSE line {line!r}"
        assert len(data) == 1, block
        payload = json.loads(data[0])
        if name is not None:
            assert payload["type"] == name, block
        events.append((name, payload))
    return events


def tool_names(events: list[tuple[str | None, dict]]) -> list[str]:
    return [
        p["content_block"]["name"]
        for _, p in events
        if p["type"] == "content_block_start" and p["content_block"]["type"] == "tool_use"
    ]


def only_bucket(rows: list[dict]) -> dict:
    assert len(rows) == 1, rows
    return rows[0]


def app_errors(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("kleis", "sanic"))
    ]


# ── the official SDK ─────────────────────────────────────────────────────────


async def test_sdk_stream_with_tools_restores_the_clients_names(
    db_url, start_kleis, claude_fake, caplog, sdk
):
    kleis, key, key_view, account = await kleis_with_account(start_kleis, claude_fake, db_url)
    client = sdk(kleis, key)
    claude_fake.queue(
        FakeClaude.stream_reply(
            "Let me look.",
            tool_use=("mcp_Shell", {"command": "ls -la"}),
            usage={"input": 100, "output": 20, "cache_read": 30, "cache_write": 7},
        )
    )
    async with client.messages.stream(
        model=MODEL, max_tokens=256, tools=[SHELL_TOOL], messages=[{"role": "user", "content": "list files"}]
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
        headers = stream.response.headers
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache, no-transform"
    assert headers["x-accel-buffering"] == "no"
    assert headers["x-kleis-account"] == account["id"]
    starts = [e.content_block for e in events if e.type == "content_block_start"]
    assert [b.type for b in starts] == ["text", "tool_use"]
    assert starts[1].name == "Shell"  # exactly as declared, not "shell"
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "Let me look."
    assert (final.content[1].name, final.content[1].input) == ("Shell", {"command": "ls -la"})
    assert final.stop_reason == "tool_use"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (100, 20)

    # a tool declared in lower case comes back in lower case
    claude_fake.queue(FakeClaude.stream_reply("", tool_use=("mcp_Bash", {"command": "pwd"})))
    bash_tool = {**SHELL_TOOL, "name": "bash"}
    async with client.messages.stream(
        model=MODEL, max_tokens=256, tools=[bash_tool], messages=[{"role": "user", "content": "where am I"}]
    ) as stream:
        final2 = await stream.get_final_message()
    assert [(b.type, b.name) for b in final2.content] == [("tool_use", "bash")]

    first, second = claude_fake.calls("/v1/messages")
    assert [t["name"] for t in first.json["tools"]] == ["mcp_Shell"]
    assert [t["name"] for t in second.json["tools"]] == ["mcp_Bash"]
    assert first.json["stream"] is True and first.json["model"] == MODEL

    rows = await kleis.buckets()
    row = only_bucket(rows)
    assert (row["provider"], row["endpoint"], row["model"]) == ("claude", "messages", MODEL)
    assert (row["api_key_id"], row["provider_account_id"]) == (key_view["id"], account["id"])
    assert (row["request_count"], row["success_count"], row["incomplete_count"]) == (2, 2, 0)
    # first stream: 100/20/30/7; second: the fake's defaults 25/12/0/0
    assert (row["input_tokens"], row["output_tokens"]) == (125, 32)
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (30, 7)
    assert app_errors(caplog) == []  # e.g. Sanic complaining about the streamed response


async def test_sdk_non_streaming_message(start_kleis, claude_fake, sdk):
    kleis, key, _, account = await kleis_with_account(start_kleis, claude_fake)
    claude_fake.queue(
        FakeClaude.json_reply(
            "Running it.",
            tool_use=("mcp_Shell", {"command": "make"}),
            usage={"input": 40, "output": 9, "cache_read": 11, "cache_write": 3},
        )
    )
    client = sdk(kleis, key)
    sent_version = client.default_headers["anthropic-version"]
    assert client.default_headers["Authorization"] == f"Bearer {key}"  # this SDK sends the key as Bearer
    message = await client.messages.create(
        model=MODEL, max_tokens=128, tools=[SHELL_TOOL], messages=[{"role": "user", "content": "build"}]
    )
    assert message.content[0].text == "Running it."
    assert (message.content[1].type, message.content[1].name) == ("tool_use", "Shell")
    assert message.usage.cache_read_input_tokens == 11

    (received,) = claude_fake.calls("/v1/messages")
    assert received.json["tools"][0]["name"] == "mcp_Shell"
    assert "stream" not in received.json
    assert received.query == {"beta": "true"}
    # the SDK's anthropic-version passes through untouched; its Bearer key never reaches Anthropic
    assert received.headers["anthropic-version"] == sent_version
    assert (
        received.headers["authorization"]
        == f"Bearer {kleis.services.pool.accounts[account['id']].access_token}"
    )
    assert "x-api-key" not in received.headers and key not in json.dumps(received.headers)

    row = only_bucket(await kleis.buckets())
    assert (row["request_count"], row["success_count"]) == (1, 1)
    assert (
        row["input_tokens"],
        row["output_tokens"],
        row["cache_read_tokens"],
        row["cache_write_tokens"],
    ) == (40, 9, 11, 3)


async def test_upstream_headers_and_url(start_kleis, claude_fake, http):
    kleis = await start_kleis()
    grant = claude_fake.grant()
    await kleis.import_account("claude", grant)
    key, _ = await kleis.create_key()

    # x-api-key, no anthropic-version, a client beta (one repeated), a query string
    headers = {
        "x-api-key": key,
        "anthropic-beta": "structured-outputs-2025-11-13, oauth-2025-04-20",
        "x-session-id": "ses_1",
    }
    async with http.post(kleis.url + MESSAGES + "?trace=1", json=simple_body(), headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["content"][0]["text"] == "Hello from the fake."
    # Bearer, an explicit anthropic-version and ?beta already given
    headers = {"Authorization": f"bearer {key}", "anthropic-version": "2026-10-21"}
    async with http.post(kleis.url + MESSAGES + "?beta=false", json=simple_body(), headers=headers) as resp:
        assert resp.status == 200

    first, second = claude_fake.calls("/v1/messages")
    for rec in (first, second):
        assert "x-api-key" not in rec.headers
        assert rec.headers["authorization"] == f"Bearer {grant['access_token']}"
        assert key not in json.dumps(rec.headers)
        assert rec.headers["user-agent"] == "claude-cli/2.1.2 (external, cli)"
        assert rec.headers["x-app"] == "cli"
    assert first.headers["anthropic-version"] == "2023-06-01"
    assert second.headers["anthropic-version"] == "2026-10-21"
    assert first.headers["anthropic-beta"].split(",") == [*REQUIRED_BETAS, "structured-outputs-2025-11-13"]
    assert second.headers["anthropic-beta"].split(",") == REQUIRED_BETAS
    assert first.query == {"trace": "1", "beta": "true"}
    assert second.query == {"beta": "false"}
    assert first.headers["x-session-id"] == "ses_1"

    row = only_bucket(await kleis.buckets())
    assert (row["request_count"], row["success_count"], row["input_tokens"], row["output_tokens"]) == (
        2,
        2,
        50,
        24,
    )


# ── count_tokens ─────────────────────────────────────────────────────────────


async def test_sdk_count_tokens_plain_and_beta(start_kleis, claude_fake, sdk):
    kleis, key, key_view, account = await kleis_with_account(start_kleis, claude_fake)
    client = sdk(kleis, key)
    tools = [SHELL_TOOL, {**SHELL_TOOL, "name": "shell"}]
    messages = [{"role": "user", "content": "how long is this?"}]
    counted = await client.messages.count_tokens(
        model=MODEL,
        system="Be brief.",
        tools=tools,
        tool_choice={"type": "tool", "name": "shell"},
        messages=messages,
    )
    first = claude_fake.calls("/v1/messages/count_tokens")[-1]
    assert counted.input_tokens == claude_count(first.json) > 0
    beta = await client.beta.messages.count_tokens(
        model=MODEL, messages=messages, betas=["token-counting-2024-11-01"]
    )
    second = claude_fake.calls("/v1/messages/count_tokens")[-1]
    assert beta.input_tokens == claude_count(second.json)
    assert claude_fake.calls("/v1/messages") == []

    for rec in (first, second):
        assert rec.query == {"beta": "true"}
        assert (
            rec.headers["authorization"]
            == f"Bearer {kleis.services.pool.accounts[account['id']].access_token}"
        )
        assert rec.headers["user-agent"] == "claude-cli/2.1.2 (external, cli)"
    assert first.headers["anthropic-beta"].split(",") == REQUIRED_BETAS
    assert second.headers["anthropic-beta"].split(",") == [*REQUIRED_BETAS, "token-counting-2024-11-01"]
    # shaped like a Messages request: identity first, tools renamed one to one, tool_choice too
    assert first.json["system"] == [{"type": "text", "text": IDENTITY}, {"type": "text", "text": "Be brief."}]
    upstream = [t["name"] for t in first.json["tools"]]
    assert upstream[0] == "mcp_Shell" and upstream[1].startswith("mcp_Shell_")
    assert first.json["tool_choice"] == {"type": "tool", "name": upstream[1]}

    rows = await kleis.buckets()
    row = only_bucket(rows)
    assert (row["endpoint"], row["model"], row["api_key_id"]) == ("count_tokens", MODEL, key_view["id"])
    assert (row["request_count"], row["success_count"]) == (2, 2)
    assert (row["input_tokens"], row["output_tokens"]) == (0, 0)  # counting is not billed


async def test_count_tokens_errors_are_relayed(start_kleis, claude_fake, http):
    kleis, key, _, _ = await kleis_with_account(start_kleis, claude_fake)
    claude_fake.queue(FakeClaude.error_reply(400, "invalid_request_error", "messages: field required"))
    async with http.post(
        kleis.url + MESSAGES + "/count_tokens", json={"model": MODEL}, headers={"x-api-key": key}
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == {
            "type": "invalid_request_error",
            "message": "messages: field required",
        }
    async with http.get(kleis.url + MESSAGES + "/count_tokens", headers={"x-api-key": key}) as resp:
        assert resp.status in (404, 405)
    assert len(claude_fake.calls("/v1/messages/count_tokens")) == 1


# ── OpenCode's captured requests ─────────────────────────────────────────────


def sanitised(text: str) -> str:
    """The system text as Anthropic must see it (the rewrites of prior art §3.4, by hand)."""
    return text.replace(
        "\n  https://github.com/anomalyco/opencode\n", "\n  https://github.com/anomalyco/project\n"
    ).replace(
        "Here is some useful information about the environment you are running in:",
        "Here is useful information about the environment you are running in:",
    )


async def replay(kleis, http, name: str, key: str) -> tuple[int, dict, bytes]:
    captured = json.loads((DATA / name).read_text())
    headers = {k: v for k, v in captured["headers"].items() if k not in ("connection", "content-length")}
    headers["x-api-key"] = key
    async with http.post(
        kleis.url + captured["path"], data=json.dumps(captured["body"]).encode(), headers=headers
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_opencode_turns_replayed(start_kleis, claude_fake, http):
    kleis, key, _, _ = await kleis_with_account(start_kleis, claude_fake)
    turn1 = json.loads((DATA / "opencode-1.18.33-anthropic-messages-turn1.json").read_text())["body"]
    turn2 = json.loads((DATA / "opencode-1.18.33-anthropic-messages-turn2.json").read_text())["body"]

    claude_fake.queue(FakeClaude.stream_reply("", tool_use=("mcp_Glob", {"pattern": "*"}), crlf=True))
    status, headers, raw = await replay(kleis, http, "opencode-1.18.33-anthropic-messages-turn1.json", key)
    assert status == 200, raw
    assert headers["Content-Type"].startswith("text/event-stream")
    events = parse_sse(raw.replace(b"\r\n", b"\n"))
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert tool_names(events) == ["glob"]
    assert b"mcp_" not in raw

    status, _, raw = await replay(kleis, http, "opencode-1.18.33-anthropic-messages-turn2.json", key)
    assert status == 200, raw
    events = parse_sse(raw)
    assert events[-1][0] == "message_stop"
    text = "".join(p["delta"]["text"] for _, p in events if p["type"] == "content_block_delta")
    assert text == "Hello from the fake."

    for received, sent in zip(claude_fake.calls("/v1/messages"), (turn1, turn2), strict=True):
        body = received.json
        assert received.query == {"beta": "true"}
        assert received.headers["anthropic-beta"].split(",") == [
            *REQUIRED_BETAS,
            "structured-outputs-2025-11-13",
        ]
        assert received.headers["anthropic-version"] == "2023-06-01"
        assert received.headers["x-session-id"] == "ses_de1a27cf6ffeim4dV4UKcBOUr8"
        assert "x-api-key" not in received.headers
        # identity first, then OpenCode's prompt sanitised, its cache_control kept
        assert body["system"][0] == {"type": "text", "text": IDENTITY}
        assert body["system"][1:] == [{**sent["system"][0], "text": sanitised(sent["system"][0]["text"])}]
        assert "anomalyco/opencode\n" not in body["system"][1]["text"]
        # tools prefixed in PascalCase; everything else about them unchanged
        assert [t["name"] for t in body["tools"]] == [
            "mcp_Bash",
            "mcp_Edit",
            "mcp_Glob",
            "mcp_Grep",
            "mcp_Read",
            "mcp_Skill",
            "mcp_Task",
            "mcp_Todowrite",
            "mcp_Webfetch",
            "mcp_Write",
        ]
        assert [{**t, "name": s["name"]} for t, s in zip(body["tools"], sent["tools"], strict=True)] == sent[
            "tools"
        ]
        assert body["tool_choice"] == sent["tool_choice"] == {"type": "auto"}
        assert (body["model"], body["max_tokens"], body["stream"]) == (
            sent["model"],
            sent["max_tokens"],
            True,
        )

    history = claude_fake.calls("/v1/messages")[1]
    assistant = history.json["messages"][1]["content"]
    thinking, tool_use = turn2["messages"][1]["content"]
    # thinking and its signature byte-identical in what Anthropic received
    assert assistant[0] == thinking
    compact = orjson.dumps(thinking)
    assert compact in history.body
    assert assistant[1] == {**tool_use, "name": "mcp_Glob"}
    assert history.json["messages"][2] == turn2["messages"][2]  # the tool_result untouched
    assert history.json["messages"][0] == turn2["messages"][0]


# ── Kleis-made errors ────────────────────────────────────────────────────────


async def test_errors_use_the_anthropic_envelope_with_honest_types(start_kleis, claude_fake, http):
    kleis = await start_kleis()
    key, _ = await kleis.create_key()

    async def post(data: bytes, headers: dict) -> tuple[int, dict, dict]:
        async with http.post(kleis.url + MESSAGES, data=data, headers=headers) as resp:
            return resp.status, dict(resp.headers), await resp.json(content_type=None)

    body = json.dumps(simple_body()).encode()
    status, _, err = await post(body, {"content-type": "application/json"})
    assert status == 401
    assert err["type"] == "error" and err["error"]["type"] == "authentication_error"
    assert "API key" in err["error"]["message"]

    status, _, err = await post(body, {"x-api-key": "kleis_" + "0" * 32})
    assert (status, err["error"]["type"]) == (401, "authentication_error")

    status, _, err = await post(b'{"model": "claude-sonnet-4-5", ', {"x-api-key": key})
    assert (status, err["type"], err["error"]["type"]) == (400, "error", "invalid_request_error")
    assert "not valid JSON" in err["error"]["message"]

    status, _, err = await post(json.dumps({"max_tokens": 5}).encode(), {"x-api-key": key})
    assert (status, err["error"]["type"]) == (400, "invalid_request_error")
    assert "model" in err["error"]["message"]

    status, _, err = await post(body, {"x-api-key": key})
    assert (status, err["error"]["type"]) == (400, "invalid_request_error")
    assert "no claude account" in err["error"]["message"]
    assert claude_fake.calls("/v1/messages") == []

    # one account, rate limited by Anthropic: the 429 is relayed, then Kleis answers for it
    await kleis.import_account("claude", claude_fake.grant())
    reset = int(time.time()) + 120
    claude_fake.queue(FakeClaude.rate_limit_reply(reset))
    status, headers, err = await post(body, {"x-api-key": key})
    assert (status, err["error"]["type"]) == (429, "rate_limit_error")
    assert err["error"]["message"] == "This request would exceed your rate limit"  # Anthropic's own words
    assert headers["anthropic-ratelimit-unified-reset"] == str(reset)
    status, headers, err = await post(body, {"x-api-key": key})
    assert (status, err["type"], err["error"]["type"]) == (429, "error", "rate_limit_error")
    assert "rate limited" in err["error"]["message"]
    assert 110 <= int(headers["Retry-After"]) <= 121
    assert len(claude_fake.calls("/v1/messages")) == 1  # the cooling account was not tried again

    rows = await kleis.buckets()
    by_account = {r["provider_account_id"]: r for r in rows}
    # requests rejected before routing (bad key, bad JSON, no model) have no bucket; "no account" does
    assert by_account["__missing__"]["client_error_count"] == 1
    assert by_account["__missing__"]["proxy_error_count"] == 1
    counted = sum(r["rate_limit_count"] for r in rows)
    assert counted == 2


async def test_cut_stream_ends_with_an_error_event_and_counts_incomplete(
    db_url, start_kleis, claude_fake, http
):
    kleis, key, _, account = await kleis_with_account(start_kleis, claude_fake, db_url)
    reply = FakeClaude.stream_reply("Half an answer", usage={"input": 70})
    reply.cut_after = 4  # message_start, ping, content_block_start, one delta
    claude_fake.queue(reply)
    async with http.post(
        kleis.url + MESSAGES, json=simple_body(stream=True), headers={"x-api-key": key}
    ) as resp:
        assert resp.status == 200
        raw = await resp.read()
    events = parse_sse(raw)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    error = events[-1][1]
    assert error["type"] == "error" and error["error"]["type"] in ("api_error", "overloaded_error")
    assert error["error"]["message"].startswith("Kleis: ")
    row = only_bucket(await kleis.buckets())
    assert row["provider_account_id"] == account["id"]
    assert (row["request_count"], row["incomplete_count"], row["success_count"]) == (1, 1, 0)
    assert row["input_tokens"] == 70  # what message_start reported still counts


# ── OAuth and imports through the admin API ──────────────────────────────────


async def test_oauth_code_login(db_url, start_kleis, claude_fake, http):
    kleis = await start_kleis(db_url=db_url)

    async def start() -> dict:
        _, body = await kleis.admin(
            "POST", "/admin/accounts/claude/oauth/start", {"options": {"mode": "max"}}, expect=200
        )
        return body

    async def approve(url: str) -> str:
        async with http.get(url) as resp:  # the fake approves at once and shows code#state
            assert resp.status == 200
            return await resp.text()

    login = await start()
    assert login["method"] == "code" and login["state"]
    url = urlsplit(login["authorizationUrl"])
    assert login["authorizationUrl"].startswith(claude_fake.url + "/oauth/authorize?")
    query = parse_qs(url.query)
    assert query["state"] == [login["state"]]
    assert query["code_challenge_method"] == ["S256"] and query["code"] == ["true"]
    pasted = await approve(login["authorizationUrl"])
    assert pasted.endswith("#" + login["state"])

    _, done = await kleis.admin(
        "POST", "/admin/accounts/claude/oauth/complete", {"state": login["state"], "code": pasted}, expect=200
    )
    account = done["account"]
    assert (account["provider"], account["accountId"], account["label"]) == (
        "claude",
        DEFAULT_UUID,
        DEFAULT_EMAIL,
    )
    assert account["status"] == "ok" and account["isPrimary"] is True
    assert "accessToken" not in json.dumps(done) and "sk-ant-" not in json.dumps(done)
    (exchange,) = [
        r for r in claude_fake.calls("/v1/oauth/token") if r.json["grant_type"] == "authorization_code"
    ]
    assert exchange.json["code"] == pasted.split("#")[0] and exchange.json["state"] == login["state"]
    assert exchange.json["code_verifier"]  # the fake checked it against the challenge

    # the same state again: refused, no second exchange
    status, err = await kleis.admin(
        "POST", "/admin/accounts/claude/oauth/complete", {"state": login["state"], "code": pasted}
    )
    assert status == 400 and err["message"]
    assert "start the login again" in err["message"]

    # a code whose state belongs to another login
    other = await start()
    pasted = await approve(other["authorizationUrl"])
    code = pasted.split("#")[0]
    status, err = await kleis.admin(
        "POST",
        "/admin/accounts/claude/oauth/complete",
        {"state": other["state"], "code": f"{code}#not-{other['state']}"},
    )
    assert status == 400
    assert "state mismatch" in err["message"]
    status, err = await kleis.admin(
        "POST", "/admin/accounts/claude/oauth/complete", {"state": other["state"], "code": pasted}
    )
    assert status == 400

    # logging in again as the same Anthropic account updates it
    again = await start()
    _, done2 = await kleis.admin(
        "POST",
        "/admin/accounts/claude/oauth/complete",
        {"state": again["state"], "code": await approve(again["authorizationUrl"])},
        expect=200,
    )
    assert done2["account"]["id"] == account["id"]
    rows = await account_rows(kleis)
    assert len(rows) == 1 and rows[0]["account_id"] == DEFAULT_UUID
    # the row holds the newest tokens (encrypted), and they work
    assert kleis.unseal(rows[0]["access_token_enc"]) in claude_fake.access_tokens
    assert "sk-ant-" not in rows[0]["access_token_enc"]
    key, _ = await kleis.create_key()
    async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
        assert resp.status == 200


async def test_import_claude_code_credentials_is_idempotent(db_url, start_kleis, claude_fake):
    kleis = await start_kleis(db_url=db_url)
    credentials = json.loads((DATA / "claude-code-credentials.json").read_text())
    # Its access token is live at the fake Anthropic (imports are checked with the profile endpoint).
    access = "sk-ant-oat01-fake-import-access"
    claude_fake.access_tokens[access] = 1893456000
    claude_fake.access_owners[access] = {"uuid": "uuid-imp", "email": "i@example.test"}
    _, first = await kleis.admin(
        "POST", "/admin/accounts/claude/import", {"authFile": credentials}, expect=201
    )
    _, second = await kleis.admin(
        "POST", "/admin/accounts/claude/import", {"authFile": json.dumps(credentials)}, expect=201
    )
    assert first["account"]["id"] == second["account"]["id"]
    assert first["account"]["label"] == "i@example.test" and first["account"]["accountId"] == "uuid-imp"
    assert "works once" in first["warnings"][0]  # shared with Claude Code
    assert first["account"]["expiresAt"] == 1893456000000
    rows = await account_rows(kleis)
    assert len(rows) == 1
    assert kleis.unseal(rows[0]["refresh_token_enc"]) == "sk-ant-ort01-fake-import-refresh"
    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    assert [a["id"] for a in listing["accounts"]] == [first["account"]["id"]]

    status, err = await kleis.admin("POST", "/admin/accounts/claude/import", {"authFile": {"nothing": 1}})
    assert status == 400 and "claudeAiOauth" in err["message"]


# ── failover and refresh ─────────────────────────────────────────────────────


async def test_rate_limited_account_fails_over_and_cools_down(db_url, start_kleis, claude_fake, http):
    kleis = await start_kleis(db_url=db_url)
    grant_a = claude_fake.grant(uuid="uuid-a", email="a@example.test")
    grant_b = claude_fake.grant(uuid="uuid-b", email="b@example.test")
    first = await kleis.import_account("claude", grant_a, label="a")
    second = await kleis.import_account("claude", grant_b, label="b")
    assert first["isPrimary"] and not second["isPrimary"]
    key, key_view = await kleis.create_key()
    reset = int(time.time()) + 900
    claude_fake.queue(FakeClaude.rate_limit_reply(reset))

    async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
        assert resp.status == 200
        assert resp.headers["x-kleis-account"] == second["id"]
        assert (await resp.json())["content"][0]["text"] == "Hello from the fake."
    calls = claude_fake.calls("/v1/messages")
    assert [c.headers["authorization"] for c in calls] == [
        f"Bearer {grant_a['access_token']}",
        f"Bearer {grant_b['access_token']}",
    ]

    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    views = {a["id"]: a for a in listing["accounts"]}
    assert views[first["id"]]["status"] == "cooling_down"
    assert views[first["id"]]["cooldownKind"] == "window"
    assert abs(views[first["id"]]["cooldownUntil"] - reset * 1000) <= 5000
    assert views[second["id"]]["status"] == "ok"

    async def saved():
        rows = {r["id"]: r for r in await account_rows(kleis)}
        return rows[first["id"]]["cooldown_until"] is not None and rows

    rows = await wait_for(saved)
    assert abs(rows[first["id"]]["cooldown_until"] - reset * 1000) <= 5000
    assert rows[first["id"]]["cooldown_kind"] == "window"
    assert rows[second["id"]]["cooldown_until"] is None

    # the next request goes straight to the healthy account
    async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
        assert resp.status == 200
    assert (
        claude_fake.calls("/v1/messages")[-1].headers["authorization"] == f"Bearer {grant_b['access_token']}"
    )
    assert len(claude_fake.calls("/v1/messages")) == 3

    row = only_bucket(await kleis.buckets())
    assert (row["provider_account_id"], row["api_key_id"]) == (second["id"], key_view["id"])
    assert (row["request_count"], row["success_count"], row["rate_limit_count"]) == (2, 2, 0)


async def test_cooldown_follows_the_window_that_refused(start_kleis, claude_fake, http):
    """The 5h window refused with 40 minutes to go while the overall reset follows the 7d
    window, 5 days out: the account rests 40 minutes, not days. A 429 no window refused (a
    burst limit) rests as long as Retry-After says."""
    kleis = await start_kleis()
    first = await kleis.import_account("claude", claude_fake.grant(uuid="uuid-a"), label="a")
    second = await kleis.import_account("claude", claude_fake.grant(uuid="uuid-b"), label="b")
    key, _ = await kleis.create_key()
    now = int(time.time())
    refused = {
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": str(now + 5 * 86400),
        "anthropic-ratelimit-unified-5h-status": "rejected",
        "anthropic-ratelimit-unified-5h-reset": str(now + 2400),
        "anthropic-ratelimit-unified-7d-status": "allowed",
        "anthropic-ratelimit-unified-7d-reset": str(now + 5 * 86400),
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
    }
    claude_fake.queue(FakeClaude.error_reply(429, "rate_limit_error", "limit", refused))
    async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
        assert resp.status == 200
        assert resp.headers["x-kleis-account"] == second["id"]
    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    view = {a["id"]: a for a in listing["accounts"]}[first["id"]]
    assert view["cooldownKind"] == "window"
    assert abs(view["cooldownUntil"] - (now + 2400) * 1000) <= 5000

    burst = {
        "retry-after": "30",
        "anthropic-ratelimit-unified-status": "allowed",
        "anthropic-ratelimit-unified-reset": str(now + 5 * 86400),
    }
    claude_fake.queue(FakeClaude.error_reply(429, "rate_limit_error", "slow down", burst))
    async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
        assert resp.status == 429  # the only account left refused; its answer is relayed
    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    view = {a["id"]: a for a in listing["accounts"]}[second["id"]]
    assert view["cooldownKind"] != "window"
    assert abs(view["cooldownUntil"] - (now + 30) * 1000) <= 5000


async def test_expiring_token_is_refreshed_once_under_concurrency(db_url, start_kleis, claude_fake, http):
    kleis = await start_kleis(db_url=db_url)
    grant = claude_fake.grant()
    grant["expires_at"] = int(time.time() * 1000) + 30_000  # inside the 60 s refresh window
    account = await kleis.import_account("claude", grant)
    claude_fake.expire(grant["access_token"])  # the old token would be refused upstream
    key, _ = await kleis.create_key()

    async def one() -> int:
        async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
            await resp.read()
            return resp.status

    assert await asyncio.gather(*(one() for _ in range(5))) == [200] * 5
    assert claude_fake.refresh_calls == 1
    calls = claude_fake.calls("/v1/messages")
    assert len(calls) == 5  # nobody needed a 401 retry
    tokens = {c.headers["authorization"] for c in calls}
    assert len(tokens) == 1 and tokens != {f"Bearer {grant['access_token']}"}
    assert grant["refresh_token"] in claude_fake.used_refresh_tokens

    (row,) = await account_rows(kleis)
    assert row["id"] == account["id"]
    assert row["last_refresh_status"] == "success" and row["status"] == "ok"
    assert row["expires_at"] > int(time.time() * 1000) + 3000_000
    assert "Bearer " + kleis.unseal(row["access_token_enc"]) in tokens
    assert kleis.unseal(row["refresh_token_enc"]) in claude_fake.refresh_tokens  # rotated and saved
    assert row["refresh_lock_token"] is None
    bucket = only_bucket(await kleis.buckets())
    assert (bucket["request_count"], bucket["success_count"]) == (5, 5)


async def test_upstream_401_forces_one_refresh_and_a_retry(start_kleis, claude_fake, http):
    kleis, key, _, account = await kleis_with_account(start_kleis, claude_fake)
    old = kleis.services.pool.accounts[account["id"]].access_token
    claude_fake.expire(old)  # revoked upstream although Kleis thinks it is valid for an hour

    async def one() -> tuple[int, dict]:
        async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
            return resp.status, await resp.json()

    results = await asyncio.gather(*(one() for _ in range(3)))
    assert [s for s, _ in results] == [200] * 3
    assert all(b["content"][0]["text"] == "Hello from the fake." for _, b in results)
    assert claude_fake.refresh_calls == 1
    calls = claude_fake.calls("/v1/messages")
    refused = [c for c in calls if c.headers["authorization"] == f"Bearer {old}"]
    accepted = [c for c in calls if c.headers["authorization"] != f"Bearer {old}"]
    assert len(accepted) == 3 and 1 <= len(refused) <= 3
    (row,) = await account_rows(kleis)
    assert "Bearer " + kleis.unseal(row["access_token_enc"]) == accepted[0].headers["authorization"]
    bucket = only_bucket(await kleis.buckets())
    assert (bucket["request_count"], bucket["success_count"], bucket["auth_error_count"]) == (3, 3, 0)


async def test_dead_refresh_token_marks_the_account_needs_reauth(db_url, start_kleis, claude_fake, http):
    kleis = await start_kleis(db_url=db_url)
    account = await kleis.import_account(
        "claude",
        {
            "access_token": "sk-ant-oat01-stale",
            "refresh_token": "sk-ant-ort01-dead",
            "expires_at": int(time.time() * 1000) + 10_000,
            "account_id": "uuid-dead",
        },
    )
    key, _ = await kleis.create_key()

    for _ in range(2):
        async with http.post(kleis.url + MESSAGES, json=simple_body(), headers={"x-api-key": key}) as resp:
            assert resp.status == 403
            err = await resp.json()
        assert err["type"] == "error" and err["error"]["type"] == "permission_error"
        assert "log in again" in err["error"]["message"]
    assert claude_fake.refresh_calls == 1  # the second request did not hammer the token endpoint
    assert claude_fake.calls("/v1/messages") == []

    (row,) = await account_rows(kleis)
    assert (row["id"], row["status"], row["last_refresh_status"]) == (account["id"], "needs_reauth", "failed")
    assert "invalid_grant" in row["last_error"]
    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    assert listing["accounts"][0]["status"] == "needs_reauth"
    rows = await kleis.buckets()
    assert sum(r["auth_error_count"] for r in rows) == 2 and sum(r["success_count"] for r in rows) == 0
