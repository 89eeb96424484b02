"""Real Claude Code 2.1.328 requests replayed through the running app to the fake Anthropic.

Each capture in tests/data/claude-code-2.1.328-*.json (method, path, headers, body, as Claude
Code sent them to Kleis) is posted with a real key; the tests check what the fake upstream
received (system blocks and user agent unchanged, betas merged, every tool name mapped one to
one, tool_reference included) and what the client got back (its own tool names).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tests.fakes.claude import FakeClaude, count_of

DATA = Path(__file__).parent.parent / "data"
REQUIRED_BETAS = [
    "claude-code-20250219",
    "oauth-2025-04-20",
    "interleaved-thinking-2025-05-14",
    "fine-grained-tool-streaming-2025-05-14",
]
USER_AGENT = "claude-cli/2.1.328 (external, sdk-cli)"


def capture(name: str) -> dict:
    return json.loads((DATA / f"claude-code-2.1.328-{name}.json").read_text())


async def setup(start_kleis, claude_fake) -> tuple[object, str, dict, dict]:
    kleis = await start_kleis()
    grant = claude_fake.grant()
    account = await kleis.import_account("claude", grant)
    key, _ = await kleis.create_key()
    return kleis, key, grant, account


async def replay(kleis, http, captured: dict, key: str, body: dict | None = None) -> tuple[int, bytes]:
    """Post a capture as Claude Code sent it, with this Kleis's key in its x-api-key header."""
    headers = {k: v for k, v in captured["headers"].items() if k.lower() not in ("connection", "x-api-key")}
    headers["x-api-key"] = key
    data = json.dumps(captured["body"] if body is None else body).encode()
    async with http.request(
        captured["method"], kleis.url + captured["path"], data=data, headers=headers
    ) as resp:
        return resp.status, await resp.read()


def sse_payloads(raw: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in raw.decode().split("\n") if line.startswith("data: ")]


def started_tools(raw: bytes) -> list[str]:
    return [
        p["content_block"]["name"]
        for p in sse_payloads(raw)
        if p["type"] == "content_block_start" and p["content_block"]["type"] == "tool_use"
    ]


def merged_betas(captured: dict) -> list[str]:
    client = [b for b in captured["headers"]["anthropic-beta"].split(",") if b not in REQUIRED_BETAS]
    return [*REQUIRED_BETAS, *client]


def assert_forwarded_as_claude_code(received, captured: dict, grant: dict, key: str) -> None:
    """Headers as Claude Code sent them, except the account's token, the merged betas and no
    Kleis key; the body unchanged but for the tool names."""
    sent, body = captured["body"], received.json
    assert received.query == {"beta": "true"}
    assert received.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert "x-api-key" not in received.headers and key not in json.dumps(received.headers)
    assert received.headers["user-agent"] == USER_AGENT
    assert received.headers["anthropic-beta"].split(",") == merged_betas(captured)
    assert received.headers["anthropic-version"] == "2023-06-01"
    assert received.headers["x-app"] == "cli"
    assert received.headers["x-claude-code-session-id"] == captured["headers"]["X-Claude-Code-Session-Id"]
    assert "system" not in sent or body["system"] == sent["system"]  # billing header and identity kept
    # every tool renamed the prior-art way (Claude Code's names are PascalCase already), nothing
    # else about a tool changed
    assert [t["name"] for t in body["tools"]] == ["mcp_" + t["name"] for t in sent["tools"]]
    assert [{**t, "name": s["name"]} for t, s in zip(body["tools"], sent["tools"], strict=True)] == sent[
        "tools"
    ]
    assert {k: v for k, v in body.items() if k not in ("tools", "messages")} == {
        k: v for k, v in sent.items() if k not in ("tools", "messages")
    }


async def test_text_turn(start_kleis, claude_fake, http):
    kleis, key, grant, _ = await setup(start_kleis, claude_fake)
    captured = capture("messages-text")
    status, raw = await replay(kleis, http, captured, key)
    assert status == 200, raw
    payloads = sse_payloads(raw)
    assert payloads[-1] == {"type": "message_stop"}
    assert "".join(p["delta"].get("text", "") for p in payloads if p["type"] == "content_block_delta") == (
        "Hello from the fake."
    )
    (received,) = claude_fake.calls("/v1/messages")
    assert_forwarded_as_claude_code(received, captured, grant, key)
    assert (
        received.json["system"][0]["text"]
        == "x-anthropic-billing-header: cc_version=2.1.328.7de; cc_entrypoint=sdk-cli;"
    )
    assert (
        received.json["system"][1]["text"] == "You are a Claude agent, built on Anthropic's Claude Agent SDK."
    )
    assert received.json["messages"] == captured["body"]["messages"]  # no tool names in them


