"""GitHub Copilot: GitHub device login, the GitHub token as bearer, OpenAI-protocol pass-through.

The GitHub OAuth token (`gho_…`) is the credential: it is sent as is to the Copilot API and
stored as both access and refresh token with a synthetic expiry, because GitHub OAuth tokens do
not expire. Enterprise (GHE.com) accounts keep their domain in `metadata.enterpriseDomain`; the
OAuth host, REST API and Copilot API are derived from it.
"""

from __future__ import annotations

import itertools
import json
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

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
    ReauthRequired,
    Tokens,
    Upstream,
)
from ._oauth import call_json, oauth_error_code, token_request
from ._openai import OpenAIStream, openai_transformer
from ._sse import compact_json

CONTRACT = 1
NAME = "copilot"
CATALOGUE = "github-copilot"
PREFIXES = ("github-copilot/", "copilot/")
BASE_PATH = "/copilot/v1"
ROUTES = {
    "/copilot/v1/chat/completions": "chat_completions",
    "/copilot/v1/responses": "responses",
}
NPM = {"chat_completions": "@ai-sdk/openai-compatible", "responses": "@ai-sdk/openai"}
ERROR_STYLE = "openai"
MODEL_KEY_PREFIX = "github-copilot/"
OPTIONS = {
    "api_url": "https://api.githubcopilot.com",
    "github_url": "https://github.com",
    "github_api_url": "https://api.github.com",
    "client_id": "Ov23li8tweQw6odWQebz",
    "scope": "read:user",
    "user_agent": "GitHubCopilotChat/0.35.0",
    "token_ttl_days": 30,
}

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
SUFFIXES = {"chat_completions": "/chat/completions", "responses": "/responses"}
# Client headers that must not reach Copilot: Kleis credentials, and headers aiohttp sets itself
# (it decompresses on its own, so the client's accept-encoding could ask for zstd it cannot read).
# The body is re-encoded as plain JSON here, so a client's content-encoding no longer applies.
DROPPED_HEADERS = {
    "authorization",
    "x-api-key",
    "accept-encoding",
    "content-encoding",
    "content-length",
    "host",
}
# Error codes in a Copilot error body that mean the plan's quota is used up, not a short burst.
QUOTA_CODES = {"quota_exceeded", "insufficient_quota"}
HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)+$"
)
PUBLIC_HOSTS = {"github.com", "www.github.com", "api.github.com"}
DAY_MS = 86_400_000


# ── Hosts ────────────────────────────────────────────────────────────────────


def enterprise_domain(value: Any) -> str | None:
    """The enterprise host name in `value` (with or without scheme or path); None for github.com
    or nothing. A value that is not a host name is refused."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise LoginFailed("enterprise_domain must be a host name such as ghe.example.com")
    text = value.strip().lower()
    if not text:
        return None
    host = urlsplit(text if "//" in text else f"//{text}").hostname or ""
    if not HOSTNAME.match(host):
        raise LoginFailed(f"enterprise_domain {value.strip()!r} is not a host name such as ghe.example.com")
    return None if host in PUBLIC_HOSTS else host


def endpoints(options: Mapping[str, Any], domain: str | None) -> tuple[str, str, str]:
    """(OAuth host, REST API, Copilot API) base URLs for github.com or an enterprise domain."""
    if domain:
        return f"https://{domain}", f"https://api.{domain}", f"https://copilot-api.{domain}"
    return (
        str(options["github_url"]).rstrip("/"),
        str(options["github_api_url"]).rstrip("/"),
        str(options["api_url"]).rstrip("/"),
    )


def _github_headers(ctx: Context) -> dict[str, str]:
    return {"Accept": "application/json", "User-Agent": str(ctx.options["user_agent"])}


def _expires_at(ctx: Context) -> int:
    days = ctx.options.get("token_ttl_days")
    if isinstance(days, bool) or not isinstance(days, (int, float)) or days <= 0:
        days = OPTIONS["token_ttl_days"]
    return ctx.now() + int(days * DAY_MS)


# ── Login ────────────────────────────────────────────────────────────────────


async def start_login(ctx: Context, state: str, options: dict) -> Login:
    """Ask GitHub for a device code; the user types the code on GitHub's device page."""
    domain = enterprise_domain(options.get("enterprise_domain") or options.get("enterpriseDomain"))
    github_url, _, _ = endpoints(ctx.options, domain)
    body = await token_request(
        ctx,
        f"{github_url}/login/device/code",
        json_body={"client_id": ctx.options["client_id"], "scope": ctx.options["scope"]},
        headers=_github_headers(ctx),
        what="GitHub device code",
    )
    missing = [k for k in ("device_code", "user_code", "verification_uri") if not _text(body.get(k))]
    if missing:
        raise ProviderError(f"GitHub's device code answer lacks {', '.join(missing)}")
    interval = _positive(body.get("interval"), 5)
    expires_in = int(_positive(body.get("expires_in"), 900))
    data: dict[str, Any] = {"device_code": body["device_code"], "interval": interval}
    if domain:
        data["domain"] = domain
    return Login(
        url=body["verification_uri"],
        method="device",
        instructions=f"Enter code {body['user_code']} at {body['verification_uri']}",
        data=data,
        user_code=body["user_code"],
        interval=interval,
        expires_in=expires_in,
    )


