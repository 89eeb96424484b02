"""The Codex adapter against FakeCodex over real loopback HTTP."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import hypothesis
import orjson
import pytest
from hypothesis import strategies as st

import providers
from providers import (
    Account,
    Context,
    Cooldown,
    LoginFailed,
    LoginPending,
    ModelInfo,
    ProviderError,
    ProxyRequest,
    ReauthRequired,
    Tokens,
    Usage,
    codex,
)
from providers._oauth import b64url, jwt_claims
from tests.fakes.codex import DEFAULT_USAGE, FakeCodex, fake_jwt

DATA = Path(__file__).resolve().parent.parent / "data"
NOW = 1_800_000_000_000  # the adapter's clock; the fake keeps real time for token lifetimes
HOUR_MS = 3600 * 1000
SAMPLE_SESSION = "ses_de1a28937ffeiguHGroyu2pk50"
BUNDLED_INSTRUCTIONS = (Path(codex.__file__).with_name("codex_instructions.md")).read_text().strip()


@pytest.fixture
def fake(codex_fake):
    return codex_fake


@pytest.fixture
def ctx(fake, http):
    return Context(
        http=http, options={**codex.OPTIONS, **fake.options()}, now=lambda: NOW, log=logging.getLogger("test")
    )


def account_from(tokens: Tokens, row_id: str = "row-1") -> Account:
    return Account(
        id=row_id,
        label=tokens.label or "",
        account_id=tokens.account_id,
        access_token=tokens.access_token,
        refresh_token=tokens.refresh_token,
        expires_at=tokens.expires_at,
        metadata=tokens.metadata,
    )


def granted_account(
    fake: FakeCodex, account_id: str = "acct_1", row_id: str = "row-1", **metadata
) -> Account:
    grant = fake.grant(account_id=account_id)
    return Account(
        id=row_id,
        label="a",
        account_id=grant["account_id"],
        access_token=grant["access_token"],
        refresh_token=grant["refresh_token"],
        expires_at=grant["expires_at"],
        metadata={"chatgptAccountId": account_id, **metadata},
    )


def sample_request(turn: int, api_key_id: str = "key_1") -> ProxyRequest:
    """An OpenCode capture as the core hands it over: credentials and hop-by-hop headers gone."""
    captured = json.loads((DATA / f"opencode-1.18.33-openai-responses-turn{turn}.json").read_text())
    headers = {
        k.lower(): v
        for k, v in captured["headers"].items()
        if k.lower() not in ("authorization", "connection")
    }
    return ProxyRequest(
        endpoint="responses", headers=headers, query="client=1", body=captured["body"], api_key_id=api_key_id
    )


def request_with(body: dict, headers: dict | None = None, api_key_id: str = "key_1") -> ProxyRequest:
    return ProxyRequest(
        endpoint="responses", headers=headers or {}, query="", body=body, api_key_id=api_key_id
    )


def derived(session: str, api_key_id: str = "key_1", row_id: str = "row-1") -> str:
    return "kleis_" + hashlib.sha256(f"{api_key_id}:{row_id}:{session}".encode()).hexdigest()[:48]


async def send(http: aiohttp.ClientSession, upstream) -> tuple[int, dict, bytes]:
    async with http.post(upstream.url, headers=upstream.headers, data=upstream.body) as resp:
        return resp.status, dict(resp.headers), await resp.read()


# ── Contract ─────────────────────────────────────────────────────────────────


def test_module_meets_the_contract():
    assert codex.CONTRACT == providers.API
    for name in providers.REQUIRED_CONSTANTS:
        assert hasattr(codex, name), name
    for name in providers.REQUIRED_FUNCTIONS:
        assert callable(getattr(codex, name)), name
    assert providers.option_urls(codex.OPTIONS) == {
        "api_url": "https://chatgpt.com/backend-api/codex",
        "auth_url": "https://auth.openai.com",
        "usage_url": "https://chatgpt.com/backend-api",
    }
    assert codex.ROUTES == {"/openai/v1/responses": "responses"}
    assert codex.MODEL_KEY_PREFIX == ""


# ── Browser login ────────────────────────────────────────────────────────────


async def test_browser_login_builds_a_pkce_authorize_url(ctx, fake):
    login = await codex.start_login(ctx, "state-abc", {"mode": "browser"})

    assert login.method == "code"
    assert login.url.startswith(f"{fake.url}/oauth/authorize?")
    params = {k: v[0] for k, v in parse_qs(urlsplit(login.url).query).items()}
    verifier = login.data["verifier"]
    assert params == {
        "response_type": "code",
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
        "redirect_uri": "http://localhost:1455/auth/callback",
        "scope": "openid profile email offline_access",
        "code_challenge": b64url(hashlib.sha256(verifier.encode()).digest()),
        "code_challenge_method": "S256",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
        "state": "state-abc",
        "originator": "opencode",
    }
    assert login.data == {
        "mode": "browser",
        "verifier": verifier,
        "redirect_uri": "http://localhost:1455/auth/callback",
    }


async def test_unknown_login_mode_means_browser(ctx):
    login = await codex.start_login(ctx, "s", {"mode": "carrier-pigeon"})
    assert login.method == "code"
    assert (await codex.start_login(ctx, "s", {})).method == "code"


async def approve_in_browser(http, login) -> str:
    """What the user's browser ends up on: the callback URL with code and state."""
    async with http.get(login.url, allow_redirects=False) as resp:
        assert resp.status == 302
        return resp.headers["Location"]


async def test_browser_login_with_pasted_callback_url(ctx, fake, http):
    login = await codex.start_login(ctx, "state-abc", {})
    callback = await approve_in_browser(http, login)
    assert callback.startswith("http://localhost:1455/auth/callback?code=")

    tokens = await codex.finish_login(ctx, "state-abc", login.data, callback)

    assert tokens.account_id == "acct_1"
    assert tokens.label == "a@example.com"
    assert tokens.expires_at == NOW + HOUR_MS
    assert tokens.metadata == {
        "chatgptAccountId": "acct_1",
        "email": "a@example.com",
        "organizationIds": ["org_acct_1"],
    }
    assert tokens.access_token in fake.access_tokens
    assert tokens.refresh_token in fake.refresh_tokens
    exchange = fake.calls("/oauth/token")[-1]
    assert exchange.headers["content-type"] == "application/x-www-form-urlencoded"
    assert exchange.form == {
        "grant_type": "authorization_code",
        "code": parse_qs(urlsplit(callback).query)["code"][0],
        "redirect_uri": "http://localhost:1455/auth/callback",
        "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
        "code_verifier": login.data["verifier"],
    }


