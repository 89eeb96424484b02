"""Usage analytics end to end (issue 10, read side): scripted traffic through the real app on
SQLite and PostgreSQL, placed in time with a ManualClock, read back through every admin route,
the export and the CLI; plus the arithmetic (bucket sizing, p95, success rate) on its own."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import json
import logging
import time

import pytest

import analytics
from analytics import averaged, bucket_size_ms, percentile
from runtime import ManualClock
from store import TTFB_BINS, TTFB_BOUNDS_MS
from tests.conftest import wait_for
from tests.fakes.codex import FakeCodex

HOUR = 3_600_000
_DAY_AGO = int(time.time() * 1000) - 24 * HOUR  # real time, so the CLI (real clock) sees it too
T0 = _DAY_AGO - _DAY_AGO % (4 * HOUR) + 10 * 60_000  # 10 min past a 4 h mark
ADDITIVE = ("requestCount", "successCount", "clientErrorCount", "serverErrorCount", "authErrorCount",
            "rateLimitCount", "proxyErrorCount", "upstreamErrorCount", "incompleteCount", "cancelledCount",
            "inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens",
            "countTokensCount")  # fmt: skip


async def codex(kleis, key: str, stream: bool = False) -> int:
    body = {"model": "gpt-5.5", "input": "hi", **({"stream": True} if stream else {})}
    async with kleis.http.post(
        kleis.url + "/openai/v1/responses", json=body, headers={"authorization": f"Bearer {key}"}
    ) as resp:
        await resp.read()
        return resp.status


async def claude(kleis, key: str, path: str = "/anthropic/v1/messages") -> int:
    body = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    if path.endswith("count_tokens"):
        body.pop("max_tokens")
    async with kleis.http.post(kleis.url + path, json=body, headers={"x-api-key": key}) as resp:
        await resp.read()
        return resp.status


async def scenario(start_kleis, db_url, codex_fake, claude_fake):
    """Two keys, one Codex and one Claude account. At T0 (the previous window): 2 Codex
    successes. One hour later: key A 3 Codex successes, an upstream 400, a 500, a 429, a cut
    stream, a cancelled request; key B 2 Claude messages and 3 count_tokens calls."""
    clock = ManualClock(T0)
    kleis = await start_kleis(db_url=db_url, clock=clock)
    cx = await kleis.import_account("codex", codex_fake.grant("acct_1", "a@example.com"), label="cx")
    cl = await kleis.import_account("claude", claude_fake.grant(), label="cl")
    key_a, view_a = await kleis.create_key(label="a")
    key_b, view_b = await kleis.create_key(label="b")
    for _ in range(2):
        assert await codex(kleis, key_a) == 200
    await kleis.flush()
    clock.advance(HOUR)
    for _ in range(3):
        assert await codex(kleis, key_a) == 200
    codex_fake.queue(FakeCodex.error_reply(400, "bad"))
    assert await codex(kleis, key_a) == 400
    codex_fake.queue(FakeCodex.error_reply(500, "boom", type="server_error"))
    assert await codex(kleis, key_a) == 500
    codex_fake.queue(FakeCodex.usage_limit_reply(resets_in_seconds=1))
    assert await codex(kleis, key_a) == 429
    await kleis.admin("DELETE", f"/admin/accounts/{cx['id']}/cooldown")
    codex_fake.queue(FakeCodex.stream_reply(events=3, cut_after=2))
    assert await codex(kleis, key_a, stream=True) == 200
    codex_fake.queue(FakeCodex.json_reply(first_byte_delay=1))
    recorded = kleis.services.usage.recorded
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await codex(kleis, key_a)
    await wait_for(lambda: kleis.services.usage.recorded > recorded)  # the cancellation is recorded
    for _ in range(2):
        assert await claude(kleis, key_b) == 200
    for _ in range(3):
        assert await claude(kleis, key_b, "/anthropic/v1/messages/count_tokens") == 200
    await kleis.flush()
    clock.advance(5 * 60_000)
    return kleis, clock, view_a["id"], view_b["id"], cx["id"], cl["id"]


def assert_sums_to(rows: list[dict], totals: dict) -> None:
    for name in ADDITIVE:
        assert sum(r[name] for r in rows) == totals[name], name


async def test_every_route_agrees_with_the_traffic_sent(db_url, start_kleis, codex_fake, claude_fake):
    kleis, _, key_a, key_b, cx, cl = await scenario(start_kleis, db_url, codex_fake, claude_fake)
    _, dash = await kleis.admin("GET", f"/admin/usage/dashboard?windowMs={HOUR}", expect=200)
    totals = dash["totals"]
    assert (totals["requestCount"], totals["successCount"], totals["clientErrorCount"]) == (10, 5, 1)
    assert (totals["serverErrorCount"], totals["rateLimitCount"], totals["incompleteCount"]) == (2, 1, 1)
    assert (totals["cancelledCount"], totals["countTokensCount"], totals["upstreamErrorCount"]) == (1, 3, 3)
    assert totals["successRate"] == 100  # 429, cancellation and upstream errors are not Kleis's
    assert totals["p95LatencyMs"] is not None and totals["avgDurationMs"] >= totals["avgLatencyMs"]
    assert dash["countTokens"]["requestCount"] == 3 and dash["countTokens"]["successCount"] == 3
    assert dash["previousTotals"]["requestCount"] == 2 and dash["previousTotals"]["successCount"] == 2
    for name in ("byProvider", "byEndpoint", "byModel", "byKey", "byAccount", "buckets"):
        assert_sums_to(dash[name], totals)
    assert {r["apiKeyId"]: r["requestCount"] for r in dash["byKey"]} == {key_a: 8, key_b: 2}
    assert {r["providerAccountId"]: r["countTokensCount"] for r in dash["byAccount"]} == {cx: 0, cl: 3}
    ct = next(r for r in dash["byEndpoint"] if r["endpoint"] == "count_tokens")
    assert (ct["requestCount"], ct["countTokensCount"]) == (0, 3)
    assert dash["bucketSizeMs"] == 60_000 and len(dash["buckets"]) == 61  # the whole hour, filled
    # Key and account summaries and details say the same.
    _, keys = await kleis.admin("GET", f"/admin/keys/usage?windowMs={HOUR}", expect=200)
    assert [(r["apiKeyId"], r["requestCount"], r["label"]) for r in keys["keys"]] == [
        (key_a, 8, "a"), (key_b, 2, "b")]  # fmt: skip
    assert keys["keys"][1]["providers"][0]["provider"] == "claude"
    assert_sums_to(keys["keys"], totals)
    _, accounts = await kleis.admin("GET", f"/admin/accounts/usage?windowMs={HOUR}", expect=200)
    assert_sums_to(accounts["accounts"], totals)
    _, detail = await kleis.admin("GET", f"/admin/accounts/{cl}/usage?windowMs={HOUR}", expect=200)
    assert [(r["apiKeyId"], r["requestCount"], r["countTokensCount"]) for r in detail["apiKeys"]] == [
        (key_b, 2, 3)]  # fmt: skip
    _, detail = await kleis.admin("GET", f"/admin/keys/{key_a}/usage?windowMs={HOUR}", expect=200)
    assert detail["totals"]["requestCount"] == 8 and detail["byAccount"][0]["providerAccountId"] == cx
    assert_sums_to(detail["endpoints"], detail["totals"])
    assert_sums_to(detail["buckets"], detail["totals"])
    # Two hours: the previous window now holds the first two requests too.
    _, dash = await kleis.admin("GET", f"/admin/usage/dashboard?windowMs={2 * HOUR}", expect=200)
    assert dash["totals"]["requestCount"] == 12 and dash["previousTotals"]["requestCount"] == 0


async def test_export_csv_and_json(db_url, start_kleis, codex_fake, claude_fake):
    kleis, *_ = await scenario(start_kleis, db_url, codex_fake, claude_fake)
    stored = await kleis.buckets()
    async with kleis.http.get(
        kleis.url + f"/admin/usage/export?windowMs={2 * HOUR}&format=csv", headers=kleis.admin_headers
    ) as resp:
        assert resp.status == 200 and resp.content_type == "text/csv"
        raw = await resp.read()
    assert raw.startswith(b"bucketStart,apiKeyId,") and raw.endswith(b"\r\n")
    table = list(csv.DictReader(io.StringIO(raw.decode())))
    assert len(table) == len(stored)
    assert sum(int(r["requestCount"]) for r in table) == sum(r["request_count"] for r in stored) == 15
    async with kleis.http.get(
        kleis.url + f"/admin/usage/export?windowMs={2 * HOUR}&format=json", headers=kleis.admin_headers
    ) as resp:
        listed = json.loads(await resp.read())
    assert [r["requestCount"] for r in listed] == [int(r["requestCount"]) for r in table]
    assert set(listed[0]) == set(analytics.EXPORT_HEADER)
    # Only the window: the first two requests are an hour older.
    async with kleis.http.get(
        kleis.url + "/admin/usage/export?windowMs=1800000&format=json", headers=kleis.admin_headers
    ) as resp:
        assert sum(r["requestCount"] for r in json.loads(await resp.read())) == 13
    status, body = await kleis.admin("GET", "/admin/usage/export?format=xml")
    assert status == 400 and "format must be csv or json" in body["message"]


async def test_export_pages_through_many_rows(start_kleis):
    kleis = await start_kleis(clock=ManualClock(T0))
    rows = [
        {
            "bucket_start": T0 - i * 60_000,
            "api_key_id": f"k{i % 7}",
            "provider_account_id": "a",
            "provider": "codex",
            "endpoint": "responses",
            "model": 'm,"q"',
            "request_count": 1,
            "last_request_at": T0,
        }
        for i in range(1200)
    ]
    await kleis.services.store.add_usage(rows)
    seen = [r async for r in analytics.export_rows(kleis.services.store, 90 * 86_400_000, T0, page=100)]
    assert len(seen) == 1200 and len(set(seen)) == 1200
    async with kleis.http.get(
        kleis.url + "/admin/usage/export?windowMs=86400000", headers=kleis.admin_headers
    ) as r:
        table = list(csv.reader(io.StringIO((await r.read()).decode())))
    assert len(table) == 1201 and table[1][5] == 'm,"q"'  # RFC 4180 quoting survives


@pytest.mark.parametrize("raw", ["", "abc", "0", "-5", "1.5", "59999", str(90 * 86_400_000 + 1), "9" * 30])
async def test_window_is_validated(start_kleis, raw):
    kleis = await start_kleis()
    for path in (
        "/admin/usage/dashboard",
        "/admin/keys/usage",
        "/admin/accounts/usage",
        "/admin/usage/export",
    ):
        status, body = await kleis.admin("GET", f"{path}?windowMs={raw}")
        assert status == 400 and body["error"] == "bad_request", (path, body)
        assert "windowMs must be an integer from 60000 (1 minute) to 7776000000 (90 days)" in body["message"]


@pytest.mark.parametrize(
    ("window", "size", "count"),
    [
        (HOUR, 60_000, 61),
        (HOUR + 60_000, 300_000, 14),
        (6 * HOUR, 300_000, 73),
        (6 * HOUR + 60_000, 900_000, 26),
        (24 * HOUR, 900_000, 97),
        (24 * HOUR + 60_000, HOUR, 26),
        (7 * 24 * HOUR, HOUR, 169),
        (7 * 24 * HOUR + 60_000, 4 * HOUR, 44),
        (90 * 24 * HOUR, 4 * HOUR, 541),
    ],
)
async def test_bucket_sizes_at_each_boundary_and_empty_buckets_are_zero(start_kleis, window, size, count):
    now = T0 - 10 * 60_000  # on a 4 h mark: the first and last buckets are partial
    kleis = await start_kleis(clock=ManualClock(now))
    await kleis.services.store.add_usage(
        [
            {
                "bucket_start": now - 120_000,
                "api_key_id": "k",
                "provider_account_id": "a",
                "provider": "codex",
                "endpoint": "responses",
                "model": "m",
                "request_count": 4,
                "success_count": 4,
                "last_request_at": now - 100_000,
            }
        ]
    )
    _, dash = await kleis.admin("GET", f"/admin/usage/dashboard?windowMs={window}", expect=200)
    assert bucket_size_ms(window) == dash["bucketSizeMs"] == size
    starts = [b["bucketStart"] for b in dash["buckets"]]
    assert len(starts) == count and all(b - a == size for a, b in itertools.pairwise(starts))
    assert starts[0] <= dash["since"] < starts[0] + size and starts[-1] <= now < starts[-1] + size
    assert sum(b["requestCount"] for b in dash["buckets"]) == 4
    empty = [b for b in dash["buckets"] if not b["requestCount"]]
    assert len(empty) == count - 1 and all(b["successRate"] is None and b["inputTokens"] == 0 for b in empty)


async def test_hourly_rollup_is_exact_across_hours_and_purges(db_url, start_kleis):
    kleis = await start_kleis(db_url=db_url, clock=ManualClock(T0))
    store = kleis.services.store
    base = {"api_key_id": "k", "provider_account_id": "a", "provider": "codex", "endpoint": "responses",
            "model": "m", "success_count": 1, "last_request_at": T0}  # fmt: skip
    minutes = [T0 - i * 7 * 60_000 for i in range(40)]  # ~4.6 h of minutes, several per hour
    for _ in range(2):  # the second write updates every row (the trigger's update path)
        await store.add_usage([{**base, "bucket_start": m, "request_count": 1} for m in minutes])
    for since in (T0 - 5 * HOUR, T0 - 3 * HOUR - 60_000, T0 - 2 * HOUR + 17 * 60_000):
        (row,) = await store.usage_sums(since)
        assert row["request_count"] == 2 * sum(1 for m in minutes if m >= since), since
        assert await store.usage_sums(since, T0 - HOUR) == await store.usage_sums(since, T0 - HOUR)
        (part,) = await store.usage_sums(since, T0 - HOUR + 60_000)
        assert part["request_count"] == 2 * sum(1 for m in minutes if since <= m < T0 - HOUR + 60_000)
    await store.purge(T0 - 2 * HOUR, 0)
    hourly = await store.rows("request_usage_hourly")
    assert sum(r["request_count"] for r in hourly) == 2 * sum(1 for m in minutes if m >= T0 - 2 * HOUR)


def test_p95_interpolates_inside_its_bin():
    sums = dict.fromkeys(TTFB_BINS, 0)
    sums["ttfb_le_250"], sums["ttfb_le_500"] = 90, 10  # 95th of 100 is the 5th of 10 in (250, 500]
    assert percentile(sums, TTFB_BINS, TTFB_BOUNDS_MS) == 375
    assert percentile({}, TTFB_BINS, TTFB_BOUNDS_MS) is None
    assert percentile({"ttfb_gt_10000": 3}, TTFB_BINS, TTFB_BOUNDS_MS, top=30_000) == 29_000
    assert percentile({"ttfb_gt_10000": 3}, TTFB_BINS, TTFB_BOUNDS_MS) == 10_000
    view = averaged({"request_count": 2, "success_count": 1, "cancelled_count": 1, "ttfb_le_100": 2})
    assert view["successRate"] == 100 and view["p95LatencyMs"] == 95 and "ttfbLe100" not in view
    # the largest TTFB seen caps it: requests of 1-3 ms are not reported as a 95 ms p95
    fast = averaged({"request_count": 2, "success_count": 2, "ttfb_le_100": 2, "max_latency_ms": 3})
    assert fast["p95LatencyMs"] == 3


async def test_cli_usage_by_every_dimension(tmp_path, start_kleis, codex_fake, claude_fake, cli_run):
    kleis, *_ = await scenario(start_kleis, None, codex_fake, claude_fake)
    for by, first in (("key", "a"), ("provider", "codex"), ("model", "codex/gpt-5.5"), ("account", "cx")):
        data = json.loads(
            await asyncio.to_thread(
                cli_run, kleis.config_path, "usage", "--by", by, "--window", "2d", "--json"
            )
        )
        assert data["by"] == by and data["totals"]["requestCount"] == 12
        assert sum(r["requestCount"] for r in data["rows"]) == 12
        table = await asyncio.to_thread(cli_run, kleis.config_path, "usage", "--by", by, "--window", "2d")
        assert first in table and "total" in table and "p95 TTFB ms" in table
    data = json.loads(
        await asyncio.to_thread(cli_run, kleis.config_path, "usage", "--window", "30m", "--json")
    )
    assert data["windowMs"] == 1_800_000 and data["totals"]["requestCount"] == 0


@pytest.fixture
def cli_run(capsys, monkeypatch):
    """`cli_run(config, *args, code=0)` runs the CLI in this process and returns its stdout
    (stderr too when `code` is not 0), putting back the loggers main() replaces."""
    import kleis as app

    monkeypatch.setenv("COLUMNS", "250")
    names = ("", "sanic.root", "sanic.error", "sanic.access", "sanic.server")

    def run(config, *args: str, code: int = 0) -> str:
        saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).propagate) for n in names}
        level = logging.getLogger().level
        capsys.readouterr()
        try:
            assert app.main(["--config", str(config), *args]) == code
        finally:
            for n, (handlers, propagate) in saved.items():
                logging.getLogger(n).handlers[:] = handlers
                logging.getLogger(n).propagate = propagate
            logging.getLogger().setLevel(level)
        out, err = capsys.readouterr()
        return out if code == 0 else err

    return run


def test_cli_window_errors(tmp_path, cli_run):
    cli_run(tmp_path / "c.toml", "init")
    for bad in ("5x", "0m", "91d", "abc"):
        assert "--window must be" in cli_run(tmp_path / "c.toml", "usage", "--window", bad, code=2)
