"""Claude adapter against FakeClaude over real loopback HTTP: login, refresh, import, request
shaping on captured OpenCode requests, and the response transformer."""

import copy
import hashlib
import json
import logging
import re
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import aiohttp
import orjson
import pytest

import providers
from providers import (
    Account,
    Context,
    Cooldown,
    LoginFailed,
    ModelInfo,
    ProxyRequest,
    ReauthRequired,
    Usage,
    claude,
)
from tests.fakes import Reply, sse
from tests.fakes.claude import DEFAULT_EMAIL, DEFAULT_UUID, FakeClaude, challenge_of
from tests.fakes.claude import count_of as claude_fake_count

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
CLIENT_SAMPLES = DATA  # claude-code-2.1.328-*.json: real Claude Code requests (method, path, headers, body)
IDENTITY = "You are Claude Code, Anthropic's official CLI for Claude."
BETAS = "claude-code-20250219,oauth-2025-04-20,interleaved-thinking-2025-05-14,fine-grained-tool-streaming-2025-05-14"  # noqa: E501


@pytest.fixture
def fake(claude_fake):
    return claude_fake


@pytest.fixture
async def ctx(fake):
    async with aiohttp.ClientSession() as session:
        yield Context(
            http=session,
            options={**claude.OPTIONS, **fake.options()},
            now=lambda: int(time.time() * 1000),
            log=logging.getLogger("test"),
        )


def sample(turn: int) -> ProxyRequest:
    raw = json.loads((DATA / f"opencode-1.18.33-anthropic-messages-turn{turn}.json").read_text())
    headers = {k: v for k, v in raw["headers"].items() if k not in ("connection",)}
    return ProxyRequest(endpoint="messages", headers=headers, query="", body=raw["body"], api_key_id="key1")


def request(body: dict, headers: dict | None = None, query: str = "") -> ProxyRequest:
    return ProxyRequest(endpoint="messages", headers=headers or {}, query=query, body=body, api_key_id="key1")


def account(
    access: str = "sk-ant-oat01-x",
    refresh: str = "sk-ant-ort01-x",
    account_id: str | None = "acc",
    metadata: dict | None = None,
) -> Account:
    return Account(
        id="a1",
        label="claude",
        account_id=account_id,
        access_token=access,
        refresh_token=refresh,
        expires_at=0,
        metadata=metadata or {"mode": "max"},
    )


def run(stream: claude.ClaudeStream, chunks: list[bytes]) -> bytes:
    out = b"".join(stream.feed(chunk) for chunk in chunks)
    return out + stream.close()


def compact(value) -> bytes:
    return orjson.dumps(value)  # what the adapter writes: compact JSON, UTF-8


# ── Contract ─────────────────────────────────────────────────────────────────


def test_module_meets_the_contract():
    assert claude.CONTRACT == providers.API
    for name in providers.REQUIRED_FUNCTIONS:
        assert callable(getattr(claude, name)), name
    for name in providers.REQUIRED_CONSTANTS:
        assert hasattr(claude, name), name
    assert claude.ROUTES == {
        "/anthropic/v1/messages": "messages",
        "/anthropic/v1/messages/count_tokens": "count_tokens",
    }
    assert callable(claude.retry_after) and callable(claude.quota) and callable(claude.list_models)
    assert claude.OPTIONS["beta_headers"] == BETAS.split(",")
    # The authorize URLs are opened by the user's browser, never fetched, so they need not end in _url.
    assert set(providers.option_urls(claude.OPTIONS)) == {"api_url", "token_url", "usage_url", "profile_url"}


# ── Login ────────────────────────────────────────────────────────────────────


async def test_start_login_builds_the_authorize_url(ctx, fake):
    login = await claude.start_login(ctx, "state-1", {"mode": "max"})
    url = urlsplit(login.url)
    assert f"{url.scheme}://{url.netloc}{url.path}" == fake.url + "/oauth/authorize"
    query = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert query == {
        "code": "true",
        "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "response_type": "code",
        "redirect_uri": "https://console.anthropic.com/oauth/code/callback",
        "scope": "org:create_api_key user:profile user:inference",
        "code_challenge": challenge_of(login.data["verifier"]),
        "code_challenge_method": "S256",
        "state": "state-1",
    }
    assert login.method == "code"
    assert login.data["mode"] == "max"
    assert "code#state" in login.instructions
    assert login.expires_in == 900


async def test_start_login_modes(ctx):
    real = {**ctx.options, **{k: v for k, v in claude.OPTIONS.items() if k.startswith("authorize_url")}}
    real_ctx = Context(http=ctx.http, options=real, now=ctx.now, log=ctx.log)
    console = await claude.start_login(real_ctx, "s", {"mode": "console"})
    assert console.url.startswith("https://console.anthropic.com/oauth/authorize?")
    assert console.data["mode"] == "console"
    for options in ({}, {"mode": "pro"}, None):
        login = await claude.start_login(real_ctx, "s", options)
        assert login.url.startswith("https://claude.ai/oauth/authorize?")
        assert login.data["mode"] == "max"


async def approve(ctx, login) -> str:
    """What the user would copy from Anthropic's page: `code#state`."""
    async with ctx.http.get(login.url) as resp:
        assert resp.status == 200
        return await resp.text()


@pytest.mark.parametrize("form", ["code#state", "code", "callback"])
async def test_finish_login_accepts_every_pasted_form(ctx, fake, form):
    login = await claude.start_login(ctx, "state-2", {})
    pasted = await approve(ctx, login)
    code = pasted.partition("#")[0]
    value = {
        "code#state": pasted,
        "code": code,
        "callback": f"https://console.anthropic.com/oauth/code/callback?code={code}&state=state-2",
    }[form]
    tokens = await claude.finish_login(ctx, "state-2", login.data, value)
    assert fake.calls("/v1/oauth/token")[-1].json == {
        "code": code,
        "state": "state-2",
        "grant_type": "authorization_code",
        "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "redirect_uri": "https://console.anthropic.com/oauth/code/callback",
        "code_verifier": login.data["verifier"],
    }
    assert tokens.access_token in fake.access_tokens
    assert tokens.refresh_token in fake.refresh_tokens
    assert tokens.account_id == DEFAULT_UUID
    assert tokens.label == DEFAULT_EMAIL
    assert tokens.metadata == {"mode": "max", "email": DEFAULT_EMAIL, "organization": "Example Org"}
    assert abs(tokens.expires_at - (int(time.time() * 1000) + 3_600_000)) < 5_000
    assert "sk-ant" not in repr(tokens)


async def test_finish_login_state_mismatch(ctx, fake):
    login = await claude.start_login(ctx, "state-3", {})
    code = (await approve(ctx, login)).partition("#")[0]
    with pytest.raises(LoginFailed, match="state mismatch"):
        await claude.finish_login(ctx, "state-3", login.data, f"{code}#other-state")
    with pytest.raises(LoginFailed, match="state mismatch"):
        await claude.finish_login(ctx, "state-3", login.data, f"https://x.test/cb?code={code}&state=nope")
    assert fake.calls("/v1/oauth/token") == []


async def test_finish_login_rejects_bad_codes(ctx, fake):
    login = await claude.start_login(ctx, "state-4", {"mode": "console"})
    with pytest.raises(LoginFailed, match=r"refused \(invalid_grant\)"):
        await claude.finish_login(ctx, "state-4", login.data, "no-such-code#state-4")
    code = fake.issue_code(challenge_of("another-verifier"))
    with pytest.raises(LoginFailed, match="invalid_grant"):
        await claude.finish_login(ctx, "state-4", login.data, code)
    with pytest.raises(LoginFailed, match="empty"):
        await claude.finish_login(ctx, "state-4", login.data, "  ")


