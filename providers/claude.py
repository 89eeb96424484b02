"""Claude: Anthropic Pro/Max/Console OAuth accounts; serves POST /anthropic/v1/messages.

Logins are a PKCE code flow where the user pastes the code Anthropic shows (`code#state`).
Anthropic only accepts these tokens on traffic that looks like Claude Code, so every request
gets the Claude Code betas and user agent, the Claude Code identity as its first system block,
three small rewrites of OpenCode's system prompt, and tool names of the form `mcp_Name`.
Responses get the client's own tool names back, one SSE event at a time.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp

from . import (
    Account,
    Context,
    Cooldown,
    Login,
    LoginFailed,
    ProviderError,
    ProxyRequest,
    Tokens,
    Upstream,
    Usage,
    epoch_ms,
    token_fingerprint,
)
from ._oauth import expires_at_from, parse_pasted_code, pkce_pair, token_request
from ._sse import EventSplitter, compact_json, event_json, is_sse, marked_events, sse_frame, to_int

CONTRACT = 1
NAME = "claude"
CATALOGUE = "anthropic"
PREFIXES = ("anthropic/", "claude/")
BASE_PATH = "/anthropic/v1"
ROUTES = {"/anthropic/v1/messages": "messages"}
NPM = {"messages": "@ai-sdk/anthropic"}
ERROR_STYLE = "anthropic"
MODEL_KEY_PREFIX = "anthropic/"
OPTIONS = {
    "api_url": "https://api.anthropic.com",
    "authorize_url_max": "https://claude.ai/oauth/authorize",
    "authorize_url_console": "https://console.anthropic.com/oauth/authorize",
    "token_url": "https://console.anthropic.com/v1/oauth/token",
    "redirect_uri": "https://console.anthropic.com/oauth/code/callback",
    "client_id": "9d1c250a-e61b-44d9-88ed-5944d1962f5e",
    "beta_headers": [
        "claude-code-20250219",
        "oauth-2025-04-20",
        "interleaved-thinking-2025-05-14",
        "fine-grained-tool-streaming-2025-05-14",
    ],
    "user_agent": "claude-cli/2.1.2 (external, cli)",
    "system_identity": "You are Claude Code, Anthropic's official CLI for Claude.",
    "tool_prefix": "mcp_",
    "default_anthropic_version": "2023-06-01",
    "usage_url": "https://api.anthropic.com/api/oauth/usage",
}

SCOPES = "org:create_api_key user:profile user:inference"
# Client headers that must not reach Anthropic: Kleis credentials, headers aiohttp sets itself
# (it decompresses on its own), and the ones prepare() sets.
DROPPED_HEADERS = {
    "authorization",
    "x-api-key",
    "accept-encoding",
    "content-length",
    "host",
    "anthropic-beta",
    "anthropic-version",
    "user-agent",
    "x-app",
}
IMPORT_HINT = (
    "expected Claude Code's ~/.claude/.credentials.json (claudeAiOauth) or OpenCode's "
    'auth.json with an "anthropic" OAuth entry'
)
QUOTA_TIMEOUT = aiohttp.ClientTimeout(total=10, connect=10)


# ── Login, refresh, import ───────────────────────────────────────────────────


async def start_login(ctx: Context, state: str, options: dict) -> Login:
    """A code login on claude.ai ("max", the default) or console.anthropic.com ("console")."""
    mode = "console" if (options or {}).get("mode") == "console" else "max"
    verifier, challenge = pkce_pair()
    query = urlencode(
        {
            "code": "true",
            "client_id": ctx.options["client_id"],
            "response_type": "code",
            "redirect_uri": ctx.options["redirect_uri"],
            "scope": SCOPES,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": state,
        }
    )
    return Login(
        url=f"{ctx.options[f'authorize_url_{mode}']}?{query}",
        method="code",
        instructions=(
            "Open the link, approve access, then paste the code Anthropic shows "
            "(it looks like code#state) or the full callback URL."
        ),
        data={"mode": mode, "verifier": verifier},
        expires_in=900,
    )


async def finish_login(ctx: Context, state: str, data: dict, code: str) -> Tokens:
    """Exchange the pasted code (bare, `code#state` or a callback URL) for tokens."""
    auth_code, pasted_state = parse_pasted_code(code, state)
    verifier = data.get("verifier")
    if not verifier:
        raise LoginFailed("this login has no PKCE verifier; start the login again")
    mode = "console" if data.get("mode") == "console" else "max"
    body = await token_request(
        ctx,
        ctx.options["token_url"],
        json_body={
            "code": auth_code,
            "state": pasted_state or state,
            "grant_type": "authorization_code",
            "client_id": ctx.options["client_id"],
            "redirect_uri": ctx.options["redirect_uri"],
            "code_verifier": verifier,
        },
        what="Claude token exchange",
    )
    access, refresh_token = _required_tokens(body, None)
    profile = _profile(body)
    metadata = {"mode": mode, **profile}
    return Tokens(
        access_token=access,
        refresh_token=refresh_token,
        expires_at=expires_at_from(ctx, body),
        account_id=_account_uuid(body) or token_fingerprint(refresh_token),
        label=profile.get("email") or f"claude-{mode}",
        metadata=metadata,
    )


async def poll_login(ctx: Context, data: dict) -> Tokens:
    raise LoginFailed("Claude logins use a pasted code")


async def refresh(ctx: Context, account: Account) -> Tokens:
    """Trade the refresh token for new tokens; a dead one raises ReauthRequired."""
    body = await token_request(
        ctx,
        ctx.options["token_url"],
        json_body={
            "grant_type": "refresh_token",
            "client_id": ctx.options["client_id"],
            "refresh_token": account.refresh_token,
        },
        refreshing=True,
        what="Claude token refresh",
    )
    access, refresh_token = _required_tokens(body, account.refresh_token)
    return Tokens(
        access_token=access,
        refresh_token=refresh_token,
        expires_at=expires_at_from(ctx, body),
        account_id=_account_uuid(body) or account.account_id,
        metadata={**account.metadata, **_profile(body)},
    )


def import_auth(ctx: Context, content: dict | str) -> list[Tokens]:
    """Tokens from Claude Code's `.credentials.json` and/or OpenCode's `auth.json`."""
    if isinstance(content, (str, bytes)):
        try:
            content = json.loads(content)
        except ValueError:
            raise LoginFailed(f"the file is not JSON; {IMPORT_HINT}") from None
    if not isinstance(content, Mapping):
        raise LoginFailed(f"nothing to import; {IMPORT_HINT}")
    found: dict[str, Tokens] = {}
    claude_code = content.get("claudeAiOauth")
    if isinstance(claude_code, Mapping):
        plan = _text(claude_code.get("subscriptionType"))
        tokens = _imported(
            claude_code.get("accessToken"),
            claude_code.get("refreshToken"),
            claude_code.get("expiresAt"),
            label=f"claude-{plan or 'code'}",
            metadata={"mode": "max", "source": "claude-code", **({"plan": plan} if plan else {})},
        )
        if tokens:
            found[tokens.account_id] = tokens
    opencode = content.get("anthropic")
    if isinstance(opencode, Mapping) and opencode.get("type", "oauth") == "oauth":
        tokens = _imported(
            opencode.get("access"),
            opencode.get("refresh"),
            opencode.get("expires"),
            label="claude-opencode",
            metadata={"mode": "max", "source": "opencode"},
        )
        if tokens:
            found.setdefault(tokens.account_id, tokens)
    if not found:
        raise LoginFailed(f"no Claude OAuth tokens found; {IMPORT_HINT}")
    return list(found.values())


def _imported(access: Any, refresh_token: Any, expires: Any, *, label: str, metadata: dict) -> Tokens | None:
    access, refresh_token = _text(access), _text(refresh_token)
    if not access or not refresh_token:
        return None
    return Tokens(
        access_token=access,
        refresh_token=refresh_token,
        expires_at=epoch_ms(expires) or 0,  # unknown expiry: refresh before first use
        account_id=token_fingerprint(refresh_token),
        label=label,
        metadata=metadata,
    )


def _required_tokens(body: Mapping, old_refresh: str | None) -> tuple[str, str]:
    access = _text(body.get("access_token"))
    refresh_token = _text(body.get("refresh_token")) or old_refresh
    if not access or not refresh_token:
        raise ProviderError("Claude token response is missing the access or refresh token")
    return access, refresh_token


def _account_uuid(body: Mapping) -> str | None:
    account = body.get("account")
    return _text(account.get("uuid")) if isinstance(account, Mapping) else None


def _profile(body: Mapping) -> dict[str, str]:
    """Email and organisation name from a token response (never any token)."""
    profile = {}
    account = body.get("account")
    if isinstance(account, Mapping) and _text(account.get("email_address")):
        profile["email"] = _text(account.get("email_address"))
    organization = body.get("organization")
    if isinstance(organization, Mapping):
        name = _text(organization.get("name")) or _text(organization.get("uuid"))
        if name:
            profile["organization"] = name
    return profile


def _text(value: Any) -> str | None:
    return (value.strip() or None) if isinstance(value, str) else None


# ── Requests ─────────────────────────────────────────────────────────────────


def session_key(request: ProxyRequest) -> str | None:
    """The Claude Code session in `metadata.user_id`, else OpenCode's session headers."""
    metadata = request.body.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, Mapping) else None
    if isinstance(user_id, str) and user_id.strip():
        return _session_of(user_id.strip())
    for name in ("x-session-id", "x-session-affinity"):
        value = (request.headers.get(name) or "").strip()
        if value:
            return value
    return None


