"""Copilot protocol fidelity through the running app: what Kleis adds for itself (forced usage)
never reaches a client that did not ask for it, and images anywhere in a conversation ask
Copilot for vision. Clients → Kleis over HTTP → the fake Copilot upstream."""

from __future__ import annotations

import json

import openai
import pytest

from tests.fakes.copilot import FakeCopilot, chat_stream_reply

CHAT = "/copilot/v1/chat/completions"
RESPONSES = "/copilot/v1/responses"
PNG = "data:image/png;base64,iVBORw0KGgo="


async def kleis_with_account(start_kleis, fake: FakeCopilot):
    kleis = await start_kleis()
    await kleis.import_account("copilot", fake.grant(), label="octo")
    key, _ = await kleis.create_key(label="laptop")
    fake.requests.clear()  # the import's GET /user
    return kleis, key


def tokens(row: dict) -> tuple[int, int, int]:
    return row["input_tokens"], row["cache_read_tokens"], row["output_tokens"]


# ── 1. forced usage stays Kleis's ────────────────────────────────────────────


@pytest.mark.parametrize(
    ("stream_options", "usage_on_finish"),
    [
        (None, False),  # no stream_options at all: the usage-only chunk is dropped
        ({"include_usage": False}, False),
        ({"include_obfuscation": False}, False),
        (None, True),  # usage on the last content chunk: the field is removed, the chunk kept
        ({"include_usage": False}, True),
    ],
)
async def test_sdk_loop_indexing_choices_survives_forced_usage(
    start_kleis, copilot_fake, sdk_clients, stream_options, usage_on_finish
):
    kleis, key = await kleis_with_account(start_kleis, copilot_fake)
    copilot_fake.queue(
        chat_stream_reply(
            "one two three",
            prompt_tokens=70,
            cached_tokens=20,
            completion_tokens=3,
            usage_on_finish=usage_on_finish,
        )
    )
    client = sdk_clients(openai.AsyncOpenAI(base_url=kleis.url + "/copilot/v1", api_key=key, max_retries=0))
    extra = {} if stream_options is None else {"stream_options": stream_options}
    stream = await client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "count"}], stream=True, **extra
    )
    text, finish, usages = "", None, []
    async for chunk in stream:  # the common SDK loop: chunk.choices[0] on every chunk
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        finish = choice.finish_reason or finish
        usages.append(chunk.usage)
    assert (text, finish) == ("one two three", "stop")
    assert usages == [None] * 5  # role, three words, finish: no usage anywhere

    (rec,) = copilot_fake.calls("/chat/completions")
    assert rec.json["stream_options"] == {**(stream_options or {}), "include_usage": True}
    (row,) = await kleis.buckets()
    assert tokens(row) == (50, 20, 3)  # still counted
    assert row["success_count"] == 1