async def test_finish_login_without_account_uses_mode_label_and_fingerprint(ctx, fake):
    fake.include_account = False
    login = await claude.start_login(ctx, "state-5", {"mode": "console"})
    tokens = await claude.finish_login(ctx, "state-5", login.data, await approve(ctx, login))
    assert tokens.label == "claude-console"
    assert tokens.account_id == providers.token_fingerprint(tokens.refresh_token)
    assert tokens.account_id.startswith("rt:") and len(tokens.account_id) == 27
    assert tokens.metadata == {"mode": "console"}


async def test_poll_login_is_not_supported(ctx):
    with pytest.raises(LoginFailed, match="pasted code"):
        await claude.poll_login(ctx, {})


# ── Refresh ──────────────────────────────────────────────────────────────────


async def test_refresh_rotates_and_reuse_needs_reauth(ctx, fake):
    grant = fake.grant()
    old = account(grant["access_token"], grant["refresh_token"], account_id=grant["account_id"])
    tokens = await claude.refresh(ctx, old)
    assert fake.calls("/v1/oauth/token")[-1].json == {
        "grant_type": "refresh_token",
        "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
        "refresh_token": grant["refresh_token"],
    }
    assert tokens.refresh_token != grant["refresh_token"]
    assert tokens.access_token != grant["access_token"]
    assert tokens.account_id == DEFAULT_UUID
    assert tokens.label is None
    assert tokens.metadata == {"mode": "max", "email": DEFAULT_EMAIL, "organization": "Example Org"}
    with pytest.raises(ReauthRequired, match="invalid_grant"):
        await claude.refresh(ctx, old)
    assert fake.refresh_calls == 2


async def test_refresh_keeps_refresh_token_and_account_id_when_absent(ctx, fake):
    fake.rotate_refresh = False
    fake.include_account = False
    grant = fake.grant()
    old = account(
        grant["access_token"], grant["refresh_token"], account_id="rt:abc", metadata={"mode": "console"}
    )
    tokens = await claude.refresh(ctx, old)
    assert tokens.refresh_token == grant["refresh_token"]
    assert tokens.access_token != grant["access_token"]
    assert tokens.account_id == "rt:abc"
    assert tokens.metadata == {"mode": "console"}


# ── Import ───────────────────────────────────────────────────────────────────


def test_import_claude_code_credentials(ctx):
    content = (DATA / "claude-code-credentials.json").read_text()
    [tokens] = claude.import_auth(ctx, content)
    assert tokens.access_token == "sk-ant-oat01-fake-import-access"
    assert tokens.refresh_token == "sk-ant-ort01-fake-import-refresh"
    assert tokens.expires_at == 1893456000000
    assert tokens.account_id == providers.token_fingerprint("sk-ant-ort01-fake-import-refresh")
    assert tokens.label == "claude-max"
    assert tokens.metadata == {"mode": "max", "source": "claude-code", "plan": "max"}
    again = claude.import_auth(ctx, json.loads(content))
    assert again[0].account_id == tokens.account_id


def test_import_opencode_auth(ctx):
    [tokens] = claude.import_auth(ctx, json.loads((DATA / "claude-opencode-auth.json").read_text()))
    assert tokens.access_token == "sk-ant-oat01-fake-opencode-access"
    assert tokens.refresh_token == "sk-ant-ort01-fake-opencode-refresh"
    assert tokens.expires_at == 1893456000000
    assert tokens.account_id == providers.token_fingerprint("sk-ant-ort01-fake-opencode-refresh")
    assert tokens.label == "claude-opencode"


def test_import_both_formats_and_seconds_expiry(ctx):
    content = {
        "claudeAiOauth": {"accessToken": "a1", "refreshToken": "r1", "expiresAt": 1893456000},
        "anthropic": {"type": "oauth", "access": "a2", "refresh": "r2", "expires": 1893456000000},
    }
    first, second = claude.import_auth(ctx, content)
    assert (first.refresh_token, first.expires_at, first.label) == ("r1", 1893456000000, "claude-code")
    assert (second.refresh_token, second.account_id) == ("r2", providers.token_fingerprint("r2"))


@pytest.mark.parametrize(
    "content",
    [
        {},
        {"anthropic": {"type": "api", "key": "sk-ant-api"}},
        {"claudeAiOauth": {"accessToken": "a"}},
        "not json",
        "[1, 2]",
        {"openai": {"type": "oauth", "access": "a", "refresh": "r", "expires": 1893456000000}},
    ],
)
def test_import_nothing_usable(ctx, content):
    with pytest.raises(LoginFailed, match=r"\.credentials\.json"):
        claude.import_auth(ctx, content)


# ── Session key ──────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("body", "headers", "key"),
    [
        (
            {"metadata": {"user_id": "user_abc123_account_1111-22_session_9f8e-77"}},
            {"x-session-id": "h"},
            "9f8e-77",
        ),
        ({"metadata": {"user_id": "plain-user"}}, {}, "plain-user"),
        ({"metadata": {"user_id": '{"device_id":"d","session_id":"s-json"}'}}, {}, "s-json"),
        ({}, {"x-session-id": "ses_1", "x-session-affinity": "ses_2"}, "ses_1"),
        ({"metadata": {"user_id": "  "}}, {"x-session-affinity": "ses_2"}, "ses_2"),
        ({}, {}, None),
    ],
)
def test_session_key(body, headers, key):
    assert claude.session_key(request(body, headers)) == key


def test_session_key_of_the_opencode_sample():
    assert claude.session_key(sample(1)) == "ses_de1a27cf6ffeim4dV4UKcBOUr8"


# ── prepare ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("turn", [1, 2])
def test_prepare_opencode_sample(ctx, fake, turn):
    req = sample(turn)
    before = copy.deepcopy(req.body)
    up = claude.prepare(ctx, account("tok-1"), req)
    assert req.body == before
    assert up.url == fake.url + "/v1/messages?beta=true"
    assert up.headers == {
        "content-type": "application/json",
        "accept": "*/*",
        "x-session-affinity": "ses_de1a27cf6ffeim4dV4UKcBOUr8",
        "x-session-id": "ses_de1a27cf6ffeim4dV4UKcBOUr8",
        "authorization": "Bearer tok-1",
        "anthropic-beta": BETAS + ",structured-outputs-2025-11-13",
        "anthropic-version": "2023-06-01",
        "user-agent": "claude-cli/2.1.2 (external, cli)",
        "x-app": "cli",
    }
    body = json.loads(up.body)
    assert up.body == orjson.dumps(body)

    system = body["system"]
    assert system[0] == {"type": "text", "text": IDENTITY}
    assert len(system) == 2
    assert system[1]["cache_control"] == {"type": "ephemeral"}
    text = system[1]["text"]
    original = before["system"][0]["text"]
    assert "\n  https://github.com/anomalyco/project\n" in text
    assert "anomalyco/opencode" not in text
    assert "Here is useful information about the environment you are running in:\n<env>\n" in text
    assert "Here is some useful information about the environment" not in text
    expected = original.replace(
        "  https://github.com/anomalyco/opencode\n", "  https://github.com/anomalyco/project\n"
    ).replace(
        "Here is some useful information about the environment",
        "Here is useful information about the environment",
    )
    assert text == expected

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
    for shaped, orig in zip(body["tools"], before["tools"], strict=True):
        assert {k: v for k, v in shaped.items() if k != "name"} == {
            k: v for k, v in orig.items() if k != "name"
        }
    assert body["tool_choice"] == {"type": "auto"}
    assert {k: v for k, v in body.items() if k not in ("system", "tools", "messages")} == {
        k: v for k, v in before.items() if k not in ("system", "tools", "messages")
    }
    if turn == 1:
        assert body["messages"] == before["messages"]
    else:
        thinking, tool_use = body["messages"][1]["content"]
        assert thinking == before["messages"][1]["content"][0]
        assert thinking["signature"] == "fake-signature-msg_15635a9347674478a2ccbb95"
        assert json.dumps(thinking["thinking"]).encode() in up.body
        assert tool_use == {**before["messages"][1]["content"][1], "name": "mcp_Glob"}
        assert body["messages"][0] == before["messages"][0]
        assert body["messages"][2] == before["messages"][2]


