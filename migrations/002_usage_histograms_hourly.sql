-- Issue 10 (analytics): latency histograms per bucket, and the hourly rollup table filled from
-- the minute buckets already stored (store.py's triggers keep it current from then on).
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_le_100 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_le_250 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_le_500 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_le_1000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_le_2500 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_le_5000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_le_10000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN ttfb_gt_10000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_le_1000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_le_2500 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_le_5000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_le_10000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_le_20000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_le_40000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_le_80000 INTEGER NOT NULL DEFAULT 0;
ALTER TABLE request_usage_buckets ADD COLUMN duration_gt_80000 INTEGER NOT NULL DEFAULT 0;
INSERT INTO request_usage_hourly (bucket_start, api_key_id, provider_account_id, provider, endpoint, model, request_count, success_count, client_error_count, server_error_count, auth_error_count, rate_limit_count, proxy_error_count, upstream_error_count, incomplete_count, cancelled_count, total_latency_ms, total_duration_ms, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, max_latency_ms, last_request_at)
SELECT bucket_start / 3600000 * 3600000, api_key_id, provider_account_id, provider, endpoint, model,
    SUM(request_count),
    SUM(success_count),
    SUM(client_error_count),
    SUM(server_error_count),
    SUM(auth_error_count),
    SUM(rate_limit_count),
    SUM(proxy_error_count),
    SUM(upstream_error_count),
    SUM(incomplete_count),
    SUM(cancelled_count),
    SUM(total_latency_ms),
    SUM(total_duration_ms),
    SUM(input_tokens),
    SUM(output_tokens),
    SUM(cache_read_tokens),
    SUM(cache_write_tokens),
    MAX(max_latency_ms), MAX(last_request_at)
FROM request_usage_buckets
GROUP BY bucket_start / 3600000 * 3600000, api_key_id, provider_account_id, provider, endpoint, model;
