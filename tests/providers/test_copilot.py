"""The Copilot adapter against FakeCopilot over real loopback HTTP (no core involved)."""

from __future__ import annotations

import copy
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import orjson
import pytest

import providers
from providers import (
    Account,
    Context,
    Cooldown,
    LoginFailed,
    LoginPending,
    ProxyRequest,
    ReauthRequired,
    Usage,
    copilot,
)
from tests.fakes import Reply, sse
from tests.fakes.copilot import (
    chat_json_reply,
    chat_stream_reply,
    error_reply,
    responses_body,
    responses_stream_reply,
)

DATA = Path(__file__).resolve().parent.parent / "data"
NOW = 1_760_000_000_000
TTL = 30 * 86_400_000
UA = "opencode/1.18.33 ai-sdk/provider-utils/4.0.23 runtime/bun/1.3.14"
SESSION = "ses_de1a5af32ffeSoWcpKfsR2Kf32"


@pytest.fixture
def fake(copilot_fake):
    return copilot_fake


@pytest.fixture
async def ctx(fake):
    async with aiohttp.ClientSession() as session:
        yield Context(
            http=session,
            options={**copilot.OPTIONS, **fake.options()},
            now=lambda: NOW,
            log=logging.getLogger("test"),
        )


def account(token: str = "gho_test", **metadata) -> Account:
    return Account(
        id="acc-1",
        label="octo",
        account_id="1",
        access_token=token,
        refresh_token=token,
        expires_at=NOW + TTL,
        metadata=metadata,
    )


def sample(turn: int) -> dict:
    return json.loads((DATA / f"opencode-1.18.33-copilot-chat-turn{turn}.json").read_text())


def from_sample(turn: int) -> ProxyRequest:
    """The captured request as the core hands it over: hop-by-hop headers removed, prefix stripped."""
    raw = sample(turn)
    headers = {k: v for k, v in raw["headers"].items() if k != "connection"}
    return ProxyRequest(
        endpoint="chat_completions", headers=headers, query="", body=raw["body"], api_key_id="key-1"
    )


def chat(messages, stream=True, **extra) -> ProxyRequest:
    return ProxyRequest(
        endpoint="chat_completions",
        headers={},
        query="",
        body={"model": "gpt-4.1", "messages": messages, "stream": stream, **extra},
        api_key_id="key-1",
    )


def responses(input, stream=True, **extra) -> ProxyRequest:
    return ProxyRequest(
        endpoint="responses",
        headers={},
        query="",
        body={"model": "gpt-5", "input": input, "stream": stream, **extra},
        api_key_id="key-1",
    )


async def send(ctx, request: ProxyRequest, acc: Account):
    """prepare → real HTTP to the fake → transformer; returns (status, client bytes, transformer)."""
    upstream = copilot.prepare(ctx, acc, request)
    async with ctx.http.post(upstream.url, data=upstream.body, headers=upstream.headers) as resp:
        stream = copilot.transformer(ctx, request, resp.status, resp.headers)
        out = b""
        async for chunk in resp.content.iter_any():
            out += stream.feed(chunk)
        out += stream.close()
        return resp.status, out, stream


# ── Contract ─────────────────────────────────────────────────────────────────


def test_module_satisfies_the_contract():
    assert copilot.CONTRACT == providers.API
    for name in providers.REQUIRED_CONSTANTS + providers.REQUIRED_FUNCTIONS:
        assert hasattr(copilot, name), name
    assert set(copilot.ROUTES.values()) == set(copilot.NPM) == {"chat_completions", "responses"}
    assert all(path.startswith(copilot.BASE_PATH + "/") for path in copilot.ROUTES)
    assert set(providers.option_urls(copilot.OPTIONS)) == {"api_url", "github_url", "github_api_url"}


# ── Device login ─────────────────────────────────────────────────────────────


async def test_start_login_asks_github_for_a_device_code(ctx, fake):
    login = await copilot.start_login(ctx, "state-1", {})

    assert login.method == "device"
    assert login.url == f"{fake.url}/login/device"
    assert login.user_code == "ABCD-0001"
    assert login.interval == 5
    assert login.expires_in == 900
    assert login.instructions == f"Enter code ABCD-0001 at {fake.url}/login/device"
    assert login.data == {"device_code": "device-0001", "interval": 5}
    [call] = fake.calls("/login/device/code")
    assert call.json == {"client_id": "Ov23li8tweQw6odWQebz", "scope": "read:user"}
    assert call.headers["accept"] == "application/json"
    assert call.headers["user-agent"] == "GitHubCopilotChat/0.35.0"


class CannedSession:
    """Records the URL of each call and answers with one canned JSON body (enterprise hosts
    cannot be reached from the tests, and must not be)."""

    def __init__(self, body: dict):
        self.body, self.urls = body, []

    def post(self, url, **kwargs):
        return self.request("POST", url, **kwargs)

    def request(self, method, url, **kwargs):
        self.urls.append(url)
        session = self

        class Response:
            status = 200

            async def text(self):
                return json.dumps(session.body)

            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

        return Response()


async def test_start_login_refuses_an_incomplete_answer(ctx):
    canned = Context(
        http=CannedSession({"device_code": "dc", "interval": 5}),
        options=ctx.options,
        now=ctx.now,
        log=ctx.log,
    )
    with pytest.raises(providers.ProviderError, match="lacks user_code, verification_uri"):
        await copilot.start_login(canned, "state-1", {})


