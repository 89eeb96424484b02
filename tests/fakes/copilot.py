"""A fake GitHub + Copilot upstream: device flow, GET /user, chat completions, responses, models.

One server plays github.com, api.github.com and api.githubcopilot.com, so `options()` points
all three URLs at it. Tokens are live once `grant()` or an approved device login issued them.
"""

from __future__ import annotations

import itertools
import time

from aiohttp import web

from . import FakeServer, Reply, sse

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
CLIENT_ID = "Ov23li8tweQw6odWQebz"


def chat_stream_reply(
    text: str = "Hello from Copilot",
    *,
    model: str = "gpt-4.1",
    prompt_tokens: int = 50,
    cached_tokens: int = 8,
    completion_tokens: int = 5,
    include_usage: bool = True,
    usage_on_finish: bool = False,
    finish_reason: str = "stop",
    done: bool = True,
    crlf: bool = False,
) -> Reply:
    """A streamed chat completion: role chunk, one chunk per word, finish chunk, usage, [DONE].

    With `usage_on_finish` the usage rides on the finish chunk (which has choices) instead of a
    chunk of its own, as Copilot does for some models."""
    base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": model}

    def chunk(delta: dict, finish: str | None = None, **extra) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    usage = _chat_usage(prompt_tokens, cached_tokens, completion_tokens)
    events = [sse(chunk({"role": "assistant", "content": ""}), crlf=crlf)]
    words = text.split(" ")
    events += [sse(chunk({"content": w if i == 0 else f" {w}"}), crlf=crlf) for i, w in enumerate(words)]
    if include_usage and usage_on_finish:
        events.append(sse(chunk({}, finish_reason, usage=usage), crlf=crlf))
    else:
        events.append(sse(chunk({}, finish_reason), crlf=crlf))
        if include_usage:
            events.append(sse({**base, "choices": [], "usage": usage}, crlf=crlf))
    if done:
        events.append(sse("[DONE]", crlf=crlf))
    return Reply(events=events)


def chat_json_reply(
    text: str = "Hello from Copilot",
    *,
    model: str = "gpt-4.1",
    prompt_tokens: int = 50,
    cached_tokens: int = 8,
    completion_tokens: int = 5,
) -> Reply:
    """A non-streamed chat completion with usage."""
    return Reply(
        body={
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 1,
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": _chat_usage(prompt_tokens, cached_tokens, completion_tokens),
        }
    )


def _chat_usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


