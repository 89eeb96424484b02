"""Codex: ChatGPT-plan accounts serving the OpenAI Responses API at /openai/v1/responses.

Logins use OpenAI's OAuth (browser PKCE with a pasted callback, or the device-code flow).
Requests go to the ChatGPT Codex backend, which wants `instructions`, `store: false` and a
list `input`, and rejects output-token caps; `prepare` reshapes client bodies to fit.
"""

from __future__ import annotations

import copy
import errno
import functools
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from . import (
    Account,
    Context,
    Cooldown,
    Login,
    LoginFailed,
    LoginPending,
    ModelInfo,
    ProviderError,
    ProxyRequest,
    Tokens,
    Upstream,
    Usage,
    epoch_ms,
)
from ._oauth import (
    call_json,
    expires_at_from,
    jwt_claims,
    oauth_error_code,
    parse_pasted_code,
    pkce_pair,
    token_request,
)
from ._openai import openai_transformer, responses_usage
from ._sse import compact_json, event_json, matching_events

CONTRACT = 1
NAME = "codex"
CATALOGUE = "openai"
PREFIXES = ("openai/", "codex/")
BASE_PATH = "/openai/v1"
ROUTES = {"/openai/v1/responses": "responses"}
NPM = {"responses": "@ai-sdk/openai"}
ERROR_STYLE = "openai"
MODEL_KEY_PREFIX = ""  # @ai-sdk/openai only treats ids starting with "gpt-5" as reasoning models

# GPT-5.5 and the 5.6 variants accept less than models.dev says; their real window is this.
_CODEX_LIMIT = {"context": 400000, "input": 272000, "output": 128000}

OPTIONS = {
    "api_url": "https://chatgpt.com/backend-api/codex",
    "auth_url": "https://auth.openai.com",
    "usage_url": "https://chatgpt.com/backend-api",
    "client_id": "app_EMoamEEZ73f0CkXaXp7hrann",
    "instructions_file": "",  # "" = providers/codex_instructions.md
    "originator": "opencode",
    # The Codex CLI version Kleis claims when it asks the backend for its model list: the
    # backend leaves out models whose `minimal_client_version` is newer than this.
    "client_version": "0.169.0",
    "model_allow": ["gpt-5.3-codex-spark", "gpt-5.4", "gpt-5.4-mini", "gpt-5.5"],
    "model_deny": ["gpt-5.5-pro", "gpt-5.6"],
    "model_min_version": "5.4",  # gpt-X.Y ids newer than this are allowed too
    "model_limits": {
        model: dict(_CODEX_LIMIT) for model in ("gpt-5.5", "gpt-5.6-luna", "gpt-5.6-sol", "gpt-5.6-terra")
    },
}

BROWSER_REDIRECT = "http://localhost:1455/auth/callback"  # registered for the client id
SCOPE = "openid profile email offline_access"
AUTH_CLAIM = "https://api.openai.com/auth"
PROFILE_CLAIM = "https://api.openai.com/profile"

# Client headers that carry the client's own session identity or framing; replaced or dropped.
SESSION_HEADERS = ("session_id", "session-id", "x-session-affinity", "x-session-id")
DROPPED_HEADERS = frozenset((*SESSION_HEADERS, "x-client-request-id", "accept-encoding", "content-length"))
DROPPED_FIELDS = ("max_output_tokens", "max_completion_tokens")  # the backend rejects both
PROMOTABLE_ROLES = ("developer", "system")
TEXT_PART_TYPES = ("input_text", "text")
# gpt-<major>[.<minor>] followed by a dash or the end: gpt-6, gpt-6-sol, gpt-6.1-terra, gpt-5.5
# (not gpt-4o or gpt-image-1). A missing minor counts as .0.
MODEL_VERSION = re.compile(r"^gpt-(\d+)(?:\.(\d+))?(?=-|$)")
BUNDLED_INSTRUCTIONS = Path(__file__).with_name("codex_instructions.md")


# ── Login ────────────────────────────────────────────────────────────────────


async def start_login(ctx: Context, state: str, options: dict) -> Login:
    """Browser PKCE login by default; `{"mode": "headless"}` starts the device-code flow."""
    mode = options.get("mode") if isinstance(options, Mapping) else None
    if mode == "headless":
        return await _start_device_login(ctx)
    verifier, challenge = pkce_pair()
    params = {
        "response_type": "code",
        "client_id": ctx.options["client_id"],
        "redirect_uri": BROWSER_REDIRECT,
        "scope": SCOPE,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "id_token_add_organizations": "true",
        "codex_cli_simplified_flow": "true",
        "state": state,
        "originator": ctx.options["originator"],
    }
    return Login(
        url=f"{_auth_url(ctx)}/oauth/authorize?{urlencode(params)}",
        method="code",
        instructions=(
            "Sign in, then copy the address of the page that fails to load "
            f"({BROWSER_REDIRECT}?code=…) and paste it here; the code alone works too."
        ),
        data={"mode": "browser", "verifier": verifier, "redirect_uri": BROWSER_REDIRECT},
    )