def _session_of(user_id: str) -> str:
    # Claude Code sends `user_<hash>_account_<uuid>_session_<uuid>`; newer builds a JSON object.
    if user_id.startswith("{"):
        try:
            parsed = json.loads(user_id)
        except ValueError:
            parsed = None
        if isinstance(parsed, Mapping) and _text(parsed.get("session_id")):
            return _text(parsed.get("session_id"))
    _, marker, session = user_id.rpartition("_session_")
    return session if marker and session else user_id


def prepare(ctx: Context, account: Account, request: ProxyRequest) -> Upstream:
    """The Messages request as Claude Code would send it with this account's token."""
    options = ctx.options
    query = request.query
    if "beta" not in {name for name, _ in parse_qsl(query, keep_blank_values=True)}:
        query = f"{query}&beta=true" if query else "beta=true"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}
    headers.update(
        {
            "authorization": f"Bearer {account.access_token}",
            "anthropic-beta": ",".join(
                merge_betas(options["beta_headers"], request.headers.get("anthropic-beta"))
            ),
            "anthropic-version": request.headers.get("anthropic-version")
            or options["default_anthropic_version"],
            "user-agent": options["user_agent"],
            "x-app": "cli",
        }
    )
    headers.setdefault("content-type", "application/json")
    body = shape_body(request.body, options["system_identity"], options["tool_prefix"])
    return Upstream(
        url=f"{options['api_url'].rstrip('/')}/v1/messages?{query}", headers=headers, body=compact_json(body)
    )