async def finish_login(ctx: Context, state: str, data: dict, code: str) -> Tokens:
    raise LoginFailed("Copilot logins use the device flow; poll instead")


async def poll_login(ctx: Context, data: dict) -> Tokens:
    """One poll of GitHub's token endpoint for the device code in `data`."""
    device_code = data.get("device_code")
    if not _text(device_code):
        raise LoginFailed("This login has no device code; start the login again.")
    domain = data.get("domain") or None
    github_url, _, _ = endpoints(ctx.options, domain)
    status, body = await call_json(
        ctx,
        "POST",
        f"{github_url}/login/oauth/access_token",
        headers=_github_headers(ctx),
        what="GitHub token request",
        json_body={
            "client_id": ctx.options["client_id"],
            "device_code": device_code,
            "grant_type": DEVICE_GRANT,
        },
    )
    error = oauth_error_code(body) if "error" in body else ""
    if error == "authorization_pending":
        raise LoginPending()
    if error == "slow_down":
        interval = _positive(body.get("interval"), 0) or _positive(data.get("interval"), 5) + 5
        raise LoginPending(interval=interval, data={**data, "interval": interval})
    if error == "expired_token":
        raise LoginFailed("The GitHub device code expired before it was approved; start the login again.")
    if error == "access_denied":
        raise LoginFailed("The GitHub login was denied on the device page; start the login again to retry.")
    if error:
        raise LoginFailed(f"GitHub refused the device login ({error}); start the login again.")
    if not 200 <= status < 300:
        raise ProviderError(f"GitHub token request failed with HTTP {status}")
    token = body.get("access_token")
    if not _text(token):
        raise ProviderError("GitHub answered the device login without an access token")
    user = await _github_user(ctx, token, domain)
    return _tokens(ctx, token, domain, user, {})


async def refresh(ctx: Context, account: Account) -> Tokens:
    """GitHub tokens do not expire: keep the token, renew the synthetic expiry, and check with
    GET /user that GitHub still accepts it (a 401 there means the token was revoked)."""
    token = account.refresh_token or account.access_token
    if not token:
        raise ReauthRequired("The Copilot account has no GitHub token; log in again.")
    domain = account.metadata.get("enterpriseDomain") or None
    user = await _github_user(ctx, token, domain, verify=True)
    tokens = _tokens(ctx, token, domain, user, account.metadata)
    tokens.account_id = tokens.account_id or account.account_id
    return tokens


def _tokens(ctx: Context, token: str, domain: str | None, user: dict | None, previous: Mapping) -> Tokens:
    metadata = {k: v for k, v in previous.items() if k != "enterpriseDomain"}
    account_id = label = None
    if user:
        if user.get("id") is not None:
            account_id = str(user["id"])
            metadata["githubUserId"] = account_id
        if _text(user.get("login")):
            metadata["githubLogin"] = user["login"]
        label = _text(user.get("email")) or _text(user.get("login"))
    if domain:
        metadata["enterpriseDomain"] = domain
    return Tokens(
        access_token=token,
        refresh_token=token,
        expires_at=_expires_at(ctx),
        account_id=account_id,
        label=label,
        metadata=metadata,
    )