async def test_browser_login_with_code_hash_state_and_bare_code(ctx, fake, http):
    fake.identity = {"account_id": "acct_2", "email": "b@example.com"}
    login = await codex.start_login(ctx, "s1", {})
    code = parse_qs(urlsplit(await approve_in_browser(http, login)).query)["code"][0]
    tokens = await codex.finish_login(ctx, "s1", login.data, f"  {code}#s1 ")
    assert (tokens.account_id, tokens.label) == ("acct_2", "b@example.com")

    login = await codex.start_login(ctx, "s2", {})
    code = parse_qs(urlsplit(await approve_in_browser(http, login)).query)["code"][0]
    assert (await codex.finish_login(ctx, "s2", login.data, code)).account_id == "acct_2"


async def test_browser_login_refuses_a_state_mismatch_without_calling_the_provider(ctx, fake, http):
    login = await codex.start_login(ctx, "mine", {})
    callback = await approve_in_browser(http, login)
    with pytest.raises(LoginFailed, match="state mismatch"):
        await codex.finish_login(ctx, "theirs", login.data, callback)
    with pytest.raises(LoginFailed, match="state mismatch"):
        await codex.finish_login(ctx, "mine", login.data, "abc#theirs")
    assert fake.calls("/oauth/token") == []


async def test_browser_login_with_a_wrong_verifier_or_used_code_fails(ctx, fake, http):
    login = await codex.start_login(ctx, "s", {})
    callback = await approve_in_browser(http, login)
    with pytest.raises(LoginFailed, match=r"refused \(invalid_grant\)"):
        await codex.finish_login(ctx, "s", {**login.data, "verifier": "x" * 43}, callback)
    # the fake, like OpenAI, burns a code on its first use
    with pytest.raises(LoginFailed, match="invalid_grant"):
        await codex.finish_login(ctx, "s", login.data, callback)


async def test_finish_login_refuses_device_logins(ctx):
    with pytest.raises(LoginFailed, match="device code"):
        await codex.finish_login(ctx, "s", {"mode": "headless"}, "code")


# ── Device login ─────────────────────────────────────────────────────────────


async def test_device_login_pending_slow_down_then_success(ctx, fake):
    login = await codex.start_login(ctx, "s", {"mode": "headless"})

    device_auth_id = next(iter(fake.devices))
    user_code = fake.devices[device_auth_id]["user_code"]
    assert login.method == "device"
    assert login.url == f"{fake.url}/codex/device"
    assert login.user_code == user_code
    assert login.interval == 5.0  # sent as the string "5"
    assert login.data == {
        "mode": "headless",
        "device_auth_id": device_auth_id,
        "user_code": user_code,
        "interval": 5.0,
    }
    assert fake.calls("/api/accounts/deviceauth/usercode")[0].json == {
        "client_id": codex.OPTIONS["client_id"]
    }

    with pytest.raises(LoginPending) as pending:
        await codex.poll_login(ctx, login.data)
    assert (pending.value.interval, pending.value.data) == (None, None)

    fake.device_script.extend(["slow_down", "slow_down"])
    with pytest.raises(LoginPending) as slow:
        await codex.poll_login(ctx, login.data)
    assert slow.value.interval == 10.0
    with pytest.raises(LoginPending) as slower:
        await codex.poll_login(ctx, slow.value.data)
    assert slower.value.interval == 15.0
    assert slower.value.data == {**login.data, "interval": 15.0}

    fake.approve_device(account_id="acct_dev", email="dev@example.com")
    tokens = await codex.poll_login(ctx, slower.value.data)

    assert (tokens.account_id, tokens.label) == ("acct_dev", "dev@example.com")
    assert tokens.expires_at == NOW + HOUR_MS
    assert fake.calls("/api/accounts/deviceauth/token")[-1].json == {
        "device_auth_id": device_auth_id,
        "user_code": user_code,
    }
    exchange = fake.calls("/oauth/token")[-1].form
    assert exchange["grant_type"] == "authorization_code"
    assert exchange["redirect_uri"] == f"{fake.url}/deviceauth/callback"


async def test_device_login_denied_fails(ctx, fake):
    login = await codex.start_login(ctx, "s", {"mode": "headless"})
    fake.device_script.append("denied")
    with pytest.raises(LoginFailed, match="access_denied"):
        await codex.poll_login(ctx, login.data)


# ── Refresh ──────────────────────────────────────────────────────────────────


async def test_refresh_rotates_and_a_reused_token_needs_reauth(ctx, fake):
    account = granted_account(fake)

    tokens = await codex.refresh(ctx, account)

    assert fake.refresh_calls == 1
    assert tokens.refresh_token != account.refresh_token
    assert tokens.access_token != account.access_token
    assert tokens.expires_at == NOW + HOUR_MS
    assert tokens.account_id == "acct_1"
    assert fake.calls("/oauth/token")[-1].form == {
        "grant_type": "refresh_token",
        "refresh_token": account.refresh_token,
        "client_id": codex.OPTIONS["client_id"],
    }
    with pytest.raises(ReauthRequired, match="refresh_token_reused"):
        await codex.refresh(ctx, account)
    # the rotated token still works
    assert (await codex.refresh(ctx, account_from(tokens))).account_id == "acct_1"
    assert fake.refresh_calls == 3


async def test_refresh_with_an_unknown_token_needs_reauth(ctx, fake):
    account = granted_account(fake)
    fake.revoke_refresh_tokens()
    with pytest.raises(ReauthRequired, match="invalid_grant"):
        await codex.refresh(ctx, account)


async def test_refresh_keeps_the_old_refresh_token_when_none_comes_back(ctx, fake):
    fake.rotate_refresh = False
    account = granted_account(fake)
    tokens = await codex.refresh(ctx, account)
    assert tokens.refresh_token == account.refresh_token
    assert tokens.access_token != account.access_token


# ── Import ───────────────────────────────────────────────────────────────────


