"""How many usage events the request path can record while the flusher writes them.

    .venv/bin/python -m tests.flusher_bench [--seconds 10] [--dims 2000] [--url sqlite:///… | postgresql://…]

A producer calls `UsageQueue.record` (what every proxied request does) in rounds of 500,
yielding to the event loop between rounds, while the flusher loop (`UsageQueue.tick`, every
`--interval` seconds, as in a running instance) writes batches to a real database. A ticker
measures how late the event loop runs a 5 ms timer: that is how long a request would wait.
Prints events/s, the loop's lag (p50/p99/max) and checks that the stored request count equals
what was recorded (nothing lost, nothing counted twice).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from providers import Usage
from runtime import Background, Clock
from settings import Vault
from store import Store
from usage import Outcome, UsageQueue


def outcomes(dims: int) -> list[Outcome]:
    """`dims` distinct (key, account, model) combinations, mixed outcomes, with tokens."""
    out = []
    for i in range(dims):
        out.append(
            Outcome(
                key_id=f"key-{i % 50}",
                provider=("codex", "claude", "copilot")[i % 3],
                endpoint="responses",
                model=f"model-{i // 150}",
                account_id=f"acct-{i % 7}",
                status=(200, 200, 200, 429, 502)[i % 5],
                source="upstream",
                ttfb_ms=120 + i % 300,
                duration_ms=900 + i % 4000,
                usage=Usage(input_tokens=1000 + i, output_tokens=200, cache_read_tokens=50),
            )
        )
    return out


async def run(url: str, seconds: float, dims: int, interval: float) -> dict:
    store = Store(url, Vault("bench-secret-key-0123456789"), Clock())
    await store.open()
    queue = UsageQueue(store, Clock(), interval)
    background = Background(__import__("logging").getLogger("bench"))
    background.every("usage-flusher", interval, queue.tick)
    events = outcomes(dims)
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker():
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            began = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - began - 0.005)

    lag_task = asyncio.ensure_future(ticker())
    recorded = 0
    began = time.perf_counter()
    deadline = began + seconds
    i = 0
    while time.perf_counter() < deadline:
        for _ in range(500):
            queue.record(events[i % dims])
            i += 1
        recorded += 500
        await asyncio.sleep(0)
    elapsed = time.perf_counter() - began
    stop.set()
    await lag_task
    await background.stop()
    written_at_stop = queue.depth
    await queue.flush()
    stored = sum(int(r["request_count"]) for r in await store.usage_sums(0))
    flushes = (await store.rows("usage_flushes"))[0]["batch"]
    await store.close()
    lags.sort()
    return {
        "url": url.split("@")[-1],
        "events_per_second": round(recorded / elapsed),
        "recorded": recorded,
        "stored": stored,
        "exact": stored == recorded,
        "batches": flushes,
        "pending_at_stop": written_at_stop,
        "loop_lag_ms_p50": round(statistics.median(lags) * 1000, 2),
        "loop_lag_ms_p99": round(lags[int(len(lags) * 0.99)] * 1000, 2),
        "loop_lag_ms_max": round(lags[-1] * 1000, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--dims", type=int, default=2000, help="distinct buckets per minute")
    parser.add_argument("--interval", type=float, default=1.0, help="flush_interval in seconds")
    parser.add_argument("--url", default="", help="database URL (default: a temporary SQLite file)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        url = args.url or f"sqlite:///{Path(tmp) / 'bench.db'}"
        result = asyncio.run(run(url, args.seconds, args.dims, args.interval))
    width = max(map(len, result))
    for name, value in result.items():
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