async def test_enterprise_login_uses_the_enterprise_hosts(ctx):
    body = {
        "device_code": "dc-1",
        "user_code": "WXYZ-1234",
        "verification_uri": "https://ghe.example.com/login/device",
        "interval": 5,
        "expires_in": 899,
    }
    session = CannedSession(body)
    ent = Context(http=session, options=ctx.options, now=ctx.now, log=ctx.log)

    login = await copilot.start_login(ent, "state-1", {"enterprise_domain": "https://GHE.example.com/"})
    assert session.urls == ["https://ghe.example.com/login/device/code"]
    assert login.data == {"device_code": "dc-1", "interval": 5, "domain": "ghe.example.com"}
    assert login.expires_in == 899

    session.body = {"error": "authorization_pending"}
    with pytest.raises(LoginPending):
        await copilot.poll_login(ent, login.data)
    assert session.urls[-1] == "https://ghe.example.com/login/oauth/access_token"


def test_enterprise_domain_normalisation():
    assert copilot.enterprise_domain("ghe.example.com") == "ghe.example.com"
    assert copilot.enterprise_domain(" https://GHE.Example.com/login ") == "ghe.example.com"
    assert copilot.enterprise_domain("github.com") is None
    assert copilot.enterprise_domain("") is None
    assert copilot.enterprise_domain(None) is None
    with pytest.raises(LoginFailed, match="not a host name"):
        copilot.enterprise_domain("not a host")
    assert copilot.endpoints(copilot.OPTIONS, "ghe.example.com") == (
        "https://ghe.example.com",
        "https://api.ghe.example.com",
        "https://copilot-api.ghe.example.com",
    )
    assert copilot.endpoints(copilot.OPTIONS, None) == (
        "https://github.com",
        "https://api.github.com",
        "https://api.githubcopilot.com",
    )


async def test_poll_pending_then_slow_down_then_success(ctx, fake):
    login = await copilot.start_login(ctx, "state-1", {})

    with pytest.raises(LoginPending) as pending:
        await copilot.poll_login(ctx, login.data)
    assert pending.value.interval is None
    assert pending.value.data is None

    fake.slow_down(interval=12)
    with pytest.raises(LoginPending) as slow:
        await copilot.poll_login(ctx, login.data)
    assert slow.value.interval == 12
    assert slow.value.data == {"device_code": "device-0001", "interval": 12}

    fake.approve_device(login="octo", user_id=583231, email="octo@example.com")
    tokens = await copilot.poll_login(ctx, slow.value.data)
    assert tokens.access_token == tokens.refresh_token == "gho_fake0002octo"
    assert tokens.expires_at == NOW + TTL
    assert tokens.account_id == "583231"
    assert tokens.label == "octo@example.com"
    assert tokens.metadata == {"githubUserId": "583231", "githubLogin": "octo"}
    assert "gho_" not in repr(tokens)

    polls = fake.calls("/login/oauth/access_token")
    assert len(polls) == 3
    assert polls[0].json == {
        "client_id": "Ov23li8tweQw6odWQebz",
        "device_code": "device-0001",
        "grant_type": "urn:ietf:params:oauth:grant-type:device_code",
    }
    [user] = fake.calls("/user")
    assert user.headers["authorization"] == "Bearer gho_fake0002octo"


async def test_slow_down_without_an_interval_adds_five_seconds(ctx, fake):
    session = CannedSession({"error": "slow_down"})
    canned = Context(http=session, options=ctx.options, now=ctx.now, log=ctx.log)
    with pytest.raises(LoginPending) as slow:
        await copilot.poll_login(canned, {"device_code": "dc", "interval": 7})
    assert slow.value.interval == 12
    assert slow.value.data == {"device_code": "dc", "interval": 12}


async def test_poll_denied_and_expired(ctx, fake):
    first = await copilot.start_login(ctx, "s1", {})
    fake.deny_device()
    with pytest.raises(LoginFailed, match="denied on the device page"):
        await copilot.poll_login(ctx, first.data)

    second = await copilot.start_login(ctx, "s2", {})
    fake.expire_device()
    with pytest.raises(LoginFailed, match="expired before it was approved"):
        await copilot.poll_login(ctx, second.data)

    with pytest.raises(LoginFailed, match=r"GitHub refused the device login \(incorrect_device_code\)"):
        await copilot.poll_login(ctx, {"device_code": "unknown", "interval": 5})


async def test_login_survives_a_failing_user_lookup(ctx, fake):
    login = await copilot.start_login(ctx, "s1", {})
    fake.approve_device(login="octo", user_id=9)
    fake.user_status = 500
    tokens = await copilot.poll_login(ctx, login.data)
    assert tokens.access_token == "gho_fake0002octo"
    assert tokens.account_id is None
    assert tokens.label is None
    assert tokens.metadata == {}


async def test_label_falls_back_to_the_login(ctx, fake):
    login = await copilot.start_login(ctx, "s1", {})
    fake.approve_device(login="mona", user_id=2)
    tokens = await copilot.poll_login(ctx, login.data)
    assert (tokens.account_id, tokens.label) == ("2", "mona")


async def test_finish_login_is_not_used():
    with pytest.raises(LoginFailed, match="device flow; poll instead"):
        await copilot.finish_login(None, "s", {}, "code")


