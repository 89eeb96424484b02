"""Kleis: one base URL and one scoped API key for OAuth-backed coding-agent accounts.

Run:    python kleis.py                 (same as `serve`; creates config.toml on first start)
Other:  python kleis.py init | check | keys create|list|revoke | accounts list|login|import|
        refresh|primary|remove | usage | rotate-secret | systemd-unit   (--help on each)

This file is the composition root. It reads top to bottom: errors, store, providers, keys,
accounts, usage, proxy, discovery, admin API, app, CLI. Each section only uses what comes before
it. Three pure, separately tested parts live beside it: settings.py (config and secrets),
usage.py (outcome classification, metrics, report arithmetic) and discovery.py (the model
registry). Provider adapters live in providers/ and meet providers/__init__.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import hashlib
import hmac
import importlib.util
import json
import logging
import os
import re
import secrets
import socket
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import peewee
import peewee_async
from sanic import Request, Sanic
from sanic import response as sanic_response
from sanic.exceptions import SanicException

import discovery
import providers
from providers import (
    Account,
    Context,
    Cooldown,
    LoginPending,
    ProviderError,
    ProxyRequest,
    ReauthRequired,
    Tokens,
)
from settings import (
    ConfigError,
    ServerSettings,
    Settings,
    Vault,
    check_value,
    hash_key,
    load_settings,
    new_api_key,
    new_id,
    setup_logging,
    write_new_config,
)
from usage import (
    LAST_AT,
    MAX_LATENCY,
    USAGE_COUNTERS,
    C,
    Metrics,
    Outcome,
    averaged,
    camel,
    classify,
)

VERSION = "0.1.0"
HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "schema.sql"
MIGRATIONS_DIR = HERE / "migrations"
log = logging.getLogger("kleis")


def now_ms() -> int:
    return int(time.time() * 1000)


# ══ Errors ══════════════════════════════════════════════════════════════════
# Typed inside, rendered once at the edge in the envelope the caller parses.

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class KleisError(Exception):
    """An error Kleis answers itself. `code` is the short machine name (admin `error` field)."""

    def __init__(self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        if self.status >= 500:
            return "api_error" if self.status != 503 else "overloaded_error"
        return ERROR_TYPES.get(self.status, "invalid_request_error")


def bad_request(message: str, code: str = "bad_request") -> KleisError:
    return KleisError(400, code, message)


def not_found(message: str) -> KleisError:
    return KleisError(404, "not_found", message)


def error_body(style: str, exc: KleisError) -> dict:
    """The JSON body of an error in one of the three envelopes."""
    if style == "anthropic":
        return {"type": "error", "error": {"type": exc.type, "message": exc.message}}
    if style == "openai":
        kind = "server_error" if exc.status >= 500 else exc.type
        if kind == "request_too_large":
            kind = "invalid_request_error"
        return {"error": {"message": exc.message, "type": kind, "code": exc.code}}
    return {"error": exc.code, "message": exc.message}


# ══ Store ═══════════════════════════════════════════════════════════════════
# schema.sql is the only schema; these models are a typed view of it (a test compares them).
# Models are bound to a database at start-up, never at import. Runtime queries are async.


class BaseModel(peewee_async.AioModel):
    pass


class ProviderAccountRow(BaseModel):
    id = peewee.TextField(primary_key=True)
    provider = peewee.TextField()
    label = peewee.TextField(default="")
    account_id = peewee.TextField(null=True)
    is_primary = peewee.IntegerField(default=0)
    enabled = peewee.IntegerField(default=1)
    priority = peewee.IntegerField(default=0)
    status = peewee.TextField(default="ok")
    access_token_enc = peewee.TextField()
    refresh_token_enc = peewee.TextField()
    expires_at = peewee.BigIntegerField()
    metadata_json = peewee.TextField(default="{}")
    cooldown_until = peewee.BigIntegerField(null=True)
    cooldown_kind = peewee.TextField(null=True)
    last_error = peewee.TextField(null=True)
    last_refresh_at = peewee.BigIntegerField(null=True)
    last_refresh_status = peewee.TextField(null=True)
    refresh_lock_token = peewee.TextField(null=True)
    refresh_lock_expires_at = peewee.BigIntegerField(null=True)
    created_at = peewee.BigIntegerField()
    updated_at = peewee.BigIntegerField()

    class Meta:
        table_name = "provider_accounts"


class ApiKeyRow(BaseModel):
    id = peewee.TextField(primary_key=True)
    key_hash = peewee.TextField()
    key_prefix = peewee.TextField()
    models_discovery_token = peewee.TextField()
    label = peewee.TextField(null=True)
    provider_scope_json = peewee.TextField(null=True)
    model_scope_json = peewee.TextField(null=True)
    account_scope_json = peewee.TextField(null=True)
    expires_at = peewee.BigIntegerField(null=True)
    revoked_at = peewee.BigIntegerField(null=True)
    created_at = peewee.BigIntegerField()

    class Meta:
        table_name = "api_keys"


class OAuthStateRow(BaseModel):
    state = peewee.TextField(primary_key=True)
    provider = peewee.TextField()
    method = peewee.TextField()
    data_enc = peewee.TextField()
    status = peewee.TextField(default="pending")
    result_account_id = peewee.TextField(null=True)
    message = peewee.TextField(null=True)
    interval_ms = peewee.BigIntegerField(default=5000)
    expires_at = peewee.BigIntegerField()
    created_at = peewee.BigIntegerField()

    class Meta:
        table_name = "oauth_states"


class UsageBucketRow(BaseModel):
    bucket_start = peewee.BigIntegerField()
    api_key_id = peewee.TextField()
    provider_account_id = peewee.TextField()
    provider = peewee.TextField()
    endpoint = peewee.TextField()
    model = peewee.TextField(default="")
    request_count = peewee.IntegerField(default=0)
    success_count = peewee.IntegerField(default=0)
    client_error_count = peewee.IntegerField(default=0)
    server_error_count = peewee.IntegerField(default=0)
    auth_error_count = peewee.IntegerField(default=0)
    rate_limit_count = peewee.IntegerField(default=0)
    proxy_error_count = peewee.IntegerField(default=0)
    upstream_error_count = peewee.IntegerField(default=0)
    incomplete_count = peewee.IntegerField(default=0)
    cancelled_count = peewee.IntegerField(default=0)
    total_latency_ms = peewee.BigIntegerField(default=0)
    max_latency_ms = peewee.BigIntegerField(default=0)
    total_duration_ms = peewee.BigIntegerField(default=0)
    input_tokens = peewee.BigIntegerField(default=0)
    output_tokens = peewee.BigIntegerField(default=0)
    cache_read_tokens = peewee.BigIntegerField(default=0)
    cache_write_tokens = peewee.BigIntegerField(default=0)
    last_request_at = peewee.BigIntegerField()

    class Meta:
        table_name = "request_usage_buckets"
        primary_key = peewee.CompositeKey(
            "bucket_start", "api_key_id", "provider_account_id", "provider", "endpoint", "model"
        )


class CacheVersionRow(BaseModel):
    name = peewee.TextField(primary_key=True)
    version = peewee.BigIntegerField()

    class Meta:
        table_name = "cache_versions"


class SchemaMigrationRow(BaseModel):
    version = peewee.TextField(primary_key=True)
    applied_at = peewee.BigIntegerField()

    class Meta:
        table_name = "schema_migrations"


MODELS = [ProviderAccountRow, ApiKeyRow, OAuthStateRow, UsageBucketRow, CacheVersionRow, SchemaMigrationRow]


def open_database(settings: Settings) -> peewee_async.AioDatabase:
    """A peewee-async database for [database] url (SQLite path relative to the config file)."""
    url = settings.database.url
    if url.startswith("sqlite:///"):
        path = url[len("sqlite:///"):]
        target = ":memory:" if path == ":memory:" else str(settings.resolve(path))
        # aiosqlite opens one connection per acquire; `timeout` is SQLite's busy timeout.
        db = peewee_async.SqliteDatabase(target, pool_params={"timeout": 15})
    else:
        parts = urlsplit(url)
        db = peewee_async.Psycopg3Database(
            unquote(parts.path.lstrip("/")) or "postgres",
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5432,
            user=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            pool_params={"min_size": 1, "max_size": 10},
        )
    db.bind(MODELS)
    return db


def is_sqlite(db: peewee.Database) -> bool:
    return isinstance(db, peewee.SqliteDatabase)


def schema_statements(text: str) -> list[str]:
    """schema.sql split into statements (comments dropped)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


async def apply_schema(db: peewee_async.AioDatabase) -> None:
    """Create missing tables, then run migrations/NNN_*.sql not yet recorded. A fresh database
    gets the full schema.sql, so its migrations are recorded without running."""
    fresh = "provider_accounts" not in await db.aio_get_tables()
    if is_sqlite(db):
        await db.aio_execute_sql("PRAGMA journal_mode=WAL")
    async with db.aio_connection():
        for statement in schema_statements(SCHEMA_FILE.read_text()):
            await db.aio_execute_sql(statement)
        done = {r.version for r in await SchemaMigrationRow.select().aio_execute()}
        for path in sorted(MIGRATIONS_DIR.glob("[0-9][0-9][0-9]_*.sql")):
            if path.stem in done:
                continue
            if not fresh:
                for statement in schema_statements(path.read_text()):
                    await db.aio_execute_sql(statement)
            await SchemaMigrationRow.insert(version=path.stem, applied_at=now_ms()).aio_execute()


async def bump_version(name: str) -> None:
    """Tell every instance (this one included) that cached `name` rows changed."""
    await (
        CacheVersionRow.insert(name=name, version=1)
        .on_conflict(conflict_target=[CacheVersionRow.name],
                     update={CacheVersionRow.version: CacheVersionRow.version + 1})
        .aio_execute()
    )


async def read_versions() -> dict[str, int]:
    return {r.name: r.version for r in await CacheVersionRow.select().aio_execute()}