def test_prepare_headers_and_query(ctx, fake):
    req = request(
        {"model": "m", "messages": []},
        {
            "authorization": "Bearer kleis_x",
            "x-api-key": "kleis_y",
            "accept-encoding": "zstd",
            "content-encoding": "zstd",
            "content-length": "12",
            "anthropic-beta": "custom-beta, oauth-2025-04-20,,other-beta",
            "anthropic-version": "2026-10-21",
            "user-agent": "Anthropic/Python",
            "x-stainless-lang": "python",
        },
        query="foo=1",
    )
    up = claude.prepare(ctx, account("tok-2"), req)
    assert up.url == fake.url + "/v1/messages?foo=1&beta=true"
    assert up.headers == {
        "x-stainless-lang": "python",
        "authorization": "Bearer tok-2",
        "anthropic-beta": BETAS + ",custom-beta,other-beta",
        "anthropic-version": "2026-10-21",
        "user-agent": "claude-cli/2.1.2 (external, cli)",
        "x-app": "cli",
        "content-type": "application/json",
    }
    assert "system" not in json.loads(up.body)
    kept = claude.prepare(ctx, account(), request({"model": "m"}, query="beta=false&x=1"))
    assert kept.url == fake.url + "/v1/messages?beta=false&x=1"


# §9 Claude cases: exact sanitised outputs and the identity block.


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        (
            "You are a helpful bot.",
            [{"type": "text", "text": IDENTITY}, {"type": "text", "text": "You are a helpful bot."}],
        ),
        (IDENTITY, [{"type": "text", "text": IDENTITY}]),
        ("", [{"type": "text", "text": IDENTITY}]),
        (
            "Report at\n    https://github.com/anomalyco/opencode\nthanks",
            [
                {"type": "text", "text": IDENTITY},
                {"type": "text", "text": "Report at\n    https://github.com/anomalyco/project\nthanks"},
            ],
        ),
        (
            "See https://github.com/anomalyco/opencode for more.\nHTTPS://GITHUB.COM/ANOMALYCO/OPENCODE",
            [
                {"type": "text", "text": IDENTITY},
                {
                    "type": "text",
                    "text": "See https://github.com/anomalyco/opencode for more.\nhttps://github.com/anomalyco/project",
                },
            ],
        ),
        (
            "<env>\n  x\n</env>\n<directories>\n   /a\n  /b\n</directories>\n"
            "<DIRECTORIES>\r\n\t/c\n<directories> /d",
            [
                {"type": "text", "text": IDENTITY},
                {
                    "type": "text",
                    "text": "<env>\n  x\n</env>\nDirectories\n/a\n  /b\n</directories>\n"
                    "Directories\n/c\n<directories> /d",
                },
            ],
        ),
        (
            '<project><file name="a">keep me</file></project>',
            [
                {"type": "text", "text": IDENTITY},
                {"type": "text", "text": '<project><file name="a">keep me</file></project>'},
            ],
        ),
    ],
)
def test_system_string_form(ctx, system, expected):
    up = claude.prepare(ctx, account(), request({"model": "m", "system": system}))
    assert json.loads(up.body)["system"] == expected


def test_system_array_form(ctx):
    system = [
        {
            "type": "text",
            "text": "Here is some useful information about the environment you are running in:",
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "image", "source": {"type": "base64", "data": "x"}},
        {"type": "text", "text": "plain"},
    ]
    up = claude.prepare(ctx, account(), request({"model": "m", "system": system}))
    assert json.loads(up.body)["system"] == [
        {"type": "text", "text": IDENTITY},
        {
            "type": "text",
            "text": "Here is useful information about the environment you are running in:",
            "cache_control": {"type": "ephemeral"},
        },
        {"type": "image", "source": {"type": "base64", "data": "x"}},
        {"type": "text", "text": "plain"},
    ]
    claude_code = [
        {"type": "text", "text": IDENTITY, "cache_control": {"type": "ephemeral"}},
        {"type": "text", "text": "more"},
    ]
    up = claude.prepare(ctx, account(), request({"model": "m", "system": claude_code}))
    assert json.loads(up.body)["system"] == claude_code


def test_tool_names_are_prefixed(ctx):
    body = {
        "model": "m",
        "tools": [
            {"name": "shell", "input_schema": {}},
            {"name": "Shell2"},
            {"name": "mcp_existing"},
            {"type": "custom", "name": "read"},
            {"type": "web_search_20250305", "name": "web_search"},
        ],
        "tool_choice": {"type": "tool", "name": "shell"},
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "x", "name": "shell"},
                    {"type": "tool_use", "id": "t1", "name": "shell", "input": {"name": "shell"}},
                    {"type": "tool_use", "id": "t2", "name": "mcp_existing", "input": {}},
                    {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
                ],
            },
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "ok"}]},
        ],
        "metadata": {"name": "shell"},
    }
    before = copy.deepcopy(body)
    shaped = json.loads(claude.prepare(ctx, account(), request(body)).body)
    assert body == before
    assert [t["name"] for t in shaped["tools"]] == [
        "mcp_Shell",
        "mcp_Shell2",
        "mcp_existing",
        "mcp_Read",
        "web_search",
    ]
    assert shaped["tool_choice"] == {"type": "tool", "name": "mcp_Shell"}
    assert shaped["messages"][1]["content"] == [
        {"type": "text", "text": "x", "name": "shell"},
        {"type": "tool_use", "id": "t1", "name": "mcp_Shell", "input": {"name": "shell"}},
        {"type": "tool_use", "id": "t2", "name": "mcp_existing", "input": {}},
        {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
    ]
    assert shaped["messages"][0] == before["messages"][0]
    assert shaped["messages"][2] == before["messages"][2]
    assert shaped["metadata"] == {"name": "shell"}
    auto = json.loads(
        claude.prepare(ctx, account(), request({"model": "m", "tool_choice": {"type": "any"}})).body
    )
    assert auto["tool_choice"] == {"type": "any"}


def test_restore_map_keeps_client_spelling():
    body = {
        "tools": [
            {"name": "Shell"},
            {"name": "bash"},
            {"name": "Bash"},
            {"name": "mcp_own"},
            {"type": "bash_20250124", "name": "computer_bash"},
        ],
        "messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "old_tool"}]}],
    }
    names = claude.tool_names(body, "mcp_")
    assert names.upstream == {
        "computer_bash": "computer_bash",
        "Shell": "mcp_Shell",
        "Bash": "mcp_Bash",
        "bash": suffixed("mcp_Bash", "bash"),
        "mcp_own": "mcp_own",
        "old_tool": "mcp_Old_tool",
    }
    assert {up: names.to_client(up) for up in names.upstream.values()} == {
        up: client for client, up in names.upstream.items()
    }
    assert names.to_client("mcp_Invented") == "Invented"  # a name the request never had
    assert names.to_client("mcp_") == "mcp_" and names.to_client("other") == "other"


# ── Tool names: one to one, within Anthropic's limits ────────────────────────

VALID_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


def suffixed(base: str, client_name: str) -> str:
    """What a name that lost its preferred form becomes: base cut to fit, `_`, 8 hex digits."""
    return f"{base[:119]}_{hashlib.sha256(client_name.encode()).hexdigest()[:8]}"


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        # prior art for ordinary names
        (
            ["shell", "Glob", "mcp_own", "_x", "9lives"],
            ["mcp_Shell", "mcp_Glob", "mcp_own", "mcp__x", "mcp_9lives"],
        ),
        # the same name in two cases: the one already in PascalCase keeps mcp_Read
        (["read", "Read"], [suffixed("mcp_Read", "read"), "mcp_Read"]),
        (["Read", "read"], ["mcp_Read", suffixed("mcp_Read", "read")]),
        # a client name that already is an upstream name keeps it
        (["Read", "mcp_Read"], [suffixed("mcp_Read", "Read"), "mcp_Read"]),
        (
            ["shell", "Shell", "mcp_Shell"],
            [suffixed("mcp_Shell", "shell"), suffixed("mcp_Shell", "Shell"), "mcp_Shell"],
        ),
        # too long once prefixed (Anthropic allows 128 characters)
        (
            ["a" * 124, "b" * 125, "c" * 128],
            [
                "mcp_A" + "a" * 123,
                suffixed("mcp_B" + "b" * 124, "b" * 125),
                suffixed("mcp_C" + "c" * 127, "c" * 128),
            ],
        ),
        # characters Anthropic refuses
        (
            ["my.tool", "ns:tool", "wß"],
            [
                suffixed("mcp_My_tool", "my.tool"),
                suffixed("mcp_Ns_tool", "ns:tool"),
                suffixed("mcp_W_", "wß"),
            ],
        ),
    ],
)
def test_tool_names_are_one_to_one_and_valid(names, expected):
    mapping = claude.ToolNames(names, "mcp_")
    assert [mapping.upstream[n] for n in names] == expected
    assert all(VALID_NAME.match(up) for up in expected)
    assert len(set(expected)) == len(names)  # one to one
    assert [mapping.to_client(up) for up in expected] == names
    # the same names in another order (a later turn) map the same way
    assert claude.ToolNames(list(reversed(names)), "mcp_").upstream == mapping.upstream