def test_import_codex_cli_auth_file(ctx):
    content = (DATA / "codex-cli-auth.json").read_text()
    for given in (content, json.loads(content)):
        [tokens] = codex.import_auth(ctx, given)
        assert tokens.refresh_token == "rt_file_fake_refresh"
        assert tokens.expires_at == 1_893_456_000_000  # the access token's exp claim
        assert tokens.account_id == "acct_file"
        assert tokens.label == "file@example.com"
        assert tokens.metadata == {
            "chatgptAccountId": "acct_file",
            "email": "file@example.com",
            "organizationIds": ["org_file"],
        }
        assert "id_token" not in json.dumps(tokens.metadata)


def test_import_opencode_auth_file(ctx):
    [tokens] = codex.import_auth(ctx, (DATA / "codex-opencode-auth.json").read_text())
    assert (tokens.access_token, tokens.refresh_token) == (
        "opencode-opaque-access",
        "rt_opencode_fake_refresh",
    )
    assert tokens.expires_at == 1_893_456_000_000
    assert tokens.account_id == "acct_opencode"
    assert tokens.label == "chatgpt:acct_opencode"


def test_import_without_an_expiry_claim_assumes_an_hour(ctx):
    content = {"tokens": {"access_token": "opaque", "refresh_token": "rt", "account_id": "acct_x"}}
    [tokens] = codex.import_auth(ctx, content)
    assert tokens.expires_at == NOW + HOUR_MS
    assert tokens.account_id == "acct_x"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"OPENAI_API_KEY": "sk-fake", "tokens": None}, "API key"),
        ({"openai": {"type": "api", "key": "sk-fake"}}, "API key"),
        ({"anthropic": {"type": "oauth", "access": "a", "refresh": "r"}}, r"~/.codex/auth.json"),
        ({"tokens": {"access_token": "", "refresh_token": "rt"}}, "no ChatGPT login"),
        ("not json", "not JSON"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_import_says_what_file_was_expected(ctx, content, message):
    with pytest.raises(LoginFailed, match=message):
        codex.import_auth(ctx, content)


async def test_imported_live_accounts_work_upstream(ctx, fake, http):
    for content in (fake.codex_auth_file("acct_9", "n@example.com"), fake.opencode_auth_file("acct_9")):
        [tokens] = codex.import_auth(ctx, content)
        upstream = codex.prepare(ctx, account_from(tokens), request_with({"model": "gpt-5.5", "input": "hi"}))
        status, _, body = await send(http, upstream)
        assert status == 200, body
        assert fake.calls("/responses")[-1].headers["chatgpt-account-id"] == "acct_9"


# ── prepare ──────────────────────────────────────────────────────────────────


async def test_prepare_opencode_turn1(ctx, fake, http):
    request = sample_request(1)
    original = copy.deepcopy(request.body)
    account = granted_account(fake)
    account = Account(**{**account.__dict__, "account_id": "acct_row"})  # metadata wins over the row
    session = derived(SAMPLE_SESSION)

    upstream = codex.prepare(ctx, account, request)

    assert request.body == original
    assert upstream.url == f"{fake.url}/responses"
    assert upstream.headers == {
        "accept": "text/event-stream",
        "authorization": f"Bearer {account.access_token}",
        "content-type": "application/json",
        "user-agent": "opencode",
        "originator": "opencode",
        "chatgpt-account-id": "acct_1",
        "session-id": session,
        "x-session-affinity": session,
        "x-session-id": session,
    }
    expected = {key: value for key, value in original.items() if key != "max_output_tokens"}
    expected.update(
        input=original["input"][1:],
        instructions=original["input"][0]["content"],
        store=False,
        prompt_cache_key=session,
    )
    sent = json.loads(upstream.body)
    assert sent == expected
    assert sent["instructions"].startswith("You are OpenCode")
    assert upstream.body == orjson.dumps(sent)  # compact, UTF-8

    status, _, _ = await send(http, upstream)
    assert status == 200
    assert fake.calls("/responses")[-1].body == upstream.body


async def test_prepare_opencode_turn2_keeps_replayed_items_exact(ctx, fake, http):
    request = sample_request(2)
    original = copy.deepcopy(request.body)

    upstream = codex.prepare(ctx, granted_account(fake), request)

    assert request.body == original
    sent = json.loads(upstream.body)
    assert sent["input"] == original["input"][1:]
    assert [item.get("type") for item in sent["input"]] == [
        None,
        "reasoning",
        "function_call",
        "function_call_output",
    ]
    encrypted = original["input"][2]["encrypted_content"]
    assert f'"encrypted_content":"{encrypted}"'.encode() in upstream.body
    assert "max_output_tokens" not in sent

    status, _, body = await send(http, upstream)
    assert status == 200, body


def test_prepare_keeps_client_instructions_and_the_developer_item(ctx, fake):
    body = {
        "model": "gpt-5.5",
        "instructions": "Be brief.",
        "input": [{"role": "developer", "content": "dev"}, {"role": "user", "content": "hi"}],
    }
    sent = json.loads(codex.prepare(ctx, granted_account(fake), request_with(body)).body)
    assert sent["instructions"] == "Be brief."
    assert sent["input"] == body["input"]


def test_prepare_promotes_a_system_item_made_of_text_parts(ctx, fake):
    body = {
        "model": "gpt-5.5",
        "instructions": "  ",
        "input": [
            {
                "type": "message",
                "role": "system",
                "content": [{"type": "input_text", "text": "one"}, {"type": "input_text", "text": "two"}],
            },
            {"role": "user", "content": "hi"},
        ],
    }
    sent = json.loads(codex.prepare(ctx, granted_account(fake), request_with(body)).body)
    assert sent["instructions"] == "one\n\ntwo"
    assert sent["input"] == [{"role": "user", "content": "hi"}]


def test_prepare_uses_the_default_text_when_nothing_is_promotable(ctx, fake):
    image_prompt = {
        "role": "developer",
        "content": [{"type": "input_text", "text": "x"}, {"type": "input_image", "image_url": "data:,"}],
    }
    body = {"model": "gpt-5.5", "input": [image_prompt, {"role": "user", "content": "hi"}]}
    sent = json.loads(codex.prepare(ctx, granted_account(fake), request_with(body)).body)
    assert sent["instructions"] == BUNDLED_INSTRUCTIONS
    assert sent["input"] == body["input"]
    assert "OpenCode" not in BUNDLED_INSTRUCTIONS  # our own text, not OpenCode's prompt


def test_prepare_reads_an_instructions_file_option(ctx, fake, tmp_path):
    file = tmp_path / "prompt.md"
    file.write_text("Custom house rules.\n")
    custom = Context(
        http=ctx.http, options={**ctx.options, "instructions_file": str(file)}, now=ctx.now, log=ctx.log
    )
    sent = json.loads(codex.prepare(custom, granted_account(fake), request_with({"input": []})).body)
    assert sent["instructions"] == "Custom house rules."


async def test_prepare_turns_string_input_into_a_user_message(ctx, fake, http):
    """The openai SDK sends `input` as a string and caps output; the backend takes neither."""
    body = {
        "model": "gpt-5.5",
        "stream": True,
        "input": "Say hi",
        "max_output_tokens": 50,
        "max_completion_tokens": 50,
    }
    headers = {
        "user-agent": "OpenAI/Python 3.57.0",
        "x-stainless-lang": "python",
        "accept": "application/json",
    }
    upstream = codex.prepare(ctx, granted_account(fake), request_with(body, headers))

    sent = json.loads(upstream.body)
    assert sent == {
        "model": "gpt-5.5",
        "stream": True,
        "store": False,
        "instructions": BUNDLED_INSTRUCTIONS,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "Say hi"}]}],
    }
    assert upstream.headers["user-agent"] == "opencode"
    assert upstream.headers["x-stainless-lang"] == "python"
    assert upstream.headers["accept"] == "text/event-stream"
    assert "session-id" not in upstream.headers
    status, _, reply = await send(http, upstream)
    assert status == 200, reply


