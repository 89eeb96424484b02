"""Claude: Anthropic Pro/Max/Console OAuth accounts; serves POST /anthropic/v1/messages and
POST /anthropic/v1/messages/count_tokens.

Logins are a PKCE code flow where the user pastes the code Anthropic shows (`code#state`).
Anthropic only accepts these tokens on traffic that looks like Claude Code, so every request
gets the Claude Code betas and user agent, the Claude Code identity as its first system block,
three small rewrites of OpenCode's system prompt, and tool names of the form `mcp_Name`
(one to one, see `ToolNames`). Genuine Claude Code already looks like itself: its system
blocks and `claude-cli/…` user agent go up unchanged. Responses get the client's own tool
names back, one SSE event at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp

from . import (
    Account,
    Context,
    Cooldown,
    Login,
    LoginFailed,
    ModelInfo,
    ProviderError,
    ProxyRequest,
    Tokens,
    Upstream,
    Usage,
    epoch_ms,
    token_fingerprint,
)
from ._cache import BoundedCache, digest, text_size
from ._oauth import expires_at_from, parse_pasted_code, pkce_pair, token_request
from ._sse import (
    EventSplitter,
    compact_json,
    event_json,
    is_sse,
    json_loads,
    marked_events,
    sse_frame,
    to_int,
)

CONTRACT = 1
NAME = "claude"
CATALOGUE = "anthropic"
PREFIXES = ("anthropic/", "claude/")
BASE_PATH = "/anthropic/v1"
ROUTES = {
    "/anthropic/v1/messages": "messages",
    "/anthropic/v1/messages/count_tokens": "count_tokens",
}
NPM = {"messages": "@ai-sdk/anthropic"}
ERROR_STYLE = "anthropic"
MODEL_KEY_PREFIX = "anthropic/"
# Token counting has its own rate limits and costs nothing: a 429 there leaves /messages alone.
UNMETERED = ("count_tokens",)
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
    "profile_url": "https://api.anthropic.com/api/oauth/profile",
}
REFRESH_ROTATES = True  # each refresh returns a new refresh token and retires the old one

SCOPES = "org:create_api_key user:profile user:inference"
# Client headers that must not reach Anthropic: Kleis credentials, headers aiohttp sets itself
# (it decompresses on its own), the client's content-encoding (the body is re-encoded here as
# plain JSON), and the ones prepare() sets.
DROPPED_HEADERS = {
    "authorization",
    "x-api-key",
    "accept-encoding",
    "content-encoding",
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
UPSTREAM_PATHS = {"messages": "/v1/messages", "count_tokens": "/v1/messages/count_tokens"}
# Messages fields the count_tokens API refuses ("Extra inputs are not permitted"); its request
# takes model, messages, system, tools, tool_choice, thinking and the beta extras
# (context_management, mcp_servers, output_config, output_format, speed, cache_control), per
# Anthropic's API reference for POST /v1/messages/count_tokens. A client that reuses its
# Messages body (max_tokens, stream, metadata, sampling) would otherwise get a 400.
NOT_COUNTED = frozenset(
    {"max_tokens", "stream", "metadata", "temperature", "top_p", "top_k", "stop_sequences", "service_tier"}
)


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
        except (ValueError, RecursionError):
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


async def check_import(ctx: Context, tokens: Tokens) -> Tokens | None:
    """Ask Anthropic's OAuth profile endpoint whether it takes an imported access token and
    whose it is (the account uuid becomes `account_id`, the email the label). LoginFailed when
    refused, ProviderError when it cannot be asked; None when the access token has expired or
    its expiry is unknown (checking would spend the single-use refresh token)."""
    if tokens.expires_at - ctx.now() < 60_000:
        return None
    view = Account("import", "", None, tokens.access_token, "", tokens.expires_at, {})
    headers = _oauth_headers(ctx, view, ctx.options["user_agent"])
    try:
        async with ctx.http.get(
            ctx.options["profile_url"], headers=headers, timeout=QUOTA_TIMEOUT, allow_redirects=False
        ) as resp:
            status, text = resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ProviderError(f"Claude token check failed: {type(exc).__name__}") from None
    if status in (401, 403):
        raise LoginFailed(
            f"Anthropic refused this access token (HTTP {status}): it is not a valid Claude login, or it "
            "was revoked; log in again with Claude Code, or with `python kleis.py accounts login claude`"
        )
    try:
        body = json.loads(text) if 200 <= status < 300 else None
    except (ValueError, RecursionError):
        body = None
    account = body.get("account") if isinstance(body, Mapping) else None
    if not isinstance(account, Mapping) or not _text(account.get("uuid")):
        raise ProviderError(f"Claude token check answered HTTP {status} without an account")
    email = _text(account.get("email")) or _text(account.get("email_address"))
    tokens.account_id = _text(account["uuid"])
    tokens.label = email or tokens.label
    tokens.metadata = {**tokens.metadata, **({"email": email} if email else {})}
    return tokens


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
        except (ValueError, RecursionError):
            parsed = None
        if isinstance(parsed, Mapping) and _text(parsed.get("session_id")):
            return _text(parsed.get("session_id"))
    _, marker, session = user_id.rpartition("_session_")
    return session if marker and session else user_id


def prepare(ctx: Context, account: Account, request: ProxyRequest) -> Upstream:
    """The Messages (or count_tokens) request as Claude Code would send it with this account's
    token: `{api_url}/v1/messages[/count_tokens]?…&beta=true`, the account's bearer token, the
    required betas merged with the client's, and the body shaped by `shape_body`."""
    options = ctx.options
    query = request.query
    if "beta" not in {name for name, _ in parse_qsl(query, keep_blank_values=True)}:
        query = f"{query}&beta=true" if query else "beta=true"
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}
    client_agent = request.headers.get("user-agent") or ""
    headers.update(
        {
            "authorization": f"Bearer {account.access_token}",
            "anthropic-beta": ",".join(
                merge_betas(options["beta_headers"], request.headers.get("anthropic-beta"))
            ),
            "anthropic-version": request.headers.get("anthropic-version")
            or options["default_anthropic_version"],
            # Claude Code's own user agent already is what Anthropic expects; a pinned older one
            # would only make a current client look stale.
            "user-agent": client_agent if client_agent.startswith("claude-cli/") else options["user_agent"],
            "x-app": "cli",
        }
    )
    headers.setdefault("content-type", "application/json")
    body = shape_body(request.body, options["system_identity"], options["tool_prefix"])
    path = UPSTREAM_PATHS.get(request.endpoint, "/v1/messages")
    if request.endpoint == "count_tokens":
        body = {k: v for k, v in body.items() if k not in NOT_COUNTED}
    return Upstream(
        url=f"{options['api_url'].rstrip('/')}{path}?{query}", headers=headers, body=compact_json(body)
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
    """The body with the identity block, sanitised system and every tool name mapped (`ToolNames`).

    Copy on write: only the containers that change are copied, so the client's body is never
    mutated and a long history is not deep-copied on every request."""
    shaped = dict(body)
    if "system" in body:
        shaped["system"] = shape_system(body["system"], identity)
    names, sites = _names_and_sites(body)
    # Only the messages that hold a tool name are rebuilt: a long history is walked once.
    shaped.update(rename_tools(body, _tool_map(names, body, prefix).upstream, sites))
    return shaped


def shape_system(system: Any, identity: str) -> Any:
    """Identity block first, then the client's system text sanitised; never the identity twice.

    A system that already opens like Claude Code's (`claude_code_system`) is returned as is."""
    head = {"type": "text", "text": identity}
    if isinstance(system, str):
        text = sanitize(system)
        return [head] if text in ("", identity) else [head, {"type": "text", "text": text}]
    if not isinstance(system, list):
        return system
    if claude_code_system(system, identity):
        return system
    blocks, has_identity = [], False
    for block in system:
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            text = sanitize(block["text"])
            has_identity = has_identity or text.startswith(identity)  # also identity + more text
            if text != block["text"]:
                block = {**block, "text": text}
        blocks.append(block)
    if has_identity:
        return blocks
    if blocks and _is_billing(blocks[0]):  # Claude Code's billing block stays first
        return [blocks[0], head, *blocks[1:]]
    return [head, *blocks]


def _is_billing(block: Any) -> bool:
    return isinstance(block, dict) and str(block.get("text", "")).startswith(BILLING_HEADER)


# The identities Claude Code opens its system prompt with: the CLI, the CLI inside the Agent SDK,
# and the Agent SDK / `claude -p` (the last is what 2.1.328 sends in the captured samples).
CLAUDE_CODE_IDENTITIES = frozenset(
    {
        "You are Claude Code, Anthropic's official CLI for Claude.",
        "You are Claude Code, Anthropic's official CLI for Claude, running within the Claude Agent SDK.",
        "You are a Claude agent, built on Anthropic's Claude Agent SDK.",
    }
)
BILLING_HEADER = "x-anthropic-billing-header:"


def claude_code_system(system: list, identity: str) -> bool:
    """Whether a system block list already is Claude Code's: an identity text block first, or
    right after a leading `x-anthropic-billing-header: …` text block (Claude Code 2.1.x). Such
    a prompt already complies, so it goes up byte for byte (no identity in front, no rewrites)."""
    texts = [
        block.get("text") if isinstance(block, dict) and block.get("type") == "text" else None
        for block in system[:2]
    ]
    if texts and isinstance(texts[0], str) and texts[0].startswith(BILLING_HEADER):
        texts = texts[1:]
    first = texts[0] if texts else None
    return isinstance(first, str) and (first.strip() == identity or first.strip() in CLAUDE_CODE_IDENTITIES)


# Anthropic refuses OAuth requests whose system prompt looks like OpenCode's; these three
# narrow rewrites are enough and leave everything else (including other tags) alone.
REPO_LINE = re.compile(r"^([ \t]*)https://github\.com/anomalyco/opencode(?=[ \t]*\r?$)", re.I | re.M)
ENV_SENTENCE = "Here is some useful information about the environment you are running in:"
ENV_REWRITE = "Here is useful information about the environment you are running in:"
DIRECTORIES_TAG = re.compile(r"<directories>\r?\n\s*", re.I)


# Agents resend the same system prompt every turn. Bounded by bytes too: a client may send
# a 32 MB system prompt per request (an entry-only bound held 64 of them, ~2 GB).
SANITIZED = BoundedCache(max_entries=64, max_bytes=8 << 20)


def sanitize(text: str) -> str:
    key = digest(text)
    cached = SANITIZED.get(key)
    if cached is not None:
        return cached
    clean = REPO_LINE.sub(r"\1https://github.com/anomalyco/project", text)
    clean = clean.replace(ENV_SENTENCE, ENV_REWRITE)
    clean = DIRECTORIES_TAG.sub("Directories\n", clean)
    SANITIZED.put(key, clean, text_size(clean))
    return clean


# ── Tool names ───────────────────────────────────────────────────────────────

# Anthropic's rule for custom tool names (Messages API reference, `tools[].name`).
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
TOOL_NAME_MAX = 128
NOT_IN_TOOL_NAME = re.compile(r"[^a-zA-Z0-9_-]")


def prefixed(name: str, prefix: str) -> str:
    """`shell` → `mcp_Shell`; names already carrying the prefix stay as they are (prior art §3.4)."""
    if not name or name.startswith(prefix):
        return name
    return prefix + name[0].upper() + name[1:]


class ToolNames:
    """The one-to-one map between the client's tool names and Anthropic's for one request.

    Each client name gets `prefixed(name)` (`shell` → `mcp_Shell`) unless that is not a valid
    Anthropic name (over 128 characters, or outside `[a-zA-Z0-9_-]`) or another name has a
    better claim to it: a name that already is its own upstream form (`mcp_Read`) beats one
    that only needs the prefix (`Read`), which beats one whose first letter had to change
    (`read`). Server tools (typed tools such as `web_search_20250305`) keep their fixed names,
    which no client name may take. A name left without its preferred form gets it cleaned,
    cut and suffixed with `_` and 8 hex digits of a SHA-256 of the client name, so the map is
    the same on every turn whatever order the names come in.

    `upstream`: client name → Anthropic name; `client`: the inverse."""

    def __init__(self, names: Iterable[str], prefix: str, fixed: Iterable[str] = ()):
        self.prefix = prefix
        self.upstream: dict[str, str] = {name: name for name in fixed}
        taken = set(self.upstream)
        losers: list[str] = []
        wanted = {name for name in names if name and name not in taken}
        for name in sorted(wanted, key=lambda name: (_claim(name, prefix), name)):
            want = prefixed(name, prefix)
            if want in taken or not TOOL_NAME.fullmatch(want):
                losers.append(name)
            else:
                self.upstream[name] = want
                taken.add(want)
        for name in losers:  # after every preferred form is placed, so a suffix never displaces one
            self.upstream[name] = _suffixed(name, prefix, taken)
            taken.add(self.upstream[name])
        self.client = {up: name for name, up in self.upstream.items()}

    def to_client(self, name: str) -> str:
        """The client's spelling of an upstream name; a prefixed name the request never had
        (the model made it up) loses the prefix, anything else stays."""
        if name in self.client:
            return self.client[name]
        if self.prefix and name.startswith(self.prefix) and len(name) > len(self.prefix):
            return name[len(self.prefix) :]
        return name


def _claim(name: str, prefix: str) -> int:
    want = prefixed(name, prefix)
    return 0 if want == name else 1 if want == prefix + name else 2


def _suffixed(name: str, prefix: str, taken: set[str]) -> str:
    base = NOT_IN_TOOL_NAME.sub("_", prefixed(name, prefix))
    for salt in itertools.count():
        digest = hashlib.sha256(f"{salt}:{name}".encode() if salt else name.encode()).hexdigest()[:8]
        candidate = f"{base[: TOOL_NAME_MAX - 9]}_{digest}"
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


def _is_server_tool(tool: Any) -> bool:
    # Anthropic-defined tools (web_search_…, bash_…, text_editor_…) need their fixed names.
    return isinstance(tool, dict) and tool.get("type") not in (None, "custom")


def server_tool_names(body: Mapping) -> set[str]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return set()
    return {t["name"] for t in tools if _is_server_tool(t) and isinstance(t.get("name"), str)}


def tool_names(body: Mapping, prefix: str) -> ToolNames:
    """The map for this request body, from every tool name in it (see `rename_tools`)."""
    return _tool_map(_names_and_sites(body)[0], body, prefix)


def _names_and_sites(body: Mapping) -> tuple[list[str], list[int]]:
    """Every tool name in `body` where `rename_tools` looks, and the indices of the messages
    holding one. Reads only: nothing is copied, so a long history costs one walk."""
    seen: list[str] = []
    note = seen.append
    tools = body.get("tools")
    if isinstance(tools, list):
        for tool in tools:
            if not _is_server_tool(tool) and isinstance(tool, dict) and isinstance(tool.get("name"), str):
                note(tool["name"])
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and isinstance(choice.get("name"), str):
        note(choice["name"])
    sites: list[int] = []
    messages = body.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            if isinstance(content, list):
                before = len(seen)
                for block in content:
                    if isinstance(block, dict):
                        _block_names(block, note)
                if len(seen) > before:
                    sites.append(index)
    management = body.get("context_management")
    edits = management.get("edits") if isinstance(management, dict) else None
    if isinstance(edits, list):
        for edit in edits:
            names = edit.get("exclude_tools") if isinstance(edit, dict) else None
            if isinstance(names, list):
                seen += (name for name in names if isinstance(name, str))
    return seen, sites


def _block_names(block: dict, note: Callable[[str], None]) -> None:
    """The names `_block` would rename in this content block."""
    kind = block.get("type")
    if kind == "tool_use":
        if isinstance(block.get("name"), str):
            note(block["name"])
    elif kind == "tool_reference":
        if isinstance(block.get("tool_name"), str):
            note(block["tool_name"])
    elif kind == "tool_result" and isinstance(block.get("content"), list):
        for b in block["content"]:
            if _is(b, "tool_reference") and isinstance(b.get("tool_name"), str):
                note(b["tool_name"])
    elif kind == "tool_search_tool_result" and isinstance(block.get("content"), dict):
        refs = block["content"].get("tool_references")
        if isinstance(refs, list):
            for ref in refs:
                if _is(ref, "tool_reference") and isinstance(ref.get("tool_name"), str):
                    note(ref["tool_name"])


def _tool_map(seen: list[str], body: Mapping, prefix: str) -> ToolNames:
    names, fixed = sorted(set(seen)), sorted(server_tool_names(body))
    # An agent sends the same tools every turn: the map is built once per tool set (it is
    # never mutated after construction, so sharing it between requests is safe).
    key = digest(prefix, str(len(names)), *names, *fixed)
    cached = TOOL_MAPS.get(key)
    if cached is None:
        cached = ToolNames(names, prefix, fixed)
        TOOL_MAPS.put(key, cached, sum(3 * text_size(name) + 200 for name in names))  # both maps
    return cached


TOOL_MAPS = BoundedCache(max_entries=256, max_bytes=8 << 20)


def rename_tools(
    body: Mapping, rename: Callable[[str], str] | Mapping[str, str], sites: list[int] | None = None
) -> dict[str, Any]:
    """The top-level fields of `body` that change when `rename` is applied to every tool name
    in it (copies of just the changed containers). Where tool names appear in a Messages body:
    `tools[].name` (custom tools only), `tool_choice.name` ({type: tool}), `tool_use` blocks,
    `tool_reference` blocks (`tool_name`, inside `tool_result` content: tool search as Claude
    Code does it), `tool_search_tool_result.content.tool_references[]`, and
    `context_management.edits[].exclude_tools`. `sites`, when given, are the indices of the
    only messages holding tool names (`_names_and_sites`); the others are not looked at."""
    if isinstance(rename, dict):
        mapping = rename
        rename = lambda name: mapping.get(name, name)  # noqa: E731
    changes: dict[str, Any] = {}
    tools = body.get("tools")
    if isinstance(tools, list):
        new = [tool if _is_server_tool(tool) else _named(tool, "name", rename) for tool in tools]
        if _changed(new, tools):
            changes["tools"] = new
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool":
        new_choice = _named(choice, "name", rename)
        if new_choice is not choice:
            changes["tool_choice"] = new_choice
    messages = body.get("messages")
    if isinstance(messages, list) and sites is None:
        new = [_message(message, rename) for message in messages]
        if _changed(new, messages):
            changes["messages"] = new
    elif isinstance(messages, list) and sites:
        new, changed = list(messages), False
        for index in sites:
            new[index] = _message(messages[index], rename)
            changed = changed or new[index] is not messages[index]
        if changed:
            changes["messages"] = new
    management = body.get("context_management")
    edits = management.get("edits") if isinstance(management, dict) else None
    if isinstance(edits, list):
        new = [_edit(edit, rename) for edit in edits]
        if _changed(new, edits):
            changes["context_management"] = {**management, "edits": new}
    return changes


def _changed(new: list, old: list) -> bool:
    return any(a is not b for a, b in zip(new, old, strict=True))


def _named(item: Any, key: str, rename: Callable[[str], str]) -> Any:
    if not isinstance(item, dict) or not isinstance(item.get(key), str):
        return item
    name = rename(item[key])
    return item if name == item[key] else {**item, key: name}


def _message(message: Any, rename: Callable[[str], str]) -> Any:
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    blocks = [_block(block, rename) for block in content]
    return {**message, "content": blocks} if _changed(blocks, content) else message


def _block(block: Any, rename: Callable[[str], str]) -> Any:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind == "tool_use":
        return _named(block, "name", rename)
    if kind == "tool_reference":
        return _named(block, "tool_name", rename)
    if kind == "tool_result" and isinstance(block.get("content"), list):
        content = block["content"]
        new = [_named(b, "tool_name", rename) if _is(b, "tool_reference") else b for b in content]
        return {**block, "content": new} if _changed(new, content) else block
    if kind == "tool_search_tool_result" and isinstance(block.get("content"), dict):
        result = block["content"]
        refs = result.get("tool_references")
        if isinstance(refs, list):
            new = [_named(ref, "tool_name", rename) if _is(ref, "tool_reference") else ref for ref in refs]
            if _changed(new, refs):
                return {**block, "content": {**result, "tool_references": new}}
    return block


def _is(item: Any, kind: str) -> bool:
    return isinstance(item, dict) and item.get("type") == kind


def _edit(edit: Any, rename: Callable[[str], str]) -> Any:
    names = edit.get("exclude_tools") if isinstance(edit, dict) else None
    if not isinstance(names, list):
        return edit
    new = [rename(name) if isinstance(name, str) else name for name in names]
    return {**edit, "exclude_tools": new} if new != names else edit


# ── Responses ────────────────────────────────────────────────────────────────


# Events whose JSON must be read: usage carriers and terminal events. Every other event is
# passed on without parsing unless it may carry a prefixed tool name: a `tool_use` block (its
# `name`) or a `tool_reference` (its `tool_name`, in server tool search results).
WATCHED = re.compile(rb'"type"\s*:\s*"(?:message_start|message_delta|message_stop|error)"')
NAMED_BLOCKS = (b'"tool_use"', b'"tool_reference"')
NAME_KEYS = {"tool_use": "name", "tool_reference": "tool_name"}


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
    """Restores tool names and reads usage in Messages responses (SSE, JSON or other).

    `names` builds the request's `ToolNames`; it is called at most once, and only when a
    response event carries a prefixed tool name."""

    def __init__(self, mode: str, names: Callable[[], ToolNames], prefix: str):
        self.mode = mode  # "sse" | "json" | "raw"
        self.is_sse = mode == "sse"
        self.usage = Usage()
        self.terminal = False
        self.at_boundary = True
        self._names_of = names
        self._names: ToolNames | None = None
        self._prefix = prefix
        self._marker = b'"' + prefix.encode()
        # Events worth parsing: usage carriers, the end, errors, and prefixed tool names.
        self._markers = (b"message_start", b"message_delta", b"message_stop", b'"error"', self._marker)
        self._splitter = EventSplitter()
        self._body = bytearray()

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished event held (SSE; other bodies are counted by the core)."""
        return self._splitter.buffered

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
        if self._marker in event and any(marker in event for marker in NAMED_BLOCKS):
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
            payload = json_loads(raw)
            if not isinstance(payload, dict):
                return raw
            read_usage(self.usage, payload.get("usage"))
            if self._marker in raw and self._restore(payload):
                return compact_json(payload)
        except (ValueError, RecursionError):  # junk, or nesting deeper than any real answer
            return raw
        return raw

    def _restore(self, value: Any) -> bool:
        """Give prefixed `tool_use` / `tool_reference` names (anywhere in `value`) their client
        spelling."""
        changed = False
        if isinstance(value, dict):
            key = NAME_KEYS.get(value.get("type"))  # type: ignore[arg-type]
            name = value.get(key) if key else None
            if isinstance(name, str) and name.startswith(self._prefix):
                if self._names is None:
                    self._names = self._names_of()
                original = self._names.to_client(name)
                if original != name:
                    value[key] = original
                    changed = True
            # A tool's input is the model's data for the client, never renamed.
            children = (v for k, v in value.items() if k != "input" or key is None)
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
    """Messages: SSE or JSON with tool names restored and usage read. count_tokens: the body
    (`{"input_tokens": N}` or an error) relayed as is, with no usage: counting is not billed."""
    content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    if request.endpoint == "count_tokens":
        mode = "raw"
    elif is_sse(content_type, request.stream):
        mode = "sse"
    elif content_type is None or "json" in content_type.lower():
        mode = "json"
    else:
        mode = "raw"
    prefix = ctx.options["tool_prefix"]
    return ClaudeStream(mode, lambda: tool_names(request.body, prefix), prefix)


# ── Limits and quota ─────────────────────────────────────────────────────────


UNIFIED = "anthropic-ratelimit-unified-"


def retry_after(status: int, headers: Mapping, body: bytes, *, now: Callable[[], float]) -> Cooldown | None:
    """How long to rest an account after a 429, from Anthropic's unified rate-limit headers
    (`anthropic-ratelimit-unified-<window>-status` / `-reset`, windows such as `5h` and `7d`,
    resets in epoch seconds; the unnamed `…-unified-status` / `-reset` is the overall state,
    whose reset follows the binding window even when that window still allows requests).
    `now` gives epoch seconds. Returns a `Cooldown` with `window_exhausted=True`, or None.

    Only what was refused counts:
    1. windows whose own status is `rejected` and that name a reset: rest until the latest of
       those resets (every rejected window must have reopened);
    2. else, when the overall status is `rejected`: until the overall reset;
    3. rejected (a window or overall) without any usable reset: Retry-After seconds, else 60 s.
    A 429 with no rejected status (a short burst limit) and every other status (5xx, 529
    overloaded) return None: the core then decides from Retry-After or its defaults. Overage
    (extra usage) and fallback headers are not usage windows and are ignored."""
    if status != 429:
        return None
    statuses: dict[str, str] = {}  # window ("" = overall, "5h", "7d", ...) -> status
    resets: dict[str, int] = {}  # window -> epoch ms
    for name, value in headers.items():
        name = name.lower()
        if not name.startswith(UNIFIED) or "overage" in name or "fallback" in name:
            continue
        window, _, field = name[len(UNIFIED) :].rpartition("-")
        if field == "status":
            statuses[window] = str(value).strip().lower()
        elif field == "reset" and (at := _epoch_ms(value)) is not None:
            resets[window] = at
    rejected = {window for window, state in statuses.items() if window and state == "rejected"}
    reset = max((resets[w] for w in rejected if w in resets), default=None)
    if reset is None and statuses.get("") == "rejected":
        reset = resets.get("")
    if reset is None and not rejected and statuses.get("") != "rejected":
        return None
    if reset is None:
        hint = str(next((v for k, v in headers.items() if k.lower() == "retry-after"), "")).strip()
        return Cooldown(seconds=float(hint) if hint.isdigit() else 60.0, window_exhausted=True)
    return Cooldown(seconds=max(reset / 1000 - now(), 0.0), window_exhausted=True)


def _epoch_ms(value: Any) -> int | None:
    try:
        return epoch_ms(float(value))
    except (TypeError, ValueError):
        return epoch_ms(value)


def _oauth_headers(ctx: Context, account: Account, user_agent: str) -> dict[str, str]:
    """Headers of Kleis's own calls to Anthropic's OAuth-authenticated endpoints (usage, models)."""
    return {
        "authorization": f"Bearer {account.access_token}",
        "accept": "application/json",
        "anthropic-beta": "oauth-2025-04-20",
        "anthropic-version": ctx.options["default_anthropic_version"],
        "user-agent": user_agent,
    }


async def _get_json(ctx: Context, url: str, headers: dict[str, str], what: str) -> Mapping:
    """GET a JSON object; ProviderError (status or error class only, never a token) otherwise."""
    try:
        async with ctx.http.get(url, headers=headers, timeout=QUOTA_TIMEOUT, allow_redirects=False) as resp:
            status, text = resp.status, await resp.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ProviderError(f"Claude {what} request failed: {type(exc).__name__}") from None
    if not 200 <= status < 300:
        raise ProviderError(f"Claude {what} request failed with HTTP {status}")
    try:
        raw = json.loads(text)
    except (ValueError, RecursionError):
        raw = None
    if not isinstance(raw, Mapping):
        raise ProviderError(f"Claude {what} response is not a JSON object")
    return raw


async def quota(ctx: Context, account: Account) -> dict:
    """The five-hour and seven-day utilisation windows of the account's plan."""
    headers = _oauth_headers(ctx, account, "Kleis/1 account-usage")
    raw = await _get_json(ctx, ctx.options["usage_url"], headers, "usage")
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


# ── Models ───────────────────────────────────────────────────────────────────

MODELS_PAGE = 1000  # the most Anthropic's model list gives per page
MODELS_MAX_PAGES = 20  # a bound on paging, far above any real list


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


async def list_models(ctx: Context, account: Account) -> list[ModelInfo]:
    """The models this account can use, from Anthropic's `GET {api_url}/v1/models` (pages of
    `limit=1000`, then `after_id=<last_id>` while `has_more`, at most 20 pages). Each model gives
    `id`, `display_name` (→ `name`), `created_at` (→ `release_date`) and, in current API
    versions, `max_input_tokens` (→ `context`) and `max_tokens` (→ `output`).
    Raises ProviderError on a network error, a non-2xx answer (a 401 too: the core refreshes
    tokens, not this) or a body that is not the documented JSON."""
    url = f"{ctx.options['api_url'].rstrip('/')}/v1/models"
    headers = _oauth_headers(ctx, account, ctx.options["user_agent"])
    models: dict[str, ModelInfo] = {}
    after: str | None = None
    for _ in range(MODELS_MAX_PAGES):
        query = {"limit": str(MODELS_PAGE), **({"after_id": after} if after else {})}
        page = await _get_json(ctx, f"{url}?{urlencode(query)}", headers, "model list")
        data = page.get("data")
        if not isinstance(data, list):
            raise ProviderError("Claude model list response has no data list")
        for item in data:
            model_id = _text(item.get("id")) if isinstance(item, Mapping) else None
            if model_id and model_id not in models:
                created = _text(item.get("created_at"))
                models[model_id] = ModelInfo(
                    id=model_id,
                    name=_text(item.get("display_name")),
                    context=_positive(item.get("max_input_tokens")),
                    output=_positive(item.get("max_tokens")),
                    release_date=created[:10] if created and len(created) >= 10 else None,
                )
        last = _text(page.get("last_id")) or (
            _text(data[-1].get("id")) if data and isinstance(data[-1], Mapping) else None
        )
        if page.get("has_more") is not True or not last or last == after:
            break
        after = last
    else:
        ctx.log.warning("Claude model list: stopped after %d pages", MODELS_MAX_PAGES)
    return list(models.values())