def merge_betas(required: Any, client: str | None) -> list[str]:
    """Required betas first (in order), then the client's comma-separated ones; no repeats."""
    if isinstance(required, str):
        required = required.split(",")
    merged: list[str] = []
    for beta in [*(required or ()), *(client or "").split(",")]:
        beta = beta.strip()
        if beta and beta not in merged:
            merged.append(beta)
    return merged


def shape_body(body: dict, identity: str, prefix: str) -> dict:
    """The body with the identity block, sanitised system and prefixed tool names.

    Copy on write: only the containers that change are copied, so the client's body is never
    mutated and a long history is not deep-copied on every request."""
    shaped = dict(body)
    if "system" in body:
        shaped["system"] = shape_system(body["system"], identity)
    server = server_tool_names(body)
    tools = body.get("tools")
    if isinstance(tools, list):
        shaped["tools"] = [
            tool if _is_server_tool(tool) else _renamed(tool, prefix, server) for tool in tools
        ]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("type") == "tool":
        shaped["tool_choice"] = _renamed(choice, prefix, server)
    messages = body.get("messages")
    if isinstance(messages, list):
        shaped["messages"] = [_message_with_prefixes(m, prefix, server) for m in messages]
    return shaped


def shape_system(system: Any, identity: str) -> Any:
    """Identity block first, then the client's system text sanitised; never the identity twice."""
    head = {"type": "text", "text": identity}
    if isinstance(system, str):
        text = sanitize(system)
        return [head] if text in ("", identity) else [head, {"type": "text", "text": text}]
    if not isinstance(system, list):
        return system
    blocks, has_identity = [], False
    for block in system:
        if isinstance(block, Mapping) and block.get("type") == "text" and isinstance(block.get("text"), str):
            text = sanitize(block["text"])
            has_identity = has_identity or text == identity
            if text != block["text"]:
                block = {**block, "text": text}
        blocks.append(block)
    return blocks if has_identity else [head, *blocks]