async def _start_device_login(ctx: Context) -> Login:
    body = await token_request(
        ctx,
        f"{_auth_url(ctx)}/api/accounts/deviceauth/usercode",
        json_body={"client_id": ctx.options["client_id"]},
        what="Codex device code",
    )
    device_auth_id = body.get("device_auth_id")
    user_code = body.get("user_code") or body.get("usercode")
    if not isinstance(device_auth_id, str) or not isinstance(user_code, str):
        raise ProviderError("Codex device code response lacks device_auth_id or user_code")
    interval = _seconds(body.get("interval"), default=5.0)
    url = f"{_auth_url(ctx)}/codex/device"
    return Login(
        url=url,
        method="device",
        instructions=f"Open {url} and enter the code {user_code}",
        user_code=user_code,
        interval=interval,
        data={
            "mode": "headless",
            "device_auth_id": device_auth_id,
            "user_code": user_code,
            "interval": interval,
        },
    )


async def finish_login(ctx: Context, state: str, data: dict, code: str) -> Tokens:
    """Exchange what the user pasted (callback URL, `code#state` or a bare code)."""
    if data.get("mode") != "browser":
        raise LoginFailed("this login uses a device code; it completes once the code is approved")
    auth_code, _ = parse_pasted_code(code, state)
    return await _exchange_code(ctx, auth_code, data["verifier"], data["redirect_uri"])


async def poll_login(ctx: Context, data: dict) -> Tokens:
    """One poll of the device flow; LoginPending until the user approves the code."""
    status, body = await call_json(
        ctx,
        "POST",
        f"{_auth_url(ctx)}/api/accounts/deviceauth/token",
        json_body={"device_auth_id": data["device_auth_id"], "user_code": data["user_code"]},
        what="Codex device login",
    )
    error = oauth_error_code(body)
    if 200 <= status < 300 and not error:
        auth_code = body.get("authorization_code")
        verifier = body.get("code_verifier")
        if not isinstance(auth_code, str) or not isinstance(verifier, str):
            raise ProviderError("Codex device login response lacks authorization_code or code_verifier")
        return await _exchange_code(ctx, auth_code, verifier, f"{_auth_url(ctx)}/deviceauth/callback")
    if error == "slow_down":
        interval = _seconds(data.get("interval"), default=5.0) + 5
        raise LoginPending(interval=interval, data={**data, "interval": interval})
    # The endpoint answers 403/404 while the code is simply not approved yet.
    if error == "deviceauth_authorization_pending" or status in (403, 404):
        raise LoginPending()
    if status >= 500:
        raise ProviderError(f"Codex device login failed with HTTP {status}")
    raise LoginFailed(f"Codex device login failed ({error or f'HTTP {status}'}); start again")


async def _exchange_code(ctx: Context, code: str, verifier: str, redirect_uri: str) -> Tokens:
    body = await token_request(
        ctx,
        f"{_auth_url(ctx)}/oauth/token",
        form={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": redirect_uri,
            "client_id": ctx.options["client_id"],
            "code_verifier": verifier,
        },
        what="Codex login",
    )
    return _tokens_from_response(ctx, body)


async def refresh(ctx: Context, account: Account) -> Tokens:
    """Rotate the token pair; a dead refresh token raises ReauthRequired (via token_request)."""
    body = await token_request(
        ctx,
        f"{_auth_url(ctx)}/oauth/token",
        form={
            "grant_type": "refresh_token",
            "refresh_token": account.refresh_token,
            "client_id": ctx.options["client_id"],
        },
        refreshing=True,
        what="Codex token refresh",
    )
    return _tokens_from_response(ctx, body, previous=account)


REFRESH_ROTATES = True  # a refresh token works once (a second use: refresh_token_reused)


async def check_import(ctx: Context, tokens: Tokens) -> Tokens | None:
    """Ask the ChatGPT usage endpoint whether it takes an imported access token (the identity
    comes from the token's own claims). LoginFailed when refused, ProviderError when it cannot
    be asked; None when the access token has expired (checking would spend the refresh token)."""
    if tokens.expires_at - ctx.now() < 60_000:
        return None
    headers = {"authorization": f"Bearer {tokens.access_token}", "accept": "application/json"}
    if tokens.account_id:
        headers["chatgpt-account-id"] = tokens.account_id
    status, _ = await call_json(
        ctx, "GET", f"{ctx.options['usage_url'].rstrip('/')}/wham/usage", headers=headers,
        timeout=10, what="Codex token check",
    )  # fmt: skip
    if status in (401, 403):
        raise LoginFailed(
            f"ChatGPT refused this access token (HTTP {status}): it is not a valid Codex login, or it was "
            "revoked; log in again with the official client, or with `python kleis.py accounts login codex`"
        )
    if status != 200:
        raise ProviderError(f"Codex token check answered HTTP {status}")
    return tokens