def responses_body(
    text: str = "Hello from Copilot",
    *,
    model: str = "gpt-5",
    input_tokens: int = 50,
    cached_tokens: int = 8,
    output_tokens: int = 5,
    status: str = "completed",
) -> dict:
    """A Responses API response object with one message and usage."""
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": model,
        "output": [
            {
                "type": "message",
                "id": "msg_fake",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def responses_stream_reply(
    text: str = "Hello from Copilot",
    *,
    model: str = "gpt-5",
    input_tokens: int = 50,
    cached_tokens: int = 8,
    output_tokens: int = 5,
    terminal: str = "response.completed",
    crlf: bool = False,
) -> Reply:
    """A streamed response: created, output_item.added (with id) before the deltas, terminal event."""
    final = responses_body(
        text, model=model, input_tokens=input_tokens, cached_tokens=cached_tokens, output_tokens=output_tokens
    )
    pending = {**final, "status": "in_progress", "output": [], "usage": None}
    item = {"type": "message", "id": "msg_fake", "status": "in_progress", "role": "assistant", "content": []}
    events = [
        ("response.created", {"response": pending}),
        ("response.output_item.added", {"output_index": 0, "item": item}),
        (
            "response.content_part.added",
            {
                "item_id": "msg_fake",
                "output_index": 0,
                "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []},
            },
        ),
    ]
    words = text.split(" ")
    events += [
        (
            "response.output_text.delta",
            {"item_id": "msg_fake", "output_index": 0, "content_index": 0, "delta": w if i == 0 else f" {w}"},
        )
        for i, w in enumerate(words)
    ]
    events += [
        (
            "response.output_text.done",
            {"item_id": "msg_fake", "output_index": 0, "content_index": 0, "text": text},
        ),
        ("response.output_item.done", {"output_index": 0, "item": final["output"][0]}),
        (terminal, {"response": final}),
    ]
    return Reply(
        events=[
            sse({"type": kind, "sequence_number": n, **payload}, event=kind, crlf=crlf)
            for n, (kind, payload) in enumerate(events)
        ]
    )


def error_reply(
    status: int,
    message: str,
    type: str = "invalid_request_error",
    headers: dict | None = None,
    code: str | None = None,
) -> Reply:
    """An OpenAI-style error body."""
    return Reply(
        status=status,
        body={"error": {"message": message, "type": type, "code": code}},
        headers=dict(headers or {}),
    )


def copilot_model(
    id: str,
    name: str,
    *,
    family: str | None = None,
    type: str = "chat",
    picker: bool = True,
    policy: str | None = "enabled",
    context: int | None = 128_000,
    output: int | None = 16_384,
    prompt: int | None = 64_000,
    vision: bool = False,
    tool_calls: bool = True,
    reasoning_effort: list[str] | None = None,
    endpoints: list[str] | None = None,
    vendor: str = "OpenAI",
) -> dict:
    """One entry of Copilot's GET /models `data`, in the shape Copilot answers (fields as read by
    ericc-ch/copilot-api `get-models.ts` and Copilot SDK model types)."""
    limits = {
        k: v
        for k, v in (
            ("max_context_window_tokens", context),
            ("max_output_tokens", output),
            ("max_prompt_tokens", prompt),
        )
        if v is not None
    }
    supports: dict = {"streaming": True, "tool_calls": tool_calls, "parallel_tool_calls": tool_calls}
    if vision:
        supports["vision"] = True
        limits["vision"] = {
            "max_prompt_image_size": 3_145_728,
            "max_prompt_images": 1,
            "supported_media_types": ["image/jpeg", "image/png", "image/webp", "image/gif"],
        }
    if reasoning_effort:
        supports["reasoning_effort"] = reasoning_effort
    model = {
        "id": id,
        "name": name,
        "object": "model",
        "vendor": vendor,
        "version": id,
        "preview": False,
        "model_picker_enabled": picker,
        "capabilities": {
            "family": family or id,
            "object": "model_capabilities",
            "tokenizer": "o200k_base",
            "type": type,
            "limits": limits,
            "supports": supports,
        },
    }
    if policy is not None:
        model["policy"] = {"state": policy, "terms": f"Enable access to {name}."}
    if endpoints is not None:
        model["supported_endpoints"] = endpoints
    return model


def default_models() -> list[dict]:
    """A realistic model list: three usable chat models, one hidden from the picker, one the
    organisation's policy disabled, and one embedding model."""
    return [
        copilot_model(
            "gpt-4.1", "GPT-4.1", context=128_000, output=16_384, prompt=128_000, vision=True,
            endpoints=["/chat/completions"],
        ),
        copilot_model(
            "gpt-5-mini", "GPT-5 mini", context=264_000, output=64_000, prompt=128_000, vision=True,
            reasoning_effort=["low", "medium", "high"], endpoints=["/chat/completions", "/responses"],
        ),
        copilot_model(
            "claude-sonnet-4.6", "Claude Sonnet 4.6", context=200_000, output=32_000, prompt=168_000,
            vision=True, vendor="Anthropic", endpoints=["/chat/completions", "/v1/messages"],
        ),
        copilot_model("gpt-4o-mini-2024-07-18", "GPT-4o mini", picker=False, vision=True),
        copilot_model(
            "claude-opus-4.7", "Claude Opus 4.7", policy="disabled", vendor="Anthropic", vision=True,
            context=200_000, output=32_000,
        ),
        copilot_model(
            "text-embedding-3-small", "Embedding V3 small", type="embeddings", picker=False, policy=None,
            context=None, output=None, prompt=None, tool_calls=False,
        ),
    ]  # fmt: skip


class FakeCopilot(FakeServer):
    """GitHub device flow, GET /user and the Copilot chat/responses API on one loopback server."""

    def __init__(self) -> None:
        super().__init__()
        self.models: list[dict] = default_models()  # what GET /models answers in `data`
        self.models_reply: Reply | None = None  # answer GET /models with this instead
        self.users: dict[str, dict] = {}  # live GitHub token -> {"id", "login", "email"}
        self.devices: dict[str, dict] = {}  # device code -> {"status", "user"}
        self.user_status: int | None = None  # force GET /user to answer this status
        self.device_interval: float = 5  # seconds the device-code answer asks clients to wait between polls
        self._slow_down: list[float] = []
        self._counter = itertools.count(1)
        self.app.add_routes(
            [
                web.post("/login/device/code", self._device_code),
                web.post("/login/oauth/access_token", self._access_token),
                web.get("/user", self._user),
                web.post("/chat/completions", self._chat),
                web.post("/responses", self._responses),
                web.get("/models", self._models),
            ]
        )

    def options(self) -> dict[str, str]:
        return {"api_url": self.url, "github_url": self.url, "github_api_url": self.url}

    # ── scripting ──

    def grant(self, login: str = "octo", user_id: int = 1, email: str | None = None) -> dict:
        """Register a live GitHub token and return account fields for it (expires_at in ms)."""
        token = self._issue(login, user_id, email)
        return {
            "access_token": token,
            "refresh_token": token,
            "expires_at": int(time.time() * 1000) + 30 * 86_400_000,
            "account_id": str(user_id),
        }

    def revoke(self, token: str) -> None:
        self.users.pop(token, None)

    def approve_device(
        self, login: str = "octo", user_id: int = 1, email: str | None = None, device_code: str | None = None
    ) -> None:
        """Approve the newest (or the given) device login as this GitHub user."""
        self._device(device_code).update(status="approved", user=(login, user_id, email))

    def deny_device(self, device_code: str | None = None) -> None:
        self._device(device_code)["status"] = "denied"

    def expire_device(self, device_code: str | None = None) -> None:
        self._device(device_code)["status"] = "expired"

    def slow_down(self, interval: float = 10) -> None:
        """Answer the next token poll with `slow_down` and this new interval."""
        self._slow_down.append(interval)

    def _device(self, device_code: str | None) -> dict:
        return self.devices[device_code or list(self.devices)[-1]]

    def _issue(self, login: str, user_id: int, email: str | None) -> str:
        token = f"gho_fake{next(self._counter):04d}{login}"
        self.users[token] = {"id": user_id, "login": login, "email": email}
        return token

    # ── GitHub ──

    async def _device_code(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        body = rec.json or {}
        if body.get("client_id") != CLIENT_ID:
            return web.json_response({"error": "Not Found"}, status=404)
        n = next(self._counter)
        device_code = f"device-{n:04d}"
        self.devices[device_code] = {"status": "pending", "user": None}
        return web.json_response(
            {
                "device_code": device_code,
                "user_code": f"ABCD-{n:04d}",
                "verification_uri": f"{self.url}/login/device",
                "expires_in": 900,
                "interval": self.device_interval,
            }
        )

    async def _access_token(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        body = (rec.json or {}) if "json" in rec.headers.get("content-type", "") else rec.form
        if body.get("grant_type") != DEVICE_GRANT or body.get("client_id") != CLIENT_ID:
            return web.json_response({"error": "unsupported_grant_type"})
        device = self.devices.get(body.get("device_code", ""))
        if device is None:
            return web.json_response({"error": "incorrect_device_code"})
        if self._slow_down:
            return web.json_response(
                {
                    "error": "slow_down",
                    "interval": self._slow_down.pop(0),
                    "error_description": "Too many requests have been made.",
                }
            )
        status = device["status"]
        if status == "pending":
            return web.json_response(
                {
                    "error": "authorization_pending",
                    "error_description": "The authorization request is still pending.",
                }
            )
        if status == "denied":
            return web.json_response({"error": "access_denied"})
        if status != "approved":
            return web.json_response({"error": "expired_token"})
        device["status"] = "used"
        token = self._issue(*device["user"])
        return web.json_response({"access_token": token, "token_type": "bearer", "scope": "read:user"})

    async def _user(self, request: web.Request) -> web.Response:
        rec = await self.record(request)
        if self.user_status is not None:
            return web.json_response({"message": "scripted"}, status=self.user_status)
        user = self.users.get(self._bearer(rec.headers))
        if user is None:
            return web.json_response({"message": "Bad credentials"}, status=401)
        return web.json_response({**user, "name": user["login"].title()})

    # ── Copilot API ──

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        if self._bearer(rec.headers) not in self.users:
            return await self.render(request, error_reply(401, "Bad credentials", "authentication_error"))
        body = rec.json or {}
        if body.get("stream") is True:
            include = (body.get("stream_options") or {}).get("include_usage") is True
            default = chat_stream_reply(include_usage=include, model=body.get("model", "gpt-4.1"))
        else:
            default = chat_json_reply(model=body.get("model", "gpt-4.1"))
        return await self.render(request, self.next_reply(default))

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        if self._bearer(rec.headers) not in self.users:
            return await self.render(request, error_reply(401, "Bad credentials", "authentication_error"))
        body = rec.json or {}
        model = body.get("model", "gpt-5")
        default = (
            responses_stream_reply(model=model)
            if body.get("stream") is True
            else Reply(body=responses_body(model=model))
        )
        return await self.render(request, self.next_reply(default))

    async def _models(self, request: web.Request) -> web.StreamResponse:
        rec = await self.record(request)
        if self._bearer(rec.headers) not in self.users:
            return await self.render(request, error_reply(401, "Bad credentials", "authentication_error"))
        if self.models_reply is not None:
            return await self.render(request, self.models_reply)
        return web.json_response({"object": "list", "data": self.models})

    @staticmethod
    def _bearer(headers: dict[str, str]) -> str:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return token if scheme.lower() in ("bearer", "token") else ""