def test_tool_names_never_take_a_server_tools_name():
    mapping = claude.ToolNames(["web_search", "x"], "", fixed={"web_search"})
    assert mapping.upstream == {"web_search": "web_search", "x": "x"}
    clash = claude.ToolNames(["web_search", "Web_search"], "", fixed={"Web_search"})
    assert clash.upstream["web_search"] == "web_search"
    taken = claude.ToolNames(["tool"], "mcp_", fixed={"mcp_Tool"})
    assert taken.upstream["tool"] == suffixed("mcp_Tool", "tool")


def test_every_place_a_tool_name_appears_is_mapped(ctx):
    body = {
        "model": "m",
        "tools": [
            {"name": "read", "input_schema": {}},
            {"name": "Read", "input_schema": {}, "defer_loading": True},
            {"type": "web_search_20250305", "name": "web_search"},
            {"type": "bash_20250124", "name": "bash"},
        ],
        "tool_choice": {"type": "tool", "name": "read"},
        "context_management": {
            "edits": [
                {"type": "clear_tool_uses_20250919", "exclude_tools": ["Read", "web_search"]},
                {"type": "clear_thinking_20251015", "keep": "all"},
            ]
        },
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "read", "input": {"name": "read"}},
                    {"type": "tool_use", "id": "t2", "name": "Read", "input": {}},
                    {"type": "tool_use", "id": "t3", "name": "bash", "input": {}},
                    {"type": "server_tool_use", "id": "s1", "name": "web_search", "input": {}},
                    {
                        "type": "tool_search_tool_result",
                        "tool_use_id": "s2",
                        "content": {
                            "type": "tool_search_tool_search_result",
                            "tool_references": [{"type": "tool_reference", "tool_name": "Read"}],
                        },
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "t1",
                        "content": [
                            {"type": "tool_reference", "tool_name": "Read"},
                            {"type": "tool_reference", "tool_name": "read"},
                            {"type": "text", "text": "Read"},
                        ],
                    },
                    {"type": "tool_result", "tool_use_id": "t2", "content": "plain"},
                ],
            },
        ],
    }
    before = copy.deepcopy(body)
    shaped = json.loads(claude.prepare(ctx, account(), request(body)).body)
    assert body == before
    low = suffixed("mcp_Read", "read")
    assert [t["name"] for t in shaped["tools"]] == [low, "mcp_Read", "web_search", "bash"]
    assert shaped["tools"][1]["defer_loading"] is True
    assert shaped["tool_choice"] == {"type": "tool", "name": low}
    assert shaped["context_management"]["edits"] == [
        {"type": "clear_tool_uses_20250919", "exclude_tools": ["mcp_Read", "web_search"]},
        {"type": "clear_thinking_20251015", "keep": "all"},
    ]
    assistant = shaped["messages"][1]["content"]
    assert [b.get("name") for b in assistant[:4]] == [low, "mcp_Read", "bash", "web_search"]
    assert assistant[0]["input"] == {"name": "read"}  # tool input is the client's business
    assert assistant[4]["content"]["tool_references"] == [{"type": "tool_reference", "tool_name": "mcp_Read"}]
    result = shaped["messages"][2]["content"]
    assert result[0]["content"] == [
        {"type": "tool_reference", "tool_name": "mcp_Read"},
        {"type": "tool_reference", "tool_name": low},
        {"type": "text", "text": "Read"},
    ]
    assert result[1] == before["messages"][2]["content"][1]
    assert shaped["messages"][0] == before["messages"][0]


def test_a_body_without_tool_names_is_not_copied():
    body = {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}
    assert claude.rename_tools(body, lambda name: "mcp_" + name) == {}
    shaped = claude.shape_body(body, IDENTITY, "mcp_")
    assert shaped["messages"] is body["messages"]


# ── Transformer ──────────────────────────────────────────────────────────────


TOOLS_BODY = {
    "model": "m",
    "stream": True,
    "tools": [{"name": "Shell"}, {"name": "bash"}, {"name": "mcp_own"}],
    "messages": [],
}


def transformer(ctx, body=None, content_type="text/event-stream", status=200):
    return claude.transformer(ctx, request(body or TOOLS_BODY), status, {"Content-Type": content_type})


def tool_start(name: str, index: int = 1, crlf: bool = False, event: bool = True) -> tuple[bytes, bytes]:
    """A content_block_start for a tool_use (as upstream sends it, and as the client must get it)."""
    payload = {
        "type": "content_block_start",
        "index": index,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": name, "input": {}},
    }
    return payload, sse(payload, event="content_block_start" if event else None, crlf=crlf)


def restored(payload: dict, name: str, crlf: bool = False, event: bool = True) -> bytes:
    nl = b"\r\n" if crlf else b"\n"
    new = copy.deepcopy(payload)
    new["content_block"]["name"] = name
    head = b"event: content_block_start" + nl if event else b""
    return head + b"data: " + compact(new) + nl + nl


@pytest.mark.parametrize(
    ("upstream", "client"),
    [("mcp_Shell", "Shell"), ("mcp_Bash", "bash"), ("mcp_own", "mcp_own"), ("mcp_Unknown", "Unknown")],
)
def test_sse_restores_exact_client_names(ctx, upstream, client):
    payload, event = tool_start(upstream)
    out = run(transformer(ctx), [event])
    assert out == (event if upstream == "mcp_own" else restored(payload, client))


COLLIDING_BODY = {
    "model": "m",
    "stream": True,
    "tools": [{"name": "read"}, {"name": "Read"}, {"name": "x" * 128}],
    "messages": [],
}


@pytest.mark.parametrize(
    ("upstream", "client"),
    [
        (suffixed("mcp_Read", "read"), "read"),
        ("mcp_Read", "Read"),
        (suffixed("mcp_X" + "x" * 127, "x" * 128), "x" * 128),
    ],
)
def test_sse_restores_each_of_two_colliding_names(ctx, upstream, client):
    payload, event = tool_start(upstream)
    out = run(transformer(ctx, COLLIDING_BODY), [event])
    assert out == restored(payload, client)


