"""Kleis usage accounting: what one proxied request counts as, adding it up in memory,
flushing it to the store, and the /metrics counters (the reports are analytics.py's).

The request path only calls `UsageQueue.record` (no await, no I/O, never raises). One
background loop flushes the pending minute buckets as additive upserts every
`flush_interval`; a failed flush keeps them (bounded) and retries with backoff, never
counting a batch twice; shutdown drains them.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import random
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from providers import Usage
from runtime import Clock
from store import (
    DURATION_BINS,
    DURATION_BOUNDS_MS,
    TTFB_BINS,
    TTFB_BOUNDS_MS,
    USAGE_COUNTERS,
    USAGE_DIMENSIONS,
    Store,
    UsageWriteFailed,
)

log = logging.getLogger("kleis")
MINUTE_MS = 60_000


@dataclass
class Outcome:
    """One finished proxied request."""

    key_id: str
    provider: str
    endpoint: str
    model: str = ""
    account_id: str = "__missing__"
    status: int = 0
    source: str = "proxy"  # "proxy": Kleis answered; "upstream": the provider's status was relayed
    ttfb_ms: int | None = None  # None until the first byte (the proxy fills it in at the end)
    duration_ms: int = 0
    usage: Usage | None = None
    incomplete: bool = False
    cancelled: bool = False


def classify(outcome: Outcome) -> str:
    """The one outcome counter a request adds to besides `request_count` (prior art §5.2,
    plus incomplete and cancelled: a cancelled request is neither a success nor an error; a
    cut stream is an upstream server error). Returns a counter name; see `OUTCOME_COUNTERS`."""
    status = outcome.status
    if outcome.cancelled:
        return "cancelled"
    if outcome.incomplete:
        return "incomplete"
    if 200 <= status < 400:
        return "success"
    if status == 429:
        return "rate_limit"
    kind = "auth" if status in (401, 403) else "client" if 400 <= status < 500 else "server"
    return f"{kind}_{outcome.source}"


# What each outcome class adds, besides request_count.
OUTCOME_COUNTERS: dict[str, tuple[str, ...]] = {
    "cancelled": ("cancelled_count",),
    "incomplete": ("incomplete_count", "server_error_count", "upstream_error_count"),
    "success": ("success_count",),
    "rate_limit": ("rate_limit_count",),
    **{f"{kind}_{source}": (f"{kind}_error_count", f"{source}_error_count")
       for kind in ("auth", "client", "server") for source in ("proxy", "upstream")},
}  # fmt: skip


class Bucket:
    """The counters of one (minute, key, account, provider, endpoint, model) bucket."""

    __slots__ = (*USAGE_COUNTERS, "max_latency_ms", "last_request_at")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def add(self, other: Bucket) -> None:
        for name in USAGE_COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.max_latency_ms = max(self.max_latency_ms, other.max_latency_ms)
        self.last_request_at = max(self.last_request_at, other.last_request_at)

    def row(self, dimensions: tuple) -> dict:
        """The store row: dimensions and every counter by column name."""
        row = dict(zip(USAGE_DIMENSIONS, dimensions, strict=True))
        row.update((name, getattr(self, name)) for name in self.__slots__)
        return row


class UsageQueue:
    """Adds up outcomes per bucket in memory and writes them in batches.

    `record` (request path) adds to `pending`. `flush` writes `pending` as one numbered batch
    of this queue's `writer`; a batch that failed before its commit is merged back into
    `pending`, one whose commit may have happened (COMMIT failed or its answer was lost) is
    kept apart as `unsure` and retried unchanged under its number, which the store skips if it
    was committed (so nothing is counted twice). `tick` is the background loop's job: it
    flushes unless a failure asked it to back off (1 s doubling to 60 s, with jitter; a
    database that answers again after failing to answer is written at the next tick).
    Memory is bounded by `max_buckets`: beyond it the oldest buckets are dropped, counted in
    `dropped_buckets` / `dropped` (their requests) and logged once per episode."""

    RETRY_FIRST_S, RETRY_CAP_S = 1.0, 60.0

    def __init__(
        self,
        store: Store,
        clock: Clock,
        flush_interval: float,
        max_buckets: int = 200_000,
        lock_wait: float = 2.0,
    ):
        self.store = store
        self.clock = clock
        self.interval = flush_interval
        self.max_buckets = max_buckets
        self.lock_wait = lock_wait  # seconds a flush waits for a database lock before failing
        self.writer = secrets.token_hex(8)  # this queue's identity in usage_flushes
        self.pending: dict[tuple, Bucket] = {}
        self.unsure: tuple[int, dict[tuple, Bucket]] | None = None  # (batch, buckets) maybe committed
        self.batches = 0  # the last batch number handed out
        self.dropped = 0  # requests in dropped buckets
        self.dropped_buckets = 0
        self.recorded = 0
        self.flush_failures = 0
        self.failing = 0  # failed attempts since the last success
        self.retry_at = 0.0  # monotonic seconds: `tick` does not try before (while failing)
        self.skipped_batches = 0  # retried batches the store already had
        self.ticks = 0
        self.last_flush_ms = clock.now()
        self._unreachable = False  # the last probe while backing off failed
        self._warned_full = False
        self._writing: dict[tuple, Bucket] | None = None  # a new batch while its write runs
        self._lock = asyncio.Lock()

    def record(self, outcome: Outcome) -> None:
        """Request path: no await, no I/O, never raises."""
        at = self.clock.now()
        dims = (
            at - at % MINUTE_MS,
            outcome.key_id,
            outcome.account_id,
            outcome.provider,
            outcome.endpoint,
            outcome.model or "",
        )
        bucket = self.pending.get(dims)
        if bucket is None:
            if len(self.pending) + self._held_apart >= self.max_buckets:
                self._drop_oldest()
            bucket = self.pending[dims] = Bucket()
        bucket.request_count += 1
        for name in OUTCOME_COUNTERS[classify(outcome)]:
            setattr(bucket, name, getattr(bucket, name) + 1)
        ttfb = outcome.duration_ms if outcome.ttfb_ms is None else outcome.ttfb_ms
        bucket.total_latency_ms += ttfb
        bucket.total_duration_ms += outcome.duration_ms
        bucket.max_latency_ms = max(bucket.max_latency_ms, ttfb)
        ttfb_bin = TTFB_BINS[bisect.bisect_left(TTFB_BOUNDS_MS, ttfb)]
        setattr(bucket, ttfb_bin, getattr(bucket, ttfb_bin) + 1)
        duration_bin = DURATION_BINS[bisect.bisect_left(DURATION_BOUNDS_MS, outcome.duration_ms)]
        setattr(bucket, duration_bin, getattr(bucket, duration_bin) + 1)
        bucket.last_request_at = at
        usage = outcome.usage
        if usage is not None:
            bucket.input_tokens += usage.input_tokens
            bucket.output_tokens += usage.output_tokens
            bucket.cache_read_tokens += usage.cache_read_tokens
            bucket.cache_write_tokens += usage.cache_write_tokens
        self.recorded += 1

    @property
    def depth(self) -> int:
        """Buckets not known to be stored yet (pending, unsure, being written)."""
        return len(self.pending) + self._held_apart

    @property
    def _held_apart(self) -> int:
        unsure = 0 if self.unsure is None else len(self.unsure[1])
        return unsure + (0 if self._writing is None else len(self._writing))

    def _drop_oldest(self) -> None:
        """Make room: drop the oldest tenth of `max_buckets` (the unsure batch first, then
        pending in arrival order, which is minute order). Dropping a tenth at once keeps
        `record` O(1) amortised and the warning to one line per episode."""
        want = max(1, self.max_buckets // 10)
        for table in (self.unsure[1] if self.unsure else {}, self.pending):
            for dims in list(itertools.islice(table, want)):
                self.dropped += table.pop(dims).request_count
                self.dropped_buckets += 1
                want -= 1
            if not want:
                break
        if not self._warned_full:
            self._warned_full = True
            log.warning(
                "usage queue full (%d buckets waiting for the database): dropping the oldest; "
                "see kleis_usage_dropped_buckets_total",
                self.max_buckets,
            )

    async def tick(self) -> int:
        """The flusher loop's job: `flush`, unless backing off after a failure (then only a
        cheap probe of the database, which ends the backoff when it answers again)."""
        self.ticks += 1
        if self.failing and self.clock.monotonic() < self.retry_at and not await self._answers_again():
            return 0
        return await self.flush()

    async def _answers_again(self) -> bool:
        """True when the database answers after the last probe did not (restart, network)."""
        try:
            async with asyncio.timeout(self.lock_wait):
                await self.store.ping()
        except Exception:
            self._unreachable = True
            return False
        back, self._unreachable = self._unreachable, False
        return back

    async def flush(self) -> int:
        """Write everything waiting now, ignoring any backoff (shutdown, tests); returns the
        buckets written (0 when nothing was, or on failure: the rows are kept for the next
        try, see the class). Never raises for a database error; cancellation keeps the rows."""
        async with self._lock:
            written = 0
            for _ in range(2):  # the unsure batch, if any, then what is pending now
                if self.unsure is not None:
                    number, batch = self.unsure
                elif self.pending:
                    self.batches += 1
                    number, batch = self.batches, self.pending
                    self.pending = {}
                else:
                    break
                self._writing = batch if self.unsure is None else None
                try:
                    fresh = await self.store.add_usage(
                        (bucket.row(dims) for dims, bucket in list(batch.items())),
                        writer=self.writer,
                        batch=number,
                        lock_wait=self.lock_wait,
                    )
                except BaseException as exc:
                    self._writing = None
                    self._failed(number, batch, exc)
                    if isinstance(exc, UsageWriteFailed):
                        return written
                    raise
                self.unsure = self._writing = None
                if fresh:
                    written += len(batch)
                else:
                    self.skipped_batches += 1
                    log.info("usage batch %d was already stored (its commit was not acknowledged)", number)
            if self.failing:
                log.info("usage flush succeeded again after %d failed attempts", self.failing)
            self.failing, self._warned_full, self._unreachable = 0, False, False
            self.last_flush_ms = self.clock.now()
            return written

    def _failed(self, number: int, batch: dict[tuple, Bucket], exc: BaseException) -> None:
        """Keep a failed batch (see the class) and schedule the next try."""
        if self.unsure is None:
            if isinstance(exc, UsageWriteFailed) and not exc.maybe_committed:
                self._merge_back(batch)
            else:  # COMMIT failed, its answer was lost, or we were cancelled: maybe stored
                self.unsure = (number, batch)
        if not isinstance(exc, UsageWriteFailed):
            return
        self.flush_failures += 1
        self.failing += 1
        delay = min(self.RETRY_CAP_S, self.RETRY_FIRST_S * 2 ** min(self.failing - 1, 16))
        delay *= random.uniform(0.5, 1.0)  # instances that failed together do not retry together
        self.retry_at = self.clock.monotonic() + delay
        log.warning(
            "usage flush failed (%d buckets kept, attempt %d, next try in %.1f s): %s",
            self.depth,
            self.failing,
            delay,
            exc,
        )

    def _merge_back(self, batch: dict[tuple, Bucket]) -> None:
        for dims, bucket in batch.items():
            mine = self.pending.get(dims)
            if mine is None:
                self.pending[dims] = bucket
            else:
                mine.add(bucket)


# ══ /metrics ════════════════════════════════════════════════════════════════


class Metrics:
    """In-process counters and histograms for /metrics (Prometheus text format 0.0.4)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.ttfb: dict[str, list[float]] = {}
        self.duration: dict[str, list[float]] = {}

    def observe(self, outcome: Outcome) -> None:
        klass = (
            "cancelled"
            if outcome.cancelled
            else "incomplete"
            if outcome.incomplete
            else f"{outcome.status // 100}xx"
        )
        key = (outcome.provider, outcome.endpoint, klass)
        self.requests[key] = self.requests.get(key, 0) + 1
        ttfb = outcome.duration_ms if outcome.ttfb_ms is None else outcome.ttfb_ms
        self._add(self.ttfb, outcome.provider, ttfb / 1000)
        self._add(self.duration, outcome.provider, outcome.duration_ms / 1000)

    def _add(self, table: dict[str, list[float]], provider: str, seconds: float) -> None:
        row = table.get(provider)
        if row is None:
            # Per bucket, the observations that fell in it (not yet cumulative: render adds
            # them up), then +Inf (the count) and the sum: one bisect per observation.
            row = table[provider] = [0.0] * (len(self.BUCKETS) + 2)
        row[bisect.bisect_left(self.BUCKETS, seconds)] += 1
        row[-1] += seconds

    def render(
        self,
        open_streams: int,
        refresh_outcomes: Mapping[str, int],
        queue: UsageQueue,
        now: int,
        accounts: Mapping[tuple[str, str], int],
    ) -> str:
        """The exposition text; `accounts` counts accounts by (provider, status)."""
        lines = ["# TYPE kleis_requests_total counter"]
        for (provider, endpoint, klass), count in sorted(self.requests.items()):
            labels = f'provider="{provider}",endpoint="{endpoint}",status="{klass}"'
            lines.append(f"kleis_requests_total{{{labels}}} {count}")
        for name, table in (("kleis_ttfb_seconds", self.ttfb), ("kleis_duration_seconds", self.duration)):
            lines.append(f"# TYPE {name} histogram")
            for provider, row in sorted(table.items()):
                cumulative = 0
                for bound, count in zip((*self.BUCKETS, "+Inf"), row[:-1], strict=True):
                    cumulative += int(count)
                    lines.append(f'{name}_bucket{{provider="{provider}",le="{bound}"}} {cumulative}')
                lines.append(f'{name}_sum{{provider="{provider}"}} {row[-1]:.6f}')
                lines.append(f'{name}_count{{provider="{provider}"}} {cumulative}')
        lines.append("# TYPE kleis_open_streams gauge")
        lines.append(f"kleis_open_streams {open_streams}")
        lines.append("# TYPE kleis_refresh_total counter")
        for outcome, count in sorted(refresh_outcomes.items()):
            lines.append(f'kleis_refresh_total{{outcome="{outcome}"}} {count}')
        lag = max(0, now - queue.last_flush_ms) / 1000
        lines += [
            "# TYPE kleis_usage_queue_depth gauge",
            f"kleis_usage_queue_depth {queue.depth}",
            "# TYPE kleis_usage_dropped_total counter",
            f"kleis_usage_dropped_total {queue.dropped}",
            "# TYPE kleis_usage_dropped_buckets_total counter",
            f"kleis_usage_dropped_buckets_total {queue.dropped_buckets}",
            "# TYPE kleis_usage_flush_failures_total counter",
            f"kleis_usage_flush_failures_total {queue.flush_failures}",
            "# TYPE kleis_usage_flush_failing_attempts gauge",  # in a row; 0 once a flush succeeds
            f"kleis_usage_flush_failing_attempts {queue.failing}",
            "# TYPE kleis_usage_batches_skipped_total counter",
            f"kleis_usage_batches_skipped_total {queue.skipped_batches}",
            "# TYPE kleis_usage_flush_lag_seconds gauge",
            f"kleis_usage_flush_lag_seconds {lag:.3f}",
        ]
        lines.append("# TYPE kleis_accounts gauge")
        for (provider, status), count in sorted(accounts.items()):
            lines.append(f'kleis_accounts{{provider="{provider}",status="{status}"}} {count}')
        return "\n".join(lines) + "\n"