async def _github_user(ctx: Context, token: str, domain: str | None, verify: bool = False) -> dict | None:
    """GET /user; None when it fails. With `verify`, a 401 raises ReauthRequired."""
    _, api_url, _ = endpoints(ctx.options, domain)
    headers = {
        **_github_headers(ctx),
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
    }
    try:
        status, body = await call_json(
            ctx, "GET", f"{api_url}/user", headers=headers, what="GitHub user lookup"
        )
    except ProviderError as exc:
        ctx.log.warning("copilot: %s", exc)
        return None
    if status == 401 and verify:
        raise ReauthRequired(
            "GitHub rejected the Copilot account's token (revoked or expired); log in again."
        )
    if status != 200:
        ctx.log.warning("copilot: GitHub user lookup answered HTTP %s", status)
        return None
    return body


# ── Import ───────────────────────────────────────────────────────────────────


async def check_import(ctx: Context, tokens: Tokens) -> Tokens:
    """GET /user with an imported GitHub token: the user's numeric id becomes `account_id` (so
    importing the same login again, or after a device login, updates one account) and the login
    or email the label. LoginFailed when GitHub refuses the token, ProviderError otherwise."""
    token = tokens.refresh_token or tokens.access_token
    domain = tokens.metadata.get("enterpriseDomain") or None
    _, api_url, _ = endpoints(ctx.options, domain)
    headers = {
        **_github_headers(ctx),
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {token}",
    }
    status, body = await call_json(ctx, "GET", f"{api_url}/user", headers=headers, what="GitHub token check")
    if status in (401, 403):
        raise LoginFailed(
            f"GitHub refused this token (HTTP {status}): it is not a valid GitHub token, or it was revoked; "
            "import a current hosts.yml or auth.json, or log in with `python kleis.py accounts login copilot`"
        )
    if status != 200 or body.get("id") is None:
        raise ProviderError(f"GitHub token check answered HTTP {status} without a user")
    checked = _tokens(ctx, token, domain, body, tokens.metadata)
    checked.label = checked.label or tokens.label
    return checked


def import_auth(ctx: Context, content: dict | str) -> list[Tokens]:
    """Tokens from GitHub CLI's `hosts.yml` (text) or OpenCode's `auth.json` (object or text).

    No network here, so the GitHub user id is unknown: `account_id` stays None until the first
    refresh looks the user up."""
    if isinstance(content, bytes):
        content = content.decode("utf-8", "replace")
    if isinstance(content, str) and content.lstrip().startswith("{"):
        try:
            content = json.loads(content)
        except (ValueError, RecursionError):
            raise LoginFailed(
                "The file looks like JSON but does not parse; expected OpenCode's auth.json"
            ) from None
    found = _from_opencode(ctx, content) if isinstance(content, Mapping) else _from_hosts(ctx, str(content))
    if not found:
        raise LoginFailed(
            "No GitHub token found. Import GitHub CLI's ~/.config/gh/hosts.yml (with the token stored "
            "in the file, not the keyring) or OpenCode's ~/.local/share/opencode/auth.json with a "
            "github-copilot entry."
        )
    return found


def _from_opencode(ctx: Context, content: Mapping) -> list[Tokens]:
    entries = [content.get(k) for k in ("github-copilot", "github-copilot-enterprise")]
    if "refresh" in content:  # the entry itself was pasted
        entries.append(content)
    found: list[Tokens] = []
    seen: set[str] = set()
    for entry in entries:
        if not isinstance(entry, Mapping) or entry.get("type", "oauth") != "oauth":
            continue
        # OpenCode keeps the GitHub token in `refresh`; `access` may be a short-lived Copilot token.
        token = _text(entry.get("refresh"))
        if not token or token in seen:
            continue
        seen.add(token)
        domain = enterprise_domain(entry.get("enterpriseUrl"))
        found.append(_imported(ctx, token, None, domain))
    return found


def _from_hosts(ctx: Context, text: str) -> list[Tokens]:
    found: list[Tokens] = []
    seen: set[str] = set()
    for host, conf in parse_yaml(text).items():
        if not isinstance(conf, dict):
            continue
        try:
            domain = enterprise_domain(host)
        except LoginFailed:
            continue
        pairs: list[tuple[str | None, str | None]] = []
        users = conf.get("users")
        if isinstance(users, dict):
            pairs += [(login, u.get("oauth_token")) for login, u in users.items() if isinstance(u, dict)]
        pairs.append((conf.get("user"), conf.get("oauth_token")))
        for login, token in pairs:
            token = _text(token)
            if not token or token in seen:
                continue
            seen.add(token)
            found.append(_imported(ctx, token, _text(login), domain))
    return found