# ── Refresh ──────────────────────────────────────────────────────────────────


async def test_refresh_keeps_the_token_and_renews_the_expiry(ctx, fake):
    grant = fake.grant(login="octo", user_id=1, email="octo@example.com")
    acc = Account(
        id="acc-1",
        label="mine",
        account_id=None,
        access_token="stale-copilot-token",
        refresh_token=grant["refresh_token"],
        expires_at=NOW - 1,
        metadata={"githubLogin": "old"},
    )

    tokens = await copilot.refresh(ctx, acc)
    assert tokens.access_token == tokens.refresh_token == grant["refresh_token"]
    assert tokens.expires_at == NOW + TTL
    assert tokens.account_id == grant["account_id"] == "1"
    assert tokens.metadata == {"githubLogin": "octo", "githubUserId": "1"}


async def test_refresh_of_a_revoked_token_needs_reauth(ctx, fake):
    grant = fake.grant()
    fake.revoke(grant["access_token"])
    with pytest.raises(ReauthRequired, match="log in again"):
        await copilot.refresh(ctx, account(grant["access_token"]))


async def test_refresh_tolerates_github_being_down(ctx, fake):
    fake.user_status = 503
    tokens = await copilot.refresh(ctx, account("gho_x", githubLogin="octo", enterpriseDomain=None))
    assert tokens.access_token == "gho_x"
    assert tokens.expires_at == NOW + TTL
    assert tokens.account_id == "1"  # kept from the account
    assert tokens.metadata == {"githubLogin": "octo"}


# ── Import ───────────────────────────────────────────────────────────────────


def test_import_legacy_hosts_yml(ctx):
    [tokens] = copilot.import_auth(ctx, (DATA / "copilot-gh-hosts.yml").read_text())
    assert tokens.access_token == tokens.refresh_token == "gho_fakeLegacyToken0000000000000000000"
    assert tokens.expires_at == NOW + TTL
    assert tokens.account_id is None
    assert tokens.label == "octo"
    assert tokens.metadata == {"githubLogin": "octo"}


def test_import_hosts_yml_with_users_and_an_enterprise_host(ctx):
    found = copilot.import_auth(ctx, (DATA / "copilot-gh-hosts-users.yml").read_text())
    assert [(t.label, t.refresh_token, t.metadata) for t in found] == [
        ("octo", "gho_fakeOctoToken00000000000000000000", {"githubLogin": "octo"}),
        ("mona", "gho_fakeMonaToken00000000000000000000", {"githubLogin": "mona"}),
        (
            "hubot",
            "gho_fakeHubotToken0000000000000000000",
            {"githubLogin": "hubot", "enterpriseDomain": "ghe.example.com"},
        ),
    ]
    assert all(t.access_token == t.refresh_token for t in found)


def test_import_opencode_auth_json(ctx):
    text = (DATA / "copilot-opencode-auth.json").read_text()
    for content in (json.loads(text), text):
        found = copilot.import_auth(ctx, content)
        assert [(t.access_token, t.refresh_token, t.metadata, t.label) for t in found] == [
            ("gho_fakeOpencodeToken000000000000000", "gho_fakeOpencodeToken000000000000000", {}, None),
            (
                "gho_fakeOpencodeGheToken0000000000000",
                "gho_fakeOpencodeGheToken0000000000000",
                {"enterpriseDomain": "ghe.example.com"},
                None,
            ),
        ]
        assert found[0].expires_at == NOW + TTL


def test_import_a_single_opencode_entry(ctx):
    [tokens] = copilot.import_auth(ctx, {"type": "oauth", "refresh": "gho_one", "access": "x", "expires": 0})
    assert tokens.refresh_token == "gho_one"


@pytest.mark.parametrize(
    "content",
    [
        {"openai": {"type": "oauth", "refresh": "rt", "access": "at", "expires": 1}},
        {"github-copilot": {"type": "api", "key": "k"}},
        "github.com:\n    user: octo\n    git_protocol: https\n",
        "",
    ],
)
def test_import_without_a_token_names_the_expected_files(ctx, content):
    with pytest.raises(LoginFailed, match=r"hosts\.yml.*auth\.json"):
        copilot.import_auth(ctx, content)


def test_yaml_subset():
    text = (
        "# comment\n---\nhost.example.com:\n  a: 'x # not a comment'\n  b: \"y\"  # comment\n"
        "  c: ''\n  d: {}\n  nested:\n     deep: 1\n  e: https://x.example/y\n"
    )
    assert copilot.parse_yaml(text) == {
        "host.example.com": {
            "a": "x # not a comment",
            "b": "y",
            "c": "",
            "d": {},
            "nested": {"deep": "1"},
            "e": "https://x.example/y",
        }
    }


# ── prepare ──────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(("turn", "initiator"), [(1, "user"), (2, "agent")])
def test_prepare_opencode_chat_samples(ctx, fake, turn, initiator):
    request = from_sample(turn)
    before = copy.deepcopy(request.body)

    up = copilot.prepare(ctx, account("gho_live"), request)

    assert up.url == f"{fake.url}/chat/completions"
    assert up.headers == {
        "content-type": "application/json",
        "user-agent": UA,
        "x-session-affinity": SESSION,
        "x-session-id": SESSION,
        "accept": "*/*",
        "authorization": "Bearer gho_live",
        "openai-intent": "conversation-edits",
        "x-initiator": initiator,
    }
    assert json.loads(up.body) == sample(turn)["body"]
    assert up.body == orjson.dumps(sample(turn)["body"])
    assert json.loads(up.body)["stream_options"] == {"include_usage": True}
    assert request.body == before
    assert copilot.session_key(request) == SESSION


