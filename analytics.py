"""Kleis usage analytics: the read side of the usage buckets (prior art §5.5 plus our columns).

Every report is built from `Store.usage_sums` (summed bucket counters, whole hours read from the
hourly rollup) and shaped here: camelCase fields, averages, p95s from the latency histograms,
the success rate, breakdowns and chart buckets. Times are epoch milliseconds.

Conventions shared by every report:
- **count_tokens calls are not requests.** Rows of the `count_tokens` endpoint (Claude's token
  counting) add only to `countTokensCount`; every other counter, `requestCount` and
  `successRate` included, covers billable requests alone. A report's `countTokens` holds the
  full AveragedTotals of those calls. So every breakdown still sums to its totals, for
  `requestCount` and for `countTokensCount` alike.
- **Success rate** = round(100 x success / (success + proxyErrors + unattributed)), `null`
  when that is 0; unattributed = max(0, client + server + auth - proxy - upstream) errors. So
  a client's cancellation, an upstream 429 or any error the upstream answered (cut streams
  included) never lowers it: it measures Kleis.
- **Latency.** `avgLatencyMs` is the mean time to first byte, `avgDurationMs` the mean time
  to the last byte; `p95LatencyMs` / `p95DurationMs` are interpolated linearly inside the
  histogram bin holding the 95th percentile (bins: store.TTFB_BOUNDS_MS, DURATION_BOUNDS_MS;
  the open last bin reports its lower bound, or for TTFB up to `maxLatencyMs`), `null` without
  data.
"""

from __future__ import annotations

import asyncio
import operator
from collections.abc import Iterable, Mapping

from store import (
    DURATION_BINS,
    DURATION_BOUNDS_MS,
    TTFB_BINS,
    TTFB_BOUNDS_MS,
    USAGE_COUNTERS,
    USAGE_DIMENSIONS,
    Store,
)

MINUTE_MS = 60_000
HOUR_MS = 3_600_000
DAY_MS = 86_400_000
COUNT_TOKENS = "count_tokens"
BREAKDOWN_LIMIT = 120  # rows per dashboard breakdown (prior art §5.5)
DETAIL_BUCKETS = 60  # minute buckets in a key or account detail
HIDDEN = {"total_latency_ms", "total_duration_ms", *TTFB_BINS, *DURATION_BINS}
ZERO = {**dict.fromkeys(USAGE_COUNTERS, 0), "max_latency_ms": None, "last_request_at": None}


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)


def bucket_size_ms(window_ms: int) -> int:
    """The chart's bucket size for a window: ≤1 h → 1 min, ≤6 h → 5 min, ≤24 h → 15 min,
    ≤7 d → 1 h, else 4 h (prior art §5.5)."""
    for limit, size in ((HOUR_MS, 60_000), (6 * HOUR_MS, 300_000), (DAY_MS, 900_000), (7 * DAY_MS, HOUR_MS)):
        if window_ms <= limit:
            return size
    return 4 * HOUR_MS


def window_start(now: int, window_ms: int) -> int:
    """The first minute bucket of the window ending `now`: bucketStart(now - windowMs)."""
    since = now - window_ms
    return since - since % MINUTE_MS


def percentile(sums: Mapping, bins: tuple[str, ...], bounds: tuple[int, ...], top: int | None = None,
               q: float = 0.95) -> int | None:  # fmt: skip
    """The q-quantile (ms) of a histogram: linear inside its bin; the open last bin gives its
    lower bound, or up to `top` when that is larger. `top` (the largest value seen) also caps
    the result, so 1 ms requests in the 0-100 ms bin do not report a 95 ms p95. None when the
    histogram is empty."""
    counts = [int(sums.get(b) or 0) for b in bins]
    total = sum(counts)
    if not total:
        return None
    target, seen = q * total, 0
    for i, count in enumerate(counts):
        if count and seen + count >= target:
            low = bounds[i - 1] if i else 0
            high = bounds[i] if i < len(bounds) else max(low, top or low)
            if top is not None and low <= top < high:
                high = top
            return round(low + (high - low) * (target - seen) / count)
        seen += count
    return bounds[-1]  # not reached: the loop ends at the last non-empty bin