def _imported(ctx: Context, token: str, login: str | None, domain: str | None) -> Tokens:
    metadata: dict[str, Any] = {}
    if login:
        metadata["githubLogin"] = login
    if domain:
        metadata["enterpriseDomain"] = domain
    return Tokens(
        access_token=token,
        refresh_token=token,
        expires_at=_expires_at(ctx),
        account_id=None,
        label=login,
        metadata=metadata,
    )


YAML_ENTRY = re.compile(r"""^(?P<key>"[^"]*"|'[^']*'|[^\s#'"][^:#]*?)\s*:(?:\s+(?P<value>.*))?$""")


def parse_yaml(text: str) -> dict:
    """The block-mapping subset of YAML that `gh` writes: nested `key:` mappings and scalar
    `key: value` lines (quotes and comments allowed). Anything else is skipped."""
    root: dict = {}
    stack: list[tuple[int, dict]] = [(-1, root)]
    for raw in text.splitlines():
        body = raw.lstrip(" ")
        if not body.strip() or body.startswith("#") or body.rstrip() in ("---", "..."):
            continue
        indent = len(raw) - len(body)
        match = YAML_ENTRY.match(body.rstrip())
        if not match:
            continue
        while stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1]
        key = _yaml_scalar(match["key"])
        raw_value = (match["value"] or "").strip()
        if not raw_value or raw_value.startswith("#"):  # `key:` opens a nested mapping
            parent[key] = child = {}
            stack.append((indent, child))
        else:
            parent[key] = {} if raw_value == "{}" else _yaml_scalar(raw_value)
    return root


def _yaml_scalar(text: str) -> str:
    text = text.strip()
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        return text[1:end] if end > 0 else text[1:]
    return re.split(r"\s+#", text, maxsplit=1)[0].strip()


# ── Proxying ─────────────────────────────────────────────────────────────────


def session_key(request: ProxyRequest) -> str | None:
    for name in ("x-session-id", "x-session-affinity"):
        value = (request.headers.get(name) or "").strip()
        if value:
            return value
    key = request.body.get("prompt_cache_key")
    return key if isinstance(key, str) and key else None


def prepare(ctx: Context, account: Account, request: ProxyRequest) -> Upstream:
    suffix = SUFFIXES.get(request.endpoint)
    if suffix is None:
        raise ProviderError(f"Copilot has no {request.endpoint} endpoint")
    url = api_base(ctx, account) + suffix + (f"?{request.query}" if request.query else "")
    headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED_HEADERS}
    headers.pop("copilot-vision-request", None)
    initiator, vision = classify(request.endpoint, request.body)
    headers.update({**api_headers(account), "x-initiator": initiator})
    if vision:
        headers["copilot-vision-request"] = "true"
    headers.setdefault("content-type", "application/json")
    body = request.body
    if forces_usage(request):
        # without it a chat stream carries no usage at all; the transformer hides it again
        options = body.get("stream_options")
        options = options if isinstance(options, dict) else {}
        body = {**body, "stream_options": {**options, "include_usage": True}}
    return Upstream(url=url, headers=headers, body=compact_json(body))


def api_base(ctx: Context, account: Account) -> str:
    """The Copilot API base URL of `account`: `https://copilot-api.<domain>` for an enterprise
    (GHE.com) account, else the `api_url` option."""
    return endpoints(ctx.options, account.metadata.get("enterpriseDomain") or None)[2]


def api_headers(account: Account) -> dict[str, str]:
    """What every Copilot API call carries: the GitHub token as bearer (no token exchange, see
    the module docstring) and the intent Copilot's own clients send."""
    return {"authorization": f"Bearer {account.access_token}", "openai-intent": "conversation-edits"}


def forces_usage(request: ProxyRequest) -> bool:
    """True for a streamed chat request whose client did not ask for usage
    (`stream_options.include_usage` not true): Kleis asks upstream for it and hides it again."""
    if request.endpoint != "chat_completions" or not request.stream:
        return False
    options = request.body.get("stream_options")
    return not (isinstance(options, Mapping) and options.get("include_usage") is True)