def test_prepare_forces_include_usage_on_streamed_chat(ctx):
    request = chat([{"role": "user", "content": "hi"}], stream_options={"include_obfuscation": False})
    before = copy.deepcopy(request.body)
    body = json.loads(copilot.prepare(ctx, account(), request).body)
    assert body["stream_options"] == {"include_obfuscation": False, "include_usage": True}
    assert request.body == before

    body = json.loads(copilot.prepare(ctx, account(), chat([{"role": "user", "content": "hi"}])).body)
    assert body["stream_options"] == {"include_usage": True}

    plain = chat([{"role": "user", "content": "hi"}], stream=False)
    assert json.loads(copilot.prepare(ctx, account(), plain).body) == plain.body

    streamed_responses = responses("hi")
    assert json.loads(copilot.prepare(ctx, account(), streamed_responses).body) == streamed_responses.body


def test_prepare_query_enterprise_and_client_headers(ctx):
    request = chat([{"role": "user", "content": "hi"}])
    request.query = "stream=true"
    request.headers = {
        "authorization": "Bearer kleis-key",
        "x-api-key": "kleis-key",
        "accept-encoding": "zstd",
        "content-encoding": "zstd",
        "content-length": "99",
        "copilot-vision-request": "true",
        "x-initiator": "user",
        "editor-version": "vscode/1.99.0",
    }
    up = copilot.prepare(ctx, account("gho_ent", enterpriseDomain="ghe.example.com"), request)
    assert up.url == "https://copilot-api.ghe.example.com/chat/completions?stream=true"
    assert up.headers == {
        "editor-version": "vscode/1.99.0",
        "x-initiator": "user",
        "authorization": "Bearer gho_ent",
        "openai-intent": "conversation-edits",
        "content-type": "application/json",
    }


def test_prepare_responses_url(ctx, fake):
    up = copilot.prepare(ctx, account(), responses("hi"))
    assert up.url == f"{fake.url}/responses"
    assert up.headers["x-initiator"] == "user"
    assert "copilot-vision-request" not in up.headers


def test_prepare_refuses_an_unknown_endpoint(ctx):
    request = ProxyRequest(endpoint="messages", headers={}, query="", body={}, api_key_id="k")
    with pytest.raises(providers.ProviderError, match="no messages endpoint"):
        copilot.prepare(ctx, account(), request)


IMAGE_CHAT = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
        ],
    }
]
IMAGE_INPUT = [
    {
        "role": "user",
        "content": [
            {"type": "input_text", "text": "what is this"},
            {"type": "input_image", "image_url": "data:image/png;base64,AA"},
        ],
    }
]


@pytest.mark.parametrize(
    ("request_", "initiator", "vision"),
    [
        (chat(IMAGE_CHAT), "user", True),
        (chat([*IMAGE_CHAT, {"role": "assistant", "content": "a cat"}]), "agent", True),
        (chat([{"role": "user", "content": "hi"}]), "user", False),
        (chat([{"role": "user", "content": [{"type": "input_image"}]}]), "user", False),
        (chat([]), "user", False),
        (chat(None), "user", False),
        (responses(IMAGE_INPUT), "user", True),
        (responses([{"role": "user", "content": [{"type": "image_url"}]}]), "user", False),
        (
            responses(
                [
                    *IMAGE_INPUT,
                    {"type": "function_call", "call_id": "c1", "name": "glob", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "[]"},
                ]
            ),
            "agent",
            True,
        ),
        (
            responses([{"role": "assistant", "content": [{"type": "output_text", "text": "x"}]}]),
            "agent",
            False,
        ),
        (responses("describe the repo"), "user", False),
        (responses([]), "user", False),
    ],
)
def test_initiator_and_vision(ctx, request_, initiator, vision):
    up = copilot.prepare(ctx, account(), request_)
    assert up.headers["x-initiator"] == initiator
    assert up.headers.get("copilot-vision-request") == ("true" if vision else None)


def test_session_key():
    def req(headers, body):
        return ProxyRequest(endpoint="responses", headers=headers, query="", body=body, api_key_id="k")

    assert copilot.session_key(req({"x-session-id": "a", "x-session-affinity": "b"}, {})) == "a"
    assert copilot.session_key(req({"x-session-affinity": "b"}, {"prompt_cache_key": "c"})) == "b"
    assert copilot.session_key(req({"x-session-id": " "}, {"prompt_cache_key": "c"})) == "c"
    assert copilot.session_key(req({}, {"prompt_cache_key": ""})) is None
    assert copilot.session_key(req({}, {})) is None


# ── Responses through the fake ───────────────────────────────────────────────


async def test_chat_stream_usage(ctx, fake):
    grant = fake.grant()
    request = from_sample(1)
    status, out, stream = await send(ctx, request, account(grant["access_token"]))
    assert status == 200
    assert stream.is_sse
    assert stream.terminal
    assert stream.usage == Usage(input_tokens=42, output_tokens=5, cache_read_tokens=8)
    assert out == b"".join(chat_stream_reply().events)
    [call] = fake.calls("/chat/completions")
    assert call.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert call.headers["x-initiator"] == "user"
    assert call.json == request.body