def averaged(sums: Mapping[str, int | None], count_tokens: int = 0) -> dict:
    """AveragedTotals (prior art §5.5) from summed counters: every counter in camelCase
    (incompleteCount and cancelledCount included), `successRate` (percent, see the module
    docstring, None without scored requests), `avgLatencyMs` (TTFB) and `avgDurationMs` (0
    without requests), `p95LatencyMs` / `p95DurationMs` (None without data), `maxLatencyMs`,
    `lastRequestAt` (None) and `countTokensCount`."""

    def get(name: str) -> int:
        return int(sums.get(name) or 0)

    requests, success = get("request_count"), get("success_count")
    failures = get("client_error_count") + get("server_error_count") + get("auth_error_count")
    unattributed = max(0, failures - get("proxy_error_count") - get("upstream_error_count"))
    scored = success + get("proxy_error_count") + unattributed
    out = {camel(n): get(n) for n in USAGE_COUNTERS if n not in HIDDEN}
    out.update(
        successRate=round(100 * success / scored) if scored else None,
        avgLatencyMs=round(get("total_latency_ms") / requests) if requests else 0,
        avgDurationMs=round(get("total_duration_ms") / requests) if requests else 0,
        p95LatencyMs=percentile(sums, TTFB_BINS, TTFB_BOUNDS_MS, top=sums.get("max_latency_ms")),
        p95DurationMs=percentile(sums, DURATION_BINS, DURATION_BOUNDS_MS),
        maxLatencyMs=get("max_latency_ms"),
        lastRequestAt=sums.get("last_request_at"),
        countTokensCount=count_tokens,
    )
    return out


# ══ Folding store rows ══════════════════════════════════════════════════════


class Sums:
    """Summed counters of billable requests plus the count of count_tokens calls, for one group.

    The counters are one list summed with `map` (a dashboard folds thousands of grouped rows
    five ways; a Python loop per column made that the slowest part of it)."""

    __slots__ = ("count_tokens", "last_request_at", "max_latency_ms", "totals")

    def __init__(self) -> None:
        self.totals: list = [0] * len(USAGE_COUNTERS)
        self.count_tokens = 0
        self.max_latency_ms = None
        self.last_request_at = None

    def add(self, row: Mapping) -> None:
        if row.get("count_tokens"):
            self.count_tokens += int(row["request_count"] or 0)
            return
        self.totals = list(map(operator.add, self.totals, COUNTER_VALUES(row)))
        self._keep_max(row["max_latency_ms"], row["last_request_at"])

    def merge(self, other: Sums) -> None:
        """Add another group's sums (for folding a fold further)."""
        self.count_tokens += other.count_tokens
        self.totals = list(map(operator.add, self.totals, other.totals))
        self._keep_max(other.max_latency_ms, other.last_request_at)

    def _keep_max(self, latency, last) -> None:
        if latency is not None and (self.max_latency_ms is None or latency > self.max_latency_ms):
            self.max_latency_ms = latency
        if last is not None and (self.last_request_at is None or last > self.last_request_at):
            self.last_request_at = last

    def view(self) -> dict:
        counters = dict(zip(USAGE_COUNTERS, self.totals, strict=True))
        counters.update(max_latency_ms=self.max_latency_ms, last_request_at=self.last_request_at)
        return averaged(counters, self.count_tokens)


COUNTER_VALUES = operator.itemgetter(*USAGE_COUNTERS)


def fold(rows: Iterable[Mapping], *columns: str) -> dict[tuple, Sums]:
    """Rows of `usage_sums` (grouped by at least `columns` and "count_tokens") added up per
    value of `columns`."""
    groups: dict[tuple, Sums] = {}
    for row in rows:
        key = tuple(row[c] for c in columns)
        sums = groups.get(key)
        if sums is None:
            sums = groups[key] = Sums()
        sums.add(row)
    return groups