# Part types that are an image, per API: chat `image_url` parts (any role, user or tool), Responses
# `input_image` parts and `computer_screenshot` outputs (OpenAI API reference, "Create a model
# response" input item types).
IMAGE_TYPES = {
    "chat_completions": frozenset({"image_url"}),
    "responses": frozenset({"input_image", "computer_screenshot"}),
}
# Where parts sit below an item: message `content`, and a tool result's `output`
# (`function_call_output`, `custom_tool_call_output`, `computer_call_output`), which may itself
# hold content parts.
PART_KEYS = ("content", "output")
# Bounds of the image walk, so a hostile body costs at most this many node visits: the depth
# counts containers below `messages`/`input` (a Responses tool output's parts sit at 3), the
# budget the dicts and lists looked at.
VISION_MAX_DEPTH = 8
VISION_MAX_NODES = 20_000


def classify(endpoint: str, body: Mapping) -> tuple[str, bool]:
    """(x-initiator, vision) for a request: `user` when the last item is a user turn, `agent`
    for follow-ups after tool calls; vision when an image part sits anywhere in the
    conversation (see `has_image`)."""
    items = body.get("input") if endpoint == "responses" else body.get("messages")
    if not isinstance(items, list) or not items:
        return "user", False  # a plain string input is a user prompt without images
    last = items[-1]
    initiator = "user" if isinstance(last, Mapping) and last.get("role") == "user" else "agent"
    return initiator, has_image(items, IMAGE_TYPES.get(endpoint, frozenset()))


def has_image(items: list, types: frozenset[str]) -> bool:
    """True when a part whose `type` is in `types` sits in `items` or below them under
    `content`/`output` (lists, or a single part object). Strings are never looked into.
    Iterative and bounded by VISION_MAX_DEPTH and VISION_MAX_NODES: past the bounds the answer
    is False, as for a conversation without images."""
    stack: list[tuple[Any, int]] = [(items, 0)]
    budget = VISION_MAX_NODES
    while stack:
        node, depth = stack.pop()
        budget -= 1
        if budget < 0:
            return False
        if isinstance(node, list):
            if depth < VISION_MAX_DEPTH:  # never more children than visits left
                children = itertools.islice(node, budget)
                stack.extend((child, depth + 1) for child in children if isinstance(child, (list, Mapping)))
            continue
        kind = node.get("type")
        if isinstance(kind, str) and kind in types:
            return True
        if depth < VISION_MAX_DEPTH:
            for key in PART_KEYS:
                child = node.get(key)
                if isinstance(child, (list, Mapping)):
                    stack.append((child, depth + 1))
    return False


def transformer(ctx: Context, request: ProxyRequest, status: int, headers: Mapping) -> OpenAIStream:
    return openai_transformer(request.endpoint, request.stream, headers, strip_usage=forces_usage(request))


def retry_after(
    status: int, headers: Mapping, body: bytes, *, now: Callable[[], float] = time.time
) -> Cooldown | None:
    """A used-up Copilot quota (error code or type `quota_exceeded` / `insufficient_quota` in a
    4xx body) rests the account until the reset the headers give (`Retry-After` seconds or
    HTTP date, `x-ratelimit-reset` epoch seconds), else until the monthly reset (1st, 00:00 UTC,
    when Copilot's premium allowance renews); the core bounds the length. `now` gives epoch
    seconds (the core passes its clock). Short rate limits (`rate_limited`) and 5xx answers
    are None: the core decides those from Retry-After and its own policy."""
    if not 400 <= status < 500 or not body:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not _quota_error(payload):
        return None
    at = now()
    seconds = _header_seconds(headers, at) or seconds_to_month_start(at)
    return Cooldown(seconds=seconds, window_exhausted=True)


def _quota_error(payload: Any) -> bool:
    if not isinstance(payload, Mapping):
        return False
    error = payload.get("error")
    if isinstance(error, Mapping):
        return _quota_code(error.get("code")) or _quota_code(error.get("type"))
    return _quota_code(error) or _quota_code(payload.get("code"))


def _quota_code(value: Any) -> bool:
    return isinstance(value, str) and value in QUOTA_CODES


def _header_seconds(headers: Mapping, now: float) -> float | None:
    lower = {str(k).lower(): v for k, v in headers.items()}
    retry = _number(lower.get("retry-after"))
    if retry is None and isinstance(lower.get("retry-after"), str):
        retry = _http_date(lower["retry-after"], now)  # RFC 9110 allows an HTTP date too
    if retry is not None and retry > 0:
        return retry
    reset = _number(lower.get("x-ratelimit-reset"))
    if reset is not None and reset > now:
        return reset - now
    return None