async def test_chat_stream_usage_is_forced_and_seen(ctx, fake):
    grant = fake.grant()
    request = chat([{"role": "user", "content": "hi"}])  # the client did not ask for usage
    _, _, stream = await send(ctx, request, account(grant["access_token"]))
    assert fake.calls("/chat/completions")[0].json["stream_options"] == {"include_usage": True}
    assert stream.usage == Usage(input_tokens=42, output_tokens=5, cache_read_tokens=8)


@pytest.mark.parametrize("asked", [True, False])
def test_chat_stream_with_crlf_and_split_chunks(ctx, asked):
    reply = chat_stream_reply(prompt_tokens=100, cached_tokens=30, completion_tokens=7, crlf=True)
    request = chat([{"role": "user", "content": "hi"}], stream_options={"include_usage": asked})
    stream = copilot.transformer(ctx, request, 200, {"Content-Type": "text/event-stream"})
    raw = b"".join(reply.events)
    out = b"".join(stream.feed(raw[i : i + 7]) for i in range(0, len(raw), 7)) + stream.close()
    usage_event = reply.events[-2]
    assert b'"usage"' in usage_event and b'"choices": []' in usage_event
    assert out == (raw if asked else raw.replace(usage_event, b""))
    assert stream.usage == Usage(input_tokens=70, output_tokens=7, cache_read_tokens=30)
    assert stream.terminal


def events_of(raw: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


def run(ctx, request: ProxyRequest, raw: bytes, step: int | None = None):
    """Feed `raw` through the adapter's transformer (in `step`-byte pieces); (client bytes, stream)."""
    stream = copilot.transformer(ctx, request, 200, {"Content-Type": "text/event-stream"})
    pieces = [raw] if step is None else [raw[i : i + step] for i in range(0, len(raw), step)]
    out = b"".join(stream.feed(piece) for piece in pieces) + stream.close()
    return out, stream


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "extra",
    [{}, {"stream_options": {"include_usage": False}}, {"stream_options": {"include_obfuscation": False}}],
    ids=["no-stream-options", "include-usage-false", "other-stream-options"],
)
@pytest.mark.parametrize("step", [None, 1, 13])
def test_forced_usage_chunk_is_dropped(ctx, extra, step):
    reply = chat_stream_reply("one two", prompt_tokens=30, cached_tokens=10, completion_tokens=2)
    raw = b"".join(reply.events)
    out, stream = run(ctx, chat(HI, **extra), raw, step)
    assert out == b"".join(e for e in reply.events if b'"usage"' not in e)
    assert all(json.loads(e[6:])["choices"] for e in events_of(out)[:-1])  # chunk.choices[0] works
    assert events_of(out)[-1] == b"data: [DONE]\n\n"
    assert stream.usage == Usage(input_tokens=20, output_tokens=2, cache_read_tokens=10)
    assert stream.terminal


@pytest.mark.parametrize("crlf", [False, True])
def test_forced_usage_on_a_content_chunk_is_removed(ctx, crlf):
    reply = chat_stream_reply("one two", completion_tokens=2, usage_on_finish=True, crlf=crlf)
    raw = b"".join(reply.events)
    out, stream = run(ctx, chat(HI), raw, 5)
    finish = reply.events[-2]
    assert b'"usage"' in finish and b'"finish_reason": "stop"' in finish
    assert out.startswith(b"".join(reply.events[:-2]))  # everything else byte for byte
    assert out.endswith(reply.events[-1])  # [DONE]
    rewritten = out[len(b"".join(reply.events[:-2])) : -len(reply.events[-1])]
    nl = b"\r\n" if crlf else b"\n"
    assert rewritten.startswith(b"data: {") and rewritten.endswith(b"}" + nl + nl)
    chunk = json.loads(rewritten[6:])
    expected = json.loads(finish.strip()[6:])
    del expected["usage"]
    assert chunk == expected
    assert stream.usage == Usage(input_tokens=42, output_tokens=2, cache_read_tokens=8)
    assert stream.terminal


def test_asked_usage_passes_through_unchanged(ctx):
    for reply in (chat_stream_reply(), chat_stream_reply(usage_on_finish=True)):
        raw = b"".join(reply.events)
        out, stream = run(ctx, chat(HI, stream_options={"include_usage": True}), raw, 3)
        assert out == raw
        assert stream.usage == Usage(input_tokens=42, output_tokens=5, cache_read_tokens=8)