def test_prepare_without_a_session_sets_no_session_headers(ctx, fake):
    headers = {
        "x-client-request-id": "req-1",
        "accept-encoding": "gzip",
        "content-length": "12",
        "originator": "codex_cli_rs",
        "accept": "application/json",
    }
    account = Account(
        id="row-1",
        label="x",
        account_id="acct_row",
        access_token="at",
        refresh_token="rt",
        expires_at=0,
        metadata={},
    )
    upstream = codex.prepare(ctx, account, request_with({"input": [], "prompt_cache_key": "  "}, headers))
    assert upstream.headers == {
        "accept": "text/event-stream",  # the backend only streams; Kleis collects for non-stream clients
        "authorization": "Bearer at",
        "content-type": "application/json",
        "user-agent": "codex_cli_rs",  # a client naming its originator keeps a matching identity
        "originator": "codex_cli_rs",
        "chatgpt-account-id": "acct_row",
    }
    assert "prompt_cache_key" not in json.loads(upstream.body)


def test_prepare_derives_the_session_per_key_and_account(ctx, fake):
    account = granted_account(fake)
    request = request_with({"input": []}, {"session_id": "abc"})
    first = codex.prepare(ctx, account, request)
    assert "session_id" not in first.headers
    assert first.headers["session-id"] == derived("abc")
    assert json.loads(first.body)["prompt_cache_key"] == derived("abc")
    other_key = codex.prepare(
        ctx, account, request_with({"input": []}, {"session_id": "abc"}, api_key_id="key_2")
    )
    assert other_key.headers["session-id"] == derived("abc", api_key_id="key_2") != derived("abc")


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [
        ({"prompt_cache_key": " body-key "}, {"session_id": "h"}, "body-key"),
        ({"prompt_cache_key": ""}, {"session-id": "h1", "x-session-affinity": "h2"}, "h1"),
        ({}, {"session_id": "a", "session-id": "b"}, "a"),
        ({}, {"x-session-affinity": "aff", "x-session-id": "sid"}, "aff"),
        ({}, {"x-session-id": "sid"}, "sid"),
        ({}, {"x-client-request-id": "req"}, None),
        ({"prompt_cache_key": 7}, {}, None),
    ],
)
def test_session_key(body, headers, expected):
    assert codex.session_key(request_with(body, headers)) == expected


# ── Responses and usage ──────────────────────────────────────────────────────


def test_transformer_finds_usage_wherever_the_stream_splits(ctx):
    stream = b"".join(FakeCodex.stream_reply(text="abcdef", events=3).events)
    request = request_with({"stream": True})
    for cut in range(len(stream) + 1):
        t = codex.transformer(ctx, request, 200, {})  # the backend may omit Content-Type
        out = t.feed(stream[:cut]) + t.feed(stream[cut:]) + t.close()
        assert out == stream
        assert t.is_sse and t.terminal
        assert t.usage == Usage(input_tokens=100, output_tokens=20, cache_read_tokens=20)


def test_transformer_reads_json_usage(ctx):
    body = json.dumps(
        FakeCodex.json_reply(
            usage={"input_tokens": 50, "output_tokens": 7, "input_tokens_details": {"cached_tokens": 8}}
        ).body
    ).encode()
    t = codex.transformer(ctx, request_with({}), 200, {"Content-Type": "application/json"})
    assert t.feed(body) + t.close() == body
    assert not t.is_sse and t.terminal
    assert t.usage == Usage(input_tokens=42, output_tokens=7, cache_read_tokens=8)


async def test_transformer_over_a_live_tool_call_stream(ctx, fake, http):
    fake.queue(
        FakeCodex.tool_call_reply(
            usage={"input_tokens": 10, "output_tokens": 3, "input_tokens_details": {"cached_tokens": 4}},
            crlf=True,
        )
    )
    request = request_with({"model": "gpt-5.5", "stream": True, "input": "go"})
    upstream = codex.prepare(ctx, granted_account(fake), request)
    async with http.post(upstream.url, headers=upstream.headers, data=upstream.body) as resp:
        t = codex.transformer(ctx, request, resp.status, resp.headers)
        relayed = b""
        async for chunk in resp.content.iter_any():
            relayed += t.feed(chunk)
        relayed += t.close()
    assert b'"type": "response.function_call_arguments.delta"' in relayed
    assert t.usage == Usage(input_tokens=6, output_tokens=3, cache_read_tokens=4)