def loads_json(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def dumps_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


# ══ Providers ═══════════════════════════════════════════════════════════════
# Adapters are modules: providers/<entry>.py or <plugins_dir>/<entry>.py, checked at start-up.


@dataclass
class Provider:
    """A loaded provider: its module, validated options and adapter context."""

    name: str
    module: ModuleType
    options: dict[str, Any]
    ctx: Context | None = None  # built when the HTTP session exists

    @property
    def error_style(self) -> str:
        return self.module.ERROR_STYLE

    def has(self, function: str) -> bool:
        return callable(getattr(self.module, function, None))


def available_entries(plugins_dir: Path | None) -> list[str]:
    folders = [HERE / "providers"] + ([plugins_dir] if plugins_dir else [])
    names = {p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.py")}
    return sorted(n for n in names if not n.startswith("_"))


def import_entry(entry: str, plugins_dir: Path | None) -> ModuleType:
    if plugins_dir and (plugins_dir / f"{entry}.py").is_file():
        # Loaded under the providers package so `from . import Tokens` works in plugins too.
        name = f"providers.{entry}"
        spec = importlib.util.spec_from_file_location(name, plugins_dir / f"{entry}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(f"providers.{entry}")


def load_providers(settings: Settings) -> dict[str, Provider]:
    """Import every enabled provider entry, check the contract and its options."""
    plugins_dir = settings.resolve(settings.server.plugins_dir) if settings.server.plugins_dir else None
    if plugins_dir and not plugins_dir.is_dir():
        raise ConfigError(f"[server] plugins_dir: {plugins_dir} is not a folder")
    available = available_entries(plugins_dir)
    loaded: dict[str, Provider] = {}
    routes: dict[str, str] = {}
    for name, section in settings.providers.items():
        if not section.enabled:
            continue
        if section.entry not in available:
            raise ConfigError(f"[providers.{name}] entry: {section.entry!r} not found; available: {', '.join(available)}")
        try:
            module = import_entry(section.entry, plugins_dir)
        except Exception as exc:
            raise ConfigError(f"[providers.{name}] entry: {section.entry!r} failed to import: {exc}") from None
        missing = [c for c in providers.REQUIRED_CONSTANTS if not hasattr(module, c)]
        missing += [f for f in providers.REQUIRED_FUNCTIONS if not callable(getattr(module, f, None))]
        if missing or module.CONTRACT != providers.API:
            raise ConfigError(f"[providers.{name}] entry: {section.entry}.py does not meet contract v{providers.API}"
                              f" (missing: {', '.join(missing) or 'none'}; CONTRACT={getattr(module, 'CONTRACT', None)})")
        options = {}
        for key, value in section.options.items():
            if key not in module.OPTIONS:
                raise ConfigError(f"[providers.{name}] {key}: unknown key (known: enabled, entry, {', '.join(module.OPTIONS)})")
            options[key] = check_value(f"providers.{name}", key, value, module.OPTIONS[key])
        for path in module.ROUTES:
            if path in routes:
                raise ConfigError(f"[providers.{name}]: route {path} is already served by {routes[path]}")
            routes[path] = name
        loaded[name] = Provider(name=name, module=module, options={**module.OPTIONS, **options})
    return loaded


# ══ Keys ════════════════════════════════════════════════════════════════════
# API keys live in memory (by SHA-256) so an authenticated request makes no DB round trip;
# admin changes bump the `keys` cache version, which every instance polls.


@dataclass(frozen=True)
class KeyRecord:
    id: str
    key_prefix: str
    discovery_token: str
    label: str | None
    provider_scopes: tuple[str, ...] | None
    model_scopes: tuple[str, ...] | None
    account_scopes: tuple[str, ...] | None
    expires_at: int | None
    revoked_at: int | None
    created_at: int

    @classmethod
    def from_row(cls, row: ApiKeyRow) -> KeyRecord:
        def scope(text):
            value = loads_json(text, None)
            return tuple(str(v) for v in value) if isinstance(value, list) and value else None

        return cls(
            id=row.id, key_prefix=row.key_prefix, discovery_token=row.models_discovery_token,
            label=row.label, provider_scopes=scope(row.provider_scope_json),
            model_scopes=scope(row.model_scope_json), account_scopes=scope(row.account_scope_json),
            expires_at=row.expires_at, revoked_at=row.revoked_at, created_at=row.created_at,
        )  # fmt: skip

    def active(self, now: int) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def status(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.active(now) else "expired"


class KeyCache:
    """Every API key, indexed by key hash, id and discovery token."""

    def __init__(self) -> None:
        self.by_hash: dict[str, KeyRecord] = {}
        self.by_id: dict[str, KeyRecord] = {}
        self.by_token: dict[str, KeyRecord] = {}

    async def load(self) -> None:
        rows = await ApiKeyRow.select().aio_execute()
        by_hash, by_id, by_token = {}, {}, {}
        for row in rows:
            record = KeyRecord.from_row(row)
            by_hash[row.key_hash], by_id[row.id], by_token[row.models_discovery_token] = record, record, record
        self.by_hash, self.by_id, self.by_token = by_hash, by_id, by_token

    def authenticate(self, key: str, now: int) -> KeyRecord | None:
        """The active key record for a presented key, or None."""
        digest = hash_key(key)
        record = self.by_hash.get(digest)
        return record if record is not None and record.active(now) else None


class Lockout:
    """Counts failed attempts per client address; too many in a minute blocks it for a while."""

    def __init__(self, max_failures: int, lockout_seconds: int, window_seconds: int = 60):
        self.max_failures, self.lockout_ms, self.window_ms = max_failures, lockout_seconds * 1000, window_seconds * 1000
        self._entries: dict[str, list[int]] = {}  # address -> [failures, window start, blocked until]

    def retry_after(self, address: str, now: int) -> int:
        """Seconds the address is still blocked (0 = not blocked)."""
        entry = self._entries.get(address)
        if entry is None or entry[2] <= now:
            return 0
        return max(1, -(-(entry[2] - now) // 1000))

    def fail(self, address: str, now: int) -> None:
        if self.max_failures <= 0:
            return
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


BEARER = re.compile(r"^\s*bearer\s+(\S.*?)\s*$", re.I)


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key from `Authorization: Bearer …` (any case) or `x-api-key`."""
    auth = headers.get("authorization")
    if auth:
        match = BEARER.match(auth)
        return match.group(1) if match else None
    key = headers.get("x-api-key", "").strip()
    return key or None


def client_address(request: Request, trust_forwarded: bool) -> str:
    if trust_forwarded:
        forwarded = request.headers.get("x-forwarded-for")
        if forwarded:
            return forwarded.split(",")[0].strip()
    return request.ip or "unknown"


# ══ Accounts ════════════════════════════════════════════════════════════════
# All accounts live in memory with decrypted tokens. Selection, stickiness and cooldowns are
# in memory; refresh is single-flight per account in-process plus a DB lease across instances.

REFRESH_SKEW_MS = 60_000  # request path: refresh when the token expires within a minute
BACKGROUND_SKEW_MS = 300_000  # background refresher: within five minutes
LEASE_MS = 60_000
COOLDOWN_MIN, COOLDOWN_MAX, COOLDOWN_DEFAULT = 1.0, 6 * 3600.0, 60.0
ERROR_COOLDOWN = 10.0  # 5xx / unreachable without a hint: short, it is not a rate limit
STICKY_TTL_MS = 3600_000
STICKY_MAX = 20_000


@dataclass
class AccountState:
    """One account as cached in memory."""

    id: str
    provider: str
    label: str
    account_id: str | None
    is_primary: bool
    enabled: bool
    priority: int
    status: str
    access_token: str
    refresh_token: str
    expires_at: int
    metadata: dict
    cooldown_until: int | None
    cooldown_kind: str | None
    last_error: str | None
    last_refresh_at: int | None
    last_refresh_status: str | None
    created_at: int
    updated_at: int

    def __repr__(self) -> str:
        return f"AccountState({self.provider}:{self.label or self.id})"

    @classmethod
    def from_row(cls, row: ProviderAccountRow, vault: Vault) -> AccountState:
        return cls(
            id=row.id, provider=row.provider, label=row.label, account_id=row.account_id,
            is_primary=bool(row.is_primary), enabled=bool(row.enabled), priority=row.priority,
            status=row.status, access_token=vault.open(row.access_token_enc),
            refresh_token=vault.open(row.refresh_token_enc), expires_at=row.expires_at,
            metadata=loads_json(row.metadata_json, {}) or {}, cooldown_until=row.cooldown_until,
            cooldown_kind=row.cooldown_kind, last_error=row.last_error, last_refresh_at=row.last_refresh_at,
            last_refresh_status=row.last_refresh_status, created_at=row.created_at, updated_at=row.updated_at,
        )  # fmt: skip

    def adapter_view(self) -> Account:
        return Account(id=self.id, label=self.label, account_id=self.account_id, access_token=self.access_token,
                       refresh_token=self.refresh_token, expires_at=self.expires_at, metadata=self.metadata)

    def cooling(self, now: int) -> bool:
        return self.cooldown_until is not None and self.cooldown_until > now

    def view_status(self, now: int) -> str:
        if not self.enabled:
            return "disabled"
        if self.status == "needs_reauth":
            return "needs_reauth"
        return "cooling_down" if self.cooling(now) else "ok"

    def view(self, now: int) -> dict:
        """The admin view: never tokens."""
        return {
            "id": self.id, "provider": self.provider, "label": self.label, "accountId": self.account_id,
            "isPrimary": self.is_primary, "enabled": self.enabled, "priority": self.priority,
            "status": self.view_status(now), "metadata": self.metadata, "expiresAt": self.expires_at,
            "cooldownUntil": self.cooldown_until if self.cooling(now) else None,
            "cooldownKind": self.cooldown_kind if self.cooling(now) else None,
            "lastError": self.last_error, "lastRefreshAt": self.last_refresh_at,
            "lastRefreshStatus": self.last_refresh_status, "createdAt": self.created_at,
            "updatedAt": self.updated_at,
        }  # fmt: skip


def account_order(a: AccountState) -> tuple:
    """Primary first, then lower priority number, then newest."""
    return (not a.is_primary, a.priority, -a.created_at)


def bounded_cooldown(seconds: float | None) -> float:
    if seconds is None or seconds != seconds:  # None or NaN
        return COOLDOWN_DEFAULT
    return min(max(float(seconds), COOLDOWN_MIN), COOLDOWN_MAX)


def header_cooldown(headers: Mapping[str, str], now: int) -> float | None:
    """Seconds to rest from standard rate-limit headers (Retry-After, x-ratelimit-reset-*)."""
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        if value.replace(".", "", 1).isdigit():
            return float(value)
        from email.utils import parsedate_to_datetime

        with contextlib.suppress(TypeError, ValueError):
            return parsedate_to_datetime(value).timestamp() - now / 1000
    for name, raw in headers.items():
        if name.startswith("x-ratelimit-reset") and raw:
            seconds = duration_seconds(raw.strip(), now)
            if seconds is not None:
                return seconds
    return None


def duration_seconds(value: str, now: int) -> float | None:
    """`30`, `1.5s`, `6m0s`, `250ms`, or an epoch timestamp, as seconds from now."""
    if re.fullmatch(r"\d+(\.\d+)?", value):
        number = float(value)
        return number - now / 1000 if number > 1_000_000_000 else number
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        return None
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


class NoAccount(KleisError):
    pass


class AccountPool:
    """Accounts in memory: selection, stickiness, cooldowns, refresh, upserts and admin edits."""

    def __init__(self, db: peewee_async.AioDatabase, vault: Vault, providers_: Mapping[str, Provider],
                 now: Callable[[], int] = now_ms):
        self.db = db
        self.vault = vault
        self.providers = providers_
        self.now = now
        self.accounts: dict[str, AccountState] = {}
        self.by_provider: dict[str, list[AccountState]] = {}
        self.sticky: OrderedDict[tuple, tuple[str, int]] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}
        self._background: set[asyncio.Task] = set()
        self.refresh_outcomes: dict[str, int] = {"success": 0, "failed": 0, "reauth": 0}

    # ── cache ──
    async def load(self) -> None:
        rows = await ProviderAccountRow.select().aio_execute()
        accounts = {}
        for row in rows:
            try:
                accounts[row.id] = AccountState.from_row(row, self.vault)
            except ConfigError as exc:
                log.error("account %s (%s): %s", row.id, row.provider, exc)
        self._install(accounts)

    def _install(self, accounts: dict[str, AccountState]) -> None:
        by_provider: dict[str, list[AccountState]] = {}
        for account in accounts.values():
            by_provider.setdefault(account.provider, []).append(account)
        for items in by_provider.values():
            items.sort(key=account_order)
        self.accounts, self.by_provider = accounts, by_provider

    async def changed(self) -> None:
        """After a write: reload here at once, and tell the other instances."""
        await bump_version("accounts")
        await self.load()

    def spawn(self, coro) -> None:
        """Run a small write in the background (strong reference kept until it ends)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        if self._background:
            await asyncio.wait(list(self._background), timeout=10)

    def configured(self) -> set[str]:
        """Providers that have at least one enabled account (discovery lists only those)."""
        return {p for p, items in self.by_provider.items() if p in self.providers and any(a.enabled for a in items)}

    # ── selection ──
    def eligible(self, provider: str, key: KeyRecord) -> list[AccountState]:
        accounts = self.by_provider.get(provider, [])
        if key.account_scopes is not None:
            scoped = set(key.account_scopes)
            accounts = [a for a in accounts if a.id in scoped]
            if not accounts:
                raise NoAccount(403, "account_scope_missing",
                                f"this API key is limited to accounts that do not include any {provider} account")
        enabled = [a for a in accounts if a.enabled]
        if not enabled and accounts:
            raise NoAccount(400, "no_account", f"every {provider} account is disabled in Kleis; enable one on the "
                            f"admin page (PATCH /admin/accounts/<id> {{\"enabled\": true}})")
        if not enabled:
            raise NoAccount(400, "no_account",
                            f"no {provider} account is configured in Kleis; add one on the admin page or with "
                            f"`python kleis.py accounts login {provider}`")
        return enabled

    def choose(self, provider: str, key: KeyRecord, session: str | None) -> list[AccountState]:
        """Accounts to try in order: the sticky one first while healthy, then by order; cooling
        and re-auth accounts are left out. Raises NoAccount when nothing is usable."""
        now = self.now()
        enabled = self.eligible(provider, key)
        usable = [a for a in enabled if a.status != "needs_reauth" and not a.cooling(now)]
        if not usable:
            cooling = [a for a in enabled if a.cooling(now)]
            if cooling:
                wait = min(a.cooldown_until for a in cooling) - now
                seconds = max(1, -(-wait // 1000))
                if any(a.cooldown_kind != "error" for a in cooling):
                    raise NoAccount(429, "accounts_cooling_down",
                                    f"every {provider} account is rate limited; retry in {seconds} s",
                                    {"Retry-After": str(seconds)})
                # Not a rate limit: the provider failed or was unreachable a moment ago.
                last = max(cooling, key=lambda a: a.cooldown_until).last_error or "an upstream error"
                raise NoAccount(503, "accounts_unavailable",
                                f"every {provider} account failed a moment ago ({last}); retry in {seconds} s",
                                {"Retry-After": str(seconds)})
            labels = ", ".join(a.label or a.id for a in enabled)
            raise NoAccount(403, "account_needs_reauth",
                            f"the {provider} account(s) {labels} need a new login: their refresh token was "
                            f"rejected; log in again on the admin page or with `python kleis.py accounts login {provider}`")
        if session:
            sticky = self.sticky.get((key.id, provider, session))
            if sticky and now - sticky[1] < STICKY_TTL_MS:
                for i, account in enumerate(usable):
                    if account.id == sticky[0]:
                        if i:
                            usable.insert(0, usable.pop(i))
                        break
        return usable

    def stick(self, provider: str, key: KeyRecord, session: str | None, account: AccountState) -> None:
        if not session:
            return
        entry = (key.id, provider, session)
        self.sticky[entry] = (account.id, self.now())
        self.sticky.move_to_end(entry)
        while len(self.sticky) > STICKY_MAX:
            self.sticky.popitem(last=False)

    def cool_down(self, account: AccountState, cooldown: Cooldown, reason: str, kind: str | None = None) -> None:
        """Rest an account after a 429/5xx/connection failure (in memory now, in the DB soon).

        `kind`: "window" (a usage window is exhausted), "transient" (a short rate limit) or
        "error" (5xx, unreachable, refresh failed: not a rate limit)."""
        account = self.accounts.get(account.id, account)  # a refresh attempt may have replaced the caller's copy
        now = self.now()
        seconds = bounded_cooldown(cooldown.seconds)
        account.cooldown_until = now + int(seconds * 1000)
        account.cooldown_kind = "window" if cooldown.window_exhausted else (kind or "transient")
        account.last_error = reason[:500]
        log.warning("%s account %s cooling down %.0f s (%s): %s", account.provider, account.label or account.id,
                    seconds, account.cooldown_kind, reason[:200])
        self.spawn(self._save_cooldown(account.id, account.cooldown_until, account.cooldown_kind, account.last_error))

    async def _save_cooldown(self, account_id: str, until: int, kind: str, error: str) -> None:
        try:
            await ProviderAccountRow.update(cooldown_until=until, cooldown_kind=kind, last_error=error,
                                            updated_at=self.now()).where(ProviderAccountRow.id == account_id).aio_execute()
        except Exception as exc:  # a lost cooldown only costs one more failed try
            log.warning("could not save cooldown of account %s: %s", account_id, exc)

    # ── refresh ──
    async def fresh(self, account: AccountState, *, force: bool = False, seen_token: str | None = None,
                    skew: int = REFRESH_SKEW_MS) -> AccountState:
        """The account with a token valid for at least `skew` ms (refreshing if needed).

        `force` refreshes regardless of expiry unless the token changed since `seen_token`
        (someone refreshed while we waited). One refresh per account at a time: an asyncio
        lock here, a DB lease across instances."""
        lock = self._locks.setdefault(account.id, asyncio.Lock())
        async with lock:
            current = self.accounts.get(account.id, account)
            if self._fresh_enough(current, force, seen_token, skew):
                return current
            if not force and current.access_token != account.access_token and current.expires_at > self.now():
                return current  # refreshed while we waited for the lock: one refresh serves every waiter
            # A client that goes away must not cancel a refresh half-way: the provider may have
            # rotated the refresh token already, and the DB lease would stay taken for a minute.
            task = asyncio.get_running_loop().create_task(self._refresh_with_lease(current, force, seen_token, skew))
            self._background.add(task)
            task.add_done_callback(lambda t: self._background.discard(t) or t.cancelled() or t.exception())
            return await asyncio.shield(task)

    def _fresh_enough(self, account: AccountState, force: bool, seen_token: str | None, skew: int) -> bool:
        if force:
            return seen_token is not None and account.access_token != seen_token
        return account.expires_at - self.now() > skew

    async def _refresh_with_lease(self, account: AccountState, force: bool, seen_token: str | None,
                                  skew: int) -> AccountState:
        provider = self.providers[account.provider]
        lease = new_id()
        deadline = time.monotonic() + 15
        while True:
            now = self.now()
            got = await ProviderAccountRow.update(
                refresh_lock_token=lease, refresh_lock_expires_at=now + LEASE_MS
            ).where(
                (ProviderAccountRow.id == account.id)
                & (ProviderAccountRow.refresh_lock_token.is_null() | (ProviderAccountRow.refresh_lock_expires_at <= now))
            ).aio_execute()
            row = await ProviderAccountRow.select().where(ProviderAccountRow.id == account.id).aio_first()
            if row is None:
                raise NoAccount(404, "not_found", "the account was deleted while refreshing")
            latest = AccountState.from_row(row, self.vault)
            self._merge(latest)
            if self._fresh_enough(latest, force, seen_token, skew) or (
                    not force and latest.access_token != account.access_token and latest.expires_at > now):
                if got:
                    await self._release(account.id, lease)
                return latest  # another instance refreshed it meanwhile
            if got:
                break
            if time.monotonic() > deadline:
                raise ProviderError(f"{account.provider} account {account.label}: a refresh is already in progress elsewhere")
            await asyncio.sleep(0.2)  # another instance holds the lease; wait for it
        try:
            tokens = await provider.module.refresh(provider.ctx, latest.adapter_view())
        except ReauthRequired as exc:
            row = await ProviderAccountRow.select().where(ProviderAccountRow.id == latest.id).aio_first()
            if row is not None and self.vault.open(row.refresh_token_enc) != latest.refresh_token:
                # Someone else (another instance, the CLI, an import) rotated it meanwhile.
                await self._release(latest.id, lease)
                rotated = AccountState.from_row(row, self.vault)
                self._merge(rotated)
                return rotated
            self.refresh_outcomes["reauth"] += 1
            await self._refresh_failed(latest, lease, str(exc), reauth=True)
            raise
        except ProviderError as exc:
            self.refresh_outcomes["failed"] += 1
            await self._refresh_failed(latest, lease, str(exc), reauth=False)
            raise
        except Exception as exc:
            self.refresh_outcomes["failed"] += 1
            await self._refresh_failed(latest, lease, f"refresh failed: {type(exc).__name__}", reauth=False)
            raise ProviderError(f"{account.provider} refresh failed: {type(exc).__name__}") from None
        if not tokens.access_token or not tokens.refresh_token or tokens.expires_at <= self.now():
            await self._refresh_failed(latest, lease, "refresh returned unusable tokens", reauth=False)
            raise ProviderError(f"{account.provider} refresh returned unusable tokens")
        now = self.now()
        metadata = {**latest.metadata, **tokens.metadata}
        # Tokens are committed and the lease released in one statement, guarded by our lease.
        written = await ProviderAccountRow.update(
            access_token_enc=self.vault.seal(tokens.access_token),
            refresh_token_enc=self.vault.seal(tokens.refresh_token),
            expires_at=tokens.expires_at, metadata_json=dumps_json(metadata), status="ok",
            last_refresh_at=now, last_refresh_status="success", last_error=None,
            refresh_lock_token=None, refresh_lock_expires_at=None, updated_at=now,
        ).where((ProviderAccountRow.id == latest.id) & (ProviderAccountRow.refresh_lock_token == lease)).aio_execute()
        if not written:
            log.warning("%s account %s: refresh lease lost; new tokens were not saved", latest.provider, latest.label)
        latest.access_token, latest.refresh_token, latest.expires_at = tokens.access_token, tokens.refresh_token, tokens.expires_at
        latest.metadata, latest.status, latest.last_refresh_at = metadata, "ok", now
        latest.last_refresh_status, latest.last_error = "success", None
        self._merge(latest)
        self.refresh_outcomes["success"] += 1
        await bump_version("accounts")
        return latest

    async def _refresh_failed(self, account: AccountState, lease: str, message: str, reauth: bool) -> None:
        now = self.now()
        values = dict(last_refresh_at=now, last_refresh_status="failed", last_error=message[:500],
                      refresh_lock_token=None, refresh_lock_expires_at=None, updated_at=now)
        if reauth:
            values["status"] = "needs_reauth"
        await ProviderAccountRow.update(**values).where(
            (ProviderAccountRow.id == account.id) & (ProviderAccountRow.refresh_lock_token == lease)).aio_execute()
        account.last_refresh_at, account.last_refresh_status, account.last_error = now, "failed", message[:500]
        if reauth:
            account.status = "needs_reauth"
            log.warning("%s account %s needs a new login: %s", account.provider, account.label, message)
        self._merge(account)
        await bump_version("accounts")

    async def _release(self, account_id: str, lease: str) -> None:
        await ProviderAccountRow.update(refresh_lock_token=None, refresh_lock_expires_at=None).where(
            (ProviderAccountRow.id == account_id) & (ProviderAccountRow.refresh_lock_token == lease)).aio_execute()

    def _merge(self, account: AccountState) -> None:
        """Replace one account in the cache, keeping the per-provider order."""
        accounts = dict(self.accounts)
        accounts[account.id] = account
        self._install(accounts)

    async def refresh_due(self) -> None:
        """Background: refresh every enabled account expiring within five minutes."""
        for account in list(self.accounts.values()):
            if not account.enabled or account.status == "needs_reauth" or account.provider not in self.providers:
                continue
            if account.expires_at - self.now() > BACKGROUND_SKEW_MS:
                continue
            try:
                await self.fresh(account, skew=BACKGROUND_SKEW_MS)
            except (ProviderError, NoAccount) as exc:
                log.warning("background refresh of %s account %s failed: %s", account.provider, account.label, exc)
            except Exception:
                log.exception("background refresh of %s account %s crashed", account.provider, account.label)

    # ── writes ──
    async def upsert(self, provider: str, tokens: Tokens, *, label: str | None = None, priority: int | None = None) -> AccountState:
        """Insert an account or update the one with the same provider-side identity (never a
        duplicate). An edited label survives a re-login; new tokens clear needs_reauth."""
        now = self.now()
        existing = None
        if tokens.account_id:
            existing = await ProviderAccountRow.select().where(
                (ProviderAccountRow.provider == provider) & (ProviderAccountRow.account_id == tokens.account_id)
            ).aio_first()
        sealed = dict(access_token_enc=self.vault.seal(tokens.access_token),
                      refresh_token_enc=self.vault.seal(tokens.refresh_token), expires_at=tokens.expires_at)
        if existing is not None:
            values = dict(sealed, status="ok", cooldown_until=None, cooldown_kind=None, last_error=None,
                          metadata_json=dumps_json({**loads_json(existing.metadata_json, {}), **tokens.metadata}),
                          refresh_lock_token=None, refresh_lock_expires_at=None, updated_at=now)
            if label:
                values["label"] = label
            if priority is not None:
                values["priority"] = priority
            await ProviderAccountRow.update(**values).where(ProviderAccountRow.id == existing.id).aio_execute()
            account_id = existing.id
        else:
            siblings = await ProviderAccountRow.select().where(ProviderAccountRow.provider == provider).aio_execute()
            account_id = new_id()
            await ProviderAccountRow.insert(
                id=account_id, provider=provider, label=label or tokens.label or f"{provider}-account",
                account_id=tokens.account_id, is_primary=0 if any(r.is_primary for r in siblings) else 1,
                enabled=1 if all(r.enabled for r in siblings) else 0, priority=priority or 0, status="ok",
                metadata_json=dumps_json(tokens.metadata or {}), created_at=now, updated_at=now, **sealed,
            ).aio_execute()
        await self.changed()
        return self.accounts[account_id]

    def get(self, account_id: str) -> AccountState:
        account = self.accounts.get(account_id)
        if account is None:
            raise not_found("account not found")
        return account

    async def set_primary(self, account_id: str) -> None:
        account = self.get(account_id)
        async with self.db.aio_atomic():
            # Two statements: the partial unique index allows one primary per provider.
            await ProviderAccountRow.update(is_primary=0).where(
                (ProviderAccountRow.provider == account.provider) & (ProviderAccountRow.is_primary == 1)).aio_execute()
            await ProviderAccountRow.update(is_primary=1, updated_at=self.now()).where(
                ProviderAccountRow.id == account_id).aio_execute()
        await self.changed()

    async def update(self, account_id: str, **values: Any) -> None:
        self.get(account_id)
        values["updated_at"] = self.now()
        await ProviderAccountRow.update(**values).where(ProviderAccountRow.id == account_id).aio_execute()
        await self.changed()

    async def delete(self, account_id: str) -> None:
        account = self.get(account_id)
        await ProviderAccountRow.delete().where(ProviderAccountRow.id == account_id).aio_execute()
        if account.is_primary:
            rest = sorted((a for a in self.by_provider.get(account.provider, []) if a.id != account_id),
                          key=lambda a: (not a.enabled, a.priority, -a.created_at))
            if rest:
                await ProviderAccountRow.update(is_primary=1).where(ProviderAccountRow.id == rest[0].id).aio_execute()
        await self.changed()

    async def set_provider_enabled(self, provider: str, enabled: bool) -> None:
        await ProviderAccountRow.update(enabled=int(enabled), updated_at=self.now()).where(
            ProviderAccountRow.provider == provider).aio_execute()
        await self.changed()

    def provider_status(self) -> list[dict]:
        result = []
        for name in self.providers:
            items = self.by_provider.get(name, [])
            enabled = sum(1 for a in items if a.enabled)
            result.append({"provider": name, "enabled": enabled > 0, "accountCount": len(items),
                           "enabledAccountCount": enabled})
        return result



# ══ Usage ═══════════════════════════════════════════════════════════════════
# The proxy path only adds numbers in memory; one task writes minute buckets as additive
# upserts every flush_interval and drains on shutdown.


class UsageQueue:
    """Adds up outcomes per (minute, key, account, provider, endpoint, model) in memory."""

    def __init__(self, flush_interval: float, now: Callable[[], int] = now_ms, max_buckets: int = 200_000):
        self.interval = flush_interval
        self.now = now
        self.max_buckets = max_buckets
        self.pending: dict[tuple, list[int]] = {}
        self.dropped = 0
        self.recorded = 0
        self.last_flush_ms = now()
        self.flush_failures = 0
        self._lock = asyncio.Lock()

    def record(self, outcome: Outcome) -> None:
        """Request path: no await, no I/O, never raises."""
        at = self.now()
        bucket = (at - at % 60_000, outcome.key_id, outcome.account_id, outcome.provider, outcome.endpoint,
                  outcome.model or "")
        row = self.pending.get(bucket)
        if row is None:
            if len(self.pending) >= self.max_buckets:
                self.dropped += 1
                return
            row = self.pending[bucket] = [0] * (len(USAGE_COUNTERS) + 2)
        for name, value in classify(outcome).items():
            row[C[name]] += value
        row[C["total_latency_ms"]] += outcome.ttfb_ms
        row[C["total_duration_ms"]] += outcome.duration_ms
        row[MAX_LATENCY] = max(row[MAX_LATENCY], outcome.ttfb_ms)
        row[LAST_AT] = at
        usage = outcome.usage
        if usage is not None:
            row[C["input_tokens"]] += usage.input_tokens
            row[C["output_tokens"]] += usage.output_tokens
            row[C["cache_read_tokens"]] += usage.cache_read_tokens
            row[C["cache_write_tokens"]] += usage.cache_write_tokens
        self.recorded += 1

    @property
    def depth(self) -> int:
        return len(self.pending)

    async def flush(self) -> int:
        """Write everything pending; on failure the rows are kept for the next try."""
        async with self._lock:
            batch, self.pending = self.pending, {}
            if not batch:
                self.last_flush_ms = self.now()
                return 0
            try:
                await write_buckets(batch)
            except BaseException as exc:
                self._merge_back(batch)
                self.flush_failures += 1
                if isinstance(exc, Exception):
                    log.warning("usage flush failed (%d buckets kept for the next try): %s", len(batch), exc)
                    return 0
                raise
            self.last_flush_ms = self.now()
            return len(batch)

    def _merge_back(self, batch: dict[tuple, list[int]]) -> None:
        for bucket, row in batch.items():
            mine = self.pending.get(bucket)
            if mine is None:
                self.pending[bucket] = row
                continue
            for i in range(len(USAGE_COUNTERS)):
                mine[i] += row[i]
            mine[MAX_LATENCY] = max(mine[MAX_LATENCY], row[MAX_LATENCY])
            mine[LAST_AT] = max(mine[LAST_AT], row[LAST_AT])

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every interval until `stop` is set (the final drain is the caller's)."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
            await self.flush()


async def write_buckets(batch: dict[tuple, list[int]]) -> None:
    U = UsageBucketRow
    db = U._meta.database
    greatest = peewee.fn.MAX if is_sqlite(db) else peewee.fn.GREATEST
    rows = []
    for (bucket_start, key_id, account_id, provider, endpoint, model), values in batch.items():
        row = dict(bucket_start=bucket_start, api_key_id=key_id, provider_account_id=account_id, provider=provider,
                   endpoint=endpoint, model=model, max_latency_ms=values[MAX_LATENCY], last_request_at=values[LAST_AT])
        row.update(zip(USAGE_COUNTERS, values, strict=False))
        rows.append(row)
    update = {getattr(U, n): getattr(U, n) + peewee.EXCLUDED[n] for n in USAGE_COUNTERS}
    update[U.max_latency_ms] = greatest(U.max_latency_ms, peewee.EXCLUDED.max_latency_ms)
    update[U.last_request_at] = greatest(U.last_request_at, peewee.EXCLUDED.last_request_at)
    target = [U.bucket_start, U.api_key_id, U.provider_account_id, U.provider, U.endpoint, U.model]
    async with db.aio_atomic():
        for i in range(0, len(rows), 400):
            await U.insert_many(rows[i:i + 400]).on_conflict(conflict_target=target, update=update).aio_execute()


async def purge_expired(retention_days: int, now: int) -> None:
    """Drop usage buckets past retention and logins that expired a day ago."""
    if retention_days > 0:
        await UsageBucketRow.delete().where(UsageBucketRow.bucket_start < now - retention_days * 86_400_000).aio_execute()
    await OAuthStateRow.delete().where(OAuthStateRow.expires_at < now - 86_400_000).aio_execute()


async def usage_report(where: peewee.Expression, window_ms: int, now: int, group: str | None = None) -> dict:
    """Totals, endpoints, models and the last 60 minute buckets for rows matching `where`."""
    U = UsageBucketRow
    since = now - window_ms
    cond = where & (U.bucket_start >= since - since % 60_000)
    sums = [peewee.fn.SUM(getattr(U, n)).alias(n) for n in USAGE_COUNTERS]
    extra = [peewee.fn.MAX(U.max_latency_ms).alias("max_latency_ms"), peewee.fn.MAX(U.last_request_at).alias("last_request_at")]

    async def grouped(*columns):
        query = U.select(*columns, *sums, *extra).where(cond)
        if columns:
            query = query.group_by(*columns)
        return list(await query.dicts().aio_execute())

    totals = (await grouped())[0]
    endpoints = [{"provider": r["provider"], "endpoint": r["endpoint"], **averaged(r)}
                 for r in await grouped(U.provider, U.endpoint)]
    models = [{"provider": r["provider"], "endpoint": r["endpoint"], "model": r["model"], **averaged(r)}
              for r in await grouped(U.provider, U.endpoint, U.model)]
    endpoints.sort(key=lambda r: -r["requestCount"])
    models.sort(key=lambda r: (-r["requestCount"], -r["outputTokens"]))
    buckets = [{"bucketStart": r["bucket_start"], **averaged(r)} for r in await grouped(U.bucket_start)]
    buckets = sorted(buckets, key=lambda r: r["bucketStart"])[-60:]
    report = {"windowMs": window_ms, "since": since, "now": now, "totals": averaged(totals),
              "endpoints": endpoints, "models": models, "buckets": buckets}
    if group:
        column = getattr(U, group)
        rows = await grouped(column)
        report["by" + ("Key" if group == "api_key_id" else "Account")] = sorted(
            ({camel(group): r[group], **averaged(r)} for r in rows), key=lambda r: -r["requestCount"])
    return report


# ══ Proxy ═══════════════════════════════════════════════════════════════════
# Key auth and scopes, account choice with stickiness and failover before the first byte,
# streaming pass-through with keepalives at event boundaries, timeouts, usage recording.

REQUEST_HEADER_DROP = frozenset({
    "host", "content-length", "connection", "keep-alive", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "authorization", "x-api-key", "cookie", "accept-encoding",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded", "expect",
})  # fmt: skip
RESPONSE_HEADER_DROP = frozenset({
    "content-length", "content-encoding", "connection", "keep-alive", "transfer-encoding", "upgrade",
    "proxy-authenticate", "trailer", "te", "set-cookie", "alt-svc", "strict-transport-security",
})  # fmt: skip
KEEPALIVE = b": kleis-keepalive\n\n"
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
MAX_ERROR_BODY = 1024 * 1024


class UpstreamFailure(Exception):
    """The upstream could not be reached or did not answer in time (no response to relay)."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


def client_headers(request: Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower() not in REQUEST_HEADER_DROP}


def relay_headers(upstream: Mapping[str, str], sse: bool) -> dict[str, str]:
    headers = {k: v for k, v in upstream.items() if k.lower() not in RESPONSE_HEADER_DROP}
    if sse:
        headers = {k: v for k, v in headers.items() if k.lower() not in ("cache-control", "content-type")}
        headers.update({"cache-control": "no-cache, no-transform", "x-accel-buffering": "no",
                        "content-type": "text/event-stream; charset=utf-8"})
    return headers


def parse_proxy_body(raw: bytes) -> dict:
    if not raw:
        raise bad_request("the request body is empty; send a JSON object with a model field")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON ({exc.__class__.__name__}: {str(exc)[:120]})",
                          "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("the request must include a non-empty model field", "missing_model")
    return body


class Proxy:
    """The request path shared by every provider route."""

    def __init__(self, services: Services):
        self.s = services
        self.settings = services.settings.server
        self.open_streams = 0

    def authenticate(self, request: Request) -> KeyRecord:
        s = self.s
        now = s.now()
        address = client_address(request, self.settings.trust_forwarded)
        wait = s.key_lockout.retry_after(address, now)
        if wait:
            raise KleisError(429, "too_many_requests", f"too many invalid API key attempts; retry in {wait} s",
                             {"Retry-After": str(wait)})
        key = presented_key(request.headers)
        if key is None:
            raise KleisError(401, "missing_api_key",
                             "missing API key: send `Authorization: Bearer kleis_…` or `x-api-key: kleis_…`")
        record = s.keys.authenticate(key, now)
        if record is None:
            s.key_lockout.fail(address, now)
            raise KleisError(401, "invalid_api_key", "invalid, expired or revoked API key")
        s.key_lockout.succeed(address)
        return record

    async def handle(self, request: Request, provider: Provider, endpoint: str):
        s = self.s
        loop = asyncio.get_running_loop()
        started = loop.time()
        key = self.authenticate(request)
        if key.provider_scopes is not None and provider.name not in key.provider_scopes:
            raise KleisError(403, "provider_not_allowed", f"this API key is not allowed to use provider {provider.name}")
        body = parse_proxy_body(request.body)
        raw_model = body["model"].strip()
        prefixes = tuple(provider.module.PREFIXES)
        if not discovery.model_allowed(raw_model, prefixes, key.model_scopes):
            raise KleisError(403, "model_not_allowed", f"this API key is not allowed to use model {raw_model}")
        model = discovery.strip_prefix(raw_model, prefixes)
        body["model"] = model
        preq = ProxyRequest(endpoint=endpoint, headers=client_headers(request), query=request.query_string,
                            body=body, api_key_id=key.id)
        outcome = Outcome(key_id=key.id, provider=provider.name, endpoint=endpoint, model=model)
        try:
            return await self._forward(request, provider, preq, key, outcome, started)
        except KleisError as exc:
            outcome.status, outcome.source = exc.status, "proxy"
            raise
        except asyncio.CancelledError:
            outcome.cancelled = True
            raise
        finally:
            outcome.duration_ms = int((loop.time() - started) * 1000)
            if not outcome.ttfb_ms:
                outcome.ttfb_ms = outcome.duration_ms
            s.usage.record(outcome)
            s.metrics.observe(outcome)

    async def _forward(self, request: Request, provider: Provider, preq: ProxyRequest, key: KeyRecord,
                       outcome: Outcome, started: float):
        pool = self.s.pool
        session = provider.module.session_key(preq)
        accounts = pool.choose(provider.name, key, session)
        failure: UpstreamFailure | ProviderError | None = None
        relay: tuple[int, Mapping[str, str], bytes] | None = None
        for account in accounts:
            outcome.account_id = account.id
            try:
                account = await pool.fresh(account)
                resp = await self._send(provider, account, preq)
                if resp.status == 401:
                    await self._discard(resp)
                    account = await pool.fresh(account, force=True, seen_token=account.access_token)
                    resp = await self._send(provider, account, preq)
            except ReauthRequired as exc:
                failure = exc  # marked needs_reauth by the pool; try the next account
                continue
            except (ProviderError, UpstreamFailure) as exc:
                failure = exc
                pool.cool_down(account, Cooldown(ERROR_COOLDOWN), str(exc), kind="error")
                continue
            if resp.status in FAILOVER_STATUSES or resp.status == 401:
                body = await self._read_error(resp)
                relay = (resp.status, resp.headers, body)
                pool.cool_down(account, self._cooldown(provider, resp.status, resp.headers, body),
                               f"upstream answered HTTP {resp.status}", kind="transient" if resp.status == 429 else "error")
                continue
            pool.stick(provider.name, key, session, account)
            return await self._stream(request, provider, preq, resp, account, outcome, started)
        if relay is not None:
            status, headers, body = relay
            outcome.status, outcome.source = status, "upstream"
            out_headers = relay_headers(headers, sse=False)
            out_headers["x-kleis-provider"] = provider.name
            return sanic_response.raw(body, status=status, headers=out_headers)
        if isinstance(failure, ReauthRequired):
            raise KleisError(403, "account_needs_reauth", f"{provider.name}: {failure}; log in again on the admin "
                             f"page or with `python kleis.py accounts login {provider.name}`")
        if isinstance(failure, UpstreamFailure) and failure.timeout:
            raise KleisError(504, "upstream_timeout", f"{provider.name}: {failure}")
        raise KleisError(502, "upstream_unavailable", f"{provider.name}: {failure or 'no account could serve the request'}")

    def _cooldown(self, provider: Provider, status: int, headers: Mapping[str, str], body: bytes) -> Cooldown:
        hint = None
        if provider.has("retry_after"):
            try:
                hint = provider.module.retry_after(status, headers, body)
            except Exception:
                log.exception("%s retry_after failed", provider.name)
        if hint is not None:
            return hint
        seconds = header_cooldown({k.lower(): v for k, v in headers.items()}, self.s.now())
        if seconds is None:
            seconds = COOLDOWN_DEFAULT if status == 429 else ERROR_COOLDOWN
        return Cooldown(seconds, window_exhausted=False)

    async def _send(self, provider: Provider, account: AccountState, preq: ProxyRequest) -> aiohttp.ClientResponse:
        """Send the prepared request; returns once the upstream's status line and headers came."""
        upstream = provider.module.prepare(provider.ctx, account.adapter_view(), preq)
        timeout = aiohttp.ClientTimeout(total=None, connect=self.settings.connect_timeout,
                                        sock_connect=self.settings.connect_timeout)
        try:
            async with asyncio.timeout(self.settings.first_byte_timeout):
                return await self.s.http.request("POST", upstream.url, headers=upstream.headers,
                                                 data=upstream.body, timeout=timeout, allow_redirects=False)
        except TimeoutError:
            raise UpstreamFailure(f"no answer from upstream within {self.settings.first_byte_timeout:g} s",
                                  timeout=True) from None
        except aiohttp.ClientError as exc:
            raise UpstreamFailure(f"cannot reach upstream ({type(exc).__name__})") from None

    async def _discard(self, resp: aiohttp.ClientResponse) -> None:
        with contextlib.suppress(Exception):
            await self._read_error(resp)

    async def _read_error(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            async with asyncio.timeout(self.settings.idle_timeout):
                return await resp.content.read(MAX_ERROR_BODY)
        except (aiohttp.ClientError, TimeoutError):
            return b""
        finally:
            resp.release()

    async def _stream(self, request: Request, provider: Provider, preq: ProxyRequest, resp: aiohttp.ClientResponse,
                      account: AccountState, outcome: Outcome, started: float):
        loop = asyncio.get_running_loop()
        settings = self.settings
        outcome.status, outcome.source = resp.status, "upstream"
        try:
            transformer = provider.module.transformer(provider.ctx, preq, resp.status, resp.headers)
        except Exception:
            resp.close()
            log.exception("%s transformer failed", provider.name)
            raise KleisError(502, "transform_failed", f"{provider.name}: the response could not be processed") from None
        headers = relay_headers(resp.headers, transformer.is_sse)
        headers.update({"x-kleis-provider": provider.name, "x-kleis-account": account.id})
        content_type = getattr(transformer, "content_type", None)  # a transformer that reshapes the body
        if content_type:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            headers["content-type"] = content_type
        self.open_streams += 1
        out = None
        try:
            out = await request.respond(status=resp.status, headers=headers)
            outcome.ttfb_ms = int((loop.time() - started) * 1000)
            deadline = started + settings.response_timeout
            keepalive = settings.keepalive_interval if transformer.is_sse and settings.keepalive_interval > 0 else None
            content = resp.content
            silent_since = loop.time()
            problem = None
            while True:
                now = loop.time()
                if now >= deadline:
                    problem = f"the response took longer than {settings.response_timeout:g} s"
                    break
                try:
                    # Bytes already buffered are taken without arming a timer (the common case
                    # under load); only a real wait gets the idle/keepalive/total deadline.
                    chunk = content.read_nowait()
                    if not chunk and not content.at_eof():
                        wait = min(settings.idle_timeout - (now - silent_since), deadline - now)
                        if keepalive is not None:
                            wait = min(wait, keepalive)
                        async with asyncio.timeout(max(wait, 0.001)):
                            chunk = await content.readany()
                except TimeoutError:
                    now = loop.time()
                    if now >= deadline:
                        problem = f"the response took longer than {settings.response_timeout:g} s"
                        break
                    if now - silent_since >= settings.idle_timeout:
                        problem = f"upstream sent nothing for {settings.idle_timeout:g} s"
                        break
                    if transformer.at_boundary:
                        await out.send(KEEPALIVE)
                    continue
                except (aiohttp.ClientError, ConnectionError) as exc:
                    problem = f"upstream connection broke off ({type(exc).__name__})"
                    break
                if not chunk:
                    break
                silent_since = loop.time()
                data = transformer.feed(chunk)
                if data:
                    await out.send(data)
            tail = transformer.close()
            if tail:
                await out.send(tail)
            outcome.usage = transformer.usage
            if problem is None and not transformer.terminal and resp.status < 400:
                problem = "upstream stream ended without its final event"
            if problem is not None and resp.status < 400:
                outcome.incomplete = True
                log.warning("%s stream incomplete (account %s, model %s): %s", provider.name, account.label,
                            outcome.model, problem)
                if transformer.is_sse:
                    await out.send(transformer.error_event(f"Kleis: {problem}"))
                else:  # a JSON body has no error event: break the connection so the cut shows
                    request.transport.abort()
                    return None
            await out.eof()
        except asyncio.CancelledError:
            outcome.cancelled = True
            outcome.usage = transformer.usage
            raise
        finally:
            self.open_streams -= 1
            resp.close()  # closes the upstream connection at once if the body was not finished
        return None  # already sent via request.respond(); returning it makes Sanic log an error


# ══ Discovery ═══════════════════════════════════════════════════════════════
# /api.json for OpenCode and the SDK model lists; composition lives in discovery.py.


def external_base(request: Request, settings: ServerSettings) -> str:
    """The base URL clients use: [server] public_url, else the request's own origin."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme, host = request.scheme, request.host
    if settings.trust_forwarded:
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        scheme = proto if proto in ("http", "https") else scheme
        host = request.headers.get("x-forwarded-host", "").split(",")[0].strip() or host
    return f"{scheme}://{host}"


def key_scopes(key: KeyRecord | None, pool: AccountPool) -> discovery.Scopes | None:
    if key is None:
        return None
    account_providers = None
    if key.account_scopes is not None:
        account_providers = frozenset(pool.accounts[a].provider for a in key.account_scopes if a in pool.accounts)
    return discovery.Scopes(
        providers=frozenset(key.provider_scopes) if key.provider_scopes is not None else None,
        models=key.model_scopes,
        account_providers=account_providers,
    )


def discovery_routes(services: Services) -> list[discovery.Route]:
    configured = services.pool.configured()
    return [discovery.Route.from_module(name, p.module, p.options)
            for name, p in services.providers.items() if name in configured]


def registry(services: Services, request: Request, key: KeyRecord | None) -> dict:
    base = external_base(request, services.settings.server)
    return services.catalogue.registry(discovery_routes(services), base, key_scopes(key, services.pool))


def registry_response(services: Services, request: Request, key: KeyRecord | None):
    """api.json from the memoised JSON (a rebuild + dump costs ~2 ms of CPU on a public route)."""
    base = external_base(request, services.settings.server)
    body = services.catalogue.registry_json(discovery_routes(services), base, key_scopes(key, services.pool))
    return sanic_response.raw(body, content_type="application/json", headers={"cache-control": "no-store"})


# ══ Admin API ═══════════════════════════════════════════════════════════════
# Bearer admin token (constant-time, lockout per address). Answers {"error", "message"}.

WINDOW_DEFAULT_MS, WINDOW_MIN_MS, WINDOW_MAX_MS = 86_400_000, 60_000, 90 * 86_400_000


def require_admin(services: Services, request: Request) -> None:
    settings = services.settings
    expected = settings.admin.token
    if not expected:
        raise KleisError(503, "admin_token_not_configured",
                         "no admin token is configured: set [admin] token or KLEIS_ADMIN_TOKEN")
    now = services.now()
    address = client_address(request, settings.server.trust_forwarded)
    wait = services.admin_lockout.retry_after(address, now)
    if wait:
        raise KleisError(429, "too_many_requests", f"too many invalid admin token attempts; retry in {wait} s",
                         {"Retry-After": str(wait)})
    match = BEARER.match(request.headers.get("authorization", ""))
    given = match.group(1) if match else ""
    if not hmac.compare_digest(given.encode(), expected.encode()):
        services.admin_lockout.fail(address, now)
        raise KleisError(401, "unauthorized", "missing or invalid admin bearer token")
    services.admin_lockout.succeed(address)


def json_object(request: Request, allowed: Iterable[str], required: Iterable[str] = ()) -> dict:
    """The request's JSON object with only `allowed` fields; empty body = {}."""
    raw = request.body
    if not raw or not raw.strip():
        body = {}
    else:
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise bad_request("the request body is not valid JSON", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise bad_request(f"unknown field(s): {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    missing = [f for f in required if body.get(f) in (None, "")]
    if missing:
        raise bad_request(f"missing field(s): {', '.join(missing)}")
    return body


def opt_str(body: dict, name: str, max_len: int = 200) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string")
    value = value.strip()
    if len(value) > max_len:
        raise bad_request(f"{name} must be at most {max_len} characters")
    return value or None


def opt_int(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if type(value) is not int:
        raise bad_request(f"{name} must be an integer")
    return value


def opt_bool(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and type(value) is not bool:
        raise bad_request(f"{name} must be true or false")
    return value


def str_list(body: dict, name: str, max_items: int = 200) -> list[str] | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise bad_request(f"{name} must be a list of non-empty strings")
    if len(value) > max_items:
        raise bad_request(f"{name} may hold at most {max_items} entries")
    return list(dict.fromkeys(v.strip() for v in value)) or None


def future_ms(value: int | None, name: str, now: int) -> int | None:
    """Seconds or milliseconds since the epoch, which must lie in the future."""
    if value is None:
        return None
    ms = value * 1000 if value < 10_000_000_000 else value
    if ms <= now:
        raise bad_request(f"{name} must be in the future")
    return ms


def window_ms(request: Request) -> int:
    raw = request.args.get("windowMs")
    if raw is None:
        return WINDOW_DEFAULT_MS
    if not raw.isdigit() or not (WINDOW_MIN_MS <= int(raw) <= WINDOW_MAX_MS):
        raise bad_request(f"windowMs must be an integer from {WINDOW_MIN_MS} to {WINDOW_MAX_MS}")
    return int(raw)


def key_view(record: KeyRecord, base: str, now: int) -> dict:
    scoped = f"{base}/api/{record.discovery_token}"
    return {
        "id": record.id, "keyPrefix": record.key_prefix, "label": record.label, "status": record.status(now),
        "providerScopes": list(record.provider_scopes) if record.provider_scopes else None,
        "modelScopes": list(record.model_scopes) if record.model_scopes else None,
        "accountScopes": list(record.account_scopes) if record.account_scopes else None,
        "expiresAt": record.expires_at, "revokedAt": record.revoked_at, "createdAt": record.created_at,
        "modelsDiscoveryToken": record.discovery_token, "scopedModelsUrl": scoped,
        "opencode": {"OPENCODE_MODELS_URL": scoped, "KLEIS_API_KEY": f"{record.key_prefix}…",
                     "snippet": f'export OPENCODE_MODELS_URL="{scoped}"\nexport KLEIS_API_KEY="<the key>"\n'
                                f"opencode models --refresh"},
    }  # fmt: skip


def key_scope_values(services: Services, body: dict, now: int, partial: bool) -> dict:
    """Validated column values for key create/patch (absent fields untouched on patch)."""
    values: dict[str, Any] = {}
    if "label" in body or not partial:
        values["label"] = opt_str(body, "label", 120)
    provider_scopes = str_list(body, "providerScopes") if "providerScopes" in body else None
    if provider_scopes:
        unknown = [p for p in provider_scopes if p not in services.providers]
        if unknown:
            raise bad_request(f"providerScopes: unknown provider(s) {', '.join(unknown)}; "
                              f"configured: {', '.join(services.providers)}")
    if "providerScopes" in body or not partial:
        values["provider_scope_json"] = dumps_json(provider_scopes)
    if "modelScopes" in body or not partial:
        values["model_scope_json"] = dumps_json(str_list(body, "modelScopes"))
    if "accountScopes" in body or not partial:
        account_scopes = str_list(body, "accountScopes")
        if account_scopes:
            pool = services.pool
            if any(a not in pool.accounts for a in account_scopes):
                raise bad_request("accountScopes must reference existing provider accounts")
            providers_ = [pool.accounts[a].provider for a in account_scopes]
            if len(set(providers_)) != len(providers_):
                raise bad_request("accountScopes can include at most one account per provider")
            allowed = provider_scopes if "providerScopes" in body else None
            if allowed and any(p not in allowed for p in providers_):
                raise bad_request("accountScopes must belong to providers allowed by providerScopes")
        values["account_scope_json"] = dumps_json(account_scopes)
    if "expiresAt" in body or not partial:
        values["expires_at"] = future_ms(opt_int(body, "expiresAt"), "expiresAt", now)
    return values


async def create_key(services: Services, values: dict) -> tuple[str, KeyRecord]:
    """Store a new key; returns the full key (shown once) and its record."""
    key, now = new_api_key(), services.now()
    key_id = new_id()
    await ApiKeyRow.insert(id=key_id, key_hash=hash_key(key), key_prefix=key[:12],
                           models_discovery_token="kmd_" + secrets.token_hex(16), created_at=now,
                           **values).aio_execute()
    await keys_changed(services)
    return key, services.keys.by_id[key_id]


async def keys_changed(services: Services) -> None:
    await bump_version("keys")
    await services.keys.load()


def get_key(services: Services, key_id: str) -> KeyRecord:
    record = services.keys.by_id.get(key_id)
    if record is None:
        raise not_found("API key was not found")
    return record


def login_view(state: str, provider: str, login: providers.Login, expires_at: int) -> dict:
    return {"state": state, "provider": provider, "method": login.method, "authorizationUrl": login.url,
            "instructions": login.instructions, "userCode": login.user_code, "interval": login.interval,
            "expiresAt": expires_at}


def provider_or_404(services: Services, name: str) -> Provider:
    provider = services.providers.get(name)
    if provider is None:
        raise not_found(f"unknown provider {name!r}; configured: {', '.join(services.providers)}")
    return provider


async def start_login(services: Services, provider: Provider, options: dict) -> dict:
    state = secrets.token_urlsafe(32)
    login = await provider.module.start_login(provider.ctx, state, options)
    now = services.now()
    expires_at = now + int(login.expires_in * 1000)
    await OAuthStateRow.insert(state=state, provider=provider.name, method=login.method,
                               data_enc=services.vault.seal(json.dumps(login.data)),
                               interval_ms=int(login.interval * 1000), expires_at=expires_at,
                               created_at=now).aio_execute()
    if login.method == "device":
        services.spawn(poll_device_login(services, provider, state), f"login-{state[:8]}")
    return login_view(state, provider.name, login, expires_at)


async def pending_login(services: Services, provider: Provider, state: str) -> OAuthStateRow:
    row = await OAuthStateRow.select().where(
        (OAuthStateRow.state == state) & (OAuthStateRow.provider == provider.name)).aio_first()
    if row is None or (row.status == "pending" and row.expires_at <= services.now()):
        raise bad_request("unknown or expired login; start the login again", "login_expired")
    return row


async def finish_code_login(services: Services, provider: Provider, state: str, code: str) -> AccountState:
    row = await pending_login(services, provider, state)
    if row.method != "code":
        raise bad_request("this login is a device flow: Kleis completes it by itself; poll its status")
    if row.status != "pending":
        raise bad_request("this login was already used; start the login again", "login_used")
    # Single use: only the request that deletes the row may exchange the code.
    deleted = await OAuthStateRow.delete().where(OAuthStateRow.state == state).aio_execute()
    if not deleted:
        raise bad_request("this login was already used; start the login again", "login_used")
    data = json.loads(services.vault.open(row.data_enc))
    tokens = await provider.module.finish_login(provider.ctx, state, data, code)
    return await services.pool.upsert(provider.name, tokens)


async def poll_device_login(services: Services, provider: Provider, state: str) -> None:
    """Background task: poll the provider at its interval until approved, denied or expired."""
    row = await OAuthStateRow.select().where(OAuthStateRow.state == state).aio_first()
    data = json.loads(services.vault.open(row.data_enc))
    interval = row.interval_ms / 1000

    async def finish(status: str, message: str | None = None, account_id: str | None = None) -> None:
        await OAuthStateRow.update(status=status, message=message, result_account_id=account_id).where(
            OAuthStateRow.state == state).aio_execute()

    while services.now() < row.expires_at:
        await asyncio.sleep(max(interval, 0.01))
        try:
            tokens = await provider.module.poll_login(provider.ctx, data)
        except LoginPending as pending:
            interval = pending.interval or interval
            data = pending.data or data
            continue
        except ProviderError as exc:
            await finish("failed", str(exc))
            return
        except Exception as exc:
            log.exception("%s device login crashed", provider.name)
            await finish("failed", f"the login failed: {type(exc).__name__}")
            return
        account = await services.pool.upsert(provider.name, tokens)
        await finish("complete", None, account.id)
        return
    await finish("failed", "the login expired before it was approved; start it again")


async def login_status(services: Services, provider: Provider, state: str) -> tuple[int, dict]:
    row = await OAuthStateRow.select().where(
        (OAuthStateRow.state == state) & (OAuthStateRow.provider == provider.name)).aio_first()
    if row is None:
        raise not_found("unknown login state")
    now = services.now()
    status = "failed" if row.status == "pending" and row.expires_at <= now else row.status
    body: dict[str, Any] = {"state": state, "provider": provider.name, "method": row.method, "status": status,
                            "message": row.message if status != "failed" or row.message else "the login expired"}
    if status == "complete" and row.result_account_id in services.pool.accounts:
        body["account"] = services.pool.accounts[row.result_account_id].view(now)
    return (202 if status == "pending" else 200), body


async def import_tokens(services: Services, provider: Provider, body: dict) -> list[AccountState]:
    """Admin import: explicit tokens or an official client's auth file."""
    label = opt_str(body, "label", 160)
    priority = opt_int(body, "priority")
    if body.get("authFile") is not None:
        content = body["authFile"]
        if not isinstance(content, (dict, str)):
            raise bad_request("authFile must be the file's JSON object or its text")
        found = provider.module.import_auth(provider.ctx, content)
        if not found:
            raise bad_request(f"no {provider.name} account found in authFile")
        for tokens in found:  # an unknown owner is matched by the refresh token, so re-imports update
            if tokens.account_id is None:
                tokens.account_id = "rt:" + hashlib.sha256(tokens.refresh_token.encode()).hexdigest()[:24]
        return [await services.pool.upsert(provider.name, t, label=label, priority=priority) for t in found]
    for name in ("accessToken", "refreshToken"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise bad_request(f"{name} is required (or send authFile)")
    expires_at = future_ms(opt_int(body, "expiresAt"), "expiresAt", services.now())
    if expires_at is None:
        raise bad_request("expiresAt is required (epoch seconds or milliseconds, in the future)")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise bad_request("metadata must be an object")
    tokens = Tokens(access_token=body["accessToken"].strip(), refresh_token=body["refreshToken"].strip(),
                    expires_at=expires_at, account_id=opt_str(body, "accountId"), label=label, metadata=metadata)
    return [await services.pool.upsert(provider.name, tokens, label=label, priority=priority)]


def register_admin_routes(app: Sanic, services: Services) -> None:
    """The admin JSON API under /admin (shapes of prior art §1.4, keys without the key)."""

    def route(method: str, path: str):
        def decorator(handler):
            async def wrapped(request: Request, **params):
                require_admin(services, request)
                result = await handler(request, **params)
                status, body = result if isinstance(result, tuple) else (200, result)
                return sanic_response.json(body, status=status, headers={"cache-control": "no-store"})

            app.add_route(wrapped, path, methods=[method], name=f"admin_{handler.__name__}")
            return handler

        return decorator

    now = services.now

    @route("GET", "/admin/accounts")
    async def list_accounts(request):
        t = now()
        views = [a.view(t) for p in services.providers for a in services.pool.by_provider.get(p, [])]
        return {"accounts": views, "providers": services.pool.provider_status()}

    @route("GET", "/admin/accounts/providers")
    async def list_providers(request):
        return {"providers": services.pool.provider_status()}

    @route("PATCH", "/admin/accounts/providers/<name>")
    async def patch_provider(request, name):
        provider = provider_or_404(services, name)
        body = json_object(request, ["enabled"], ["enabled"])
        enabled = opt_bool(body, "enabled")
        await services.pool.set_provider_enabled(provider.name, enabled)
        status = next(s for s in services.pool.provider_status() if s["provider"] == provider.name)
        return {"provider": status, "updated": True}

    @route("POST", "/admin/accounts/<name>/oauth/start")
    async def oauth_start(request, name):
        provider = provider_or_404(services, name)
        body = json_object(request, ["options"])
        options = body.get("options") or {}
        if not isinstance(options, dict):
            raise bad_request("options must be an object")
        return await start_login(services, provider, options)

    @route("POST", "/admin/accounts/<name>/oauth/complete")
    async def oauth_complete(request, name):
        provider = provider_or_404(services, name)
        body = json_object(request, ["state", "code"], ["state"])
        state = opt_str(body, "state", 200)
        row = await pending_login(services, provider, state)
        if row.method == "device":
            return await login_status(services, provider, state)
        code = opt_str(body, "code", 4000)
        if not code:
            raise bad_request("code is required: paste the code or the full callback URL")
        account = await finish_code_login(services, provider, state, code)
        return {"account": account.view(now())}

    @route("GET", "/admin/accounts/<name>/oauth/<state>")
    async def oauth_status(request, name, state):
        return await login_status(services, provider_or_404(services, name), state)

    @route("POST", "/admin/accounts/<name>/import")
    async def import_account(request, name):
        provider = provider_or_404(services, name)
        body = json_object(request, ["accessToken", "refreshToken", "expiresAt", "accountId", "label",
                                     "metadata", "authFile", "priority"])
        accounts = await import_tokens(services, provider, body)
        return 201, {"account": accounts[0].view(now()), "accounts": [a.view(now()) for a in accounts],
                     "imported": True}

    @route("PATCH", "/admin/accounts/<account_id>")
    async def patch_account(request, account_id):
        services.pool.get(account_id)
        body = json_object(request, ["label", "priority", "enabled", "metadata"])
        values: dict[str, Any] = {}
        if "label" in body:
            values["label"] = opt_str(body, "label", 160) or ""
        if body.get("priority") is not None:
            values["priority"] = opt_int(body, "priority")
        if body.get("enabled") is not None:
            values["enabled"] = int(opt_bool(body, "enabled"))
        if "metadata" in body:
            if not isinstance(body["metadata"], (dict, type(None))):
                raise bad_request("metadata must be an object or null")
            values["metadata_json"] = dumps_json(body["metadata"] or {})
        await services.pool.update(account_id, **values)
        return {"account": services.pool.get(account_id).view(now()), "updated": True}

    @route("DELETE", "/admin/accounts/<account_id>")
    async def delete_account(request, account_id):
        await services.pool.delete(account_id)
        return {"deleted": True}

    @route("POST", "/admin/accounts/<account_id>/primary")
    async def primary_account(request, account_id):
        await services.pool.set_primary(account_id)
        return {"account": services.pool.get(account_id).view(now())}

    @route("DELETE", "/admin/accounts/<account_id>/cooldown")
    async def clear_cooldown(request, account_id):
        await services.pool.update(account_id, cooldown_until=None, cooldown_kind=None)
        return {"account": services.pool.get(account_id).view(now())}

    @route("POST", "/admin/accounts/<account_id>/refresh")
    async def refresh_account(request, account_id):
        account = services.pool.get(account_id)
        if account.provider not in services.providers:
            raise bad_request(f"provider {account.provider} is not enabled in the config")
        try:
            account = await services.pool.fresh(account, force=True)
        except ReauthRequired as exc:
            raise KleisError(409, "needs_reauth", f"{exc}") from None
        except ProviderError as exc:
            raise KleisError(502, "refresh_failed", str(exc)) from None
        return {"account": account.view(now()), "refreshed": True}

    @route("GET", "/admin/accounts/<account_id>/quota")
    async def account_quota(request, account_id):
        account = services.pool.get(account_id)
        provider = services.providers.get(account.provider)
        if provider is None or not provider.has("quota"):
            return {"quota": None}
        return {"quota": await services.quota(provider, account)}

    @route("GET", "/admin/accounts/<account_id>/usage")
    async def account_usage(request, account_id):
        services.pool.get(account_id)
        report = await usage_report(UsageBucketRow.provider_account_id == account_id, window_ms(request), now(),
                                    group="api_key_id")
        return {"providerAccountId": account_id, **report}

    @route("GET", "/admin/keys")
    async def list_keys(request):
        base, t = external_base(request, services.settings.server), now()
        records = sorted(services.keys.by_id.values(), key=lambda r: -r.created_at)
        return {"keys": [key_view(r, base, t) for r in records]}

    @route("POST", "/admin/keys")
    async def post_key(request):
        body = json_object(request, ["label", "providerScopes", "modelScopes", "accountScopes", "expiresAt"])
        key, record = await create_key(services, key_scope_values(services, body, now(), partial=False))
        view = key_view(record, external_base(request, services.settings.server), now())
        view["key"] = key  # the only time the full key is ever shown
        view["opencode"]["KLEIS_API_KEY"] = key
        view["opencode"]["snippet"] = view["opencode"]["snippet"].replace("<the key>", key)
        return 201, {"key": view}

    @route("PATCH", "/admin/keys/<key_id>")
    async def patch_key(request, key_id):
        get_key(services, key_id)
        body = json_object(request, ["label", "providerScopes", "modelScopes", "accountScopes", "expiresAt"])
        values = key_scope_values(services, body, now(), partial=True)
        if values:
            await ApiKeyRow.update(**values).where(ApiKeyRow.id == key_id).aio_execute()
            await keys_changed(services)
        view = key_view(get_key(services, key_id), external_base(request, services.settings.server), now())
        return {"key": view, "updated": True}

    @route("POST", "/admin/keys/<key_id>/revoke")
    async def revoke_key(request, key_id):
        record = services.keys.by_id.get(key_id)
        if record is None or record.revoked_at is not None:
            raise not_found("API key was not found or already revoked")
        await ApiKeyRow.update(revoked_at=now()).where(ApiKeyRow.id == key_id).aio_execute()
        await keys_changed(services)
        return {"revoked": True}

    @route("DELETE", "/admin/keys/<key_id>")
    async def delete_key(request, key_id):
        record = get_key(services, key_id)
        if record.revoked_at is None:
            raise bad_request("only revoked API keys can be deleted; revoke it first")
        async with services.db.aio_atomic():
            await UsageBucketRow.delete().where(UsageBucketRow.api_key_id == key_id).aio_execute()
            await ApiKeyRow.delete().where(ApiKeyRow.id == key_id).aio_execute()
        await keys_changed(services)
        return {"deleted": True}

    @route("GET", "/admin/keys/<key_id>/usage")
    async def key_usage(request, key_id):
        get_key(services, key_id)
        report = await usage_report(UsageBucketRow.api_key_id == key_id, window_ms(request), now(),
                                    group="provider_account_id")
        return {"apiKeyId": key_id, **report}

    @route("GET", "/admin/usage/dashboard")
    async def dashboard(request):
        window = window_ms(request)
        report = await usage_report(UsageBucketRow.bucket_start >= 0, window, now(), group="api_key_id")
        previous = await usage_report(UsageBucketRow.bucket_start < now() - window, window, now() - window)
        report["previousTotals"] = previous["totals"]
        report["queue"] = {"depth": services.usage.depth, "dropped": services.usage.dropped}
        return report


# ══ App ═════════════════════════════════════════════════════════════════════
# Services is the plain record of collaborators; create_app wires routes and listeners.


@dataclass
class Services:
    settings: Settings
    db: peewee_async.AioDatabase
    vault: Vault
    providers: dict[str, Provider]
    keys: KeyCache
    pool: AccountPool
    usage: UsageQueue
    catalogue: discovery.Catalogue
    admin_lockout: Lockout
    key_lockout: Lockout
    now: Callable[[], int] = now_ms
    http: aiohttp.ClientSession | None = None
    stop: asyncio.Event | None = None
    versions: dict[str, int] = field(default_factory=dict)
    tasks: dict[str, asyncio.Task] = field(default_factory=dict)
    quotas: dict[str, tuple[int, dict]] = field(default_factory=dict)
    metrics: Metrics = field(default_factory=Metrics)
    proxy: Proxy | None = None
    opened: bool = False

    @classmethod
    def build(cls, settings: Settings, now: Callable[[], int] = now_ms) -> Services:
        """Everything wired, nothing opened (no I/O)."""
        loaded = load_providers(settings)
        db = open_database(settings)
        vault = Vault(settings.security.secret_key)
        sec = settings.security
        cache_dir = settings.resolve(".") if settings.database.url.startswith("postgres") else (
            settings.resolve(settings.database.url[len("sqlite:///"):]).parent)
        catalogue = discovery.Catalogue(
            snapshot_path=discovery.SNAPSHOT_PATH, cache_path=cache_dir / "models-cache.json",
            source_url=settings.models.source_url, refresh_hours=settings.models.refresh_hours,
            log=logging.getLogger("kleis.models"))
        return cls(
            settings=settings, db=db, vault=vault, providers=loaded, keys=KeyCache(),
            pool=AccountPool(db, vault, loaded, now), usage=UsageQueue(settings.usage.flush_interval, now),
            catalogue=catalogue, admin_lockout=Lockout(sec.admin_max_failures, sec.admin_lockout_seconds),
            key_lockout=Lockout(sec.key_max_failures, sec.key_lockout_seconds), now=now,
        )  # fmt: skip

    async def open(self) -> None:
        """Connect, apply the schema, load the caches, import [[accounts]]. Idempotent."""
        if self.opened:
            return
        self.opened = True
        self.stop = asyncio.Event()
        await self.db.aio_connect()
        await apply_schema(self.db)
        self.http = aiohttp.ClientSession(auto_decompress=True, trust_env=False,
                                          connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                                          headers={"User-Agent": f"kleis/{VERSION}"}, skip_auto_headers=["User-Agent"])
        for provider in self.providers.values():
            provider.ctx = Context(http=self.http, options=provider.options, now=self.now,
                                   log=logging.getLogger(f"kleis.{provider.name}"))
        self.versions = await read_versions()
        await self.keys.load()
        await self.pool.load()
        await import_config_accounts(self)

    def start_background(self) -> None:
        """The app's own loops; each stops when `stop` is set."""
        self.spawn(self.usage.run(self.stop), "usage-flusher")
        self.spawn(self.every(60, self.pool.refresh_due), "token-refresher")
        self.spawn(self.every(1, self.poll_versions), "cache-invalidation")
        self.spawn(self.every(3600, lambda: purge_expired(self.settings.usage.retention_days, self.now())), "purge")
        self.spawn(self.catalogue.run(self.http, self.stop), "models-refresher")

    def spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks[name] = task
        task.add_done_callback(lambda t: self.tasks.pop(name, None) if self.tasks.get(name) is t else None)
        return task

    async def every(self, seconds: float, job: Callable) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), seconds)
            if self.stop.is_set():
                return
            try:
                await job()
            except Exception:
                log.exception("background job %s failed", getattr(job, "__name__", job))

    async def poll_versions(self) -> None:
        """Reload caches another instance (or the CLI) changed."""
        versions = await read_versions()
        if versions.get("keys") != self.versions.get("keys"):
            await self.keys.load()
        if versions.get("accounts") != self.versions.get("accounts"):
            await self.pool.load()
        self.versions = versions

    async def quota(self, provider: Provider, account: AccountState) -> dict:
        cached = self.quotas.get(account.id)
        if cached and self.now() - cached[0] < 60_000:
            return cached[1]
        try:
            fresh = await self.pool.fresh(account)
            data = {"fetchedAt": self.now(), "error": None, "data": await provider.module.quota(provider.ctx, fresh.adapter_view())}
        except Exception as exc:
            data = {"fetchedAt": None, "error": str(exc) if isinstance(exc, ProviderError) else type(exc).__name__, "data": None}
        self.quotas[account.id] = (self.now(), data)
        return data

    async def shutdown(self) -> None:
        """Stop the loops politely (before Sanic cancels tasks), then drain usage."""
        if not self.opened:
            return
        self.stop.set()
        loops = [t for n, t in self.tasks.items() if not n.startswith("login-")]
        if loops:
            await asyncio.wait(loops, timeout=10)
        for task in list(self.tasks.values()):
            task.cancel()
        await self.usage.flush()

    async def close(self) -> None:
        if not self.opened:
            return
        await self.usage.flush()
        await self.pool.drain()
        if self.http is not None:
            await self.http.close()
        await self.db.aio_close()
        self.opened = False


def read_auth_file(path: Path | str) -> dict | str:
    """An auth file's JSON object, or its text (hosts.yml)."""
    text = Path(path).expanduser().read_text()
    try:
        return json.loads(text)
    except ValueError:
        return text


async def import_config_accounts(services: Services) -> None:
    """Apply [[accounts]] idempotently: the same account is updated, never duplicated, and a
    stored token newer than the file's is kept (Kleis may have rotated it since)."""
    for i, entry in enumerate(services.settings.accounts):
        provider = services.providers.get(entry.provider)
        if provider is None:
            log.warning("[accounts.%d]: provider %s is not enabled; skipped", i, entry.provider)
            continue
        try:
            if entry.auth_file:
                path = services.settings.resolve(entry.auth_file)
                found = provider.module.import_auth(provider.ctx, read_auth_file(path))
            else:
                found = [Tokens(access_token=entry.access_token, refresh_token=entry.refresh_token,
                                expires_at=entry.expires_at * 1000 if entry.expires_at < 10_000_000_000 else entry.expires_at,
                                account_id=entry.account_id or f"config:{entry.label or i}", label=entry.label or None)]
        except (OSError, ProviderError, ValueError) as exc:
            log.warning("[accounts.%d]: cannot import %s: %s", i, entry.auth_file or "tokens", exc)
            continue
        for tokens in found:
            if tokens.account_id is None:
                tokens.account_id = "rt:" + hashlib.sha256(tokens.refresh_token.encode()).hexdigest()[:24]
            current = next((a for a in services.pool.by_provider.get(provider.name, [])
                            if a.account_id == tokens.account_id), None)
            if current is not None and current.expires_at >= tokens.expires_at:
                continue
            await services.pool.upsert(provider.name, tokens, label=entry.label or None, priority=entry.priority)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server socket, with TCP_NODELAY (inherited by every accepted connection): Sanic
    writes a response's head and body separately, and Nagle's algorithm would hold the body
    back until the client's delayed ACK, about 40 ms per request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def error_style_for(services: Services, path: str) -> str:
    for provider in services.providers.values():
        if path.startswith(provider.module.BASE_PATH + "/") or path == provider.module.BASE_PATH:
            return provider.error_style
    return "admin"


def create_app(settings: Settings, services: Services | None = None, name: str = "kleis") -> Sanic:
    """The Sanic app. With `services` given the caller owns their lifecycle (tests)."""
    app = Sanic(name, configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.server.max_body_mb * 1024 * 1024
    app.config.RESPONSE_TIMEOUT = settings.server.response_timeout + 60  # our own deadline comes first
    app.config.KEEP_ALIVE_TIMEOUT = 75
    app.config.ACCESS_LOG = False
    app.config.NOISY_EXCEPTIONS = False
    app.config.AUTO_EXTEND = False  # sanic-ext stays off: no OpenAPI docs, no permissive CORS
    owned = services is None
    services = services or Services.build(settings)
    app.ctx.kleis = services
    proxy = services.proxy = app.ctx.proxy = Proxy(services)

    if owned:
        @app.before_server_start
        async def start(app, _loop=None):
            await services.open()
            services.start_background()

        @app.before_server_stop
        async def stop(app, _loop=None):
            await services.shutdown()

        @app.after_server_stop
        async def close(app, _loop=None):
            await services.close()

    @app.exception(Exception)
    async def render_error(request: Request, exc: Exception):
        if isinstance(exc, KleisError):
            error = exc
        elif isinstance(exc, ProviderError):
            error = KleisError(exc.status, "provider_error", str(exc))
        elif isinstance(exc, SanicException):
            status = getattr(exc, "status_code", 500) or 500
            message = {404: f"no route for {request.method} {request.path}", 405: f"{request.method} is not allowed here",
                       413: f"the request body is larger than {settings.server.max_body_mb} MB ([server] max_body_mb)"}
            error = KleisError(status, {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
                status, "error"), message.get(status, str(exc) if status < 500 else "internal error"))
        elif isinstance(exc, ConfigError):
            error = KleisError(500, "config_error", str(exc))
        else:
            log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
            error = KleisError(500, "internal_error", "internal error; see the Kleis log")
        style = error_style_for(services, request.path)
        headers = {**error.headers, "cache-control": "no-store"}
        return sanic_response.json(error_body(style, error), status=error.status, headers=headers)

    @app.get("/")
    async def index(request):
        return sanic_response.json({"service": "kleis", "version": VERSION, "providers": sorted(services.providers),
                                    "configured": sorted(services.pool.configured())})

    @app.get("/healthz")
    async def healthz(request):
        return sanic_response.json({"ok": True})

    @app.get("/metrics")
    async def metrics(request):
        token = settings.server.metrics_token
        match = BEARER.match(request.headers.get("authorization", ""))
        given = match.group(1).encode() if match else b""
        if not (token and hmac.compare_digest(given, token.encode())):
            require_admin(services, request)
        now, usage_queue = services.now(), services.usage
        accounts: dict[tuple[str, str], int] = {}
        for account in services.pool.accounts.values():
            key = (account.provider, account.view_status(now))
            accounts[key] = accounts.get(key, 0) + 1
        text = services.metrics.render(
            open_streams=proxy.open_streams, refresh_outcomes=services.pool.refresh_outcomes,
            queue_depth=usage_queue.depth, dropped=usage_queue.dropped, flush_failures=usage_queue.flush_failures,
            flush_lag_s=max(0, now - usage_queue.last_flush_ms) / 1000, accounts=accounts)
        return sanic_response.text(text, content_type="text/plain; version=0.0.4")

    @app.get("/readyz")
    async def readyz(request):
        try:
            async with asyncio.timeout(5):
                await services.db.aio_execute_sql("SELECT 1")
        except Exception as exc:
            return sanic_response.json({"ok": False, "database": type(exc).__name__}, status=503)
        return sanic_response.json({"ok": True, "database": "ok"})

    @app.get("/api.json")
    async def api_json(request):
        if request.args.get("refresh") in ("1", "true"):
            await services.catalogue.fetch(services.http, force=True)
        return registry_response(services, request, None)

    @app.get("/api/<token>/api.json")
    async def scoped_api_json(request, token: str):
        record = services.keys.by_token.get(token) if re.fullmatch(r"[A-Za-z0-9_]{1,120}", token) else None
        if record is None or not record.active(services.now()):
            raise not_found("scoped models URL was not found")
        if request.args.get("refresh") in ("1", "true"):
            await services.catalogue.fetch(services.http, force=True)
        return registry_response(services, request, record)

    for pname, provider in services.providers.items():
        for path, endpoint in provider.module.ROUTES.items():
            async def handler(request, _provider=provider, _endpoint=endpoint):
                return await proxy.handle(request, _provider, _endpoint)

            app.add_route(handler, path, methods=["POST"], name=f"proxy_{pname}_{endpoint}")

        async def models(request, _provider=provider, _name=pname):
            key = proxy.authenticate(request)
            route = discovery.Route.from_module(_name, _provider.module, _provider.options)
            reg = registry(services, request, key)
            if _provider.error_style == "anthropic":
                return sanic_response.json(discovery.anthropic_model_list(reg, route))
            return sanic_response.json(discovery.openai_model_list(reg, route))

        app.add_route(models, f"{provider.module.BASE_PATH}/models", methods=["GET"], name=f"models_{pname}")

    register_admin_routes(app, services)
    return app


# ══ CLI ═════════════════════════════════════════════════════════════════════
# `python kleis.py [command]`; exit codes: 0 ok, 1 failure, 2 usage or configuration error.


class CliError(Exception):
    """A command failed in a way the user can fix; printed as one line, exit 1."""


def config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("KLEIS_CONFIG") or "config.toml").expanduser()


def ensure_config(path: Path, console) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    token = write_new_config(path)
    console.print(f"[bold]Created {path}[/bold] (mode 0600) with a random secret key and SQLite database.")
    console.print(f"Admin token (shown once, also stored in the file): [bold yellow]{token}[/bold yellow]")


async def with_services(settings: Settings, job: Callable) -> Any:
    services = Services.build(settings)
    await services.open()
    try:
        return await job(services)
    finally:
        await services.pool.drain()
        await services.close()


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def cmd_keys(args, settings: Settings, console) -> int:
    async def job(services: Services):
        now = services.now()
        if args.keys_command == "create":
            body = {"label": args.label, "providerScopes": args.provider or None, "modelScopes": args.model or None,
                    "accountScopes": args.account or None,
                    "expiresAt": now + int(args.expires_days * 86_400_000) if args.expires_days else None}
            try:
                key, record = await create_key(services, key_scope_values(services, body, now, partial=False))
            except KleisError as exc:
                raise CliError(exc.message) from None
            base = settings.server.public_url or f"http://{settings.server.host}:{settings.server.port}"
            view = {**key_view(record, base, now), "key": key}
            if args.json:
                print_json(view)
            else:
                console.print(f"[bold]API key[/bold] (shown once): [bold yellow]{key}[/bold yellow]")
                console.print(f"OpenCode:\n  export OPENCODE_MODELS_URL=\"{view['scopedModelsUrl']}\"\n"
                              f"  export KLEIS_API_KEY=\"{key}\"")
            return 0
        if args.keys_command == "list":
            records = sorted(services.keys.by_id.values(), key=lambda r: -r.created_at)
            if args.json:
                print_json([key_view(r, "", now) for r in records])
                return 0
            from rich.table import Table

            table = Table("id", "prefix", "label", "status", "providers", "models", "expires", "created")
            for r in records:
                table.add_row(r.id, r.key_prefix + "…", r.label or "", r.status(now),
                              ",".join(r.provider_scopes or ["all"]), ",".join(r.model_scopes or ["all"]),
                              fmt_time(r.expires_at), fmt_time(r.created_at))
            console.print(table)
            return 0
        matches = [r for r in services.keys.by_id.values() if r.id == args.id or r.key_prefix == args.id]
        if len(matches) != 1:
            raise CliError(f"no single key matches {args.id!r} (use the id or the 12-character prefix)")
        if matches[0].revoked_at is not None:
            raise CliError("that key is already revoked")
        await ApiKeyRow.update(revoked_at=now).where(ApiKeyRow.id == matches[0].id).aio_execute()
        await keys_changed(services)
        console.print(f"revoked {matches[0].key_prefix}…") if not args.json else print_json({"revoked": True})
        return 0

    return asyncio.run(with_services(settings, job))


def cmd_accounts(args, settings: Settings, console) -> int:
    async def job(services: Services):
        pool, now = services.pool, services.now()
        sub = args.accounts_command
        if sub == "list":
            views = [a.view(now) for items in pool.by_provider.values() for a in items]
            if args.json:
                print_json(views)
                return 0
            from rich.table import Table

            table = Table("id", "provider", "label", "primary", "status", "expires", "last error")
            for v in views:
                table.add_row(v["id"], v["provider"], v["label"], "yes" if v["isPrimary"] else "", v["status"],
                              fmt_time(v["expiresAt"]), (v["lastError"] or "")[:60])
            console.print(table)
            return 0
        if sub in ("login", "import"):
            provider = services.providers.get(args.provider)
            if provider is None:
                raise CliError(f"unknown or disabled provider {args.provider!r}; enabled: {', '.join(services.providers)}")
            if sub == "import":
                try:
                    content = await asyncio.to_thread(read_auth_file, args.file)
                    found = provider.module.import_auth(provider.ctx, content)
                except OSError as exc:
                    raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
                accounts = [await pool.upsert(provider.name, t, label=args.label) for t in found]
            else:
                accounts = [await cli_login(services, provider, args, console)]
            for account in accounts:
                console.print(f"[green]✓[/green] {account.provider} account [bold]{account.label}[/bold] ({account.id})")
            return 0
        account = next((a for a in pool.accounts.values() if a.id == args.id or a.label == args.id), None)
        if account is None:
            raise CliError(f"no account with id or label {args.id!r}")
        if sub == "refresh":
            await pool.fresh(account, force=True)
        elif sub == "primary":
            await pool.set_primary(account.id)
        elif sub == "remove":
            await pool.delete(account.id)
        console.print(f"{sub}: {account.provider} account {account.label} done")
        return 0

    return asyncio.run(with_services(settings, job))


async def cli_login(services: Services, provider: Provider, args, console) -> AccountState:
    options = {k: v for k, v in (("mode", args.mode), ("enterprise_domain", args.enterprise_domain)) if v}
    state = secrets.token_urlsafe(32)
    login = await provider.module.start_login(provider.ctx, state, options)
    console.print(f"Open [bold]{login.url}[/bold]")
    console.print(login.instructions)
    if login.method == "code":
        code = console.input("Paste the code or the callback URL: ")
        tokens = await provider.module.finish_login(provider.ctx, state, login.data, code)
        return await services.pool.upsert(provider.name, tokens)
    deadline, interval, data = time.monotonic() + login.expires_in, login.interval, login.data
    with console.status(f"Waiting for approval (code {login.user_code})…"):
        while time.monotonic() < deadline:
            await asyncio.sleep(interval)
            try:
                tokens = await provider.module.poll_login(provider.ctx, data)
            except LoginPending as pending:
                interval, data = pending.interval or interval, pending.data or data
                continue
            return await services.pool.upsert(provider.name, tokens)
    raise CliError("the login expired before it was approved")


def cmd_usage(args, settings: Settings, console) -> int:
    async def job(services: Services):
        report = await usage_report(UsageBucketRow.bucket_start >= 0, int(args.hours * 3_600_000), services.now(),
                                    group="api_key_id")
        if args.json:
            print_json(report)
            return 0
        from rich.table import Table

        table = Table("key", "requests", "success %", "input", "output", "cache read", "avg ms")
        labels = {r.id: r.label or r.key_prefix for r in services.keys.by_id.values()}
        for row in report["byKey"]:
            table.add_row(labels.get(row["apiKeyId"], row["apiKeyId"]), str(row["requestCount"]),
                          str(row["successRate"] if row["successRate"] is not None else "-"), str(row["inputTokens"]),
                          str(row["outputTokens"]), str(row["cacheReadTokens"]), str(row["avgLatencyMs"]))
        console.print(table)
        return 0

    return asyncio.run(with_services(settings, job))


def cmd_rotate_secret(args, settings: Settings, console) -> int:
    new_secret = os.environ.get("KLEIS_NEW_SECRET_KEY") or secrets.token_urlsafe(32)
    if len(new_secret) < 16:
        raise CliError("KLEIS_NEW_SECRET_KEY is too short; use at least 16 random characters")

    async def job(services: Services):
        new_vault = Vault(new_secret)
        async with services.db.aio_atomic():
            for row in await ProviderAccountRow.select().aio_execute():
                await ProviderAccountRow.update(
                    access_token_enc=new_vault.seal(services.vault.open(row.access_token_enc)),
                    refresh_token_enc=new_vault.seal(services.vault.open(row.refresh_token_enc)),
                ).where(ProviderAccountRow.id == row.id).aio_execute()
            for row in await OAuthStateRow.select().aio_execute():
                await OAuthStateRow.update(data_enc=new_vault.seal(services.vault.open(row.data_enc))).where(
                    OAuthStateRow.state == row.state).aio_execute()
        await bump_version("accounts")
        return 0

    asyncio.run(with_services(settings, job))
    console.print("Tokens re-encrypted. Put this in [security] secret_key (or KLEIS_SECRET_KEY) and restart:")
    print(new_secret)
    return 0


SYSTEMD_UNIT = """[Unit]
Description=Kleis OAuth account proxy
After=network-online.target
Wants=network-online.target

[Service]
WorkingDirectory={cwd}
ExecStart={python} {script} serve --config {config}
Restart=on-failure
RestartSec=3
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=strict
ReadWritePaths={data}

[Install]
WantedBy=multi-user.target
"""


def main(argv: list[str] | None = None) -> int:
    import argparse

    from rich.console import Console

    console = Console(stderr=False)
    # --json and --config are accepted before or after any (sub)command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    parser = argparse.ArgumentParser(prog="kleis", description="Kleis OAuth account proxy")
    parser.add_argument("--config", help="config file (default: $KLEIS_CONFIG or ./config.toml)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", parents=[common], help="run the server (default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    sub.add_parser("init", parents=[common], help="create the config file if missing")
    sub.add_parser("check", parents=[common], help="validate the config and providers, then exit")
    keys = sub.add_parser("keys", parents=[common], help="API keys").add_subparsers(dest="keys_command", required=True)
    create = keys.add_parser("create", parents=[common], help="create a key (shown once)")
    create.add_argument("--label")
    create.add_argument("--provider", action="append", help="limit to a provider (repeatable)")
    create.add_argument("--model", action="append", help="limit to a model (repeatable)")
    create.add_argument("--account", action="append", help="limit to an account id (repeatable)")
    create.add_argument("--expires-days", type=float)
    keys.add_parser("list", parents=[common], help="list keys")
    revoke = keys.add_parser("revoke", parents=[common], help="revoke a key by id or prefix")
    revoke.add_argument("id")
    accounts = sub.add_parser("accounts", parents=[common], help="provider accounts").add_subparsers(dest="accounts_command", required=True)
    accounts.add_parser("list", parents=[common])
    login = accounts.add_parser("login", parents=[common], help="log in to a provider (browser code or device flow)")
    login.add_argument("provider")
    login.add_argument("--mode", help="codex: browser|headless; claude: max|console")
    login.add_argument("--enterprise-domain", help="copilot: GitHub Enterprise host")
    imp = accounts.add_parser("import", parents=[common], help="import an official client's auth file")
    imp.add_argument("provider")
    imp.add_argument("file")
    imp.add_argument("--label")
    for name in ("refresh", "primary", "remove"):
        accounts.add_parser(name, parents=[common]).add_argument("id", help="account id or label")
    usage = sub.add_parser("usage", parents=[common], help="usage per key")
    usage.add_argument("--hours", type=float, default=24)
    sub.add_parser("rotate-secret", parents=[common], help="re-encrypt tokens with a new secret key")
    sub.add_parser("systemd-unit", parents=[common], help="print a systemd unit for this install")
    args = parser.parse_args(argv)
    command = args.command or "serve"
    path = config_path(args.config)
    try:
        if command in ("serve", "init"):
            ensure_config(path, console)
            if command == "init":
                return 0
        if command == "systemd-unit":
            print(SYSTEMD_UNIT.format(cwd=HERE, python=sys.executable, script=HERE / "kleis.py",
                                      config=path.resolve(), data=path.resolve().parent))
            return 0
        settings = load_settings(path)
        setup_logging(settings.server.log_level)
        if command == "check":
            load_providers(settings)
            console.print(f"[green]ok[/green]: {path} is valid; providers: "
                          f"{', '.join(n for n, p in settings.providers.items() if p.enabled)}")
            return 0
        if command == "keys":
            return cmd_keys(args, settings, console)
        if command == "accounts":
            return cmd_accounts(args, settings, console)
        if command == "usage":
            return cmd_usage(args, settings, console)
        if command == "rotate-secret":
            return cmd_rotate_secret(args, settings, console)
        host = getattr(args, "host", None) or settings.server.host
        port = getattr(args, "port", None) or settings.server.port
        app = create_app(settings)
        log.info("Kleis %s on http://%s:%d (config %s)", VERSION, host, port, path)
        with contextlib.suppress(ValueError, OSError):  # stderr may be no real file (embedding)
            faulthandler.enable()  # a crash in a C extension still leaves a Python traceback
        try:
            sock = listening_socket(host, port)
        except OSError as exc:
            raise CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        app.run(sock=sock, backlog=1024, single_process=True, access_log=False, motd=False)
        return 0
    except ConfigError as exc:
        print(f"kleis: {exc}", file=sys.stderr)
        return 2
    except (CliError, ProviderError) as exc:
        print(f"kleis: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
