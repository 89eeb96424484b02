"""The provider adapter contract.

A provider is a module in this folder (or in `[server] plugins_dir`) whose name is its entry
name. Kleis imports it, checks it against this contract at start-up and refuses to start when
something is missing. Adapters describe and transform; the core (`kleis.py` and its sibling
modules) owns routing, API keys, account choice, refresh locking, failover, usage and error
rendering.

An adapter module declares:

    CONTRACT = 1                      # the version of this file it was written for
    NAME = "codex"                    # human name, also the default entry name
    CATALOGUE = "openai"              # models.dev provider id whose models it serves
    PREFIXES = ("openai/", "codex/")  # model prefixes stripped before forwarding
    BASE_PATH = "/openai/v1"          # where its routes live
    ROUTES = {"/openai/v1/responses": "responses"}   # route path -> endpoint id
    NPM = {"responses": "@ai-sdk/openai"}            # endpoint id -> AI SDK package (discovery)
    ERROR_STYLE = "openai"            # envelope of Kleis-made errors: "openai" | "anthropic"
    OPTIONS = {"api_url": "...", ...} # defaults of its [providers.<name>] table; URLs end in _url

and these functions (all `ctx` arguments are a `Context`):

    async start_login(ctx, state, options: dict) -> Login
    async finish_login(ctx, state, data: dict, code: str) -> Tokens          # method "code"
    async poll_login(ctx, data: dict) -> Tokens                               # method "device";
                                                                              # raise LoginPending
    async refresh(ctx, account: Account) -> Tokens        # raise ReauthRequired on invalid_grant
    def import_auth(ctx, content: dict | str) -> list[Tokens]  # an official client's auth file
    def session_key(request: ProxyRequest) -> str | None  # stickiness key, or None
    def prepare(ctx, account: Account, request: ProxyRequest) -> Upstream
    def transformer(ctx, request: ProxyRequest, status: int, headers: Mapping) -> Transformer

Optional:

    UNMETERED = ("count_tokens",)     # endpoint ids whose limits are their own: a refusal there
                                      # never rests the account for its other endpoints
    MODEL_KEY_PREFIX = "anthropic/"   # key of its models in the `kleis` discovery provider
                                      # (default f"{CATALOGUE}/"; Codex uses "")
    def catalogue_model(options, model_id: str, model: dict) -> dict | None
                                      # discovery: drop (None) or adjust one catalogue model
    def retry_after(status, headers: Mapping, body: bytes, *, now: Callable[[], float]) -> Cooldown | None
                                      # provider reset hints; `now` gives epoch seconds (injectable)
    async quota(ctx, account: Account) -> dict                              # admin quota view
    async list_models(ctx, account: Account) -> list[ModelInfo]
                                      # the models this account can use today, from the provider's
                                      # own model list (hidden ones left out); raise ProviderError
                                      # when it cannot be had. Called in the background, never on
                                      # the request path; the core caches it and merges it with
                                      # the catalogue (discovery falls back to the catalogue).
    async check_import(ctx, tokens: Tokens) -> Tokens | None
                                      # imports: ask the provider whether it takes the imported
                                      # access token and who owns it (its own user id becomes
                                      # `account_id`); never spends the refresh token. Raise
                                      # LoginFailed when the provider refuses the token,
                                      # ProviderError when it cannot be asked; None when it cannot
                                      # be checked now (an expired access token)
    REFRESH_ROTATES = True            # refresh tokens are single use: an imported login shared
                                      # with its official client breaks whichever refreshes second

Adapters never import `kleis` or Sanic, never touch the database and never log a token.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

API = 1

REQUIRED_FUNCTIONS = (
    "start_login",
    "finish_login",
    "poll_login",
    "refresh",
    "import_auth",
    "session_key",
    "prepare",
    "transformer",
)
REQUIRED_CONSTANTS = (
    "CONTRACT",
    "NAME",
    "CATALOGUE",
    "PREFIXES",
    "BASE_PATH",
    "ROUTES",
    "NPM",
    "ERROR_STYLE",
    "OPTIONS",
)


# ── Errors ───────────────────────────────────────────────────────────────────


class ProviderError(Exception):
    """The provider's OAuth or API answered something unusable. The message is shown to the
    admin or client as is, so it must never contain a token. Carries no HTTP status: the core
    decides how to answer (errors.py, `from_provider`)."""


class ReauthRequired(ProviderError):
    """The refresh token was rejected (invalid_grant, refresh_token_reused, revoked).

    The core re-reads the account once (another instance may have rotated it) and then marks
    it `needs_reauth`. `code` is the provider's OAuth error code when it gave one."""

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.code = code or None


