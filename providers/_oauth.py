"""OAuth helpers shared by the adapters: PKCE, pasted-code parsing, JWT claims, token calls."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import LoginFailed, ProviderError, ReauthRequired

# OAuth error codes that mean the refresh token itself is dead.
DEAD_REFRESH = {
    "invalid_grant",
    "refresh_token_reused",
    "refresh_token_expired",
    "invalid_token",
    "unauthorized_client",
}


def b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def pkce_pair() -> tuple[str, str]:
    """A (verifier, S256 challenge) pair."""
    verifier = b64url(secrets.token_bytes(32))
    challenge = b64url(hashlib.sha256(verifier.encode()).digest())
    return verifier, challenge


def parse_pasted_code(value: str, expected_state: str | None) -> tuple[str, str | None]:
    """Split what a user pasted into (code, state): a callback URL, `code#state`, or a bare code.

    A state that differs from the expected one is refused."""
    value = (value or "").strip()
    if not value:
        raise LoginFailed("the authorization code is empty; paste the code or the full callback URL")
    code, state = value, None
    if value.startswith(("http://", "https://")):
        query = parse_qs(urlsplit(value).query)
        if "error" in query:
            raise LoginFailed(f"the provider refused the login: {query['error'][0]}")
        if "code" not in query:
            raise LoginFailed("the callback URL has no code parameter")
        code = query["code"][0]
        state = query.get("state", [None])[0]
    elif "#" in value:
        code, _, state = value.partition("#")
    if state and expected_state and state != expected_state:
        raise LoginFailed("OAuth state mismatch: this code belongs to another login; start again")
    return code.strip(), (state or None)


def jwt_claims(token: str | None) -> dict[str, Any]:
    """The payload of a JWT, unverified (only used to read ids and emails); {} when not a JWT."""
    if not token or token.count(".") != 2:
        return {}
    payload = token.split(".")[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    return claims if isinstance(claims, dict) else {}


def oauth_error_code(body: Any) -> str:
    """The OAuth error code in a token-endpoint error body (`error` string or `error.code`)."""
    if not isinstance(body, Mapping):
        return ""
    error = body.get("error")
    if isinstance(error, str):
        return error
    if isinstance(error, Mapping):
        return str(error.get("code") or error.get("type") or "")
    return str(body.get("code") or "")


async def call_json(
    ctx,
    method: str,
    url: str,
    *,
    what: str,
    json_body: Mapping | None = None,
    form: Mapping | None = None,
    headers: Mapping | None = None,
    timeout: float = 30,
) -> tuple[int, dict]:
    """One upstream call: (status, JSON object or {}). Transport failures raise ProviderError
    naming `what`, never a URL with secrets or a token."""
    import aiohttp  # the adapters get the session through ctx; the import is only for errors

    send_headers = {"Accept": "application/json", **(headers or {})}
    try:
        async with ctx.http.request(
            method,
            url,
            data=form,
            json=json_body,
            headers=send_headers,
            timeout=aiohttp.ClientTimeout(total=timeout, connect=10),
            allow_redirects=False,  # a token or API call is never sent on to another host
        ) as resp:
            text = await resp.text()
            status = resp.status
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ProviderError(f"{what} request failed: {type(exc).__name__}") from None
    try:
        body = json.loads(text) if text else {}
    except (ValueError, RecursionError):
        body = {}
    return status, body if isinstance(body, dict) else {}


async def token_request(
    ctx,
    url: str,
    *,
    form: Mapping | None = None,
    json_body: Mapping | None = None,
    headers: Mapping | None = None,
    refreshing: bool = False,
    what: str = "token",
) -> dict:
    """POST to a token endpoint and return the JSON object.

    Dead refresh tokens raise ReauthRequired, other 4xx LoginFailed (or ProviderError while
    refreshing), 5xx and transport errors ProviderError. Messages never include tokens."""
    status, body = await call_json(
        ctx, "POST", url, what=what, json_body=json_body, form=form, headers=headers
    )
    if 200 <= status < 300:
        return body
    code = oauth_error_code(body)
    if refreshing and (code in DEAD_REFRESH or status == 401):
        raise ReauthRequired(f"{what} rejected the refresh token ({code or status}); log in again", code)
    if 400 <= status < 500 and not refreshing:
        raise LoginFailed(f"{what} request was refused ({code or status})")
    raise ProviderError(f"{what} request failed with HTTP {status}{f' ({code})' if code else ''}")


def expires_at_from(ctx, body: Mapping, default_seconds: int = 3600) -> int:
    """Absolute expiry (epoch ms) from a token response's `expires_in`."""
    seconds = body.get("expires_in")
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or seconds <= 0:
        seconds = default_seconds
    return ctx.now() + int(seconds * 1000)
