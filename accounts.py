"""Kleis provider accounts: the pool in memory (selection, stickiness, cooldowns, refresh),
every change to an account, logins and imports.

All accounts live in memory with their tokens opened, so choosing one makes no database
round trip. Selection, stickiness and cooldowns are decided in memory; cooldowns are written
through to the database in the background (a reload never drops one whose write is still
on its way). A refresh runs once per account at a time: an asyncio lock in the process, a
lease in the database across instances. Logins and imports are one implementation used by
the admin API, the CLI and the config's `[[accounts]]` alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from errors import (
    AccountGone,
    AccountNeedsReauth,
    AccountsCoolingDown,
    AccountScopeMissing,
    AccountsUnavailable,
    BadRequest,
    LoginExpired,
    LoginUsed,
    NoAccount,
    NotFound,
    RefreshFailed,
)
from providers import (
    Account,
    Cooldown,
    LoadedProvider,
    Login,
    LoginFailed,
    LoginPending,
    ProviderError,
    ReauthRequired,
    Tokens,
    epoch_ms,
    token_fingerprint,
)
from runtime import Background, Clock
from settings import AccountImport, new_id
from store import AccountRecord, KeyRecord, Store
from validate import future_ms, opt_int, opt_str

log = logging.getLogger("kleis")

REFRESH_SKEW_MS = 60_000  # request path: refresh when the token expires within a minute
BACKGROUND_SKEW_MS = 300_000  # background refresher: within five minutes
# A refresh lease is short and renewed while its refresh runs, so an instance that dies
# mid-refresh frees the account within LEASE_MS; the others wait for it rather than fail.
LEASE_MS = 10_000
LEASE_RENEW_S = 3.0
LEASE_WAIT_S = 30.0  # how long a request waits for another instance's refresh (> LEASE_MS)
LEASE_POLL_S = 0.2
COOLDOWN_MIN, COOLDOWN_MAX, COOLDOWN_DEFAULT = 1.0, 6 * 3600.0, 60.0
ERROR_COOLDOWN = 10.0  # 5xx / unreachable without a hint: short, it is not a rate limit
ERROR_STREAK = 3  # consecutive 5xx / unreachable answers before an account is benched ...
STREAK_GAP_MS = 60_000  # ... each within this long of the one before (older ones are forgotten)
STICKY_TTL_MS = 3600_000
STICKY_MAX = 20_000  # entries; each ~300 bytes (the session is kept as a 16-byte digest)
STICKY_RETELL_MS = 600_000  # a binding still in use is told to the other instances again
QUOTA_TTL_MS = 60_000


def session_digest(session: str) -> bytes:
    """The fixed-size name (16 bytes) under which a client's session id is remembered: the id
    is the client's choice and may be a megabyte long."""
    return hashlib.blake2b(session.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class RefreshElsewhere(ProviderError):
    """Another instance held the account's refresh lease for all of `LEASE_WAIT_S`: not an
    upstream failure, so the account is neither rested nor counted as failing."""


class AccountState(AccountRecord):
    """One account as cached in memory (a store record plus what the pool asks of it)."""

    def adapter_view(self) -> Account:
        return Account(
            id=self.id,
            label=self.label,
            account_id=self.account_id,
            access_token=self.access_token,
            refresh_token=self.refresh_token,
            expires_at=self.expires_at,
            metadata=self.metadata,
        )

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


def state_of(record: AccountRecord) -> AccountState:
    return AccountState(**vars(record))


def account_order(a: AccountState) -> tuple:
    """Primary first, then lower priority number, then newest."""
    return (not a.is_primary, a.priority, -a.created_at)


# ══ Cooldowns ═══════════════════════════════════════════════════════════════


def bounded_cooldown(seconds: float | None) -> float:
    if seconds is None or seconds != seconds:  # None or NaN
        return COOLDOWN_DEFAULT
    return min(max(float(seconds), COOLDOWN_MIN), COOLDOWN_MAX)


def header_cooldown(headers: Mapping[str, str], now: int) -> float | None:
    """Seconds to rest from standard rate-limit headers (lower-case names): `Retry-After`
    (seconds or an HTTP date, RFC 9110 §10.2.3), else the first `x-ratelimit-reset*`."""
    value = headers.get("retry-after")
    if value:
        value = value.strip()
        if value.replace(".", "", 1).isdigit():
            return float(value)
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


def provider_hint(
    provider: LoadedProvider, status: int, headers: Mapping[str, str], body: bytes, now: int
) -> Cooldown | None:
    """The adapter's own reading of its reset hints (`retry_after`), or None."""
    if not provider.has("retry_after"):
        return None
    try:
        return provider.module.retry_after(status, headers, body, now=lambda: now / 1000)
    except Exception:
        log.exception("%s retry_after failed", provider.name)
        return None


def upstream_cooldown(
    provider: LoadedProvider, status: int, headers: Mapping[str, str], body: bytes, now: int
) -> Cooldown | None:
    """How long to rest an account after the upstream refused with `status`, or None when
    the refusal says nothing about the account.

    - 429: the adapter's reading of its reset hints (only the windows the upstream itself
      marks exhausted), else `Retry-After` / `x-ratelimit-reset*`, else 60 s.
    - 5xx and 529 (overloaded): a state of the upstream, not of the account, unless the
      adapter finds a usage-window hint in it. None: the caller fails over for this request
      and benches the account only after `ERROR_STREAK` such answers in a row
      (`AccountPool.failed`)."""
    hint = provider_hint(provider, status, headers, body, now)
    if hint is not None and (status == 429 or hint.window_exhausted):
        return hint
    if status != 429:
        return None
    seconds = header_cooldown({k.lower(): v for k, v in headers.items()}, now)
    return Cooldown(COOLDOWN_DEFAULT if seconds is None else seconds, window_exhausted=False)


# ══ Refresh failures explained ══════════════════════════════════════════════


def _first_line(exc: BaseException) -> str:
    """An exception as `Class: first line` (a database error's text can run many lines)."""
    line = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def reauth_message(account: AccountState, exc: ReauthRequired) -> str:
    """What an account that needs a new login shows as its last error. A refresh token that
    was already used means another client holds the same login (an imported one, typically
    the official client it came from): say so and what to do, not only the OAuth code."""
    imported = account.metadata.get("origin") == "import"
    if exc.code != "refresh_token_reused" and not (imported and exc.code == "invalid_grant"):
        return str(exc)
    return (
        f"{account.provider} rejected the refresh token ({exc.code}): another client used this login's "
        "single-use refresh token first (the official client it was imported from, most likely). Kleis "
        "and that client cannot share one login: log in again with `python kleis.py accounts login "
        f"{account.provider}` to give Kleis its own, or import the client's current auth file again"
    )


def import_warning(provider: LoadedProvider) -> str | None:
    """The warning shown when importing a login of a provider whose refresh tokens are single
    use (adapter constant REFRESH_ROTATES): Kleis and the client it came from share the login."""
    if not getattr(provider.module, "REFRESH_ROTATES", False):
        return None
    return (
        f"this {provider.name} login is shared with the client it was imported from, and its refresh "
        "token works once: when Kleis or that client refreshes, the other's copy stops working (the "
        "account then needs a new login). For a login of Kleis's own use `python kleis.py accounts "
        f"login {provider.name}`"
    )


# ══ The pool ════════════════════════════════════════════════════════════════


class AccountPool:
    """Accounts in memory: selection, stickiness, cooldowns, refresh, and every write."""

    def __init__(
        self, store: Store, providers: Mapping[str, LoadedProvider], clock: Clock, background: Background
    ):
        self.store = store
        self.providers = providers
        self.clock = clock
        self.background = background
        self.accounts: dict[str, AccountState] = {}
        self.by_provider: dict[str, list[AccountState]] = {}
        # (key id, provider, session digest) -> (account id, last use ms, last told ms)
        self.sticky: OrderedDict[tuple, tuple[str, int, int]] = OrderedDict()
        self._untold: list[str] = []  # bindings not yet told to the other instances
        self.shares_sessions = not store.is_sqlite  # only PostgreSQL has other instances to tell
        self.refresh_outcomes: dict[str, int] = {"success": 0, "failed": 0, "reauth": 0}
        self._locks: dict[str, asyncio.Lock] = {}
        self._cooldown_writes: dict[str, tuple[asyncio.Task, tuple]] = {}
        self._quotas: dict[str, tuple[int, dict]] = {}
        self.streaks: dict[str, tuple[int, int]] = {}  # account id -> (failures in a row, last at ms)
        # account id -> (refreshed account the database refused, the refresh token it replaced)
        self._unsaved: dict[str, tuple[AccountState, str]] = {}

    # ── cache ──
    async def load(self) -> None:
        """Reload every account from the database. A cooldown set here whose write has not
        landed yet is kept (the database would not know it)."""
        accounts = {r.id: state_of(r) for r in await self.store.list_accounts()}
        for account_id, (task, (until, kind, error)) in self._cooldown_writes.items():
            account = accounts.get(account_id)
            if account is not None and not task.done() and (account.cooldown_until or 0) < until:
                account.cooldown_until, account.cooldown_kind, account.last_error = until, kind, error
        for account_id, (kept, replaced) in self._unsaved.items():
            stored = accounts.get(account_id)
            if stored is not None and stored.refresh_token == replaced:  # the database is still stale
                accounts[account_id] = kept
        self._install(accounts)

    def _install(self, accounts: dict[str, AccountState]) -> None:
        by_provider: dict[str, list[AccountState]] = {}
        for account in accounts.values():
            by_provider.setdefault(account.provider, []).append(account)
        for items in by_provider.values():
            items.sort(key=account_order)
        self.accounts, self.by_provider = accounts, by_provider

    def _merge(self, account: AccountState) -> None:
        """Replace one account in the cache, keeping the per-provider order."""
        self._install({**self.accounts, account.id: account})

    async def changed(self) -> None:
        """After a write: tell the other instances, reload here at once."""
        await self.store.bump_version("accounts")
        await self.load()

    def configured(self) -> set[str]:
        """Providers that have at least one enabled account (discovery lists only those)."""
        return {
            p
            for p, items in self.by_provider.items()
            if p in self.providers and any(a.enabled for a in items)
        }

    def get(self, account_id: str) -> AccountState:
        account = self.accounts.get(account_id)
        if account is None:
            raise NotFound("account not found")
        return account

    def listed(self) -> list[AccountState]:
        """Every account of a loaded provider, by provider then selection order."""
        return [a for p in self.providers for a in self.by_provider.get(p, [])]

    def provider_of(self) -> dict[str, str]:
        """Account id -> provider, for key scope checks."""
        return {a.id: a.provider for a in self.accounts.values()}

    def provider_status(self) -> list[dict]:
        result = []
        for name in self.providers:
            items = self.by_provider.get(name, [])
            enabled = sum(1 for a in items if a.enabled)
            result.append(
                {
                    "provider": name,
                    "enabled": enabled > 0,
                    "accountCount": len(items),
                    "enabledAccountCount": enabled,
                }
            )
        return result

    # ── selection ──
    def eligible(self, provider: str, key: KeyRecord) -> list[AccountState]:
        accounts = self.by_provider.get(provider, [])
        if key.account_scopes is not None:
            scoped = set(key.account_scopes)
            accounts = [a for a in accounts if a.id in scoped]
            if not accounts:
                raise AccountScopeMissing(
                    f"this API key is limited to accounts that do not include any {provider} account"
                )
        enabled = [a for a in accounts if a.enabled]
        if not enabled and accounts:
            raise NoAccount(
                f"every {provider} account is disabled in Kleis; enable one on the admin page "
                f'(PATCH /admin/accounts/<id> {{"enabled": true}})'
            )
        if not enabled:
            raise NoAccount(
                f"no {provider} account is configured in Kleis; add one on the admin page or with "
                f"`python kleis.py accounts login {provider}`"
            )
        return enabled

    def choose(self, provider: str, key: KeyRecord, session: str | None) -> list[AccountState]:
        """Accounts to try in order: the session's account first while healthy, then by order
        (primary, priority, newest); cooling and re-auth accounts are left out. Raises a
        NoAccount condition when nothing is usable."""
        now = self.clock.now()
        enabled = self.eligible(provider, key)
        usable = [a for a in enabled if a.status != "needs_reauth" and not a.cooling(now)]
        if not usable:
            cooling = [a for a in enabled if a.cooling(now)]
            if cooling:
                seconds = max(1, -(-(min(a.cooldown_until for a in cooling) - now) // 1000))
                if any(a.cooldown_kind != "error" for a in cooling):
                    raise AccountsCoolingDown(
                        f"every {provider} account is rate limited; retry in {seconds} s", seconds
                    )
                # Not a rate limit: the provider failed or was unreachable a moment ago.
                last = max(cooling, key=lambda a: a.cooldown_until).last_error or "an upstream error"
                raise AccountsUnavailable(
                    f"every {provider} account failed a moment ago ({last}); retry in {seconds} s", seconds
                )
            labels = ", ".join(a.label or a.id for a in enabled)
            shared = next((a.last_error for a in enabled if "another client" in (a.last_error or "")), None)
            if shared:  # a login shared with its official client: say so (reauth_message)
                raise AccountNeedsReauth(f"the {provider} account(s) {labels} need a new login: {shared}")
            raise AccountNeedsReauth(
                f"the {provider} account(s) {labels} need a new login: their refresh token was rejected; "
                f"log in again on the admin page or with `python kleis.py accounts login {provider}`"
            )
        if session:
            sticky = self.sticky.get((key.id, provider, session_digest(session)))
            if sticky and now - sticky[1] < STICKY_TTL_MS:
                for i, account in enumerate(usable):
                    if account.id == sticky[0]:
                        if i:
                            usable.insert(0, usable.pop(i))
                        break
        return usable

    def stick(self, provider: str, key: KeyRecord, session: str | None, account: AccountState) -> None:
        """Remember which account served a session, and tell the other instances (in the
        background, batched) when the binding is new, moved, or was last told 10 min ago, so
        the session's next turn reaches the same account whichever instance serves it
        (Codex's encrypted reasoning and every provider's prompt cache are per account)."""
        if not session:
            return
        entry = (key.id, provider, session_digest(session))
        now = self.clock.now()
        old = self.sticky.get(entry)
        told = old[2] if old is not None and old[0] == account.id else 0
        if now - told > STICKY_RETELL_MS and self.shares_sessions:
            told = now
            self._untold.append(f"{key.id} {provider} {entry[2].hex()} {account.id}")
            if len(self._untold) == 1:
                self.background.start("tell-sessions", self._tell_sessions(), report=False)
        self._bind(entry, account.id, now, told)

    def _bind(self, entry: tuple, account_id: str, now: int, told: int) -> None:
        self.sticky[entry] = (account_id, now, told)
        self.sticky.move_to_end(entry)
        while len(self.sticky) > STICKY_MAX:
            self.sticky.popitem(last=False)

    async def _tell_sessions(self) -> None:
        await asyncio.sleep(0)  # let the bindings of this loop turn join the batch
        lines, self._untold = self._untold, []
        try:
            await self.store.tell_sessions(lines)
        except Exception as exc:  # the other instances fall back to the account order
            log.info("could not share %d session bindings: %s", len(lines), _first_line(exc))

    def heard_sessions(self, payload: str) -> None:
        """Bindings another instance told (`Store.tell_sessions` lines): remembered here too."""
        now = self.clock.now()
        for line in payload.splitlines():
            parts = line.split(" ")
            if len(parts) != 4 or len(parts[2]) != 32:
                continue
            key_id, provider, digest, account_id = parts
            with contextlib.suppress(ValueError):
                self._bind((key_id, provider, bytes.fromhex(digest)), account_id, now, now)

    # ── cooldowns ──
    def failed(self, account: AccountState, reason: str) -> None:
        """One 5xx, timeout or connection failure: the request fails over, and the account
        is benched for `ERROR_COOLDOWN` only when `ERROR_STREAK` came in a row, each within
        `STREAK_GAP_MS` of the one before (one passing overload must not make every other
        request a local 503). A normal answer or a cleared cooldown ends the streak."""
        now = self.clock.now()
        count, last = self.streaks.get(account.id, (0, now))
        streak = count + 1 if now - last <= STREAK_GAP_MS else 1
        if streak >= ERROR_STREAK:
            self.streaks.pop(account.id, None)
            self.cool_down(account, Cooldown(ERROR_COOLDOWN), f"{reason} ({streak} times in a row)", "error")
        else:
            self.streaks[account.id] = (streak, now)
            log.info("%s account %s: %s", account.provider, account.label or account.id, reason[:200])

    def answered(self, account: AccountState) -> None:
        """The upstream answered this account normally: its failure streak ends."""
        if self.streaks:
            self.streaks.pop(account.id, None)

    def cool_down(
        self, account: AccountState, cooldown: Cooldown, reason: str, kind: str | None = None
    ) -> None:
        """Rest an account after a 429/5xx/connection failure: in memory now, in the database
        in the background.

        `kind`: "window" (a usage window is exhausted), "transient" (a short rate limit) or
        "error" (5xx, unreachable, refresh failed: not a rate limit)."""
        account = self.accounts.get(account.id, account)  # a refresh may have replaced the caller's copy
        seconds = bounded_cooldown(cooldown.seconds)
        account.cooldown_until = self.clock.now() + int(seconds * 1000)
        account.cooldown_kind = "window" if cooldown.window_exhausted else (kind or "transient")
        account.last_error = reason[:500]
        log.warning(
            "%s account %s cooling down %.0f s (%s): %s",
            account.provider,
            account.label or account.id,
            seconds,
            account.cooldown_kind,
            reason[:200],
        )
        values = (account.cooldown_until, account.cooldown_kind, account.last_error)
        previous = self._cooldown_writes.get(account.id)
        write = self._save_cooldown(account.id, *values, after=previous[0] if previous else None)
        task = self.background.start(f"cooldown-{account.id}", write)
        self._cooldown_writes[account.id] = (task, values)
        task.add_done_callback(
            lambda t, i=account.id: (
                self._cooldown_writes.get(i, (None,))[0] is t and self._cooldown_writes.pop(i)
            )
        )

    async def _save_cooldown(
        self, account_id: str, until: int, kind: str, error: str, after: asyncio.Task | None
    ) -> None:
        if after is not None:  # keep one account's writes in order
            with contextlib.suppress(Exception):
                await asyncio.shield(after)
        try:
            await self.store.update_account(
                account_id, cooldown_until=until, cooldown_kind=kind, last_error=error
            )
            await self.store.bump_version("accounts")  # every instance rests it too
        except Exception as exc:  # a lost cooldown only costs one more failed try
            log.warning("could not save cooldown of account %s: %s", account_id, exc)

    async def _settled(self, account_id: str) -> None:
        """Wait until this account's cooldown writes have landed (before a write that must win)."""
        pending = self._cooldown_writes.get(account_id)
        if pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(pending[0])

    async def refresh_now(self, account_id: str) -> AccountState:
        """Refresh an account's tokens at once (admin API and CLI). Raises BadRequest when its
        provider is not enabled, AccountNeedsReauth (403) when the refresh token was rejected,
        RefreshFailed (502) for any other provider failure."""
        account = self.get(account_id)
        if account.provider not in self.providers:
            raise BadRequest(f"provider {account.provider} is not enabled in the config")
        try:
            return await self.fresh(account, force=True)
        except ReauthRequired as exc:
            raise AccountNeedsReauth(str(exc)) from None
        except ProviderError as exc:
            raise RefreshFailed(str(exc)) from None

    async def clear_cooldown(self, account_id: str) -> AccountState:
        self.get(account_id)
        self.streaks.pop(account_id, None)  # a cleared account starts from a clean slate
        await self._settled(account_id)
        return await self.update(account_id, cooldown_until=None, cooldown_kind=None)

    # ── refresh ──
    async def fresh(
        self,
        account: AccountState,
        *,
        force: bool = False,
        seen_token: str | None = None,
        skew: int = REFRESH_SKEW_MS,
    ) -> AccountState:
        """The account with a token valid for at least `skew` ms (refreshing if needed).

        `force` refreshes regardless of expiry unless the token changed since `seen_token`
        (someone refreshed while we waited). Raises ReauthRequired or ProviderError."""
        lock = self._locks.setdefault(account.id, asyncio.Lock())
        async with lock:
            current = self.accounts.get(account.id, account)
            if self._fresh_enough(current, force, seen_token, skew):
                return current
            if (
                not force
                and current.access_token != account.access_token
                and current.expires_at > self.clock.now()
            ):
                return current  # refreshed while we waited for the lock: one refresh serves every waiter
            # A client that goes away must not cancel a refresh half-way: the provider may have
            # rotated the refresh token already, and the database lease would stay taken.
            task = self.background.start(
                f"refresh-{account.id}",
                self._refresh_with_lease(current, force, seen_token, skew),
                report=False,
            )
            return await asyncio.shield(task)

    def _fresh_enough(self, account: AccountState, force: bool, seen_token: str | None, skew: int) -> bool:
        if force:
            return seen_token is not None and account.access_token != seen_token
        return account.expires_at - self.clock.now() > skew

    async def _reread(self, account_id: str) -> AccountState:
        record = await self.store.get_account(account_id)
        if record is None:
            raise AccountGone()
        latest = state_of(record)
        self._merge(latest)
        return latest

    async def _refresh_with_lease(
        self, account: AccountState, force: bool, seen_token: str | None, skew: int
    ) -> AccountState:
        provider = self.providers[account.provider]
        lease = new_id()
        deadline = self.clock.monotonic() + LEASE_WAIT_S
        while True:
            try:
                got = await self.store.take_refresh_lease(account.id, lease, LEASE_MS)
            except Exception as exc:  # a refresh that cannot be recorded would be lost: none now
                log.error(
                    "%s account %s: cannot refresh its token: the database refuses writes (%s)",
                    account.provider, account.label, _first_line(exc),
                )  # fmt: skip
                raise ProviderError(
                    f"{account.provider} account {account.label}: the token cannot be refreshed "
                    "because Kleis's database refuses writes"
                ) from None
            latest = await self._reread(account.id)
            now = self.clock.now()
            if self._fresh_enough(latest, force, seen_token, skew) or (
                not force and latest.access_token != account.access_token and latest.expires_at > now
            ):
                if got:
                    await self.store.release_refresh_lease(account.id, lease)
                return latest  # another instance refreshed it meanwhile
            if got:
                break
            if self.clock.monotonic() > deadline:
                raise RefreshElsewhere(
                    f"{account.provider} account {account.label}: another Kleis instance has been "
                    f"refreshing its token for {LEASE_WAIT_S:g} s"
                )
            # Another instance holds the lease: it commits the new tokens (we re-read them), or
            # dies and its unrenewed lease lapses within LEASE_MS (we take over).
            await asyncio.sleep(LEASE_POLL_S)
        renewing = asyncio.create_task(self._keep_lease(latest, lease), name=f"lease-{latest.id}")
        try:
            return await self._refresh_holding(provider, latest, lease)
        finally:
            renewing.cancel()

    async def _keep_lease(self, account: AccountState, lease: str) -> None:
        """Renew the refresh lease every LEASE_RENEW_S while the refresh runs; a failed renewal
        is retried (the lease may still lapse, and then `save_refreshed` decides)."""
        while True:
            await asyncio.sleep(LEASE_RENEW_S)
            try:
                if not await self.store.renew_refresh_lease(account.id, lease, LEASE_MS):
                    log.warning("%s account %s: refresh lease lost", account.provider, account.label)
                    return
            except Exception as exc:
                log.warning(
                    "%s account %s: cannot renew the refresh lease (%s)",
                    account.provider, account.label, _first_line(exc),
                )  # fmt: skip

    async def _refresh_holding(
        self, provider: LoadedProvider, latest: AccountState, lease: str
    ) -> AccountState:
        """The refresh itself, under the lease: call the provider, commit, then use."""
        try:
            tokens = await provider.module.refresh(provider.ctx, latest.adapter_view())
            stale_refresh = latest.refresh_token
        except ReauthRequired as exc:
            stored = await self.store.get_account(latest.id)
            if stored is not None and stored.refresh_token != latest.refresh_token:
                # Someone else (another instance, the CLI, an import) rotated it meanwhile.
                await self.store.release_refresh_lease(latest.id, lease)
                rotated = state_of(stored)
                self._merge(rotated)
                return rotated
            self.refresh_outcomes["reauth"] += 1
            explained = reauth_message(latest, exc)
            await self._refresh_failed(latest, lease, explained, reauth=True)
            if explained == str(exc):
                raise
            raise ReauthRequired(explained, exc.code) from None
        except ProviderError as exc:
            self.refresh_outcomes["failed"] += 1
            await self._refresh_failed(latest, lease, str(exc), reauth=False)
            raise
        except Exception as exc:
            self.refresh_outcomes["failed"] += 1
            await self._refresh_failed(latest, lease, f"refresh failed: {type(exc).__name__}", reauth=False)
            raise ProviderError(f"{latest.provider} refresh failed: {type(exc).__name__}") from None
        if not tokens.access_token or not tokens.refresh_token or tokens.expires_at <= self.clock.now():
            await self._refresh_failed(latest, lease, "refresh returned unusable tokens", reauth=False)
            raise ProviderError(f"{latest.provider} refresh returned unusable tokens")
        metadata = {**latest.metadata, **tokens.metadata}
        unsaved = None
        try:
            written = await self.store.save_refreshed(
                latest.id,
                lease,
                tokens.access_token,
                tokens.refresh_token,
                tokens.expires_at,
                metadata,
                replaced=stale_refresh,
            )
        except Exception as exc:
            written, unsaved = True, self._not_saved(latest, tokens, exc)
        if not written:  # someone else rotated the token meanwhile: theirs is the stored one
            log.warning(
                "%s account %s: another instance rotated the token meanwhile; using the stored one",
                latest.provider, latest.label,
            )  # fmt: skip
            return await self._reread(latest.id)
        latest.access_token, latest.refresh_token, latest.expires_at = (
            tokens.access_token,
            tokens.refresh_token,
            tokens.expires_at,
        )
        latest.metadata, latest.status, latest.last_refresh_at = metadata, "ok", self.clock.now()
        latest.last_refresh_status, latest.last_error = "success", None
        if unsaved is not None:
            latest.last_refresh_status, latest.last_error = "not_saved", unsaved
            self._unsaved[latest.id] = (latest, stale_refresh)
        else:
            self._unsaved.pop(latest.id, None)
        self._merge(latest)
        self.refresh_outcomes["success"] += 1
        with contextlib.suppress(Exception):  # other instances re-read it; a failure was logged above
            await self.store.bump_version("accounts")
        return latest

    def _not_saved(self, account: AccountState, tokens: Tokens, exc: Exception) -> str:
        """The database refused refreshed tokens: they are kept in memory (this server goes on
        using them) and the operator is told, at error level, what a restart would lose.
        Returns the account's `last_error`."""
        rotated = tokens.refresh_token != account.refresh_token
        lost = (
            "its refresh token was rotated, so if Kleis restarts before the database takes writes "
            "again the account needs a new login"
            if rotated
            else "nothing is lost: the stored refresh token stays valid"
        )
        message = (f"refreshed tokens could not be saved ({_first_line(exc)}); kept in memory only: {lost}")[
            :500
        ]
        log.error(
            "%s account %s: the database refused its refreshed tokens (%s); %s. Fix the database "
            "(GET /readyz tells when it takes writes again)",
            account.provider, account.label, _first_line(exc), lost,
        )  # fmt: skip
        return message

    async def _refresh_failed(self, account: AccountState, lease: str, message: str, reauth: bool) -> None:
        message = message[:500]
        await self.store.save_refresh_failure(account.id, lease, message, needs_reauth=reauth)
        account.last_refresh_at, account.last_refresh_status, account.last_error = (
            self.clock.now(),
            "failed",
            message,
        )
        if reauth:
            account.status = "needs_reauth"
            log.warning("%s account %s needs a new login: %s", account.provider, account.label, message)
        self._merge(account)
        await self.store.bump_version("accounts")

    async def refresh_due(self) -> None:
        """Background: refresh every enabled account expiring within five minutes."""
        for account in list(self.accounts.values()):
            if (
                not account.enabled
                or account.status == "needs_reauth"
                or account.provider not in self.providers
            ):
                continue
            if account.expires_at - self.clock.now() > BACKGROUND_SKEW_MS:
                continue
            try:
                await self.fresh(account, skew=BACKGROUND_SKEW_MS)
            except (ProviderError, NoAccount) as exc:
                log.warning(
                    "background refresh of %s account %s failed: %s", account.provider, account.label, exc
                )
            except Exception:
                log.exception("background refresh of %s account %s crashed", account.provider, account.label)

    async def quota(self, account: AccountState) -> dict | None:
        """The provider's quota view of an account (cached a minute); None when the provider
        has none. `{"fetchedAt", "error", "data"}`; a failure is reported in `error`."""
        provider = self.providers.get(account.provider)
        if provider is None or not provider.has("quota"):
            return None
        cached = self._quotas.get(account.id)
        if cached and self.clock.now() - cached[0] < QUOTA_TTL_MS:
            return cached[1]
        try:
            fresh = await self.fresh(account)
            data = await provider.module.quota(provider.ctx, fresh.adapter_view())
            result = {"fetchedAt": self.clock.now(), "error": None, "data": data}
        except Exception as exc:
            error = str(exc) if isinstance(exc, ProviderError) else type(exc).__name__
            result = {"fetchedAt": None, "error": error, "data": None}
        self._quotas[account.id] = (self.clock.now(), result)
        return result

    # ── writes ──
    async def upsert(
        self,
        provider: str,
        tokens: Tokens,
        *,
        label: str | None = None,
        priority: int | None = None,
        origin: str = "login",
    ) -> AccountState:
        """Insert an account or update the one with the same provider-side identity (never a
        duplicate). An edited label survives a re-login; new tokens clear needs_reauth.
        `origin` ("login" or "import") is kept in the metadata: it explains a later
        `refresh_token_reused`. An account stored under its refresh token's fingerprint (an
        import before the provider's user id was known) is found and takes the real id."""
        existing = await self.store.find_account(provider, tokens.account_id) if tokens.account_id else None
        fingerprint = token_fingerprint(tokens.refresh_token)
        if existing is None and tokens.account_id != fingerprint:
            existing = await self.store.find_account(provider, fingerprint)
        metadata = {**tokens.metadata, "origin": origin}
        if existing is not None:
            await self.store.replace_login(
                existing.id,
                tokens.access_token,
                tokens.refresh_token,
                tokens.expires_at,
                {**existing.metadata, **metadata},
                label=label,
                priority=priority,
                provider_account_id=tokens.account_id,
            )
            account_id = existing.id
        else:
            account_id = new_id()
            await self.store.insert_account(
                account_id,
                provider,
                label or tokens.label or f"{provider}-account",
                tokens.account_id,
                tokens.access_token,
                tokens.refresh_token,
                tokens.expires_at,
                metadata,
                priority or 0,
            )
        await self.changed()
        return self.accounts[account_id]

    async def update(self, account_id: str, **fields: Any) -> AccountState:
        """Change stored fields (see Store.update_account) and reload."""
        self.get(account_id)
        await self.store.update_account(account_id, **fields)
        await self.changed()
        return self.get(account_id)

    async def set_primary(self, account_id: str) -> AccountState:
        account = self.get(account_id)
        await self.store.set_primary(account.provider, account_id)
        await self.changed()
        return self.get(account_id)

    async def delete(self, account_id: str) -> None:
        account = self.get(account_id)
        successor = None
        if account.is_primary:
            rest = sorted(
                (a for a in self.by_provider.get(account.provider, []) if a.id != account_id),
                key=lambda a: (not a.enabled, a.priority, -a.created_at),
            )
            successor = rest[0].id if rest else None
        await self.store.delete_account(account_id, successor)
        await self.changed()

    async def set_provider_enabled(self, provider: str, enabled: bool) -> dict:
        await self.store.set_provider_enabled(provider, enabled)
        await self.changed()
        return next(s for s in self.provider_status() if s["provider"] == provider)


# ══ Logins ══════════════════════════════════════════════════════════════════


@dataclass(frozen=True)
class LoginStatus:
    """Where a login stands: "pending", "complete" (with the account) or "failed"."""

    state: str
    provider: str
    method: str
    status: str
    message: str | None
    account: AccountState | None = None

    def view(self, now: int) -> dict:
        body: dict[str, Any] = {
            "state": self.state,
            "provider": self.provider,
            "method": self.method,
            "status": self.status,
            "message": self.message,
        }
        if self.account is not None:
            body["account"] = self.account.view(now)
        return body


class Logins:
    """OAuth logins: a code flow (the user pastes a code or callback URL) or a device flow
    (Kleis polls the provider in the background until the user approves). The state and the
    adapter's login data are kept encrypted in the database, so any instance can finish it."""

    RECHECK_S = 2.0  # how often a waiter reads a device login's state (another instance's poller)

    def __init__(self, store: Store, pool: AccountPool, clock: Clock, background: Background):
        self.store, self.pool, self.clock, self.background = store, pool, clock, background
        self._finished: dict[str, asyncio.Event] = {}  # state -> set when this instance's poller ends

    async def start(self, provider: LoadedProvider, options: dict) -> dict:
        """Start a login; returns its view (`state`, `method`, `authorizationUrl`,
        `instructions`, `userCode`, `interval`, `expiresAt`)."""
        state = secrets.token_urlsafe(32)
        login: Login = await provider.module.start_login(provider.ctx, state, options)
        expires_at = self.clock.now() + int(login.expires_in * 1000)
        await self.store.create_login(
            state, provider.name, login.method, login.data, int(login.interval * 1000), expires_at
        )
        if login.method == "device":
            self._finished[state] = asyncio.Event()
            self.background.start(
                f"login-{provider.name}", self._poll_device(provider, state), wait_on_stop=False
            )
        return {
            "state": state,
            "provider": provider.name,
            "method": login.method,
            "authorizationUrl": login.url,
            "instructions": login.instructions,
            "userCode": login.user_code,
            "interval": login.interval,
            "expiresAt": expires_at,
        }

    async def pending(self, provider: LoadedProvider, state: str):
        login = await self.store.get_login(state, provider.name)
        if login is None or (login.status == "pending" and login.expires_at <= self.clock.now()):
            raise LoginExpired()
        return login

    async def finish_code(self, provider: LoadedProvider, state: str, code: str) -> AccountState:
        """Exchange the pasted code (or callback URL) of a code login; single use."""
        login = await self.pending(provider, state)
        if login.method != "code":
            raise BadRequest("this login is a device flow: Kleis completes it by itself; poll its status")
        if login.status != "pending":
            raise LoginUsed()
        # Single use: only the request that deletes the state may exchange the code.
        if not await self.store.take_login(state):
            raise LoginUsed()
        tokens = await provider.module.finish_login(provider.ctx, state, login.data, code)
        return await self.pool.upsert(provider.name, tokens)

    async def _poll_device(self, provider: LoadedProvider, state: str) -> None:
        """Poll the provider at its interval until approved, denied or expired; then wake
        whoever `wait`s for this login."""
        try:
            await self._poll_device_until_done(provider, state)
        finally:
            event = self._finished.pop(state, None)
            if event is not None:
                event.set()

    async def _poll_device_until_done(self, provider: LoadedProvider, state: str) -> None:
        login = await self.store.get_login(state)
        data, interval = login.data, login.interval_ms / 1000
        while self.clock.now() < login.expires_at:
            await asyncio.sleep(max(interval, 0.01))
            try:
                tokens = await provider.module.poll_login(provider.ctx, data)
            except LoginPending as pending:
                interval = pending.interval or interval
                data = pending.data or data
                continue
            except ProviderError as exc:
                await self.store.finish_login(state, "failed", str(exc))
                return
            except Exception as exc:
                log.exception("%s device login crashed", provider.name)
                await self.store.finish_login(state, "failed", f"the login failed: {type(exc).__name__}")
                return
            account = await self.pool.upsert(provider.name, tokens)
            await self.store.finish_login(state, "complete", None, account.id)
            return
        await self.store.finish_login(
            state, "failed", "the login expired before it was approved; start it again"
        )

    async def wait(self, provider: LoadedProvider, state: str, seconds: float) -> LoginStatus:
        """The login's status once it is no longer pending, or after `seconds` (then still
        "pending"). Wakes when this instance's poller ends; a login another instance polls is
        read again every RECHECK_S seconds. Raises NotFound for an unknown state."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while True:
            finished = self._finished.get(state)  # before reading: a poller ending after is seen
            status = await self.status(provider, state)
            if status.status == "complete" and status.account is None:
                await self.pool.load()  # another instance added it; do not wait for our cache
                status = await self.status(provider, state)
            left = deadline - loop.time()
            if status.status != "pending" or left <= 0:
                return status
            with contextlib.suppress(TimeoutError):
                if finished is None:
                    await asyncio.sleep(min(left, self.RECHECK_S))
                else:
                    await asyncio.wait_for(finished.wait(), min(left, self.RECHECK_S))

    async def status(self, provider: LoadedProvider, state: str) -> LoginStatus:
        login = await self.store.get_login(state, provider.name)
        if login is None:
            raise NotFound("unknown login state")
        expired = login.status == "pending" and login.expires_at <= self.clock.now()
        status = "failed" if expired else login.status
        message = login.message if status != "failed" or login.message else "the login expired"
        account = self.pool.accounts.get(login.result_account_id) if status == "complete" else None
        return LoginStatus(state, provider.name, login.method, status, message, account)


# ══ Imports ═════════════════════════════════════════════════════════════════


def read_auth_file(path: Path | str) -> dict | str:
    """An auth file's JSON object, or its text (hosts.yml). Raises OSError."""
    text = Path(path).expanduser().read_text()
    try:
        return json.loads(text)
    except ValueError:
        return text


def identified(found: Iterable[Tokens]) -> list[Tokens]:
    """Imported tokens with an identity: an unknown owner is matched by its refresh token, so
    importing the same file again updates the account instead of adding one."""
    found = list(found)
    for tokens in found:
        if tokens.account_id is None:
            tokens.account_id = token_fingerprint(tokens.refresh_token)
    return found


class Imported(list):
    """The accounts an import added or updated (a list of AccountState) and `warnings`: lines
    the user should read (a login shared with its client, a token that could not be checked)."""

    def __init__(self, accounts: Iterable[AccountState] = (), warnings: Iterable[str] = ()):
        super().__init__(accounts)
        self.warnings = list(dict.fromkeys(warnings))


async def checked(provider: LoadedProvider, tokens: Tokens) -> tuple[Tokens, str | None]:
    """Imported tokens as the provider sees them (adapter `check_import`: is the token taken,
    whose is it), and a warning when that could not be asked. Raises LoginFailed (a
    ProviderError) when the provider refuses the token."""
    if provider.has("check_import"):
        try:
            answer = await provider.module.check_import(provider.ctx, tokens)
        except LoginFailed:
            raise
        except ProviderError as exc:
            return tokens, f"the token was not checked: {exc}"
        if answer is None:
            return tokens, "the token was not checked (its access token has expired): the first refresh will"
        tokens = answer
    return tokens, None


async def _import_all(
    pool: AccountPool, provider: LoadedProvider, found: list[Tokens], label: str | None, priority: int | None
) -> Imported:
    warnings, accounts = [], []
    for tokens in found:
        tokens, note = await checked(provider, tokens)
        if note:
            warnings.append(note)
        identified([tokens])
        account = await pool.upsert(provider.name, tokens, label=label, priority=priority, origin="import")
        accounts.append(account)
    shared = import_warning(provider)
    return Imported(accounts, [shared, *warnings] if shared else warnings)


async def import_auth(
    pool: AccountPool,
    provider: LoadedProvider,
    content: dict | str,
    *,
    label: str | None = None,
    priority: int | None = None,
) -> Imported:
    """Import every account in an official client's auth file (its JSON object or text), each
    checked with its provider and identified by the provider's own user id. Raises LoginFailed
    when the provider refuses a token, BadRequest when the file holds none."""
    found = list(provider.module.import_auth(provider.ctx, content))
    if not found:
        raise BadRequest(f"no {provider.name} account found in the auth file")
    return await _import_all(pool, provider, found, label, priority)


async def import_body(pool: AccountPool, provider: LoadedProvider, body: dict, now: int) -> Imported:
    """The admin import: `authFile` (an official client's file, object or text) or explicit
    `accessToken`, `refreshToken`, `expiresAt` (+ `accountId`, `metadata`); `label`,
    `priority` for either."""
    label = opt_str(body, "label", 160)
    priority = opt_int(body, "priority")
    if body.get("authFile") is not None:
        content = body["authFile"]
        if not isinstance(content, (dict, str)):
            raise BadRequest("authFile must be the file's JSON object or its text")
        return await import_auth(pool, provider, content, label=label, priority=priority)
    for name in ("accessToken", "refreshToken"):
        if not isinstance(body.get(name), str) or not body[name].strip():
            raise BadRequest(f"{name} is required (or send authFile)")
    expires_at = future_ms(opt_int(body, "expiresAt"), "expiresAt", now)
    if expires_at is None:
        raise BadRequest("expiresAt is required (epoch seconds or milliseconds, in the future)")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise BadRequest("metadata must be an object")
    tokens = Tokens(
        access_token=body["accessToken"].strip(),
        refresh_token=body["refreshToken"].strip(),
        expires_at=expires_at,
        account_id=opt_str(body, "accountId"),
        label=label,
        metadata=metadata,
    )
    return await _import_all(pool, provider, [tokens], label, priority)


async def import_config(pool: AccountPool, entries: Iterable[AccountImport], resolve) -> None:
    """Apply the config's [[accounts]] idempotently: the same account is updated, never
    duplicated, and a stored token newer than the file's is kept (Kleis may have rotated it
    since). `resolve` turns a config-relative path into a Path."""
    for i, entry in enumerate(entries):
        provider = pool.providers.get(entry.provider)
        if provider is None:
            log.warning("[accounts.%d]: provider %s is not enabled; skipped", i, entry.provider)
            continue
        try:
            if entry.auth_file:
                found = identified(
                    provider.module.import_auth(provider.ctx, read_auth_file(resolve(entry.auth_file)))
                )
            else:
                found = [
                    Tokens(
                        access_token=entry.access_token,
                        refresh_token=entry.refresh_token,
                        expires_at=epoch_ms(entry.expires_at) or 0,
                        label=entry.label or None,
                        account_id=entry.account_id or f"config:{entry.label or i}",
                    )
                ]
        except (OSError, ProviderError, ValueError) as exc:
            log.warning("[accounts.%d]: cannot import %s: %s", i, entry.auth_file or "tokens", exc)
            continue
        for tokens in found:
            current = next(
                (
                    a
                    for a in pool.by_provider.get(provider.name, [])
                    if a.account_id == tokens.account_id or a.refresh_token == tokens.refresh_token
                ),
                None,
            )
            if current is not None and (
                current.expires_at >= tokens.expires_at or current.refresh_token == tokens.refresh_token
            ):
                continue
            try:
                tokens, note = await checked(provider, tokens)
            except ProviderError as exc:
                log.warning("[accounts.%d]: %s refused the token: %s", i, provider.name, exc)
                continue
            for warning in filter(None, (note, import_warning(provider))):
                log.warning("[accounts.%d]: %s", i, warning)
            await pool.upsert(
                provider.name, tokens, label=entry.label or None, priority=entry.priority, origin="import"
            )
