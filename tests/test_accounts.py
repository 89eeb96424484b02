"""Accounts declared in the config: imported at start-up, idempotently, never clobbering newer tokens."""

import json

from providers import Cooldown, Tokens


async def rows(kleis) -> list[dict]:
    return await kleis.rows("provider_accounts")


async def test_config_accounts_import_idempotently(start_kleis, tmp_path, codex_fake, db_url):
    auth = tmp_path / "codex-auth.json"
    # A live login (imports are checked with the provider: a token it refuses is skipped).
    auth.write_text(json.dumps(codex_fake.codex_auth_file(account_id="acct_file")))
    grant = codex_fake.grant(account_id="acct_tokens")
    accounts = [
        {"provider": "codex", "label": "from-file", "auth_file": str(auth), "priority": 2},
        {
            "provider": "codex",
            "label": "from-tokens",
            "access_token": grant["access_token"],
            "refresh_token": grant["refresh_token"],
            "expires_at": grant["expires_at"],
        },
    ]
    first = await start_kleis(db_url=db_url, accounts=accounts)
    stored = sorted(await rows(first), key=lambda r: r["label"])
    assert [(r["label"], r["account_id"], r["priority"]) for r in stored] == [
        ("from-file", "acct_file", 2),
        ("from-tokens", "config:from-tokens", 0),
    ]
    assert json.loads(auth.read_text())["tokens"]["refresh_token"] not in str(stored)  # encrypted
    assert stored[0]["is_primary"] == 1 and stored[1]["is_primary"] == 0
    # Kleis refreshes one account; a restart must keep the newer tokens, not re-apply the file's.
    # (the file's token expires within the hour; the refreshed one later)
    tokens = Tokens("newer-access", "newer-refresh", 1_924_992_000_000, account_id="acct_file")
    await first.services.pool.upsert("codex", tokens)
    await first.stop()
    second = await start_kleis(db_url=db_url, accounts=accounts)
    again = sorted(await rows(second), key=lambda r: r["label"])
    assert len(again) == 2 and [r["id"] for r in again] == [r["id"] for r in stored]
    by_id = second.services.pool.accounts
    assert by_id[again[0]["id"]].access_token == "newer-access"


async def test_config_account_with_missing_file_is_skipped_with_a_warning(start_kleis, tmp_path, caplog):
    kleis_ = await start_kleis(accounts=[{"provider": "codex", "auth_file": str(tmp_path / "nope.json")}])
    assert await rows(kleis_) == []
    assert any("cannot import" in r.getMessage() for r in caplog.records)
    assert kleis_.services.pool.accounts == {}


async def test_a_reload_keeps_a_cooldown_whose_write_is_still_on_its_way(start_kleis, codex_fake, db_url):
    """Another instance's change reloads the pool; a cooldown set a moment ago must survive it,
    and clearing it right after (admin) must win over the write still in flight."""
    kleis = await start_kleis(db_url=db_url)
    account = await kleis.import_account("codex", codex_fake.grant())
    pool = kleis.services.pool
    pool.cool_down(pool.get(account["id"]), Cooldown(30), "upstream answered HTTP 429", kind="transient")
    await pool.load()  # before the background write has had a chance to land
    assert pool.get(account["id"]).cooling(kleis.clock.now())
    await kleis.admin("DELETE", f"/admin/accounts/{account['id']}/cooldown", expect=200)
    await kleis.services.background.drain()
    (row,) = await kleis.rows("provider_accounts", id=account["id"])
    assert row["cooldown_until"] is None and not pool.get(account["id"]).cooling(kleis.clock.now())
