"""FakeCodex: OpenAI's OAuth (browser PKCE, device code, rotating refresh) and the ChatGPT
Codex backend (`/responses`, `/models`, `/wham/usage`) on loopback.

Point every `_url` option at it with `fake.options()`. Tokens are JWT-shaped and tracked:
`/responses` only accepts a live access token, refresh tokens are single use.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import time
from collections import deque
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from . import FakeServer, Recorded, Reply, sse

CLIENT_ID = "app_EMoamEEZ73f0CkXaXp7hrann"
AUTH_CLAIM = "https://api.openai.com/auth"
# The backend's model list as it answered Codex CLI 0.169.0 (GET /models?client_version=0.169.0).
MODELS_FILE = Path(__file__).resolve().parent.parent / "data" / "codex-models-cli-0.169.0.json"
DEFAULT_USAGE = {
    "input_tokens": 120,
    "input_tokens_details": {"cached_tokens": 20},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 140,
}


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def fake_jwt(claims: dict) -> str:
    """An unsigned JWT-shaped token carrying `claims` (the adapter never verifies signatures)."""
    head = _b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{_b64url(json.dumps(claims).encode())}.fake-signature"


def _error(
    status: int, message: str, type: str = "invalid_request_error", code: str | None = None, **extra: Any
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type, "code": code, **extra}}, status=status
    )


class FakeCodex(FakeServer):
    """See the module docstring; the attributes below are the knobs tests turn."""

    def __init__(self) -> None:
        super().__init__()
        self.access_ttl = 3600  # seconds an issued access token lives (0 = born expired)
        self.token_delay = 0.0  # seconds /oauth/token waits before answering
        # When set, /oauth/token waits until it is set; a caller gone by then was never served
        # (the grant is not processed), like a provider that never saw the whole request.
        self.token_gate: asyncio.Event | None = None
        self.token_waiting: list[web.Request] = []  # token requests held at the gate
        self.refresh_calls = 0  # refresh_token grants received, good or bad
        self.rotate_refresh = True  # False: refreshes return no new refresh token; the old one stays
        self.identity = {"account_id": "acct_1", "email": "a@example.com"}  # who logs in next
        self.strict = True  # reject bodies the real backend rejects (no instructions, store...)
        self.device_interval = "5"  # the real endpoint sends the interval as a string
        self.device_script: deque[str] = deque()  # next poll outcomes: slow_down | pending | denied
        self.usage_payload = {
            "plan_type": "plus",
            "rate_limit": {
                "allowed": True,
                "limit_reached": False,
                "primary_window": {
                    "used_percent": 12,
                    "limit_window_seconds": 18000,
                    "reset_after_seconds": 3600,
                    "reset_at": 1893456000,
                },
                "secondary_window": {
                    "used_percent": 40,
                    "limit_window_seconds": 604800,
                    "reset_after_seconds": 86400,
                    "reset_at": 1893542400,
                },
            },
            "credits": {"has_credits": False, "unlimited": False, "balance": "0"},
        }
        self.models_payload: Any = json.loads(MODELS_FILE.read_text())  # str/bytes: sent as is
        self.models_status = 200
        self.access_tokens: dict[str, dict] = {}  # token -> identity + "exp" (epoch s)
        self.refresh_tokens: dict[str, dict] = {}  # token -> identity + "used"
        self.codes: dict[str, dict] = {}  # authorization code -> identity, challenge, redirect_uri
        self.devices: dict[str, dict] = {}  # device_auth_id -> user_code, approved identity
        self.app.router.add_get("/oauth/authorize", self._authorize)
        self.app.router.add_post("/oauth/token", self._token)
        self.app.router.add_post("/api/accounts/deviceauth/usercode", self._device_code)
        self.app.router.add_post("/api/accounts/deviceauth/token", self._device_token)
        self.app.router.add_get("/codex/device", self._device_page)
        self.app.router.add_get("/wham/usage", self._usage)
        self.app.router.add_post("/responses", self._responses)
        self.app.router.add_get("/models", self._models)

    # ── Helpers for tests ────────────────────────────────────────────────────

    def options(self) -> dict:
        """The `[providers.codex]` URL options pointing at this fake."""
        return {"api_url": self.url, "auth_url": self.url, "usage_url": self.url}

    def grant(self, account_id: str = "acct_1", email: str = "a@example.com") -> dict:
        """Mint a live token pair for an account, as if it had logged in."""
        tokens = self._issue({"account_id": account_id, "email": email})
        return {
            "access_token": tokens["access_token"],
            "refresh_token": tokens["refresh_token"],
            "expires_at": int(self.access_tokens[tokens["access_token"]]["exp"] * 1000),
            "account_id": account_id,
        }

    def codex_auth_file(self, account_id: str = "acct_1", email: str = "a@example.com") -> dict:
        """A live `~/.codex/auth.json` for the Codex CLI importer."""
        tokens = self._issue({"account_id": account_id, "email": email})
        return {
            "OPENAI_API_KEY": None,
            "tokens": {
                "id_token": tokens["id_token"],
                "access_token": tokens["access_token"],
                "refresh_token": tokens["refresh_token"],
                "account_id": account_id,
            },
            "last_refresh": "2026-11-01T10:00:00Z",
        }

    def opencode_auth_file(self, account_id: str = "acct_1", email: str = "a@example.com") -> dict:
        """A live OpenCode `auth.json` with an `openai` OAuth entry."""
        tokens = self._issue({"account_id": account_id, "email": email})
        expires = int(self.access_tokens[tokens["access_token"]]["exp"] * 1000)
        return {
            "openai": {
                "type": "oauth",
                "access": tokens["access_token"],
                "refresh": tokens["refresh_token"],
                "expires": expires,
                "accountId": account_id,
            }
        }

    def approve_device(
        self, account_id: str | None = None, email: str | None = None, device_auth_id: str | None = None
    ) -> None:
        """Approve the newest (or the given) device login as this identity (default `identity`)."""
        if not self.devices:
            raise AssertionError("no device login was started")
        key = device_auth_id or list(self.devices)[-1]
        self.devices[key]["approved"] = {
            "account_id": account_id or self.identity["account_id"],
            "email": email or self.identity["email"],
        }

    def expire_access_tokens(self) -> None:
        """Make every access token issued so far expired (the next API call gets a 401)."""
        for entry in self.access_tokens.values():
            entry["exp"] = 0

    def revoke_refresh_tokens(self) -> None:
        """Forget every refresh token (the next refresh gets invalid_grant)."""
        self.refresh_tokens.clear()

    # ── Reply builders ───────────────────────────────────────────────────────

    @staticmethod
    def stream_reply(
        text: str = "Hello from Codex.",
        events: int = 3,
        usage: dict | None = None,
        model: str = "gpt-5.5",
        crlf: bool = False,
        final_output: bool = True,
        **reply: Any,
    ) -> Reply:
        """A text answer as a Responses SSE stream: `events` output_text deltas, then
        response.completed carrying `usage`. `final_output=False`: the completed response's
        `output` is [] (what the backend sends with store: false; the message only streamed).
        Extra keywords go to Reply (delays, cut_after)."""
        response = _response_shell(model)
        item_id = f"msg_{secrets.token_hex(8)}"
        size = max(1, -(-len(text) // max(events, 1)))
        chunks = [text[i : i + size] for i in range(0, len(text), size)] or [""]
        message = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": []}
        done_message = {**message, "status": "completed", "content": [{**part, "text": text}]}
        frames = [
            ("response.created", {"response": response}),
            ("response.in_progress", {"response": response}),
            ("response.output_item.added", {"output_index": 0, "item": message}),
            (
                "response.content_part.added",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "part": part},
            ),
            *(
                (
                    "response.output_text.delta",
                    {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": chunk},
                )
                for chunk in chunks
            ),
            (
                "response.output_text.done",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "text": text},
            ),
            (
                "response.content_part.done",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "part": {**part, "text": text}},
            ),
            ("response.output_item.done", {"output_index": 0, "item": done_message}),
            (
                "response.completed",
                {
                    "response": {
                        **response,
                        "status": "completed",
                        "output": [done_message] if final_output else [],
                        "usage": usage or DEFAULT_USAGE,
                    }
                },
            ),
        ]
        return Reply(events=_frames(frames, crlf), **reply)

    @staticmethod
    def tool_call_reply(
        name: str = "glob",
        arguments: str = '{"pattern":"*"}',
        call_id: str = "call_1",
        chunks: int = 2,
        usage: dict | None = None,
        model: str = "gpt-5.5",
        crlf: bool = False,
        **reply: Any,
    ) -> Reply:
        """A function call as a Responses SSE stream: item added, argument deltas, item done,
        response.completed."""
        response = _response_shell(model)
        item_id = f"fc_{secrets.token_hex(8)}"
        item = {
            "id": item_id,
            "type": "function_call",
            "status": "in_progress",
            "call_id": call_id,
            "name": name,
            "arguments": "",
        }
        size = max(1, -(-len(arguments) // max(chunks, 1)))
        done_item = {**item, "status": "completed", "arguments": arguments}
        frames = [
            ("response.created", {"response": response}),
            ("response.output_item.added", {"output_index": 0, "item": item}),
            *(
                (
                    "response.function_call_arguments.delta",
                    {"item_id": item_id, "output_index": 0, "delta": arguments[i : i + size]},
                )
                for i in range(0, len(arguments), size)
            ),
            (
                "response.function_call_arguments.done",
                {"item_id": item_id, "output_index": 0, "arguments": arguments},
            ),
            ("response.output_item.done", {"output_index": 0, "item": done_item}),
            (
                "response.completed",
                {
                    "response": {
                        **response,
                        "status": "completed",
                        "output": [done_item],
                        "usage": usage or DEFAULT_USAGE,
                    }
                },
            ),
        ]
        return Reply(events=_frames(frames, crlf), **reply)

    @staticmethod
    def reasoning_tool_call_reply(
        summary: str = "Looking for the goal.",
        name: str = "get_goal",
        arguments: str = '{"id":1}',
        call_id: str = "call_goal",
        final_output: bool = False,
        usage: dict | None = None,
        model: str = "gpt-5.5",
        **reply: Any,
    ) -> Reply:
        """A reasoning item (output 0, summary streamed in deltas, encrypted content) and a
        function call (output 1), each added, streamed and done; then response.completed whose
        `output` is [] unless `final_output`."""
        response = _response_shell(model)
        reasoning = {"id": f"rs_{secrets.token_hex(8)}", "type": "reasoning", "summary": []}
        done_reasoning = {
            **reasoning,
            "summary": [{"type": "summary_text", "text": summary}],
            "encrypted_content": "gAAAAfake-encrypted-reasoning",
        }
        call = {
            "id": f"fc_{secrets.token_hex(8)}",
            "type": "function_call",
            "status": "in_progress",
            "call_id": call_id,
            "name": name,
            "arguments": "",
        }
        done_call = {**call, "status": "completed", "arguments": arguments}
        half = len(summary) // 2
        frames = [
            ("response.created", {"response": response}),
            ("response.output_item.added", {"output_index": 0, "item": reasoning}),
            (
                "response.reasoning_summary_part.added",
                {
                    "item_id": reasoning["id"],
                    "output_index": 0,
                    "summary_index": 0,
                    "part": {"type": "summary_text", "text": ""},
                },
            ),
            *(
                (
                    "response.reasoning_summary_text.delta",
                    {"item_id": reasoning["id"], "output_index": 0, "summary_index": 0, "delta": piece},
                )
                for piece in (summary[:half], summary[half:])
            ),
            (
                "response.reasoning_summary_text.done",
                {"item_id": reasoning["id"], "output_index": 0, "summary_index": 0, "text": summary},
            ),
            ("response.output_item.done", {"output_index": 0, "item": done_reasoning}),
            ("response.output_item.added", {"output_index": 1, "item": call}),
            (
                "response.function_call_arguments.delta",
                {"item_id": call["id"], "output_index": 1, "delta": arguments},
            ),
            (
                "response.function_call_arguments.done",
                {"item_id": call["id"], "output_index": 1, "arguments": arguments},
            ),
            ("response.output_item.done", {"output_index": 1, "item": done_call}),
            (
                "response.completed",
                {
                    "response": {
                        **response,
                        "status": "completed",
                        "output": [done_reasoning, done_call] if final_output else [],
                        "usage": usage or DEFAULT_USAGE,
                    }
                },
            ),
        ]
        return Reply(events=_frames(frames, False), **reply)

    @staticmethod
    def frames_reply(frames: list[tuple[str, dict]], crlf: bool = False, **reply: Any) -> Reply:
        """Any Responses SSE stream: (event type, payload) pairs; `type` and `sequence_number`
        are added to each payload."""
        return Reply(events=_frames(frames, crlf), **reply)

    @staticmethod
    def error_event_reply(
        code: str = "context_length_exceeded",
        message: str = "Your input exceeds the context window of this model.",
        nested: bool = False,
        type: str = "invalid_request_error",
        model: str = "gpt-5.5",
        **extra: Any,
    ) -> Reply:
        """A 200 stream that fails before any output: response.created, then an `error` event.
        Flat fields (`code`, `message`, `param`), as the Responses API streams them; `nested`:
        under `error` with a `type`, as the Codex backend sends them. `extra` joins the error
        fields (e.g. `resets_in_seconds`)."""
        if nested:
            error = {
                "type": "error",
                "error": {"type": type, "code": code, "message": message, "param": None, **extra},
            }
        else:
            error = {"type": "error", "code": code, "message": message, "param": None, **extra}
        frames = [("response.created", {"response": _response_shell(model)}), ("error", error)]
        return Reply(events=_frames(frames, False))

    @staticmethod
    def failed_reply(
        code: str = "server_error", message: str = "The model failed to respond.", model: str = "gpt-5.5"
    ) -> Reply:
        """A 200 stream ending in response.failed with `response.error` {code, message}."""
        response = _response_shell(model)
        failed = {
            **response,
            "status": "failed",
            "error": {"code": code, "message": message},
            "usage": DEFAULT_USAGE,
        }
        frames = [("response.created", {"response": response}), ("response.failed", {"response": failed})]
        return Reply(events=_frames(frames, False))

    @staticmethod
    def incomplete_reply(
        text: str = "Partial answer", reason: str = "max_output_tokens", model: str = "gpt-5.5"
    ) -> Reply:
        """A message that streamed, then response.incomplete with `incomplete_details` and an
        empty `output`."""
        response = _response_shell(model)
        item_id = f"msg_{secrets.token_hex(8)}"
        message = {
            "id": item_id,
            "type": "message",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        frames = [
            ("response.created", {"response": response}),
            ("response.output_item.added", {"output_index": 0, "item": message}),
            (
                "response.output_text.delta",
                {"item_id": item_id, "output_index": 0, "content_index": 0, "delta": text},
            ),
            (
                "response.incomplete",
                {
                    "response": {
                        **response,
                        "status": "incomplete",
                        "incomplete_details": {"reason": reason},
                        "output": [],
                        "usage": DEFAULT_USAGE,
                    }
                },
            ),
        ]
        return Reply(events=_frames(frames, False))

    @staticmethod
    def json_reply(
        text: str = "Hello from Codex.", usage: dict | None = None, model: str = "gpt-5.5", **reply: Any
    ) -> Reply:
        """A non-streamed Responses object with `usage`."""
        message = {
            "id": f"msg_{secrets.token_hex(8)}",
            "type": "message",
            "status": "completed",
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
        body = {
            **_response_shell(model),
            "status": "completed",
            "output": [message],
            "usage": usage or DEFAULT_USAGE,
        }
        return Reply(body=body, **reply)

    @staticmethod
    def error_reply(
        status: int,
        message: str = "Something went wrong.",
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
        **extra: Any,
    ) -> Reply:
        """An OpenAI-style JSON error; `extra` lands inside the `error` object."""
        return Reply(
            status=status,
            body={"error": {"message": message, "type": type, "code": code, **extra}},
            headers=headers or {},
        )

    @staticmethod
    def usage_limit_reply(
        resets_in_seconds: int = 3600, plan_type: str = "plus", headers: dict | None = None
    ) -> Reply:
        """The 429 the backend sends when a plan's usage window is used up."""
        return FakeCodex.error_reply(
            429,
            "The usage limit has been reached",
            type="usage_limit_reached",
            headers=headers,
            plan_type=plan_type,
            resets_in_seconds=resets_in_seconds,
            resets_at=int(time.time()) + resets_in_seconds,
        )

    # ── Token bookkeeping ────────────────────────────────────────────────────

    def _issue(self, identity: dict) -> dict:
        now = int(time.time())
        exp = now + self.access_ttl
        auth = {"chatgpt_account_id": identity["account_id"], "chatgpt_plan_type": "plus"}
        access = fake_jwt(
            {
                "exp": exp,
                "iat": now,
                "jti": secrets.token_hex(8),
                "email": identity["email"],
                AUTH_CLAIM: auth,
                "https://api.openai.com/profile": {"email": identity["email"]},
            }
        )
        id_token = fake_jwt(
            {
                "exp": exp,
                "iat": now,
                "email": identity["email"],
                AUTH_CLAIM: {
                    **auth,
                    "organizations": [{"id": f"org_{identity['account_id']}", "is_default": True}],
                },
            }
        )
        refresh = f"rt_{secrets.token_urlsafe(24)}"
        self.access_tokens[access] = {**identity, "exp": exp}
        self.refresh_tokens[refresh] = {**identity, "used": False}
        return {
            "access_token": access,
            "refresh_token": refresh,
            "id_token": id_token,
            "token_type": "Bearer",
            "expires_in": self.access_ttl,
            "scope": "openid profile email offline_access",
        }

    def _bearer_identity(self, headers: dict) -> tuple[dict | None, str]:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        entry = self.access_tokens.get(token) if scheme.lower() == "bearer" else None
        if entry is None:
            return None, "invalid_token"
        if entry["exp"] <= time.time():
            return None, "token_expired"
        return entry, ""

    # ── Handlers ─────────────────────────────────────────────────────────────

    async def _authorize(self, request: web.Request) -> web.StreamResponse:
        await self.record(request)
        query = request.query
        if query.get("client_id") != CLIENT_ID or query.get("code_challenge_method") != "S256":
            return web.Response(status=400, text="bad authorize request")
        code = f"ac_{secrets.token_urlsafe(16)}"
        self.codes[code] = {
            "identity": dict(self.identity),
            "challenge": query.get("code_challenge"),
            "redirect_uri": query.get("redirect_uri"),
        }
        target = f"{query.get('redirect_uri')}?{urlencode({'code': code, 'state': query.get('state', '')})}"
        raise web.HTTPFound(target)

    async def _token(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        if self.token_delay:
            await asyncio.sleep(self.token_delay)
        if self.token_gate is not None:
            self.token_waiting.append(request)
            try:
                await self.token_gate.wait()
            finally:
                self.token_waiting.remove(request)
            if request.transport is None or request.transport.is_closing():
                return web.Response(status=499)
        form = rec.form
        if form.get("client_id") != CLIENT_ID:
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") == "authorization_code":
            grant = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
            if (
                grant is None
                or grant["challenge"] != challenge
                or grant["redirect_uri"] != form.get("redirect_uri")
            ):
                return web.json_response({"error": "invalid_grant"}, status=400)
            return web.json_response(self._issue(grant["identity"]))
        if form.get("grant_type") == "refresh_token":
            self.refresh_calls += 1
            entry = self.refresh_tokens.get(form.get("refresh_token", ""))
            if entry is None:
                return web.json_response({"error": "invalid_grant"}, status=400)
            if entry["used"]:
                return web.json_response({"error": "refresh_token_reused"}, status=400)
            issued = self._issue({"account_id": entry["account_id"], "email": entry["email"]})
            if self.rotate_refresh:
                entry["used"] = True
            else:
                del self.refresh_tokens[issued.pop("refresh_token")]
            return web.json_response(issued)
        return web.json_response({"error": "unsupported_grant_type"}, status=400)

    async def _device_code(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        if (rec.json or {}).get("client_id") != CLIENT_ID:
            return _error(400, "unknown client", code="invalid_client")
        device_auth_id = f"deviceauth_{secrets.token_hex(8)}"
        user_code = f"{secrets.token_hex(2).upper()}-{secrets.token_hex(2).upper()}"
        self.devices[device_auth_id] = {"user_code": user_code, "approved": None}
        return web.json_response(
            {"device_auth_id": device_auth_id, "user_code": user_code, "interval": self.device_interval}
        )

    async def _device_token(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        body = rec.json or {}
        device = self.devices.get(body.get("device_auth_id", ""))
        if device is None or device["user_code"] != body.get("user_code"):
            return _error(400, "unknown device login", code="invalid_request")
        outcome = self.device_script.popleft() if self.device_script else None
        if outcome == "slow_down":
            return _error(400, "polling too fast", code="slow_down")
        if outcome == "denied":
            return _error(400, "the user denied the request", code="access_denied")
        if outcome == "pending" or device["approved"] is None:
            return _error(403, "authorization pending", code="deviceauth_authorization_pending")
        verifier = secrets.token_urlsafe(32)
        challenge = _b64url(hashlib.sha256(verifier.encode()).digest())
        code = f"ac_{secrets.token_urlsafe(16)}"
        self.codes[code] = {
            "identity": device["approved"],
            "challenge": challenge,
            "redirect_uri": f"{self.url}/deviceauth/callback",
        }
        return web.json_response(
            {"authorization_code": code, "code_challenge": challenge, "code_verifier": verifier}
        )

    async def _device_page(self, request: web.Request) -> web.Response:
        await self.record(request)
        return web.Response(text="Enter your code")

    async def _usage(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        identity, problem = self._bearer_identity(rec.headers)
        if identity is None:
            return _error(401, "Your authentication token is not valid.", code=problem)
        return web.json_response(self.usage_payload)

    def _refusal(self, rec: Recorded) -> web.Response | None:
        """The backend's answer to a bad token (401) or a token used for another account (403)."""
        identity, problem = self._bearer_identity(rec.headers)
        if identity is None:
            return _error(401, "Your authentication token is not valid.", code=problem)
        account = rec.headers.get("chatgpt-account-id")
        if account is not None and account != identity["account_id"]:
            return _error(403, "This token does not belong to that account.", code="account_mismatch")
        return None

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        refused = self._refusal(rec)
        if refused is not None:
            return refused
        try:
            body = rec.json
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "The request body must be a JSON object.")
        if self.strict:
            problem = _backend_refusal(body)
            if problem:
                return _error(400, problem)
        model = body.get("model") or "gpt-5.5"
        default = (
            self.stream_reply(model=model) if body.get("stream") is True else self.json_reply(model=model)
        )
        return await self.render(request, self.next_reply(default))

    async def _models(self, request: web.Request) -> web.Response:
        """The backend's model list; `client_version` is recorded with the query."""
        rec = await self.record(request)
        refused = self._refusal(rec)
        if refused is not None:
            return refused
        if "client_version" not in rec.query:
            return _error(400, "client_version is required")
        if isinstance(self.models_payload, (str, bytes)):
            return web.Response(
                body=self.models_payload, status=self.models_status, content_type="application/json"
            )
        return web.json_response(self.models_payload, status=self.models_status)


def _backend_refusal(body: dict) -> str | None:
    """What the real backend says about a body it refuses, or None."""
    instructions = body.get("instructions")
    if not isinstance(instructions, str) or not instructions.strip():
        return "Instructions are required"
    if body.get("store") is not False:
        return "Store must be set to false"
    if body.get("stream") is not True:
        return "Stream must be set to true"
    if not isinstance(body.get("input"), list):
        return "Input must be a list"
    for field in ("max_output_tokens", "max_completion_tokens"):
        if field in body:
            return f"Unsupported parameter: {field}"
    return None


def _response_shell(model: str) -> dict:
    return {
        "id": f"resp_{secrets.token_hex(8)}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "model": model,
        "output": [],
        "usage": None,
    }


def _frames(frames: list[tuple[str, dict]], crlf: bool) -> list[bytes]:
    return [
        sse({"type": kind, "sequence_number": i, **payload}, event=kind, crlf=crlf)
        for i, (kind, payload) in enumerate(frames)
    ]
