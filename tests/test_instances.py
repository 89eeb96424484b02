"""Several instances on one PostgreSQL (issue 15, SPEC S14), proven with two real
`python kleis.py serve` processes on different ports sharing a fresh database (created and
dropped per test by the `pg_url` fixture), against the loopback fakes of this test's loop.

- Every kind of change made on one instance is seen by the other within 0.5 s, measured with
  LISTEN/NOTIFY and with polling only (`[database] listen = false`); the p50/max are printed.
- A session keeps its account whichever instance serves its next turn.
- 2 x 20 concurrent requests on an expiring token make exactly one refresh grant upstream, and
  the usage both instances write sums exactly.
- An instance killed (SIGKILL) while it holds the refresh lease is taken over by the other
  within the short lease; requests meanwhile wait and succeed, and the account stays usable.
"""

from __future__ import annotations

import asyncio
import random
import secrets
import signal
import statistics
import time

import aiohttp
import psycopg
import pytest

from runtime import ManualClock
from tests.conftest import until_serving, wait_for, write_config
from tests.fakes.codex import DEFAULT_USAGE, FakeCodex
from tests.test_cli import KLEIS, free_port

RESPONSES = "/openai/v1/responses"
BOUND_S = 0.5


class Node:
    """One `kleis serve` process of the pair."""

    def __init__(self, tmp_path, name: str, db_url: str, fakes: dict, secret_key: str, extra: dict):
        self.name, self.db_url = name, db_url
        self.port = free_port()
        self.config = tmp_path / f"{name}.toml"
        sections = {**extra, "server": {"port": self.port, **extra.get("server", {})}}
        self.token = write_config(self.config, db_url, fakes, sections, secret_key)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"{name}.log"  # a file, not a pipe: a full pipe would stall the server
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> Node:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *KLEIS, "--config", str(self.config), "serve",
                stdout=asyncio.subprocess.DEVNULL, stderr=log,
            )  # fmt: skip

        await until_serving(
            http, self.url, lambda: None if self.proc.returncode is None else self.log.read_text()
        )
        return self

    async def admin(self, http, method: str, path: str, body: dict | None = None, expect: int = 200):
        headers = {"Authorization": f"Bearer {self.token}"}
        async with http.request(method, self.url + "/admin" + path, json=body, headers=headers) as resp:
            data = await resp.json()
            assert resp.status == expect, (resp.status, data)
            return data

    async def account(self, http, account_id: str) -> dict:
        accounts = (await self.admin(http, "GET", "/accounts"))["accounts"]
        return next((a for a in accounts if a["id"] == account_id), {})

    async def send(self, http, key: str, body: dict | None = None, headers: dict | None = None):
        """POST a Responses request: (status, body bytes, x-kleis-account)."""
        sent = {"Authorization": f"Bearer {key}", **(headers or {})}
        payload = body or {"model": "gpt-5.5", "input": "hi"}
        async with http.post(self.url + RESPONSES, json=payload, headers=sent) as resp:
            return resp.status, await resp.read(), resp.headers.get("x-kleis-account")

    async def stop(self) -> str:
        if self.proc is None:
            return ""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        return self.log.read_text()


@pytest.fixture
async def pair(tmp_path, http, pg_url, codex_fake):
    """Factory: two instances on one fresh PostgreSQL database, stopped after the test."""
    nodes: list[Node] = []
    secret_key = secrets.token_urlsafe(24)  # shared: both open the same sealed tokens

    async def start(**extra) -> tuple[Node, Node]:
        made = [Node(tmp_path, n, pg_url, {"codex": codex_fake}, secret_key, extra) for n in ("a", "b")]
        nodes.extend(made)
        # Started together on the fresh database: the schema is applied once, under a lock.
        a, b = await asyncio.gather(made[0].start(http), made[1].start(http))
        return a, b

    yield start
    for node in nodes:
        log = await node.stop()
        assert "Traceback" not in log, log[-3000:]


def import_body(fake: FakeCodex, account: str = "acct_1", expires_in_ms: int = 3_600_000) -> dict:
    grant = fake.grant(account)
    return {
        "accessToken": grant["access_token"],
        "refreshToken": grant["refresh_token"],
        "expiresAt": int(time.time() * 1000) + expires_in_ms,
        "accountId": account,
    }