def test_tool_references_coming_down_get_the_clients_names(ctx):
    block = {
        "type": "tool_search_tool_result",
        "tool_use_id": "srvtoolu_1",
        "content": {
            "type": "tool_search_tool_search_result",
            "tool_references": [
                {"type": "tool_reference", "tool_name": "mcp_Read"},
                {"type": "tool_reference", "tool_name": suffixed("mcp_Read", "read")},
            ],
        },
    }
    event = sse({"type": "content_block_start", "index": 2, "content_block": block}, "content_block_start")
    out = run(transformer(ctx, COLLIDING_BODY), [event])
    names = [
        r["tool_name"]
        for r in json.loads(out.split(b"data: ", 1)[1])["content_block"]["content"]["tool_references"]
    ]
    assert names == ["Read", "read"]
    body = {"type": "message", "content": [block], "usage": {"input_tokens": 3, "output_tokens": 1}}
    stream = transformer(ctx, {**COLLIDING_BODY, "stream": False}, content_type="application/json")
    stream.feed(json.dumps(body).encode())
    restored_body = json.loads(stream.close())
    assert [r["tool_name"] for r in restored_body["content"][0]["content"]["tool_references"]] == [
        "Read",
        "read",
    ]


def test_sse_builds_the_name_map_only_for_an_event_with_a_tool_name(ctx):
    built = []

    def names():
        built.append(1)
        return claude.tool_names(TOOLS_BODY, "mcp_")

    stream = claude.ClaudeStream("sse", names, "mcp_")
    plain = FakeClaude.stream_reply("mcp_Shell is a fine name").events
    assert run(stream, plain) == b"".join(plain)
    assert built == []
    _, event = tool_start("mcp_Shell")
    stream = claude.ClaudeStream("sse", names, "mcp_")
    stream.feed(event + event)
    assert built == [1]  # once per response


def full_stream(crlf: bool = False) -> tuple[list[bytes], list[bytes]]:
    """The events of a stream with a text block and a mcp_Shell call, and what the client must
    receive for each."""
    reply = FakeClaude.stream_reply(
        "Listing files.",
        tool_use=("mcp_Shell", {"command": "ls -la"}),
        usage={"input": 100, "output": 42, "cache_read": 20, "cache_write": 5},
        crlf=crlf,
    )
    expected = []
    for event in reply.events:
        if b'"tool_use"' in event and b"content_block_start" in event:
            event = restored(json.loads(event.split(b"data: ", 1)[1]), "Shell", crlf=crlf)
        expected.append(event)
    assert expected != reply.events
    return reply.events, expected


@pytest.mark.parametrize("crlf", [False, True])
def test_sse_split_at_every_offset_matches_unsplit(ctx, crlf):
    events, expected_events = full_stream(crlf)
    upstream, expected = b"".join(events), b"".join(expected_events)
    whole = transformer(ctx)
    assert run(whole, [upstream]) == expected
    assert whole.usage == Usage(
        input_tokens=100, output_tokens=42, cache_read_tokens=20, cache_write_tokens=5
    )
    assert whole.terminal and whole.at_boundary
    ends = [sum(len(e) for e in events[:i]) for i in range(len(events) + 1)]
    for offset in range(len(upstream) + 1):
        stream = transformer(ctx)
        first = stream.feed(upstream[:offset])
        complete = max(i for i, end in enumerate(ends) if end <= offset)
        assert first == b"".join(expected_events[:complete]), offset
        assert stream.at_boundary, offset  # only whole events are ever emitted
        assert first + stream.feed(upstream[offset:]) + stream.close() == expected, offset
        assert stream.usage.output_tokens == 42 and stream.terminal
    byte_by_byte = transformer(ctx)
    assert run(byte_by_byte, [upstream[i : i + 1] for i in range(len(upstream))]) == expected


def test_sse_emits_each_event_once_complete_and_tracks_boundaries(ctx):
    payload, event = tool_start("mcp_Shell")
    ping = b'event: ping\ndata: {"type": "ping"}\n\n'
    stream = transformer(ctx)
    assert stream.feed(ping + event[:10]) == ping
    assert stream.at_boundary  # the half event is held back, so what went out ends on a boundary
    assert stream.feed(event[10:]) == restored(payload, "Shell")
    assert stream.at_boundary
    assert stream.feed(ping + ping + ping) == ping * 3
    assert stream.at_boundary and not stream.terminal


def test_sse_mixed_terminators_and_other_lines_preserved(ctx):
    payload = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "tool_use", "id": "t", "name": "mcp_Bash", "input": {}},
    }
    data = json.dumps(payload).encode()
    upstream = [
        b": comment\r\n\r\n",
        b"event: content_block_start\r\nid: 7\ndata: " + data + b"\n\r\n",
        b'data: {"type": "content_block_delta", "index": 0}\r\n\n',
        b"event: content_block_start\ndata: " + data[:40] + b"\ndata: " + data[40:] + b"\r\n\r\n",
        b'event: message_stop\r\ndata: {"type": "message_stop"}\r\n\r\n',
    ]
    new = compact({**payload, "content_block": {**payload["content_block"], "name": "bash"}})
    expected = [
        upstream[0],
        b"event: content_block_start\r\nid: 7\ndata: " + new + b"\n\r\n",
        upstream[2],
        b"event: content_block_start\ndata: " + new + b"\r\n\r\n",
        upstream[4],
    ]
    stream = transformer(ctx)
    assert run(stream, [b"".join(upstream)]) == b"".join(expected)
    assert stream.terminal
    for offset in range(len(b"".join(upstream))):
        joined = b"".join(upstream)
        assert run(transformer(ctx), [joined[:offset], joined[offset:]]) == b"".join(expected)


def test_sse_leaves_non_tool_events_byte_identical(ctx):
    events = [
        sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": "mcp_Shell"},
            }
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": '{"type": "tool_use", "name": "mcp_Shell"}'},
            }
        ),
        sse(
            {
                "type": "content_block_start",
                "index": 1,
                "content_block": {"type": "status", "name": "mcp_shell"},
            }
        ),
        sse(
            {
                "type": "content_block_delta",
                "index": 1,
                "delta": {
                    "type": "input_json_delta",
                    "partial_json": '{"name": "mcp_Shell", "type": "tool_use"}',
                },
            }
        ),
        b"data: [DONE]\n\n",
        b'data: {not json "tool_use" "mcp_x\n\n',
    ]
    stream = transformer(ctx)
    assert run(stream, events) == b"".join(events)
    assert not stream.terminal
    assert stream.usage == Usage()


def test_sse_usage_from_message_start_and_delta(ctx):
    start = {
        "type": "message_start",
        "message": {
            "type": "message",
            "usage": {
                "input_tokens": 120,
                "output_tokens": 1,
                "cache_read_input_tokens": 30,
                "cache_creation_input_tokens": 7,
            },
        },
    }
    delta1 = {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 10}}
    delta2 = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {
            "output_tokens": 55,
            "input_tokens": None,
            "cache_read_input_tokens": 31,
            "cache_creation_input_tokens": "x",
        },
    }
    stream = transformer(ctx)
    out = run(
        stream,
        [
            sse(start, "message_start")[:17],
            sse(start, "message_start")[17:] + sse(delta1),
            sse(delta2, "message_delta"),
            sse({"type": "message_stop"}, "message_stop"),
        ],
    )
    assert stream.usage == Usage(
        input_tokens=120, output_tokens=55, cache_read_tokens=31, cache_write_tokens=0
    )
    assert stream.terminal
    assert out == sse(start, "message_start") + sse(delta1) + sse(delta2, "message_delta") + sse(
        {"type": "message_stop"}, "message_stop"
    )