class LoginFailed(ProviderError):
    """The user-facing part of a login went wrong: bad or expired code, state mismatch,
    device flow denied or expired."""


class LoginPending(Exception):
    """poll_login: the user has not finished yet; poll again after `interval` seconds."""

    def __init__(self, interval: float | None = None, data: dict | None = None):
        super().__init__("login pending")
        self.interval = interval  # new interval (slow_down), or None to keep the current one
        self.data = data  # replacement for the stored login data, or None


# ── Data passed in and out ───────────────────────────────────────────────────


@dataclass(frozen=True)
class Context:
    """Everything an adapter may use. Built by the core once per provider."""

    http: Any  # aiohttp.ClientSession shared by the whole app
    options: Mapping[str, Any]  # this provider's table, OPTIONS defaults filled in
    now: Callable[[], int]  # epoch milliseconds; injectable for tests
    log: logging.Logger


@dataclass
class Tokens:
    """A login, refresh or import result. `expires_at` is epoch ms."""

    access_token: str
    refresh_token: str
    expires_at: int
    account_id: str | None = None  # provider-side identity used to de-duplicate accounts
    label: str | None = None  # suggested label (email, login); the admin's label wins
    metadata: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # tokens never reach a log through repr
        return f"Tokens(account_id={self.account_id!r}, label={self.label!r}, expires_at={self.expires_at})"


@dataclass(frozen=True)
class Account:
    """An account as the core hands it to an adapter (tokens decrypted)."""

    id: str
    label: str
    account_id: str | None
    access_token: str
    refresh_token: str
    expires_at: int
    metadata: Mapping[str, Any]

    def __repr__(self) -> str:
        return f"Account(id={self.id!r}, label={self.label!r})"


@dataclass
class Login:
    """What start_login returns. `data` stays on the server (encrypted) with the state."""

    url: str  # where the user goes to approve
    method: str  # "code": the user pastes a code or callback URL; "device": Kleis polls
    instructions: str
    data: dict[str, Any] = field(default_factory=dict)  # PKCE verifier, device code, host, ...
    user_code: str | None = None  # device flows: the code the user types
    interval: float = 5.0  # device flows: seconds between polls
    expires_in: int = 900  # seconds the state stays valid


@dataclass
class ProxyRequest:
    """A client request after auth and model-prefix stripping; no Sanic types."""

    endpoint: str  # the ROUTES value, e.g. "responses", "messages", "chat_completions"
    # lower-case names, repeated lines joined with ", "; removed by the core: hop-by-hop, host,
    # content-length, content-encoding (the body is decoded), accept-encoding (the HTTP client
    # negotiates its own), cookies, forwarding headers and the client's Kleis credentials
    headers: dict[str, str]
    query: str  # raw query string without "?"
    body: dict[str, Any]  # the parsed JSON object; body["model"] already unprefixed
    api_key_id: str  # the Kleis key's id (for session-affinity derivation)

    @property
    def stream(self) -> bool:
        return self.body.get("stream") is True