# Anthropic refuses OAuth requests whose system prompt looks like OpenCode's; these three
# narrow rewrites are enough and leave everything else (including other tags) alone.
REPO_LINE = re.compile(r"^([ \t]*)https://github\.com/anomalyco/opencode(?=[ \t]*\r?$)", re.I | re.M)
ENV_SENTENCE = "Here is some useful information about the environment you are running in:"
DIRECTORIES_TAG = re.compile(r"<directories>\r?\n\s*", re.I)


@functools.lru_cache(maxsize=64)  # agents resend the same system prompt every turn
def sanitize(text: str) -> str:
    text = REPO_LINE.sub(r"\1https://github.com/anomalyco/project", text)
    text = text.replace(ENV_SENTENCE, "Here is useful information about the environment you are running in:")
    return DIRECTORIES_TAG.sub("Directories\n", text)


def prefixed(name: str, prefix: str) -> str:
    """`shell` → `mcp_Shell`; names already carrying the prefix stay as they are."""
    if not name or name.startswith(prefix):
        return name
    return prefix + name[0].upper() + name[1:]


def _is_server_tool(tool: Any) -> bool:
    # Anthropic-defined tools (web_search_…, bash_…, text_editor_…) need their fixed names.
    return isinstance(tool, Mapping) and tool.get("type") not in (None, "custom")


def server_tool_names(body: Mapping) -> set[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return set()
    return {t["name"] for t in tools if _is_server_tool(t) and isinstance(t.get("name"), str)}


def _renamed(item: Any, prefix: str, server: set[str]) -> Any:
    if not isinstance(item, Mapping):
        return item
    name = item.get("name")
    if not isinstance(name, str) or name in server:
        return item
    new = prefixed(name, prefix)
    return item if new == name else {**item, "name": new}


def _message_with_prefixes(message: Any, prefix: str, server: set[str]) -> Any:
    content = message.get("content") if isinstance(message, Mapping) else None
    if not isinstance(content, list):
        return message
    blocks = [
        _renamed(b, prefix, server) if isinstance(b, Mapping) and b.get("type") == "tool_use" else b
        for b in content
    ]
    if all(new is old for new, old in zip(blocks, content, strict=True)):
        return message
    return {**message, "content": blocks}


def client_tool_names(body: Mapping, prefix: str) -> dict[str, str]:
    """Upstream name → the exact name the client used, from its tools, tool_choice and history.

    A client name that already carries the prefix maps to itself."""
    server = server_tool_names(body)
    names: list[str] = []
    tools = body.get("tools")
    if isinstance(tools, list):
        names += [
            t["name"]
            for t in tools
            if not _is_server_tool(t) and isinstance(t, Mapping) and isinstance(t.get("name"), str)
        ]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and isinstance(choice.get("name"), str):
        names.append(choice["name"])
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, Mapping) else None
        for block in content if isinstance(content, list) else ():
            if (
                isinstance(block, Mapping)
                and block.get("type") == "tool_use"
                and isinstance(block.get("name"), str)
            ):
                names.append(block["name"])
    restore: dict[str, str] = {}
    for name in names:
        if name and name not in server:
            restore.setdefault(prefixed(name, prefix), name)  # first one wins on a collision
    return restore


# ── Responses ────────────────────────────────────────────────────────────────


# Events whose JSON must be read: usage carriers and terminal events. Every other event is
# passed on without parsing unless it may carry a prefixed tool name.
WATCHED = re.compile(rb'"type"\s*:\s*"(?:message_start|message_delta|message_stop|error)"')
TOOL_USE = b'"tool_use"'


def read_usage(usage: Usage, raw: Any) -> None:
    """Override the counters present in an Anthropic `usage` object (null/absent ignored)."""
    if not isinstance(raw, Mapping):
        return
    for field, key in (
        ("input_tokens", "input_tokens"),
        ("output_tokens", "output_tokens"),
        ("cache_read_tokens", "cache_read_input_tokens"),
        ("cache_write_tokens", "cache_creation_input_tokens"),
    ):
        if raw.get(key) is not None:
            setattr(usage, field, to_int(raw[key]))