def test_usage_chunk_with_other_fields_keeps_them(ctx):
    # a choices-less chunk that also says something else (Azure's prompt_filter_results) is
    # not Kleis's to drop: only its usage goes
    usage = {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10}
    filtered = {"id": "x", "choices": [], "prompt_filter_results": [{"prompt_index": 0}], "usage": usage}
    raw = b"".join(
        [
            sse({"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}, "finish_reason": "stop"}]}),
            sse(filtered, event="chunk"),
            sse("[DONE]"),
        ]
    )
    out, stream = run(ctx, chat(HI), raw)
    events = events_of(out)
    assert (
        events[1]
        == b'event: chunk\ndata: {"id":"x","choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n'
    )
    assert events[0] == events_of(raw)[0] and events[2] == b"data: [DONE]\n\n"
    assert stream.usage == Usage(input_tokens=9, output_tokens=1)


def test_usage_in_a_large_chunk_is_found_anywhere(ctx):
    # many events in one read, the usage chunk not among the last three: still dropped
    reply = chat_stream_reply(" ".join(f"w{i}" for i in range(300)), completion_tokens=300)
    events = list(reply.events)
    usage_event = events.pop(-2)
    events.insert(5, usage_event)
    raw = b"".join(events)
    out, stream = run(ctx, chat(HI), raw)
    assert out == raw.replace(usage_event, b"")
    assert stream.usage.output_tokens == 300


def test_null_usage_and_nested_usage_keys_are_left_alone(ctx):
    chunks = [
        {"id": "x", "choices": [{"index": 0, "delta": {"content": '"usage":{'}}], "usage": None},
        {"id": "x", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "meta": {"usage": {}}},
    ]
    raw = b"".join([*(sse(c) for c in chunks), sse("[DONE]")])
    out, stream = run(ctx, chat(HI), raw)
    assert out == raw
    assert stream.usage == Usage()
    assert stream.terminal


def test_usage_at_eof_without_a_blank_line(ctx):
    reply = chat_stream_reply(done=False)
    raw = b"".join(reply.events).rstrip(b"\n")  # the usage chunk is the unterminated tail
    out, stream = run(ctx, chat(HI), raw)
    assert out == b"".join(reply.events[:-1])
    assert stream.usage == Usage(input_tokens=42, output_tokens=5, cache_read_tokens=8)


def test_nothing_is_stripped_where_nothing_was_forced(ctx):
    # Responses streams and non-streamed chat get no forced usage, so nothing is removed
    raw = b"".join(responses_stream_reply().events)
    out, stream = run(ctx, responses("hi"), raw, 11)
    assert out == raw and not stream.strip_usage
    body = json.dumps(chat_json_reply().body).encode()
    plain = copilot.transformer(ctx, chat(HI, stream=False), 200, {"Content-Type": "application/json"})
    assert plain.feed(body) + plain.close() == body and not plain.strip_usage


async def test_chat_json_usage(ctx, fake):
    grant = fake.grant()
    fake.queue(chat_json_reply(prompt_tokens=20, cached_tokens=4, completion_tokens=3))
    _, out, stream = await send(
        ctx, chat([{"role": "user", "content": "hi"}], stream=False), account(grant["access_token"])
    )
    assert not stream.is_sse
    assert json.loads(out)["choices"][0]["message"]["content"] == "Hello from Copilot"
    assert stream.usage == Usage(input_tokens=16, output_tokens=3, cache_read_tokens=4)


async def test_responses_stream_usage(ctx, fake):
    grant = fake.grant()
    fake.queue(responses_stream_reply(input_tokens=1000, cached_tokens=900, output_tokens=40))
    status, out, stream = await send(
        ctx,
        responses([{"role": "user", "content": "hi"}], prompt_cache_key=SESSION),
        account(grant["access_token"]),
    )
    assert status == 200
    assert stream.terminal
    assert stream.usage == Usage(input_tokens=100, output_tokens=40, cache_read_tokens=900)
    # output_item.added (with the item id) comes before the first delta, as OpenCode needs
    assert out.index(b"response.output_item.added") < out.index(b"response.output_text.delta")
    assert b'"id": "msg_fake"' in out


async def test_responses_done_through_the_fake(ctx, fake):
    grant = fake.grant()
    fake.queue(
        responses_stream_reply(input_tokens=60, cached_tokens=10, output_tokens=2, terminal="response.done")
    )
    _, _, stream = await send(ctx, responses("hi"), account(grant["access_token"]))
    assert stream.terminal
    assert stream.usage == Usage(input_tokens=50, output_tokens=2, cache_read_tokens=10)


def test_responses_stream_without_content_type(ctx):
    # aiohttp always sends a Content-Type, so a missing one is fed to the transformer directly
    raw = b"".join(
        responses_stream_reply(
            input_tokens=60, cached_tokens=10, output_tokens=2, terminal="response.done"
        ).events
    )
    stream = copilot.transformer(ctx, responses("hi"), 200, {})
    assert stream.is_sse
    assert stream.feed(raw) + stream.close() == raw
    assert stream.terminal
    assert stream.usage == Usage(input_tokens=50, output_tokens=2, cache_read_tokens=10)


def test_json_without_content_type(ctx):
    request = responses("hi", stream=False)
    stream = copilot.transformer(ctx, request, 200, {})
    body = json.dumps(responses_body(input_tokens=9, cached_tokens=2, output_tokens=1)).encode()
    assert stream.feed(body[:10]) + stream.feed(body[10:]) + stream.close() == body
    assert not stream.is_sse
    assert stream.usage == Usage(input_tokens=7, output_tokens=1, cache_read_tokens=2)

    chat_request = chat([{"role": "user", "content": "hi"}], stream=False)
    stream = copilot.transformer(ctx, chat_request, 200, {})
    stream.feed(json.dumps(chat_json_reply().body).encode())
    stream.close()
    assert stream.usage == Usage(input_tokens=42, output_tokens=5, cache_read_tokens=8)


async def test_unknown_token_gets_an_openai_style_401(ctx, fake):
    status, out, _ = await send(ctx, chat([{"role": "user", "content": "hi"}]), account("gho_unknown"))
    assert status == 401
    assert json.loads(out) == {
        "error": {"message": "Bad credentials", "type": "authentication_error", "code": None}
    }


async def test_scripted_error_reply_is_relayed(ctx, fake):
    grant = fake.grant()
    fake.queue(
        error_reply(
            429,
            "Sorry, you have been rate-limited.",
            "rate_limit_error",
            headers={"retry-after": "30"},
            code="rate_limited",
        )
    )
    status, out, stream = await send(
        ctx, chat([{"role": "user", "content": "hi"}]), account(grant["access_token"])
    )
    assert status == 429
    assert not stream.is_sse  # a JSON error body never gets keepalives
    assert json.loads(out)["error"]["code"] == "rate_limited"
    assert copilot.retry_after(status, {"retry-after": "30"}, out, now=lambda: 0) is None


async def test_dropped_reply_is_recorded(ctx, fake):
    grant = fake.grant()
    fake.queue(Reply(drop=True))
    with pytest.raises(aiohttp.ClientError):
        await send(ctx, chat([{"role": "user", "content": "hi"}]), account(grant["access_token"]))
    assert len(fake.calls("/chat/completions")) == 1


# ── Cooldowns and discovery ──────────────────────────────────────────────────


QUOTA = json.dumps({"error": {"message": "You have no quota", "code": "quota_exceeded"}}).encode()
MID_MARCH = datetime(2026, 3, 15, 12, 0, tzinfo=UTC).timestamp()


def test_retry_after_quota_exceeded():
    clock = lambda: MID_MARCH  # noqa: E731
    assert copilot.retry_after(402, {"Retry-After": "120"}, QUOTA, now=clock) == Cooldown(
        seconds=120.0, window_exhausted=True
    )
    # no hint in the headers: the monthly reset, counted from the injected clock
    assert copilot.retry_after(429, {}, QUOTA, now=clock) == Cooldown(
        seconds=16 * 86_400 + 12 * 3600, window_exhausted=True
    )
    # x-ratelimit-reset is epoch seconds, read against the same clock
    reset = {"x-ratelimit-reset": str(int(MID_MARCH) + 900)}
    assert copilot.retry_after(429, reset, QUOTA, now=clock) == Cooldown(seconds=900, window_exhausted=True)
    # an HTTP-date Retry-After (RFC 9110)
    date = {"Retry-After": "Sun, 15 Mar 2026 12:10:00 GMT"}
    assert copilot.retry_after(429, date, QUOTA, now=clock) == Cooldown(seconds=600, window_exhausted=True)


@pytest.mark.parametrize(
    "body",
    [
        {"error": {"message": "no quota", "type": "insufficient_quota", "code": None}},
        {"error": "quota_exceeded"},
        {"code": "insufficient_quota", "message": "no quota"},
    ],
)
def test_retry_after_other_quota_shapes(body):
    cooldown = copilot.retry_after(403, {}, json.dumps(body).encode(), now=lambda: MID_MARCH)
    assert cooldown == Cooldown(seconds=16 * 86_400 + 12 * 3600, window_exhausted=True)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (429, b'{"error":{"code":"rate_limited","message":"slow down"}}'),  # a burst limit, not a window
        (500, QUOTA),  # 5xx: the core decides, whatever the body says
        (503, b'{"error":{"message":"upstream overloaded","type":"server_error"}}'),
        (502, b"not json"),
        (200, QUOTA),
        (429, b""),
        (429, b"[1, 2]"),
        (429, b'{"error":{"code":["quota_exceeded"],"type":{"x":1}}}'),  # unhashable values
    ],
)
def test_retry_after_is_none_without_quota_info(status, body):
    def clock():
        raise AssertionError("no clock read without a quota")

    assert copilot.retry_after(status, {"Retry-After": "30"}, body, now=clock) is None