def import_auth(ctx: Context, content: dict | str) -> list[Tokens]:
    """Accounts from a Codex CLI `~/.codex/auth.json` or an OpenCode `auth.json`."""
    if isinstance(content, str):
        try:
            content = json.loads(content)
        except (ValueError, RecursionError):
            raise LoginFailed(
                "the auth file is not JSON; expected ~/.codex/auth.json or OpenCode's auth.json"
            ) from None
    if not isinstance(content, Mapping):
        raise LoginFailed("expected ~/.codex/auth.json or OpenCode's auth.json (a JSON object)")
    found: list[Tokens] = []
    codex_cli = content.get("tokens")
    if isinstance(codex_cli, Mapping):
        access, refresh_token = codex_cli.get("access_token"), codex_cli.get("refresh_token")
        if _nonblank(access) and _nonblank(refresh_token):
            found.append(
                _build_tokens(
                    ctx,
                    access,
                    refresh_token,
                    _jwt_expiry(ctx, access),
                    id_token=codex_cli.get("id_token"),
                    known_account_id=codex_cli.get("account_id"),
                )
            )
    for key in ("openai", "codex"):
        entry = content.get(key)
        if not isinstance(entry, Mapping) or entry.get("type") != "oauth":
            continue
        access, refresh_token = entry.get("access"), entry.get("refresh")
        if _nonblank(access) and _nonblank(refresh_token):
            expires_at = epoch_ms(entry.get("expires")) or _jwt_expiry(ctx, access)
            found.append(
                _build_tokens(ctx, access, refresh_token, expires_at, known_account_id=entry.get("accountId"))
            )
    if found:
        return found
    if content.get("OPENAI_API_KEY") or (
        isinstance(content.get("openai"), Mapping) and content["openai"].get("type") == "api"
    ):
        raise LoginFailed(
            "this auth file holds an OpenAI API key, not a ChatGPT login; log in to Codex with ChatGPT first"
        )
    raise LoginFailed(
        'no ChatGPT login found; expected ~/.codex/auth.json (with "tokens") '
        'or OpenCode\'s auth.json (with an "openai" oauth entry)'
    )


# ── Tokens and identity ──────────────────────────────────────────────────────


def _tokens_from_response(ctx: Context, body: Mapping, previous: Account | None = None) -> Tokens:
    access = body.get("access_token")
    refresh_token = body.get("refresh_token") or (previous.refresh_token if previous else None)
    if not _nonblank(access) or not _nonblank(refresh_token):
        raise ProviderError("Codex token response is missing the access or refresh token")
    return _build_tokens(
        ctx,
        access,
        refresh_token,
        expires_at_from(ctx, body),
        id_token=body.get("id_token"),
        previous=previous,
    )


def _build_tokens(
    ctx: Context,
    access: str,
    refresh_token: str,
    expires_at: int,
    *,
    id_token: Any = None,
    known_account_id: Any = None,
    previous: Account | None = None,
) -> Tokens:
    """Tokens with the identity read from the id token (else the access token), falling back
    to what was known before; the id token itself is never kept."""
    claims = jwt_claims(id_token if isinstance(id_token, str) else None) or jwt_claims(access)
    auth = claims.get(AUTH_CLAIM) if isinstance(claims.get(AUTH_CLAIM), Mapping) else {}
    profile = claims.get(PROFILE_CLAIM) if isinstance(claims.get(PROFILE_CLAIM), Mapping) else {}
    organizations = auth.get("organizations") or claims.get("organizations") or []
    org_ids = [
        org["id"] for org in organizations if isinstance(org, Mapping) and isinstance(org.get("id"), str)
    ]
    before = previous.metadata if previous else {}

    account_id = _first_text(
        claims.get("chatgpt_account_id"),
        auth.get("chatgpt_account_id"),
        known_account_id,
        org_ids[0] if org_ids else None,
        previous.account_id if previous else None,
        before.get("chatgptAccountId"),
    )
    email = _first_text(claims.get("email"), profile.get("email"), before.get("email"))
    return Tokens(
        access_token=access,
        refresh_token=refresh_token,
        expires_at=expires_at,
        account_id=account_id,
        label=email or (f"chatgpt:{account_id}" if account_id else "codex-account"),
        metadata={
            "chatgptAccountId": account_id,
            "email": email,
            "organizationIds": org_ids or list(before.get("organizationIds") or []),
        },
    )