class ClaudeStream:
    """Restores tool names and reads usage in Messages responses (SSE, JSON or other)."""

    def __init__(self, mode: str, names: Callable[[], dict[str, str]], prefix: str):
        self.mode = mode  # "sse" | "json" | "raw"
        self.is_sse = mode == "sse"
        self.usage = Usage()
        self.terminal = False
        self.at_boundary = True
        self._names_of = names
        self._names: dict[str, str] | None = None
        self._prefix = prefix
        self._marker = b'"' + prefix.encode()
        # Events worth parsing: usage carriers, the end, errors, and prefixed tool names.
        self._markers = (b"message_start", b"message_delta", b"message_stop", b'"error"', self._marker)
        self._splitter = EventSplitter()
        self._body = bytearray()

    def feed(self, chunk: bytes) -> bytes:
        if self.mode == "sse":
            # Only whole events go out. Most chunks are text deltas: one regex search and two
            # substring tests over the chunk, and it passes through untouched.
            out = self._splitter.whole(chunk)
            spans = marked_events(out, self._markers) if out else ()
            if not spans:
                return out
            pieces, pos = [], 0
            for start, end in spans:  # only these events are parsed; the rest pass untouched
                pieces += (out[pos:start], self._event(out[start:end]))
                pos = end
            pieces.append(out[pos:])
            return b"".join(pieces)
        if self.mode == "json":
            self._body += chunk
            return b""
        return chunk

    def close(self) -> bytes:
        if self.mode == "sse":
            self.at_boundary = True
            return self._tail(self._splitter.rest())
        self.terminal = True
        if self.mode == "json":
            return self._json(bytes(self._body))
        return b""

    def error_event(self, message: str) -> bytes:
        return sse_frame({"type": "error", "error": {"type": "api_error", "message": message}}, event="error")

    def _event(self, event: bytes) -> bytes:
        payload = None
        if WATCHED.search(event):
            payload = event_json(event)
            if payload is not None:
                self._watch(payload)
        if self._marker in event and TOOL_USE in event:
            payload = payload if payload is not None else event_json(event)
            if payload is not None and self._restore(payload):
                return _with_data(event, payload)
        return event

    def _watch(self, payload: dict) -> None:
        kind = payload.get("type")
        if kind == "message_start":
            message = payload.get("message")
            if isinstance(message, Mapping):
                read_usage(self.usage, message.get("usage"))
        elif kind == "message_delta":
            read_usage(self.usage, payload.get("usage"))
        elif kind in ("message_stop", "error"):
            self.terminal = True

    def _tail(self, tail: bytes) -> bytes:
        """An event the upstream left without its blank line at EOF: finish it if it is whole,
        drop it if it was cut mid-JSON (it would corrupt the error event the core appends)."""
        if not tail.strip():
            return tail
        if b"data:" in tail and event_json(tail) is None:
            return b""
        newline = b"\r\n" if b"\r\n" in tail else b"\n"
        event = tail + (newline if tail.endswith(b"\n") else newline + newline)
        return self._event(event)

    def _json(self, raw: bytes) -> bytes:
        try:
            payload = json.loads(raw)
        except ValueError:
            return raw
        if not isinstance(payload, dict):
            return raw
        read_usage(self.usage, payload.get("usage"))
        if self._marker in raw and self._restore(payload):
            return compact_json(payload)
        return raw

    def _restore(self, value: Any) -> bool:
        """Give prefixed `tool_use` names (anywhere in `value`) their client spelling."""
        changed = False
        if isinstance(value, dict):
            name = value.get("name")
            if value.get("type") == "tool_use" and isinstance(name, str) and name.startswith(self._prefix):
                if self._names is None:
                    self._names = self._names_of()
                original = self._names.get(name) or name[len(self._prefix) :] or name
                if original != name:
                    value["name"] = original
                    changed = True
            children = value.values()
        elif isinstance(value, list):
            children = value
        else:
            return False
        for child in children:
            if isinstance(child, (dict, list)):
                changed = self._restore(child) or changed
        return changed


def _with_data(event: bytes, payload: dict) -> bytes:
    """`event` with its data lines replaced by one compact line where the last one stood; other
    lines (event:, id:) and the original line endings and terminator are kept."""
    lines = event.splitlines(keepends=True)
    last = max(i for i, line in enumerate(lines) if line.startswith(b"data:"))
    ending = lines[last][len(lines[last].rstrip(b"\r\n")) :]
    out = [line for line in lines[:last] if not line.startswith(b"data:")]
    out.append(b"data: " + compact_json(payload) + ending)
    out += lines[last + 1 :]
    return b"".join(out)