def test_retry_after_reads_no_wall_clock(monkeypatch):
    import time

    monkeypatch.setattr(time, "time", lambda: (_ for _ in ()).throw(AssertionError("time.time called")))
    assert copilot.retry_after(429, {}, QUOTA, now=lambda: MID_MARCH).window_exhausted


def test_seconds_to_month_start():
    now = datetime(2026, 12, 31, 23, 0, tzinfo=UTC).timestamp()
    assert copilot.seconds_to_month_start(now) == 3600
    now = datetime(2026, 3, 15, 0, 0, tzinfo=UTC).timestamp()
    assert copilot.seconds_to_month_start(now) == 17 * 86_400


def test_catalogue_model():
    model = {"id": "gpt-5.4", "name": "GPT-5.4", "limit": {"context": 400000}}
    adjusted = copilot.catalogue_model(copilot.OPTIONS, "gpt-5.4", model)
    assert adjusted == {**model, "provider": {"npm": "@ai-sdk/openai"}}
    assert adjusted is not model
    assert "provider" not in model

    other = {"id": "claude-sonnet-4.6", "name": "Claude Sonnet 4.6"}
    assert copilot.catalogue_model(copilot.OPTIONS, "claude-sonnet-4.6", other) is other

    with_provider = {"id": "gpt-5-mini", "provider": {"api": "x"}}
    assert copilot.catalogue_model(copilot.OPTIONS, "gpt-5-mini", with_provider) == {
        "id": "gpt-5-mini",
        "provider": {"api": "x", "npm": "@ai-sdk/openai"},
    }
    assert with_provider["provider"] == {"api": "x"}