def refold(groups: Mapping[tuple, Sums], width: int) -> dict[tuple, Sums]:
    """`groups` keyed by more columns, added up by the first `width` of them."""
    out: dict[tuple, Sums] = {}
    for key, sums in groups.items():
        target = out.get(key[:width])
        if target is None:
            target = out[key[:width]] = Sums()
        target.merge(sums)
    return out


def count_tokens_totals(rows: Iterable[Mapping]) -> dict:
    """AveragedTotals of the count_tokens calls among `rows` (countTokensCount = requestCount)."""
    sums = Sums()
    for row in rows:
        if row.get("count_tokens"):
            sums.add({**row, "count_tokens": 0})
            sums.count_tokens += int(row["request_count"] or 0)
    return sums.view()


def summary_key(row: dict) -> tuple:
    """Summary order: requestCount desc, then lastRequestAt desc (count_tokens breaks ties)."""
    return (-row["requestCount"], -(row["lastRequestAt"] or 0), -row["countTokensCount"])


def by_requests(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=summary_key)


def model_rank(row: dict) -> tuple:
    """Prior art's model ranking: a named model +2, any success +1, then requests, output and
    input tokens, last request (all descending)."""
    score = (2 if row["model"] else 0) + (1 if row["successCount"] else 0)
    return (
        -score,
        -row["requestCount"],
        -row["outputTokens"],
        -row["inputTokens"],
        -(row["lastRequestAt"] or 0),
    )


def filled_buckets(rows: Iterable[Mapping], since: int, now: int, size: int) -> list[dict]:
    """Every chart bucket from the one holding `since` to the one holding `now`, ascending,
    zeros where nothing was recorded."""
    groups = fold(rows, "bucket")
    first, last = since - since % size, now - now % size
    empty = Sums()
    return [
        {"bucketStart": start, **groups.get((start,), empty).view()} for start in range(first, last + 1, size)
    ]


# ══ Reports ═════════════════════════════════════════════════════════════════

DIMS = USAGE_DIMENSIONS[1:]  # api_key_id, provider_account_id, provider, endpoint, model


async def dashboard(store: Store, window_ms: int, now: int) -> dict:
    """`GET /admin/usage/dashboard`: `{windowMs, since, now, bucketSizeMs, totals,
    previousTotals (the window before: [since - windowMs, since)), countTokens, byProvider,
    byEndpoint, byModel, byKey, byAccount (each ≤ 120 rows, AveragedTotals with their
    dimensions), buckets (filled, ascending)}`."""
    since, size = window_start(now, window_ms), bucket_size_ms(window_ms)
    # Three independent scans, run at once: each runs on its own pooled connection, and the
    # database works on them in parallel (about a third off a 30-day dashboard).
    rows, chart, previous = await asyncio.gather(
        store.usage_sums(since, group_by=(*DIMS, COUNT_TOKENS)),
        store.usage_sums(since, group_by=(COUNT_TOKENS,), bucket_size=size),
        store.usage_sums(since - window_ms, since, group_by=(COUNT_TOKENS,)),
    )

    def breakdown(groups: Mapping[tuple, Sums], *columns: str, key=summary_key) -> list[dict]:
        views = [
            {camel(c): v for c, v in zip(columns, values, strict=True)} | sums.view()
            for values, sums in groups.items()
        ]
        return sorted(views, key=key)[:BREAKDOWN_LIMIT]

    # The rows are folded three ways; endpoints, providers and the totals come from the model
    # fold (a fold of a fold costs as many steps as it has groups, not rows).
    models = fold(rows, "provider", "endpoint", "model")
    endpoints = refold(models, 2)
    providers = refold(endpoints, 1)
    return {
        "windowMs": window_ms,
        "since": since,
        "now": now,
        "bucketSizeMs": size,
        "totals": refold(providers, 0).get((), Sums()).view(),
        "previousTotals": fold(previous).get((), Sums()).view(),
        "countTokens": count_tokens_totals(rows),
        "byProvider": breakdown(providers, "provider"),
        "byEndpoint": breakdown(endpoints, "provider", "endpoint"),
        "byModel": breakdown(models, "provider", "endpoint", "model", key=model_rank),
        "byKey": breakdown(fold(rows, "api_key_id"), "api_key_id"),
        "byAccount": breakdown(fold(rows, "provider_account_id"), "provider_account_id"),
        "buckets": filled_buckets(chart, since, now, size),
    }