async def desync() -> None:
    """A random pause before a change, so changes do not fall in step with the other
    instance's poll (each one made just after the last was seen would always wait a whole
    poll interval, and the measured delays would all be the worst case)."""
    await asyncio.sleep(random.uniform(0, 0.25))


async def seen_within(check, bound: float = 2.0) -> float:
    """Seconds until `check()` (async) is true, polled every 5 ms; fails past `bound`."""
    started = time.monotonic()
    await wait_for(check, timeout=bound, interval=0.005)
    return time.monotonic() - started


def db_rows(url: str, sql: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.parametrize("listen", [True, False], ids=["notify", "polling"])
async def test_every_kind_of_change_reaches_the_other_instance_within_half_a_second(
    pair, http, codex_fake, listen
):
    a, b = await pair(database={"listen": listen})
    delays: dict[str, float] = {}

    async def status_on_b(key: str) -> int:
        """No account exists yet: an accepted key gets 400 no_account (401 when unknown or
        revoked, 403 when scoped to another provider), and nothing reaches the upstream."""
        status, _, _ = await b.send(http, key)
        return status

    # Keys: created, scoped to another provider, revoked.
    await desync()
    created = (await a.admin(http, "POST", "/keys", {"label": "team"}, expect=201))["key"]
    key, key_id = created["key"], created["id"]

    async def accepted():
        return await status_on_b(key) in (200, 400)

    delays["key created"] = await seen_within(accepted)
    await desync()
    await a.admin(http, "PATCH", f"/keys/{key_id}", {"providerScopes": ["claude"]})

    async def scoped():
        return await status_on_b(key) == 403

    delays["key scope changed"] = await seen_within(scoped)
    await a.admin(http, "PATCH", f"/keys/{key_id}", {"providerScopes": None})
    await seen_within(accepted)

    # Accounts: imported, disabled and enabled, made primary.
    await desync()
    first = (await a.admin(http, "POST", "/accounts/codex/import", import_body(codex_fake), expect=201))[
        "account"
    ]

    async def listed():
        return (await b.account(http, first["id"])).get("status") == "ok"

    delays["account imported"] = await seen_within(listed)
    await desync()
    await a.admin(http, "PATCH", f"/accounts/{first['id']}", {"enabled": False})

    async def disabled():
        return (await b.account(http, first["id"]))["enabled"] is False

    delays["account disabled"] = await seen_within(disabled)
    await desync()
    await a.admin(http, "PATCH", f"/accounts/{first['id']}", {"enabled": True})

    async def enabled():
        return (await b.account(http, first["id"]))["enabled"] is True

    delays["account enabled"] = await seen_within(enabled)
    body = import_body(codex_fake, "acct_2")
    second = (await a.admin(http, "POST", "/accounts/codex/import", body, expect=201))["account"]
    await seen_within(lambda: b.account(http, second["id"]))
    await desync()
    await a.admin(http, "POST", f"/accounts/{second['id']}/primary")

    async def primary():
        return (await b.account(http, second["id"]))["isPrimary"] is True

    delays["primary account"] = await seen_within(primary)

    # A cooldown set by an upstream refusal on A, then cleared by the admin on A.
    codex_fake.queue(FakeCodex.usage_limit_reply(resets_in_seconds=600))
    codex_fake.queue(FakeCodex.json_reply())
    await desync()
    status, _, served_by = await a.send(http, key)
    assert status == 200 and served_by == first["id"]  # failed over from the refused primary

    async def cooling():
        return (await b.account(http, second["id"]))["status"] == "cooling_down"

    delays["cooldown set"] = await seen_within(cooling)
    codex_fake.queue(FakeCodex.json_reply())
    status, _, served_by = await b.send(http, key)
    assert status == 200 and served_by == first["id"]  # B rests the account A saw refused
    await desync()
    await a.admin(http, "DELETE", f"/accounts/{second['id']}/cooldown")

    async def cleared():
        return (await b.account(http, second["id"]))["status"] == "ok"

    delays["cooldown cleared"] = await seen_within(cleared)

    # needs_reauth: a refresh on A refused for good.
    await desync()
    codex_fake.revoke_refresh_tokens()
    await a.admin(http, "POST", f"/accounts/{second['id']}/refresh", expect=403)

    async def reauth():
        return (await b.account(http, second["id"]))["status"] == "needs_reauth"

    delays["needs_reauth"] = await seen_within(reauth)

    # A provider switched off, and the key revoked last.
    await desync()
    await a.admin(http, "PATCH", "/accounts/providers/codex", {"enabled": False})

    async def switched():
        providers = (await b.admin(http, "GET", "/accounts/providers"))["providers"]
        return next(p for p in providers if p["provider"] == "codex")["enabled"] is False

    delays["provider switched off"] = await seen_within(switched)
    await desync()
    await a.admin(http, "POST", f"/keys/{key_id}/revoke")

    async def revoked():
        return await status_on_b(key) == 401

    delays["key revoked"] = await seen_within(revoked)

    values = sorted(delays.values())
    mode = "LISTEN/NOTIFY" if listen else "polling every 0.25 s"
    print(
        f"\npropagation with {mode}: p50 {statistics.median(values) * 1000:.0f} ms, "
        f"max {values[-1] * 1000:.0f} ms"
    )
    for kind, seconds in delays.items():
        print(f"  {kind}: {seconds * 1000:.0f} ms")
    assert max(values) <= BOUND_S, delays


async def test_a_session_keeps_its_account_on_the_other_instance(pair, http, codex_fake):
    a, b = await pair()
    key = (await a.admin(http, "POST", "/keys", {"label": "s"}, expect=201))["key"]["key"]
    first = (await a.admin(http, "POST", "/accounts/codex/import", import_body(codex_fake), expect=201))[
        "account"
    ]
    body = import_body(codex_fake, "acct_2")
    second = (await a.admin(http, "POST", "/accounts/codex/import", body, expect=201))["account"]
    await a.admin(http, "POST", f"/accounts/{first['id']}/primary")
    await seen_within(lambda: _is_primary(b, http, first["id"]))

    turn = {"model": "gpt-5.5", "input": "hi", "prompt_cache_key": "ses_shared"}
    status, _, served_by = await a.send(http, key, turn)
    assert status == 200 and served_by == first["id"]
    await a.admin(http, "POST", f"/accounts/{second['id']}/primary")
    await seen_within(lambda: _is_primary(b, http, second["id"]))

    status, _, served_by = await b.send(http, key, turn)  # the next turn, on the other instance
    assert status == 200 and served_by == first["id"]
    other = {**turn, "prompt_cache_key": "ses_new"}
    status, _, served_by = await b.send(http, key, other)
    assert status == 200 and served_by == second["id"]  # a new session goes to the primary
    keys = [c.json.get("prompt_cache_key") for c in codex_fake.calls("/responses")]
    assert keys[0] == keys[1] != keys[2]  # the same derived cache key on both instances


async def _is_primary(node: Node, http, account_id: str) -> bool:
    return (await node.account(http, account_id)).get("isPrimary") is True


async def test_forty_concurrent_requests_on_an_expiring_token_make_one_refresh(
    pair, http, codex_fake, pg_url
):
    a, b = await pair(usage={"flush_interval": 0.2})
    key = (await a.admin(http, "POST", "/keys", {"label": "load"}, expect=201))["key"]["key"]
    # Valid upstream, but within the request path's refresh margin (60 s) on both instances.
    body = import_body(codex_fake, expires_in_ms=30_000)
    account = (await a.admin(http, "POST", "/accounts/codex/import", body, expect=201))["account"]
    await seen_within(lambda: b.account(http, account["id"]))
    codex_fake.token_delay = 0.3  # both instances' requests arrive while the refresh runs
    before = codex_fake.refresh_calls

    answers = await asyncio.gather(*(node.send(http, key) for node in (a, b) for _ in range(20)))
    assert [status for status, _, _ in answers] == [200] * 40, [r[1][:200] for r in answers if r[0] != 200]
    assert codex_fake.refresh_calls - before == 1
    assert (await b.account(http, account["id"]))["status"] == "ok"

    # Usage from both instances sums exactly (each answer: DEFAULT_USAGE, of which 20 cached).
    cached = DEFAULT_USAGE["input_tokens_details"]["cached_tokens"]
    expected = (
        40,
        40,
        40 * (DEFAULT_USAGE["input_tokens"] - cached),
        40 * cached,
        40 * DEFAULT_USAGE["output_tokens"],
    )

    def totals():
        (row,) = db_rows(
            pg_url,
            "SELECT COALESCE(SUM(request_count), 0), COALESCE(SUM(success_count), 0), "
            "COALESCE(SUM(input_tokens), 0), COALESCE(SUM(cache_read_tokens), 0), "
            "COALESCE(SUM(output_tokens), 0) FROM request_usage_buckets",
        )
        return tuple(int(v) for v in row)

    await wait_for(lambda: totals() == expected, timeout=10, interval=0.05)
    print(
        f"\n40 concurrent requests on two instances: {codex_fake.refresh_calls - before} refresh grant; "
        f"usage (requests, successes, input, cache read, output) {totals()}"
    )


async def test_an_instance_killed_holding_the_refresh_lease_is_taken_over(pair, http, codex_fake, pg_url):
    a, b = await pair()
    key = (await a.admin(http, "POST", "/keys", {"label": "k"}, expect=201))["key"]["key"]
    body = import_body(codex_fake, expires_in_ms=30_000)
    account = (await a.admin(http, "POST", "/accounts/codex/import", body, expect=201))["account"]
    await seen_within(lambda: b.account(http, account["id"]))
    codex_fake.token_gate = gate = asyncio.Event()
    try:
        doomed = asyncio.create_task(a.send(http, key))  # A takes the lease; its refresh hangs

        def leased():
            sql = f"SELECT refresh_lock_token FROM provider_accounts WHERE id = '{account['id']}'"
            return db_rows(pg_url, sql)[0][0] is not None

        await wait_for(leased, timeout=10, interval=0.02)
        await wait_for(lambda: codex_fake.token_waiting, timeout=10)
        a.proc.kill()
        await a.proc.wait()
        await wait_for(
            lambda: all(r.transport is None or r.transport.is_closing() for r in codex_fake.token_waiting),
            timeout=10,
        )
        gate.set()  # A's grant never reached the provider: the refresh token is unused
        with pytest.raises(aiohttp.ClientError):
            await doomed

        started = time.monotonic()
        answers = await asyncio.gather(*(b.send(http, key) for _ in range(5)))
        took = time.monotonic() - started
    finally:
        gate.set()
    assert [status for status, _, _ in answers] == [200] * 5, [r[1][:200] for r in answers]
    assert took < 30
    assert codex_fake.refresh_calls == 1  # B's; A's never got through
    view = await b.account(http, account["id"])
    assert view["status"] == "ok" and view["lastRefreshStatus"] == "success"
    print(f"\nlease holder killed: the other instance served after {took:.1f} s, no error in between")


async def test_a_lease_held_elsewhere_is_waited_for_then_503_without_a_cooldown(start_kleis, codex_fake):
    """In one process with a manual clock: another (live) instance holds the refresh lease
    for longer than Kleis waits. The client gets 503 refresh_in_progress with Retry-After;
    the account is not rested and nothing reaches the upstream. Once the lease is free the
    next request refreshes and is served."""
    clock = ManualClock()
    kleis = await start_kleis(clock=clock)
    grant = {**codex_fake.grant(), "expires_at": clock.now() + 30_000}  # within the 60 s margin
    account = await kleis.import_account("codex", grant)
    key, _ = await kleis.create_key(label="waits")
    store = kleis.services.store
    assert await store.take_refresh_lease(account["id"], "another-instance", 3_600_000)

    async def send():
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": "gpt-5.5", "input": "hi"}
        async with kleis.http.post(kleis.url + RESPONSES, json=body, headers=headers) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")

    waiting = asyncio.create_task(send())
    await wait_for(lambda: kleis.services.background.named(f"refresh-{account['id']}"))
    assert not waiting.done()  # it waits for the other instance
    clock.advance(31_000)  # past the 30 s wait
    status, body, retry_after = await waiting
    assert status == 503 and body["error"]["code"] == "refresh_in_progress", body
    assert retry_after == "5"
    _, listed = await kleis.admin("GET", "/admin/accounts")
    view = next(a for a in listed["accounts"] if a["id"] == account["id"])
    assert view["status"] == "ok" and view["cooldownUntil"] is None
    assert codex_fake.refresh_calls == 0 and not codex_fake.calls("/responses")

    await store.release_refresh_lease(account["id"], "another-instance")
    status, body, _ = await send()
    assert status == 200, body
    assert codex_fake.refresh_calls == 1


async def test_tokens_refreshed_after_the_lease_lapsed_are_still_saved(start_kleis, codex_fake):
    """The lease lapses while the provider is slow (say the database was away when it should
    have been renewed) and another instance takes it: the rotated tokens this refresh got are
    still committed, since the stored refresh token is still the one it used (the provider has
    already invalidated it). Losing them would leave the account needing a new login."""
    clock = ManualClock()
    kleis = await start_kleis(clock=clock)
    grant = {**codex_fake.grant(), "expires_at": clock.now() + 30_000}
    account = await kleis.import_account("codex", grant)
    key, _ = await kleis.create_key(label="lapse")
    store = kleis.services.store
    codex_fake.token_gate = gate = asyncio.Event()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        sent = kleis.http.post(
            kleis.url + RESPONSES, json={"model": "gpt-5.5", "input": "hi"}, headers=headers
        )
        waiting = asyncio.create_task(sent)
        await wait_for(lambda: codex_fake.token_waiting, timeout=10)
        clock.advance(11_000)  # past the 10 s lease, before any renewal
        assert await store.take_refresh_lease(account["id"], "another-instance", 10_000)
        gate.set()
        resp = await waiting
        assert resp.status == 200, await resp.text()
        resp.release()
    finally:
        gate.set()
    stored = await store.get_account(account["id"])
    issued = [t for t, entry in codex_fake.refresh_tokens.items() if not entry["used"]]
    assert stored.refresh_token in issued and stored.refresh_token != grant["refresh_token"]
    assert codex_fake.refresh_calls == 1


async def test_admin_writes_on_a_read_only_database_are_503_without_a_traceback(start_kleis, pg_url, caplog):
    """A standby promoted the wrong way round, or a database set read-only: an admin write is
    a 503 in the admin envelope with one log line, not a 500 and a traceback."""
    kleis = await start_kleis(db_url=pg_url)
    name = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url.rsplit("/", 1)[0] + "/test", autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    _, body = await kleis.admin("POST", "/admin/keys", {"label": "ro"}, expect=503)
    assert body["error"] == "database_unavailable", body
    assert "Traceback" not in caplog.text and "read-only transaction" in caplog.text


async def test_an_instance_with_another_secret_key_refuses_to_start(pair, tmp_path, http, pg_url, codex_fake):
    """Every host's `init` makes its own random key: an instance that joins with another one
    would look healthy and answer every client no_account. It stops at start, exit 2, and says
    which key the running instance uses."""
    a, _ = await pair()
    other = Node(tmp_path, "d", pg_url, {"codex": codex_fake}, secrets.token_urlsafe(24), {})
    with other.log.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *KLEIS, "--config", str(other.config), "serve", stdout=asyncio.subprocess.DEVNULL, stderr=log
        )
        assert await asyncio.wait_for(proc.wait(), 30) == 2
    said = other.log.read_text()
    assert "seals tokens with key" in said and "needs the same [security] secret_key" in said
    assert "Traceback" not in said

    await a.admin(http, "POST", "/accounts/codex/import", import_body(codex_fake), expect=201)
    with other.log.open("wb") as log:  # an account sealed with another key: the same refusal
        run = await asyncio.create_subprocess_exec(
            *KLEIS,
            "--config",
            str(other.config),
            "accounts",
            "list",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=log,
        )
        assert await asyncio.wait_for(run.wait(), 30) == 2
    assert "1 account(s) in the database are sealed with another secret key" in other.log.read_text()


async def test_a_database_that_cannot_be_opened_says_why_in_one_line(tmp_path, pg_url, codex_fake):
    """No such database (or role, or password): the cause, in one line, exit 2, not the
    connection pool's 30 s timeout that hides it."""
    missing = pg_url.rsplit("/", 1)[0] + "/kleis_no_such_database"
    node = Node(tmp_path, "m", missing, {"codex": codex_fake}, secrets.token_urlsafe(24), {})
    proc = await asyncio.create_subprocess_exec(
        *KLEIS, "--config", str(node.config), "serve",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 2
    assert lines == [lines[-1]] and 'database "kleis_no_such_database" does not exist' in lines[-1], lines
