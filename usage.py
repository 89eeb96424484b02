"""Kleis usage accounting: what one proxied request's outcome counts as, the /metrics
counters, and the arithmetic of usage reports.

A sibling of kleis.py rather than a section of it because it is pure (no I/O, no Sanic, no
database), it is exercised on its own by the usage and metrics tests, and it keeps kleis.py
within its size budget. The write path (UsageQueue, the bucket upserts) stays in kleis.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from providers import Usage

USAGE_COUNTERS = (
    "request_count", "success_count", "client_error_count", "server_error_count", "auth_error_count",
    "rate_limit_count", "proxy_error_count", "upstream_error_count", "incomplete_count", "cancelled_count",
    "total_latency_ms", "total_duration_ms", "input_tokens", "output_tokens", "cache_read_tokens",
    "cache_write_tokens",
)  # fmt: skip

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
    ttfb_ms: int = 0
    duration_ms: int = 0
    usage: Usage | None = None
    incomplete: bool = False
    cancelled: bool = False


C = {name: i for i, name in enumerate(USAGE_COUNTERS)}
MAX_LATENCY, LAST_AT = len(USAGE_COUNTERS), len(USAGE_COUNTERS) + 1


def classify(outcome: Outcome) -> dict[str, int]:
    """Mutually exclusive outcome counters (prior art §5.2, plus incomplete and cancelled:
    a cancelled request is neither a success nor an error; a cut stream is an upstream error)."""
    status, counts = outcome.status, {"request_count": 1}
    if outcome.cancelled:
        counts["cancelled_count"] = 1
        return counts
    if outcome.incomplete:
        counts.update(incomplete_count=1, server_error_count=1, upstream_error_count=1)
        return counts
    if 200 <= status < 400:
        counts["success_count"] = 1
        return counts
    if status == 429:
        counts["rate_limit_count"] = 1
        return counts
    if status in (401, 403):
        counts["auth_error_count"] = 1
    elif 400 <= status < 500:
        counts["client_error_count"] = 1
    else:
        counts["server_error_count"] = 1
    counts["proxy_error_count" if outcome.source == "proxy" else "upstream_error_count"] = 1
    return counts


class Metrics:
    """In-process counters and histograms for /metrics (Prometheus text format)."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.ttfb: dict[str, list[float]] = {}
        self.duration: dict[str, list[float]] = {}

    def observe(self, outcome: Outcome) -> None:
        klass = "cancelled" if outcome.cancelled else "incomplete" if outcome.incomplete else f"{outcome.status // 100}xx"
        key = (outcome.provider, outcome.endpoint, klass)
        self.requests[key] = self.requests.get(key, 0) + 1
        self._add(self.ttfb, outcome.provider, outcome.ttfb_ms / 1000)
        self._add(self.duration, outcome.provider, outcome.duration_ms / 1000)

    def _add(self, table: dict[str, list[float]], provider: str, seconds: float) -> None:
        row = table.get(provider)
        if row is None:
            row = table[provider] = [0.0] * (len(self.BUCKETS) + 2)  # buckets, +Inf, sum
        for i, bound in enumerate(self.BUCKETS):
            if seconds <= bound:
                row[i] += 1
        row[-2] += 1
        row[-1] += seconds

    def render(self, open_streams: int, refresh_outcomes: Mapping[str, int], queue_depth: int, dropped: int,
               flush_failures: int, flush_lag_s: float, accounts: Mapping[tuple[str, str], int]) -> str:
        """The exposition text; `accounts` counts accounts by (provider, status)."""
        lines = ["# TYPE kleis_requests_total counter"]
        for (provider, endpoint, klass), count in sorted(self.requests.items()):
            lines.append(f'kleis_requests_total{{provider="{provider}",endpoint="{endpoint}",status="{klass}"}} {count}')
        for name, table in (("kleis_ttfb_seconds", self.ttfb), ("kleis_duration_seconds", self.duration)):
            lines.append(f"# TYPE {name} histogram")
            for provider, row in sorted(table.items()):
                for bound, count in zip((*self.BUCKETS, "+Inf"), row[:-1], strict=True):
                    lines.append(f'{name}_bucket{{provider="{provider}",le="{bound}"}} {int(count)}')
                lines.append(f'{name}_sum{{provider="{provider}"}} {row[-1]:.6f}')
                lines.append(f'{name}_count{{provider="{provider}"}} {int(row[-2])}')
        lines.append("# TYPE kleis_open_streams gauge")
        lines.append(f"kleis_open_streams {open_streams}")
        lines.append("# TYPE kleis_refresh_total counter")
        for outcome, count in sorted(refresh_outcomes.items()):
            lines.append(f'kleis_refresh_total{{outcome="{outcome}"}} {count}')
        lines += ["# TYPE kleis_usage_queue_depth gauge", f"kleis_usage_queue_depth {queue_depth}",
                  "# TYPE kleis_usage_dropped_total counter", f"kleis_usage_dropped_total {dropped}",
                  "# TYPE kleis_usage_flush_failures_total counter",
                  f"kleis_usage_flush_failures_total {flush_failures}",
                  "# TYPE kleis_usage_flush_lag_seconds gauge", f"kleis_usage_flush_lag_seconds {flush_lag_s:.3f}"]
        lines.append("# TYPE kleis_accounts gauge")
        for (provider, status), count in sorted(accounts.items()):
            lines.append(f'kleis_accounts{{provider="{provider}",status="{status}"}} {count}')
        return "\n".join(lines) + "\n"


def averaged(sums: Mapping[str, int]) -> dict:
    """AveragedTotals (prior art §5.5) from summed counters."""
    requests = sums.get("request_count", 0) or 0
    success = sums.get("success_count", 0) or 0
    proxy = sums.get("proxy_error_count", 0) or 0
    upstream = sums.get("upstream_error_count", 0) or 0
    failures = (sums.get("client_error_count", 0) or 0) + (sums.get("server_error_count", 0) or 0) + (
        sums.get("auth_error_count", 0) or 0)
    unattributed = max(0, failures - proxy - upstream)
    scored = success + proxy + unattributed
    out = {camel(n): int(sums.get(n, 0) or 0) for n in USAGE_COUNTERS if n not in ("total_latency_ms", "total_duration_ms")}
    out.update(
        successRate=round(100 * success / scored) if scored else None,
        avgLatencyMs=round((sums.get("total_latency_ms", 0) or 0) / requests) if requests else 0,
        avgDurationMs=round((sums.get("total_duration_ms", 0) or 0) / requests) if requests else 0,
        maxLatencyMs=int(sums.get("max_latency_ms", 0) or 0),
        lastRequestAt=sums.get("last_request_at"),
    )
    return out


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p.title() for p in rest)