async def summaries(store: Store, window_ms: int, now: int, by: str) -> list[dict]:
    """`GET /admin/keys/usage` (`by` = "api_key_id") and `GET /admin/accounts/usage`
    ("provider_account_id"): one row per key (account) with usage in the window,
    `{apiKeyId|providerAccountId, …AveragedTotals, providers: [{provider, …}]}`, most
    requests first; providers likewise."""
    rows = await store.usage_sums(window_start(now, window_ms), group_by=(by, "provider", COUNT_TOKENS))
    providers: dict[str, list[dict]] = {}
    for (owner, provider), sums in fold(rows, by, "provider").items():
        providers.setdefault(owner, []).append({"provider": provider, **sums.view()})
    return by_requests(
        [
            {camel(by): owner, **sums.view(), "providers": by_requests(providers[owner])}
            for (owner,), sums in fold(rows, by).items()
        ]
    )


async def detail(store: Store, window_ms: int, now: int, **equal: str) -> dict:
    """Key or account detail (`equal`: api_key_id= or provider_account_id=): `{windowMs,
    since, now, totals, countTokens, endpoints (provider+endpoint, requests desc), models
    (ranked as prior art), buckets (the most recent 60 minute buckets with data, ascending)}`
    plus `byAccount` for a key, `apiKeys` for an account (AveragedTotals per other dimension,
    most requests first)."""
    since = window_start(now, window_ms)
    other = "provider_account_id" if "api_key_id" in equal else "api_key_id"
    rows = await store.usage_sums(
        since, group_by=("provider", "endpoint", "model", other, COUNT_TOKENS), **equal
    )
    recent = max(since, now - now % MINUTE_MS - (DETAIL_BUCKETS - 1) * MINUTE_MS)
    minutes = await store.usage_sums(recent, group_by=(COUNT_TOKENS,), bucket_size=MINUTE_MS, **equal)
    endpoints = [
        {"provider": p, "endpoint": e, **s.view()} for (p, e), s in fold(rows, "provider", "endpoint").items()
    ]
    models = [
        {"provider": p, "endpoint": e, "model": m, **s.view()}
        for (p, e, m), s in fold(rows, "provider", "endpoint", "model").items()
    ]
    buckets = [{"bucketStart": b, **s.view()} for (b,), s in sorted(fold(minutes, "bucket").items())]
    report = {
        "windowMs": window_ms,
        "since": since,
        "now": now,
        "totals": fold(rows).get((), Sums()).view(),
        "countTokens": count_tokens_totals(rows),
        "endpoints": by_requests(endpoints),
        "models": sorted(models, key=model_rank),
        "buckets": buckets,
    }
    owners = by_requests([{camel(other): o, **s.view()} for (o,), s in fold(rows, other).items()])
    report["byAccount" if other == "provider_account_id" else "apiKeys"] = owners
    return report


# ══ Export ══════════════════════════════════════════════════════════════════

EXPORT_COLUMNS = (*USAGE_DIMENSIONS, *USAGE_COUNTERS, "max_latency_ms", "last_request_at")
EXPORT_HEADER = tuple(camel(c) for c in EXPORT_COLUMNS)


async def export_rows(store: Store, window_ms: int, now: int, page: int = 5000):
    """The stored minute buckets of the window, as tuples in EXPORT_COLUMNS order, in
    primary-key order, read `page` rows at a time (memory stays bounded at any size)."""
    since, after = window_start(now, window_ms), None
    while True:
        rows = await store.usage_rows(since, after, page)
        for row in rows:
            yield tuple(int(row[c]) if c not in DIMS else row[c] for c in EXPORT_COLUMNS)
        if len(rows) < page:
            return
        after = tuple(rows[-1][c] for c in USAGE_DIMENSIONS)