# ── Live model list ──────────────────────────────────────────────────────────


async def test_list_models_offers_enabled_chat_models(ctx, fake):
    grant = fake.grant()
    models = await copilot.list_models(ctx, account(grant["access_token"]))
    assert models == [
        providers.ModelInfo(
            id="gpt-4.1",
            name="GPT-4.1",
            context=128_000,
            input=128_000,
            output=16_384,
            input_modalities=("text", "image"),
            reasoning=None,
            tool_call=True,
        ),
        providers.ModelInfo(
            id="gpt-5-mini",
            name="GPT-5 mini",
            context=264_000,
            input=128_000,
            output=64_000,
            input_modalities=("text", "image"),
            reasoning=True,
            tool_call=True,
        ),
        providers.ModelInfo(
            id="claude-sonnet-4.6",
            name="Claude Sonnet 4.6",
            context=200_000,
            input=168_000,
            output=32_000,
            input_modalities=("text", "image"),
            reasoning=None,
            tool_call=True,
        ),
    ]  # hidden gpt-4o-mini, policy-disabled claude-opus-4.7 and the embedding model left out
    [call] = fake.calls("/models")
    assert call.method == "GET"
    assert call.headers["authorization"] == f"Bearer {grant['access_token']}"
    assert call.headers["openai-intent"] == "conversation-edits"
    assert call.headers["user-agent"] == copilot.OPTIONS["user_agent"]
    assert call.headers["accept"] == "application/json"


async def test_list_models_maps_what_the_list_says_and_leaves_the_rest_unknown(ctx, fake):
    from tests.fakes.copilot import copilot_model

    bare = copilot_model("o9", "O9", context=None, output=None, prompt=None, tool_calls=False)
    no_caps = {"id": "mystery", "model_picker_enabled": True, "capabilities": {"type": "chat"}}
    fake.models = [
        bare,
        no_caps,
        copilot_model("no-policy", "No policy", policy=None),  # absent policy: not disabled
        copilot_model("unconfigured", "Unconfigured", policy="unconfigured"),
        {**copilot_model("weird", "Weird"), "model_picker_enabled": "yes"},  # only true counts
        copilot_model("gpt-4.1", "dup"),
        copilot_model("gpt-4.1", "dup again"),
        {"id": "", "model_picker_enabled": True, "capabilities": {"type": "chat"}},
        "not a model",
        {
            **copilot_model("big", "Big"),
            "capabilities": {"type": "chat", "limits": {"max_output_tokens": -1}},
        },
    ]
    models = await copilot.list_models(ctx, account(fake.grant()["access_token"]))
    by_id = {m.id: m for m in models}
    assert [m.id for m in models] == ["o9", "mystery", "no-policy", "unconfigured", "gpt-4.1", "big"]
    assert by_id["o9"] == providers.ModelInfo(
        id="o9", name="O9", context=None, output=None, input_modalities=("text",), tool_call=False
    )
    assert by_id["mystery"] == providers.ModelInfo(id="mystery")  # nothing known: discovery fills it
    assert by_id["gpt-4.1"].name == "dup"
    assert by_id["big"].output is None and by_id["big"].tool_call is None


async def test_list_models_uses_the_enterprise_host(ctx):
    # enterprise accounts talk to copilot-api.<domain>; a stub session records the call (no
    # network) and fails it, and the failure names the list, never the token
    seen = []

    class Unreachable:
        def request(self, method, url, **kwargs):
            seen.append((method, url, kwargs["headers"]))
            raise aiohttp.ClientConnectionError("no route")

    stub = Context(http=Unreachable(), options=ctx.options, now=ctx.now, log=ctx.log)
    with pytest.raises(providers.ProviderError) as err:
        await copilot.list_models(stub, account("gho_secret_ent", enterpriseDomain="ghe.example.com"))
    assert str(err.value) == "Copilot model list request failed: ClientConnectionError"
    [(method, url, headers)] = seen
    assert (method, url) == ("GET", "https://copilot-api.ghe.example.com/models")
    assert headers["authorization"] == "Bearer gho_secret_ent"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            error_reply(403, "Copilot is not enabled", "forbidden", code="copilot_disabled"),
            "HTTP 403 (copilot_disabled)",
        ),
        (Reply(status=500, body={"message": "boom"}), "HTTP 500"),
        (Reply(body={"object": "list"}), "without a `data` list"),
        (Reply(body={"data": {"gpt-4.1": {}}}), "without a `data` list"),
        (Reply(body=["gpt-4.1"]), "without a `data` list"),
        (Reply(events=[b'{"data": [not json'], content_type="application/json"), "without a `data` list"),
    ],
)
async def test_list_models_raises_on_a_bad_answer(ctx, fake, reply, message):
    grant = fake.grant()
    fake.models_reply = reply
    with pytest.raises(providers.ProviderError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        await copilot.list_models(ctx, account(grant["access_token"]))
    assert grant["access_token"] not in str(err.value)


async def test_list_models_with_a_revoked_token(ctx, fake):
    with pytest.raises(providers.ProviderError, match="HTTP 401") as err:
        await copilot.list_models(ctx, account("gho_revoked_secret"))
    assert "gho_revoked_secret" not in str(err.value)
    assert fake.calls("/models")[0].headers["authorization"] == "Bearer gho_revoked_secret"
