"""The command line as a home-server owner uses it day to day (issue 12): the URL laptops get,
output that pastes at 80 columns and in pipes, one way to name keys and accounts, --json on
every command, and the account commands the admin API already had. In-process through
`kleis.main(argv)` (the `cli` fixture of test_cli.py), and as real processes where the point
is the terminal."""

import asyncio
import functools
import json
import os
import re
import sqlite3
import subprocess
from pathlib import Path

import pytest
import tomli_w

import cli as cli_module
from settings import ServerSettings
from tests import test_cli
from tests.test_cli import KLEIS, db_rows, ok

cli = test_cli.cli  # the fixture: `cli(*args)` runs kleis.main in this process

LONG_PUBLIC_URL = "https://kleis-home-server.example.internal:8787"  # export lines > 80 columns


def write_config(tmp_path: Path, server: dict | None = None, providers: dict | None = None) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "server": server or {},
                "security": {"secret_key": "k" * 32},
                "admin": {"token": "kla_5f0c1e9a7b3d4c2e8a6f1b0d9c7e3a52"},
                "models": {"source_url": ""},
                "providers": providers or {},
            }
        )
    )
    return config


def run80(*args: str, config: Path, stdin: str = "") -> subprocess.CompletedProcess:
    """`python kleis.py --config … *args` as a real process whose stdout and stderr are pipes,
    in an 80-column environment (rich would wrap there)."""
    env = {**os.environ, "COLUMNS": "80", "LINES": "24", "TERM": "xterm-256color"}
    env.pop("KLEIS_SECRET_KEY", None)
    return subprocess.run(
        [*KLEIS, "--config", str(config), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


# ── 1. The URL a laptop can use ─────────────────────────────────────────────


def test_client_url_rules(tmp_path):
    config = tmp_path / "config.toml"
    url, note = cli_module.client_url(ServerSettings(public_url="https://k.example/"), config)
    assert (url, note) == ("https://k.example", "")
    url, note = cli_module.client_url(ServerSettings(host="127.0.0.1", port=8787), config)
    assert url == "http://127.0.0.1:8787" and "only this machine can use" in note
    assert 'host = "0.0.0.0"' in note and "public_url" in note and str(config) in note
    url, note = cli_module.client_url(ServerSettings(host="::1", port=9000), config)
    assert url == "http://[::1]:9000" and "only this machine" in note
    url, note = cli_module.client_url(ServerSettings(host="192.168.1.20", port=8787), config)
    assert (url, note) == ("http://192.168.1.20:8787", "")
    for wildcard in ("0.0.0.0", "::"):
        url, note = cli_module.client_url(ServerSettings(host=wildcard, port=8787), config)
        assert not url.startswith(("http://0.0.0.0", "http://[::]")) and url.endswith(":8787")
        assert "set [server] public_url" in note
    # serve --host/--port win over the config's
    assert cli_module.client_url(ServerSettings(), config, "10.0.0.5", 9999)[0] == "http://10.0.0.5:9999"


def test_keys_create_prints_the_lan_address_for_a_wildcard_host(tmp_path, cli, monkeypatch):
    monkeypatch.setattr(cli_module, "lan_address", lambda: "192.168.1.20")
    write_config(tmp_path, {"host": "0.0.0.0", "port": 8787})
    created = json.loads(ok(cli("keys", "create", "--json")).out)
    assert created["scopedModelsUrl"].startswith("http://192.168.1.20:8787/api/kmd_")
    assert created["baseUrl"] == "http://192.168.1.20:8787" and "public_url" in created["baseUrlNote"]
    text = ok(cli("keys", "create", "--label", "laptop")).out
    assert 'export OPENCODE_MODELS_URL="http://192.168.1.20:8787/api/kmd_' in text
    assert "0.0.0.0" not in text.split("Note:")[0] and "set [server] public_url" in text


def test_keys_create_on_loopback_says_only_this_machine(tmp_path, cli):
    write_config(tmp_path)
    text = ok(cli("keys", "create")).out
    assert 'export OPENCODE_MODELS_URL="http://127.0.0.1:8787/api/kmd_' in text
    assert "only this machine can use this URL" in text and 'host = "0.0.0.0"' in text
    checked = ok(cli("check")).out
    assert "\nhttp://127.0.0.1:8787\n" in checked and "only this machine" in checked


def test_public_url_wins_and_needs_no_note(tmp_path, cli):
    write_config(tmp_path, {"host": "0.0.0.0", "public_url": "https://kleis.example.net/"})
    created = json.loads(ok(cli("keys", "create", "--json")).out)
    assert created["scopedModelsUrl"].startswith("https://kleis.example.net/api/kmd_")
    assert created["baseUrlNote"] is None
    text = ok(cli("keys", "create")).out
    assert "https://kleis.example.net/openai/v1\n" in text and "Note:" not in text
    listed = json.loads(ok(cli("keys", "list", "--json")).out)
    assert all(k["scopedModelsUrl"].startswith("https://kleis.example.net/api/kmd_") for k in listed)


# ── 2. Copy-paste output at 80 columns, in a pipe ───────────────────────────


def test_paste_lines_are_whole_at_80_columns_in_a_pipe(tmp_path):
    config = tmp_path / "config.toml"
    init = run80("init", config=config)
    assert init.returncode == 0, init.stderr
    token = re.search(r'token = "([^"]+)"', config.read_text()).group(1)
    assert token in init.stdout.splitlines()  # the admin token alone on its line
    text = config.read_text().replace("[admin]", f'[server]\npublic_url = "{LONG_PUBLIC_URL}"\n\n[admin]')
    config.write_text(text)
    created = run80("keys", "create", "--label", "a laptop with a rather long label", config=config)
    assert created.returncode == 0, created.stderr
    lines = created.stdout.splitlines()
    [(discovery,)] = db_rows(tmp_path, "SELECT models_discovery_token FROM api_keys")
    [key] = [line for line in lines if re.fullmatch(r"kleis_[0-9a-f]{32}", line)]
    export_url = f'export OPENCODE_MODELS_URL="{LONG_PUBLIC_URL}/api/{discovery}"'
    assert len(export_url) > 80 and export_url in lines
    assert f'export KLEIS_API_KEY="{key}"' in lines and "opencode models --refresh" in lines
    assert f"{LONG_PUBLIC_URL}/openai/v1" in lines and f"{LONG_PUBLIC_URL}/anthropic" in lines
    assert all(len(line) <= 80 or line.startswith(("export", "New key")) for line in lines), lines
    checked = run80("check", config=config)
    assert LONG_PUBLIC_URL in checked.stdout.splitlines()


def test_login_url_is_one_line_at_80_columns(tmp_path):
    """The Claude authorization URL (~400 characters) is printed whole on its own line; with no
    code on standard input the command ends with one line, exit 1."""
    config = write_config(tmp_path)
    login = run80("accounts", "login", "claude", config=config)
    assert login.returncode == 1 and login.stderr.strip() == (
        "kleis: no code was pasted (standard input ended)"
    )
    [url] = [line for line in login.stdout.splitlines() if line.startswith("https://")]
    assert (
        len(url) > 200 and "code_challenge=" in url and url.startswith("https://claude.ai/oauth/authorize?")
    )
    assert "state=" in url and "scope=" in url
    # --json: the URL goes to stderr, still whole; stdout is only the JSON error
    as_json = run80("accounts", "login", "claude", "--json", config=config)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["error"] == "no_code"
    assert any(line.startswith("https://claude.ai/oauth/authorize?") for line in as_json.stderr.splitlines())


# ── 6. Naming keys and accounts ─────────────────────────────────────────────


def test_keys_by_id_prefix_key_prefix_or_label(tmp_path, cli):
    write_config(tmp_path)
    a = json.loads(ok(cli("keys", "create", "--label", "laptop", "--json")).out)
    b = json.loads(ok(cli("keys", "create", "--label", "desk", "--json")).out)
    c = json.loads(ok(cli("keys", "create", "--label", "desk", "--json")).out)
    table = ok(cli("keys", "list")).out
    assert a["id"][:8] in table and a["id"] not in table  # tables show 8 characters of the id
    # the 8 characters a table shows, as typed back
    revoked = json.loads(ok(cli("keys", "revoke", a["id"][:8], "--json")).out)
    assert revoked["key"]["id"] == a["id"] and revoked["matched"] == {"ref": a["id"][:8], "by": "id prefix"}
    # an exact label that two keys carry is refused, both listed
    both = cli("keys", "revoke", "desk", "--json")
    assert both.code == 1
    error = json.loads(both.out)
    assert error["error"] == "ambiguous" and {x["id"] for x in error["candidates"]} == {b["id"], c["id"]}
    assert b["id"][:8] in both.err and c["id"][:8] in both.err
    # "kleis_" is a prefix of every key's prefix
    assert json.loads(cli("keys", "revoke", "kleis_", "--json").out)["error"] == "ambiguous"
    by_prefix = ok(cli("keys", "revoke", b["keyPrefix"] + "…"))  # as pasted from the table
    assert f"revoked key desk ({b['keyPrefix']}…, id {b['id'][:8]}), matched by key prefix" in by_prefix.out
    # revoke looks at active keys first: the revoked "desk" no longer makes "desk" ambiguous
    by_label = json.loads(ok(cli("keys", "revoke", "desk", "--json")).out)
    assert by_label["key"]["id"] == c["id"] and by_label["matched"]["by"] == "label"
    again = cli("keys", "revoke", "desk", "--json")
    assert again.code == 1 and json.loads(again.out)["error"] == "ambiguous"  # both revoked now
    again = cli("keys", "revoke", "laptop", "--json")
    assert again.code == 1 and json.loads(again.out)["error"] == "already_revoked"
    assert db_rows(tmp_path, "SELECT COUNT(*) FROM api_keys WHERE revoked_at IS NULL") == [(0,)]
    short = cli("keys", "revoke", a["id"][:3])
    assert short.code == 1 and "at least 4 characters" in short.err
    missing = cli("keys", "revoke", "nosuchkey", "--json")
    assert missing.code == 1 and json.loads(missing.out)["error"] == "not_found"


def test_keys_revoke_by_full_key(tmp_path, cli):
    write_config(tmp_path)
    created = json.loads(ok(cli("keys", "create", "--json")).out)
    out = ok(cli("keys", "revoke", created["key"])).out
    assert "matched by key" in out and created["key"] not in out


async def test_accounts_by_id_prefix_or_label_everywhere(tmp_path, cli, codex_fake):
    run = functools.partial(asyncio.to_thread, cli)  # the CLI runs its own loop
    write_config(tmp_path, providers={"codex": codex_fake.options()})
    for account_id, label in (("acct_a", "work"), ("acct_b", "home"), ("acct_c", "home")):
        auth = tmp_path / f"{account_id}.json"
        auth.write_text(json.dumps(codex_fake.codex_auth_file(account_id=account_id)))
        ok(await run("accounts", "import", "codex", str(auth), "--label", label))
    accounts = {a["accountId"]: a for a in json.loads(ok(await run("accounts", "list", "--json")).out)}
    work, home_b = accounts["acct_a"], accounts["acct_b"]
    # primary by the 8 characters the table shows
    primary = json.loads(ok(await run("accounts", "primary", home_b["id"][:8], "--json")).out)
    assert primary["account"]["id"] == home_b["id"] and primary["matched"]["by"] == "id prefix"
    assert db_rows(tmp_path, "SELECT account_id FROM provider_accounts WHERE is_primary") == [("acct_b",)]
    # an ambiguous label is refused with the candidates, and nothing changes
    refused = await run("accounts", "remove", "home")
    assert refused.code == 1 and "'home' matches 2 accounts" in refused.err
    assert len(db_rows(tmp_path, "SELECT id FROM provider_accounts")) == 3
    # refresh by label (the fake accepts the imported refresh token)
    refreshed = json.loads(ok(await run("accounts", "refresh", "work", "--json")).out)
    assert refreshed["refreshed"] and refreshed["matched"] == {"ref": "work", "by": "label"}
    assert codex_fake.refresh_calls == 1
    # keys create --account takes the same forms
    key = json.loads(ok(await run("keys", "create", "--account", "work", "--json")).out)
    assert key["accountScopes"] == [work["id"]]
    key = json.loads(ok(await run("keys", "create", "--account", home_b["id"][:6], "--json")).out)
    assert key["accountScopes"] == [home_b["id"]]
    bad = await run("keys", "create", "--account", "home", "--json")
    assert bad.code == 1 and json.loads(bad.out)["error"] == "ambiguous"
    removed = json.loads(ok(await run("accounts", "remove", work["id"], "--json")).out)
    assert removed["deleted"] and removed["matched"]["by"] == "id"
    assert ("acct_a",) not in db_rows(tmp_path, "SELECT account_id FROM provider_accounts")


def test_pick_rules():
    class R:
        def __init__(self, id, label):
            self.id, self.label = id, label

    a, b = R("abcd1234-0000", "ab"), R("abce9999-0000", "abcd1234-0000x")
    forms = [(r, {"id": r.id, "label": r.label}) for r in (a, b)]
    assert cli_module.pick("abcd1234-0000", "account", forms) == (a, "id")  # exact id first
    assert cli_module.pick("ab", "account", forms) == (a, "label")  # exact label beats a prefix
    assert cli_module.pick("abce", "account", forms) == (b, "id prefix")
    with pytest.raises(cli_module.CliError) as raised:
        cli_module.pick("abc", "account", forms)
    assert raised.value.code == "not_found"  # 3 characters are too few for a prefix
    with pytest.raises(cli_module.CliError) as raised:
        cli_module.pick("abc1", "account", forms)
    assert raised.value.code == "not_found"
    c = R("abcd5678-0000", None)
    forms.append((c, {"id": c.id, "label": c.label}))
    with pytest.raises(cli_module.CliError) as raised:
        cli_module.pick("abcd", "account", forms)
    assert raised.value.code == "ambiguous" and [x["id"] for x in raised.value.extra["candidates"]] == [
        a.id,
        c.id,
    ]


# ── 9. --json on every command ──────────────────────────────────────────────


def test_json_everywhere_including_errors(tmp_path, cli):
    missing = cli("check", "--json")
    assert missing.code == 2 and json.loads(missing.out)["error"] == "config_error"
    assert "no such config file" in json.loads(missing.out)["message"]
    created = json.loads(ok(cli("init", "--json")).out)
    config = tmp_path / "config.toml"
    assert created["created"] and created["adminToken"] in config.read_text()
    assert json.loads(ok(cli("--json", "init")).out) == {
        "config": str(config),
        "created": False,
        "adminToken": None,
    }
    checked = json.loads(ok(cli("check", "--json")).out)
    assert checked["ok"] and checked["baseUrl"] == "http://127.0.0.1:8787" and "codex" in checked["providers"]
    usage = cli("keys", "--json")  # a subcommand is required
    assert usage.code == 2 and json.loads(usage.out)["error"] == "usage_error" and usage.err
    usage = cli("accounts", "frobnicate", "--json")
    assert usage.code == 2 and "invalid choice" in json.loads(usage.out)["message"]
    human = cli("keys")
    assert human.code == 2 and human.out == "" and "usage:" in human.err  # no JSON without --json
    bad = cli("keys", "create", "--provider", "openai", "--json")
    assert bad.code == 1 and json.loads(bad.out)["error"] == "bad_request"
    missing = cli("accounts", "refresh", "nobody", "--json")
    assert missing.code == 1 and json.loads(missing.out)["error"] == "not_found"


async def test_account_commands_answer_json(tmp_path, cli, codex_fake):
    run = functools.partial(asyncio.to_thread, cli)  # the CLI runs its own loop
    write_config(tmp_path, providers={"codex": codex_fake.options()})
    auth = tmp_path / "auth.json"
    auth_file = codex_fake.codex_auth_file(account_id="acct_j")
    auth.write_text(json.dumps(auth_file))
    imported = json.loads(
        ok(await run("accounts", "import", "codex", str(auth), "--label", "j", "--json")).out
    )
    assert imported["account"]["accountId"] == "acct_j" and len(imported["accounts"]) == 1
    assert auth_file["tokens"]["refresh_token"] not in json.dumps(imported)
    assert auth_file["tokens"]["access_token"] not in json.dumps(imported)
    for args, field in (
        (("accounts", "primary", "j"), "primary"),
        (("accounts", "disable", "j"), "updated"),
        (("accounts", "enable", "j"), "updated"),
        (("accounts", "set", "j", "--priority", "2"), "updated"),
        (("accounts", "cooldown", "clear", "j"), "cleared"),
    ):
        body = json.loads(ok(await run(*args, "--json")).out)
        assert field in body and body["account"]["accountId"] == "acct_j", args
    removed = json.loads(ok(await run("accounts", "remove", "j", "--json")).out)
    assert removed == {**removed, "deleted": True}
    assert json.loads(ok(await run("accounts", "list", "--json")).out) == []


# ── 11. Day-to-day account commands ─────────────────────────────────────────


async def test_enable_disable_set_cooldown_and_quota(tmp_path, cli, codex_fake):
    run = functools.partial(asyncio.to_thread, cli)  # the CLI runs its own loop
    write_config(tmp_path, providers={"codex": codex_fake.options()})
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps(codex_fake.codex_auth_file(account_id="acct_q")))
    ok(await run("accounts", "import", "codex", str(auth), "--label", "main"))
    row = "SELECT label, priority, enabled, cooldown_until FROM provider_accounts"

    out = ok(await run("accounts", "disable", "main")).out
    assert out.startswith("disabled: codex account main (id ") and "matched by label" in out
    assert db_rows(tmp_path, row)[0][2] in (0, False)
    assert json.loads(ok(await run("accounts", "list", "--json")).out)[0]["status"] == "disabled"
    ok(await run("accounts", "enable", "main"))
    assert db_rows(tmp_path, row)[0][2] in (1, True)

    ok(await run("accounts", "set", "main", "--priority", "5", "--label", "primary box"))
    assert db_rows(tmp_path, row)[0][:2] == ("primary box", 5)
    nothing = await run("accounts", "set", "primary box")
    assert nothing.code == 2 and "--label and/or --priority" in nothing.err
    assert db_rows(tmp_path, row)[0][:2] == ("primary box", 5)

    far = 4_102_444_800_000  # 2100-01-01: cooling down until then
    with sqlite3.connect(tmp_path / "kleis.db") as db:
        db.execute("UPDATE provider_accounts SET cooldown_until = ?, cooldown_kind = 'rate_limit'", (far,))
    assert json.loads(ok(await run("accounts", "list", "--json")).out)[0]["status"] == "cooling_down"
    cleared = ok(await run("accounts", "cooldown", "clear", "primary box")).out
    assert cleared.startswith("cooldown cleared: codex account primary box")
    assert db_rows(tmp_path, row)[0][3] is None
    assert "was not cooling down" in ok(await run("accounts", "cooldown", "clear", "primary box")).out

    quota = await run("accounts", "quota", "primary box", "--json")
    body = json.loads(ok(quota).out)
    assert body["quota"]["data"]["planType"] == "plus" and body["quota"]["error"] is None
    text = ok(await run("accounts", "quota", "primary box")).out
    assert re.search(r"planType\s+plus", text) and "quota of codex account primary box" in text
