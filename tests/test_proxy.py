"""The proxy's fault suite, end to end over HTTP on the Codex route (SPEC S5 to S7, S10, S13).

Every test runs a real Kleis server against the loopback FakeCodex and checks what the client
got (status, OpenAI error envelope, headers), what the fake upstream received, and the rows in
the database. Nothing sleeps to wait for background work: usage is flushed explicitly and
conditions are polled with a deadline (`wait_for`).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest

from runtime import ManualClock
from tests.conftest import DATA, wait_for
from tests.fakes import Reply
from tests.fakes.codex import FakeCodex

RESPONSES = "/openai/v1/responses"
KEEPALIVE = b": kleis-keepalive\n\n"
USAGE_LIMIT_MESSAGE = "The usage limit has been reached"


# ── Helpers ──────────────────────────────────────────────────────────────────


@dataclass
class Answer:
    status: int
    headers: Any  # CIMultiDictProxy: case-insensitive
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


def now_ms() -> int:
    return int(time.time() * 1000)


def request_body(model: str = "gpt-5.5", stream: bool = False, **extra) -> dict:
    body = {"model": model, "input": "hello", **extra}
    if stream:
        body["stream"] = True
    return body


async def send(
    kleis,
    key: str | None = None,
    payload: Any = None,
    *,
    headers: dict | None = None,
    data: bytes | None = None,
) -> Answer:
    """POST to the Codex route and read the whole answer."""
    sent = {"content-type": "application/json"}
    if key is not None:
        sent["authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    if data is None:
        data = json.dumps(request_body() if payload is None else payload).encode()
    async with kleis.http.post(kleis.url + RESPONSES, data=data, headers=sent) as resp:
        return Answer(resp.status, resp.headers, await resp.read())


def assert_error(answer: Answer, status: int, type_: str, code: str | None = None) -> str:
    """The OpenAI envelope with an honest type; returns the message."""
    assert answer.status == status, (answer.status, answer.raw[:500])
    body = answer.json
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["type"] == type_, error
    if status < 500:
        assert error["type"] != "server_error"
    if code is not None:
        assert error["code"] == code, error
    assert isinstance(error["message"], str) and len(error["message"]) > 10, error
    assert "Traceback" not in error["message"]
    if status == 429:
        assert int(answer.headers["Retry-After"]) >= 1
    return error["message"]


def upstream_calls(fake: FakeCodex) -> list:
    return fake.calls("/responses")


def account_seen(fake: FakeCodex, index: int = -1) -> str:
    """The ChatGPT account id the fake saw on a /responses call."""
    return upstream_calls(fake)[index].headers["chatgpt-account-id"]


async def setup(start_kleis, fake: FakeCodex, accounts: int = 1, **config):
    """A server with `accounts` Codex accounts (acct_1 primary) and one unscoped key."""
    kleis = await start_kleis(**config)
    imported = []
    for i in range(1, accounts + 1):
        imported.append(
            await kleis.import_account(
                "codex", fake.grant(f"acct_{i}", f"user{i}@example.com"), label=f"acct-{i}"
            )
        )
    key, _ = await kleis.create_key(label="laptop")
    return kleis, key, imported


async def account_row(kleis, account_id: str) -> dict:
    (row,) = await kleis.rows("provider_accounts", id=account_id)
    return row


async def usage_rows(kleis) -> list[dict]:
    """Usage rows with minute buckets merged: a test may straddle a minute boundary."""
    merged: dict[tuple, dict] = {}
    for row in await kleis.buckets():
        key = tuple(row[k] for k in ("api_key_id", "provider_account_id", "provider", "endpoint", "model"))
        if key not in merged:
            merged[key] = dict(row)
            continue
        total = merged[key]
        for name, value in row.items():
            if name.endswith(("_count", "_ms", "_tokens")) and name != "max_latency_ms":
                total[name] += value
        total["max_latency_ms"] = max(total["max_latency_ms"], row["max_latency_ms"])
        total["last_request_at"] = max(total["last_request_at"], row["last_request_at"])
    return list(merged.values())


def sse_events(raw: bytes) -> list[bytes]:
    return [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]


def last_event_json(raw: bytes) -> dict:
    event = sse_events(raw)[-1]
    data = [line[len(b"data: ") :] for line in event.split(b"\n") if line.startswith(b"data: ")]
    return json.loads(b"\n".join(data))


# ── 1. Key auth ──────────────────────────────────────────────────────────────


async def test_key_auth_failures_are_401_and_not_recorded(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake, clock=ManualClock())
    revoked, revoked_view = await kleis.create_key(label="old")
    await kleis.admin("POST", f"/admin/keys/{revoked_view['id']}/revoke", expect=200)
    expired, _ = await kleis.create_key(label="expiring", expiresAt=kleis.clock.now() + 60_000)
    kleis.clock.advance(60_000)  # the key expires; the accounts' tokens are still good for an hour

    message = assert_error(await send(kleis), 401, "authentication_error", "missing_api_key")
    assert "Authorization: Bearer" in message and "x-api-key" in message
    assert_error(await send(kleis, "kleis_" + "0" * 32), 401, "authentication_error", "invalid_api_key")
    assert_error(await send(kleis, revoked), 401, "authentication_error", "invalid_api_key")
    assert_error(await send(kleis, expired), 401, "authentication_error", "invalid_api_key")
    # A present but unusable Authorization header is not retried with x-api-key.
    assert_error(
        await send(kleis, headers={"authorization": "Basic abc", "x-api-key": key}),
        401,
        "authentication_error",
    )
    assert_error(await send(kleis, headers={"authorization": "Bearer "}), 401, "authentication_error")

    assert upstream_calls(codex_fake) == []
    assert await kleis.buckets() == []


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer {key}"},
        {"authorization": "bearer {key}"},
        {"authorization": "BEARER   {key}  "},
        {"x-api-key": "{key}"},
        {"x-api-key": "  {key} "},
    ],
    ids=["Bearer", "bearer", "BEARER-spaces", "x-api-key", "x-api-key-spaces"],
)
async def test_key_accepted_as_bearer_in_any_case_or_x_api_key(start_kleis, codex_fake, headers):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    answer = await send(kleis, headers={k: v.format(key=key) for k, v in headers.items()})
    assert answer.status == 200, answer.raw
    assert answer.json["object"] == "response"
    call = upstream_calls(codex_fake)[0]
    assert key not in call.headers.get("authorization", "") and "x-api-key" not in call.headers


async def test_repeated_bad_keys_lock_the_address_out(start_kleis, codex_fake):
    kleis, key, _ = await setup(
        start_kleis, codex_fake, security={"key_max_failures": 3, "key_lockout_seconds": 60}
    )
    for _ in range(3):
        assert_error(await send(kleis, "kleis_wrong"), 401, "authentication_error")
    locked = await send(kleis, "kleis_wrong")
    message = assert_error(locked, 429, "rate_limit_error")
    assert 1 <= int(locked.headers["Retry-After"]) <= 60
    assert "retry in" in message
    # While locked, even the right key from that address is refused (checked before the key).
    good = await send(kleis, key)
    assert_error(good, 429, "rate_limit_error")
    assert upstream_calls(codex_fake) == []
    assert await kleis.buckets() == []


async def test_a_good_key_does_not_reset_the_failure_count(start_kleis, codex_fake):
    # Issue 13: a valid key sent between guesses must not buy more guesses (keys.Lockout).
    kleis, key, _ = await setup(start_kleis, codex_fake, security={"key_max_failures": 3})
    for _ in range(2):
        assert_error(await send(kleis, "kleis_wrong"), 401, "authentication_error")
    assert (await send(kleis, key)).status == 200
    assert_error(await send(kleis, "kleis_wrong"), 401, "authentication_error")
    assert (await send(kleis, key)).status == 429


# ── 2. Scopes ────────────────────────────────────────────────────────────────


async def test_provider_scope_violation_is_403(start_kleis, codex_fake):
    kleis, _, _ = await setup(start_kleis, codex_fake)
    claude_only, _ = await kleis.create_key(label="claude", providerScopes=["claude"])
    message = assert_error(await send(kleis, claude_only), 403, "permission_error", "provider_not_allowed")
    assert "codex" in message
    assert upstream_calls(codex_fake) == []
    assert await kleis.buckets() == []


async def test_model_scope_accepts_prefixed_candidates_only(start_kleis, codex_fake):
    kleis, _, _ = await setup(start_kleis, codex_fake)
    scoped, _ = await kleis.create_key(label="5.5 only", modelScopes=["gpt-5.5"])
    for model in ("gpt-5.5", "openai/gpt-5.5", "codex/gpt-5.5"):
        answer = await send(kleis, scoped, request_body(model))
        assert answer.status == 200, (model, answer.raw)
    assert [c.json["model"] for c in upstream_calls(codex_fake)] == ["gpt-5.5"] * 3
    for model in ("gpt-5.4", "anthropic/gpt-5.5"):
        message = assert_error(
            await send(kleis, scoped, request_body(model)), 403, "permission_error", "model_not_allowed"
        )
        assert model in message
    assert len(upstream_calls(codex_fake)) == 3


async def test_account_scope_routes_to_that_account(start_kleis, codex_fake):
    kleis, _, (first, second) = await setup(start_kleis, codex_fake, accounts=2)
    assert first["isPrimary"] and not second["isPrimary"]
    scoped, _ = await kleis.create_key(label="second", accountScopes=[second["id"]])
    answer = await send(kleis, scoped)
    assert answer.status == 200
    assert answer.headers["x-kleis-account"] == second["id"]
    assert account_seen(codex_fake) == "acct_2"
    token = upstream_calls(codex_fake)[-1].headers["authorization"].removeprefix("Bearer ")
    assert codex_fake.access_tokens[token]["account_id"] == "acct_2"
    rows = await usage_rows(kleis)
    assert [r["provider_account_id"] for r in rows] == [second["id"]]


# ── 3. Bad input ─────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("data", "code", "hint"),
    [
        (b'{"model": "gpt-5.5", "input": ', "invalid_json", "not valid JSON"),
        (b"\xff\xfe not utf-8", "invalid_json", "not valid JSON"),
        (b'["gpt-5.5"]', "bad_request", "JSON object"),
        (b'"gpt-5.5"', "bad_request", "JSON object"),
        (b'{"input": "hello"}', "missing_model", "model"),
        (b'{"model": "   ", "input": "hello"}', "missing_model", "model"),
        (b'{"model": 55, "input": "hello"}', "missing_model", "model"),
        (b"", "bad_request", "JSON object with a model"),
    ],
    ids=["truncated", "not-utf8", "array", "string", "no-model", "blank-model", "number-model", "empty"],
)
async def test_bad_bodies_are_400_with_a_sentence(start_kleis, codex_fake, data, code, hint):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    message = assert_error(await send(kleis, key, data=data), 400, "invalid_request_error", code)
    assert hint in message
    assert upstream_calls(codex_fake) == []


async def test_oversized_body_is_413(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake, server={"max_body_mb": 1})
    big = request_body(input="x" * (2 * 1024 * 1024))
    message = assert_error(await send(kleis, key, big), 413, "invalid_request_error", "request_too_large")
    assert "max_body_mb" in message and "1 MB" in message
    assert upstream_calls(codex_fake) == []
    # Just under the limit still goes through.
    assert (await send(kleis, key, request_body(input="x" * 1000))).status == 200


# ── 4. No usable account ─────────────────────────────────────────────────────


async def test_no_account_is_a_400_naming_the_fix(start_kleis, codex_fake):
    kleis = await start_kleis()
    key, view = await kleis.create_key(label="laptop")
    message = assert_error(await send(kleis, key), 400, "invalid_request_error", "no_account")
    assert "accounts login codex" in message and "admin page" in message
    assert upstream_calls(codex_fake) == []
    (row,) = await usage_rows(kleis)
    assert (row["api_key_id"], row["provider_account_id"], row["model"]) == (
        view["id"],
        "__missing__",
        "gpt-5.5",
    )
    assert (row["request_count"], row["client_error_count"], row["proxy_error_count"]) == (1, 1, 1)


async def test_every_account_cooling_down_is_429_with_retry_after(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    codex_fake.queue(FakeCodex.usage_limit_reply(resets_in_seconds=120))
    relayed = await send(kleis, key)
    assert relayed.status == 429 and relayed.json["error"]["type"] == "usage_limit_reached"
    answer = await send(kleis, key)
    message = assert_error(answer, 429, "rate_limit_error", "accounts_cooling_down")
    assert 110 <= int(answer.headers["Retry-After"]) <= 120
    assert "codex" in message
    assert len(upstream_calls(codex_fake)) == 1  # the second request never left Kleis


# ── 5. Model prefixes ────────────────────────────────────────────────────────


async def test_model_prefixes_are_stripped_upstream_and_in_usage(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    for model in ("openai/gpt-5.5", "codex/gpt-5.5", "gpt-5.5"):
        answer = await send(kleis, key, request_body(model))
        assert answer.status == 200
    assert [c.json["model"] for c in upstream_calls(codex_fake)] == ["gpt-5.5"] * 3
    (row,) = await usage_rows(kleis)
    assert row["model"] == "gpt-5.5" and row["request_count"] == 3 and row["success_count"] == 3


async def test_json_body_is_read_whatever_the_content_type(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    answer = await send(kleis, key, headers={"content-type": "text/plain"})
    assert answer.status == 200
    assert upstream_calls(codex_fake)[0].headers["content-type"] == "application/json"


# ── 6. Refresh ───────────────────────────────────────────────────────────────


async def test_expiring_token_is_refreshed_before_use_and_stored_encrypted(start_kleis, codex_fake):
    kleis = await start_kleis()
    codex_fake.access_ttl = 30  # inside the 60 s request-path skew
    grant = codex_fake.grant()
    account = await kleis.import_account("codex", grant)
    codex_fake.access_ttl = 3600
    key, _ = await kleis.create_key(label="laptop")

    assert (await send(kleis, key)).status == 200
    assert codex_fake.refresh_calls == 1
    (call,) = upstream_calls(codex_fake)
    used = call.headers["authorization"].removeprefix("Bearer ")
    assert used != grant["access_token"] and codex_fake.access_tokens[used]["exp"] > time.time() + 3000

    row = await account_row(kleis, account["id"])
    assert row["status"] == "ok" and row["last_refresh_status"] == "success"
    assert row["expires_at"] > now_ms() + 3000_000
    for secret in (grant["access_token"], grant["refresh_token"], used):
        assert secret not in row["access_token_enc"] and secret not in row["refresh_token_enc"]
    assert kleis.unseal(row["access_token_enc"]) == used
    # The next request uses the stored token: no second refresh.
    assert (await send(kleis, key)).status == 200
    assert codex_fake.refresh_calls == 1


async def test_concurrent_requests_share_one_refresh(start_kleis, codex_fake):
    kleis = await start_kleis()
    codex_fake.access_ttl = 30  # every token the fake issues is "expiring" by Kleis's 60 s skew
    await kleis.import_account("codex", codex_fake.grant())
    key, _ = await kleis.create_key(label="laptop")
    codex_fake.token_delay = 0.2  # the refresh is slow, so all ten wait on it
    answers = await asyncio.gather(*(send(kleis, key) for _ in range(10)))
    assert [a.status for a in answers] == [200] * 10
    assert codex_fake.refresh_calls == 1
    tokens = {c.headers["authorization"] for c in upstream_calls(codex_fake)}
    assert len(tokens) == 1

    # Ten requests that all meet an upstream 401 force one refresh between them, too.
    codex_fake.access_ttl = 3600
    await send(kleis, key)  # refreshed once more (the stored token was issued with 30 s)
    codex_fake.expire_access_tokens()
    refreshes = codex_fake.refresh_calls
    answers = await asyncio.gather(*(send(kleis, key) for _ in range(10)))
    assert [a.status for a in answers] == [200] * 10
    assert codex_fake.refresh_calls == refreshes + 1


async def test_upstream_401_forces_one_refresh_and_retries(start_kleis, codex_fake):
    kleis, key, (account,) = await setup(start_kleis, codex_fake)
    codex_fake.expire_access_tokens()  # Kleis still believes the token lives for an hour
    answer = await send(kleis, key)
    assert answer.status == 200, answer.raw
    assert codex_fake.refresh_calls == 1
    first, second = upstream_calls(codex_fake)
    assert first.headers["authorization"] != second.headers["authorization"]
    assert first.json == second.json  # the same request, retried
    (row,) = await usage_rows(kleis)
    assert row["success_count"] == 1 and row["auth_error_count"] == 0
    assert (await account_row(kleis, account["id"]))["last_refresh_status"] == "success"


async def test_a_client_leaving_mid_refresh_does_not_break_the_refresh(start_kleis, codex_fake):
    kleis = await start_kleis()
    codex_fake.access_ttl = 30
    account = await kleis.import_account("codex", codex_fake.grant())
    key, _ = await kleis.create_key(label="laptop")
    codex_fake.access_ttl = 3600
    codex_fake.token_delay = 0.5
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):  # the client gives up while Kleis refreshes
            await send(kleis, key)

    async def refreshed():
        row = await account_row(kleis, account["id"])
        return row["last_refresh_status"] == "success" and row["refresh_lock_token"] is None and row

    row = await wait_for(refreshed, timeout=3)  # the refresh finished and released its lease
    assert codex_fake.refresh_calls == 1
    codex_fake.token_delay = 0
    answer = await send(kleis, key)
    assert answer.status == 200, answer.raw
    assert codex_fake.refresh_calls == 1  # the stored tokens are used, not refreshed again
    used = upstream_calls(codex_fake)[-1].headers["authorization"].removeprefix("Bearer ")
    assert kleis.unseal(row["access_token_enc"]) == used
    rows = await usage_rows(kleis)
    assert sum(r["cancelled_count"] for r in rows) == 1 and sum(r["success_count"] for r in rows) == 1


@pytest.mark.parametrize("when", ["before-use", "after-upstream-401"])
async def test_rejected_refresh_token_needs_reauth(db_url, start_kleis, codex_fake, when):
    kleis = await start_kleis(db_url=db_url)
    if when == "before-use":
        codex_fake.access_ttl = 30
    account = await kleis.import_account("codex", codex_fake.grant())
    key, _ = await kleis.create_key(label="laptop")
    codex_fake.revoke_refresh_tokens()
    if when == "after-upstream-401":
        codex_fake.expire_access_tokens()

    answer = await send(kleis, key)
    message = assert_error(answer, 403, "permission_error", "account_needs_reauth")
    assert "log in again" in message and "accounts login codex" in message
    assert codex_fake.refresh_calls == 1
    row = await account_row(kleis, account["id"])
    assert row["status"] == "needs_reauth" and row["last_refresh_status"] == "failed"
    assert "invalid_grant" in row["last_error"]
    _, listed = await kleis.admin("GET", "/admin/accounts", expect=200)
    assert listed["accounts"][0]["status"] == "needs_reauth"

    # Later requests are refused at once, without hammering the token endpoint.
    calls = len(upstream_calls(codex_fake))
    again = await send(kleis, key)
    assert "log in again" in assert_error(again, 403, "permission_error", "account_needs_reauth")
    assert codex_fake.refresh_calls == 1 and len(upstream_calls(codex_fake)) == calls


# ── 7. Failover ──────────────────────────────────────────────────────────────


async def test_usage_limit_fails_over_and_cools_the_account(db_url, start_kleis, codex_fake):
    kleis, key, (first, second) = await setup(start_kleis, codex_fake, accounts=2, db_url=db_url)
    codex_fake.queue(FakeCodex.usage_limit_reply(resets_in_seconds=120))
    before = now_ms()
    answer = await send(kleis, key)
    assert answer.status == 200, answer.raw
    assert answer.headers["x-kleis-account"] == second["id"]
    assert [c.headers["chatgpt-account-id"] for c in upstream_calls(codex_fake)] == ["acct_1", "acct_2"]

    cooling = kleis.services.pool.accounts[first["id"]]
    assert before + 119_000 <= cooling.cooldown_until <= now_ms() + 120_000
    assert cooling.cooldown_kind == "window"
    row = await wait_for(lambda: _cooled_row(kleis, first["id"]))
    assert row["cooldown_until"] == cooling.cooldown_until and row["cooldown_kind"] == "window"
    assert "429" in row["last_error"]
    _, listed = await kleis.admin("GET", "/admin/accounts", expect=200)
    assert {a["id"]: a["status"] for a in listed["accounts"]} == {
        first["id"]: "cooling_down",
        second["id"]: "ok",
    }

    # The next request goes straight to the second account.
    assert (await send(kleis, key)).status == 200
    assert len(upstream_calls(codex_fake)) == 3 and account_seen(codex_fake) == "acct_2"
    rows = await usage_rows(kleis)
    assert sum(r["success_count"] for r in rows) == 2 and sum(r["rate_limit_count"] for r in rows) == 0

    # The admin clears the cooldown: the primary is used again.
    await kleis.admin("DELETE", f"/admin/accounts/{first['id']}/cooldown", expect=200)
    assert (await send(kleis, key)).status == 200
    assert account_seen(codex_fake) == "acct_1"


async def _cooled_row(kleis, account_id: str) -> dict | None:
    row = await account_row(kleis, account_id)
    return row if row["cooldown_until"] else None


async def test_429_retry_after_sets_a_transient_cooldown(start_kleis, codex_fake):
    kleis, key, (first, _) = await setup(start_kleis, codex_fake, accounts=2)
    codex_fake.queue(
        FakeCodex.error_reply(429, "Slow down.", type="rate_limit_error", headers={"Retry-After": "30"})
    )
    before = now_ms()
    assert (await send(kleis, key)).status == 200
    assert account_seen(codex_fake) == "acct_2"
    cooling = kleis.services.pool.accounts[first["id"]]
    assert before + 29_000 <= cooling.cooldown_until <= now_ms() + 30_000
    assert cooling.cooldown_kind == "transient"


@pytest.mark.parametrize(
    "reply",
    [
        FakeCodex.error_reply(500, "Internal error.", type="server_error"),
        FakeCodex.error_reply(503, "Overloaded.", type="server_error"),
        Reply(drop=True),
    ],
    ids=["500", "503", "dropped"],
)
async def test_5xx_and_dropped_connections_fail_over(start_kleis, codex_fake, reply):
    kleis, key, (first, second) = await setup(start_kleis, codex_fake, accounts=2)
    codex_fake.queue(reply)
    answer = await send(kleis, key, request_body(stream=True))
    assert answer.status == 200 and answer.headers["x-kleis-account"] == second["id"]
    assert b"response.completed" in answer.raw
    assert len(upstream_calls(codex_fake)) == 2 and account_seen(codex_fake) == "acct_2"
    # One failure is a data point about the upstream, not a state of the account.
    assert not kleis.services.pool.accounts[first["id"]].cooling(now_ms())
    (row,) = await usage_rows(kleis)
    assert row["provider_account_id"] == second["id"] and row["success_count"] == 1


async def test_unrecoverable_401_fails_over_after_one_forced_refresh(start_kleis, codex_fake):
    kleis, key, (first, second) = await setup(start_kleis, codex_fake, accounts=2)
    denied = FakeCodex.error_reply(401, "Your authentication token is not valid.", code="invalid_token")
    codex_fake.queue(denied, denied)
    answer = await send(kleis, key)
    assert answer.status == 200 and answer.headers["x-kleis-account"] == second["id"]
    assert codex_fake.refresh_calls == 1
    assert [c.headers["chatgpt-account-id"] for c in upstream_calls(codex_fake)] == [
        "acct_1",
        "acct_1",
        "acct_2",
    ]
    assert kleis.services.pool.accounts[first["id"]].cooling(now_ms())


async def test_refresh_failure_cools_the_account_and_fails_over(start_kleis, codex_fake):
    dead = await FakeCodex().start()
    dead_url = dead.url
    await dead.stop()
    kleis = await start_kleis(providers={"codex": {"auth_url": dead_url}})
    codex_fake.access_ttl = 30
    first = await kleis.import_account("codex", codex_fake.grant("acct_1"))
    codex_fake.access_ttl = 3600
    second = await kleis.import_account("codex", codex_fake.grant("acct_2"))
    key, _ = await kleis.create_key(label="laptop")
    answer = await send(kleis, key)
    assert answer.status == 200 and answer.headers["x-kleis-account"] == second["id"]
    assert [c.headers["chatgpt-account-id"] for c in upstream_calls(codex_fake)] == ["acct_2"]
    state = kleis.services.pool.accounts[first["id"]]
    assert state.cooling(now_ms()) and state.status == "ok"  # transient: no new login needed
    row = await account_row(kleis, first["id"])
    assert row["status"] == "ok" and row["last_refresh_status"] == "failed"


async def test_account_needing_reauth_is_skipped(start_kleis, codex_fake):
    kleis = await start_kleis()
    codex_fake.access_ttl = 30
    first = await kleis.import_account("codex", codex_fake.grant("acct_1"))
    codex_fake.access_ttl = 3600
    second = await kleis.import_account("codex", codex_fake.grant("acct_2"))
    key, _ = await kleis.create_key(label="laptop")
    codex_fake.revoke_refresh_tokens()
    for _ in range(2):
        answer = await send(kleis, key)
        assert answer.status == 200 and answer.headers["x-kleis-account"] == second["id"]
    assert codex_fake.refresh_calls == 1
    assert (await account_row(kleis, first["id"]))["status"] == "needs_reauth"


async def test_failover_order_is_primary_then_priority_then_newest(start_kleis, codex_fake):
    kleis = await start_kleis()
    ids = {}
    for name, priority in (("acct_1", 0), ("acct_2", 5), ("acct_3", 1), ("acct_4", 1)):
        ids[name] = (
            await kleis.import_account("codex", codex_fake.grant(name), label=name, priority=priority)
        )["id"]
    key, _ = await kleis.create_key(label="laptop")
    overloaded = FakeCodex.error_reply(503, "Overloaded.", type="server_error")
    codex_fake.queue(overloaded, overloaded, overloaded)
    answer = await send(kleis, key)
    assert answer.status == 200 and answer.headers["x-kleis-account"] == ids["acct_2"]
    # acct_1 is primary; acct_3 and acct_4 share priority 1, the newer (acct_4) first; acct_2 last.
    assert [c.headers["chatgpt-account-id"] for c in upstream_calls(codex_fake)] == [
        "acct_1",
        "acct_4",
        "acct_3",
        "acct_2",
    ]


async def test_disabled_accounts_are_not_used(start_kleis, codex_fake):
    kleis, key, (first, second) = await setup(start_kleis, codex_fake, accounts=2)
    await kleis.admin("PATCH", f"/admin/accounts/{first['id']}", {"enabled": False}, expect=200)
    assert (await send(kleis, key)).headers["x-kleis-account"] == second["id"]
    await kleis.admin("PATCH", f"/admin/accounts/{second['id']}", {"enabled": False}, expect=200)
    assert_error(await send(kleis, key), 400, "invalid_request_error", "no_account")
    assert [c.headers["chatgpt-account-id"] for c in upstream_calls(codex_fake)] == ["acct_2"]


async def test_upstream_down_is_502(start_kleis, codex_fake):
    dead = await FakeCodex().start()
    dead_url = dead.url
    await dead.stop()
    kleis, key, _ = await setup(start_kleis, codex_fake, providers={"codex": {"api_url": dead_url}})
    message = assert_error(await send(kleis, key), 502, "server_error", "upstream_unavailable")
    assert "cannot reach upstream" in message
    (row,) = await usage_rows(kleis)
    assert row["server_error_count"] == 1 and row["proxy_error_count"] == 1


async def test_slow_first_byte_is_504_when_no_other_account(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake, server={"first_byte_timeout": 0.3})
    codex_fake.queue(FakeCodex.json_reply(first_byte_delay=1))
    started = time.monotonic()
    message = assert_error(await send(kleis, key), 504, "server_error", "upstream_timeout")
    assert time.monotonic() - started < 0.9
    assert "0.3 s" in message


async def test_slow_first_byte_fails_over(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake, accounts=2, server={"first_byte_timeout": 0.3})
    codex_fake.queue(FakeCodex.json_reply(first_byte_delay=1))
    answer = await send(kleis, key)
    assert answer.status == 200 and account_seen(codex_fake) == "acct_2"


async def test_upstream_400_is_relayed_verbatim_without_failover(start_kleis, codex_fake):
    kleis, key, (first, _) = await setup(start_kleis, codex_fake, accounts=2)
    reply = FakeCodex.error_reply(
        400,
        "Unsupported value: 'reasoning.effort'.",
        code="unsupported_value",
        param="reasoning.effort",
        headers={"x-request-id": "req_123"},
    )
    codex_fake.queue(reply)
    answer = await send(kleis, key)
    assert answer.status == 400
    assert answer.raw == json.dumps(reply.body).encode()
    assert answer.headers["x-request-id"] == "req_123"
    assert len(upstream_calls(codex_fake)) == 1 and account_seen(codex_fake) == "acct_1"
    assert not kleis.services.pool.accounts[first["id"]].cooling(now_ms())
    (row,) = await usage_rows(kleis)
    assert (row["client_error_count"], row["upstream_error_count"], row["proxy_error_count"]) == (1, 1, 0)


async def test_when_every_account_is_limited_the_last_429_is_relayed(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake, accounts=2)
    last = FakeCodex.error_reply(
        429,
        "Rate limit reached for acct_2.",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": "42"},
    )
    codex_fake.queue(FakeCodex.usage_limit_reply(resets_in_seconds=120), last)
    answer = await send(kleis, key)
    assert answer.status == 429
    assert answer.raw == json.dumps(last.body).encode()
    assert answer.headers["Retry-After"] == "42"
    assert [c.headers["chatgpt-account-id"] for c in upstream_calls(codex_fake)] == ["acct_1", "acct_2"]
    (row,) = await usage_rows(kleis)
    assert row["rate_limit_count"] == 1 and row["request_count"] == 1

    # Both accounts now rest: Kleis answers itself, with the shorter wait.
    again = await send(kleis, key)
    assert_error(again, 429, "rate_limit_error", "accounts_cooling_down")
    assert 30 <= int(again.headers["Retry-After"]) <= 42
    assert len(upstream_calls(codex_fake)) == 2


# ── 8. Stickiness ────────────────────────────────────────────────────────────


@pytest.mark.parametrize("carrier", ["prompt_cache_key", "x-session-id"])
async def test_session_stays_on_its_account_while_healthy(start_kleis, codex_fake, carrier):
    kleis, key, (first, second) = await setup(start_kleis, codex_fake, accounts=2)

    async def turn(session: str) -> Answer:
        if carrier == "prompt_cache_key":
            return await send(kleis, key, request_body(prompt_cache_key=session))
        return await send(kleis, key, headers={"x-session-id": session})

    assert (await turn("ses_one")).headers["x-kleis-account"] == first["id"]
    await kleis.admin("POST", f"/admin/accounts/{second['id']}/primary", expect=200)
    assert (await turn("ses_one")).headers["x-kleis-account"] == first["id"]  # sticky, though not primary
    assert (await turn("ses_two")).headers["x-kleis-account"] == second["id"]  # new session: primary
    assert (await send(kleis, key)).headers["x-kleis-account"] == second["id"]  # no session: primary
    assert [c.headers["chatgpt-account-id"] for c in upstream_calls(codex_fake)] == [
        "acct_1",
        "acct_1",
        "acct_2",
        "acct_2",
    ]
    # The client's session id never reaches the provider; the derived one differs per account.
    sessions = [c.json.get("prompt_cache_key") for c in upstream_calls(codex_fake)]
    assert sessions[0] == sessions[1] and sessions[0].startswith("kleis_") and sessions[2] != sessions[0]
    assert sessions[3] is None


async def test_sticky_account_is_left_when_it_cools_down(start_kleis, codex_fake):
    kleis, key, (first, second) = await setup(start_kleis, codex_fake, accounts=2)
    body = request_body(prompt_cache_key="ses_one")
    assert (await send(kleis, key, body)).headers["x-kleis-account"] == first["id"]
    codex_fake.queue(FakeCodex.error_reply(503, "Overloaded.", type="server_error"))
    assert (await send(kleis, key, body)).headers["x-kleis-account"] == second["id"]
    assert (await send(kleis, key, body)).headers["x-kleis-account"] == second["id"]


# ── 9. Streaming ─────────────────────────────────────────────────────────────


async def read_timed(kleis, key: str, payload: dict) -> tuple[Any, list[tuple[float, bytes]]]:
    """Stream a request; every chunk with its arrival time."""
    chunks = []
    async with kleis.http.post(
        kleis.url + RESPONSES, json=payload, headers={"authorization": f"Bearer {key}"}
    ) as resp:
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                break
            chunks.append((time.monotonic(), chunk))
        return resp, chunks


async def test_time_to_first_byte_is_recorded_even_when_under_a_millisecond(start_kleis, codex_fake):
    """The first event comes at once, the rest 0.1 s apart: the recorded TTFB is the first
    byte's (often 0 ms on loopback, which once read as "no byte" and became the duration)."""
    kleis, key, _ = await setup(start_kleis, codex_fake)
    for _ in range(3):
        codex_fake.queue(FakeCodex.stream_reply(events=3, event_delay=0.1))
        resp, _ = await read_timed(kleis, key, request_body(stream=True))
        assert resp.status == 200
    (row,) = await kleis.buckets()
    assert row["request_count"] == 3 and row["total_duration_ms"] >= 3 * 300
    assert row["max_latency_ms"] < 100, row


