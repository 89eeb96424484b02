"""The usage flusher against databases that really fail (issue 10): SQLite locked by another
connection, PostgreSQL with a table locked, its connections killed, and a commit whose answer
never arrives. Requests go through the running app over HTTP to the Codex fake; after the
database recovers the stored buckets must hold every request exactly once.

Each test runs with a ManualClock, so all requests fall into one minute bucket and the
flusher's backoff moves only when the test moves the clock.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from urllib.parse import urlsplit

import psycopg
import pytest

from runtime import ManualClock
from tests.conftest import wait_for

RESPONSES = "/openai/v1/responses"
COUNTED = ("request_count", "success_count", "input_tokens", "output_tokens", "cache_read_tokens")


async def setup(start_kleis, codex_fake, **config):
    now = int(time.time() * 1000)
    clock = ManualClock(now - now % 60_000 + 1000)  # the test's few seconds stay in one minute
    kleis = await start_kleis(clock=clock, **config)
    await kleis.import_account("codex", codex_fake.grant("acct_1", "one@example.com"))
    key, _ = await kleis.create_key(label="flusher")
    kleis.services.usage.lock_wait = 0.05  # a failed attempt fails fast; the default waits 2 s
    return kleis, key


async def flush(kleis) -> int:
    """One flush as the shutdown drain does it (ignoring backoff); the buckets written."""
    return await kleis.services.usage.flush()


async def send(kleis, key: str, n: int = 1) -> None:
    for _ in range(n):
        async with kleis.http.post(
            kleis.url + RESPONSES,
            json={"model": "gpt-5.5", "input": "hello", "stream": True},
            headers={"authorization": f"Bearer {key}"},
        ) as resp:
            assert resp.status == 200
            await resp.read()


async def one_request(kleis, key: str) -> dict:
    """What one request adds (written and read back), to compare totals with."""
    await send(kleis, key)
    assert await flush(kleis) == 1
    (row,) = await kleis.rows("request_usage_buckets")
    assert row["request_count"] == 1 and row["input_tokens"] > 0
    return {name: row[name] for name in COUNTED}


def assert_counted(rows: list[dict], per_request: dict, requests: int) -> None:
    (row,) = rows  # one minute, one key, one account, one model
    assert {name: row[name] for name in COUNTED} == {n: v * requests for n, v in per_request.items()}


async def metric(kleis, name: str) -> float:
    async with kleis.http.get(kleis.url + "/metrics", headers=kleis.admin_headers) as resp:
        text = await resp.text()
    (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
    return float(line.split()[1])


def pg_connect(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=True)


# ── SQLite ───────────────────────────────────────────────────────────────────


async def test_sqlite_locked_for_three_flushes_then_every_request_is_stored_once(start_kleis, codex_fake):
    kleis, key = await setup(start_kleis, codex_fake)
    usage = kleis.services.usage
    per_request = await one_request(kleis, key)

    blocker = sqlite3.connect(kleis.services.store.url[len("sqlite:///") :], isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    for attempt in range(1, 4):
        await send(kleis, key, 2)
        assert await flush(kleis) == 0
        assert (usage.flush_failures, usage.failing, usage.depth) == (attempt, attempt, 1)
        assert usage.unsure is None  # failed before COMMIT: merged back, not held apart
    assert await metric(kleis, "kleis_usage_flush_failures_total") == 3
    assert await metric(kleis, "kleis_usage_flush_failing_attempts") == 3
    assert_counted(await kleis.rows("request_usage_buckets"), per_request, 1)  # nothing half-written
    blocker.execute("ROLLBACK")
    blocker.close()

    assert await flush(kleis) == 1
    assert_counted(await kleis.rows("request_usage_buckets"), per_request, 7)
    assert (usage.depth, usage.failing, usage.dropped) == (0, 0, 0)
    assert await flush(kleis) == 0  # nothing left: flushing again adds nothing
    assert_counted(await kleis.rows("request_usage_buckets"), per_request, 7)
    (mark,) = await kleis.rows("usage_flushes")
    assert (mark["writer"], mark["batch"]) == (usage.writer, usage.batches)
    assert await metric(kleis, "kleis_usage_flush_failing_attempts") == 0


async def test_the_flusher_loop_backs_off_and_writes_once_the_lock_is_gone(start_kleis, codex_fake):
    kleis, key = await setup(start_kleis, codex_fake, usage={"flush_interval": 0.02})
    usage, clock = kleis.services.usage, kleis.clock
    await send(kleis, key)
    await wait_for(lambda: usage.depth == 0)  # the loop writes on its own
    (first,) = await kleis.rows("request_usage_buckets")
    per_request = {name: first[name] for name in COUNTED}

    blocker = sqlite3.connect(kleis.services.store.url[len("sqlite:///") :], isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    await send(kleis, key, 3)
    await wait_for(lambda: usage.flush_failures == 1)
    assert 0.5 <= usage.retry_at - clock.monotonic() <= 1.0  # 1 s with jitter
    ticks = usage.ticks
    await wait_for(lambda: usage.ticks >= ticks + 5)
    assert usage.flush_failures == 1  # the loop keeps ticking but does not retry before its time
    clock.advance(1000)
    await wait_for(lambda: usage.flush_failures == 2)
    assert 1.0 <= usage.retry_at - clock.monotonic() <= 2.0  # doubled
    clock.advance(2000)
    await wait_for(lambda: usage.flush_failures == 3)
    assert 2.0 <= usage.retry_at - clock.monotonic() <= 4.0
    await send(kleis, key)  # still recorded while the database is locked

    blocker.execute("ROLLBACK")
    blocker.close()
    clock.advance(4000)
    await wait_for(lambda: usage.depth == 0 and usage.failing == 0)
    assert_counted(await kleis.rows("request_usage_buckets"), per_request, 5)


async def test_a_full_queue_drops_the_oldest_buckets_with_one_warning(start_kleis, codex_fake, caplog):
    kleis, key = await setup(start_kleis, codex_fake)
    usage = kleis.services.usage
    usage.max_buckets = 20
    caplog.set_level(logging.WARNING, logger="kleis")
    started = kleis.clock.now()
    for _ in range(25):  # 25 minutes, one bucket each, never flushed
        await send(kleis, key)
        kleis.clock.advance(60_000)
    # At 20 buckets the oldest tenth (2) goes: at the 21st, 23rd and 25th.
    assert (usage.depth, usage.dropped_buckets, usage.dropped) == (19, 6, 6)
    warnings = [r for r in caplog.records if "usage queue full" in r.getMessage()]
    assert len(warnings) == 1
    assert await metric(kleis, "kleis_usage_dropped_buckets_total") == 6
    assert await metric(kleis, "kleis_usage_dropped_total") == 6
    assert await flush(kleis) == 19
    starts = sorted(r["bucket_start"] for r in await kleis.rows("request_usage_buckets"))
    first_minute = started - started % 60_000
    assert starts == [first_minute + m * 60_000 for m in range(6, 25)]  # minutes 0-5 dropped


# ── PostgreSQL ───────────────────────────────────────────────────────────────


async def test_pg_table_locked_for_three_flushes_then_every_request_is_stored_once(
    start_kleis, codex_fake, pg_url
):
    kleis, key = await setup(start_kleis, codex_fake, database={"url": pg_url})
    usage = kleis.services.usage
    per_request = await one_request(kleis, key)

    with pg_connect(pg_url) as blocker:
        blocker.execute("BEGIN")
        blocker.execute("LOCK TABLE request_usage_buckets IN ACCESS EXCLUSIVE MODE")
        for attempt in range(1, 4):
            await send(kleis, key, 2)
            assert await flush(kleis) == 0  # lock_timeout on Kleis's side
            assert (usage.flush_failures, usage.depth, usage.unsure) == (attempt, 1, None)
        blocker.execute("ROLLBACK")

    assert await flush(kleis) == 1
    assert_counted(await kleis.rows("request_usage_buckets"), per_request, 7)
    assert await flush(kleis) == 0
    assert_counted(await kleis.rows("request_usage_buckets"), per_request, 7)


async def test_pg_connections_killed_then_every_request_is_stored_once(start_kleis, codex_fake, pg_url):
    """A PostgreSQL restart as Kleis sees it: every connection in its pool dies at once."""
    kleis, key = await setup(start_kleis, codex_fake, database={"url": pg_url})
    usage = kleis.services.usage
    per_request = await one_request(kleis, key)
    database = urlsplit(pg_url).path.lstrip("/")

    def kill_all() -> int:
        with pg_connect(pg_url) as admin:
            return admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND pid <> pg_backend_pid()",
                (database,),
            ).fetchone()[0]

    sent = 1
    for _ in range(3):
        await wait_for(kill_all)  # once the pool has connected again, kill what it has
        await send(kleis, key, 2)
        sent += 2
        await flush(kleis)  # the pool checks an idle connection before handing it out
    assert usage.flush_failures == 0 and usage.depth == 0  # so no flush met a dead one
    assert_counted(await kleis.rows("request_usage_buckets"), per_request, sent)


class CommitAnswerThief:
    """A TCP relay in front of PostgreSQL that, once armed, lets the next COMMIT through to
    the server, waits for the server's answer and then cuts the connection instead of
    relaying it: the transaction is committed, but the client never learns it."""

    def __init__(self, port: int = 5432):
        self.target_port = port
        self.armed = False
        self.stolen = 0
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for writer in list(self.writers):
            writer.close()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers |= {writer, up_writer}
        steal = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self.armed and b"COMMIT" in data:
                    self.armed = False
                    steal.set()
                up_writer.write(data)
                await up_writer.drain()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if steal.is_set():  # the server's answer to COMMIT: swallow it and hang up
                    self.stolen += 1
                    break
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()
                self.writers.discard(w)


async def test_pg_a_commit_whose_answer_was_lost_is_not_counted_twice(start_kleis, codex_fake, pg_url):
    thief = CommitAnswerThief(urlsplit(pg_url).port or 5432)
    port = await thief.start()
    parts = urlsplit(pg_url)
    relayed = parts._replace(netloc=f"{parts.username}@127.0.0.1:{port}").geturl()
    try:
        kleis, key = await setup(start_kleis, codex_fake, database={"url": relayed})
        usage = kleis.services.usage
        per_request = await one_request(kleis, key)

        await send(kleis, key, 3)
        thief.armed = True
        assert await flush(kleis) == 0  # COMMIT went through; its answer did not
        assert thief.stolen == 1
        assert usage.unsure is not None and usage.flush_failures == 1  # maybe stored: kept apart
        with pg_connect(pg_url) as direct:
            (stored,) = direct.execute("SELECT request_count FROM request_usage_buckets").fetchone()
        assert stored == 4  # the database has it

        await send(kleis, key, 2)  # arrives while the unsure batch waits; a batch of its own
        assert usage.depth == 2
        assert await flush(kleis) == 1  # the unsure batch is skipped, the new one written
        assert (usage.skipped_batches, usage.unsure, usage.depth) == (1, None, 0)
        assert_counted(await kleis.rows("request_usage_buckets"), per_request, 6)
        assert await metric(kleis, "kleis_usage_batches_skipped_total") == 1
    finally:
        await thief.stop()


# ── the store's batch numbers, on both databases ─────────────────────────────


async def test_a_batch_number_is_written_once_per_writer(start_kleis, db_url):
    kleis = await start_kleis(db_url=db_url)
    store = kleis.services.store
    row = {
        "bucket_start": 60_000,
        "api_key_id": "k",
        "provider_account_id": "a",
        "provider": "codex",
        "endpoint": "responses",
        "model": "m",
        "request_count": 1,
        "input_tokens": 10,
        "max_latency_ms": 5,
        "last_request_at": 60_001,
    }
    assert await store.add_usage([row], writer="w1", batch=1) is True
    assert await store.add_usage([row], writer="w1", batch=1) is False  # a retry of a stored batch
    assert await store.add_usage([row], writer="w2", batch=1) is True  # another instance
    assert await store.add_usage([row], writer="w1", batch=2) is True
    assert await store.add_usage([row], writer="w1", batch=2) is False
    (stored,) = await kleis.rows("request_usage_buckets")
    assert (stored["request_count"], stored["input_tokens"]) == (3, 30)
    marks = {r["writer"]: r["batch"] for r in await kleis.rows("usage_flushes")}
    assert marks == {"w1": 2, "w2": 1}


@pytest.mark.parametrize("bad", [-1])
def test_negative_retention_is_a_config_error(tmp_path, bad):
    from settings import ConfigError, load_settings

    path = tmp_path / "config.toml"
    path.write_text(f'[security]\nsecret_key = "{"x" * 24}"\n[usage]\nretention_days = {bad}\n')
    with pytest.raises(ConfigError, match="retention_days"):
        load_settings(path)