async def test_expired_access_token_gets_a_401_upstream(ctx, fake, http):
    account = granted_account(fake)
    fake.expire_access_tokens()
    status, _, body = await send(http, codex.prepare(ctx, account, request_with({"input": "x"})))
    assert status == 401
    assert json.loads(body)["error"]["code"] == "token_expired"


# ── Collected (non-streaming) responses ──────────────────────────────────────


def collect(reply, cuts: tuple[int, ...] = ()) -> tuple[codex.ResponsesCollector, dict | None]:
    """Run a scripted stream through a fresh collector, split at `cuts`; (collector, body)."""
    stream = b"".join(reply.events)
    t = codex.transformer(None, request_with({}), 200, {"content-type": "text/event-stream"})
    assert isinstance(t, codex.ResponsesCollector) and t.collect and not t.is_sse
    out, start = b"", 0
    for cut in (*cuts, len(stream)):
        out += t.feed(stream[start:cut])
        start = cut
    assert out == b""  # nothing goes out before close()
    body = t.close()
    return t, (json.loads(body) if body else None)


def item_of(reply, output_index: int) -> dict:
    """The item of the reply's `response.output_item.done` for that index."""
    for event in reply.events:
        payload = json.loads(event.split(b"data: ", 1)[1])
        if payload["type"] == "response.output_item.done" and payload["output_index"] == output_index:
            return payload["item"]
    raise AssertionError(f"no output_item.done for {output_index}")


def test_collector_rebuilds_an_empty_final_output_wherever_the_stream_splits():
    reply = FakeCodex.stream_reply(text="Hello from Codex.", events=4, final_output=False)
    stream = b"".join(reply.events)
    message = item_of(reply, 0)
    for cut in range(0, len(stream) + 1, 7):
        t, body = collect(reply, (cut,))
        assert (t.status, t.content_type, t.terminal) == (200, "application/json", True)
        assert body["status"] == "completed" and body["object"] == "response"
        assert body["output"] == [message]
        assert body["output"][0]["content"][0]["text"] == "Hello from Codex."
        assert t.usage == Usage(input_tokens=100, output_tokens=20, cache_read_tokens=20)


def test_collector_rebuilds_reasoning_and_a_function_call_in_output_order():
    reply = FakeCodex.reasoning_tool_call_reply(summary="Looking for the goal.", arguments='{"id":7}')
    t, body = collect(reply)
    assert t.status == 200
    reasoning, call = body["output"]
    assert reasoning == item_of(reply, 0) and call == item_of(reply, 1)
    assert reasoning["encrypted_content"] == "gAAAAfake-encrypted-reasoning"
    assert (call["type"], call["name"], call["arguments"], call["call_id"]) == (
        "function_call",
        "get_goal",
        '{"id":7}',
        "call_goal",
    )


def test_collector_orders_by_output_index_not_arrival():
    first = {
        "id": "msg_a",
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "A"}],
    }
    second = {"id": "fc_b", "type": "function_call", "call_id": "c", "name": "n", "arguments": "{}"}
    reply = FakeCodex.frames_reply(
        [
            ("response.output_item.done", {"output_index": 1, "item": second}),
            ("response.output_item.done", {"output_index": 0, "item": first}),
            (
                "response.completed",
                {"response": {"id": "r", "status": "completed", "output": [], "usage": None}},
            ),
        ]
    )
    _, body = collect(reply)
    assert body["output"] == [first, second]


def test_collector_rebuilds_items_seen_only_as_added_and_deltas():
    """No output_item.done, no content_part.added: the deltas alone still make the text."""
    message = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    call = {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "glob", "arguments": ""}
    reply = FakeCodex.frames_reply(
        [
            ("response.output_item.added", {"output_index": 0, "item": message}),
            ("response.output_text.delta", {"output_index": 0, "content_index": 0, "delta": "Hel"}),
            ("response.output_text.delta", {"output_index": 0, "content_index": 0, "delta": "lo"}),
            ("response.output_item.added", {"output_index": 1, "item": call}),
            ("response.function_call_arguments.delta", {"output_index": 1, "delta": '{"pattern":'}),
            ("response.function_call_arguments.delta", {"output_index": 1, "delta": '"*"}'}),
            ("response.completed", {"response": {"id": "r", "status": "completed", "output": []}}),
        ]
    )
    _, body = collect(reply)
    assert body["output"] == [
        {**message, "content": [{"type": "output_text", "text": "Hello", "annotations": []}]},
        {**call, "arguments": '{"pattern":"*"}'},
    ]


def test_collector_keeps_a_final_output_that_is_not_empty():
    reply = FakeCodex.stream_reply(text="streamed")
    final = {"id": "msg_final", "type": "message", "role": "assistant", "content": []}
    events = list(reply.events)
    completed = json.loads(events[-1].split(b"data: ", 1)[1])
    completed["response"]["output"] = [final]
    events[-1] = f"data: {json.dumps(completed)}\n\n".encode()
    _, body = collect(type(reply)(events=events))
    assert body["output"] == [final]


def test_collector_answers_an_incomplete_response_with_200_and_its_status():
    t, body = collect(FakeCodex.incomplete_reply(text="Partial answer", reason="max_output_tokens"))
    assert t.status == 200
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["content"][0]["text"] == "Partial answer"