def test_sse_terminal_detection(ctx):
    stream = transformer(ctx)
    run(stream, FakeClaude.stream_reply().events[:-1])
    assert not stream.terminal
    stream = transformer(ctx)
    run(stream, FakeClaude.stream_reply().events)
    assert stream.terminal
    error = sse({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error")
    stream = transformer(ctx)
    assert run(stream, [error]) == error
    assert stream.terminal


def test_sse_tail_at_eof(ctx):
    stream = transformer(ctx)
    assert stream.feed(b'data: {"type": "message_stop"}') == b""
    assert stream.at_boundary
    assert stream.close() == b'data: {"type": "message_stop"}\n\n'
    assert stream.terminal and stream.at_boundary
    payload, event = tool_start("mcp_Shell", crlf=True)
    stream = transformer(ctx)
    assert stream.feed(event[:-2]) == b""
    assert stream.close() == restored(payload, "Shell", crlf=True)
    cut = transformer(ctx)
    assert cut.feed(b'data: {"type": "content_bl') == b""
    assert cut.close() == b""
    assert not cut.terminal and cut.at_boundary


def test_error_event_is_valid(ctx):
    stream = transformer(ctx)
    event = stream.error_event('upstream "broke" off')
    assert event == (
        b'event: error\ndata: {"type":"error","error":{"type":"api_error",'
        b'"message":"upstream \\"broke\\" off"}}\n\n'
    )
    assert json.loads(event.split(b"data: ", 1)[1]) == {
        "type": "error",
        "error": {"type": "api_error", "message": 'upstream "broke" off'},
    }


def test_json_response_restores_names_and_reads_usage(ctx):
    body = {
        "id": "msg_1",
        "type": "message",
        "content": [
            {"type": "text", "text": "mcp_Shell"},
            {
                "type": "tool_use",
                "id": "t1",
                "name": "mcp_Shell",
                "input": {"nested": {"type": "tool_use", "name": "mcp_Bash"}},
            },
            {"type": "status", "name": "mcp_shell"},
        ],
        "usage": {
            "input_tokens": 33,
            "output_tokens": 8,
            "cache_read_input_tokens": 4,
            "cache_creation_input_tokens": 2,
        },
    }
    raw = json.dumps(body, indent=2).encode()
    stream = transformer(ctx, content_type="application/json")
    assert not stream.is_sse
    assert stream.feed(raw[:50]) == b"" and stream.feed(raw[50:]) == b""
    out = stream.close()
    expected = copy.deepcopy(body)
    expected["content"][1]["name"] = "Shell"  # the tool's input is the model's data: left alone
    assert json.loads(out) == expected
    assert stream.usage == Usage(input_tokens=33, output_tokens=8, cache_read_tokens=4, cache_write_tokens=2)
    assert stream.terminal


def test_json_response_unchanged_or_unparseable_is_relayed_verbatim(ctx):
    error = json.dumps(
        {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}, indent=1
    ).encode()
    stream = transformer(ctx, content_type="application/json", status=400)
    stream.feed(error)
    assert stream.close() == error
    broken = b'{"type": "message", "content": [{"type": "tool_use", "name": "mcp_Shell"'
    stream = transformer(ctx, content_type="application/json; charset=utf-8")
    stream.feed(broken)
    assert stream.close() == broken
    assert stream.usage == Usage()


def test_other_content_types_pass_through(ctx):
    stream = transformer(ctx, content_type="text/html")
    assert stream.feed(b"<html>mcp_Shell") == b"<html>mcp_Shell"
    assert stream.close() == b""
    assert not stream.is_sse


def test_missing_content_type_follows_the_request(ctx):
    streaming = claude.transformer(ctx, request(TOOLS_BODY), 200, {})
    assert streaming.is_sse
    plain = claude.transformer(ctx, request({**TOOLS_BODY, "stream": False}), 200, {})
    assert plain.mode == "json"


# ── End to end over HTTP ─────────────────────────────────────────────────────


async def forward(ctx, acc, req) -> tuple[int, bytes, claude.ClaudeStream]:
    up = claude.prepare(ctx, acc, req)
    async with ctx.http.post(up.url, headers=up.headers, data=up.body) as resp:
        stream = claude.transformer(ctx, req, resp.status, resp.headers)
        out = b""
        async for chunk in resp.content.iter_any():
            out += stream.feed(chunk)
        return resp.status, out + stream.close(), stream


async def test_turn_through_the_fake(ctx, fake):
    grant = fake.grant()
    req = sample(2)
    fake.queue(
        FakeClaude.stream_reply(
            "Done.",
            tool_use=("mcp_Glob", {"pattern": "*"}),
            usage={"input": 900, "output": 30, "cache_read": 800, "cache_write": 50},
        )
    )
    status, out, stream = await forward(ctx, account(grant["access_token"]), req)
    assert status == 200
    sent = fake.calls("/v1/messages")[-1]
    assert sent.query == {"beta": "true"}
    assert sent.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert sent.headers["anthropic-beta"] == BETAS + ",structured-outputs-2025-11-13"
    assert "x-api-key" not in sent.headers
    assert sent.json["messages"][1]["content"][1]["name"] == "mcp_Glob"
    assert b'"name":"glob"' in out and b"mcp_Glob" not in out
    assert stream.terminal
    assert stream.usage == Usage(
        input_tokens=900, output_tokens=30, cache_read_tokens=800, cache_write_tokens=50
    )


async def test_json_turn_and_auth_failure_through_the_fake(ctx, fake):
    grant = fake.grant()
    body = {**TOOLS_BODY, "stream": False}
    fake.queue(FakeClaude.json_reply("ok", tool_use=("mcp_Shell", {"command": "pwd"})))
    status, out, stream = await forward(ctx, account(grant["access_token"]), request(body))
    assert status == 200
    assert json.loads(out)["content"][1] == {
        "type": "tool_use",
        "id": "toolu_fake01",
        "name": "Shell",
        "input": {"command": "pwd"},
    }
    assert stream.usage == Usage(input_tokens=25, output_tokens=12)
    status, out, _ = await forward(ctx, account("expired-or-unknown"), request(body))
    assert status == 401
    assert json.loads(out)["error"]["type"] == "authentication_error"
    fake.expire(grant["access_token"])
    status, _, _ = await forward(ctx, account(grant["access_token"]), request(body))
    assert status == 401


async def test_fake_error_replies(ctx, fake):
    grant = fake.grant()
    fake.queue(FakeClaude.error_reply(529, "overloaded_error", "Overloaded"))
    status, out, _ = await forward(ctx, account(grant["access_token"]), request(TOOLS_BODY))
    assert status == 529
    assert json.loads(out) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }


# ── Limits and quota ─────────────────────────────────────────────────────────


def clock():
    return 1_800_000_000.0


def unified(**windows: tuple[str, int] | None) -> dict[str, str]:
    """Unified rate-limit headers: window name ("overall" for the unnamed one) -> (status, reset
    as seconds from `clock()`); a None reset leaves the reset header out."""
    headers = {}
    for window, (status, reset) in windows.items():
        stem = "anthropic-ratelimit-unified-" + ("" if window == "overall" else f"{window}-")
        headers[stem + "status"] = status
        if reset is not None:
            headers[stem + "reset"] = str(int(clock()) + reset)
    return headers


def test_retry_after_rests_until_the_rejected_window_reopens(fake):
    reply = FakeClaude.rate_limit_reply(1_800_003_600)
    assert claude.retry_after(429, reply.headers, b"", now=clock) == Cooldown(3600.0, window_exhausted=True)
    # The 5h window refused; the overall reset follows the 7d window (still allowed), 5 days out.
    five_hour = unified(
        overall=("rejected", 5 * 86400), **{"5h": ("rejected", 2400), "7d": ("allowed", 5 * 86400)}
    )
    assert claude.retry_after(429, five_hour, b"", now=clock) == Cooldown(2400.0, window_exhausted=True)
    # The other way round: the 7d window refused while the 5h one allows.
    seven_day = {
        **unified(overall=("rejected", 3 * 86400), **{"5h": ("allowed", 100), "7d": ("rejected", 86400)}),
        "anthropic-ratelimit-unified-overage-status": "rejected",
        "anthropic-ratelimit-unified-overage-reset": "1809999999",
    }
    assert claude.retry_after(429, seven_day, b"", now=clock) == Cooldown(86400.0, window_exhausted=True)
    # Two windows refused: usable again only once both reopened.
    both = unified(**{"5h": ("rejected", 600), "7d": ("rejected", 7200), "7d_opus": ("allowed", 99999)})
    assert claude.retry_after(429, both, b"", now=clock) == Cooldown(7200.0, window_exhausted=True)
    # A window rejected without its reset, another rejected with one: the one with a reset.
    partial = unified(**{"5h": ("rejected", None), "7d": ("rejected", 300)})
    assert claude.retry_after(429, partial, b"", now=clock) == Cooldown(300.0, window_exhausted=True)


def test_retry_after_uses_the_overall_reset_only_when_no_window_says_more():
    overall = unified(overall=("rejected", 1800))
    assert claude.retry_after(429, overall, b"", now=clock) == Cooldown(1800.0, window_exhausted=True)
    windows_allowed = unified(overall=("rejected", 900), **{"5h": ("allowed", 100), "7d": ("allowed", 9000)})
    assert claude.retry_after(429, windows_allowed, b"", now=clock) == Cooldown(900.0, window_exhausted=True)
    window_without_reset = unified(overall=("rejected", 500), **{"5h": ("rejected", None)})
    assert claude.retry_after(429, window_without_reset, b"", now=clock) == Cooldown(
        500.0, window_exhausted=True
    )
    past = unified(overall=("rejected", -1000))
    assert claude.retry_after(429, past, b"", now=clock) == Cooldown(0.0, window_exhausted=True)
    # rejected and no reset anywhere: Retry-After, else a minute
    bare = {**unified(overall=("rejected", None)), "retry-after": "120"}
    assert claude.retry_after(429, bare, b"", now=clock) == Cooldown(120.0, window_exhausted=True)
    assert claude.retry_after(429, unified(**{"7d": ("rejected", None)}), b"", now=clock) == Cooldown(
        60.0, window_exhausted=True
    )


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        # a 429 that no unified window refused: a burst limit, the core reads Retry-After
        (429, {"retry-after": "7"}),
        (429, {}),
        (429, unified(overall=("allowed", 90))),
        (
            429,
            unified(
                overall=("allowed", 5 * 86400),
                **{"5h": ("allowed", 60), "7d": ("allowed_warning", 5 * 86400)},
            ),
        ),
        (429, {"anthropic-ratelimit-unified-overage-status": "rejected"}),
        (429, {"Anthropic-Ratelimit-Unified-5h-Reset": "1800000030"}),
        # 5xx and 529 overloaded: the core decides, whatever the headers say
        (529, unified(overall=("rejected", 90), **{"5h": ("rejected", 90)})),
        (500, unified(overall=("rejected", 90))),
        (503, {"retry-after": "30"}),
    ],
)
def test_retry_after_leaves_the_rest_to_the_core(status, headers):
    assert claude.retry_after(status, headers, b"", now=clock) is None


