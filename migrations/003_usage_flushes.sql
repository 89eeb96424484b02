-- Usage flush idempotency (issue 10): the last committed batch of each usage writer.
CREATE TABLE IF NOT EXISTS usage_flushes (
    writer TEXT PRIMARY KEY,
    batch BIGINT NOT NULL,
    written_at BIGINT NOT NULL
);