@pytest.mark.parametrize(
    ("reply", "status", "type_", "code", "message"),
    [
        (
            FakeCodex.error_event_reply("context_length_exceeded", "Too long for the window."),
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "Too long for the window.",
        ),
        (
            FakeCodex.error_event_reply("context_length_exceeded", "Nested too long.", nested=True),
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "Nested too long.",
        ),
        (
            FakeCodex.error_event_reply("invalid_prompt", "Prompt flagged."),
            400,
            "invalid_request_error",
            "invalid_prompt",
            "Prompt flagged.",
        ),
        (
            FakeCodex.error_event_reply("rate_limit_exceeded", "Rate limit reached. Try again in 2s."),
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
            "Rate limit reached. Try again in 2s.",
        ),
        (
            FakeCodex.error_event_reply(
                "usage_limit_reached",
                "The usage limit has been reached",
                nested=True,
                type="usage_limit_reached",
            ),
            429,
            "usage_limit_reached",
            "usage_limit_reached",
            "The usage limit has been reached",
        ),
        (
            FakeCodex.error_event_reply("usage_not_included", "Upgrade to use Codex."),
            403,
            "permission_error",
            "usage_not_included",
            "Upgrade to use Codex.",
        ),
        (
            FakeCodex.error_event_reply("server_is_overloaded", "Overloaded."),
            503,
            "server_error",
            "server_is_overloaded",
            "Overloaded.",
        ),
        (
            FakeCodex.error_event_reply("server_error", "Something broke.", nested=True, type="server_error"),
            502,
            "server_error",
            "server_error",
            "Something broke.",
        ),
        (
            # an unknown named code refuses this request: 400, so the SDK raises instead of retrying
            FakeCodex.error_event_reply("brand_new_code", "Unheard of."),
            400,
            "invalid_request_error",
            "brand_new_code",
            "Unheard of.",
        ),
        (
            FakeCodex.failed_reply("context_length_exceeded", "Failed: too long."),
            400,
            "invalid_request_error",
            "context_length_exceeded",
            "Failed: too long.",
        ),
        (
            FakeCodex.failed_reply("server_error", "The model failed to respond."),
            502,
            "server_error",
            "server_error",
            "The model failed to respond.",
        ),
    ],
)
def test_collector_turns_stream_errors_into_http_errors(reply, status, type_, code, message):
    t, body = collect(reply)
    assert t.terminal and t.status == status
    assert body == {"error": {"message": message, "type": type_, "param": None, "code": code}}


def test_collector_error_keeps_reset_hints_that_retry_after_reads():
    reply = FakeCodex.error_event_reply(
        "usage_limit_reached",
        "The usage limit has been reached",
        nested=True,
        type="usage_limit_reached",
        plan_type="plus",
        resets_in_seconds=900,
    )
    t, body = collect(reply)
    assert t.status == 429
    assert body["error"]["resets_in_seconds"] == 900 and body["error"]["plan_type"] == "plus"
    collected = json.dumps(body).encode()
    assert codex.retry_after(t.status, {}, collected, now=clock) == Cooldown(900.0, window_exhausted=True)


