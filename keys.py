"""Kleis API keys and who is asking: the in-memory key cache, key operations, the lockouts and
client addresses.

Keys live in memory indexed by SHA-256, id and discovery token, so an authenticated request
makes no database round trip. Every change goes through `Keys` (admin API and CLI alike):
written by the store, reloaded here at once, and announced to the other instances through
the `keys` cache version they poll.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

from errors import BadRequest, NotFound
from runtime import Clock
from settings import hash_key, new_api_key, new_id
from store import KeyRecord, Store
from validate import future_ms, opt_int, opt_str, str_list

log = logging.getLogger("kleis")

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


LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def client_address(
    headers: Mapping[str, str], peer: str, trust_forwarded: bool, trusted_proxies: Sequence[str] = ()
) -> str:
    """The client's address, for the lockouts: `peer` unless `trust_forwarded`.

    Behind proxies, X-Forwarded-For is read from the right, as nginx (`real_ip_recursive`),
    Caddy (`trusted_proxies`) and Traefik (`depth`) do: each proxy appends the address it was
    reached from, so only the entries our own proxies appended are true, and the leftmost ones
    are whatever the client wrote. The client is the rightmost entry that is not one of our
    proxies: `trusted_proxies` (CIDRs), or by default (empty) loopback addresses, the direct
    peer always counting as our proxy. With a non-empty list a peer outside it did not come
    through our proxy, and its header is ignored. An entry that is not an address stops the
    walk at the hop that passed it on. Several header lines count as one list (RFC 9110 §5.3)."""
    if not trust_forwarded:
        return peer or "unknown"
    networks = _networks(tuple(trusted_proxies))
    if networks and not _trusted(_ip(peer), networks):
        return peer or "unknown"
    networks = networks or LOOPBACK
    getall = getattr(headers, "getall", None)
    lines = getall("x-forwarded-for", []) if getall else [headers.get("x-forwarded-for") or ""]
    entries = [entry.strip() for line in lines for entry in line.split(",")]
    address = peer or "unknown"
    for entry in reversed(entries):
        ip = _ip(entry)
        if ip is None:
            break
        address = str(ip)
        if not _trusted(ip, networks):
            break
    return address


@functools.lru_cache(maxsize=8)
def _networks(cidrs: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)  # checked by settings


def _trusted(ip: Address | None, networks: Sequence) -> bool:
    return ip is not None and any(ip in network for network in networks)


def _ip(text: str) -> Address | None:
    """An address from a forwarded entry or a peer: `1.2.3.4`, `1.2.3.4:80`, `::1`, `[::1]:80`
    (IPv4-mapped IPv6 as IPv4); None for anything else."""
    if not text or len(text) > 64:
        return None
    if text.startswith("["):
        text = text[1 : text.find("]")] if "]" in text else ""
    elif text.count(":") == 1:
        text = text.split(":", 1)[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def lockout_key(address: str) -> str:
    """What a lockout counts under: the address, or for IPv6 its /64 (one customer's network:
    a client owning a /64 could otherwise spread its guesses over 2^64 addresses)."""
    if ":" not in address:
        return address
    ip = _ip(address)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip) if ip is not None else address


class Lockout:
    """Failed attempts per client address (`lockout_key`): `max_failures` within
    `window_seconds` block the address for `lockout_seconds`, during which its attempts are
    refused unevaluated. Times come from `now` (epoch ms).

    Failures drain one at a time, `max_failures` per window (a leaky bucket: no window edge
    across which twice the limit gets through); a block empties the bucket. A success clears
    nothing: a valid key or token says nothing about the other attempts from its address (many
    clients share one NAT address, and a guesser may own one valid key).

    At most `max_entries` addresses are remembered, in order of their last failure: a failure
    costs O(1) (no scan); beyond the bound the entry that failed longest ago is forgotten, and
    drained entries at that end go first. Forgetting a blocked address takes `max_entries`
    other failing addresses, and whoever has that many gets `max_failures` from each anyway."""

    def __init__(
        self,
        max_failures: int,
        lockout_seconds: int,
        now: Callable[[], int],
        window_seconds: int = 60,
        max_entries: int = 50_000,
        what: str = "attempts",
    ):
        self.what = what  # "wrong API keys", "wrong admin tokens": for the log line of a block
        self.max_failures, self.lockout_ms = max_failures, lockout_seconds * 1000
        self.window_ms, self.max_entries = window_seconds * 1000, max_entries
        self.now = now
        # lockout key -> [failures still counted, drained up to (ms), blocked until (ms, 0 = not)]
        self._entries: OrderedDict[str, list] = OrderedDict()
        self.drain_ms = self.window_ms / max_failures if max_failures > 0 else 0.0  # per failure

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, address: str) -> int:
        """Seconds the address is still blocked (0 = not blocked)."""
        entry = self._entries.get(lockout_key(address))
        if entry is None or not entry[2]:  # the common case reads no clock
            return 0
        now = self.now()
        if entry[2] <= now:
            return 0
        return max(1, -(-(entry[2] - now) // 1000))

    def fail(self, address: str) -> None:
        """Count one failed attempt; the `max_failures`-th within the drain blocks."""
        if self.max_failures <= 0:
            return
        now, key, entries = self.now(), lockout_key(address), self._entries
        entry = entries.get(key)
        if entry is None:
            entry = entries[key] = [0, now, 0]
        else:
            entries.move_to_end(key)
            drained = self._drained(entry, now)
            entry[0] -= drained
            entry[1] = now if entry[0] <= 0 else entry[1] + drained * self.drain_ms
            entry[0] = max(0, entry[0])
        entry[0] += 1
        if entry[0] >= self.max_failures:
            entry[0], entry[1], entry[2] = 0, now, now + self.lockout_ms
            log.warning(
                "%s from %s: %d within %d s; refused for %d s",
                self.what, key, self.max_failures, self.window_ms // 1000, self.lockout_ms // 1000,
            )  # fmt: skip
        for _ in range(2):  # forget a couple of fully drained entries at the old end
            oldest = next(iter(entries.values()))
            if oldest is entry or oldest[2] > now or oldest[0] > self._drained(oldest, now):
                break
            entries.popitem(last=False)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def _drained(self, entry: list, now: int) -> int:
        """Whole failures drained from `entry` by `now`."""
        return int((now - entry[1]) // self.drain_ms) if self.drain_ms else entry[0]
