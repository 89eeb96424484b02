"""Storage: schema.sql is the only schema, the models match it, on SQLite and PostgreSQL; each
store is its own (two in one process share nothing); writes are additive and never lost."""

import sqlite3

import pytest

import kleis
from providers import Tokens, Usage
from settings import ConfigError, Vault, load_settings
from usage import Outcome


def sqlite_columns(path) -> dict[str, list[str]]:
    with sqlite3.connect(path) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: [r[1] for r in conn.execute(f"PRAGMA table_info({t})")] for t in tables}


async def started(tmp_path, url, name: str = "config.toml") -> kleis.Instance:
    path = tmp_path / name
    path.write_text(
        f'[security]\nsecret_key = "{"x" * 32}"\n[database]\nurl = "{url}"\n[models]\nsource_url = ""\n'
    )
    instance = kleis.Instance(load_settings(path, env={}))
    await instance.open()
    return instance


async def test_models_match_schema_sqlite(tmp_path):
    instance = await started(tmp_path, f"sqlite:///{tmp_path}/k.db")
    columns = sqlite_columns(tmp_path / "k.db")
    for table, names in instance.store.model_columns().items():
        assert names == columns[table], table
    with sqlite3.connect(tmp_path / "k.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    await instance.close()


async def test_models_match_schema_postgresql(tmp_path, pg_url):
    import psycopg

    instance = await started(tmp_path, pg_url)
    with psycopg.connect(pg_url) as conn:
        for table, names in instance.store.model_columns().items():
            rows = conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s"
                " ORDER BY ordinal_position",
                (table,),
            ).fetchall()
            assert names == [r[0] for r in rows], table
    await instance.close()


async def test_schema_is_idempotent_and_migrations_are_recorded(tmp_path, db_url, monkeypatch):
    import store

    instance = await started(tmp_path, db_url)
    await instance.close()
    # A second start applies schema.sql again without error and keeps data.
    instance = await started(tmp_path, db_url)
    key, _ = await instance.keys.create(label="x")
    shipped = await instance.store.migrations()  # a fresh database records the repo's own
    await instance.close()
    # A migration added later runs once on an existing database and is recorded.
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "001_add_note.sql").write_text("ALTER TABLE api_keys ADD COLUMN note TEXT;")
    monkeypatch.setattr(store, "MIGRATIONS_DIR", migrations)
    instance = await started(tmp_path, db_url)
    assert await instance.store.migrations() == sorted([*shipped, "001_add_note"])
    assert instance.keys.authenticate(key) is not None
    await instance.close()
    instance = await started(tmp_path, db_url)  # not run twice
    assert await instance.store.migrations() == sorted([*shipped, "001_add_note"])
    await instance.close()


async def test_two_instances_in_one_process_share_nothing(tmp_path, db_url):
    """Each instance owns its database: a key made through one is not in the other's, and
    closing one leaves the other working."""
    first = await started(tmp_path, db_url, "first.toml")
    second = await started(tmp_path, f"sqlite:///{tmp_path}/second.db", "second.toml")
    key, record = await first.keys.create(label="only-in-first")
    await second.keys.load()
    assert second.keys.authenticate(key) is None and await second.store.rows("api_keys") == []
    assert [r["id"] for r in await first.store.rows("api_keys")] == [record.id]
    await second.close()
    other, _ = await first.keys.create(label="after-close")  # the first's pool is untouched
    await first.keys.load()
    assert first.keys.authenticate(other) is not None and len(await first.store.rows("api_keys")) == 2
    await first.close()


async def test_tokens_are_encrypted_at_rest(tmp_path, db_url):
    instance = await started(tmp_path, db_url)
    now = instance.clock.now()
    tokens = Tokens(
        access_token="at-plain-123",
        refresh_token="rt-plain-456",
        expires_at=now + 3_600_000,
        account_id="acct",
    )
    account = await instance.pool.upsert("codex", tokens)
    (row,) = await instance.store.rows("provider_accounts", id=account.id)
    assert "at-plain-123" not in row["access_token_enc"] and "rt-plain-456" not in row["refresh_token_enc"]
    assert instance.store.vault.open(row["access_token_enc"]) == "at-plain-123"
    # Upserting the same identity updates, never duplicates.
    await instance.pool.upsert("codex", Tokens("at-2", "rt-2", now + 3_600_000, account_id="acct"))
    assert len(await instance.store.rows("provider_accounts")) == 1
    assert instance.pool.accounts[account.id].access_token == "at-2"
    # A wrong secret key cannot read them and says what happened.
    with pytest.raises(ConfigError, match="secret_key changed"):
        Vault("another-secret-key-123").open(row["access_token_enc"])
    await instance.close()


def outcome(status: int, **extra) -> Outcome:
    return Outcome(
        key_id="k",
        provider="codex",
        endpoint="responses",
        model="m",
        account_id="a",
        status=status,
        source="upstream",
        **extra,
    )


