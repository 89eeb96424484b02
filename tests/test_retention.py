"""Retention (issue 10): the purge job (`Instance.purge`, run by the background helper at start
and hourly) drops usage buckets older than `[usage] retention_days`, logins that expired a day
ago and idle usage writers; a deleted key's usage stays under its id. Time moves with a
ManualClock; the job is called the way its loop calls it."""

from __future__ import annotations

from runtime import ManualClock
from tests.conftest import wait_for

DAY = 86_400_000
RESPONSES = "/openai/v1/responses"


async def send(kleis, key: str) -> None:
    async with kleis.http.post(
        kleis.url + RESPONSES,
        json={"model": "gpt-5.5", "input": "hello", "stream": True},
        headers={"authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status == 200, await resp.text()
        await resp.read()


async def bucket_starts(kleis) -> list[int]:
    await kleis.flush()
    return sorted(r["bucket_start"] for r in await kleis.rows("request_usage_buckets"))


def minute(ms: int) -> int:
    return ms - ms % 60_000


async def test_old_buckets_expired_logins_and_idle_writers_are_purged(db_url, start_kleis, codex_fake):
    clock = ManualClock()
    kleis = await start_kleis(db_url=db_url, clock=clock, usage={"retention_days": 2})
    assert kleis.services.background.named("purge")  # the hourly loop runs
    await kleis.import_account("codex", codex_fake.grant("acct_1", "one@example.com"))
    key, _ = await kleis.create_key(label="r")
    began = clock.now()
    await send(kleis, key)
    _, login = await kleis.admin("POST", "/admin/accounts/claude/oauth/start", {}, expect=200)
    assert login["expiresAt"] < began + DAY

    clock.advance(2 * DAY)
    await send(kleis, key)
    assert await bucket_starts(kleis) == [minute(began), minute(began + 2 * DAY)]
    assert len(await kleis.rows("oauth_states")) == 1
    (writer,) = await kleis.rows("usage_flushes")

    clock.advance(DAY)  # the first bucket is 3 days old, the second 1 day
    deleted = await kleis.services.purge()
    assert deleted == {"request_usage_buckets": 1, "oauth_states": 1, "usage_flushes": 0}
    assert await bucket_starts(kleis) == [minute(began + 2 * DAY)]
    assert await kleis.rows("oauth_states") == []
    status, err = await kleis.admin(
        "POST", "/admin/accounts/claude/oauth/complete", {"state": login["state"], "code": "x"}
    )
    assert (status, err["error"]) == (400, "login_expired")

    clock.advance(7 * DAY)  # nothing written for 8 days: the writer's mark goes too
    deleted = await kleis.services.purge()
    assert deleted == {"request_usage_buckets": 1, "oauth_states": 0, "usage_flushes": 1}
    assert await bucket_starts(kleis) == []
    assert writer["writer"] == kleis.services.usage.writer
    # The queue writes again after its mark was purged (a new mark, the next batch number).
    await send(kleis, key)
    assert await bucket_starts(kleis) == [minute(clock.now())]
    (mark,) = await kleis.rows("usage_flushes")
    assert mark["batch"] == writer["batch"] + 1


async def test_retention_zero_keeps_usage_forever(start_kleis, codex_fake):
    clock = ManualClock()
    kleis = await start_kleis(clock=clock, usage={"retention_days": 0})
    await kleis.import_account("codex", codex_fake.grant("acct_1", "one@example.com"))
    key, _ = await kleis.create_key()
    began = clock.now()
    await send(kleis, key)
    await kleis.flush()
    clock.advance(3650 * DAY)
    assert (await kleis.services.purge())["request_usage_buckets"] == 0
    assert await bucket_starts(kleis) == [minute(began)]


async def test_a_purge_of_many_hours_goes_hour_by_hour(start_kleis, codex_fake):
    clock = ManualClock()
    kleis = await start_kleis(clock=clock, usage={"retention_days": 1})
    await kleis.import_account("codex", codex_fake.grant("acct_1", "one@example.com"))
    key, _ = await kleis.create_key()
    for _ in range(5):  # five buckets, five hours apart
        await send(kleis, key)
        clock.advance(5 * 3_600_000)
    await kleis.flush()
    clock.advance(DAY)
    assert (await kleis.services.purge())["request_usage_buckets"] == 5
    assert await bucket_starts(kleis) == []


async def test_deleting_a_key_keeps_its_usage_under_its_id(db_url, start_kleis, codex_fake):
    kleis = await start_kleis(db_url=db_url)
    await kleis.import_account("codex", codex_fake.grant("acct_1", "one@example.com"))
    key, created = await kleis.create_key(label="gone")
    kept, _ = await kleis.create_key(label="kept")
    for k in (key, key, kept):
        await send(kleis, k)
    await kleis.flush()
    await kleis.admin("POST", f"/admin/keys/{created['id']}/revoke", expect=200)
    await kleis.admin("DELETE", f"/admin/keys/{created['id']}", expect=200)
    assert await kleis.rows("api_keys", id=created["id"]) == []
    rows = await kleis.rows("request_usage_buckets", api_key_id=created["id"])
    assert sum(r["request_count"] for r in rows) == 2
    total = sum(r["request_count"] for r in await kleis.rows("request_usage_buckets"))
    assert total == 3

    async def dashboard_total():
        _, body = await kleis.admin("GET", "/admin/usage/dashboard", expect=200)
        return body["totals"]["requestCount"]

    assert await wait_for(dashboard_total) == 3  # window totals do not change with the key
