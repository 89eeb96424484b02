"""Kleis storage: the only module that knows SQL, peewee and the shape of the tables.

One `Store` per Kleis instance owns its database connection pool and its own model
classes, so two instances in one process never share state. It speaks in named
operations (`create_key`, `revoke_key`, `save_refreshed`, `add_usage`, ...) that take and
return plain records; OAuth tokens and login data are sealed with the instance's `Vault` on
the way in and opened on the way out, so nothing above this module sees ciphertext.

schema.sql is the only schema (applied at open, then migrations/NNN_*.sql once each); the
models here are a typed view of it, and a test compares the two on SQLite and PostgreSQL.
All times are epoch milliseconds. Runtime queries are async (peewee-async).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import operator
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, urlsplit

from runtime import Clock
from settings import ConfigError, Vault


@contextlib.contextmanager
def _without(*names: str):
    """Imports inside see `names` as not installed, unless something already imported them."""
    hidden = [name for name in names if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # `import name` raises ImportError
    try:
        yield
    finally:
        for name in hidden:
            if sys.modules.get(name) is None:
                del sys.modules[name]


# peewee, playhouse.postgres_ext and peewee-async import psycopg at import time whenever it is
# installed: ~10 MB resident in an instance on SQLite that never uses it (issue 14, idle RSS).
# They are imported with it hidden; `connect()` hands it to them when a PostgreSQL URL is
# first opened (`_psycopg_for_peewee`). The names set there are the ones these pinned versions
# bind at import (peewee 4.3, peewee-async 2.1); tests/test_store.py runs both orders.
with _without("psycopg", "psycopg_pool"):
    import peewee
    import peewee_async
    import peewee_async.pool
    import peewee_async.utils
    from playhouse import postgres_ext


def _psycopg_for_peewee() -> None:
    """Import psycopg 3 and give peewee, playhouse and peewee-async the names they would have
    bound had it been imported with them (some may be bound already: psycopg imported before
    them, psycopg_pool not). Idempotent; ImportError when it is not installed."""
    import psycopg
    import psycopg_pool
    from psycopg.pq import TransactionStatus
    from psycopg.types import TypeInfo
    from psycopg.types.hstore import register_hstore
    from psycopg.types.json import Json, Jsonb

    peewee.TransactionStatus, peewee.Json_pg3, peewee.Jsonb_pg3 = TransactionStatus, Json, Jsonb
    postgres_ext.TypeInfo, postgres_ext.register_hstore_pg3 = TypeInfo, register_hstore
    for module in (peewee_async.utils, peewee_async.pool):
        module.psycopg, module.psycopg_pool = psycopg, psycopg_pool
    peewee.psycopg = psycopg


HERE = Path(__file__).resolve().parent
SCHEMA_FILE = HERE / "schema.sql"
MIGRATIONS_DIR = HERE / "migrations"
log = logging.getLogger("kleis.store")

# Additive counters of request_usage_buckets, in schema order. `max_latency_ms` and
# `last_request_at` are kept as maxima, not sums.
USAGE_COUNTERS = (
    "request_count", "success_count", "client_error_count", "server_error_count", "auth_error_count",
    "rate_limit_count", "proxy_error_count", "upstream_error_count", "incomplete_count", "cancelled_count",
    "total_latency_ms", "total_duration_ms", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens",
)  # fmt: skip
INSTANCE_LIVE_MS = 90_000  # a server announces itself every 30 s; one silent for 90 s is gone
USAGE_DIMENSIONS = ("bucket_start", "api_key_id", "provider_account_id", "provider", "endpoint", "model")
# Latency histograms of request_usage_buckets: requests counted by time to first byte and by
# duration, in 8 log-spaced bins per bucket (additive like the other counters, so any sum of
# buckets keeps its histogram and a p95 can be interpolated). `ttfb_le_250` counts requests
# with 100 ms < TTFB <= 250 ms; `*_gt_*` is the open last bin.
TTFB_BOUNDS_MS = (100, 250, 500, 1000, 2500, 5000, 10000)
DURATION_BOUNDS_MS = (1000, 2500, 5000, 10000, 20000, 40000, 80000)
TTFB_BINS = (*(f"ttfb_le_{b}" for b in TTFB_BOUNDS_MS), f"ttfb_gt_{TTFB_BOUNDS_MS[-1]}")
DURATION_BINS = (*(f"duration_le_{b}" for b in DURATION_BOUNDS_MS), f"duration_gt_{DURATION_BOUNDS_MS[-1]}")
USAGE_COUNTERS += TTFB_BINS + DURATION_BINS  # schema order: after last_request_at
COUNTERS_OF = operator.itemgetter(*USAGE_COUNTERS)  # a row's counters, in USAGE_COUNTERS order
HOUR_MS = 3_600_000  # request_usage_hourly's bucket size
NOTIFY_CHANNEL = "kleis_changes"  # PostgreSQL LISTEN/NOTIFY channel of cache_versions bumps
SESSIONS_CHANNEL = "kleis_sessions"  # ... and of session -> account bindings
SCHEMA_LOCK = 0x6B6C6569  # PostgreSQL advisory lock id held while the schema is applied ("klei")
NOTIFY_MAX = 7900  # bytes of one NOTIFY payload (PostgreSQL's limit is 8000)


# ══ Records ═════════════════════════════════════════════════════════════════


class DatabaseUnavailable(ConfigError):
    """The database cannot be opened or written: a missing folder, a read-only file, no
    permission, an unreachable server. One line naming the database and the cause, never a
    password; main() prints it and exits 2."""


def database_problem(url: str, exc: BaseException, doing: str = "open") -> DatabaseUnavailable:
    """`exc` from the driver as one line: `[database] url: cannot open <where>: <cause>`."""
    cause = (str(exc).strip().splitlines() or [""])[0][:200] or type(exc).__name__
    if url.startswith("sqlite:///"):
        path = Path(url[len("sqlite:///") :])
        where = f"SQLite database {path}"
        if not path.parent.is_dir():
            cause = f"the folder {path.parent} does not exist"
        elif "readonly" in cause.replace("-", "").replace(" ", "") or "read only" in cause:
            cause += " (check the file's and its folder's owner and mode, and the mount)"
    else:
        parts = urlsplit(url)
        name = unquote(parts.path.lstrip("/"))
        where = f"PostgreSQL database {name!r} on {parts.hostname}:{parts.port or 5432}"
    return DatabaseUnavailable(f"[database] url: cannot {doing} {where}: {cause}")


DRIVER_MODULES = ("psycopg", "psycopg_pool", "sqlite3", "aiosqlite", "peewee", "peewee_async")


def database_failure(exc: BaseException) -> bool:
    """True when `exc` comes from the database or its driver (any of their exception
    classes), so a caller can answer 503 instead of a 500; no driver is imported for it."""
    return any(cls.__module__.split(".")[0] in DRIVER_MODULES for cls in type(exc).__mro__[:-2])


class UsageWriteFailed(Exception):
    """`Store.add_usage` failed. `maybe_committed` is False when the transaction certainly did
    not commit (it failed before COMMIT), True when COMMIT itself failed or its answer was lost,
    so the batch may be stored; `__cause__` is the database's error."""

    def __init__(self, cause: BaseException, maybe_committed: bool):
        first_line = (str(cause).strip().splitlines() or [""])[0][:200]
        super().__init__(f"{type(cause).__name__}: {first_line}" if first_line else type(cause).__name__)
        self.maybe_committed = maybe_committed