def transformer(ctx: Context, request: ProxyRequest, status: int, headers: Mapping) -> ClaudeStream:
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    if is_sse(content_type, request.stream):
        mode = "sse"
    elif content_type is None or "json" in content_type.lower():
        mode = "json"
    else:
        mode = "raw"
    prefix = ctx.options["tool_prefix"]
    return ClaudeStream(mode, lambda: client_tool_names(request.body, prefix), prefix)


# ── Limits and quota ─────────────────────────────────────────────────────────


UNIFIED = "anthropic-ratelimit-unified-"


def retry_after(
    status: int, headers: Mapping, body: bytes, *, now: Callable[[], float] = time.time
) -> Cooldown | None:
    """Cooldown from Anthropic's unified rate-limit headers (reset times in epoch seconds).

    A rejected window, or a 429 that names a unified reset, is a usage window running out; a
    429 without them is a short burst limit and is left to Retry-After (None)."""
    resets: dict[str, int] = {}  # window ("" = overall, "5h", "7d", ...) -> epoch ms
    rejected: set[str] = set()
    for name, value in headers.items():
        name = name.lower()
        if not name.startswith(UNIFIED) or "overage" in name or "fallback" in name:
            continue
        window, _, field = name[len(UNIFIED) :].rpartition("-")
        if field == "status" and str(value).strip().lower() == "rejected":
            rejected.add(window)
        elif field == "reset" and (at := _epoch_ms(value)) is not None:
            resets[window] = at
    if rejected:
        candidates = [resets[w] for w in rejected if w in resets] or list(resets.values())
        reset = max(candidates) if candidates else None
    elif status == 429 and resets:
        reset = resets.get("", min(resets.values()))
    else:
        return None
    if reset is None:  # rejected without a reset time: Retry-After, else the usual minute
        hint = next((v for k, v in headers.items() if k.lower() == "retry-after"), "")
        return Cooldown(seconds=float(hint) if str(hint).isdigit() else 60.0, window_exhausted=True)
    return Cooldown(seconds=max(reset / 1000 - now(), 0.0), window_exhausted=True)


def _epoch_ms(value: Any) -> int | None:
    try:
        return epoch_ms(float(value))
    except (TypeError, ValueError):
        return epoch_ms(value)


async def quota(ctx: Context, account: Account) -> dict:
    """The five-hour and seven-day utilisation windows of the account's plan."""
    headers = {
        "authorization": f"Bearer {account.access_token}",
        "accept": "application/json",
        "anthropic-beta": "oauth-2025-04-20",
        "anthropic-version": ctx.options["default_anthropic_version"],
        "user-agent": "Kleis/1 account-usage",
    }
    try:
        async with ctx.http.get(ctx.options["usage_url"], headers=headers, timeout=QUOTA_TIMEOUT) as resp:
            status, text = resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ProviderError(f"Claude usage request failed: {type(exc).__name__}") from None
    if status != 200:
        raise ProviderError(f"Claude usage request failed with HTTP {status}")
    try:
        raw = json.loads(text)
    except ValueError:
        raw = None
    if not isinstance(raw, Mapping):
        raise ProviderError("Claude usage response is not a JSON object")
    extra = raw.get("extra_usage")
    return {
        "five_hour": _window(raw.get("five_hour")),
        "seven_day": _window(raw.get("seven_day")),
        "model_windows": {
            key: _window(value)
            for key, value in raw.items()
            if key.startswith("seven_day_") and isinstance(value, Mapping)
        },
        "extra_usage": {
            key: extra.get(key)
            for key in ("is_enabled", "monthly_limit", "used_credits", "utilization", "currency")
        }
        if isinstance(extra, Mapping)
        else None,
    }


def _window(value: Any) -> dict | None:
    if not isinstance(value, Mapping):
        return None
    utilization = value.get("utilization")
    resets_at = value.get("resets_at")
    return {
        "utilization": utilization
        if isinstance(utilization, (int, float)) and not isinstance(utilization, bool)
        else None,
        "resets_at": resets_at if isinstance(resets_at, str) else None,
    }