async def test_tool_round_trip(start_kleis, claude_fake, http):
    kleis, key, grant, _ = await setup(start_kleis, claude_fake)
    turn1, turn2 = capture("messages-turn1"), capture("messages-turn2")

    claude_fake.queue(FakeClaude.stream_reply("", tool_use=("mcp_Glob", {"pattern": "*"})))
    status, raw = await replay(kleis, http, turn1, key)
    assert status == 200, raw
    assert started_tools(raw) == ["Glob"]
    assert b"mcp_" not in raw

    status, raw = await replay(kleis, http, turn2, key)
    assert status == 200, raw

    first, second = claude_fake.calls("/v1/messages")
    assert_forwarded_as_claude_code(first, turn1, grant, key)
    assert_forwarded_as_claude_code(second, turn2, grant, key)
    sent, body = turn2["body"]["messages"], second.json["messages"]
    assert [m["role"] for m in sent] == ["user", "system", "assistant", "user"]
    thinking, tool_use = sent[2]["content"]
    assert body[2]["content"] == [thinking, {**tool_use, "name": "mcp_Glob"}]  # signature untouched
    assert body[:2] == sent[:2] and body[3:] == sent[3:]  # the tool_result and the rest as sent


async def test_deferred_tool_loaded_by_tool_reference(start_kleis, claude_fake, http):
    """Claude Code's tool search: ToolSearch answers with `tool_reference` blocks naming deferred
    tools; Anthropic refuses a reference to a tool it was not given, so the names must match the
    renamed definitions. A lower-case MCP tool next to Claude Code's `Read` must not merge."""
    kleis, key, _, _ = await setup(start_kleis, claude_fake)
    captured = capture("messages-turn2")
    body = copy.deepcopy(captured["body"])
    body["tools"].append({**body["tools"][0], "name": "read", "description": "an MCP server's read"})
    body["messages"] += [
        {
            "role": "assistant",
            "content": [
                {
                    "type": "tool_use",
                    "id": "toolu_search1",
                    "name": "ToolSearch",
                    "input": {"query": "select:DeferredToolPlaceholder,read", "max_results": 2},
                }
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_search1",
                    "content": [
                        {"type": "tool_reference", "tool_name": "DeferredToolPlaceholder"},
                        {"type": "tool_reference", "tool_name": "read"},
                    ],
                }
            ],
        },
    ]
    upstream = await names_upstream(kleis, http, captured, key, body, claude_fake)
    low, high = upstream["read"], upstream["Read"]
    assert high == "mcp_Read" and low.startswith("mcp_Read_") and len(low) == len("mcp_Read_") + 8

    (received,) = claude_fake.calls("/v1/messages")
    search, result = received.json["messages"][-2:]
    assert search["content"][0]["name"] == "mcp_ToolSearch"
    assert result["content"][0]["content"] == [
        {"type": "tool_reference", "tool_name": "mcp_DeferredToolPlaceholder"},
        {"type": "tool_reference", "tool_name": low},
    ]
    assert search["content"][0]["input"] == body["messages"][-2]["content"][0]["input"]

    # each of the two colliding names comes back as the client spelled it
    for name, expected in ((low, "read"), (high, "Read")):
        claude_fake.queue(FakeClaude.stream_reply("", tool_use=(name, {"file_path": "/a"})))
        status, raw = await replay(kleis, http, captured, key, body)
        assert status == 200, raw
        assert started_tools(raw) == [expected]


async def names_upstream(kleis, http, captured, key, body, claude_fake) -> dict[str, str]:
    """Replay once and read the client name → upstream name map off what the fake received
    (tools keep their order)."""
    status, raw = await replay(kleis, http, captured, key, body)
    assert status == 200, raw  # the fake answers 400 to duplicate names or a dangling reference
    received = claude_fake.calls("/v1/messages")[-1].json
    names = [t["name"] for t in received["tools"]]
    assert len(set(names)) == len(names)
    return {t["name"]: up for t, up in zip(body["tools"], names, strict=True)}


async def test_count_tokens(start_kleis, claude_fake, http):
    kleis, key, grant, account = await setup(start_kleis, claude_fake)
    captured = capture("count-tokens")
    assert captured["path"] == "/anthropic/v1/messages/count_tokens?beta=true"
    status, raw = await replay(kleis, http, captured, key)
    assert status == 200, raw
    (received,) = claude_fake.calls("/v1/messages/count_tokens")
    assert json.loads(raw) == {"input_tokens": count_of(received.json)}
    assert claude_fake.calls("/v1/messages") == []
    assert_forwarded_as_claude_code(received, captured, grant, key)
    assert "token-counting-2024-11-01" in received.headers["anthropic-beta"].split(",")
    assert "system" not in received.json  # none sent, none added: counting must match what was asked
    assert received.json["messages"] == captured["body"]["messages"]

    await kleis.flush()
    (row,) = await kleis.buckets()
    assert (row["provider"], row["endpoint"], row["model"]) == ("claude", "count_tokens", "claude-opus-5-5")
    assert row["provider_account_id"] == account["id"]
    assert (row["request_count"], row["success_count"]) == (1, 1)
    # counting is not billed
    assert (
        row["input_tokens"],
        row["output_tokens"],
        row["cache_read_tokens"],
        row["cache_write_tokens"],
    ) == (
        0,
        0,
        0,
        0,
    )
