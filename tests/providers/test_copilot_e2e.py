"""Copilot end to end: clients → Kleis over HTTP → the fake GitHub/Copilot upstream.

Each test checks what the client got, what the fake received, the account rows and the usage
buckets (flushed explicitly); the device login is watched through its status route with a
deadline, never with a sleep.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from pathlib import Path

import openai
import pytest

from tests.conftest import wait_for
from tests.fakes import Reply
from tests.fakes.copilot import FakeCopilot, chat_stream_reply, error_reply, responses_stream_reply

DATA = Path(__file__).parent.parent / "data"
CHAT = "/copilot/v1/chat/completions"
RESPONSES = "/copilot/v1/responses"


# ── helpers ──────────────────────────────────────────────────────────────────


async def kleis_with_account(start_kleis, fake: FakeCopilot, db_url: str | None = None):
    kleis = await start_kleis(db_url=db_url)
    grant = fake.grant()
    account = await kleis.import_account("copilot", grant, label="octo")
    key, key_view = await kleis.create_key(label="laptop")
    return kleis, key, key_view, account, grant


@pytest.fixture
def sdk(sdk_clients):
    """The official SDK client pointed at Kleis (closed after the test)."""
    return lambda kleis, key: sdk_clients(
        openai.AsyncOpenAI(base_url=kleis.url + "/copilot/v1", api_key=key, max_retries=0)
    )


async def account_rows(kleis) -> list[dict]:
    return await kleis.rows("provider_accounts", provider="copilot")


def buckets_by_endpoint(rows: list[dict]) -> dict[str, dict]:
    by = {r["endpoint"]: r for r in rows}
    assert len(by) == len(rows), rows
    return by


def tokens(row: dict) -> tuple[int, int, int, int]:
    return row["input_tokens"], row["cache_read_tokens"], row["output_tokens"], row["cache_write_tokens"]


def sse_data(raw: bytes) -> list[str]:
    """The data of every event in an OpenAI-style stream, checking the framing."""
    text = raw.decode()
    assert text.endswith("\n\n"), text[-200:]
    out = []
    for block in text[:-2].split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
        assert all(line.startswith(("data: ", "event: ")) for line in lines), block
        assert len(data) == 1, block
        out.append(data[0])
    return out


def upstream_headers_ok(rec, grant: dict, initiator: str) -> None:
    assert rec.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert rec.headers["openai-intent"] == "conversation-edits"
    assert rec.headers["x-initiator"] == initiator
    assert "x-api-key" not in rec.headers
    assert "kleis_" not in json.dumps(rec.headers)


def app_errors(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith(("kleis", "sanic"))
    ]


# ── the official SDK ─────────────────────────────────────────────────────────


async def test_sdk_chat_stream_with_usage(db_url, start_kleis, copilot_fake, caplog, sdk):
    kleis, key, key_view, account, grant = await kleis_with_account(start_kleis, copilot_fake, db_url)
    stream = await sdk(kleis, key).chat.completions.create(
        model="gpt-4.1",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=32,
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from Copilot"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.prompt_tokens_details.cached_tokens, usage.completion_tokens) == (
        50,
        8,
        5,
    )

    (rec,) = copilot_fake.calls("/chat/completions")
    upstream_headers_ok(rec, grant, "user")
    assert "copilot-vision-request" not in rec.headers
    assert rec.json["stream_options"] == {"include_usage": True}
    assert (rec.json["model"], rec.json["max_tokens"]) == ("gpt-4.1", 32)

    (row,) = await kleis.buckets()
    assert (row["provider"], row["endpoint"], row["model"]) == ("copilot", "chat_completions", "gpt-4.1")
    assert (row["api_key_id"], row["provider_account_id"]) == (key_view["id"], account["id"])
    assert (row["request_count"], row["success_count"], row["incomplete_count"]) == (1, 1, 0)
    assert tokens(row) == (42, 8, 5, 0)
    assert app_errors(caplog) == []  # e.g. Sanic complaining about the streamed response


async def test_sdk_chat_stream_without_include_usage_is_still_counted(start_kleis, copilot_fake, sdk):
    kleis, key, _, _, _ = await kleis_with_account(start_kleis, copilot_fake)
    stream = await sdk(kleis, key).chat.completions.create(
        model="gpt-4.1",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_obfuscation": False},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from Copilot"
    (rec,) = copilot_fake.calls("/chat/completions")
    # forced upstream, the client's other stream options kept
    assert rec.json["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    (row,) = await kleis.buckets()
    assert tokens(row) == (42, 8, 5, 0)


async def test_sdk_chat_non_streaming_with_a_prefixed_model(start_kleis, copilot_fake, sdk):
    kleis, key, _, _, grant = await kleis_with_account(start_kleis, copilot_fake)
    completion = await sdk(kleis, key).chat.completions.create(
        model="github-copilot/gpt-4.1", messages=[{"role": "user", "content": "hello"}]
    )
    assert completion.choices[0].message.content == "Hello from Copilot"
    assert completion.usage.total_tokens == 55
    (rec,) = copilot_fake.calls("/chat/completions")
    upstream_headers_ok(rec, grant, "user")
    assert rec.json["model"] == "gpt-4.1"
    assert "stream_options" not in rec.json and "stream" not in rec.json
    (row,) = await kleis.buckets()
    assert (row["model"], row["success_count"]) == ("gpt-4.1", 1)
    assert tokens(row) == (42, 8, 5, 0)


async def test_sdk_responses_stream(db_url, start_kleis, copilot_fake, sdk):
    kleis, key, _, account, grant = await kleis_with_account(start_kleis, copilot_fake, db_url)
    copilot_fake.queue(
        responses_stream_reply("Hi there", input_tokens=300, cached_tokens=100, output_tokens=40)
    )
    deltas = []
    async with sdk(kleis, key).responses.stream(model="copilot/gpt-5", input="hello") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert "".join(deltas) == "Hi there"
    assert final.usage.input_tokens == 300 and final.status == "completed"

    (rec,) = copilot_fake.calls("/responses")
    upstream_headers_ok(rec, grant, "user")  # a plain string input is a user prompt
    assert rec.json["model"] == "gpt-5" and rec.json["input"] == "hello" and rec.json["stream"] is True
    assert "stream_options" not in rec.json

    (row,) = await kleis.buckets()
    assert (row["endpoint"], row["model"], row["provider_account_id"]) == (
        "responses",
        "gpt-5",
        account["id"],
    )
    assert tokens(row) == (200, 100, 40, 0)


# ── OpenCode's captured requests ─────────────────────────────────────────────


async def test_opencode_chat_turns_replayed(start_kleis, copilot_fake, http):
    kleis, key, _, _, grant = await kleis_with_account(start_kleis, copilot_fake)
    sent = []
    for turn in (1, 2):
        captured = json.loads((DATA / f"opencode-1.18.33-copilot-chat-turn{turn}.json").read_text())
        headers = {k: v for k, v in captured["headers"].items() if k not in ("connection", "content-length")}
        headers["authorization"] = f"Bearer {key}"
        body = captured["body"]
        if turn == 2:  # OpenCode sends bare ids; a prefixed one and no stream_options must work as well
            body = {**body, "model": "github-copilot/" + body["model"]}
            del body["stream_options"]
        sent.append(body)
        async with http.post(
            kleis.url + captured["path"], data=json.dumps(body).encode(), headers=headers
        ) as resp:
            assert resp.status == 200
            assert resp.headers["content-type"].startswith("text/event-stream")
            assert resp.headers["cache-control"] == "no-cache, no-transform"
            raw = await resp.read()
        data = sse_data(raw)
        assert data[-1] == "[DONE]"
        chunks = [json.loads(d) for d in data[:-1]]
        if turn == 1:  # OpenCode asks for usage: it gets the usage chunk
            assert chunks[-1]["usage"]["prompt_tokens"] == 50 and chunks[-1]["choices"] == []
        else:  # forced by Kleis only: read, then hidden
            assert all(c["choices"] and "usage" not in c for c in chunks)
        assert chunks[-1 if turn == 2 else -2]["choices"][0]["finish_reason"] == "stop"

    first, second = copilot_fake.calls("/chat/completions")
    upstream_headers_ok(first, grant, "user")
    upstream_headers_ok(second, grant, "agent")  # the last message is a tool result
    for rec, body in ((first, sent[0]), (second, sent[1])):
        assert rec.json["model"] == "gpt-4.1"
        assert rec.json["stream_options"] == {"include_usage": True}
        assert rec.json["messages"] == body["messages"]
        assert rec.json["tools"] == body["tools"] and rec.json["tool_choice"] == body["tool_choice"]
        assert rec.headers["user-agent"].startswith("opencode/1.18.33")
        assert "copilot-vision-request" not in rec.headers
    (row,) = await kleis.buckets()
    assert (row["model"], row["request_count"], row["success_count"]) == ("gpt-4.1", 2, 2)
    assert tokens(row) == (84, 16, 10, 0)


async def test_image_parts_ask_for_vision(start_kleis, copilot_fake, http):
    kleis, key, _, _, _ = await kleis_with_account(start_kleis, copilot_fake)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    chat = {
        "model": "gpt-4.1",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "what?"}, image]}],
    }
    auth = {"authorization": f"Bearer {key}"}
    async with http.post(kleis.url + CHAT, json=chat, headers=auth) as resp:
        assert resp.status == 200
    # a client cannot switch vision on for a request without images
    plain = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(
        kleis.url + CHAT, json=plain, headers={**auth, "copilot-vision-request": "true"}
    ) as resp:
        assert resp.status == 200
    responses = {
        "model": "gpt-5",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA"},
                ],
            }
        ],
    }
    async with http.post(kleis.url + RESPONSES, json=responses, headers=auth) as resp:
        assert resp.status == 200
        assert (await resp.json())["status"] == "completed"

    with_image, without, responses_rec = copilot_fake.requests[-3:]
    assert with_image.headers["copilot-vision-request"] == "true"
    assert with_image.json["messages"] == chat["messages"]
    assert "copilot-vision-request" not in without.headers
    assert responses_rec.path == "/responses" and responses_rec.headers["copilot-vision-request"] == "true"
    rows = buckets_by_endpoint(await kleis.buckets())
    assert rows["chat_completions"]["success_count"] == 2 and rows["responses"]["success_count"] == 1


# ── errors ───────────────────────────────────────────────────────────────────


async def test_errors_use_the_openai_envelope(start_kleis, copilot_fake, http):
    kleis = await start_kleis()
    key, _ = await kleis.create_key()
    body = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}

    async with http.post(kleis.url + CHAT, json=body) as resp:
        assert resp.status == 401
        err = await resp.json()
    assert err["error"]["type"] == "authentication_error" and "API key" in err["error"]["message"]

    async with http.post(kleis.url + CHAT, data=b"{oops", headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"

    async with http.post(
        kleis.url + RESPONSES, json=body, headers={"authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 400
        err = await resp.json()
    assert err["error"]["type"] == "invalid_request_error" and "no copilot account" in err["error"]["message"]

    await kleis.import_account("copilot", copilot_fake.grant())
    copilot_fake.queue(
        error_reply(
            429,
            "You have exceeded your rate limit",
            "rate_limit_error",
            headers={"retry-after": "45"},
            code="rate_limited",
        )
    )
    async with http.post(kleis.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["message"] == "You have exceeded your rate limit"  # relayed
    async with http.post(kleis.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 429
        err = await resp.json()
        assert 40 <= int(resp.headers["Retry-After"]) <= 46
    assert err["error"]["type"] == "rate_limit_error" and err["error"]["code"] == "accounts_cooling_down"
    assert len(copilot_fake.calls("/chat/completions")) == 1


async def test_cut_chat_stream_ends_with_an_error_chunk(start_kleis, copilot_fake, http):
    kleis, key, _, _, _ = await kleis_with_account(start_kleis, copilot_fake)
    reply = chat_stream_reply("one two three four")
    reply.cut_after = 3
    copilot_fake.queue(reply)
    body = {"model": "gpt-4.1", "stream": True, "messages": [{"role": "user", "content": "count"}]}
    async with http.post(kleis.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 200
        raw = await resp.read()
    data = sse_data(raw)
    assert len(data) == 4 and "[DONE]" not in data
    error = json.loads(data[-1])["error"]
    assert error["type"] == "server_error" and error["message"].startswith("Kleis: ")
    (row,) = await kleis.buckets()
    assert (row["request_count"], row["incomplete_count"], row["success_count"]) == (1, 1, 0)


# ── device login and import through the admin API ────────────────────────────


async def start_device_login(kleis) -> tuple[dict, float]:
    began = time.monotonic()
    _, login = await kleis.admin("POST", "/admin/accounts/copilot/oauth/start", {}, expect=200)
    return login, time.monotonic() - began


async def login_status(kleis, state: str, want: str) -> dict:
    async def check():
        status, body = await kleis.admin("GET", f"/admin/accounts/copilot/oauth/{state}")
        assert (status == 202) == (body["status"] == "pending"), (status, body)
        return body if body["status"] == want else None

    return await wait_for(check, timeout=5)


async def test_device_login_completes_in_the_background(db_url, start_kleis, copilot_fake, http):
    copilot_fake.device_interval = 0.02
    kleis = await start_kleis(db_url=db_url)
    login, took = await start_device_login(kleis)
    assert took < 1.0  # the admin request does not wait for the user
    assert login["method"] == "device" and login["state"]
    assert login["userCode"].startswith("ABCD-")
    assert login["authorizationUrl"] == copilot_fake.url + "/login/device"
    assert login["userCode"] in login["instructions"]

    status, pending = await kleis.admin("GET", f"/admin/accounts/copilot/oauth/{login['state']}")
    assert (status, pending["status"]) == (202, "pending")
    await wait_for(lambda: len(copilot_fake.calls("/login/oauth/access_token")) >= 2)
    copilot_fake.approve_device(login="octo", user_id=4242, email="octo@example.test")
    done = await login_status(kleis, login["state"], "complete")
    account = done["account"]
    assert (account["provider"], account["accountId"], account["label"]) == (
        "copilot",
        "4242",
        "octo@example.test",
    )
    assert account["metadata"]["githubLogin"] == "octo"
    polls = copilot_fake.calls("/login/oauth/access_token")
    assert all(p.json["device_code"] == "device-0001" for p in polls)
    assert min(b.at - a.at for a, b in itertools.pairwise(polls)) < 0.2  # the short interval is used
    # complete on a device login reports the same status instead of blocking
    _, again = await kleis.admin(
        "POST", "/admin/accounts/copilot/oauth/complete", {"state": login["state"]}, expect=200
    )
    assert again["status"] == "complete" and again["account"]["id"] == account["id"]

    (row,) = await account_rows(kleis)
    assert (row["id"], row["account_id"], row["status"]) == (account["id"], "4242", "ok")
    token = kleis.unseal(row["access_token_enc"])
    assert token in copilot_fake.users and token not in json.dumps(done)
    key, _ = await kleis.create_key()
    async with http.post(
        kleis.url + CHAT,
        json={"model": "gpt-4.1", "messages": [{"role": "user", "content": "x"}]},
        headers={"authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status == 200
    assert copilot_fake.calls("/chat/completions")[-1].headers["authorization"] == f"Bearer {token}"


async def test_device_login_honours_slow_down(start_kleis, copilot_fake):
    copilot_fake.device_interval = 0.02
    copilot_fake.slow_down(0.4)  # the first poll is told to slow down to 0.4 s
    kleis = await start_kleis()
    login, _ = await start_device_login(kleis)
    await wait_for(lambda: copilot_fake.calls("/login/oauth/access_token"))
    copilot_fake.approve_device()
    await login_status(kleis, login["state"], "complete")
    first, second = copilot_fake.calls("/login/oauth/access_token")
    assert second.at - first.at >= 0.38


async def test_device_login_denied(start_kleis, copilot_fake):
    copilot_fake.device_interval = 0.02
    kleis = await start_kleis()
    login, _ = await start_device_login(kleis)
    copilot_fake.deny_device()
    failed = await login_status(kleis, login["state"], "failed")
    assert "denied" in failed["message"] and "start the login again" in failed["message"]
    assert "account" not in failed
    assert await account_rows(kleis) == []
    status, err = await kleis.admin("GET", "/admin/accounts/copilot/oauth/no-such-state")
    assert status == 404 and err["error"] == "not_found"


async def test_import_github_cli_hosts(db_url, start_kleis, copilot_fake):
    kleis = await start_kleis(db_url=db_url)
    # The file's github.com tokens are live at the fake GitHub (imports are checked with GET /user);
    # the enterprise host cannot be reached, so that one is imported unchecked, with a warning.
    copilot_fake.users["gho_fakeOctoToken00000000000000000000"] = {"id": 11, "login": "octo", "email": None}
    copilot_fake.users["gho_fakeMonaToken00000000000000000000"] = {"id": 12, "login": "mona", "email": None}
    copilot_fake.users["gho_fakeLegacyToken0000000000000000000"] = {"id": 13, "login": "octo", "email": None}
    hosts = (DATA / "copilot-gh-hosts-users.yml").read_text()
    _, first = await kleis.admin("POST", "/admin/accounts/copilot/import", {"authFile": hosts}, expect=201)
    assert sorted(a["label"] for a in first["accounts"]) == ["hubot", "mona", "octo"]
    enterprise = next(a for a in first["accounts"] if a["label"] == "hubot")
    assert enterprise["metadata"]["enterpriseDomain"] == "ghe.example.com"
    assert sorted(a["accountId"] for a in first["accounts"] if a["label"] != "hubot") == ["11", "12"]
    assert any("not checked" in w for w in first["warnings"])  # ghe.example.com is unreachable
    _, second = await kleis.admin("POST", "/admin/accounts/copilot/import", {"authFile": hosts}, expect=201)
    assert sorted(a["id"] for a in second["accounts"]) == sorted(a["id"] for a in first["accounts"])
    rows = await account_rows(kleis)
    assert len(rows) == 3
    stored = {kleis.unseal(r["refresh_token_enc"]) for r in rows}
    assert stored == {
        "gho_fakeOctoToken00000000000000000000",
        "gho_fakeMonaToken00000000000000000000",
        "gho_fakeHubotToken0000000000000000000",
    }

    legacy = (DATA / "copilot-gh-hosts.yml").read_text()
    _, one = await kleis.admin(
        "POST", "/admin/accounts/copilot/import", {"authFile": legacy, "label": "old gh"}, expect=201
    )
    assert [a["label"] for a in one["accounts"]] == ["old gh"]
    assert len(await account_rows(kleis)) == 4
    status, err = await kleis.admin("POST", "/admin/accounts/copilot/import", {"authFile": "github.com:\n"})
    assert status == 400 and "hosts.yml" in err["message"]


# ── failover ─────────────────────────────────────────────────────────────────


async def test_rate_limited_account_fails_over_on_both_endpoints(db_url, start_kleis, copilot_fake, http):
    kleis = await start_kleis(db_url=db_url)
    grant_a = copilot_fake.grant(login="a", user_id=1)
    grant_b = copilot_fake.grant(login="b", user_id=2)
    first = await kleis.import_account("copilot", grant_a, label="a")
    second = await kleis.import_account("copilot", grant_b, label="b")
    key, key_view = await kleis.create_key()
    auth = {"authorization": f"Bearer {key}"}
    limited = error_reply(
        429,
        "Sorry, you have been rate-limited.",
        "rate_limit_error",
        headers={"retry-after": "30"},
        code="rate_limited",
    )

    copilot_fake.queue(limited)
    chat = {"model": "gpt-4.1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(kleis.url + CHAT, json=chat, headers=auth) as resp:
        assert resp.status == 200 and resp.headers["x-kleis-account"] == second["id"]
        assert sse_data(await resp.read())[-1] == "[DONE]"
    assert [c.headers["authorization"] for c in copilot_fake.calls("/chat/completions")] == [
        f"Bearer {grant_a['access_token']}",
        f"Bearer {grant_b['access_token']}",
    ]
    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    views = {a["id"]: a for a in listing["accounts"]}
    assert (
        views[first["id"]]["status"] == "cooling_down" and views[first["id"]]["cooldownKind"] == "transient"
    )
    assert 25_000 <= views[first["id"]]["cooldownUntil"] - int(time.time() * 1000) <= 31_000
    assert views[second["id"]]["status"] == "ok"

    # the admin clears the cooldown; the Responses endpoint fails over the same way
    await kleis.admin("DELETE", f"/admin/accounts/{first['id']}/cooldown", expect=200)
    copilot_fake.queue(
        Reply(status=503, body={"error": {"message": "upstream overloaded", "type": "server_error"}})
    )
    async with http.post(
        kleis.url + RESPONSES, json={"model": "gpt-5", "input": "hi", "stream": True}, headers=auth
    ) as resp:
        assert resp.status == 200 and resp.headers["x-kleis-account"] == second["id"]
        data = sse_data(await resp.read())
    assert json.loads(data[-1])["type"] == "response.completed"
    assert [c.headers["authorization"] for c in copilot_fake.calls("/responses")] == [
        f"Bearer {grant_a['access_token']}",
        f"Bearer {grant_b['access_token']}",
    ]

    # one 5xx is a state of the upstream, not of the account: it fails over but is not benched
    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    assert {a["id"]: a["status"] for a in listing["accounts"]} == {first["id"]: "ok", second["id"]: "ok"}

    by = buckets_by_endpoint(await kleis.buckets())
    for endpoint, model in (("chat_completions", "gpt-4.1"), ("responses", "gpt-5")):
        row = by[endpoint]
        assert (row["provider_account_id"], row["api_key_id"], row["model"]) == (
            second["id"],
            key_view["id"],
            model,
        )
        assert (row["request_count"], row["success_count"], row["rate_limit_count"]) == (1, 1, 0)
        assert tokens(row) == (42, 8, 5, 0)


async def test_concurrent_requests_all_counted(start_kleis, copilot_fake, http):
    kleis, key, _, _, _ = await kleis_with_account(start_kleis, copilot_fake)
    body = {"model": "gpt-4.1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}

    async def one() -> bytes:
        async with http.post(kleis.url + CHAT, json=body, headers={"authorization": f"Bearer {key}"}) as resp:
            assert resp.status == 200
            return await resp.read()

    results = await asyncio.gather(*(one() for _ in range(8)))
    assert all(sse_data(r)[-1] == "[DONE]" for r in results)
    (row,) = await kleis.buckets()
    assert (row["request_count"], row["success_count"]) == (8, 8)
    assert tokens(row) == (8 * 42, 8 * 8, 8 * 5, 0)
