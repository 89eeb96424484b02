"""Kleis errors: one class per condition Kleis answers itself, and the three envelopes.

Every error a client or admin can see is a subclass of `KleisError` with its HTTP `status`
and machine `code` as class attributes; the message is the instance's. Code raises these by
name (`raise NotFound("API key was not found")`) and never spells a status number; the app
renders them once, at the edge, in the envelope of the route (`error_body`). Adapters raise
`providers.ProviderError` and its subclasses, which carry no HTTP numbers; `from_provider`
maps them here.
"""

from __future__ import annotations

from collections.abc import Mapping

from providers import LoginFailed as ProviderLoginFailed
from providers import ProviderError, ReauthRequired

# The `type` field of the Anthropic and OpenAI envelopes, by status.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class KleisError(Exception):
    """An error Kleis answers itself: `status` (HTTP), `code` (the admin `error` field and the
    OpenAI `code`), a message a person can act on, and extra response headers."""

    status = 500
    code = "internal_error"
    default_message = "internal error; see the Kleis log"

    def __init__(self, message: str | None = None, headers: Mapping[str, str] | None = None):
        self.message = message or self.default_message
        super().__init__(self.message)
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "overloaded_error" if self.status == 503 else "api_error"
        return ERROR_TYPES.get(self.status, "invalid_request_error")


class Retryable(KleisError):
    """A refusal that ends after `retry_after` seconds (sent as `Retry-After`)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message, {"Retry-After": str(retry_after)})
        self.retry_after = retry_after


# ── 4xx: the request ─────────────────────────────────────────────────────────


class BadRequest(KleisError):
    status, code = 400, "bad_request"


class InvalidJson(BadRequest):
    code = "invalid_json"


class MissingModel(BadRequest):
    code = "missing_model"


class LoginExpired(BadRequest):
    code = "login_expired"
    default_message = "unknown or expired login; start the login again"


class LoginUsed(BadRequest):
    code = "login_used"
    default_message = "this login was already used; start the login again"


class LoginFailed(BadRequest):
    code = "login_failed"


class NotFound(KleisError):
    status, code = 404, "not_found"


class MethodNotAllowed(KleisError):
    status, code = 405, "method_not_allowed"


class RequestTooLarge(KleisError):
    status, code = 413, "request_too_large"


class UriTooLong(KleisError):
    status, code = 414, "uri_too_long"


class HeadersTooLarge(KleisError):
    status, code = 431, "request_header_fields_too_large"


class UnsupportedContentEncoding(KleisError):
    status, code = 415, "unsupported_content_encoding"


class BadHeader(BadRequest):
    code = "invalid_header"


class ModelNotFound(NotFound):
    code = "model_not_found"


# ── 401/403/429: who is asking ───────────────────────────────────────────────


class Unauthorized(KleisError):
    status, code = 401, "unauthorized"
    default_message = "missing or invalid admin bearer token"


class MissingApiKey(KleisError):
    status, code = 401, "missing_api_key"
    default_message = "missing API key: send `Authorization: Bearer kleis_…` or `x-api-key: kleis_…`"


class InvalidApiKey(KleisError):
    status, code = 401, "invalid_api_key"
    default_message = "invalid, expired or revoked API key"


class TooManyAttempts(Retryable):
    status, code = 429, "too_many_requests"


class ProviderNotAllowed(KleisError):
    status, code = 403, "provider_not_allowed"


class ModelNotAllowed(KleisError):
    status, code = 403, "model_not_allowed"


# ── accounts ─────────────────────────────────────────────────────────────────


class NoAccount(KleisError):
    """No account can be tried for a request (base of the account conditions)."""

    status, code = 400, "no_account"


class AccountScopeMissing(NoAccount):
    status, code = 403, "account_scope_missing"


class AccountNeedsReauth(NoAccount):
    """A refresh token was rejected: only a new login helps. 403 on every route (a 409 would
    make the SDKs retry a request that cannot succeed)."""

    status, code = 403, "account_needs_reauth"


class AccountsCoolingDown(Retryable, NoAccount):
    status, code = 429, "accounts_cooling_down"


class AccountsUnavailable(Retryable, NoAccount):
    status, code = 503, "accounts_unavailable"


class RefreshInProgress(Retryable):
    """Every account that could serve the request is being refreshed by another instance
    (which holds its refresh lease) for longer than Kleis waits."""

    status, code = 503, "refresh_in_progress"


class StoreUnavailable(Retryable):
    """The database refused or could not do what the request needed (unreachable, read-only,
    restarting); nothing was changed. Logged in one line, without a traceback."""

    status, code = 503, "database_unavailable"


class AccountGone(NoAccount):
    status, code = 404, "not_found"
    default_message = "the account was deleted while refreshing"


# ── 5xx: Kleis or the upstream ───────────────────────────────────────────────


class AdminTokenNotConfigured(KleisError):
    status, code = 503, "admin_token_not_configured"
    default_message = "no admin token is configured: set [admin] token or KLEIS_ADMIN_TOKEN"


class UpstreamUnavailable(KleisError):
    status, code = 502, "upstream_unavailable"


class UpstreamRedirected(UpstreamUnavailable):
    code = "upstream_redirect"


class UpstreamTimeout(KleisError):
    status, code = 504, "upstream_timeout"


class UpstreamAccountRejected(UpstreamUnavailable):
    """The provider refused an account's credentials (HTTP 401) even with a token refreshed a
    moment ago: the account is the problem, not the client's Kleis key (a relayed 401 would
    read as one)."""

    code = "upstream_account_rejected"


class ShuttingDown(Retryable):
    """Kleis is stopping and its drain time ran out before the upstream answered."""

    status, code = 503, "shutting_down"


class LocalResourcesExhausted(Retryable):
    """Kleis itself ran out of a local resource (file descriptors, socket buffers) while
    opening an upstream connection: no account or upstream is to blame."""

    status, code = 503, "local_resources_exhausted"


class TransformFailed(KleisError):
    status, code = 502, "transform_failed"


class ProviderFailed(KleisError):
    status, code = 502, "provider_error"


class RefreshFailed(ProviderFailed):
    code = "refresh_failed"


class ConfigProblem(KleisError):
    code = "config_error"


def from_provider(exc: ProviderError, failed: type[KleisError] = ProviderFailed) -> KleisError:
    """The catalogue's error for an adapter's: a rejected login is the user's (400), a rejected
    refresh token needs a new login (403), anything else is the provider's (502)."""
    if isinstance(exc, ProviderLoginFailed):
        return LoginFailed(str(exc))
    if isinstance(exc, ReauthRequired):
        return AccountNeedsReauth(str(exc))
    return failed(str(exc))


def error_body(style: str, exc: KleisError) -> dict:
    """The JSON body of an error in the route's envelope: "anthropic" (`{"type": "error",
    "error": {type, message}}`), "openai" (`{"error": {message, type, code}}`) or "admin"
    (`{"error": code, "message"}`)."""
    if style == "anthropic":
        return {"type": "error", "error": {"type": exc.type, "message": exc.message}}
    if style == "openai":
        kind = "server_error" if exc.status >= 500 else exc.type
        if kind == "request_too_large":
            kind = "invalid_request_error"
        return {"error": {"message": exc.message, "type": kind, "code": exc.code}}
    return {"error": exc.code, "message": exc.message}