def test_collector_error_with_an_explicit_status_or_no_fields():
    explicit = FakeCodex.frames_reply(
        [("error", {"status": 429, "error": {"type": "invalid_request_error", "code": "x", "message": "m"}})]
    )
    t, body = collect(explicit)
    assert t.status == 429 and body["error"]["code"] == "x"
    bare = FakeCodex.frames_reply([("response.failed", {"response": {"id": "r", "status": "failed"}})])
    t, body = collect(bare)
    assert t.status == 502
    assert body == {
        "error": {
            "message": "the Codex backend failed the response (no reason given)",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    # a completed event whose response says failed is a failure too
    done_failed = FakeCodex.frames_reply(
        [
            (
                "response.done",
                {"response": {"status": "failed", "error": {"code": "server_error", "message": "m"}}},
            )
        ]
    )
    assert collect(done_failed)[0].status == 502


def test_collector_first_terminal_event_wins_and_usage_still_counts():
    failed = {
        "id": "r",
        "status": "failed",
        "error": {"code": "server_error", "message": "late"},
        "usage": DEFAULT_USAGE,
    }
    reply = FakeCodex.frames_reply(
        [
            ("error", {"code": "context_length_exceeded", "message": "first", "param": None}),
            ("response.failed", {"response": failed}),
        ]
    )
    t, body = collect(reply)
    assert (t.status, body["error"]["message"]) == (400, "first")
    assert t.usage == Usage(input_tokens=100, output_tokens=20, cache_read_tokens=20)


def test_collector_without_a_terminal_event_leaves_the_answer_to_the_core():
    reply = FakeCodex.stream_reply()
    t = codex.ResponsesCollector()
    t.feed(b"".join(reply.events[:-1]))
    assert t.close() == b""
    assert (t.terminal, t.status) == (False, None)


async def test_collector_over_a_live_backend_stream(ctx, fake, http):
    fake.queue(FakeCodex.stream_reply(text="live text", final_output=False, crlf=True))
    request = request_with({"model": "gpt-5.5", "input": "go"})  # not streaming
    upstream = codex.prepare(ctx, granted_account(fake), request)
    async with http.post(upstream.url, headers=upstream.headers, data=upstream.body) as resp:
        t = codex.transformer(ctx, request, resp.status, resp.headers)
        async for chunk in resp.content.iter_any():
            assert t.feed(chunk) == b""
        body = json.loads(t.close())
    assert t.status == 200
    assert body["output"][0]["content"][0]["text"] == "live text"


# ── Cooldowns ────────────────────────────────────────────────────────────────

CLOCK_S = 1_900_000_000.0  # the injected `now` of retry_after (epoch seconds)


def clock() -> float:
    return CLOCK_S


async def test_retry_after_reads_a_live_usage_limit_error(ctx, fake, http):
    fake.queue(FakeCodex.usage_limit_reply(resets_in_seconds=1800))
    status, headers, body = await send(
        http, codex.prepare(ctx, granted_account(fake), request_with({"input": "x"}))
    )
    assert status == 429
    assert codex.retry_after(status, headers, body, now=clock) == Cooldown(1800.0, window_exhausted=True)


@pytest.mark.parametrize(
    ("resets_at", "seconds"),
    [(CLOCK_S + 600, 600.0), ((CLOCK_S + 90) * 1000, 90.0), (CLOCK_S - 5, 0.0)],
)
def test_retry_after_uses_resets_at_against_the_injected_clock(resets_at, seconds):
    """No delay given: the epoch `resets_at` (seconds or ms) minus `now`, never negative."""
    body = json.dumps({"error": {"type": "usage_limit_reached", "resets_at": resets_at}}).encode()
    assert codex.retry_after(429, {}, body, now=clock) == Cooldown(seconds, window_exhausted=True)
    headers = {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-at": str(int(resets_at))}
    assert codex.retry_after(429, headers, b"", now=clock) == Cooldown(seconds, window_exhausted=True)


def test_retry_after_reads_exhausted_window_headers():
    headers = {
        "X-Codex-Primary-Used-Percent": "100.0",
        "X-Codex-Primary-Reset-After-Seconds": "120",
        "x-codex-secondary-used-percent": "100",
        "x-codex-secondary-reset-after-seconds": "7200",
    }
    assert codex.retry_after(429, headers, b"", now=clock) == Cooldown(7200.0, window_exhausted=True)
    partly = {
        "x-codex-primary-used-percent": "100",
        "x-codex-primary-reset-after-seconds": "90",
        "x-codex-secondary-used-percent": "55",
        "x-codex-secondary-reset-after-seconds": "7200",
    }
    assert codex.retry_after(429, partly, b"", now=clock) == Cooldown(90.0, window_exhausted=True)


USAGE_LIMIT_BODY = b'{"error":{"type":"usage_limit_reached","resets_in_seconds":300}}'


@pytest.mark.parametrize(
    ("status", "headers", "body"),
    [
        (429, {"retry-after": "3"}, b'{"error":{"type":"rate_limit_error","message":"slow down"}}'),
        (429, {"x-codex-primary-used-percent": "80", "x-codex-primary-reset-after-seconds": "90"}, b""),
        (500, {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-after-seconds": "90"}, b"oops"),
        (429, {}, b'{"error":{"type":"usage_limit_reached"}}'),
        (429, {}, b"\xff\xfe not json"),
        # a 5xx is never a usage window, whatever its body or headers say
        (500, {}, USAGE_LIMIT_BODY),
        (503, {"x-codex-primary-used-percent": "100", "x-codex-primary-reset-after-seconds": "90"}, b""),
    ],
)
def test_retry_after_leaves_other_errors_to_the_core(status, headers, body):
    def no_clock() -> float:
        raise AssertionError("no clock is needed for this answer")

    assert codex.retry_after(status, headers, body, now=no_clock) is None


def test_retry_after_reads_a_usage_window_on_other_4xx():
    """The body decides, not the status: a 403 usage_limit_reached is a window too."""
    assert codex.retry_after(403, {}, USAGE_LIMIT_BODY, now=clock) == Cooldown(300.0, window_exhausted=True)


# ── Discovery and quota ──────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("model_id", "kept"),
    [
        ("gpt-5.3-codex-spark", True),
        ("gpt-5.4", True),
        ("gpt-5.4-mini", True),
        ("gpt-5.5", True),
        ("gpt-5.6-luna", True),
        ("gpt-5.10", True),
        ("gpt-5.5-pro", False),
        ("gpt-5.6", False),
        ("gpt-5.3-codex", False),
        ("gpt-5", False),
        ("gpt-5.4-pro", False),
        ("text-embedding-3-large", False),
        # a bare major counts as <major>.0, so the GPT-6 family passes the 5.4 floor
        ("gpt-6", True),
        ("gpt-6-sol", True),
        ("gpt-6.1-terra", True),
        ("GPT-6-Luna", True),
        ("gpt-10-x", True),
        ("gpt-4o", False),  # the major must end at a dot, a dash or the end of the id
        ("gpt-6o", False),
        ("gpt-image-1", False),
        ("gpt-oss-120b", False),
    ],
)
def test_catalogue_model_gate(model_id, kept):
    model = {"id": model_id, "name": model_id, "limit": {"context": 1, "output": 1}}
    assert (codex.catalogue_model(codex.OPTIONS, model_id, model) is not None) is kept


def test_catalogue_model_replaces_limits_on_a_copy():
    model = {
        "id": "gpt-5.5",
        "name": "GPT-5.5",
        "limit": {"context": 1050000, "input": 922000, "output": 128000, "extra": 1},
    }
    before = copy.deepcopy(model)
    result = codex.catalogue_model(codex.OPTIONS, "gpt-5.5", model)
    assert result == {
        "id": "gpt-5.5",
        "name": "GPT-5.5",
        "limit": {"context": 400000, "input": 272000, "output": 128000},
    }
    assert model == before
    luna = codex.catalogue_model(codex.OPTIONS, "gpt-5.6-luna", {"id": "gpt-5.6-luna", "limit": {}})
    assert luna["limit"] == {"context": 400000, "input": 272000, "output": 128000}
    assert codex.catalogue_model(codex.OPTIONS, "gpt-5.4", before) == before  # no override


def test_catalogue_model_options_are_configurable():
    options = {**codex.OPTIONS, "model_min_version": "5.6", "model_allow": ["gpt-4.1"], "model_deny": []}
    assert codex.catalogue_model(options, "gpt-5.6-luna", {}) is None
    assert codex.catalogue_model(options, "gpt-5.7", {}) == {}
    assert codex.catalogue_model(options, "gpt-4.1", {}) == {}
    major_only = {**codex.OPTIONS, "model_min_version": "6", "model_allow": [], "model_deny": []}
    assert codex.catalogue_model(major_only, "gpt-6-sol", {}) is None  # 6.0 is not above 6
    assert codex.catalogue_model(major_only, "gpt-6.1-terra", {}) == {}
    assert codex.catalogue_model(major_only, "gpt-7", {}) == {}
    assert codex.catalogue_model({**major_only, "model_min_version": "six"}, "gpt-7", {}) is None


# ── Live model list ──────────────────────────────────────────────────────────

LISTED = [
    "gpt-6-astra",
    "gpt-6.1-sol",
    "gpt-6.1-terra",
    "gpt-6-sol",
    "gpt-6-luna",
    "gpt-5.6-sol",
    "gpt-5.6-terra",
    "gpt-5.6-luna",
    "gpt-5.5",
]


async def test_list_models_reads_the_backend_list(ctx, fake):
    account = granted_account(fake)

    models = await codex.list_models(ctx, account)

    # the provider-facts list minus its three `visibility: "hide"` entries, in the backend's order
    assert [m.id for m in models] == LISTED
    by_id = {m.id: m for m in models}
    assert by_id["gpt-6.1-terra"] == ModelInfo(
        id="gpt-6.1-terra",
        name="GPT-6.1 Terra",
        context=500000,
        output=None,
        input_modalities=("text", "image"),
        reasoning=True,
        tool_call=None,
    )
    assert by_id["gpt-5.5"].context == 272000 and by_id["gpt-5.5"].name == "GPT-5.5"
    (call,) = fake.calls("/models")
    assert call.method == "GET"
    assert call.query == {"client_version": "0.169.0"}
    assert call.headers["authorization"] == f"Bearer {account.access_token}"
    assert call.headers["chatgpt-account-id"] == "acct_1"
    assert (call.headers["originator"], call.headers["user-agent"]) == ("opencode", "opencode")
    assert call.headers["accept"] == "application/json"


async def test_list_models_claims_the_configured_client_version(ctx, fake):
    custom = Context(
        http=ctx.http, options={**ctx.options, "client_version": "0.170.2"}, now=ctx.now, log=ctx.log
    )
    await codex.list_models(custom, granted_account(fake))
    assert fake.calls("/models")[-1].query == {"client_version": "0.170.2"}
    assert codex.OPTIONS["client_version"] == "0.169.0"


async def test_list_models_filters_and_maps_each_entry(ctx, fake):
    fake.models_payload = {
        "models": [
            {
                "slug": "gpt-a",
                "display_name": "A",
                "visibility": "list",
                "supported_in_api": True,
                "context_window": 100,
                "input_modalities": ["text"],
                "supported_reasoning_levels": [{"effort": "low", "description": "fast"}],
            },
            {"slug": "gpt-app-only", "visibility": "list", "supported_in_api": False},
            {"slug": "gpt-hidden", "visibility": "hide", "supported_in_api": True},
            {"slug": "gpt-a", "display_name": "A again", "visibility": "list"},
            {"slug": "gpt-plain", "supported_reasoning_levels": [], "context_window": "big"},
            {"slug": "  "},
            {"display_name": "no slug"},
            "not an object",
        ]
    }
    models = await codex.list_models(ctx, granted_account(fake))
    assert models == [
        ModelInfo(id="gpt-a", name="A", context=100, input_modalities=("text",), reasoning=True),
        ModelInfo(id="gpt-plain", reasoning=False),
    ]


@pytest.mark.parametrize(
    ("status", "payload", "message"),
    [
        (500, {"error": {"message": "boom"}}, r"HTTP 500"),
        (403, {"error": {"message": "no"}}, r"HTTP 403"),
        (200, "this is not json", "not JSON with a models list"),
        (200, {"data": []}, "not JSON with a models list"),
        (200, {"models": {"gpt-a": {}}}, "not JSON with a models list"),
    ],
)
async def test_list_models_raises_on_unusable_answers(ctx, fake, status, payload, message):
    account = granted_account(fake)
    fake.models_status, fake.models_payload = status, payload
    with pytest.raises(ProviderError, match=message) as raised:
        await codex.list_models(ctx, account)
    assert account.access_token not in str(raised.value)


async def test_list_models_with_a_dead_token_or_no_server_raises(ctx, fake, http):
    account = granted_account(fake)
    fake.expire_access_tokens()
    with pytest.raises(ProviderError, match="HTTP 401") as raised:
        await codex.list_models(ctx, account)
    assert account.access_token not in str(raised.value)
    closed = Context(
        http=http, options={**ctx.options, "api_url": "http://127.0.0.1:9"}, now=ctx.now, log=ctx.log
    )
    with pytest.raises(ProviderError, match="Codex model list request failed"):
        await codex.list_models(closed, account)


async def test_quota_decodes_the_usage_endpoint(ctx, fake):
    account = granted_account(fake)
    assert await codex.quota(ctx, account) == {
        "planType": "plus",
        "allowed": True,
        "limitReached": False,
        "primaryWindow": {
            "usedPercent": 12,
            "windowSeconds": 18000,
            "resetAfterSeconds": 3600,
            "resetAt": 1893456000,
        },
        "secondaryWindow": {
            "usedPercent": 40,
            "windowSeconds": 604800,
            "resetAfterSeconds": 86400,
            "resetAt": 1893542400,
        },
        "credits": {"hasCredits": False, "unlimited": False, "balance": "0"},
    }
    call = fake.calls("/wham/usage")[-1]
    assert call.headers["authorization"] == f"Bearer {account.access_token}"
    assert call.headers["chatgpt-account-id"] == "acct_1"


async def test_quota_with_a_dead_token_raises(ctx, fake):
    account = granted_account(fake)
    fake.expire_access_tokens()
    with pytest.raises(ProviderError, match="HTTP 401"):
        await codex.quota(ctx, account)


def test_fake_jwt_claims_are_readable():
    assert jwt_claims(fake_jwt({"exp": 5, "email": "x"})) == {"exp": 5, "email": "x"}


def test_collector_gives_back_what_kleis_set_for_itself():
    """The backend echoes `instructions` and `prompt_cache_key`; a collected answer shows the
    client its own values (None when it sent none), and `store: false` as it really was."""
    bundled = {
        "instructions": "You are OpenCode, the bundled prompt.",
        "prompt_cache_key": "kleis_abc",
        "store": False,
    }
    completed = {"id": "resp_1", "object": "response", "status": "completed", "output": [], **bundled}
    reply = FakeCodex.frames_reply([("response.completed", {"response": completed})])
    for echoed, expected in (
        ({"instructions": None, "prompt_cache_key": None}, (None, None)),
        ({"instructions": "Mine.", "prompt_cache_key": "session-7"}, ("Mine.", "session-7")),
    ):
        collector = codex.ResponsesCollector(echoed)
        for event in reply.events:
            collector.feed(event)
        body = json.loads(collector.close())
        assert (body["instructions"], body["prompt_cache_key"]) == expected
        assert body["store"] is False and collector.status == 200


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(
    st.lists(
        st.tuples(
            st.sampled_from([b"response.completed", b"response.output_text.delta", b"other"]),
            st.sampled_from([b"\n", b"\r\n"]),
            st.sampled_from([b"\n\n", b"\r\n\r\n", b"\n\r\n", b"\r\n\n"]),
        ),
        max_size=8,
    ),
    st.booleans(),
)
def test_matching_events_equals_splitting_then_searching(parts, cut):
    """The collector's one-pass event search (issue 14) gives exactly the events that splitting
    the body and testing each would, for LF, CRLF and mixed boundaries and an unended last one."""
    from providers._sse import matching_events, split_events

    body = b"".join(b"event: e" + nl + b'data: {"type":"' + kind + b'"}' + end for kind, nl, end in parts) + (
        b'data: {"type":"response.completed"}' if cut else b""
    )
    want = [event for event in split_events(body) if codex.DECISIVE.search(event)]
    assert matching_events(body, codex.DECISIVE) == want