async def test_stream_bytes_arrive_incrementally_with_sse_headers(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    reply = FakeCodex.stream_reply(
        events=1, event_delay=0.1, headers={"Cache-Control": "private", "x-request-id": "req_9"}
    )
    codex_fake.queue(reply)
    started = time.monotonic()
    resp, chunks = await read_timed(kleis, key, request_body(stream=True))
    assert resp.status == 200
    first_at, end_at = chunks[0][0], chunks[-1][0]
    assert end_at - started >= 0.7  # eight pauses of 0.1 s upstream
    assert first_at - started < 0.3 and end_at - first_at >= 0.6
    assert chunks[0][1].startswith(b"event: response.created")
    assert b"".join(c for _, c in chunks) == b"".join(reply.events)  # byte for byte

    assert resp.headers["cache-control"] == "no-cache, no-transform"
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert "content-length" not in resp.headers and "content-encoding" not in resp.headers
    assert resp.headers["x-request-id"] == "req_9"


@pytest.mark.parametrize("crlf", [False, True], ids=["lf", "crlf"])
async def test_keepalives_fill_silence_only_between_events(start_kleis, codex_fake, crlf):
    kleis, key, _ = await setup(start_kleis, codex_fake, server={"keepalive_interval": 0.1})
    events = FakeCodex.stream_reply(text="Hi.", events=1, crlf=crlf).events
    events = [events[0], events[4], events[-1]]
    # Upstream pauses in the middle of every event too: no keepalive may land there.
    pieces = [half for e in events for half in (e[: len(e) // 2], e[len(e) // 2 :])]
    codex_fake.queue(Reply(events=pieces, event_delay=0.2))
    resp, chunks = await read_timed(kleis, key, request_body(stream=True))
    raw = b"".join(c for _, c in chunks)
    assert resp.status == 200
    positions = [i for i in range(len(raw)) if raw.startswith(KEEPALIVE, i)]
    assert len(positions) >= 4
    for i in positions:
        assert i == 0 or raw[:i].endswith((b"\n\n", b"\r\n\r\n")), raw[max(0, i - 40) : i + 20]
    assert raw.replace(KEEPALIVE, b"") == b"".join(events)
    rows = await usage_rows(kleis)
    assert rows[0]["success_count"] == 1 and rows[0]["incomplete_count"] == 0


async def test_no_keepalive_in_a_slow_json_body(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake, server={"keepalive_interval": 0.1})
    body = json.dumps(FakeCodex.json_reply().body).encode()
    pieces = [body[:50], body[50:200], body[200:]]
    codex_fake.queue(Reply(events=pieces, event_delay=0.3, content_type="application/json"))
    answer = await send(kleis, key)
    assert answer.status == 200
    assert KEEPALIVE.strip() not in answer.raw
    assert answer.raw == body
    assert "x-accel-buffering" not in answer.headers
    (row,) = await usage_rows(kleis)
    assert (row["success_count"], row["input_tokens"], row["output_tokens"]) == (1, 100, 20)


def assert_error_event(raw: bytes, hint: str) -> None:
    """The stream ends with a well-formed Responses error event."""
    events = sse_events(raw)
    assert events[-1].startswith(b"event: error\n"), events[-1]
    payload = last_event_json(raw)
    assert payload["type"] == "error" and hint in payload["message"], payload
    assert b"response.completed" not in raw
    for event in events:  # every event the client got is whole
        assert event.startswith((b"event: ", b":")), event


@pytest.mark.parametrize("case", ["cut", "no-terminal", "idle", "deadline"])
async def test_broken_streams_end_with_an_error_event_and_count_as_incomplete(start_kleis, codex_fake, case):
    server = {"idle": {"idle_timeout": 0.3}, "deadline": {"response_timeout": 0.5}}.get(case, {})
    kleis, key, _ = await setup(start_kleis, codex_fake, server=server)
    full = FakeCodex.stream_reply(events=3)
    if case == "cut":
        codex_fake.queue(FakeCodex.stream_reply(events=3, cut_after=2))
        hint = "upstream connection broke off"
    elif case == "no-terminal":
        codex_fake.queue(Reply(events=full.events[:-1]))
        hint = "without its final event"
    elif case == "idle":
        codex_fake.queue(FakeCodex.stream_reply(events=3, event_delay=1))
        hint = "sent nothing for 0.3 s"
    else:
        codex_fake.queue(FakeCodex.stream_reply(events=30, event_delay=0.1))
        hint = "took longer than 0.5 s"
    answer = await send(kleis, key, request_body(stream=True))
    assert answer.status == 200
    assert_error_event(answer.raw, hint)
    (row,) = await usage_rows(kleis)
    assert (row["request_count"], row["incomplete_count"], row["success_count"]) == (1, 1, 0)
    assert row["upstream_error_count"] == 1


async def test_a_cut_json_body_breaks_the_client_connection(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    body = json.dumps(FakeCodex.json_reply().body).encode()
    codex_fake.queue(
        Reply(events=[body[:50], body[50:200], body[200:]], cut_after=2, content_type="application/json")
    )
    async with kleis.http.post(
        kleis.url + RESPONSES, json=request_body(), headers={"authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 200
        # A JSON body has no error event: a clean end would pass half a body off as whole.
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    (row,) = await usage_rows(kleis)
    assert (row["incomplete_count"], row["cancelled_count"], row["success_count"]) == (1, 0, 0)


async def test_openai_sdk_surfaces_a_cut_stream_as_an_error(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    codex_fake.queue(FakeCodex.stream_reply(events=3, cut_after=5))
    client = openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0)
    stream = await client.responses.create(model="gpt-5.5", input="hello", stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "error" and "response.completed" not in kinds


# ── 10. Client disconnect ────────────────────────────────────────────────────


async def test_client_disconnect_cancels_upstream_and_counts_as_cancelled(db_url, start_kleis, codex_fake):
    kleis, key, (account,) = await setup(start_kleis, codex_fake, db_url=db_url)
    codex_fake.queue(FakeCodex.stream_reply(events=20, event_delay=0.2))
    async with kleis.http.post(
        kleis.url + RESPONSES, json=request_body(stream=True), headers={"authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 200
        first = await resp.content.readany()
        assert first.startswith(b"event: response.created")
        await wait_for(lambda: codex_fake.open_streams == 1)
        resp.close()  # drop the connection mid-stream
    await wait_for(lambda: codex_fake.cancelled == 1, timeout=3)
    await wait_for(lambda: kleis.services.proxy.open_streams == 0, timeout=3)
    assert codex_fake.open_streams == 0
    (row,) = await usage_rows(kleis)
    assert (row["request_count"], row["cancelled_count"], row["success_count"], row["incomplete_count"]) == (
        1,
        1,
        0,
        0,
    )
    assert not kleis.services.pool.accounts[account["id"]].cooling(now_ms())  # not the account's fault


async def test_client_leaving_before_the_first_byte_is_cancelled_not_a_failover(start_kleis, codex_fake):
    kleis, key, (first, _) = await setup(start_kleis, codex_fake, accounts=2)
    codex_fake.queue(FakeCodex.json_reply(first_byte_delay=1))
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await send(kleis, key)
    await wait_for(lambda: kleis.services.usage.recorded == 1, timeout=3)
    (row,) = await usage_rows(kleis)
    assert (row["request_count"], row["cancelled_count"], row["server_error_count"]) == (1, 1, 0)
    assert len(upstream_calls(codex_fake)) == 1  # no retry on the second account for a gone client
    assert not kleis.services.pool.accounts[first["id"]].cooling(now_ms())


# ── 11. Usage write path ─────────────────────────────────────────────────────


async def test_usage_counts_are_exact(db_url, start_kleis, codex_fake):
    kleis, key, (account,) = await setup(start_kleis, codex_fake, db_url=db_url)
    _, view = await kleis.create_key(label="other")
    usage = {
        "input_tokens": 1000,
        "input_tokens_details": {"cached_tokens": 300},
        "output_tokens": 77,
        "output_tokens_details": {"reasoning_tokens": 5},
        "total_tokens": 1077,
    }
    for i in range(5):
        stream = i % 2 == 0
        reply = FakeCodex.stream_reply(usage=usage) if stream else FakeCodex.json_reply(usage=usage)
        reply.first_byte_delay = 0.003  # a loopback answer can take under 1 ms: make time pass
        codex_fake.queue(reply)
        assert (await send(kleis, key, request_body(stream=stream))).status == 200
    codex_fake.queue(FakeCodex.error_reply(400, "bad"))
    assert (await send(kleis, key)).status == 400
    (row,) = await usage_rows(kleis)
    assert row["provider"] == "codex" and row["endpoint"] == "responses"
    assert row["provider_account_id"] == account["id"] and row["api_key_id"] != view["id"]
    assert (row["request_count"], row["success_count"], row["client_error_count"]) == (6, 5, 1)
    assert (
        row["input_tokens"],
        row["cache_read_tokens"],
        row["output_tokens"],
        row["cache_write_tokens"],
    ) == (5 * 700, 5 * 300, 5 * 77, 0)
    assert row["total_duration_ms"] > 0 and row["total_latency_ms"] > 0
    assert row["max_latency_ms"] * 6 >= row["total_latency_ms"]
    # A second flush adds, it does not overwrite.
    assert (await send(kleis, key)).status == 200
    (row,) = await usage_rows(kleis)
    assert row["request_count"] == 7 and row["success_count"] == 6


async def test_graceful_shutdown_writes_queued_usage(db_url, start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake, db_url=db_url)
    for _ in range(3):
        assert (await send(kleis, key)).status == 200
    assert kleis.services.usage.depth >= 1  # recorded, not written
    await kleis.stop()
    query = "SELECT SUM(request_count), SUM(success_count), SUM(input_tokens) FROM request_usage_buckets"
    if db_url.startswith("sqlite:///"):
        path = db_url[len("sqlite:///") :]
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = conn.execute(query).fetchall()
    else:
        import psycopg

        with psycopg.connect(db_url) as conn:
            rows = conn.execute(query).fetchall()
    assert rows == [(3, 3, 300)]


# ── 12. The openai SDK and OpenCode's own requests ──────────────────────────


@pytest.mark.parametrize("given", ["string", "list"])
async def test_openai_sdk_non_streaming(start_kleis, codex_fake, given):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    client = openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hello"}]}]
    response = await client.responses.create(
        model="openai/gpt-5.5", input="hello" if given == "string" else items, max_output_tokens=500
    )
    assert response.output_text == "Hello from Codex."
    assert response.usage.input_tokens == 120
    (call,) = upstream_calls(codex_fake)
    sent = call.json
    assert sent["input"] == items and sent["model"] == "gpt-5.5"
    assert sent["store"] is False and "max_output_tokens" not in sent and sent["instructions"]
    assert call.headers["user-agent"] == "opencode"
    # The backend only streams: Kleis asked for a stream and collected it into one JSON body.
    assert sent["stream"] is True and call.headers["accept"] == "text/event-stream"
    rows = await usage_rows(kleis)
    assert sum(r["input_tokens"] for r in rows) == 100 and sum(r["success_count"] for r in rows) == 1


async def test_non_streaming_answer_cut_short_is_a_502(start_kleis, codex_fake):
    """A collected answer whose stream breaks off is not passed off as a complete response:
    nothing was sent yet, so the client hears a 502 it can retry."""
    kleis, key, _ = await setup(start_kleis, codex_fake)
    codex_fake.queue(FakeCodex.stream_reply(cut_after=3))
    client = openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        await client.responses.create(model="gpt-5.5", input="hello")
    assert raised.value.status_code == 502 and "upstream" in raised.value.message
    rows = await usage_rows(kleis)
    assert sum(r["incomplete_count"] for r in rows) == 1


async def test_openai_sdk_streams_a_tool_call(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    codex_fake.queue(FakeCodex.tool_call_reply(name="glob", arguments='{"pattern":"src/**/*.py"}', chunks=3))
    client = openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0)
    tools = [
        {
            "type": "function",
            "name": "glob",
            "description": "Find files",
            "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}},
            "strict": False,
        }
    ]
    stream = await client.responses.create(model="gpt-5.5", input="list files", tools=tools, stream=True)
    deltas, final = [], None
    async for event in stream:
        if event.type == "response.function_call_arguments.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            final = event.response
    assert "".join(deltas) == '{"pattern":"src/**/*.py"}'
    call = final.output[0]
    assert (call.type, call.name, call.arguments) == ("function_call", "glob", '{"pattern":"src/**/*.py"}')
    assert upstream_calls(codex_fake)[0].json["tools"] == tools


async def test_opencode_turns_are_reshaped_for_the_backend(start_kleis, codex_fake):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    derived = []
    for turn in (1, 2):
        capture = json.loads((DATA / f"opencode-1.18.33-openai-responses-turn{turn}.json").read_text())
        headers = {k: v for k, v in capture["headers"].items() if k not in ("connection", "accept-encoding")}
        headers["authorization"] = f"Bearer {key}"
        raw = json.dumps(capture["body"]).encode()
        async with kleis.http.post(kleis.url + capture["path"], data=raw, headers=headers) as resp:
            assert resp.status == 200
            assert b"response.completed" in await resp.read()

        call = upstream_calls(codex_fake)[-1]
        sent, original = call.json, capture["body"]
        assert sent["instructions"] == original["input"][0]["content"]  # developer item promoted
        assert sent["input"] == original["input"][1:]
        assert sent["store"] is False and "max_output_tokens" not in sent
        assert (
            sent["prompt_cache_key"].startswith("kleis_")
            and sent["prompt_cache_key"] != original["prompt_cache_key"]
        )
        assert call.headers["x-session-id"] == sent["prompt_cache_key"]
        assert original["prompt_cache_key"] not in call.body.decode()
        for name in ("model", "include", "reasoning", "tools", "tool_choice", "stream"):
            assert sent[name] == original[name], name
        derived.append(sent["prompt_cache_key"])
        if turn == 2:
            reasoning = next(i for i in original["input"] if i.get("type") == "reasoning")
            assert json.dumps(reasoning["encrypted_content"]).encode() in call.body  # byte-identical
            assert [i for i in sent["input"] if i.get("type") == "reasoning"] == [reasoning]
    assert derived[0] == derived[1]  # one session, one cache key


# ── 13. Hot path ─────────────────────────────────────────────────────────────


async def test_a_request_with_a_fresh_token_makes_no_database_round_trip(
    start_kleis, codex_fake, monkeypatch
):
    kleis, key, _ = await setup(start_kleis, codex_fake)
    for task in kleis.services.background.named("cache-invalidation"):
        task.cancel()  # its 1 s poll would count as noise
    db = kleis.services.store.db
    real = db.aio_execute_sql
    queries: list[str] = []

    async def counting(sql, *args, **kwargs):
        queries.append(sql)
        return await real(sql, *args, **kwargs)

    monkeypatch.setattr(db, "aio_execute_sql", counting)
    for stream in (False, True):
        assert (await send(kleis, key, request_body(stream=stream))).status == 200
    assert queries == []
    await kleis.flush()
    assert any("request_usage_buckets" in q for q in queries)  # the counter does see queries


async def test_single_account_error_cooldown_is_503_not_rate_limit(start_kleis, codex_fake):
    """5xx answers are not a rate limit: after three in a row the next request hears 503 with
    the cause and a short wait."""
    kleis, key, (only,) = await setup(start_kleis, codex_fake, accounts=1)
    for _ in range(3):
        codex_fake.queue(FakeCodex.error_reply(502, "Bad gateway upstream.", type="server_error"))
        first = await send(kleis, key)
        assert first.status == 502 and first.json["error"]["message"] == "Bad gateway upstream."
    state = kleis.services.pool.accounts[only["id"]]
    assert state.cooldown_kind == "error"
    assert 8_000 <= state.cooldown_until - now_ms() <= 10_000
    second = await send(kleis, key)
    assert second.status == 503 and 1 <= int(second.headers["retry-after"]) <= 10
    assert (
        second.json["error"]["type"] == "server_error"
        and second.json["error"]["code"] == "accounts_unavailable"
    )
    assert "HTTP 502" in second.json["error"]["message"]
    assert len(upstream_calls(codex_fake)) == 3


async def test_all_accounts_disabled_says_so(start_kleis, codex_fake):
    kleis, key, (only,) = await setup(start_kleis, codex_fake, accounts=1)
    await kleis.admin("PATCH", f"/admin/accounts/{only['id']}", {"enabled": False}, expect=200)
    answer = await send(kleis, key)
    assert answer.status == 400 and "every codex account is disabled" in answer.json["error"]["message"]