async def test_usage_upserts_are_additive(tmp_path, db_url):
    instance = await started(tmp_path, db_url)
    queue = instance.usage
    usage = Usage(input_tokens=10, output_tokens=5, cache_read_tokens=2)
    for status in (200, 200, 429, 502):
        queue.record(outcome(status, ttfb_ms=10, duration_ms=30, usage=usage))
    await queue.flush()
    queue.record(outcome(200, ttfb_ms=50, duration_ms=60, usage=usage))
    await queue.flush()
    rows = await instance.store.rows("request_usage_buckets")
    if len(rows) == 2:  # the minute turned between the two flushes
        rows = [{k: sum(r[k] for r in rows) if isinstance(rows[0][k], int) else rows[0][k] for k in rows[0]}]
    row = rows[0]
    assert (
        row["request_count"],
        row["success_count"],
        row["rate_limit_count"],
        row["server_error_count"],
        row["upstream_error_count"],
    ) == (5, 3, 1, 1, 1)
    assert (row["input_tokens"], row["output_tokens"], row["cache_read_tokens"]) == (50, 25, 10)
    assert row["total_latency_ms"] == 90 and row["total_duration_ms"] == 180 and row["max_latency_ms"] == 50
    await instance.close()


async def test_flush_failure_keeps_the_rows(tmp_path):
    instance = await started(tmp_path, f"sqlite:///{tmp_path}/k.db")
    queue = instance.usage
    queue.record(outcome(200))
    await instance.store.db.aio_execute_sql("ALTER TABLE request_usage_buckets RENAME TO broken")
    assert await queue.flush() == 0
    assert queue.depth == 1 and queue.flush_failures == 1
    queue.record(outcome(500))  # arrives while the first is waiting: merged, not lost
    await instance.store.db.aio_execute_sql("ALTER TABLE broken RENAME TO request_usage_buckets")
    assert await queue.flush() == 1 and queue.depth == 0
    (row,) = await instance.store.rows("request_usage_buckets")
    assert (row["request_count"], row["success_count"], row["server_error_count"]) == (2, 1, 1)
    await instance.close()


# One process, each order: SQLite first (psycopg stays unimported, then is handed to peewee
# when PostgreSQL opens) and psycopg imported before Kleis (peewee binds it itself).
DRIVER_SCRIPT = """
import asyncio, sys
from pathlib import Path
if sys.argv[3] == "psycopg-first":
    import psycopg
import kleis
from settings import load_settings

async def run(url, name):
    path = Path(sys.argv[1]) / name
    path.write_text(f'[security]\\nsecret_key = "{"x" * 32}"\\n[database]\\nurl = "{url}"\\n'
                    '[models]\\nsource_url = ""\\n')
    instance = kleis.Instance(load_settings(path, env={}))
    await instance.open()
    key, _ = await instance.keys.create(label=name)
    assert [k.label for k in await instance.store.list_keys()] == [name]
    await instance.close()

asyncio.run(run(f"sqlite:///{sys.argv[1]}/k.db", "sqlite.toml"))
print("after sqlite:", "psycopg" in sys.modules, "psycopg_pool" in sys.modules, "rich" in sys.modules)
asyncio.run(run(sys.argv[2], "pg.toml"))
print("after postgresql:", "psycopg" in sys.modules)
"""


@pytest.mark.parametrize("order", ["sqlite-first", "psycopg-first"])
def test_sqlite_instances_do_not_load_the_postgresql_driver(tmp_path, pg_url, order):
    """Idle memory (issue 14): psycopg is ~10 MB resident that an instance on SQLite never uses;
    peewee imports it whenever it is installed, so store.py hides it until PostgreSQL opens.
    An instance opened on PostgreSQL afterwards, in the same process, still works."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", DRIVER_SCRIPT, str(tmp_path), pg_url, order],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first = order == "psycopg-first"
    # rich (the CLI's tables, ~1 MB) is not loaded by what `serve` runs either.
    assert done.stdout.splitlines() == [f"after sqlite: {first} False False", "after postgresql: True"]


async def test_sqlite_version_polls_keep_one_connection_and_see_other_writers(tmp_path):
    """The poll every instance runs 4 times a second reads through one kept SQLite connection
    (not a new connection and thread per poll), sees another process's commits at once, and
    opens a fresh connection after a failed read."""
    url = f"sqlite:///{tmp_path}/k.db"
    reader = await started(tmp_path, url, "reader.toml")
    writer = await started(tmp_path, url, "writer.toml")
    store = reader.store
    before = await store.read_versions()
    kept = store._version_reader
    assert kept is not None
    await writer.store.bump_version("keys")
    after = await store.read_versions()
    assert after["keys"] == before.get("keys", 0) + 1
    assert store._version_reader is kept  # the same connection for every poll
    await kept.close()  # the connection breaks under the poll
    with pytest.raises(ValueError):
        await store.read_versions()
    assert store._version_reader is None
    await writer.store.bump_version("keys")
    assert (await store.read_versions())["keys"] == after["keys"] + 1  # reopened
    await writer.close()
    await reader.close()
    assert store._version_reader is None


async def test_sqlite_version_poll_reads_a_database_file_restored_under_it(tmp_path):
    """A restore (another file moved over the database while the server runs): the kept poll
    connection would read the old file for ever; `fresh` (POST /admin/reload) makes the poll
    read the file now at that path (so does the connection's age, READER_MAX_AGE_S)."""
    import os

    reader = await started(tmp_path, f"sqlite:///{tmp_path}/a.db", "a.toml")
    before = await reader.store.read_versions()
    other = await started(tmp_path, f"sqlite:///{tmp_path}/b.db", "b.toml")
    for _ in range(3):
        await other.store.bump_version("keys")
    restored = (await other.store.read_versions())["keys"]
    assert restored != before.get("keys")
    await other.close()  # checkpointed: b.db holds everything
    os.replace(tmp_path / "b.db", tmp_path / "a.db")
    assert await reader.store.read_versions() == before  # still the old file
    assert (await reader.store.read_versions(fresh=True))["keys"] == restored
    await reader.close()
