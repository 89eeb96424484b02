"""Dashboard query time at 1 million bucket rows (issue 10). Not collected by pytest.

    .venv/bin/python tests/bench_analytics.py [--rows 1000000] [--db sqlite|postgresql|both]

Generates the rows through `Store.add_usage` (so the hourly rollup triggers run as in
production) into a fresh SQLite file / PostgreSQL database, then times `analytics.dashboard`
for a 30-day window (and a few others), median of 5 runs after one warm-up.

The data set is shaped like real use: 20 keys, 8 accounts, 8 provider/endpoint/model
combinations; ~23 sessions are active in any minute, each a (key, account, model) that lasts
1-3 hours (sticky accounts), so each minute has ~23 bucket rows and 1 M rows span ~30 days.
`--uniform` instead draws every minute's 23 combinations at random from all 1 280 (the worst
case for the hourly rollup: almost no two minutes of an hour share a row).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import analytics
from settings import Vault
from store import DURATION_BINS, TTFB_BINS, Store

PG_DSN = os.environ.get("KLEIS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
MINUTE, DAY = 60_000, 86_400_000
COMBOS = [("codex", "responses", m) for m in ("gpt-5.5", "gpt-5.4", "gpt-5.5-mini")]
COMBOS += [("claude", "messages", m) for m in ("claude-sonnet-4-5", "claude-opus-4-1")]
COMBOS += [("claude", "count_tokens", "claude-sonnet-4-5")]
COMBOS += [("copilot", "chat_completions", m) for m in ("gpt-4.1", "claude-sonnet-4")]


def generate(total: int, now: int, uniform: bool, seed: int = 1):
    """Yield bucket rows, oldest minute first, ~23 per minute, ending at `now`."""
    rnd = random.Random(seed)
    keys, accounts = [f"key{i}" for i in range(20)], [f"acct{i}" for i in range(8)]
    everything = [(k, a, *c) for k in keys for a in accounts for c in COMBOS]
    per_minute = 23
    minute = now - now % MINUTE - (total // per_minute) * MINUTE
    sessions: list[list] = []  # [dims, minutes left]
    made = 0
    while made < total:
        if uniform:
            active = rnd.sample(everything, per_minute)
        else:
            sessions = [s for s in sessions if s[1] > 0]
            while len(sessions) < per_minute:
                dims = rnd.choice(everything)
                if all(s[0] != dims for s in sessions):
                    sessions.append([dims, rnd.randint(60, 180)])
            for s in sessions:
                s[1] -= 1
            active = [s[0] for s in sessions]
        for key, account, provider, endpoint, model in active:
            n = rnd.randint(1, 6)
            ok = n - (rnd.random() < 0.1)
            row = {
                "bucket_start": minute, "api_key_id": key, "provider_account_id": account,
                "provider": provider, "endpoint": endpoint, "model": model,
                "request_count": n, "success_count": ok, "server_error_count": n - ok,
                "upstream_error_count": n - ok, "total_latency_ms": n * 800, "total_duration_ms": n * 9000,
                "max_latency_ms": 2000, "input_tokens": n * 3000, "output_tokens": n * 400,
                "cache_read_tokens": n * 20000, "last_request_at": minute + 30_000,
                TTFB_BINS[3]: n, DURATION_BINS[3]: n,
            }  # fmt: skip
            yield row
            made += 1
            if made >= total:
                return
        minute += MINUTE


async def bench(url: str, rows: int, uniform: bool, now: int) -> dict:
    store = Store(url, Vault(secrets.token_urlsafe(24)))
    await store.open()
    started, batch = time.perf_counter(), []
    for row in generate(rows, now, uniform):
        batch.append(row)
        if len(batch) == 20_000:
            await store.add_usage(batch)
            batch = []
    if batch:
        await store.add_usage(batch)
    load_s = time.perf_counter() - started
    if not store.is_sqlite:
        await store.db.aio_execute_sql("ANALYZE")
    (count,) = await store.usage_sums(0)
    hourly = len(await store.rows("request_usage_hourly"))
    results = {"load_s": round(load_s, 1), "requests": count["request_count"], "hourly_rows": hourly}
    for label, window in (("30d", 30 * DAY), ("7d", 7 * DAY), ("24h", DAY), ("1h", 3_600_000)):
        times = []
        for _ in range(6):
            t = time.perf_counter()
            report = await analytics.dashboard(store, window, now)
            times.append((time.perf_counter() - t) * 1000)
        results[f"dashboard_{label}_ms"] = round(statistics.median(times[1:]), 1)
        results[f"dashboard_{label}_requests"] = report["totals"]["requestCount"]
    await store.close()
    return results


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both")
    parser.add_argument("--uniform", action="store_true")
    args = parser.parse_args()
    now = int(time.time() * 1000)
    if args.db in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as tmp:
            print(
                "sqlite", await bench(f"sqlite:///{tmp}/bench.db", args.rows, args.uniform, now), flush=True
            )
    if args.db in ("postgresql", "both"):
        import psycopg

        name = "kleis_bench_" + secrets.token_hex(4)
        with psycopg.connect(PG_DSN, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            url = PG_DSN.rsplit("/", 1)[0] + "/" + name
            print("postgresql", await bench(url, args.rows, args.uniform, now), flush=True)
        finally:
            with psycopg.connect(PG_DSN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