def test_retry_after_reads_the_injected_clock_and_header_case():
    headers = {
        "Anthropic-Ratelimit-Unified-5h-Status": "Rejected",
        "Anthropic-Ratelimit-Unified-5h-Reset": "1800000600",
    }
    assert claude.retry_after(429, headers, b"", now=lambda: 1_800_000_000.0).seconds == 600.0
    assert claude.retry_after(429, headers, b"", now=lambda: 1_800_000_500.0).seconds == 100.0
    with pytest.raises(TypeError):
        claude.retry_after(429, headers, b"")  # the clock is the caller's, never a hidden default


async def test_quota_through_the_fake(ctx, fake):
    grant = fake.grant()
    data = await claude.quota(ctx, account(grant["access_token"]))
    assert data == {
        "five_hour": {"utilization": 12.0, "resets_at": "2026-11-27T18:00:00+00:00"},
        "seven_day": {"utilization": 40.5, "resets_at": "2026-12-01T00:00:00+00:00"},
        "model_windows": {"seven_day_opus": {"utilization": 3.0, "resets_at": "2026-12-01T00:00:00+00:00"}},
        "extra_usage": {
            "is_enabled": False,
            "monthly_limit": None,
            "used_credits": None,
            "utilization": None,
            "currency": "USD",
        },
    }
    sent = fake.calls("/api/oauth/usage")[-1]
    assert sent.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert sent.headers["anthropic-beta"] == "oauth-2025-04-20"
    with pytest.raises(providers.ProviderError, match="HTTP 401"):
        await claude.quota(ctx, account("bad"))


# ── count_tokens ─────────────────────────────────────────────────────────────


def count_request(body: dict, headers: dict | None = None, query: str = "beta=true") -> ProxyRequest:
    return ProxyRequest(
        endpoint="count_tokens", headers=headers or {}, query=query, body=body, api_key_id="k"
    )