async def test_forced_usage_is_hidden_byte_for_byte(start_kleis, copilot_fake, http):
    kleis, key = await kleis_with_account(start_kleis, copilot_fake)
    reply = chat_stream_reply("a b")
    copilot_fake.queue(reply)
    body = {"model": "gpt-4.1", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with http.post(kleis.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    # every upstream event but the usage chunk, unchanged (the core's keepalives aside)
    assert raw.replace(b": kleis-keepalive\n\n", b"") == b"".join(
        e for e in reply.events if b'"usage"' not in e
    )


async def test_asked_usage_reaches_the_client_unchanged(start_kleis, copilot_fake, http):
    kleis, key = await kleis_with_account(start_kleis, copilot_fake)
    auth = {"authorization": f"Bearer {key}"}
    for usage_on_finish in (False, True):
        reply = chat_stream_reply("a b", usage_on_finish=usage_on_finish)
        copilot_fake.queue(reply)
        body = {
            "model": "gpt-4.1",
            "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "x"}],
        }
        async with http.post(kleis.url + CHAT, json=body, headers=auth) as resp:
            raw = await resp.read()
        assert raw.replace(b": kleis-keepalive\n\n", b"") == b"".join(reply.events)
    assert [tokens(r) for r in await kleis.buckets()] == [(84, 16, 10)]


async def test_sdk_non_streaming_and_responses_keep_their_own_usage(start_kleis, copilot_fake, sdk_clients):
    # nothing is forced there, so nothing is taken away: usage is part of those answers
    kleis, key = await kleis_with_account(start_kleis, copilot_fake)
    client = sdk_clients(openai.AsyncOpenAI(base_url=kleis.url + "/copilot/v1", api_key=key, max_retries=0))
    completion = await client.chat.completions.create(
        model="gpt-4.1", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.usage.prompt_tokens == 50
    async with client.responses.stream(model="gpt-5", input="x") as stream:
        final = await stream.get_final_response()
    assert final.usage.input_tokens == 50
    assert "stream_options" not in copilot_fake.calls("/responses")[0].json


# ── 2. vision wherever an image sits ─────────────────────────────────────────

IMAGE_URL = {"type": "image_url", "image_url": {"url": PNG}}
INPUT_IMAGE = {"type": "input_image", "image_url": PNG}
CALL = {"type": "function_call", "call_id": "c1", "name": "screenshot", "arguments": "{}"}


def chat_body(*messages) -> dict:
    return {"model": "gpt-4.1", "messages": list(messages)}


def responses_body(input) -> dict:
    return {"model": "gpt-5", "input": input}


VISION_CASES = {
    # chat: image_url parts in any role's content
    "chat-user": (
        CHAT,
        chat_body({"role": "user", "content": [{"type": "text", "text": "what?"}, IMAGE_URL]}),
        True,
    ),
    "chat-tool": (
        CHAT,
        chat_body(
            {"role": "user", "content": "look"},
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "s"}}],
            },
            {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "shot"}, IMAGE_URL]},
        ),
        True,
    ),
    "chat-system": (
        CHAT,
        chat_body({"role": "system", "content": [IMAGE_URL]}, {"role": "user", "content": "?"}),
        True,
    ),
    "chat-early-in-history": (
        CHAT,
        chat_body(
            {"role": "user", "content": [IMAGE_URL]},
            *[{"role": r, "content": "text"} for r in ("assistant", "user") * 50],
        ),
        True,
    ),
    "chat-none": (CHAT, chat_body({"role": "user", "content": [{"type": "text", "text": "hi"}]}), False),
    "chat-image-url-in-text": (
        CHAT,
        chat_body({"role": "user", "content": f'{{"type": "image_url"}} {PNG}'}),
        False,
    ),
    "chat-responses-type": (CHAT, chat_body({"role": "user", "content": [INPUT_IMAGE]}), False),
    # responses: message content, tool outputs (array or nested), screenshots
    "responses-message": (
        RESPONSES,
        responses_body([{"role": "user", "content": [{"type": "input_text", "text": "?"}, INPUT_IMAGE]}]),
        True,
    ),
    "responses-typed-message": (
        RESPONSES,
        responses_body([{"type": "message", "role": "user", "content": [INPUT_IMAGE]}]),
        True,
    ),
    "responses-function-output-array": (
        RESPONSES,
        responses_body(
            [
                {"role": "user", "content": "take a screenshot"},
                CALL,
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [{"type": "input_text", "text": "here"}, INPUT_IMAGE],
                },
            ]
        ),
        True,
    ),
    "responses-custom-tool-output": (
        RESPONSES,
        responses_body(
            [
                {"role": "user", "content": "draw"},
                {"type": "custom_tool_call", "call_id": "c2", "name": "render", "input": "x"},
                {"type": "custom_tool_call_output", "call_id": "c2", "output": [INPUT_IMAGE]},
            ]
        ),
        True,
    ),
    "responses-nested-content": (
        RESPONSES,
        responses_body(
            [
                CALL,
                {
                    "type": "function_call_output",
                    "call_id": "c1",
                    "output": [
                        {"type": "message", "content": [{"type": "input_text", "text": "x"}, INPUT_IMAGE]}
                    ],
                },
            ]
        ),
        True,
    ),
    "responses-computer-screenshot": (
        RESPONSES,
        responses_body(
            [
                {"type": "computer_call", "call_id": "c3", "action": {"type": "screenshot"}},
                {
                    "type": "computer_call_output",
                    "call_id": "c3",
                    "output": {"type": "computer_screenshot", "image_url": PNG},
                },
            ]
        ),
        True,
    ),
    "responses-function-output-string": (
        RESPONSES,
        responses_body(
            [CALL, {"type": "function_call_output", "call_id": "c1", "output": json.dumps([INPUT_IMAGE])}]
        ),
        False,
    ),
    "responses-string-input": (RESPONSES, responses_body("describe input_image parts"), False),
    "responses-chat-type": (RESPONSES, responses_body([{"role": "user", "content": [IMAGE_URL]}]), False),
}


