"""Kleis admin API: a Sanic Blueprint under /admin, behind one bearer-token check.

Shapes follow prior art §1.4 (keys never carry the key after creation, accounts never carry
tokens). Errors use the admin envelope `{"error": code, "message"}`. Handlers validate input
(validate.py) and call the key, account, login and usage operations; they never touch the
database themselves.
"""

from __future__ import annotations

import csv
import hmac
import io
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from sanic import Blueprint, Request
from sanic import response as sanic_response

import analytics
from accounts import AccountPool, Logins, import_body
from discovery import AccountModels
from errors import (
    AdminTokenNotConfigured,
    BadRequest,
    LoginExpired,
    LoginFailed,
    NotFound,
    TooManyAttempts,
    Unauthorized,
)
from keys import KEY_FIELDS, Keys, Lockout, bearer, client_address, key_fields, key_view
from providers import LoadedProvider
from runtime import Clock
from store import Store
from usage import UsageQueue
from validate import json_object, opt_bool, opt_int, opt_str, parse_json

WINDOW_DEFAULT_MS, WINDOW_MIN_MS, WINDOW_MAX_MS = 86_400_000, 60_000, 90 * 86_400_000
ACCOUNT_IMPORT_FIELDS = (
    "accessToken",
    "refreshToken",
    "expiresAt",
    "accountId",
    "label",
    "metadata",
    "authFile",
    "priority",
)


class AdminAuth:
    """The admin bearer token, compared in constant time, with a lockout per client address
    (keys.client_address: `trusted_proxies` are the CIDRs of the proxies in front)."""

    def __init__(
        self, token: str, lockout: Lockout, trust_forwarded: bool, trusted_proxies: Sequence[str] = ()
    ):
        self.token, self.lockout, self.trust_forwarded = token, lockout, trust_forwarded
        self.trusted_proxies = tuple(trusted_proxies)

    def check(self, request: Request, token: str | None = None) -> None:
        """Raises unless the request carries the admin token (or `token`, when given and set)."""
        given = bearer(request.headers)
        if token and hmac.compare_digest(given.encode(), token.encode()):
            return
        if not self.token:
            raise AdminTokenNotConfigured()
        address = client_address(request.headers, request.ip, self.trust_forwarded, self.trusted_proxies)
        wait = self.lockout.retry_after(address)
        if wait:
            raise TooManyAttempts(f"too many invalid admin token attempts; retry in {wait} s", wait)
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            self.lockout.fail(address)  # a success clears nothing (see keys.Lockout)
            raise Unauthorized()


def window_ms(request: Request) -> int:
    """The `windowMs` query parameter: milliseconds, default one day. Raises BadRequest (400)
    unless it is a whole number from one minute to 90 days (zero, negatives, fractions,
    non-numbers and longer windows are refused, naming the value)."""
    raw = request.get_args(keep_blank_values=True).get("windowMs")  # `windowMs=` is an error too
    if raw is None:
        return WINDOW_DEFAULT_MS
    number = raw.isascii() and raw.isdigit() and len(raw) <= 12
    if not number or not WINDOW_MIN_MS <= int(raw) <= WINDOW_MAX_MS:
        raise BadRequest(
            f"windowMs must be an integer from {WINDOW_MIN_MS} (1 minute) to {WINDOW_MAX_MS} (90 days)"
            f" milliseconds; got {raw[:40]!r}"
        )
    return int(raw)