def seconds_to_month_start(now: float) -> float:
    """Seconds from `now` (epoch seconds) to the next first of the month, 00:00 UTC."""
    today = datetime.fromtimestamp(now, UTC)
    year, month = (today.year + 1, 1) if today.month == 12 else (today.year, today.month + 1)
    return datetime(year, month, 1, tzinfo=UTC).timestamp() - now


# ── Discovery ────────────────────────────────────────────────────────────────


def catalogue_model(options: Mapping, model_id: str, model: dict) -> dict | None:
    """GPT-5 models only answer on Copilot's Responses endpoint, so they get @ai-sdk/openai."""
    if not model_id.startswith("gpt-5"):
        return model
    provider = model.get("provider") if isinstance(model.get("provider"), dict) else {}
    return {**model, "provider": {**provider, "npm": NPM["responses"]}}


async def list_models(ctx: Context, account: Account) -> list[ModelInfo]:
    """The chat models this account may use today, from Copilot's `GET {api base}/models`
    (same base, bearer and intent as the chat request; enterprise accounts use their domain).

    Copilot answers `{"data": [{"id", "name", "model_picker_enabled", "policy": {"state"},
    "capabilities": {"type", "limits": {"max_context_window_tokens", "max_output_tokens",
    "max_prompt_tokens"}, "supports": {"vision", "tool_calls", "reasoning_effort", ...}}}]}`
    (as read by ericc-ch/copilot-api and the Copilot SDKs). Kept: `type` "chat", picker-enabled,
    policy not "disabled" (the rule Copilot's own model picker applies). Mapped: context =
    max_context_window_tokens, output = max_output_tokens, `supports.vision` true → input
    ("text", "image"), a `supports` without it → ("text",) (Copilot omits false flags), no
    `supports` → unknown; `supports.tool_calls` → tool_call, a non-empty
    `supports.reasoning_effort` → reasoning (else unknown). Raises ProviderError on a
    transport failure, a non-2xx answer or a body without a `data` list."""
    headers = {
        **api_headers(account),
        "accept": "application/json",
        "user-agent": str(ctx.options["user_agent"]),
    }
    status, body = await call_json(
        ctx, "GET", api_base(ctx, account) + "/models", headers=headers, what="Copilot model list"
    )
    if not 200 <= status < 300:
        code = oauth_error_code(body)
        raise ProviderError(f"Copilot model list answered HTTP {status}{f' ({code})' if code else ''}")
    data = body.get("data")
    if not isinstance(data, list):
        raise ProviderError("Copilot model list answered without a `data` list")
    models: list[ModelInfo] = []
    seen: set[str] = set()
    for entry in data:
        model = _model_info(entry)
        if model is not None and model.id not in seen:
            seen.add(model.id)
            models.append(model)
    return models


def _model_info(entry: Any) -> ModelInfo | None:
    if not isinstance(entry, Mapping) or not _text(entry.get("id")):
        return None
    capabilities = _mapping(entry.get("capabilities"))
    policy = _mapping(entry.get("policy"))
    if (
        capabilities.get("type") != "chat"
        or entry.get("model_picker_enabled") is not True
        or policy.get("state") == "disabled"
    ):
        return None
    limits = _mapping(capabilities.get("limits"))
    supports = _mapping(capabilities.get("supports"))
    vision, tools, effort = (
        supports.get("vision"),
        supports.get("tool_calls"),
        supports.get("reasoning_effort"),
    )
    return ModelInfo(
        id=entry["id"].strip(),
        name=_text(entry.get("name")),
        context=_count(limits.get("max_context_window_tokens")),
        input=_count(limits.get("max_prompt_tokens")),
        output=_count(limits.get("max_output_tokens")),
        # Copilot leaves false flags out, so a `supports` without vision means text only
        input_modalities=("text", "image") if vision is True else ("text",) if supports else None,
        reasoning=True if isinstance(effort, list) and effort else None,
        tool_call=tools if isinstance(tools, bool) else None,
    )


# ── Small helpers ────────────────────────────────────────────────────────────


def _text(value: Any) -> str | None:
    return value.strip() or None if isinstance(value, str) else None


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _http_date(value: str, now: float) -> float | None:
    try:
        return parsedate_to_datetime(value).timestamp() - now
    except (TypeError, ValueError, IndexError):
        return None


def _mapping(value: Any) -> Mapping:
    return value if isinstance(value, Mapping) else {}


def _count(value: Any) -> int | None:
    """A positive whole number of tokens, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 2**53:
        return None
    return int(value)


def _positive(value: Any, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return default
    return value