@pytest.mark.parametrize("case", list(VISION_CASES))
async def test_vision_header_wherever_an_image_sits(start_kleis, copilot_fake, http, case):
    route, body, vision = VISION_CASES[case]
    kleis, key = await kleis_with_account(start_kleis, copilot_fake)
    # the client's own header never decides: Kleis sets or removes it
    headers = {"authorization": f"Bearer {key}", "copilot-vision-request": "true"}
    async with http.post(kleis.url + route, json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    (rec,) = copilot_fake.requests
    assert rec.path == route.removeprefix("/copilot/v1")
    assert rec.headers.get("copilot-vision-request") == ("true" if vision else None)
    assert rec.json == body  # detection never changes the body


def deep_nest(depth: int, leaf: dict) -> dict:
    node = leaf
    for _ in range(depth):
        node = {"type": "message", "content": [node]}
    return node


async def test_hostile_bodies_are_walked_within_bounds(start_kleis, copilot_fake, http):
    kleis, key = await kleis_with_account(start_kleis, copilot_fake)
    auth = {"authorization": f"Bearer {key}"}
    wide = [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * 5} for _ in range(4_000)]
    cases = [
        # 120 levels of nested content (240 of JSON, near orjson's 254 it can write): the image
        # below the depth bound is not looked for
        (responses_body([deep_nest(120, INPUT_IMAGE)]), False),
        # within the bound (a tool output's message content is 5 deep) it is found
        (responses_body([deep_nest(3, INPUT_IMAGE)]), True),
        (responses_body([deep_nest(4, INPUT_IMAGE)]), False),
        # 28 000 nodes before the image: the node budget ends the walk (the newest items are
        # walked first, so an image at the end of a long conversation is still found)
        (responses_body([{"role": "user", "content": [INPUT_IMAGE]}, *wide]), False),
        (responses_body([*wide, {"role": "user", "content": [INPUT_IMAGE]}]), True),
    ]
    for body, vision in cases:
        async with http.post(kleis.url + RESPONSES, json=body, headers=auth) as resp:
            assert resp.status == 200
        assert copilot_fake.requests[-1].headers.get("copilot-vision-request") == ("true" if vision else None)


# ── 4. the live model list through the app ───────────────────────────────────


async def test_admin_model_list_shows_what_copilot_offers_the_account(start_kleis, copilot_fake):
    kleis = await start_kleis()
    grant = copilot_fake.grant()
    account = await kleis.import_account("copilot", grant, label="octo")
    _, listing = await kleis.admin("GET", f"/admin/accounts/{account['id']}/models?refresh=1", expect=200)
    assert [m["id"] for m in listing["models"]] == ["gpt-4.1", "gpt-5-mini", "claude-sonnet-4.6"]
    assert listing["models"][1] == {
        "id": "gpt-5-mini",
        "name": "GPT-5 mini",
        "context": 264_000,
        "input": 128_000,
        "output": 64_000,
        "inputModalities": ["text", "image"],
        "reasoning": True,
        "toolCall": True,
    }
    (call,) = copilot_fake.calls("/models")
    assert call.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert grant["access_token"] not in json.dumps(listing)
