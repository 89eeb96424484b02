"""Usage accounting on its own: what each outcome counts as, and the report arithmetic."""

import pytest

from analytics import averaged
from store import USAGE_COUNTERS
from usage import OUTCOME_COUNTERS, Bucket, Outcome, classify


def outcome(status: int = 200, source: str = "upstream", **extra) -> Outcome:
    return Outcome(key_id="k", provider="codex", endpoint="responses", status=status, source=source, **extra)


@pytest.mark.parametrize(
    ("case", "counters"),
    [
        (outcome(200), {"success_count"}),
        (outcome(302), {"success_count"}),
        (outcome(429), {"rate_limit_count"}),
        (outcome(401), {"auth_error_count", "upstream_error_count"}),
        (outcome(403, "proxy"), {"auth_error_count", "proxy_error_count"}),
        (outcome(400, "proxy"), {"client_error_count", "proxy_error_count"}),
        (outcome(404), {"client_error_count", "upstream_error_count"}),
        (outcome(502), {"server_error_count", "upstream_error_count"}),
        (outcome(503, "proxy"), {"server_error_count", "proxy_error_count"}),
        (outcome(200, incomplete=True), {"incomplete_count", "server_error_count", "upstream_error_count"}),
        (outcome(200, cancelled=True, incomplete=True), {"cancelled_count"}),
    ],
)
def test_each_outcome_adds_to_exactly_its_counters(case, counters):
    assert set(OUTCOME_COUNTERS[classify(case)]) == counters
    assert counters <= set(USAGE_COUNTERS)


def test_buckets_add_counters_and_keep_maxima():
    a, b = Bucket(), Bucket()
    a.request_count, a.input_tokens, a.max_latency_ms, a.last_request_at = 2, 10, 50, 1_000
    b.request_count, b.input_tokens, b.max_latency_ms, b.last_request_at = 3, 5, 20, 2_000
    a.add(b)
    row = a.row((0, "k", "a", "codex", "responses", "m"))
    assert (row["request_count"], row["input_tokens"], row["max_latency_ms"], row["last_request_at"]) == (
        5, 15, 50, 2_000)  # fmt: skip
    assert row["api_key_id"] == "k" and row["model"] == "m" and set(USAGE_COUNTERS) <= set(row)


def test_success_rate_leaves_out_rate_limits_cancellations_and_upstream_errors():
    sums = {"request_count": 10, "success_count": 6, "rate_limit_count": 1, "cancelled_count": 1,
            "server_error_count": 2, "upstream_error_count": 1, "proxy_error_count": 1,
            "total_latency_ms": 1000, "total_duration_ms": 5000, "max_latency_ms": 400}  # fmt: skip
    view = averaged(sums)
    assert view["successRate"] == round(100 * 6 / 7)  # 6 successes, 1 error Kleis made
    assert (view["avgLatencyMs"], view["avgDurationMs"], view["maxLatencyMs"]) == (100, 500, 400)
    assert averaged({})["successRate"] is None and averaged({})["avgLatencyMs"] == 0