def test_count_tokens_is_prepared_like_messages(ctx, fake):
    body = {
        "model": "claude-sonnet-4-5",
        "system": "You are a helpful bot.",
        "tools": [{"name": "read", "input_schema": {}}, {"name": "Read", "input_schema": {}}],
        "tool_choice": {"type": "tool", "name": "Read"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": []},
        "messages": [{"role": "user", "content": "hi"}],
        # Messages-only fields a client may copy over: dropped, count_tokens refuses them
        "max_tokens": 1000,
        "stream": True,
        "metadata": {"user_id": "u"},
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 5,
        "stop_sequences": ["x"],
        "service_tier": "auto",
    }
    headers = {"anthropic-beta": "token-counting-2024-11-01", "user-agent": "Anthropic/Python 0.70.0"}
    up = claude.prepare(ctx, account("tok-c"), count_request(body, headers, query=""))
    assert up.url == fake.url + "/v1/messages/count_tokens?beta=true"
    messages = claude.prepare(ctx, account("tok-c"), request(body, headers))
    assert {k: v for k, v in up.headers.items()} == messages.headers
    assert up.headers["anthropic-beta"] == BETAS + ",token-counting-2024-11-01"
    assert up.headers["authorization"] == "Bearer tok-c"
    shaped = json.loads(up.body)
    assert set(shaped) == {
        "model",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "context_management",
        "messages",
    }
    assert {k: v for k, v in json.loads(messages.body).items() if k in shaped} == shaped
    assert shaped["system"][0] == {"type": "text", "text": IDENTITY}
    assert [t["name"] for t in shaped["tools"]] == [suffixed("mcp_Read", "read"), "mcp_Read"]
    assert shaped["tool_choice"]["name"] == "mcp_Read"


def test_count_tokens_answer_is_relayed_and_not_counted(ctx):
    for content_type in ("application/json", None):
        headers = {"Content-Type": content_type} if content_type else {}
        stream = claude.transformer(ctx, count_request({"model": "m", "messages": []}), 200, headers)
        answer = b'{"input_tokens": 2095, "usage": {"input_tokens": 2095}}'
        assert stream.feed(answer[:9]) + stream.feed(answer[9:]) + stream.close() == answer
        assert stream.usage == Usage()  # counting is not billed
        assert stream.terminal and not stream.is_sse


async def test_count_tokens_through_the_fake(ctx, fake):
    grant = fake.grant()
    raw = json.loads((CLIENT_SAMPLES / "claude-code-2.1.328-count-tokens.json").read_text())
    req = count_request(raw["body"], {k.lower(): v for k, v in raw["headers"].items()})
    status, out, stream = await forward(ctx, account(grant["access_token"]), req)
    sent = fake.calls("/v1/messages/count_tokens")[-1]
    assert status == 200, out
    assert json.loads(out) == {"input_tokens": claude_fake_count(sent.json)}
    assert stream.usage == Usage()
    assert [t["name"] for t in sent.json["tools"]] == ["mcp_" + t["name"] for t in raw["body"]["tools"]]
    # a Messages-shaped body is accepted too: the fake refuses what Anthropic refuses
    body = {**raw["body"], "max_tokens": 10, "stream": True, "metadata": {"user_id": "u"}}
    status, out, _ = await forward(ctx, account(grant["access_token"]), count_request(body))
    assert status == 200, out


# ── Claude Code passes through where it already complies ─────────────────────


def claude_code_sample(name: str) -> dict:
    return json.loads((CLIENT_SAMPLES / f"claude-code-2.1.328-{name}.json").read_text())


@pytest.mark.parametrize("name", ["messages-text", "messages-turn1", "messages-turn2"])
def test_claude_code_system_and_user_agent_pass_through(ctx, name):
    raw = claude_code_sample(name)
    headers = {k.lower(): v for k, v in raw["headers"].items()}
    up = claude.prepare(ctx, account(), request(raw["body"], headers, query="beta=true"))
    body = json.loads(up.body)
    assert body["system"] == raw["body"]["system"]
    assert body["system"][0]["text"].startswith("x-anthropic-billing-header: cc_version=2.1.328.")
    assert up.headers["user-agent"] == "claude-cli/2.1.328 (external, sdk-cli)"


BILLING = {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.328.7de; cc_entrypoint=cli;"}
SDK_IDENTITY = (
    "You are Claude Code, Anthropic's official CLI for Claude, running within the Claude Agent SDK."
)
AGENT_IDENTITY = "You are a Claude agent, built on Anthropic's Claude Agent SDK."
OPENCODE_TEXT = "Here is some useful information about the environment you are running in:"


@pytest.mark.parametrize(
    "system",
    [
        [
            {"type": "text", "text": IDENTITY, "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": OPENCODE_TEXT},
        ],
        [BILLING, {"type": "text", "text": IDENTITY}, {"type": "text", "text": OPENCODE_TEXT}],
        [BILLING, {"type": "text", "text": SDK_IDENTITY}, {"type": "text", "text": OPENCODE_TEXT}],
        [{"type": "text", "text": AGENT_IDENTITY}],
    ],
)
def test_a_system_that_opens_with_the_identity_is_left_alone(ctx, system):
    up = claude.prepare(ctx, account(), request({"model": "m", "system": system}))
    assert json.loads(up.body)["system"] == system  # not even sanitised


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        # billing header without an identity after it: the identity goes in after the billing
        # block, which stays first where Claude Code puts it
        (
            [BILLING, {"type": "text", "text": "hi"}],
            [BILLING, {"type": "text", "text": IDENTITY}, {"type": "text", "text": "hi"}],
        ),
        # the identity with more text in the same block: no second identity
        (
            [{"type": "text", "text": IDENTITY + "\nBe brief."}],
            [{"type": "text", "text": IDENTITY + "\nBe brief."}],
        ),
        # identity later on: not Claude Code's layout, so the usual sanitising (no second identity)
        (
            [{"type": "text", "text": OPENCODE_TEXT}, {"type": "text", "text": IDENTITY}],
            [{"type": "text", "text": claude.sanitize(OPENCODE_TEXT)}, {"type": "text", "text": IDENTITY}],
        ),
        # the identity after something that is not the billing header
        (
            [{"type": "text", "text": "x"}, {"type": "text", "text": AGENT_IDENTITY}],
            [
                {"type": "text", "text": IDENTITY},
                {"type": "text", "text": "x"},
                {"type": "text", "text": AGENT_IDENTITY},
            ],
        ),
    ],
)
def test_other_systems_keep_the_usual_shaping(ctx, system, expected):
    up = claude.prepare(ctx, account(), request({"model": "m", "system": system}))
    assert json.loads(up.body)["system"] == expected


@pytest.mark.parametrize(
    ("client", "sent"),
    [
        ("claude-cli/2.1.328 (external, sdk-cli)", "claude-cli/2.1.328 (external, sdk-cli)"),
        ("claude-cli/3.0.0 (external, cli)", "claude-cli/3.0.0 (external, cli)"),
        ("Anthropic/Python 0.70.0", "claude-cli/2.1.2 (external, cli)"),
        ("opencode/1.18.33 ai-sdk/anthropic", "claude-cli/2.1.2 (external, cli)"),
        ("my-claude-cli/1.0", "claude-cli/2.1.2 (external, cli)"),
        (None, "claude-cli/2.1.2 (external, cli)"),
    ],
)
def test_user_agent_kept_only_for_claude_code(ctx, client, sent):
    headers = {"user-agent": client} if client else {}
    assert claude.prepare(ctx, account(), request({"model": "m"}, headers)).headers["user-agent"] == sent


# ── Model list ───────────────────────────────────────────────────────────────


async def test_list_models_through_the_fake(ctx, fake):
    grant = fake.grant()
    models = await claude.list_models(ctx, account(grant["access_token"]))
    assert models == [
        ModelInfo(id="claude-opus-4-1-20250805", name="Claude Opus 4.1"),
        ModelInfo(id="claude-sonnet-4-5-20250929", name="Claude Sonnet 4.5"),
        ModelInfo(id="claude-haiku-4-5-20251001", name="Claude Haiku 4.5"),
    ]
    (sent,) = fake.calls("/v1/models")
    assert sent.query == {"limit": "1000"}
    assert sent.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "oauth-2025-04-20"


async def test_list_models_pages_with_after_id(ctx, fake):
    grant = fake.grant()
    fake.models = [
        {"type": "model", "id": f"claude-{i:04d}", "display_name": f"Claude {i}"} for i in range(2500)
    ]
    fake.models.append({"type": "model", "id": "claude-no-name"})
    models = await claude.list_models(ctx, account(grant["access_token"]))
    assert [m.id for m in models] == [m["id"] for m in fake.models]
    assert models[7] == ModelInfo(id="claude-0007", name="Claude 7")
    assert models[-1] == ModelInfo(id="claude-no-name", name=None)
    assert all(m.context is None and m.output is None for m in models)
    assert [c.query for c in fake.calls("/v1/models")] == [
        {"limit": "1000"},
        {"limit": "1000", "after_id": "claude-0999"},
        {"limit": "1000", "after_id": "claude-1999"},
    ]


async def test_list_models_stops_after_twenty_pages(ctx, fake, caplog):
    grant = fake.grant()
    fake.models_page_max = 2
    fake.models = [{"type": "model", "id": f"m-{i}", "display_name": None} for i in range(50)]
    models = await claude.list_models(ctx, account(grant["access_token"]))
    assert len(fake.calls("/v1/models")) == 20
    assert [m.id for m in models] == [f"m-{i}" for i in range(40)]
    assert "20 pages" in caplog.text


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (FakeClaude.error_reply(500, "api_error", "boom"), "HTTP 500"),
        (FakeClaude.error_reply(403, "permission_error", "no"), "HTTP 403"),
        (Reply(body="not json", content_type="text/plain"), "not a JSON object"),
        (Reply(body=["a", "list"]), "not a JSON object"),
        (Reply(body={"models": []}), "no data list"),
    ],
)
async def test_list_models_failures(ctx, fake, reply, message):
    grant = fake.grant()
    fake.models_reply = reply
    with pytest.raises(providers.ProviderError, match=message) as caught:
        await claude.list_models(ctx, account(grant["access_token"]))
    assert grant["access_token"] not in str(caught.value)


async def test_list_models_with_a_refused_token(ctx, fake):
    with pytest.raises(providers.ProviderError, match="HTTP 401") as caught:
        await claude.list_models(ctx, account("sk-ant-oat01-unknown"))
    assert "sk-ant" not in str(caught.value)
    unreachable = Context(
        http=ctx.http, options={**ctx.options, "api_url": "http://127.0.0.1:9"}, now=ctx.now, log=ctx.log
    )
    with pytest.raises(providers.ProviderError, match="failed: Client") as caught:
        await claude.list_models(unreachable, account("sk-ant-oat01-x"))
    assert "sk-ant" not in str(caught.value)