def _jwt_expiry(ctx: Context, access: str) -> int:
    exp = jwt_claims(access).get("exp")
    return epoch_ms(exp) or ctx.now() + 3600 * 1000


# ── Proxying ─────────────────────────────────────────────────────────────────


def session_key(request: ProxyRequest) -> str | None:
    """The client's conversation id: body `prompt_cache_key`, else a session header."""
    candidates = [request.body.get("prompt_cache_key")]
    candidates += [request.headers.get(name) for name in SESSION_HEADERS]
    for value in candidates:
        if isinstance(value, str) and value.strip():
            return value.strip()
    return None


def prepare(ctx: Context, account: Account, request: ProxyRequest) -> Upstream:
    """The backend request: our credentials and identity headers, a reshaped copy of the body."""
    headers = {name: value for name, value in request.headers.items() if name not in DROPPED_HEADERS}
    client_originator, client_agent = headers.get("originator"), headers.get("user-agent")
    headers.update(_identity_headers(ctx, account, accept="text/event-stream"))  # the backend only streams
    headers["content-type"] = "application/json"
    if client_originator:
        # A first-party Codex client (codex_exec, codex_cli_rs) names itself: its originator and
        # user agent go on as the pair the backend sees from that client directly.
        headers["originator"] = client_originator
        headers["user-agent"] = client_agent or client_originator

    body = dict(request.body)  # shallow: only top-level keys and the input list are replaced
    for field in DROPPED_FIELDS:
        body.pop(field, None)
    body["store"] = False  # the backend refuses to store ChatGPT-plan responses
    body["stream"] = True  # and refuses non-streaming requests: those are collected by transformer()
    body["input"] = _input_items(body.get("input"))
    body["instructions"] = _instructions(ctx, body)

    session = session_key(request)
    if session:
        # Scoped to key and account so two keys reusing one client session id never share a
        # cache entry, and the client's own id never reaches the provider.
        seed = f"{request.api_key_id}:{account.id}:{session}".encode("utf-8", "surrogatepass")
        upstream_session = "kleis_" + hashlib.sha256(seed).hexdigest()[:48]
        for name in ("session-id", "x-session-affinity", "x-session-id"):
            headers[name] = upstream_session
        body["prompt_cache_key"] = upstream_session
    else:
        body.pop("prompt_cache_key", None)  # blank or not a string: only an upstream 400

    return Upstream(
        url=f"{ctx.options['api_url'].rstrip('/')}/responses", headers=headers, body=compact_json(body)
    )


def _input_items(value: Any) -> Any:
    """A list copy of `input`; a plain string (what the openai SDK sends) becomes one user
    message, which is what the Responses API means by it and the only form the backend takes."""
    if isinstance(value, str):
        return [{"role": "user", "content": [{"type": "input_text", "text": value}]}]
    if isinstance(value, list):
        return list(value)
    return value


def _instructions(ctx: Context, body: dict) -> str:
    """The client's instructions; else a leading developer/system item, which is then removed
    from `input` (OpenCode sends its prompt that way); else our default text."""
    given = body.get("instructions")
    if isinstance(given, str) and given.strip():
        return given
    items = body.get("input")
    if isinstance(items, list) and items and isinstance(items[0], Mapping):
        first = items[0]
        if first.get("role") in PROMOTABLE_ROLES and first.get("type", "message") == "message":
            text = _message_text(first.get("content"))
            if text and text.strip():
                del items[0]  # our own copy of the list
                return text
    return _default_instructions(ctx.options.get("instructions_file") or "")


