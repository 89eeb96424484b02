"""Kleis API keys and who is asking: the in-memory key cache, key operations, the lockouts and
client addresses.

Keys live in memory indexed by SHA-256, id and discovery token, so an authenticated request
makes no database round trip. Every change goes through `Keys` (admin API and CLI alike):
written by the store, reloaded here at once, and announced to the other instances through
the `keys` cache version they poll.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Collection, Mapping
from typing import Any

from errors import BadRequest, NotFound
from runtime import Clock
from settings import hash_key, new_api_key, new_id
from store import KeyRecord, Store
from validate import future_ms, opt_int, opt_str, str_list

KEY_FIELDS = ("label", "providerScopes", "modelScopes", "accountScopes", "expiresAt")
BEARER = re.compile(r"^\s*bearer\s+(\S.*?)\s*$", re.I)


class Keys:
    """Every API key of this instance, and the only way to change one."""

    def __init__(self, store: Store, clock: Clock):
        self.store = store
        self.clock = clock
        self.by_hash: dict[str, KeyRecord] = {}
        self.by_id: dict[str, KeyRecord] = {}
        self.by_token: dict[str, KeyRecord] = {}

    async def load(self) -> None:
        by_hash, by_id, by_token = {}, {}, {}
        for record in await self.store.list_keys():
            by_hash[record.key_hash], by_id[record.id], by_token[record.discovery_token] = (
                record,
                record,
                record,
            )
        self.by_hash, self.by_id, self.by_token = by_hash, by_id, by_token

    async def changed(self) -> None:
        """After a write: reload here at once and tell the other instances."""
        await self.store.bump_version("keys")
        await self.load()

    # ── reads (no I/O) ──
    def authenticate(self, key: str) -> KeyRecord | None:
        """The active key record for a presented key, or None."""
        record = self.by_hash.get(hash_key(key))
        return record if record is not None and record.active(self.clock.now()) else None

    def by_discovery_token(self, token: str) -> KeyRecord | None:
        record = self.by_token.get(token)
        return record if record is not None and record.active(self.clock.now()) else None

    def get(self, key_id: str) -> KeyRecord:
        record = self.by_id.get(key_id)
        if record is None:
            raise NotFound("API key was not found")
        return record

    def newest_first(self) -> list[KeyRecord]:
        return sorted(self.by_id.values(), key=lambda r: -r.created_at)

    # ── writes ──
    async def create(self, **fields: Any) -> tuple[str, KeyRecord]:
        """A new key from checked `fields` (see `key_fields`); returns the full key (shown
        once, never stored) and its record."""
        key, key_id = new_api_key(), new_id()
        await self.store.create_key(key_id, hash_key(key), key[:12], "kmd_" + secrets.token_hex(16), **fields)
        await self.changed()
        return key, self.by_id[key_id]

    async def update(self, key_id: str, **fields: Any) -> KeyRecord:
        self.get(key_id)
        if fields:
            await self.store.update_key(key_id, **fields)
            await self.changed()
        return self.get(key_id)

    async def revoke(self, key_id: str) -> KeyRecord:
        """Revoke a key everywhere; NotFound when it is missing or already revoked."""
        record = self.by_id.get(key_id)
        if record is None or record.revoked_at is not None:
            raise NotFound("API key was not found or already revoked")
        if not await self.store.revoke_key(key_id, self.clock.now()):
            raise NotFound("API key was not found or already revoked")
        await self.changed()
        return self.get(key_id)

    async def delete(self, key_id: str) -> None:
        """Delete a revoked key; its usage stays under its id (see Store.delete_key)."""
        if self.get(key_id).revoked_at is None:
            raise BadRequest("only revoked API keys can be deleted; revoke it first")
        await self.store.delete_key(key_id)
        await self.changed()


def key_fields(
    body: dict, *, partial: bool, providers: Collection[str], account_providers: Mapping[str, str], now: int
) -> dict[str, Any]:
    """Checked key fields from an admin/CLI body (camelCase names of KEY_FIELDS). On `partial`
    (PATCH) absent fields are left out; otherwise they are set to their defaults.
    `account_providers` maps every existing account id to its provider."""
    values: dict[str, Any] = {}
    if "label" in body or not partial:
        values["label"] = opt_str(body, "label", 120)
    provider_scopes = str_list(body, "providerScopes") if "providerScopes" in body else None
    if provider_scopes:
        unknown = [p for p in provider_scopes if p not in providers]
        if unknown:
            raise BadRequest(
                f"providerScopes: unknown provider(s) {', '.join(unknown)}; "
                f"configured: {', '.join(providers)}"
            )
    if "providerScopes" in body or not partial:
        values["provider_scopes"] = provider_scopes
    if "modelScopes" in body or not partial:
        values["model_scopes"] = str_list(body, "modelScopes")
    if "accountScopes" in body or not partial:
        account_scopes = str_list(body, "accountScopes")
        if account_scopes:
            if any(a not in account_providers for a in account_scopes):
                raise BadRequest("accountScopes must reference existing provider accounts")
            owners = [account_providers[a] for a in account_scopes]
            if len(set(owners)) != len(owners):
                raise BadRequest("accountScopes can include at most one account per provider")
            if provider_scopes and any(p not in provider_scopes for p in owners):
                raise BadRequest("accountScopes must belong to providers allowed by providerScopes")
        values["account_scopes"] = account_scopes
    if "expiresAt" in body or not partial:
        values["expires_at"] = future_ms(opt_int(body, "expiresAt"), "expiresAt", now)
    return values


def key_view(record: KeyRecord, base: str, now: int, key: str | None = None) -> dict:
    """The admin/CLI view of a key (never its hash). `key` is given only at creation, the one
    time the full key is shown; the OpenCode snippet then carries it too."""
    scoped = f"{base}/api/{record.discovery_token}"
    shown = key or "<the key>"
    view = {
        "id": record.id, "keyPrefix": record.key_prefix, "label": record.label, "status": record.status(now),
        "providerScopes": list(record.provider_scopes) if record.provider_scopes else None,
        "modelScopes": list(record.model_scopes) if record.model_scopes else None,
        "accountScopes": list(record.account_scopes) if record.account_scopes else None,
        "expiresAt": record.expires_at, "revokedAt": record.revoked_at, "createdAt": record.created_at,
        "modelsDiscoveryToken": record.discovery_token, "scopedModelsUrl": scoped,
        "opencode": {"OPENCODE_MODELS_URL": scoped, "KLEIS_API_KEY": key or f"{record.key_prefix}…",
                     "snippet": f'export OPENCODE_MODELS_URL="{scoped}"\nexport KLEIS_API_KEY="{shown}"\n'
                                f"opencode models --refresh"},
    }  # fmt: skip
    if key:
        view["key"] = key
    return view


# ══ Who is asking ═══════════════════════════════════════════════════════════


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key from `Authorization: Bearer …` (any case) or `x-api-key`."""
    auth = headers.get("authorization")
    if auth:
        match = BEARER.match(auth)
        return match.group(1) if match else None
    key = headers.get("x-api-key", "").strip()
    return key or None


