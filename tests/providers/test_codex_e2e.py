"""Codex end to end: real Codex CLI 0.169.0 requests and the openai SDK → Kleis over HTTP →
FakeCodex.

The replays send each captured request (tests/data/codex-cli-0.169.0-responses-*.json) with
only the Kleis key swapped in, and check both ends: what the fake backend received (the prior
art §3.3 rewrites: our credentials, derived session id, promoted instructions, store false)
and what the client got back. The SDK tests cover collected (non-streaming) answers: output
rebuilt when the backend's final `output` is empty, and stream errors raised as HTTP errors.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import openai
import pytest

from tests.fakes import Reply
from tests.fakes.codex import FakeCodex

DATA = Path(__file__).resolve().parent.parent / "data"
RESPONSES = "/openai/v1/responses"
SAMPLE_KEY = "kleis_00000000000000000000000000000000"  # the key the captures were made with
CODEX_UA = "codex_exec/0.169.0 (Debian 12.0.0; x86_64) xterm (codex_exec; 0.169.0)"


# ── helpers ──────────────────────────────────────────────────────────────────


def sample(name: str) -> dict:
    return json.loads((DATA / f"codex-cli-0.169.0-responses-{name}.json").read_text())


async def kleis_with_accounts(start_kleis, fake: FakeCodex, accounts: int = 1):
    kleis = await start_kleis()
    imported = [
        await kleis.import_account("codex", fake.grant(f"acct_{i}", f"u{i}@example.com"), label=f"a{i}")
        for i in range(1, accounts + 1)
    ]
    key, key_view = await kleis.create_key(label="codex-cli")
    return kleis, key, key_view, imported


def derived(key_id: str, account_row: str, session: str) -> str:
    return "kleis_" + hashlib.sha256(f"{key_id}:{account_row}:{session}".encode()).hexdigest()[:48]


async def replay(kleis, key: str, captured: dict) -> tuple[int, dict, bytes]:
    """Send a capture as the Codex CLI did, with our key in place of the recorded one."""
    headers = dict(captured["headers"])
    assert headers["authorization"] == f"Bearer {SAMPLE_KEY}"
    headers["authorization"] = f"Bearer {key}"
    async with kleis.http.request(
        captured["method"], kleis.url + captured["path"], headers=headers, data=json.dumps(captured["body"])
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


def expected_upstream_body(captured: dict, session: str) -> dict:
    """The §3.3 rewrite of a Codex CLI body: its leading developer message (text parts) becomes
    `instructions`, store false, stream true, prompt_cache_key the derived session id; every
    other field and input item goes on exactly as sent."""
    body = copy.deepcopy(captured["body"])
    first = body["input"].pop(0)
    assert first["role"] == "developer" and "instructions" not in captured["body"]
    body["instructions"] = "\n\n".join(part["text"] for part in first["content"])
    body.update(store=False, stream=True, prompt_cache_key=session)
    return body


def replies_for(name: str) -> Reply:
    if name == "turn1":
        return FakeCodex.tool_call_reply(name="get_goal", arguments="{}", call_id="call_goal_1")
    return FakeCodex.stream_reply(text="pong" if name == "text" else "done")


@pytest.fixture
def sdk(sdk_clients):
    return lambda kleis, key: sdk_clients(
        openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0)
    )


# ── Codex CLI replays ────────────────────────────────────────────────────────


@pytest.mark.parametrize("name", ["text", "turn1", "turn2"])
async def test_codex_cli_request_replays(start_kleis, codex_fake, name):
    kleis, key, key_view, (account,) = await kleis_with_accounts(start_kleis, codex_fake)
    captured = sample(name)
    reply = replies_for(name)
    codex_fake.queue(reply)

    status, headers, raw = await replay(kleis, key, captured)

    # The client gets the backend's stream byte for byte.
    assert status == 200, raw[:500]
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["x-kleis-provider"] == "codex" and headers["x-kleis-account"] == account["id"]
    assert raw == b"".join(reply.events)

    (call,) = codex_fake.calls("/responses")
    session = derived(key_view["id"], account["id"], captured["body"]["prompt_cache_key"])
    assert call.method == "POST" and call.query == {}
    sent = call.headers
    assert codex_fake.access_tokens[sent["authorization"].removeprefix("Bearer ")]["account_id"] == "acct_1"
    assert sent["chatgpt-account-id"] == "acct_1"
    # The CLI names itself: its originator and user agent go on as a pair.
    assert (sent["originator"], sent["user-agent"]) == ("codex_exec", CODEX_UA)
    assert (sent["accept"], sent["content-type"]) == ("text/event-stream", "application/json")
    assert sent["session-id"] == sent["x-session-affinity"] == sent["x-session-id"] == session
    assert "x-client-request-id" not in sent
    for passed in ("x-codex-beta-features", "x-codex-window-id", "x-codex-turn-metadata", "thread-id"):
        assert sent[passed] == captured["headers"][passed], passed
    assert key not in json.dumps(sent) and SAMPLE_KEY not in json.dumps(sent)

    body = call.json
    assert body == expected_upstream_body(captured, session)
    assert body["instructions"].startswith("You are Codex, a coding agent")
    if name == "turn2":
        replayed = [item["type"] for item in body["input"][-3:]]
        assert replayed == ["reasoning", "function_call", "function_call_output"]
        reasoning = captured["body"]["input"][-3]
        assert f'"encrypted_content":"{reasoning["encrypted_content"]}"'.encode() in call.body

    rows = await kleis.buckets()
    assert [(r["model"], r["success_count"], r["input_tokens"], r["cache_read_tokens"]) for r in rows] == [
        ("gpt-5.5", 1, 100, 20)
    ]


async def test_codex_cli_tool_round_trip_stays_on_one_account_and_cache_key(start_kleis, codex_fake):
    """Turn 1 and turn 2 share the CLI's session id: turn 2 stays on turn 1's account even
    after another account became primary, with the same derived cache key."""
    kleis, key, key_view, (first, second) = await kleis_with_accounts(start_kleis, codex_fake, accounts=2)
    codex_fake.queue(replies_for("turn1"), replies_for("turn2"), replies_for("text"))
    status, _, raw = await replay(kleis, key, sample("turn1"))
    assert status == 200, raw[:300]
    await kleis.admin("POST", f"/admin/accounts/{second['id']}/primary", expect=200)
    for name in ("turn2", "text"):  # the text sample is another session: it goes to the new primary
        status, _, raw = await replay(kleis, key, sample(name))
        assert status == 200, raw[:300]
    turn1, turn2, other = codex_fake.calls("/responses")
    assert [c.headers["chatgpt-account-id"] for c in (turn1, turn2, other)] == ["acct_1", "acct_1", "acct_2"]
    session = derived(key_view["id"], first["id"], "00000000-0000-7000-8000-000000000009")
    assert turn1.json["prompt_cache_key"] == turn2.json["prompt_cache_key"] == session


# ── The openai SDK, not streaming: collected answers ─────────────────────────


async def test_sdk_output_text_when_the_final_output_is_empty(start_kleis, codex_fake, sdk):
    kleis, key, _, _ = await kleis_with_accounts(start_kleis, codex_fake)
    codex_fake.queue(FakeCodex.stream_reply(text="Streamed, not repeated.", events=5, final_output=False))

    response = await sdk(kleis, key).responses.create(model="gpt-5.5", input="hello")

    assert response.output_text == "Streamed, not repeated."
    assert response.status == "completed"
    assert response.usage.input_tokens == 120 and response.usage.output_tokens == 20
    (call,) = codex_fake.calls("/responses")
    assert call.json["stream"] is True  # Kleis streamed upstream and collected


async def test_sdk_reasoning_and_function_call_when_the_final_output_is_empty(start_kleis, codex_fake, sdk):
    kleis, key, _, _ = await kleis_with_accounts(start_kleis, codex_fake)
    codex_fake.queue(FakeCodex.reasoning_tool_call_reply(summary="Need the goal.", arguments='{"id":3}'))

    response = await sdk(kleis, key).responses.create(model="gpt-5.5", input="use get_goal")

    reasoning, call = response.output
    assert reasoning.type == "reasoning" and reasoning.summary[0].text == "Need the goal."
    assert reasoning.encrypted_content == "gAAAAfake-encrypted-reasoning"
    assert (call.type, call.name, call.arguments, call.call_id) == (
        "function_call",
        "get_goal",
        '{"id":3}',
        "call_goal",
    )


async def test_sdk_incomplete_response_is_200_with_its_status(start_kleis, codex_fake, sdk):
    kleis, key, _, _ = await kleis_with_accounts(start_kleis, codex_fake)
    codex_fake.queue(FakeCodex.incomplete_reply(text="Cut at the cap", reason="max_output_tokens"))

    response = await sdk(kleis, key).responses.create(model="gpt-5.5", input="hello")

    assert response.status == "incomplete"
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Cut at the cap"


@pytest.mark.parametrize("nested", [False, True])
async def test_sdk_raises_bad_request_for_context_length_exceeded(start_kleis, codex_fake, sdk, nested):
    kleis, key, _, _ = await kleis_with_accounts(start_kleis, codex_fake)
    message = "Your input exceeds the context window of this model."
    codex_fake.queue(FakeCodex.error_event_reply("context_length_exceeded", message, nested=nested))

    with pytest.raises(openai.BadRequestError) as raised:
        await sdk(kleis, key).responses.create(model="gpt-5.5", input="x" * 1000)

    assert raised.value.status_code == 400
    assert raised.value.code == "context_length_exceeded"
    assert raised.value.type == "invalid_request_error"
    assert message in raised.value.message


@pytest.mark.parametrize(
    ("reply", "error", "status", "code"),
    [
        (
            FakeCodex.error_event_reply("rate_limit_exceeded", "Rate limit reached. Try again in 2s."),
            openai.RateLimitError,
            429,
            "rate_limit_exceeded",
        ),
        (
            FakeCodex.failed_reply("server_error", "The model failed."),
            openai.InternalServerError,
            502,
            "server_error",
        ),
        (
            FakeCodex.failed_reply("invalid_prompt", "Prompt refused."),
            openai.BadRequestError,
            400,
            "invalid_prompt",
        ),
    ],
)
async def test_sdk_raises_for_other_stream_errors(start_kleis, codex_fake, sdk, reply, error, status, code):
    kleis, key, _, _ = await kleis_with_accounts(start_kleis, codex_fake)
    codex_fake.queue(reply)
    with pytest.raises(error) as raised:
        await sdk(kleis, key).responses.create(model="gpt-5.5", input="hello")
    assert (raised.value.status_code, raised.value.code) == (status, code)


async def test_collected_error_is_the_openai_envelope_over_http(start_kleis, codex_fake):
    kleis, key, _, (account,) = await kleis_with_accounts(start_kleis, codex_fake)
    codex_fake.queue(
        FakeCodex.error_event_reply("context_length_exceeded", "Too long.", nested=True, param="input")
    )
    async with kleis.http.post(
        kleis.url + RESPONSES,
        json={"model": "gpt-5.5", "input": "hi"},
        headers={"authorization": f"Bearer {key}"},
    ) as resp:
        status, content_type, body = resp.status, resp.headers["Content-Type"], await resp.json()
        assert resp.headers["x-kleis-account"] == account["id"]
    assert (status, content_type) == (400, "application/json")
    assert body == {
        "error": {
            "message": "Too long.",
            "type": "invalid_request_error",
            "param": "input",
            "code": "context_length_exceeded",
        }
    }
