-- Kleis schema: the only table definitions. Applied at every start-up (idempotent).
-- Portable subset of SQLite and PostgreSQL: text ids made in Python, BIGINT epoch-ms times,
-- INTEGER 0/1 booleans, JSON as TEXT, no triggers (the file is split on semicolons).
-- Later changes go into migrations/NNN_name.sql and this file stays the full current schema.

CREATE TABLE IF NOT EXISTS schema_migrations (
    version TEXT PRIMARY KEY,
    applied_at BIGINT NOT NULL
);

-- OAuth accounts. Tokens are encrypted with [security] secret_key.
CREATE TABLE IF NOT EXISTS provider_accounts (
    id TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    account_id TEXT,
    is_primary INTEGER NOT NULL DEFAULT 0 CHECK (is_primary IN (0, 1)),
    enabled INTEGER NOT NULL DEFAULT 1 CHECK (enabled IN (0, 1)),
    priority INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'ok',
    access_token_enc TEXT NOT NULL,
    refresh_token_enc TEXT NOT NULL,
    expires_at BIGINT NOT NULL,
    metadata_json TEXT NOT NULL DEFAULT '{}',
    cooldown_until BIGINT,
    cooldown_kind TEXT,
    last_error TEXT,
    last_refresh_at BIGINT,
    last_refresh_status TEXT,
    refresh_lock_token TEXT,
    refresh_lock_expires_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS provider_accounts_provider_idx ON provider_accounts (provider);
CREATE UNIQUE INDEX IF NOT EXISTS provider_accounts_primary_unique
    ON provider_accounts (provider) WHERE is_primary = 1;
CREATE UNIQUE INDEX IF NOT EXISTS provider_accounts_identity_unique
    ON provider_accounts (provider, account_id) WHERE account_id IS NOT NULL;

-- Kleis API keys: only the SHA-256 of the key is stored; key_prefix is for display.
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    key_prefix TEXT NOT NULL,
    models_discovery_token TEXT NOT NULL,
    label TEXT,
    provider_scope_json TEXT,
    model_scope_json TEXT,
    account_scope_json TEXT,
    expires_at BIGINT,
    revoked_at BIGINT,
    created_at BIGINT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_key_hash_unique ON api_keys (key_hash);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_discovery_unique ON api_keys (models_discovery_token);

-- Logins in progress. data_enc holds the PKCE verifier or device code, encrypted.
CREATE TABLE IF NOT EXISTS oauth_states (
    state TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    method TEXT NOT NULL,
    data_enc TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    result_account_id TEXT,
    message TEXT,
    interval_ms BIGINT NOT NULL DEFAULT 5000,
    expires_at BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS oauth_states_expires_idx ON oauth_states (expires_at);

-- Usage per minute x key x account x provider x endpoint x model; writes are additive upserts.
CREATE TABLE IF NOT EXISTS request_usage_buckets (
    bucket_start BIGINT NOT NULL,
    api_key_id TEXT NOT NULL,
    provider_account_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    request_count INTEGER NOT NULL DEFAULT 0,
    success_count INTEGER NOT NULL DEFAULT 0,
    client_error_count INTEGER NOT NULL DEFAULT 0,
    server_error_count INTEGER NOT NULL DEFAULT 0,
    auth_error_count INTEGER NOT NULL DEFAULT 0,
    rate_limit_count INTEGER NOT NULL DEFAULT 0,
    proxy_error_count INTEGER NOT NULL DEFAULT 0,
    upstream_error_count INTEGER NOT NULL DEFAULT 0,
    incomplete_count INTEGER NOT NULL DEFAULT 0,
    cancelled_count INTEGER NOT NULL DEFAULT 0,
    total_latency_ms BIGINT NOT NULL DEFAULT 0,
    max_latency_ms BIGINT NOT NULL DEFAULT 0,
    total_duration_ms BIGINT NOT NULL DEFAULT 0,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    last_request_at BIGINT NOT NULL,
    -- Latency histograms (store.TTFB_BOUNDS_MS, DURATION_BOUNDS_MS): requests by TTFB and by
    -- duration; ttfb_le_250 counts 100 < ttfb <= 250 ms, *_gt_* is the open last bin.
    ttfb_le_100 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_250 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_500 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_1000 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_2500 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_5000 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_10000 INTEGER NOT NULL DEFAULT 0,
    ttfb_gt_10000 INTEGER NOT NULL DEFAULT 0,
    duration_le_1000 INTEGER NOT NULL DEFAULT 0,
    duration_le_2500 INTEGER NOT NULL DEFAULT 0,
    duration_le_5000 INTEGER NOT NULL DEFAULT 0,
    duration_le_10000 INTEGER NOT NULL DEFAULT 0,
    duration_le_20000 INTEGER NOT NULL DEFAULT 0,
    duration_le_40000 INTEGER NOT NULL DEFAULT 0,
    duration_le_80000 INTEGER NOT NULL DEFAULT 0,
    duration_gt_80000 INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, api_key_id, provider_account_id, provider, endpoint, model)
);
CREATE INDEX IF NOT EXISTS request_usage_buckets_key_bucket_idx
    ON request_usage_buckets (api_key_id, bucket_start);
CREATE INDEX IF NOT EXISTS request_usage_buckets_account_bucket_idx
    ON request_usage_buckets (provider_account_id, bucket_start);
CREATE INDEX IF NOT EXISTS request_usage_buckets_bucket_idx ON request_usage_buckets (bucket_start);

-- The same buckets summed per hour (bucket_start a multiple of 3 600 000), so analytics over
-- long windows read ~60x fewer rows. Never written by Kleis directly: triggers that store.py
-- installs at start-up (generated from the column list; SQLite and PostgreSQL dialects, so not
-- in this file) add every insert, update and delete of request_usage_buckets to it, in the
-- same transaction. max_latency_ms and last_request_at stay maxima after a delete.
CREATE TABLE IF NOT EXISTS request_usage_hourly (
    bucket_start BIGINT NOT NULL,
    api_key_id TEXT NOT NULL,
    provider_account_id TEXT NOT NULL,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    model TEXT NOT NULL DEFAULT '',
    request_count INTEGER NOT NULL DEFAULT 0,
    success_count INTEGER NOT NULL DEFAULT 0,
    client_error_count INTEGER NOT NULL DEFAULT 0,
    server_error_count INTEGER NOT NULL DEFAULT 0,
    auth_error_count INTEGER NOT NULL DEFAULT 0,
    rate_limit_count INTEGER NOT NULL DEFAULT 0,
    proxy_error_count INTEGER NOT NULL DEFAULT 0,
    upstream_error_count INTEGER NOT NULL DEFAULT 0,
    incomplete_count INTEGER NOT NULL DEFAULT 0,
    cancelled_count INTEGER NOT NULL DEFAULT 0,
    total_latency_ms BIGINT NOT NULL DEFAULT 0,
    max_latency_ms BIGINT NOT NULL DEFAULT 0,
    total_duration_ms BIGINT NOT NULL DEFAULT 0,
    input_tokens BIGINT NOT NULL DEFAULT 0,
    output_tokens BIGINT NOT NULL DEFAULT 0,
    cache_read_tokens BIGINT NOT NULL DEFAULT 0,
    cache_write_tokens BIGINT NOT NULL DEFAULT 0,
    last_request_at BIGINT NOT NULL,
    ttfb_le_100 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_250 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_500 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_1000 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_2500 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_5000 INTEGER NOT NULL DEFAULT 0,
    ttfb_le_10000 INTEGER NOT NULL DEFAULT 0,
    ttfb_gt_10000 INTEGER NOT NULL DEFAULT 0,
    duration_le_1000 INTEGER NOT NULL DEFAULT 0,
    duration_le_2500 INTEGER NOT NULL DEFAULT 0,
    duration_le_5000 INTEGER NOT NULL DEFAULT 0,
    duration_le_10000 INTEGER NOT NULL DEFAULT 0,
    duration_le_20000 INTEGER NOT NULL DEFAULT 0,
    duration_le_40000 INTEGER NOT NULL DEFAULT 0,
    duration_le_80000 INTEGER NOT NULL DEFAULT 0,
    duration_gt_80000 INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (bucket_start, api_key_id, provider_account_id, provider, endpoint, model)
);
CREATE INDEX IF NOT EXISTS request_usage_hourly_key_bucket_idx
    ON request_usage_hourly (api_key_id, bucket_start);
CREATE INDEX IF NOT EXISTS request_usage_hourly_account_bucket_idx
    ON request_usage_hourly (provider_account_id, bucket_start);

-- Cache generations: an admin change bumps a row; every instance polls and reloads (S14).
CREATE TABLE IF NOT EXISTS cache_versions (
    name TEXT PRIMARY KEY,
    version BIGINT NOT NULL
);

-- Usage flush idempotency: the last batch each usage writer (one per running instance) has
-- committed, written in the same transaction as its buckets, so a batch retried after a lost
-- commit acknowledgement is recognised and skipped. Rows idle for 7 days are purged.
CREATE TABLE IF NOT EXISTS usage_flushes (
    writer TEXT PRIMARY KEY,
    batch BIGINT NOT NULL,
    written_at BIGINT NOT NULL
);

-- Running servers: which secret keys each one can open (vault key ids, the sealing key first),
-- refreshed every 30 s and deleted at shutdown. `rotate-secret` refuses to re-encrypt with a
-- key that a server seen in the last 90 s does not seal with, so no server loses its accounts.
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    key_ids TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL
);