def _message_text(content: Any) -> str | None:
    """Message content as one string, or None when it holds anything but text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        return None
    texts = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") not in TEXT_PART_TYPES:
            return None
        if not isinstance(part.get("text"), str):
            return None
        texts.append(part["text"])
    return "\n\n".join(texts)


@functools.lru_cache(maxsize=4)
def _default_instructions(path: str) -> str:
    file = Path(path).expanduser() if path else BUNDLED_INSTRUCTIONS
    try:
        return file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):  # Kleis's own limit, not a bad option
            raise
        raise ProviderError(f"codex instructions_file {str(file)!r} cannot be read: {exc.strerror}") from None


def transformer(ctx: Context, request: ProxyRequest, status: int, headers: Mapping):
    """Pass-through with usage (the backend sometimes omits Content-Type on streams); a client
    that did not ask for a stream gets the streamed answer collected into one JSON response."""
    if request.stream or status >= 400:
        return openai_transformer("responses", request.stream, headers)
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    if content_type and "text/event-stream" not in content_type.lower():
        return openai_transformer("responses", False, headers)  # a JSON answer after all
    body = request.body
    # The backend echoes its request fields in the response object: what Kleis set upstream for
    # itself is given back as the client sent it (None: absent). `store: false` stays: it is true.
    echoed = {name: body.get(name) for name in ("instructions", "prompt_cache_key")}
    return ResponsesCollector(echoed)


def retry_after(
    status: int, headers: Mapping, body: bytes, *, now: Callable[[], float] = time.time
) -> Cooldown | None:
    """A usage-window reset from a `usage_limit_reached` body (`resets_in_seconds`, else the
    epoch `resets_at`) or from the exhausted x-codex-{primary,secondary}-* window headers of a
    429; `now` gives epoch seconds. Anything else (a transient 429, any 5xx) is None: the core
    reads Retry-After and applies its defaults."""
    if status >= 500:
        return None
    error = _error_object(body)
    if error.get("type") == "usage_limit_reached" or error.get("code") == "usage_limit_reached":
        seconds = _reset_seconds(error.get("resets_in_seconds"), error.get("resets_at"), now)
        if seconds is not None:
            return Cooldown(seconds, window_exhausted=True)
    if status != 429:
        return None
    lowered = {str(name).lower(): value for name, value in headers.items()}
    resets = []
    for window in ("primary", "secondary"):
        used = _number(lowered.get(f"x-codex-{window}-used-percent"))
        if used is None or used < 100:
            continue
        seconds = _reset_seconds(
            lowered.get(f"x-codex-{window}-reset-after-seconds"),
            lowered.get(f"x-codex-{window}-reset-at"),
            now,
        )
        if seconds is not None:
            resets.append(seconds)
    return Cooldown(max(resets), window_exhausted=True) if resets else None


def _error_object(body: bytes) -> Mapping:
    if not body or len(body) > 65536:
        return {}
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    error = payload.get("error") if isinstance(payload, Mapping) else None
    return error if isinstance(error, Mapping) else {}


def _reset_seconds(after: Any, at: Any, now: Callable[[], float]) -> float | None:
    """Seconds until a reset given as a delay, else as an epoch (seconds or ms)."""
    delay = _number(after)
    if delay is not None:
        return max(delay, 0.0)
    when = epoch_ms(_number(at))
    if when is not None:
        return max(when / 1000 - now(), 0.0)
    return None


# ── Collected (non-streaming) responses ──────────────────────────────────────

# Where an error the backend reports inside its 200 stream lands for a client that did not
# stream: nothing was sent yet, so it gets a real HTTP error (OpenAI envelope) its SDK raises.
# Keys are the upstream error `code`, else its `type`; anything unknown is the upstream's
# fault (502). OpenCode does not retry 4xx, and retries 429/5xx (reference/clients.md §6).
ERROR_STATUS = {
    "context_length_exceeded": 400,
    "invalid_prompt": 400,
    "invalid_request_error": 400,
    "invalid_value": 400,
    "model_not_found": 404,
    "usage_not_included": 403,  # the plan does not include Codex: retrying cannot help
    "rate_limit_exceeded": 429,
    "rate_limit_error": 429,
    "usage_limit_reached": 429,
    "insufficient_quota": 429,  # what the OpenAI API answers for it
    "server_is_overloaded": 503,
    "slow_down": 503,
    "server_error": 502,
}
SERVER_WORDS = ("server", "internal", "overload", "unavailable", "timeout", "timed_out")


def _unknown_status(code: str | None) -> int:
    """A code the table does not know: the backend's own failure words make it a 502, any
    other named code is taken as a refusal of this request (400: the SDKs then raise it
    instead of re-sending the prompt), and no code at all is the backend failing (502)."""
    if code is None or any(word in code.lower() for word in SERVER_WORDS):
        return 502
    return 400


# The envelope `type` when the upstream gave none, by status (SPEC S5).
ERROR_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
# Upstream error fields worth keeping beside the standard four: the reset hints retry_after
# reads, and the plan the limit belongs to.
ERROR_EXTRAS = ("plan_type", "resets_at", "resets_in_seconds")
RESPONSE_EVENTS = ("response.completed", "response.done", "response.incomplete", "response.failed")
# Byte-level pre-filters (a JSON string holding these words has its quotes escaped, so text
# inside an event never matches): events that decide the answer, and events about items.
DECISIVE = re.compile(rb'"type"\s*:\s*"(?:response\.(?:completed|done|incomplete|failed)|error)"')
ITEM_EVENT = re.compile(rb'"type"\s*:\s*"response\.(?:output_|content_part|function_call|reasoning_summary)')


class ResponsesCollector:
    """Answers a non-streaming Responses request from the backend's SSE stream (it only
    streams). A collecting transformer (`collect = True`): the core feeds it the whole body,
    calls close(), then answers with `status` and `content_type`.

    - `response.completed` / `response.done` / `response.incomplete`: 200 with the final
      `response` object (an incomplete one keeps `status: "incomplete"`, as the API does). The
      backend may end with an empty `output` (seen with `store: false`); `output` is then
      rebuilt from the streamed items (`response.output_item.added`/`.done` and the text,
      argument and reasoning-summary deltas between them), ordered by `output_index`.
    - `error` (fields flat, as the Responses API streams them, or nested under `error`, as the
      Codex backend does) or `response.failed` (its `response.error`): the OpenAI envelope
      `{"error": {"message", "type", "param", "code"}}` with the upstream's message and code,
      status from an explicit `status` in the event, else ERROR_STATUS.
    - No terminal event: close() returns b"" and `terminal` stays False; the core reports it.

    The first terminal event decides the answer; later ones only update usage."""

    is_sse = False
    at_boundary = True
    collect = True
    content_type = "application/json"

    def __init__(self, echoed: Mapping[str, Any] | None = None) -> None:
        self.echoed = dict(echoed or {})  # response fields to give back as the client sent them
        self.usage = Usage()
        self.terminal = False
        self.status: int | None = None  # set by close()
        self._body = bytearray()
        self._response: dict | None = None  # the terminal `response` object
        self._error: tuple[int, dict] | None = None  # (status, envelope)
        self._items: dict[int, dict] = {}  # output_index -> the item as streamed so far

    def feed(self, chunk: bytes) -> bytes:
        # Nothing is parsed while the body arrives: most events are deltas that only matter
        # when the final `output` comes back empty, so close() parses them only then.
        self._body += chunk
        return b""

    def close(self) -> bytes:
        body, self._body = bytes(self._body), bytearray()
        for event in matching_events(body, DECISIVE):  # EOF may end the last one: still an event
            self._event(event)
        if self._error is not None:
            self.status, envelope = self._error
            return compact_json(envelope)
        if self._response is None:
            return b""
        response = self._response
        echoed = {name: value for name, value in self.echoed.items() if name in response}
        if echoed:
            response = {**response, **echoed}
        if not response.get("output"):
            for event in matching_events(body, ITEM_EVENT):
                payload = event_json(event)
                kind = payload.get("type") if payload else None
                if isinstance(kind, str):
                    self._track(kind, payload)
            if self._items:
                response = {**response, "output": [self._items[i] for i in sorted(self._items)]}
        self.status = 200
        return compact_json(response)

    def error_event(self, message: str) -> bytes:
        return b""  # never asked: a collecting transformer's failures are answered by the core

    # ── Events ───────────────────────────────────────────────────────────────

    def _event(self, event: bytes) -> None:
        payload = event_json(event)
        if payload is None:
            return
        kind = payload.get("type")
        response = payload.get("response")
        if isinstance(response, Mapping) and kind in RESPONSE_EVENTS:
            self.usage = responses_usage(response.get("usage")) or self.usage
        if self.terminal:
            return
        if kind == "error":
            self._fail(payload)
        elif kind in RESPONSE_EVENTS and isinstance(response, Mapping):
            if kind == "response.failed" or response.get("status") == "failed":
                self._fail(response)
            else:
                self._response = dict(response)
                self.terminal = True

    def _fail(self, source: Mapping) -> None:
        """An error event or a failed response: `source` holds the error fields flat or under
        `error`, and maybe the HTTP status the backend would have used."""
        nested = source.get("error")
        fields = nested if isinstance(nested, Mapping) else source
        code, kind = _text(fields.get("code")), _text(fields.get("type"))
        if kind in ("error", "response"):  # the event's own type, not an error type
            kind = None
        status = _http_status(source.get("status")) or _http_status(source.get("status_code"))
        status = status or ERROR_STATUS.get(code or "") or ERROR_STATUS.get(kind or "")
        status = status or _unknown_status(code)
        message = _text(fields.get("message")) or (
            f"the Codex backend failed the response ({code or kind or 'no reason given'})"
        )
        error = {
            "message": message,
            "type": kind or _error_type(status),
            "param": fields.get("param") if isinstance(fields.get("param"), str) else None,
            "code": code,
        }
        error.update({name: fields[name] for name in ERROR_EXTRAS if fields.get(name) is not None})
        self._error = (status, {"error": error})
        self.terminal = True

    def _track(self, kind: str, payload: Mapping) -> None:
        """Follow the output items as they stream, for a final response with no `output`."""
        index = payload.get("output_index")
        if not isinstance(index, int) or isinstance(index, bool):
            return
        if kind in ("response.output_item.added", "response.output_item.done"):
            item = payload.get("item")
            if isinstance(item, Mapping):
                self._items[index] = dict(item)
            return
        item = self._items.get(index)
        if item is None:
            return
        family, _, step = kind.rpartition(".")
        if family == "response.function_call_arguments":
            _grow(item, "arguments", payload, step == "done")
        elif family in PART_EVENTS:  # a whole part: content_part / reasoning_summary_part
            field, index_key, part_type = PART_EVENTS[family]
            part = payload.get("part")
            if isinstance(part, Mapping):
                _set_slot(item, field, payload.get(index_key), dict(part))
        elif family in TEXT_EVENTS:  # a part's text, as deltas then its final value
            field, index_key, part_type = TEXT_EVENTS[family]
            _grow(_slot(item, field, payload.get(index_key), part_type), "text", payload, step == "done")


# Streamed parts of an output item: event family -> (item field, index field, part type).
PART_EVENTS = {
    "response.content_part": ("content", "content_index", "output_text"),
    "response.reasoning_summary_part": ("summary", "summary_index", "summary_text"),
}
TEXT_EVENTS = {
    "response.output_text": ("content", "content_index", "output_text"),
    "response.reasoning_summary_text": ("summary", "summary_index", "summary_text"),
}


def _slot(item: dict, field: str, index: Any, part_type: str) -> dict | None:
    """Part `index` of the item's `field` list, created empty when the stream skipped its
    `*.part.added` event; None for an unusable index."""
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < 1024:
        return None
    parts = item.get(field)
    if not isinstance(parts, list):
        parts = item[field] = []
    while len(parts) <= index:
        parts.append(_empty_part(part_type))
    if not isinstance(parts[index], dict):
        parts[index] = _empty_part(part_type)
    return parts[index]


def _empty_part(part_type: str) -> dict:
    if part_type == "output_text":
        return {"type": "output_text", "text": "", "annotations": []}
    return {"type": part_type, "text": ""}


def _set_slot(item: dict, field: str, index: Any, part: dict) -> None:
    slot = _slot(item, field, index, str(part.get("type") or "output_text"))
    if slot is not None:
        slot.clear()
        slot.update(part)


def _grow(target: dict | None, field: str, payload: Mapping, done: bool) -> None:
    """Append a delta to `target[field]`, or set the final value from a `*.done` event."""
    if target is None:
        return
    if done:
        final = payload.get(field)
        if isinstance(final, str):
            target[field] = final
        return
    delta = payload.get("delta")
    if isinstance(delta, str):
        current = target.get(field)
        target[field] = (current if isinstance(current, str) else "") + delta


def _error_type(status: int) -> str:
    return ERROR_TYPE.get(status) or ("server_error" if status >= 500 else "invalid_request_error")


def _http_status(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599 else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# ── Discovery and quota ──────────────────────────────────────────────────────


def catalogue_model(options: Mapping, model_id: str, model: dict) -> dict | None:
    """Only models the ChatGPT backend serves, with their real limits."""
    wanted = model_id.lower()
    allow = {m.lower() for m in options.get("model_allow") or ()}
    deny = {m.lower() for m in options.get("model_deny") or ()}
    if wanted in deny:
        return None
    if wanted not in allow and not _newer_than_minimum(wanted, options.get("model_min_version")):
        return None
    copied = copy.deepcopy(model)
    limits = {key.lower(): value for key, value in (options.get("model_limits") or {}).items()}
    if isinstance(limits.get(wanted), Mapping):
        copied["limit"] = dict(limits[wanted])
    return copied


def _newer_than_minimum(model_id: str, minimum: Any) -> bool:
    """True when `model_id` is gpt-<major>[.<minor>]… with a version above `minimum` ("5.4",
    or a bare major such as "6"; a missing minor is 0)."""
    match = MODEL_VERSION.match(model_id)
    floor = re.fullmatch(r"(\d+)(?:\.(\d+))?", str(minimum or "").strip())
    if not match or not floor:
        return False
    return (int(match[1]), int(match[2] or 0)) > (int(floor[1]), int(floor[2] or 0))


async def list_models(ctx: Context, account: Account) -> list[ModelInfo]:
    """The models this account can use, from the backend's own list (what the Codex CLI's
    model picker shows): `GET {api_url}/models?client_version=<client_version>` with the
    account's credentials, answering `{"models": [{"slug", "display_name", "visibility",
    "supported_in_api", "context_window", "input_modalities", "supported_reasoning_levels",
    ...}]}` (see tests/data/codex-models-cli-0.169.0.json, as the backend served Codex CLI
    0.169.0). In the backend's order, each slug once. `context` is `context_window`, the input
    window the backend enforces (smaller than the model's full window; the list gives no output
    limit, so `output` stays None for discovery to fill). Raises ProviderError on a transport
    failure, a non-2xx answer or a body without a `models` list."""
    status, body = await call_json(
        ctx,
        "GET",
        f"{ctx.options['api_url'].rstrip('/')}/models?"
        + urlencode({"client_version": ctx.options.get("client_version") or OPTIONS["client_version"]}),
        headers=_identity_headers(ctx, account, accept="application/json"),
        timeout=10,
        what="Codex model list",
    )
    if not 200 <= status < 300:
        raise ProviderError(f"Codex model list request failed (HTTP {status})")
    entries = body.get("models")
    if not isinstance(entries, list):
        raise ProviderError("Codex model list answer is not JSON with a models list")
    models: dict[str, ModelInfo] = {}
    for entry in entries:
        if not isinstance(entry, Mapping) or not _nonblank(entry.get("slug")):
            continue
        # "hide" models are internal (review helpers, unreleased previews) and the CLI's picker
        # leaves them out too. `supported_in_api: false` marks models the backend serves only to
        # its own first-party surfaces, not through the Responses API that Kleis clients speak;
        # offering one would only earn the client a refusal.
        visibility = entry.get("visibility")
        if (isinstance(visibility, str) and visibility.lower() == "hide") or entry.get(
            "supported_in_api"
        ) is False:
            continue
        slug = entry["slug"].strip()
        if slug in models:
            continue
        modalities = entry.get("input_modalities")
        levels = entry.get("supported_reasoning_levels")
        models[slug] = ModelInfo(
            id=slug,
            name=entry["display_name"] if _nonblank(entry.get("display_name")) else None,
            context=_positive_int(entry.get("context_window")),
            output=None,
            input_modalities=tuple(m for m in modalities if isinstance(m, str))
            if isinstance(modalities, list)
            else None,
            reasoning=bool(levels) if isinstance(levels, list) else None,
        )
    return list(models.values())


def _positive_int(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return int(value) if 0 < value < 2**53 else None


async def quota(ctx: Context, account: Account) -> dict:
    """Plan and usage windows from the ChatGPT usage endpoint."""
    headers = {
        "authorization": f"Bearer {account.access_token}",
        "accept": "application/json",
        "user-agent": "codex-cli",
    }
    chatgpt_account = account.metadata.get("chatgptAccountId") or account.account_id
    if chatgpt_account:
        headers["chatgpt-account-id"] = chatgpt_account
    status, body = await call_json(
        ctx,
        "GET",
        f"{ctx.options['usage_url'].rstrip('/')}/wham/usage",
        headers=headers,
        timeout=10,
        what="Codex usage",
    )
    if status != 200:
        raise ProviderError(f"Codex usage request failed (HTTP {status})")
    limits = body.get("rate_limit") if isinstance(body.get("rate_limit"), Mapping) else body
    credits = body.get("credits")
    return {
        "planType": body.get("plan_type"),
        "allowed": limits.get("allowed"),
        "limitReached": limits.get("limit_reached"),
        "primaryWindow": _usage_window(limits.get("primary_window")),
        "secondaryWindow": _usage_window(limits.get("secondary_window")),
        "credits": {
            "hasCredits": credits.get("has_credits"),
            "unlimited": credits.get("unlimited"),
            "balance": credits.get("balance"),
        }
        if isinstance(credits, Mapping)
        else None,
    }


def _usage_window(window: Any) -> dict | None:
    if not isinstance(window, Mapping):
        return None
    return {
        "usedPercent": window.get("used_percent"),
        "windowSeconds": window.get("limit_window_seconds"),
        "resetAfterSeconds": window.get("reset_after_seconds"),
        "resetAt": window.get("reset_at"),
    }


# ── Small helpers ────────────────────────────────────────────────────────────


def _identity_headers(ctx: Context, account: Account, *, accept: str) -> dict[str, str]:
    """Credentials and the first-party identity for a backend call. One consistent identity:
    the backend serves first-party clients, and a client's own user agent (an SDK's, say)
    next to originator=opencode would contradict it."""
    headers = {
        "authorization": f"Bearer {account.access_token}",
        "user-agent": ctx.options["originator"],
        "originator": ctx.options["originator"],
        "accept": accept,
    }
    chatgpt_account = account.metadata.get("chatgptAccountId") or account.account_id
    if chatgpt_account:
        headers["chatgpt-account-id"] = chatgpt_account
    return headers


def _auth_url(ctx: Context) -> str:
    return ctx.options["auth_url"].rstrip("/")


def _seconds(value: Any, default: float) -> float:
    number = _number(value)
    return number if number is not None and number > 0 else default


def _number(value: Any) -> float | None:
    """A float from a number or a numeric string (headers, `interval`); None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and abs(number) != float("inf") else None


def _nonblank(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _first_text(*values: Any) -> str | None:
    for value in values:
        if _nonblank(value):
            return value
    return None