@dataclass
class Upstream:
    """What prepare returns: the exact upstream request."""

    url: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Usage:
    """Token counts; input excludes cache reads."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """One model an account can use, as the provider's own model list describes it. Fields
    the list does not give stay None; discovery fills them from the models.dev catalogue when
    it knows the model, else with conservative defaults."""

    id: str  # the id clients send (unprefixed upstream id)
    name: str | None = None  # display name
    context: int | None = None  # tokens the model accepts (input + output)
    input: int | None = None  # max prompt tokens, when smaller than the context (models.dev limit.input)
    output: int | None = None  # max output tokens
    input_modalities: tuple[str, ...] | None = None  # "text", "image", "pdf"
    reasoning: bool | None = None
    tool_call: bool | None = None
    release_date: str | None = None  # YYYY-MM-DD


@dataclass
class Cooldown:
    """How long an account should rest after a 429/5xx, and whether a usage window (not a
    transient limit) is exhausted."""

    seconds: float
    window_exhausted: bool = False


@dataclass
class LoadedProvider:
    """A provider as the core loaded it: its `[providers.<name>]` name, its adapter module,
    the options with defaults filled in, and the context (built once the HTTP session exists)."""

    name: str
    module: Any
    options: dict[str, Any]
    ctx: Context | None = None

    @property
    def error_style(self) -> str:
        return self.module.ERROR_STYLE

    def has(self, function: str) -> bool:
        return callable(getattr(self.module, function, None))


class Transformer(Protocol):
    """Turns upstream response bytes into client bytes, watching usage and the end of stream.

    `feed` returns what to send now (maybe b"" while an event is incomplete); `close` returns
    whatever is left at upstream EOF. `at_boundary` is true when everything returned so far
    ends on an SSE event boundary (the core only injects keepalives there). `terminal` is true
    once the protocol's terminal event was seen; `error_event` renders a well-formed error
    event the core sends when the upstream stream breaks off. A transformer may also carry
    `content_type` (str) when the body it emits is not what the upstream's Content-Type says,
    e.g. an SSE stream collected into one JSON body for a client that did not ask to stream.

    An SSE transformer (`is_sse`) also has `buffered`: the bytes of an unfinished event it
    holds after the last `feed` (0 at an event boundary). The core reads it after each chunk
    to enforce `[server] max_event_mb` without scanning the stream a second time; past the cap
    it ends the stream without calling `close()`. A transformer without it (written before
    it existed) still works: the core then finds the event boundaries itself.

    A transformer with `collect = True` is fed the whole upstream body before the client gets
    anything; after `close()` the core answers with `status` (int, None = the upstream's) and
    `content_type`, so an error found inside a 200 stream can become a 4xx/5xx. A cut or
    silent upstream then becomes a 502/504 error instead of a broken connection."""

    usage: Usage
    terminal: bool
    at_boundary: bool
    is_sse: bool
    buffered: int  # SSE: bytes of an unfinished event held

    def feed(self, chunk: bytes) -> bytes: ...

    def close(self) -> bytes: ...

    def error_event(self, message: str) -> bytes: ...


def option_urls(options: Mapping[str, Any]) -> dict[str, str]:
    """The upstream URLs among an options table (every key ending in `_url`)."""
    return {k: v for k, v in options.items() if k.endswith("_url") and isinstance(v, str)}


def epoch_ms(value: Any) -> int | None:
    """Seconds or milliseconds since the epoch (numbers below 10^10 are seconds), or an ISO
    8601 date, as epoch ms; None when unusable. The one place Kleis guesses the unit."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        value = int(value)
        ms = value * 1000 if value < 10_000_000_000 else value
        return ms if -(2**53) <= ms <= 2**53 else None  # a BIGINT the database and JSON take
    if isinstance(value, str) and value:
        from datetime import datetime

        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1000)
        except (ValueError, OverflowError, OSError):
            # Digits only: "²" is a digit to str.isdigit() but not to int(), and 5,000 digits
            # exceed int()'s limit.
            return epoch_ms(int(value)) if value.isascii() and value.isdigit() and len(value) <= 20 else None
    return None


def token_fingerprint(refresh_token: str) -> str:
    """A stable provider-side identity for tokens whose owner is unknown (imports): the same
    refresh token always maps to the same account, so a re-import updates instead of adding."""
    return "rt:" + hashlib.sha256(refresh_token.encode()).hexdigest()[:24]
