-- Running servers (issue 12, rotate-secret): which secret keys each one can open, the sealing
-- key first, so `rotate-secret` refuses to re-encrypt with a key a running server lacks.
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid BIGINT NOT NULL,
    key_ids TEXT NOT NULL,
    started_at BIGINT NOT NULL,
    seen_at BIGINT NOT NULL
);
