"""A fake of Anthropic's OAuth and Messages API for the Claude adapter and the proxy tests.

Routes: `GET /oauth/authorize` (approves at once and answers `code#state` as text),
`POST /v1/oauth/token` (authorization_code with PKCE, rotating single-use refresh tokens),
`POST /v1/messages` (bearer check, then the queued reply or a realistic default),
`POST /v1/messages/count_tokens` (bearer check, then the queued reply or `{"input_tokens": N}`),
`GET /v1/models` (bearer check, `limit` / `after_id` paging over `models`) and
`GET /api/oauth/usage`.

Like Anthropic, the Messages and count_tokens routes answer 400 `invalid_request_error` to
tool names outside `^[a-zA-Z0-9_-]{1,128}$`, to duplicate tool names and to a `tool_choice` or
`tool_reference` naming no tool of the request; count_tokens also refuses Messages-only fields.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import time
from typing import Any

from aiohttp import web

from . import FakeServer, Reply, sse

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
DEFAULT_UUID = "4f9c2b1e-0000-4000-8000-00000000c1a0"
DEFAULT_EMAIL = "dev@example.test"
TOOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
# What POST /v1/messages/count_tokens accepts (Anthropic API reference); anything else is a 400.
COUNT_FIELDS = frozenset(
    {
        "model",
        "messages",
        "system",
        "tools",
        "tool_choice",
        "thinking",
        "context_management",
        "mcp_servers",
        "output_config",
        "output_format",
        "speed",
        "cache_control",
    }
)
DEFAULT_MODELS = [
    {"type": "model", "id": "claude-opus-4-1-20250805", "display_name": "Claude Opus 4.1"},
    {"type": "model", "id": "claude-sonnet-4-5-20250929", "display_name": "Claude Sonnet 4.5"},
    {"type": "model", "id": "claude-haiku-4-5-20251001", "display_name": "Claude Haiku 4.5"},
]


def challenge_of(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


class FakeClaude(FakeServer):
    """Anthropic stand-in. Tokens are opaque counters; state lives in plain dicts.

    codes:          code -> {"challenge", "uuid", "email"} (single use)
    access_tokens:  access token -> expiry (epoch seconds)
    refresh_tokens: live refresh token -> {"uuid", "email"}; a used one answers invalid_grant
    """

    def __init__(self) -> None:
        super().__init__()
        self.client_id = CLIENT_ID
        self.access_ttl = 3600  # seconds; expires_in of every token response
        self.rotate_refresh = True  # False: refresh responses omit refresh_token (old one stays)
        self.include_account = True  # token responses carry `account` and `organization`
        self.codes: dict[str, dict[str, Any]] = {}
        self.access_tokens: dict[str, float] = {}
        self.refresh_tokens: dict[str, dict[str, Any]] = {}
        self.used_refresh_tokens: set[str] = set()
        self.refresh_calls = 0
        self.usage_body: dict[str, Any] = {
            "five_hour": {"utilization": 12.0, "resets_at": "2026-11-27T18:00:00+00:00"},
            "seven_day": {"utilization": 40.5, "resets_at": "2026-12-01T00:00:00+00:00"},
            "seven_day_opus": {"utilization": 3.0, "resets_at": "2026-12-01T00:00:00+00:00"},
            "seven_day_oauth_apps": None,
            "extra_usage": {
                "is_enabled": False,
                "monthly_limit": None,
                "used_credits": None,
                "utilization": None,
                "currency": "USD",
            },
        }
        # GET /v1/models: the list it pages over, the most one page may hold (Anthropic: 1000),
        # and a reply that replaces every answer (an error, or a body that is not a list).
        self.models: list[dict[str, Any]] = [dict(m) for m in DEFAULT_MODELS]
        self.models_page_max = 1000
        self.models_reply: Reply | None = None
        self._ids = itertools.count(1)
        self.app.router.add_get("/oauth/authorize", self._authorize)
        self.app.router.add_post("/v1/oauth/token", self._token)
        self.app.router.add_post("/v1/messages", self._messages)
        self.app.router.add_post("/v1/messages/count_tokens", self._count_tokens)
        self.app.router.add_get("/v1/models", self._models)
        self.app.router.add_get("/api/oauth/usage", self._usage)
        self.app.router.add_get("/api/oauth/profile", self._profile)
        self.access_owners: dict[str, dict[str, str]] = {}  # access token -> {"uuid", "email"}

    def options(self) -> dict[str, str]:
        """Provider options pointing every upstream URL at this fake."""
        return {
            "api_url": self.url,
            "token_url": self.url + "/v1/oauth/token",
            "usage_url": self.url + "/api/oauth/usage",
            "profile_url": self.url + "/api/oauth/profile",
            "authorize_url_max": self.url + "/oauth/authorize",
            "authorize_url_console": self.url + "/oauth/authorize",
        }

    # ── Tokens ───────────────────────────────────────────────────────────────

    def issue_code(
        self, challenge: str | None = None, *, uuid: str = DEFAULT_UUID, email: str = DEFAULT_EMAIL
    ) -> str:
        """An authorization code; with a challenge, the exchange must send the matching verifier."""
        code = f"code-{next(self._ids)}"
        self.codes[code] = {"challenge": challenge, "uuid": uuid, "email": email}
        return code

    def grant(self, uuid: str = DEFAULT_UUID, email: str = DEFAULT_EMAIL) -> dict[str, Any]:
        """A live token pair, as if a login had just happened."""
        body = self._issue(uuid, email)
        return {
            "access_token": body["access_token"],
            "refresh_token": body["refresh_token"],
            "expires_at": int(self.access_tokens[body["access_token"]] * 1000),
            "account_id": uuid,
        }

    def expire(self, access_token: str) -> None:
        self.access_tokens[access_token] = 0

    def _issue(self, uuid: str, email: str, *, refresh: str | None = None) -> dict[str, Any]:
        n = next(self._ids)
        access = f"sk-ant-oat01-fake-{n}"
        self.access_tokens[access] = time.time() + self.access_ttl
        self.access_owners[access] = {"uuid": uuid, "email": email}
        body: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": access,
            "expires_in": self.access_ttl,
            "scope": "user:inference user:profile",
        }
        if refresh is None:
            refresh = f"sk-ant-ort01-fake-{n}"
            body["refresh_token"] = refresh
        self.refresh_tokens[refresh] = {"uuid": uuid, "email": email}
        if self.include_account:
            body["organization"] = {"uuid": "org-0001", "name": "Example Org"}
            body["account"] = {"uuid": uuid, "email_address": email}
        return body

    async def _authorize(self, request: web.Request) -> web.Response:
        query = request.query
        if query.get("client_id") != self.client_id or query.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="bad authorize request")
        code = self.issue_code(query.get("code_challenge"))
        return web.Response(text=f"{code}#{query.get('state', '')}")

    async def _token(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        try:
            body = rec.json
        except ValueError:
            body = None
        if not isinstance(body, dict) or not request.content_type.startswith("application/json"):
            return _oauth_error("invalid_request", "expected a JSON body")
        if body.get("client_id") != self.client_id:
            return _oauth_error("invalid_client", "unknown client_id", status=401)
        grant = body.get("grant_type")
        if grant == "authorization_code":
            entry = self.codes.pop(str(body.get("code")), None)
            if entry is None:
                return _oauth_error("invalid_grant", "unknown or used code")
            if entry["challenge"] and challenge_of(str(body.get("code_verifier"))) != entry["challenge"]:
                return _oauth_error("invalid_grant", "code_verifier does not match")
            return web.json_response(self._issue(entry["uuid"], entry["email"]))
        if grant == "refresh_token":
            self.refresh_calls += 1
            token = str(body.get("refresh_token"))
            owner = self.refresh_tokens.get(token)
            if owner is None:
                return _oauth_error("invalid_grant", "refresh token is invalid or was already used")
            if self.rotate_refresh:
                del self.refresh_tokens[token]
                self.used_refresh_tokens.add(token)
                return web.json_response(self._issue(owner["uuid"], owner["email"]))
            return web.json_response(self._issue(owner["uuid"], owner["email"], refresh=token))
        return _oauth_error("unsupported_grant_type", f"grant_type {grant!r}")

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        return self.access_tokens.get(token, 0) > time.time()

    # ── API ──────────────────────────────────────────────────────────────────

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        if not self._authorized(request):
            return await self.render(
                request, self.error_reply(401, "authentication_error", "Invalid bearer token")
            )
        try:
            body = rec.json or {}
        except ValueError:
            body = {}
        problem = tool_name_problem(body)
        if problem:
            return await self.render(request, self.error_reply(400, "invalid_request_error", problem))
        model = body.get("model", "claude-sonnet-4-5")
        default = (
            self.stream_reply(model=model) if body.get("stream") is True else self.json_reply(model=model)
        )
        return await self.render(request, self.next_reply(default))

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        if not self._authorized(request):
            return await self.render(
                request, self.error_reply(401, "authentication_error", "Invalid bearer token")
            )
        try:
            body = rec.json
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return await self.render(request, self.error_reply(400, "invalid_request_error", "not JSON"))
        extra = sorted(set(body) - COUNT_FIELDS)
        problem = f"{extra[0]}: Extra inputs are not permitted" if extra else tool_name_problem(body)
        if problem:
            return await self.render(request, self.error_reply(400, "invalid_request_error", problem))
        return await self.render(request, self.next_reply(Reply(body={"input_tokens": count_of(body)})))

    async def _models(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        if not self._authorized(request):
            return await self.render(
                request, self.error_reply(401, "authentication_error", "Invalid bearer token")
            )
        if self.models_reply is not None:
            return await self.render(request, self.models_reply)
        try:
            limit = int(request.query.get("limit", "20"))
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return await self.render(request, self.error_reply(400, "invalid_request_error", "limit"))
        limit = min(limit, self.models_page_max)
        ids = [m["id"] for m in self.models]
        after = request.query.get("after_id")
        start = ids.index(after) + 1 if after in ids else 0
        page = self.models[start : start + limit]
        return web.json_response(
            {
                "data": page,
                "has_more": start + limit < len(self.models),
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
            }
        )

    async def _usage(self, request: web.Request) -> web.Response:
        await self.record(request)
        if not self._authorized(request):
            return web.json_response(_api_error("authentication_error", "Invalid bearer token"), status=401)
        return web.json_response(self.usage_body)

    async def _profile(self, request: web.Request) -> web.Response:
        """GET /api/oauth/profile: the account and organisation behind an access token."""
        await self.record(request)
        if not self._authorized(request):
            return web.json_response(_api_error("authentication_error", "Invalid bearer token"), status=401)
        owner = self.access_owners[request.headers["authorization"][7:]]
        return web.json_response(
            {
                "account": {"uuid": owner["uuid"], "email": owner["email"], "full_name": "Fake User"},
                "organization": {"uuid": "org-0001", "name": "Example Org"},
            }
        )

    # ── Reply builders ───────────────────────────────────────────────────────

    @staticmethod
    def stream_reply(
        text: str = "Hello from the fake.",
        *,
        tool_use: tuple[str, dict] | None = None,
        usage: dict[str, int] | None = None,
        crlf: bool = False,
        model: str = "claude-sonnet-4-5",
        stop_reason: str | None = None,
        event_lines: bool = True,
    ) -> Reply:
        """A complete Messages stream: message_start (usage), ping, a text block, an optional
        tool_use block, message_delta (usage, stop_reason) and message_stop.

        usage keys: input, output, cache_read, cache_write (defaults 25, 12, 0, 0)."""
        u = {"input": 25, "output": 12, "cache_read": 0, "cache_write": 0, **(usage or {})}
        stop = stop_reason or ("tool_use" if tool_use else "end_turn")

        def ev(kind: str, payload: dict) -> bytes:
            return sse({"type": kind, **payload}, event=kind if event_lines else None, crlf=crlf)

        events = [
            ev(
                "message_start",
                {
                    "message": {
                        "id": "msg_fake01",
                        "type": "message",
                        "role": "assistant",
                        "model": model,
                        "content": [],
                        "stop_reason": None,
                        "stop_sequence": None,
                        "usage": {
                            "input_tokens": u["input"],
                            "cache_creation_input_tokens": u["cache_write"],
                            "cache_read_input_tokens": u["cache_read"],
                            "output_tokens": 1,
                        },
                    }
                },
            ),
            ev("ping", {}),
        ]
        index = 0
        if text:
            events += [
                ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
                *(
                    ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": part}})
                    for part in _halves(text)
                ),
                ev("content_block_stop", {"index": 0}),
            ]
            index = 1
        if tool_use:
            name, arguments = tool_use
            raw = json.dumps(arguments)
            events += [
                ev(
                    "content_block_start",
                    {
                        "index": index,
                        "content_block": {
                            "type": "tool_use",
                            "id": "toolu_fake01",
                            "name": name,
                            "input": {},
                        },
                    },
                ),
                *(
                    ev(
                        "content_block_delta",
                        {"index": index, "delta": {"type": "input_json_delta", "partial_json": part}},
                    )
                    for part in _halves(raw)
                ),
                ev("content_block_stop", {"index": index}),
            ]
        events += [
            ev(
                "message_delta",
                {
                    "delta": {"stop_reason": stop, "stop_sequence": None},
                    "usage": {"output_tokens": u["output"]},
                },
            ),
            ev("message_stop", {}),
        ]
        return Reply(events=events)

    @staticmethod
    def json_reply(
        text: str = "Hello from the fake.",
        *,
        tool_use: tuple[str, dict] | None = None,
        usage: dict[str, int] | None = None,
        model: str = "claude-sonnet-4-5",
    ) -> Reply:
        """A non-streaming Messages response."""
        u = {"input": 25, "output": 12, "cache_read": 0, "cache_write": 0, **(usage or {})}
        content: list[dict] = [{"type": "text", "text": text}] if text else []
        if tool_use:
            content.append(
                {"type": "tool_use", "id": "toolu_fake01", "name": tool_use[0], "input": tool_use[1]}
            )
        return Reply(
            body={
                "id": "msg_fake01",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": content,
                "stop_reason": "tool_use" if tool_use else "end_turn",
                "stop_sequence": None,
                "usage": {
                    "input_tokens": u["input"],
                    "output_tokens": u["output"],
                    "cache_read_input_tokens": u["cache_read"],
                    "cache_creation_input_tokens": u["cache_write"],
                },
            }
        )

    @staticmethod
    def error_reply(status: int, type: str, message: str, headers: dict[str, str] | None = None) -> Reply:
        """An Anthropic error body, e.g. (429, "rate_limit_error", …) or (529, "overloaded_error", …)."""
        return Reply(status=status, body=_api_error(type, message), headers=dict(headers or {}))

    @staticmethod
    def rate_limit_reply(reset_at: int, *, status: str = "rejected", window: str = "5h") -> Reply:
        """A 429 with unified rate-limit headers (reset_at in epoch seconds)."""
        return FakeClaude.error_reply(
            429,
            "rate_limit_error",
            "This request would exceed your rate limit",
            {
                "anthropic-ratelimit-unified-status": status,
                "anthropic-ratelimit-unified-reset": str(reset_at),
                f"anthropic-ratelimit-unified-{window}-status": status,
                f"anthropic-ratelimit-unified-{window}-reset": str(reset_at),
                "anthropic-ratelimit-unified-representative-claim": "five_hour"
                if window == "5h"
                else "seven_day",
            },
        )


def tool_name_problem(body: dict) -> str | None:
    """What Anthropic would refuse about the tool names of a request, or None."""
    tools = body.get("tools") if isinstance(body.get("tools"), list) else []
    names = [t.get("name") for t in tools if isinstance(t, dict)]
    for name in names:
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            return f"tools: tool name {name!r} does not match ^[a-zA-Z0-9_-]{{1,128}}$"
    if len(set(names)) != len(names):
        return "tools: Tool names must be unique."
    choice = body.get("tool_choice")
    if isinstance(choice, dict) and choice.get("type") == "tool" and choice.get("name") not in names:
        return f"tool_choice: tool {choice.get('name')!r} not found in tools"
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        for block in content if isinstance(content, list) else ():
            is_result = isinstance(block, dict) and block.get("type") == "tool_result"
            inner = block.get("content") if is_result else None
            for ref in inner if isinstance(inner, list) else ():
                if isinstance(ref, dict) and ref.get("type") == "tool_reference":
                    if ref.get("tool_name") not in names:
                        return f"Tool reference '{ref.get('tool_name')}' not found in available tools"
    return None


def count_of(body: dict) -> int:
    """A deterministic stand-in for a token count: compact JSON characters over 4."""
    return len(json.dumps(body, separators=(",", ":"))) // 4


def _halves(text: str) -> list[str]:
    middle = len(text) // 2
    return [part for part in (text[:middle], text[middle:]) if part]


def _api_error(type: str, message: str) -> dict:
    return {"type": "error", "error": {"type": type, "message": message}}


def _oauth_error(code: str, description: str, status: int = 400) -> web.Response:
    return web.json_response({"error": code, "error_description": description}, status=status)