def bearer(headers: Mapping[str, str]) -> str:
    """The bearer token of `Authorization` ("" when there is none)."""
    match = BEARER.match(headers.get("authorization", ""))
    return match.group(1) if match else ""


def client_address(headers: Mapping[str, str], peer: str, trust_forwarded: bool) -> str:
    """The client's address: `peer`, or the first X-Forwarded-For entry when trusted."""
    if trust_forwarded:
        forwarded = headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return peer or "unknown"


class Lockout:
    """Counts failed attempts per client address; `max_failures` within `window_seconds`
    blocks the address for `lockout_seconds`. Times come from `now` (epoch ms)."""

    def __init__(
        self, max_failures: int, lockout_seconds: int, now: Callable[[], int], window_seconds: int = 60
    ):
        self.max_failures, self.lockout_ms, self.window_ms = (
            max_failures,
            lockout_seconds * 1000,
            window_seconds * 1000,
        )
        self.now = now
        self._entries: dict[str, list[int]] = {}  # address -> [failures, window start, blocked until]

    def retry_after(self, address: str) -> int:
        """Seconds the address is still blocked (0 = not blocked)."""
        entry = self._entries.get(address)
        if entry is None or not entry[2]:  # the common case reads no clock
            return 0
        now = self.now()
        if entry[2] <= now:
            return 0
        return max(1, -(-(entry[2] - now) // 1000))

    def fail(self, address: str) -> None:
        if self.max_failures <= 0:
            return
        now = self.now()
        entry = self._entries.get(address)
        if entry is None or now - entry[1] >= self.window_ms:
            entry = self._entries[address] = [0, now, 0]
        entry[0] += 1
        if entry[0] >= self.max_failures:
            entry[:] = [0, now, now + self.lockout_ms]
        if len(self._entries) > 10_000:  # bounded memory under a scan
            for addr in [a for a, e in self._entries.items() if e[2] <= now and now - e[1] >= self.window_ms]:
                del self._entries[addr]

    def succeed(self, address: str) -> None:
        self._entries.pop(address, None)
