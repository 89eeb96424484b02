"""Storage: schema.sql is the only schema, the models match it, on SQLite and PostgreSQL."""

import sqlite3

import pytest

import kleis


def sqlite_columns(path) -> dict[str, list[str]]:
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}


async def test_models_match_schema_sqlite(tmp_path):
    kleis_db = await started(tmp_path, f"sqlite:///{tmp_path}/k.db")
    columns = sqlite_columns(tmp_path / "k.db")
    for model in kleis.MODELS:
        table = model._meta.table_name
        assert [f.column_name for f in model._meta.sorted_fields] == columns[table], table
    with sqlite3.connect(tmp_path / "k.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await kleis_db.close()


async def test_models_match_schema_postgresql(tmp_path, pg_url):
    import psycopg

    services = await started(tmp_path, pg_url)
    with psycopg.connect(pg_url) as conn:
        for model in kleis.MODELS:
            table = model._meta.table_name
            rows = conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position",
                (table,)).fetchall()
            assert [f.column_name for f in model._meta.sorted_fields] == [r[0] for r in rows], table
    await services.close()


async def started(tmp_path, url):
    path = tmp_path / "config.toml"
    path.write_text(f'[security]\nsecret_key = "{"x" * 32}"\n[database]\nurl = "{url}"\n'
                    '[models]\nsource_url = ""\n')
    services = kleis.Services.build(kleis.load_settings(path, env={}))
    await services.open()
    return services


async def test_schema_is_idempotent_and_migrations_are_recorded(tmp_path, db_url, monkeypatch):
    services = await started(tmp_path, db_url)
    await services.close()
    # A second start applies schema.sql again without error and keeps data.
    services = await started(tmp_path, db_url)
    key, _ = await kleis.create_key(services, {"label": "x"})
    await services.close()
    # A migration added later runs once on an existing database and is recorded.
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_add_note.sql").write_text("ALTER TABLE api_keys ADD COLUMN note TEXT;")
    monkeypatch.setattr(kleis, "MIGRATIONS_DIR", migrations)
    services = await started(tmp_path, db_url)
    rows = list(await kleis.SchemaMigrationRow.select().aio_execute())
    assert [r.version for r in rows] == ["001_add_note"]
    await services.keys.load()
    assert services.keys.authenticate(key, services.now()) is not None
    await services.close()
    services = await started(tmp_path, db_url)  # not run twice
    assert len(list(await kleis.SchemaMigrationRow.select().aio_execute())) == 1
    await services.close()


async def test_tokens_are_encrypted_at_rest(tmp_path, db_url):
    services = await started(tmp_path, db_url)
    tokens = kleis.Tokens(access_token="at-plain-123", refresh_token="rt-plain-456",
                          expires_at=services.now() + 3_600_000, account_id="acct")
    account = await services.pool.upsert("codex", tokens)
    row = await kleis.ProviderAccountRow.select().where(kleis.ProviderAccountRow.id == account.id).aio_first()
    assert "at-plain-123" not in row.access_token_enc and "rt-plain-456" not in row.refresh_token_enc
    assert services.vault.open(row.access_token_enc) == "at-plain-123"
    # Upserting the same identity updates, never duplicates.
    await services.pool.upsert("codex", kleis.Tokens("at-2", "rt-2", services.now() + 3_600_000, account_id="acct"))
    assert len(list(await kleis.ProviderAccountRow.select().aio_execute())) == 1
    assert services.pool.accounts[account.id].access_token == "at-2"
    # A wrong secret key cannot read them and says what happened.
    with pytest.raises(kleis.ConfigError, match="secret_key changed"):
        kleis.Vault("another-secret-key-123").open(row.access_token_enc)
    await services.close()


async def test_usage_upserts_are_additive(tmp_path, db_url):
    services = await started(tmp_path, db_url)
    queue = services.usage
    usage = kleis.providers.Usage(input_tokens=10, output_tokens=5, cache_read_tokens=2)
    for status in (200, 200, 429, 502):
        queue.record(kleis.Outcome(key_id="k", provider="codex", endpoint="responses", model="m", account_id="a",
                                   status=status, source="upstream", ttfb_ms=10, duration_ms=30, usage=usage))
    await queue.flush()
    queue.record(kleis.Outcome(key_id="k", provider="codex", endpoint="responses", model="m", account_id="a",
                               status=200, source="upstream", ttfb_ms=50, duration_ms=60, usage=usage))
    await queue.flush()
    rows = list(await kleis.UsageBucketRow.select().dicts().aio_execute())
    if len(rows) == 2:  # the minute turned between the two flushes
        rows = [{k: sum(r[k] for r in rows) if isinstance(rows[0][k], int) else rows[0][k] for k in rows[0]}]
    row = rows[0]
    assert (row["request_count"], row["success_count"], row["rate_limit_count"], row["server_error_count"],
            row["upstream_error_count"]) == (5, 3, 1, 1, 1)
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]) == (50, 25, 10)
    assert row["total_latency_ms"] == 90 and row["total_duration_ms"] == 180
    await services.close()


async def test_flush_failure_keeps_the_rows(tmp_path):
    services = await started(tmp_path, f"sqlite:///{tmp_path}/k.db")
    queue = services.usage
    queue.record(kleis.Outcome(key_id="k", provider="codex", endpoint="responses", status=200, source="upstream"))
    await services.db.aio_execute_sql("ALTER TABLE request_usage_buckets RENAME TO broken")
    assert await queue.flush() == 0
    assert queue.depth == 1 and queue.flush_failures == 1
    await services.db.aio_execute_sql("ALTER TABLE broken RENAME TO request_usage_buckets")
    assert await queue.flush() == 1 and queue.depth == 0
    await services.close()