@dataclass(frozen=True)
class KeyRecord:
    """An API key as stored (the key itself never is: `key_hash` is its SHA-256)."""

    id: str
    key_hash: str
    key_prefix: str
    discovery_token: str
    label: str | None
    provider_scopes: tuple[str, ...] | None
    model_scopes: tuple[str, ...] | None
    account_scopes: tuple[str, ...] | None
    expires_at: int | None
    revoked_at: int | None
    created_at: int

    def active(self, now: int) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def status(self, now: int) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if self.active(now) else "expired"


@dataclass
class AccountRecord:
    """A provider account with its tokens opened (never logged: see __repr__)."""

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
        return f"{type(self).__name__}({self.provider}:{self.label or self.id})"


@dataclass(frozen=True)
class LoginRecord:
    """A login in progress (an OAuth state) with its data opened."""

    state: str
    provider: str
    method: str
    data: dict = field(repr=False)
    status: str
    result_account_id: str | None
    message: str | None
    interval_ms: int
    expires_at: int
    created_at: int


# ══ Models ══════════════════════════════════════════════════════════════════


def build_models(db: peewee_async.AioDatabase) -> SimpleNamespace:
    """Model classes bound to `db` alone (a new set per Store, never global)."""

    class Base(peewee_async.AioModel):
        class Meta:
            database = db

    class Account(Base):
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

    class ApiKey(Base):
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

    class OAuthState(Base):
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

    class UsageBucket(Base):
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
            primary_key = peewee.CompositeKey(*USAGE_DIMENSIONS)

    for name in TTFB_BINS + DURATION_BINS:
        UsageBucket._meta.add_field(name, peewee.IntegerField(default=0))

    class UsageHourly(UsageBucket):
        """request_usage_hourly: the same columns summed per hour, kept by triggers."""

        class Meta:
            table_name = "request_usage_hourly"
            primary_key = peewee.CompositeKey(*USAGE_DIMENSIONS)

    class CacheVersion(Base):
        name = peewee.TextField(primary_key=True)
        version = peewee.BigIntegerField()

        class Meta:
            table_name = "cache_versions"

    class UsageFlush(Base):
        writer = peewee.TextField(primary_key=True)
        batch = peewee.BigIntegerField()
        written_at = peewee.BigIntegerField()

        class Meta:
            table_name = "usage_flushes"

    class ServerInstance(Base):
        id = peewee.TextField(primary_key=True)
        host = peewee.TextField()
        pid = peewee.BigIntegerField()
        key_ids = peewee.TextField()
        started_at = peewee.BigIntegerField()
        seen_at = peewee.BigIntegerField()

        class Meta:
            table_name = "instances"

    class SchemaMigration(Base):
        version = peewee.TextField(primary_key=True)
        applied_at = peewee.BigIntegerField()

        class Meta:
            table_name = "schema_migrations"

    all_ = [Account, ApiKey, OAuthState, UsageBucket, UsageHourly, UsageFlush, CacheVersion, SchemaMigration]
    all_.append(ServerInstance)
    return SimpleNamespace(
        Account=Account,
        ApiKey=ApiKey,
        OAuthState=OAuthState,
        UsageBucket=UsageBucket,
        UsageHourly=UsageHourly,
        UsageFlush=UsageFlush,
        CacheVersion=CacheVersion,
        SchemaMigration=SchemaMigration,
        ServerInstance=ServerInstance,
        all=all_,
    )


# psycopg_pool replaces a lost connection with attempts 1, 2, 4, 8, 16... s apart until
# `reconnect_timeout` (default 300 s), so after an outage of T seconds PostgreSQL could be back
# for up to ~T seconds before the pool tried again (measured: /readyz 503 for 5.4 s after an
# 8 s outage). Giving up after a few seconds bounds the gap: the slot is dropped, and the next
# caller waiting for a connection grows the pool with a fresh attempt at once
# (tests/test_pg_restart.py).
RECONNECT_GIVE_UP_S = 2.0

# SQLite: how long `read_versions` keeps its own connection before opening a new one.
READER_MAX_AGE_S = 5.0


def connect(url: str, pool_size: int = 10) -> peewee_async.AioDatabase:
    """A peewee-async database for `sqlite:///<absolute path or :memory:>` or
    `postgresql://user:password@host:port/db`. Nothing is opened yet."""
    if url.startswith("sqlite:///"):
        # aiosqlite opens one connection per acquire; `timeout` is SQLite's busy timeout.
        return peewee_async.SqliteDatabase(url[len("sqlite:///") :], pool_params={"timeout": 15})
    _psycopg_for_peewee()
    import psycopg_pool

    params = pg_params(url)
    pool = {
        "min_size": 1,
        "max_size": pool_size,
        "reconnect_timeout": RECONNECT_GIVE_UP_S,
        # An idle connection is checked (one round trip) before it is handed out: after a
        # quick PostgreSQL restart every pooled connection is dead, and each would otherwise
        # fail one admin call, flush or /readyz probe before being replaced.
        "check": psycopg_pool.AsyncConnectionPool.check_connection,
    }
    return peewee_async.Psycopg3Database(params.pop("dbname"), **params, pool_params=pool)


def pg_params(url: str) -> dict[str, Any]:
    """`postgresql://user:password@host:port/db` as psycopg connection keywords (dbname,
    host, port, user, password), with the defaults Kleis documents (127.0.0.1:5432, postgres)."""
    parts = urlsplit(url)
    return {
        "dbname": unquote(parts.path.lstrip("/")) or "postgres",
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 5432,
        "user": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }


def private_sqlite_file(url: str) -> None:
    """Create a missing SQLite database file with mode 0600 before SQLite does (it would use
    0644 under the usual umask) and take group/other access away from an existing one: it
    holds the sealed OAuth tokens and the key hashes. Raises OSError."""
    if not url.startswith("sqlite:///") or url == "sqlite:///:memory:":
        return
    path = Path(url[len("sqlite:///") :])
    if not path.parent.is_dir():
        raise FileNotFoundError(f"the folder {path.parent} does not exist")
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(OSError):  # not ours to change (another user's file): leave it
            if name.stat().st_mode & 0o077:
                name.chmod(0o600)


def schema_statements(text: str) -> list[str]:
    """A SQL file split into statements (comment lines dropped)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("--"))
    return [s.strip() for s in body.split(";") if s.strip()]


def _loads(text: str | None, default: Any) -> Any:
    if not text:
        return default
    try:
        return json.loads(text)
    except ValueError:
        return default


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def _scope(text: str | None) -> tuple[str, ...] | None:
    value = _loads(text, None)
    return tuple(str(v) for v in value) if isinstance(value, list) and value else None


# Record field -> column for the fields callers may change directly.
_KEY_COLUMNS = {
    "label": "label",
    "provider_scopes": "provider_scope_json",
    "model_scopes": "model_scope_json",
    "account_scopes": "account_scope_json",
    "expires_at": "expires_at",
}
_ACCOUNT_COLUMNS = {
    "label",
    "priority",
    "enabled",
    "metadata",
    "cooldown_until",
    "cooldown_kind",
    "last_error",
    "status",
}


# ══ Store ═══════════════════════════════════════════════════════════════════


class Store:
    """The database of one Kleis instance. `open()` connects and applies the schema;
    `close()` closes its pool. Every method is a coroutine unless noted."""

    def __init__(
        self,
        url: str,
        vault: Vault,
        clock: Clock | None = None,
        pool_size: int = 10,
        migrations_dir: Path | None = None,
    ):
        self.url = url
        self.vault = vault
        self.clock = clock or Clock()
        self.migrations_dir = migrations_dir or MIGRATIONS_DIR
        self.db = connect(url, pool_size)
        self.m = build_models(self.db)
        self.is_sqlite = isinstance(self.db, peewee.SqliteDatabase)
        self._upsert_sql: dict[tuple, str] = {}
        self._version_reader: Any = None  # SQLite: the kept connection read_versions uses
        self._version_reader_opened = 0.0  # its event-loop time of opening

    # ── lifecycle ──
    async def open(self) -> None:
        """Connect, create missing tables, run migrations not yet recorded. A fresh database
        gets the full schema.sql, so its migrations are recorded without running. A new
        SQLite file is created 0600 (SQLite gives its -wal and -shm files the same mode).
        Raises DatabaseUnavailable (one line) when the database cannot be opened."""
        try:
            private_sqlite_file(self.url)
            await self._open()
        except ConfigError:
            raise
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self.db.aio_close()
            raise database_problem(self.url, exc) from None

    async def _open(self) -> None:
        if not self.is_sqlite:
            # One direct connection first: the pool would retry quietly for 30 s and then
            # report only its timeout, hiding the cause (no such database, role, password).
            async with await self._direct_connection():
                pass
        await self.db.aio_connect()
        db = self.db
        if self.is_sqlite:
            await db.aio_execute_sql("PRAGMA journal_mode=WAL")
        async with db.aio_connection():
            if not self.is_sqlite:
                # Instances starting together on one database apply the schema one at a time
                # (concurrent CREATEs collide in PostgreSQL's catalogue); released with the session.
                await db.aio_execute_sql(f"SELECT pg_advisory_lock({SCHEMA_LOCK})")
            fresh = "provider_accounts" not in await db.aio_get_tables()
            for statement in schema_statements(SCHEMA_FILE.read_text()):
                await db.aio_execute_sql(statement)
            done = {r.version for r in await self.m.SchemaMigration.select().aio_execute()}
            for path in sorted(self.migrations_dir.glob("[0-9][0-9][0-9]_*.sql")):
                if path.stem in done:
                    continue
                if not fresh:
                    for statement in schema_statements(path.read_text()):
                        await db.aio_execute_sql(statement)
                await self.m.SchemaMigration.insert(
                    version=path.stem, applied_at=self.clock.now()
                ).aio_execute()
            await self._install_usage_triggers()
            if not self.is_sqlite:
                await db.aio_execute_sql(f"SELECT pg_advisory_unlock({SCHEMA_LOCK})")

    async def _direct_connection(self, **options: Any):
        """PostgreSQL only: one psycopg connection of its own, outside the pool (5 s to connect)."""
        import psycopg

        params = {k: v for k, v in pg_params(self.url).items() if v is not None}
        return await psycopg.AsyncConnection.connect(**params, connect_timeout=5, **options)

    async def close(self) -> None:
        await self._drop_version_reader()
        await self.db.aio_close()

    async def ping(self) -> None:
        """Raises when the database does not answer."""
        await self.db.aio_execute_sql("SELECT 1")

    async def check_writable(self) -> None:
        """Raises when a write does not commit (read-only file or mount, full disk, missing
        permission, a read-only PostgreSQL replica): an idempotent upsert of one small row,
        the `write-probe` entry of cache_versions (no instance reloads anything for it)."""
        V = self.m.CacheVersion
        await (
            V.insert(name="write-probe", version=self.clock.now())
            .on_conflict(conflict_target=[V.name], update={V.version: peewee.EXCLUDED.version})
            .aio_execute()
        )

    def model_columns(self) -> dict[str, list[str]]:
        """Not async. Table -> column names as the models see them (for the schema test)."""
        return {m._meta.table_name: [f.column_name for f in m._meta.sorted_fields] for m in self.m.all}

    async def migrations(self) -> list[str]:
        return [
            r.version
            for r in await self.m.SchemaMigration.select()
            .order_by(self.m.SchemaMigration.version)
            .aio_execute()
        ]

    # ── cache versions (cross-instance invalidation) ──
    async def bump_version(self, name: str) -> None:
        """Tell every instance (this one included) that cached `name` rows changed: the row
        every instance polls, and on PostgreSQL a `NOTIFY kleis_changes` in the same statement
        (delivered when it commits) that listening instances act on at once (`listen`)."""
        V = self.m.CacheVersion
        if self.is_sqlite:
            await (
                V.insert(name=name, version=1)
                .on_conflict(conflict_target=[V.name], update={V.version: V.version + 1})
                .aio_execute()
            )
            return
        await self.db.aio_execute_sql(
            "WITH v AS (INSERT INTO cache_versions (name, version) VALUES (%s, 1) ON CONFLICT (name) "
            "DO UPDATE SET version = cache_versions.version + 1 RETURNING name) "
            f"SELECT pg_notify('{NOTIFY_CHANNEL}', name) FROM v",
            (name,),
        )

    async def tell_sessions(self, lines: list[str]) -> None:
        """PostgreSQL only (nothing on SQLite, a single instance): send session bindings
        (`"<key id> <provider> <digest hex> <account id>"` lines) to every listening instance,
        as few NOTIFY payloads as fit."""
        if self.is_sqlite or not lines:
            return
        payloads, current = [], ""
        for line in lines:
            if current and len(current) + len(line) + 1 > NOTIFY_MAX:
                payloads.append(current)
                current = ""
            current = f"{current}\n{line}" if current else line
        payloads.append(current)
        for payload in payloads:
            await self.db.aio_execute_sql(f"SELECT pg_notify('{SESSIONS_CHANNEL}', %s)", (payload,))

    async def listen(
        self,
        changed: Callable[[], None],
        sessions: Callable[[str], None],
        connected: Callable[[bool], None],
    ) -> None:
        """PostgreSQL only (returns at once on SQLite): hold one connection of its own that
        LISTENs on `kleis_changes` and calls `changed()` for every notification (and once
        after each (re)connect, since notifications sent while disconnected are gone), and
        on `kleis_sessions`, calling `sessions(payload)` (see `tell_sessions`). Reconnects
        with backoff (0.5 s doubling to 5 s) until cancelled; `connected(bool)` reports the
        state, so the caller can poll faster while it is down. Notifications are delivered
        only after the sender's transaction commits (PostgreSQL docs, NOTIFY)."""
        if self.is_sqlite:
            return

        delay = 0.5
        while True:
            try:
                # TCP keepalives: a server that vanished without closing the connection (a
                # host or network failure) is noticed within ~25 s instead of never.
                async with await self._direct_connection(
                    autocommit=True,
                    keepalives=1,
                    keepalives_idle=10,
                    keepalives_interval=5,
                    keepalives_count=3,
                ) as conn:
                    await conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
                    await conn.execute(f"LISTEN {SESSIONS_CHANNEL}")
                    connected(True)
                    changed()
                    delay = 0.5
                    async for note in conn.notifies():
                        if note.channel == SESSIONS_CHANNEL:
                            sessions(note.payload)
                        else:
                            changed()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info(
                    "database change listener disconnected (%s); retrying in %.1f s",
                    database_problem(self.url, exc, "listen to").args[0],
                    delay,
                )
            connected(False)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def read_versions(self, fresh: bool = False) -> dict[str, int]:
        """{cache name: version}. Polled every `[database] poll_interval` for ever."""
        if not self.is_sqlite:
            return {r.name: r.version for r in await self.m.CacheVersion.select().aio_execute()}
        # peewee-async opens a SQLite connection, and a thread for it, per query: 4 polls a
        # second did that for ever (1% of a core on an idle server, and ~8 µs of every request
        # under load, issue 14). The poll keeps one connection of its own instead; autocommit,
        # so each read sees every commit before it (WAL).
        # Reopened every few seconds, and on request (`fresh`: POST /admin/reload): a database
        # file replaced under a running server (a restore) is then read within that time, not
        # never (an open connection keeps reading the old file).
        now = asyncio.get_running_loop().time()
        aged = now - self._version_reader_opened > READER_MAX_AGE_S
        if self._version_reader is not None and (fresh or aged):
            await self._drop_version_reader()
        if self._version_reader is None:
            import aiosqlite

            path = self.url[len("sqlite:///") :]
            self._version_reader = await aiosqlite.connect(path, isolation_level=None, timeout=15)
            self._version_reader_opened = now
        try:
            async with self._version_reader.execute("SELECT name, version FROM cache_versions") as cursor:
                return {name: version for name, version in await cursor.fetchall()}
        except BaseException:
            await self._drop_version_reader()  # the next poll opens a fresh one
            raise

    async def _drop_version_reader(self) -> None:
        reader, self._version_reader = self._version_reader, None
        if reader is not None:
            with contextlib.suppress(Exception):
                await reader.close()

    # ── running servers (rotate-secret's guard) ──
    async def announce_instance(self, instance_id: str, host: str, pid: int, key_ids: Iterable[str]) -> None:
        """Record (or refresh) a serving instance and the vault key ids it can open, the
        sealing key first."""
        S, now = self.m.ServerInstance, self.clock.now()
        ids = ",".join(key_ids)
        await (
            S.insert(id=instance_id, host=host, pid=pid, key_ids=ids, started_at=now, seen_at=now)
            .on_conflict(conflict_target=[S.id], update={S.seen_at: now, S.key_ids: ids})
            .aio_execute()
        )

    async def retire_instance(self, instance_id: str) -> None:
        await self.m.ServerInstance.delete().where(self.m.ServerInstance.id == instance_id).aio_execute()

    async def live_instances(self, seen_since: int) -> list[dict]:  # see INSTANCE_LIVE_MS
        """Servers seen at or after `seen_since` (epoch ms): `id`, `host`, `pid`, `key_ids`
        (a list, the sealing key first), `started_at`, `seen_at`."""
        S = self.m.ServerInstance
        rows = await S.select().where(S.seen_at >= seen_since).order_by(S.started_at).dicts().aio_execute()
        return [{**r, "key_ids": r["key_ids"].split(",")} for r in rows]

    # ── API keys ──
    @staticmethod
    def _key(row) -> KeyRecord:
        return KeyRecord(
            id=row.id,
            key_hash=row.key_hash,
            key_prefix=row.key_prefix,
            discovery_token=row.models_discovery_token,
            label=row.label,
            provider_scopes=_scope(row.provider_scope_json),
            model_scopes=_scope(row.model_scope_json),
            account_scopes=_scope(row.account_scope_json),
            expires_at=row.expires_at,
            revoked_at=row.revoked_at,
            created_at=row.created_at,
        )

    @staticmethod
    def _key_columns(fields: Mapping[str, Any]) -> dict[str, Any]:
        columns = {}
        for name, value in fields.items():
            column = _KEY_COLUMNS[name]  # KeyError: a programming error, not input
            columns[column] = _dumps(list(value) if value else None) if column.endswith("_json") else value
        return columns

    async def list_keys(self) -> list[KeyRecord]:
        return [self._key(r) for r in await self.m.ApiKey.select().aio_execute()]

    async def create_key(
        self, key_id: str, key_hash: str, key_prefix: str, discovery_token: str, **fields: Any
    ) -> None:
        """`fields`: label, provider_scopes, model_scopes, account_scopes, expires_at."""
        await self.m.ApiKey.insert(
            id=key_id,
            key_hash=key_hash,
            key_prefix=key_prefix,
            models_discovery_token=discovery_token,
            created_at=self.clock.now(),
            **self._key_columns(fields),
        ).aio_execute()

    async def update_key(self, key_id: str, **fields: Any) -> None:
        if fields:
            K = self.m.ApiKey
            await K.update(**self._key_columns(fields)).where(K.id == key_id).aio_execute()

    async def revoke_key(self, key_id: str, at: int) -> bool:
        """False when the key does not exist or was already revoked."""
        K = self.m.ApiKey
        return bool(
            await K.update(revoked_at=at).where((K.id == key_id) & K.revoked_at.is_null()).aio_execute()
        )

    async def delete_key(self, key_id: str) -> None:
        """The key. Its usage buckets stay, under its id, until retention removes them: totals
        over a window do not change when a key is deleted."""
        await self.m.ApiKey.delete().where(self.m.ApiKey.id == key_id).aio_execute()

    # ── provider accounts ──
    def _account(self, row) -> AccountRecord:
        return AccountRecord(
            id=row.id,
            provider=row.provider,
            label=row.label,
            account_id=row.account_id,
            is_primary=bool(row.is_primary),
            enabled=bool(row.enabled),
            priority=row.priority,
            status=row.status,
            access_token=self.vault.open(row.access_token_enc),
            refresh_token=self.vault.open(row.refresh_token_enc),
            expires_at=row.expires_at,
            metadata=_loads(row.metadata_json, {}) or {},
            cooldown_until=row.cooldown_until,
            cooldown_kind=row.cooldown_kind,
            last_error=row.last_error,
            last_refresh_at=row.last_refresh_at,
            last_refresh_status=row.last_refresh_status,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    def _sealed(self, access_token: str, refresh_token: str) -> dict[str, str]:
        return {
            "access_token_enc": self.vault.seal(access_token),
            "refresh_token_enc": self.vault.seal(refresh_token),
        }

    async def list_accounts(self) -> list[AccountRecord]:
        """Every account; one whose tokens cannot be opened (secret key changed) is logged and
        left out rather than stopping the others."""
        out = []
        for row in await self.m.Account.select().aio_execute():
            try:
                out.append(self._account(row))
            except ConfigError as exc:
                log.error("account %s (%s): %s", row.id, row.provider, exc)
        return out

    async def unreadable_accounts(self) -> int:
        """How many accounts' tokens this store's vault cannot open (sealed with a secret key
        it does not have)."""
        A, unreadable = self.m.Account, 0
        for row in await A.select(A.access_token_enc).aio_execute():
            try:
                self.vault.open(row.access_token_enc)
            except ConfigError:
                unreadable += 1
        return unreadable

    async def get_account(self, account_id: str) -> AccountRecord | None:
        A = self.m.Account
        row = await A.select().where(A.id == account_id).aio_first()
        return None if row is None else self._account(row)

    async def find_account(self, provider: str, account_id: str) -> AccountRecord | None:
        """The account of `provider` with that provider-side identity."""
        A = self.m.Account
        row = await A.select().where((A.provider == provider) & (A.account_id == account_id)).aio_first()
        return None if row is None else self._account(row)

    async def insert_account(
        self,
        account_id: str,
        provider: str,
        label: str,
        provider_account_id: str | None,
        access_token: str,
        refresh_token: str,
        expires_at: int,
        metadata: dict,
        priority: int = 0,
    ) -> None:
        """A new account; it is primary when its provider has none, and disabled when the
        provider was switched off (some sibling disabled)."""
        A = self.m.Account
        now = self.clock.now()
        siblings = list(await A.select(A.is_primary, A.enabled).where(A.provider == provider).aio_execute())
        await A.insert(
            id=account_id, provider=provider, label=label, account_id=provider_account_id,
            is_primary=0 if any(r.is_primary for r in siblings) else 1,
            enabled=1 if all(r.enabled for r in siblings) else 0, priority=priority, status="ok",
            metadata_json=_dumps(metadata or {}), expires_at=expires_at, created_at=now, updated_at=now,
            **self._sealed(access_token, refresh_token),
        ).aio_execute()  # fmt: skip

    async def replace_login(
        self,
        account_id: str,
        access_token: str,
        refresh_token: str,
        expires_at: int,
        metadata: dict,
        label: str | None = None,
        priority: int | None = None,
        provider_account_id: str | None = None,
    ) -> None:
        """New tokens from a login or import for an existing account: clears needs_reauth, the
        cooldown and any refresh lease; keeps the label unless one is given, and the
        provider-side identity unless `provider_account_id` is given."""
        A = self.m.Account
        values: dict[str, Any] = dict(
            self._sealed(access_token, refresh_token),
            expires_at=expires_at,
            metadata_json=_dumps(metadata),
            status="ok",
            cooldown_until=None,
            cooldown_kind=None,
            last_error=None,
            refresh_lock_token=None,
            refresh_lock_expires_at=None,
            updated_at=self.clock.now(),
        )
        if label:
            values["label"] = label
        if priority is not None:
            values["priority"] = priority
        if provider_account_id:
            values["account_id"] = provider_account_id
        await A.update(**values).where(A.id == account_id).aio_execute()

    async def update_account(self, account_id: str, **fields: Any) -> None:
        """`fields`: label, priority, enabled, metadata, cooldown_until, cooldown_kind,
        last_error, status."""
        unknown = set(fields) - _ACCOUNT_COLUMNS
        if unknown:
            raise TypeError(f"update_account: unknown fields {sorted(unknown)}")
        values: dict[str, Any] = {k: v for k, v in fields.items() if k not in ("metadata", "enabled")}
        if "metadata" in fields:
            values["metadata_json"] = _dumps(fields["metadata"] or {})
        if "enabled" in fields:
            values["enabled"] = int(fields["enabled"])
        values["updated_at"] = self.clock.now()
        A = self.m.Account
        await A.update(**values).where(A.id == account_id).aio_execute()

    async def set_primary(self, provider: str, account_id: str) -> None:
        A = self.m.Account
        async with self.db.aio_atomic():
            # Two statements: the partial unique index allows one primary per provider.
            await A.update(is_primary=0).where((A.provider == provider) & (A.is_primary == 1)).aio_execute()
            await A.update(is_primary=1, updated_at=self.clock.now()).where(A.id == account_id).aio_execute()

    async def delete_account(self, account_id: str, next_primary: str | None = None) -> None:
        """Delete an account; `next_primary` takes over as its provider's primary."""
        A = self.m.Account
        async with self.db.aio_atomic():
            await A.delete().where(A.id == account_id).aio_execute()
            if next_primary:
                await A.update(is_primary=1).where(A.id == next_primary).aio_execute()

    async def set_provider_enabled(self, provider: str, enabled: bool) -> None:
        A = self.m.Account
        await (
            A.update(enabled=int(enabled), updated_at=self.clock.now())
            .where(A.provider == provider)
            .aio_execute()
        )

    # ── refresh lease (one refresh per account across instances) ──
    async def take_refresh_lease(self, account_id: str, lease: str, lease_ms: int) -> bool:
        """True when this caller now holds the account's refresh lease for `lease_ms`."""
        A = self.m.Account
        now = self.clock.now()
        free = A.refresh_lock_token.is_null() | (A.refresh_lock_expires_at <= now)
        taken = (
            await A.update(refresh_lock_token=lease, refresh_lock_expires_at=now + lease_ms)
            .where((A.id == account_id) & free)
            .aio_execute()
        )
        return bool(taken)

    async def renew_refresh_lease(self, account_id: str, lease: str, lease_ms: int) -> bool:
        """Extend a lease this caller still holds to `lease_ms` from now; False when lost."""
        A = self.m.Account
        renewed = (
            await A.update(refresh_lock_expires_at=self.clock.now() + lease_ms)
            .where((A.id == account_id) & (A.refresh_lock_token == lease))
            .aio_execute()
        )
        return bool(renewed)

    async def release_refresh_lease(self, account_id: str, lease: str) -> None:
        A = self.m.Account
        await (
            A.update(refresh_lock_token=None, refresh_lock_expires_at=None)
            .where((A.id == account_id) & (A.refresh_lock_token == lease))
            .aio_execute()
        )

    async def save_refreshed(
        self,
        account_id: str,
        lease: str,
        access_token: str,
        refresh_token: str,
        expires_at: int,
        metadata: dict,
        replaced: str,
    ) -> bool:
        """Commit refreshed tokens and release the lease in one statement while `lease` is
        still ours. A lost lease (it expired while the database was unreachable, and another
        instance took it) still saves them when the stored refresh token is still
        `replaced`, the one this refresh used: nobody else rotated it, and the provider has
        already invalidated it, so these tokens are the only good ones. False when someone
        else rotated it meanwhile (theirs are kept)."""
        A = self.m.Account
        now = self.clock.now()
        values = dict(
            **self._sealed(access_token, refresh_token),
            expires_at=expires_at,
            metadata_json=_dumps(metadata),
            status="ok",
            last_refresh_at=now,
            last_refresh_status="success",
            last_error=None,
            updated_at=now,
        )
        released = dict(refresh_lock_token=None, refresh_lock_expires_at=None)
        written = (
            await A.update(**values, **released)
            .where((A.id == account_id) & (A.refresh_lock_token == lease))
            .aio_execute()
        )
        if written:
            return True
        async with self.db.aio_atomic():
            row = await A.select(A.refresh_token_enc).where(A.id == account_id).aio_first()
            if row is None or self.vault.open(row.refresh_token_enc) != replaced:
                return False
            unchanged = (A.id == account_id) & (A.refresh_token_enc == row.refresh_token_enc)
            await A.update(**values).where(unchanged).aio_execute()
        return True

    async def save_refresh_failure(
        self, account_id: str, lease: str, message: str, needs_reauth: bool
    ) -> None:
        """Record a failed refresh (and `needs_reauth`) and release the lease."""
        A = self.m.Account
        now = self.clock.now()
        values: dict[str, Any] = dict(
            last_refresh_at=now,
            last_refresh_status="failed",
            last_error=message,
            refresh_lock_token=None,
            refresh_lock_expires_at=None,
            updated_at=now,
        )
        if needs_reauth:
            values["status"] = "needs_reauth"
        await A.update(**values).where((A.id == account_id) & (A.refresh_lock_token == lease)).aio_execute()

    async def reseal(self, new_vault: Vault) -> int:
        """Re-encrypt every token and login with `new_vault` in one transaction; afterwards
        this store uses it. Returns the number of accounts."""
        A, S = self.m.Account, self.m.OAuthState
        count = 0
        async with self.db.aio_atomic():
            for row in await A.select().aio_execute():
                await (
                    A.update(
                        access_token_enc=new_vault.seal(self.vault.open(row.access_token_enc)),
                        refresh_token_enc=new_vault.seal(self.vault.open(row.refresh_token_enc)),
                    )
                    .where(A.id == row.id)
                    .aio_execute()
                )
                count += 1
            for row in await S.select().aio_execute():
                await (
                    S.update(data_enc=new_vault.seal(self.vault.open(row.data_enc)))
                    .where(S.state == row.state)
                    .aio_execute()
                )
        self.vault = new_vault
        return count

    # ── logins (OAuth states) ──
    def _login(self, row) -> LoginRecord:
        return LoginRecord(
            state=row.state,
            provider=row.provider,
            method=row.method,
            data=json.loads(self.vault.open(row.data_enc)),
            status=row.status,
            result_account_id=row.result_account_id,
            message=row.message,
            interval_ms=row.interval_ms,
            expires_at=row.expires_at,
            created_at=row.created_at,
        )

    async def create_login(
        self, state: str, provider: str, method: str, data: dict, interval_ms: int, expires_at: int
    ) -> None:
        await self.m.OAuthState.insert(
            state=state,
            provider=provider,
            method=method,
            data_enc=self.vault.seal(json.dumps(data)),
            interval_ms=interval_ms,
            expires_at=expires_at,
            created_at=self.clock.now(),
        ).aio_execute()

    async def get_login(self, state: str, provider: str | None = None) -> LoginRecord | None:
        S = self.m.OAuthState
        where = S.state == state
        if provider is not None:
            where &= S.provider == provider
        row = await S.select().where(where).aio_first()
        return None if row is None else self._login(row)

    async def take_login(self, state: str) -> bool:
        """Delete a login; True only for the one caller that deleted it (single use)."""
        return bool(await self.m.OAuthState.delete().where(self.m.OAuthState.state == state).aio_execute())

    async def finish_login(
        self, state: str, status: str, message: str | None = None, account_id: str | None = None
    ) -> None:
        S = self.m.OAuthState
        await (
            S.update(status=status, message=message, result_account_id=account_id)
            .where(S.state == state)
            .aio_execute()
        )

    # ── usage ──
    async def add_usage(
        self,
        rows: Iterable[Mapping[str, Any]],
        writer: str | None = None,
        batch: int = 0,
        lock_wait: float | None = None,
    ) -> bool:
        """Add bucket rows (USAGE_DIMENSIONS, USAGE_COUNTERS, max_latency_ms, last_request_at)
        to what is stored, in one transaction: counters are summed, the two maxima kept.

        With `writer`, batch number `batch` of that writer is written at most once: the
        transaction also raises the writer's row in usage_flushes to `batch`, and a batch not
        above the stored number is skipped (returns False; True when written). Batches of one
        writer must be committed in increasing order. `lock_wait` (seconds) bounds how long the
        write waits for a lock held by someone else (SQLite busy timeout, PostgreSQL
        lock_timeout) before it fails. Raises `UsageWriteFailed` (with `maybe_committed`) on
        any database error."""
        F = self.m.UsageFlush
        columns = (*USAGE_DIMENSIONS, *USAGE_COUNTERS, "max_latency_ms", "last_request_at")
        per_statement = min(500, 30_000 // len(columns))  # under SQLite's 32766 parameters
        rows = iter(rows)
        committing = False
        try:
            async with self.db.aio_connection():
                if lock_wait is not None and self.is_sqlite:  # per connection; this one is closed after
                    await self.db.aio_execute_sql(f"PRAGMA busy_timeout = {int(lock_wait * 1000)}")
                async with self.db.aio_atomic():
                    if lock_wait is not None and not self.is_sqlite:
                        await self.db.aio_execute_sql(f"SET LOCAL lock_timeout = {int(lock_wait * 1000)}")
                    if writer is not None:
                        now = self.clock.now()
                        # The UPDATE's condition is re-checked after a lock wait on PostgreSQL, so an
                        # earlier attempt of this batch that commits meanwhile makes it match nothing.
                        raised = (
                            await F.update(batch=batch, written_at=now)
                            .where((F.writer == writer) & (F.batch < batch))
                            .aio_execute()
                        )
                        if not raised:
                            if await F.select().where(F.writer == writer).aio_exists():
                                return False  # committed before; its acknowledgement was lost
                            # A concurrent first batch of this writer fails on the key and is retried.
                            await F.insert(writer=writer, batch=batch, written_at=now).aio_execute()
                    while chunk := list(itertools.islice(rows, per_statement)):
                        params = [row.get(name, 0) for row in chunk for name in columns]
                        await self.db.aio_execute_sql(self._usage_upsert(columns, len(chunk)), params)
                    committing = True  # what fails from here on may have committed
        except Exception as exc:
            raise UsageWriteFailed(exc, maybe_committed=committing) from exc
        return True

    def _usage_upsert(self, columns: tuple[str, ...], rows: int) -> str:
        """The additive upsert of `rows` bucket rows, as SQL text (cached). Written by hand:
        peewee's query builder spends ~0.1 ms per value, which at 500 rows x 40 columns held
        the event loop for tens of milliseconds per statement."""
        key = (columns, rows)
        sql = self._upsert_sql.get(key)
        if sql is None:
            table, greatest = "request_usage_buckets", "MAX" if self.is_sqlite else "GREATEST"
            one = "(" + ", ".join([self.db.param] * len(columns)) + ")"
            sets = [f"{n} = {table}.{n} + excluded.{n}" for n in USAGE_COUNTERS]
            maxima = ("max_latency_ms", "last_request_at")
            sets += [f"{n} = {greatest}({table}.{n}, excluded.{n})" for n in maxima]
            sql = self._upsert_sql[key] = (
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * rows)} "
                f"ON CONFLICT ({', '.join(USAGE_DIMENSIONS)}) DO UPDATE SET {', '.join(sets)}"
            )
        return sql

    async def usage_sums(
        self,
        since: int,
        until: int | None = None,
        group_by: tuple[str, ...] = (),
        bucket_size: int | None = None,
        **equal: str,
    ) -> list[dict]:
        """Summed counters (ints; plus the max of max_latency_ms and last_request_at, None when
        no row matched) of the buckets starting in [since, until) (epoch ms; `until` None: no
        end), filtered by `equal` (dimension=value), one dict per group. `group_by` names
        dimensions and may include "count_tokens" (1 for endpoint count_tokens, else 0);
        `bucket_size` (ms) adds the group "bucket" = bucket_start // bucket_size * bucket_size.
        Whole hours are read from request_usage_hourly and only the minutes at the edges from
        request_usage_buckets, unless `bucket_size` is not a multiple of an hour. Raises
        TypeError for an unknown dimension (a programming error, not input)."""
        for name in (*group_by, *equal):
            if name not in USAGE_DIMENSIONS and name != "count_tokens":
                raise TypeError(f"usage_sums: unknown dimension {name}")
        minutes, hours = self.m.UsageBucket, self.m.UsageHourly
        first = -(-since // HOUR_MS) * HOUR_MS  # the first whole hour in the range
        last = None if until is None else until // HOUR_MS * HOUR_MS
        if (bucket_size and bucket_size % HOUR_MS) or (last is not None and first >= last):
            parts = [(minutes, since, until)]
        else:
            parts = [(minutes, since, first), (hours, first, last)]
            if last is not None:
                parts.append((minutes, last, until))
        merged: dict[tuple, dict] = {}
        names = (*group_by, "bucket") if bucket_size else group_by
        for model, lo, hi in parts:
            if hi is not None and lo >= hi:
                continue
            query = self._sums_query(model, lo, hi, group_by, bucket_size, equal)
            for row in await query.dicts().aio_execute():
                key = tuple(row[n] for n in names)
                mine = merged.get(key)
                if mine is None:
                    merged[key] = mine = {n: row[n] for n in names}
                    mine.update(dict.fromkeys(USAGE_COUNTERS, 0), max_latency_ms=None, last_request_at=None)
                for n, value in zip(USAGE_COUNTERS, COUNTERS_OF(row), strict=True):
                    if value:
                        mine[n] += int(value)
                for n in ("max_latency_ms", "last_request_at"):
                    if row[n] is not None:
                        mine[n] = int(row[n]) if mine[n] is None else max(mine[n], int(row[n]))
        if not merged and not names:  # an empty range still has its one (zero) total
            merged[()] = {**dict.fromkeys(USAGE_COUNTERS, 0), "max_latency_ms": None, "last_request_at": None}
        for row in merged.values():
            if "count_tokens" in row:
                row["count_tokens"] = int(row["count_tokens"])
        return list(merged.values())

    def _sums_query(self, model, lo: int, hi: int | None, group_by, bucket_size, equal):
        where = model.bucket_start >= lo
        if hi is not None:
            where &= model.bucket_start < hi
        for name, value in equal.items():
            where &= getattr(model, name) == value
        columns = [
            peewee.Case(None, [(model.endpoint == "count_tokens", 1)], 0).alias(n)
            if n == "count_tokens"
            else getattr(model, n)
            for n in group_by
        ]
        if bucket_size:
            columns.append((model.bucket_start / bucket_size * bucket_size).alias("bucket"))
        query = model.select(
            *columns,
            *[peewee.fn.SUM(getattr(model, n)).alias(n) for n in USAGE_COUNTERS],
            peewee.fn.MAX(model.max_latency_ms).alias("max_latency_ms"),
            peewee.fn.MAX(model.last_request_at).alias("last_request_at"),
        ).where(where)
        if columns:
            # Grouping by position: PostgreSQL refuses a repeated CASE it does not see as equal.
            query = query.group_by(*[peewee.SQL(str(i + 1)) for i in range(len(columns))])
        return query

    async def usage_rows(self, since: int, after: tuple | None = None, limit: int = 5000) -> list[dict]:
        """One page of request_usage_buckets rows (every column, ints) starting at `since` or
        later, in primary-key order, after the row whose USAGE_DIMENSIONS values are `after`
        (keyset paging: each page is one index range read, whatever the table's size)."""
        U = self.m.UsageBucket
        keys = [getattr(U, n) for n in USAGE_DIMENSIONS]
        where = U.bucket_start >= since
        if after is not None:
            where &= peewee.Tuple(*keys) > peewee.Tuple(*after)
        query = U.select().where(where).order_by(*keys).limit(limit)
        return list(await query.dicts().aio_execute())

    async def _install_usage_triggers(self) -> None:
        """(Re)create the triggers that keep request_usage_hourly equal to the hourly sums of
        request_usage_buckets (see schema.sql), generated from the current column list."""
        dims = USAGE_DIMENSIONS[1:]
        hourly = "request_usage_hourly"

        def hour(row: str) -> str:
            return f"{row}.bucket_start / {HOUR_MS} * {HOUR_MS}"

        def match(row: str) -> str:
            return " AND ".join([f"bucket_start = {hour(row)}", *(f"{d} = {row}.{d}" for d in dims)])

        greatest = "MAX" if self.is_sqlite else "GREATEST"
        maxima = ("max_latency_ms", "last_request_at")
        columns = ", ".join(("bucket_start", *dims, *USAGE_COUNTERS, *maxima))
        values = ", ".join((hour("NEW"), *(f"NEW.{n}" for n in (*dims, *USAGE_COUNTERS, *maxima))))
        sets = ", ".join(
            [
                *(f"{n} = {hourly}.{n} + excluded.{n}" for n in USAGE_COUNTERS),
                *(f"{n} = {greatest}({hourly}.{n}, excluded.{n})" for n in maxima),
            ]
        )
        add_new = (
            f"INSERT INTO {hourly} ({columns}) VALUES ({values}) "
            f"ON CONFLICT (bucket_start, {', '.join(dims)}) DO UPDATE SET {sets}"
        )
        minus = ", ".join(f"{n} = {n} - OLD.{n}" for n in USAGE_COUNTERS)
        take_old = f"UPDATE {hourly} SET {minus} WHERE {match('OLD')}"
        drop_empty = f"DELETE FROM {hourly} WHERE {match('OLD')} AND request_count <= 0"
        if self.is_sqlite:
            statements = [
                *(f"DROP TRIGGER IF EXISTS {hourly}_{op}" for op in ("insert", "update", "delete")),
                f"CREATE TRIGGER {hourly}_insert AFTER INSERT ON request_usage_buckets BEGIN {add_new}; END",
                f"CREATE TRIGGER {hourly}_update AFTER UPDATE ON request_usage_buckets "
                f"BEGIN {take_old}; {add_new}; END",
                f"CREATE TRIGGER {hourly}_delete AFTER DELETE ON request_usage_buckets "
                f"BEGIN {take_old}; {drop_empty}; END",
            ]
        else:
            statements = [
                "SELECT pg_advisory_xact_lock(727001)",  # instances starting together take turns
                f"CREATE OR REPLACE FUNCTION {hourly}_apply() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                f"IF TG_OP <> 'INSERT' THEN {take_old}; END IF; "
                f"IF TG_OP = 'DELETE' THEN {drop_empty}; ELSE {add_new}; END IF; "
                "RETURN NULL; END $$",
                f"CREATE OR REPLACE TRIGGER {hourly}_apply AFTER INSERT OR UPDATE OR DELETE "
                f"ON request_usage_buckets FOR EACH ROW EXECUTE FUNCTION {hourly}_apply()",
            ]
        async with self.db.aio_atomic():
            for statement in statements:
                await self.db.aio_execute_sql(statement)

    async def rows(self, table: str, **equal: Any) -> list[dict]:
        """Every row of `table` as stored, columns by name, filtered by `equal`
        (column=value): what an operator would see with SQL (tests, diagnostics)."""
        model = next(m for m in self.m.all if m._meta.table_name == table)
        query = model.select()
        for column, value in equal.items():
            query = query.where(getattr(model, column) == value)
        return list(await query.dicts().aio_execute())

    async def purge(
        self, usage_before: int | None, logins_before: int, writers_before: int | None = None
    ) -> dict[str, int]:
        """Drop usage buckets that started before `usage_before` (None: keep them), logins
        that expired before `logins_before` and usage writers (usage_flushes) idle since
        before `writers_before` (None: keep). Returns the rows deleted per table.

        Buckets go one hour of them per statement, oldest first: a first purge of months of
        rows never holds the write lock long enough to make a usage flush wait."""
        U, S, F = self.m.UsageBucket, self.m.OAuthState, self.m.UsageFlush
        deleted = {"request_usage_buckets": 0, "oauth_states": 0, "usage_flushes": 0}
        while usage_before is not None:
            first = U.select(peewee.fn.MIN(U.bucket_start)).where(U.bucket_start < usage_before)
            oldest = await first.aio_scalar()
            if oldest is None:
                break
            upto = U.bucket_start < min(usage_before, oldest + 3_600_000)  # an hour per statement
            deleted["request_usage_buckets"] += await U.delete().where(upto).aio_execute()
        deleted["oauth_states"] = await S.delete().where(S.expires_at < logins_before).aio_execute()
        if writers_before is not None:
            deleted["usage_flushes"] = await F.delete().where(F.written_at < writers_before).aio_execute()
        return deleted