class AdminApi:
    """The admin handlers, with the collaborators they use. `base_url(request)` is the URL
    clients should use (for key snippets)."""

    def __init__(
        self,
        *,
        keys: Keys,
        pool: AccountPool,
        logins: Logins,
        usage: UsageQueue,
        store: Store,
        providers: Mapping[str, LoadedProvider],
        clock: Clock,
        base_url: Callable[[Request], str],
        models: AccountModels,
        refresh_models: Callable[..., Awaitable[None]],
        device_wait: float = 60.0,
        reload: Callable[[], Awaitable[None]] | None = None,
    ):
        self.keys, self.pool, self.logins, self.usage, self.store = keys, pool, logins, usage, store
        self.providers, self.clock, self.base_url = providers, clock, base_url
        self.models, self.refresh_models = models, refresh_models
        self.device_wait = device_wait  # seconds oauth/complete waits for a device login
        self.reload_caches = reload

    def provider(self, name: str) -> LoadedProvider:
        provider = self.providers.get(name)
        if provider is None:
            raise NotFound(f"unknown provider {name!r}; configured: {', '.join(self.providers)}")
        return provider

    async def reload(self, request):
        """Reload the key and account caches now if another process (the CLI on this
        machine) changed them, instead of at the next one-second poll. `{"reloaded": true}`."""
        if self.reload_caches is not None:
            await self.reload_caches()
        return {"reloaded": True}

    def account_view(self, account_id: str) -> dict:
        return self.pool.get(account_id).view(self.clock.now())

    def key_fields(self, request: Request, partial: bool) -> dict:
        body = json_object(request.body, KEY_FIELDS)
        return key_fields(
            body,
            partial=partial,
            providers=list(self.providers),
            account_providers=self.pool.provider_of(),
            now=self.clock.now(),
        )

    # ── accounts and providers ──
    async def list_accounts(self, request):
        now = self.clock.now()
        return {
            "accounts": [{**a.view(now), "models": self.models.admin_view(a.id)} for a in self.pool.listed()],
            "providers": self.pool.provider_status(),
        }

    async def list_providers(self, request):
        return {"providers": self.pool.provider_status()}

    async def patch_provider(self, request, name):
        provider = self.provider(name)
        enabled = opt_bool(json_object(request.body, ["enabled"], ["enabled"]), "enabled")
        return {"provider": await self.pool.set_provider_enabled(provider.name, enabled), "updated": True}

    async def oauth_start(self, request, name):
        provider = self.provider(name)
        options = json_object(request.body, ["options"]).get("options") or {}
        if not isinstance(options, dict):
            raise BadRequest("options must be an object")
        return await self.logins.start(provider, options)

    async def oauth_complete(self, request, name):
        """Code flows: exchange `code`, 200 `{"account"}`. Device flows: wait up to
        `device_wait` seconds for Kleis's poller; 200 with the status view (`status`
        "complete", `account`) when approved, 400 `login_failed` (denied, refused) or
        `login_expired`, else 202 with the status view and `statusUrl` to poll."""
        provider = self.provider(name)
        body = json_object(request.body, ["state", "code"], ["state"])
        state = opt_str(body, "state", 200)
        login = await self.logins.pending(provider, state)
        if login.method == "device":
            status = await self.logins.wait(provider, state, self.device_wait)
            now = self.clock.now()
            if status.status == "failed":
                if login.expires_at <= now:
                    raise LoginExpired(status.message or LoginExpired.default_message)
                raise LoginFailed(status.message or "the login failed; start it again")
            if status.status == "pending":
                url = f"/admin/accounts/{provider.name}/oauth/{state}"
                return 202, {**status.view(now), "statusUrl": url}
            return status.view(now)
        code = opt_str(body, "code", 4000)
        if not code:
            raise BadRequest("code is required: paste the code or the full callback URL")
        account = await self.logins.finish_code(provider, state, code)
        return {"account": account.view(self.clock.now())}

    async def oauth_status(self, request, name, state):
        status = await self.logins.status(self.provider(name), state)
        return (202 if status.status == "pending" else 200), status.view(self.clock.now())

    async def import_account(self, request, name):
        """201 `{"account", "accounts", "imported", "warnings"}`: `warnings` are sentences for
        the user (a login shared with its official client, a token that could not be checked).
        A token the provider refuses is 400 `login_failed`."""
        provider = self.provider(name)
        body = json_object(request.body, ACCOUNT_IMPORT_FIELDS)
        content = body.get("authFile")
        if isinstance(content, str) and content.lstrip().startswith("{"):
            # A pasted JSON file is parsed and checked here, like the body around it (adapters
            # parse it with json.loads, which takes 1e400, NaN and any integer).
            body["authFile"] = parse_json(content, "authFile")
        accounts = await import_body(self.pool, provider, body, self.clock.now())
        now = self.clock.now()
        return 201, {
            "account": accounts[0].view(now),
            "accounts": [a.view(now) for a in accounts],
            "imported": True,
            "warnings": accounts.warnings,
        }

    async def patch_account(self, request, account_id):
        self.pool.get(account_id)
        body = json_object(request.body, ["label", "priority", "enabled", "metadata"])
        fields: dict[str, Any] = {}
        if "label" in body:
            fields["label"] = opt_str(body, "label", 160) or ""
        if body.get("priority") is not None:
            fields["priority"] = opt_int(body, "priority")
        if body.get("enabled") is not None:
            fields["enabled"] = opt_bool(body, "enabled")
        if "metadata" in body:
            if not isinstance(body["metadata"], (dict, type(None))):
                raise BadRequest("metadata must be an object or null")
            fields["metadata"] = body["metadata"] or {}
        account = await self.pool.update(account_id, **fields)
        return {"account": account.view(self.clock.now()), "updated": True}

    async def delete_account(self, request, account_id):
        await self.pool.delete(account_id)
        return {"deleted": True}

    async def primary_account(self, request, account_id):
        return {"account": (await self.pool.set_primary(account_id)).view(self.clock.now())}

    async def clear_cooldown(self, request, account_id):
        return {"account": (await self.pool.clear_cooldown(account_id)).view(self.clock.now())}

    async def refresh_account(self, request, account_id):
        account = await self.pool.refresh_now(account_id)
        return {"account": account.view(self.clock.now()), "refreshed": True}

    async def account_quota(self, request, account_id):
        return {"quota": await self.pool.quota(self.pool.get(account_id))}

    async def account_models(self, request, account_id):
        """The models the account's provider says it offers (`?refresh=1` asks again now);
        `source` is "catalogue" while no list is known (discovery then uses the catalogue)."""
        account = self.pool.get(account_id)
        if request.args.get("refresh") in ("1", "true"):
            await self.refresh_models(only=account.id, force=True)
        entry = self.models.lists.get(account.id)
        listed = entry.models if entry is not None and entry.models is not None else ()
        return {
            "accountId": account.id,
            "provider": account.provider,
            **self.models.admin_view(account.id),
            "models": [
                {
                    "id": m.id,
                    "name": m.name,
                    "context": m.context,
                    "input": m.input,
                    "output": m.output,
                    "inputModalities": list(m.input_modalities) if m.input_modalities else None,
                    "reasoning": m.reasoning,
                    "toolCall": m.tool_call,
                }
                for m in listed
            ],
        }

    async def account_usage(self, request, account_id):
        """Account detail: see analytics.detail (`apiKeys[]` per key)."""
        self.pool.get(account_id)
        report = await analytics.detail(
            self.store, window_ms(request), self.clock.now(), provider_account_id=account_id
        )
        return {"providerAccountId": account_id, **report}

    async def accounts_usage(self, request):
        """Account summaries: `{windowMs, since, now, accounts: [{providerAccountId, provider,
        label, …AveragedTotals, providers[]}]}` (label and provider null for a removed account)."""
        window, now = window_ms(request), self.clock.now()
        rows = await analytics.summaries(self.store, window, now, "provider_account_id")
        for row in rows:
            account = self.pool.accounts.get(row["providerAccountId"])
            row["provider"] = account.provider if account else None
            row["label"] = account.label if account else None
        return self.window_view(window, now) | {"accounts": rows}

    def window_view(self, window: int, now: int) -> dict:
        return {"windowMs": window, "since": analytics.window_start(now, window), "now": now}

    # ── keys ──
    async def list_keys(self, request):
        base, now = self.base_url(request), self.clock.now()
        return {"keys": [key_view(r, base, now) for r in self.keys.newest_first()]}

    async def post_key(self, request):
        key, record = await self.keys.create(**self.key_fields(request, partial=False))
        return 201, {"key": key_view(record, self.base_url(request), self.clock.now(), key=key)}

    async def patch_key(self, request, key_id):
        self.keys.get(key_id)
        record = await self.keys.update(key_id, **self.key_fields(request, partial=True))
        return {"key": key_view(record, self.base_url(request), self.clock.now()), "updated": True}

    async def revoke_key(self, request, key_id):
        await self.keys.revoke(key_id)
        return {"revoked": True}

    async def delete_key(self, request, key_id):
        await self.keys.delete(key_id)
        return {"deleted": True}

    async def key_usage(self, request, key_id):
        """Key detail: see analytics.detail (`byAccount[]` per account)."""
        self.keys.get(key_id)
        report = await analytics.detail(self.store, window_ms(request), self.clock.now(), api_key_id=key_id)
        return {"apiKeyId": key_id, **report}

    async def keys_usage(self, request):
        """Key summaries: `{windowMs, since, now, keys: [{apiKeyId, label, keyPrefix,
        …AveragedTotals, providers[]}]}` (label and prefix null for a deleted key)."""
        window, now = window_ms(request), self.clock.now()
        rows = await analytics.summaries(self.store, window, now, "api_key_id")
        for row in rows:
            key = self.keys.by_id.get(row["apiKeyId"])
            row["label"] = key.label if key else None
            row["keyPrefix"] = key.key_prefix if key else None
        return self.window_view(window, now) | {"keys": rows}

    async def dashboard(self, request):
        """See analytics.dashboard; plus `queue` (usage waiting in memory: depth, dropped)."""
        report = await analytics.dashboard(self.store, window_ms(request), self.clock.now())
        report["queue"] = {"depth": self.usage.depth, "dropped": self.usage.dropped}
        return report

    async def export_usage(self, request):
        """`GET /admin/usage/export?windowMs&format=csv|json`: the stored minute buckets of the
        window (columns: analytics.EXPORT_HEADER), streamed in pages. CSV: a header row, RFC
        4180 quoting, CRLF line ends. JSON: a list of objects. 400 for another format."""
        window, now = window_ms(request), self.clock.now()
        kind = request.args.get("format", "csv")
        if kind not in ("csv", "json"):
            raise BadRequest(f"format must be csv or json; got {kind[:40]!r}")
        since = analytics.window_start(now, window)
        response = await request.respond(
            content_type="text/csv; charset=utf-8" if kind == "csv" else "application/json",
            headers={
                "cache-control": "no-store",
                "content-disposition": f'attachment; filename="kleis-usage-{since}.{kind}"',
            },
        )
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        if kind == "csv":
            writer.writerow(analytics.EXPORT_HEADER)
        else:
            buffer.write("[")
        first = True
        async for row in analytics.export_rows(self.store, window, now):
            if kind == "csv":
                writer.writerow(row)
            else:
                item = dict(zip(analytics.EXPORT_HEADER, row, strict=True))
                buffer.write(("\n" if first else ",\n") + json.dumps(item))
            first = False
            if buffer.tell() > 256_000:  # send in chunks: memory stays bounded at any row count
                await response.send(buffer.getvalue())
                buffer.seek(0)
                buffer.truncate()
        if kind == "json":
            buffer.write("\n]\n" if not first else "]\n")
        await response.send(buffer.getvalue())
        await response.eof()

    def routes(self) -> list[tuple[str, str, Callable]]:
        """The admin route table: (method, path under /admin, handler)."""
        return [
            ("GET", "/accounts", self.list_accounts),
            ("GET", "/accounts/usage", self.accounts_usage),
            ("GET", "/accounts/providers", self.list_providers),
            ("PATCH", "/accounts/providers/<name>", self.patch_provider),
            ("POST", "/accounts/<name>/oauth/start", self.oauth_start),
            ("POST", "/accounts/<name>/oauth/complete", self.oauth_complete),
            ("GET", "/accounts/<name>/oauth/<state>", self.oauth_status),
            ("POST", "/accounts/<name>/import", self.import_account),
            ("PATCH", "/accounts/<account_id>", self.patch_account),
            ("DELETE", "/accounts/<account_id>", self.delete_account),
            ("POST", "/accounts/<account_id>/primary", self.primary_account),
            ("DELETE", "/accounts/<account_id>/cooldown", self.clear_cooldown),
            ("POST", "/accounts/<account_id>/refresh", self.refresh_account),
            ("GET", "/accounts/<account_id>/quota", self.account_quota),
            ("GET", "/accounts/<account_id>/models", self.account_models),
            ("GET", "/accounts/<account_id>/usage", self.account_usage),
            ("GET", "/keys", self.list_keys),
            ("GET", "/keys/usage", self.keys_usage),
            ("POST", "/keys", self.post_key),
            ("PATCH", "/keys/<key_id>", self.patch_key),
            ("POST", "/keys/<key_id>/revoke", self.revoke_key),
            ("DELETE", "/keys/<key_id>", self.delete_key),
            ("GET", "/keys/<key_id>/usage", self.key_usage),
            ("GET", "/usage/dashboard", self.dashboard),
            ("GET", "/usage/export", self.export_usage),
            ("POST", "/reload", self.reload),
        ]


def blueprint(api: AdminApi, auth: AdminAuth) -> Blueprint:
    """The /admin Blueprint: every route checks the admin token first, and answers JSON
    (a handler returns a body, or `(status, body)`) that is never cached."""
    bp = Blueprint("admin", url_prefix="/admin")

    @bp.on_request
    async def authenticate(request: Request):
        auth.check(request)

    for method, path, handler in api.routes():

        async def route(request: Request, _handler=handler, **params):
            result = await _handler(request, **params)
            if result is None:  # the handler streamed its own response
                return None
            status, body = result if isinstance(result, tuple) else (200, result)
            return sanic_response.json(body, status=status, headers={"cache-control": "no-store"})

        bp.add_route(route, path, methods=[method], name=handler.__name__)
    return bp
