"""Running Kleis for real (issue 12): rotating the secret key under a running server, imported
logins (shared refresh tokens, provider identities, refused tokens), database failures, the
access log, private database files and the systemd unit. Real server processes where the point
is two processes (a server and the CLI); otherwise the app over HTTP with the upstream fakes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import tomli_w

from settings import TickBufferedHandler, Vault
from tests import test_cli
from tests.conftest import until_serving
from tests.test_cli import KLEIS, ROOT, free_port, ok

cli = test_cli.cli  # the fixture: `cli(*args, env=None)` runs kleis.main in this process


def write_config(tmp_path: Path, fakes: dict, secret: str, **security) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "admin": {"token": "kla_5f0c1e9a7b3d4c2e8a6f1b0d9c7e3a52"},
                "security": {"secret_key": secret, **security},
                "database": {"url": "sqlite:///kleis.db"},
                "models": {"source_url": "", "account_lists": False},
                "providers": {name: fake.options() for name, fake in fakes.items()},
            }
        )
    )
    return config


def run(config: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python kleis.py --config … *args` as a real process."""
    return subprocess.run(
        [*KLEIS, "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


class Server:
    """`python kleis.py serve` as a real process on a free port."""

    def __init__(self, config: Path):
        self.config, self.port = config, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    async def start(self) -> Server:
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            [*KLEIS, "--config", str(self.config), "serve", "--port", str(self.port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        async with aiohttp.ClientSession() as http:
            await until_serving(
                http, self.url, lambda: None if self.proc.poll() is None else self.proc.communicate()[1]
            )
        return self

    async def stop(self) -> str:
        """SIGTERM and wait, letting this loop run meanwhile (the fakes the server talks to
        live in it)."""
        self.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(self.proc.wait, 20)
        return self.proc.communicate()[1]


ADMIN = {"Authorization": "Bearer kla_5f0c1e9a7b3d4c2e8a6f1b0d9c7e3a52"}


async def proxied(http: aiohttp.ClientSession, server: Server, key: str) -> int:
    async with http.post(
        server.url + "/openai/v1/responses",
        json={"model": "gpt-5.5", "input": "hi", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        await resp.read()
        return resp.status


def sealed(tmp_path: Path) -> list[str]:
    with sqlite3.connect(tmp_path / "kleis.db") as db:
        rows = db.execute("SELECT access_token_enc, refresh_token_enc FROM provider_accounts").fetchall()
    return [value for row in rows for value in row]


# ── 3. rotate-secret under a running server ─────────────────────────────────


async def test_rotate_secret_never_locks_a_running_server_out(tmp_path, codex_fake, http):
    old, new = "o" * 32, "n" * 32
    config = write_config(tmp_path, {"codex": codex_fake}, old)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps(codex_fake.codex_auth_file(account_id="acct_rot")))
    # In a thread: the import asks the fake (on this loop) who the account is.
    assert (await asyncio.to_thread(run, config, "accounts", "import", "codex", str(auth))).returncode == 0
    server = await Server(config).start()
    try:
        async with http.post(server.url + "/admin/keys", json={"label": "l"}, headers=ADMIN) as resp:
            key = (await resp.json())["key"]["key"]
        assert await proxied(http, server, key) == 200
        before = sealed(tmp_path)

        # What the README used to say: the CLI re-encrypts with a key the server does not have.
        refused = await asyncio.to_thread(run, config, "rotate-secret", env={"KLEIS_NEW_SECRET_KEY": new})
        assert refused.returncode == 1, refused.stderr
        assert "a running Kleis seals tokens with another key" in refused.stderr
        assert "previous_secret_keys" in refused.stderr and "Traceback" not in refused.stderr
        assert sealed(tmp_path) == before  # nothing re-encrypted
        assert await proxied(http, server, key) == 200

        # The documented steps: new key active, old one a fallback, restart, then rotate.
        config.write_text(config.read_text().replace(f'secret_key = "{old}"', f'secret_key = "{new}"'))
        config.write_text(
            config.read_text().replace("[security]\n", f'[security]\nprevious_secret_keys = ["{old}"]\n')
        )
        await server.stop()
        server = await Server(config).start()
        assert await proxied(http, server, key) == 200
        done = await asyncio.to_thread(run, config, "rotate-secret")
        assert done.returncode == 0, done.stderr
        assert "Every token is now sealed with [security] secret_key (1 accounts)" in done.stdout
        # The running server reads the resealed row (a forced refresh re-reads it from the database).
        async with http.get(server.url + "/admin/accounts", headers=ADMIN) as resp:
            (account,) = (await resp.json())["accounts"]
        async with http.post(f"{server.url}/admin/accounts/{account['id']}/refresh", headers=ADMIN) as resp:
            assert resp.status == 200, await resp.text()
        assert await proxied(http, server, key) == 200
        only_new = Vault(new)
        assert all(only_new.open(value) for value in sealed(tmp_path))  # the old key is not needed
        # Step 4: drop the fallback and restart.
        config.write_text(config.read_text().replace(f'previous_secret_keys = ["{old}"]\n', ""))
        await server.stop()
        server = await Server(config).start()
        assert await proxied(http, server, key) == 200
    finally:
        await server.stop()


async def test_rotate_secret_without_a_running_server_prints_the_new_key(tmp_path, cli, codex_fake):
    write_config(tmp_path, {"codex": codex_fake}, "o" * 32)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps(codex_fake.codex_auth_file()))
    ok(await asyncio.to_thread(cli, "accounts", "import", "codex", str(auth)))
    rotated = ok(
        await asyncio.to_thread(cli, "rotate-secret", "--json", env={"KLEIS_NEW_SECRET_KEY": "n" * 32})
    )
    assert json.loads(rotated.out) == {"ok": True, "accounts": 1, "newSecretKey": "n" * 32}
    assert all(Vault("n" * 32).open(v) for v in sealed(tmp_path))


# ── 4. imported logins share a single-use refresh token ─────────────────────


async def test_import_warns_that_the_login_is_shared(start_kleis, codex_fake, copilot_fake, tmp_path, cli):
    k = await start_kleis(db_url=f"sqlite:///{tmp_path}/server.db")  # the CLI below has its own
    body = {"authFile": codex_fake.codex_auth_file(account_id="acct_w")}
    _, answer = await k.admin("POST", "/admin/accounts/codex/import", body, expect=201)
    assert len(answer["warnings"]) == 1 and "refresh token works once" in answer["warnings"][0]
    assert "accounts login codex" in answer["warnings"][0]
    _, answer = await k.admin(
        "POST",
        "/admin/accounts/copilot/import",
        {"authFile": {"github-copilot": {"type": "oauth", "refresh": copilot_fake.grant()["refresh_token"]}}},
        expect=201,
    )
    assert answer["warnings"] == []  # a GitHub token is not single use

    write_config(tmp_path, {"codex": codex_fake}, "s" * 32)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps(codex_fake.codex_auth_file(account_id="acct_cli")))
    out = ok(await asyncio.to_thread(cli, "accounts", "import", "codex", str(auth))).out
    assert "warning: this codex login is shared with the client it was imported from" in out
    again = ok(await asyncio.to_thread(cli, "accounts", "import", "codex", str(auth), "--json"))
    assert json.loads(again.out)["warnings"]


async def test_a_reused_refresh_token_says_another_client_used_it(start_kleis, codex_fake, http):
    k = await start_kleis()
    auth = codex_fake.codex_auth_file(account_id="acct_shared")
    _, answer = await k.admin("POST", "/admin/accounts/codex/import", {"authFile": auth}, expect=201)
    account_id = answer["account"]["id"]
    # The official Codex CLI refreshes first, with the same refresh token.
    async with http.post(
        codex_fake.url + "/oauth/token",
        data={
            "grant_type": "refresh_token",
            "refresh_token": auth["tokens"]["refresh_token"],
            "client_id": k.services.providers["codex"].options["client_id"],
        },
    ) as resp:
        assert resp.status == 200
    status, err = await k.admin("POST", f"/admin/accounts/{account_id}/refresh")
    assert status == 403 and err["error"] == "account_needs_reauth"
    assert "another client used this login's single-use refresh token" in err["message"]
    _, listing = await k.admin("GET", "/admin/accounts", expect=200)
    (view,) = listing["accounts"]
    assert view["status"] == "needs_reauth" and "refresh_token_reused" in view["lastError"]
    assert "accounts login codex" in view["lastError"]
    key, _ = await k.create_key()
    async with http.post(
        k.url + "/openai/v1/responses",
        json={"model": "gpt-5.5", "input": "x"},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status == 403 and "another client" in (await resp.json())["error"]["message"]


# ── 5. identities and checked tokens ────────────────────────────────────────


async def test_cli_copilot_import_is_one_account_named_by_the_github_user(tmp_path, cli, copilot_fake):
    write_config(tmp_path, {"copilot": copilot_fake}, "s" * 32)
    token = copilot_fake.grant(login="octo", user_id=42)["access_token"]
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(f"github.com:\n    user: octo\n    oauth_token: {token}\n")
    ok(await asyncio.to_thread(cli, "accounts", "import", "copilot", str(hosts)))
    ok(await asyncio.to_thread(cli, "accounts", "import", "copilot", str(hosts), "--label", "again"))
    with sqlite3.connect(tmp_path / "kleis.db") as db:
        rows = db.execute("SELECT provider, account_id, label FROM provider_accounts").fetchall()
    assert rows == [("copilot", "42", "again")]


async def test_explicit_token_imports_are_identified_and_deduplicated(start_kleis, claude_fake, copilot_fake):
    k = await start_kleis()
    for provider, grant in (
        ("claude", claude_fake.grant(uuid="uuid-7", email="c@example.test")),
        ("copilot", copilot_fake.grant(login="mona", user_id=7)),
    ):
        grant.pop("account_id")  # the caller does not know it
        first = await k.import_account(provider, grant)
        second = await k.import_account(provider, grant)
        assert first["id"] == second["id"] and first["accountId"] in ("uuid-7", "7")
    assert len(await k.rows("provider_accounts")) == 2


async def test_a_made_up_token_is_refused(start_kleis, tmp_path, cli, codex_fake):
    k = await start_kleis(db_url=f"sqlite:///{tmp_path}/server.db")  # the CLI below has its own
    later = int(time.time() * 1000) + 3_600_000
    for provider, word in (("codex", "ChatGPT"), ("claude", "Anthropic"), ("copilot", "GitHub")):
        body = {"accessToken": "made-up", "refreshToken": "made-up-too", "expiresAt": later}
        status, err = await k.admin("POST", f"/admin/accounts/{provider}/import", body)
        assert status == 400 and err["error"] == "login_failed", err
        assert err["message"].startswith(f"{word} refused this")
    assert await k.rows("provider_accounts") == []

    write_config(tmp_path, {"codex": codex_fake}, "s" * 32)
    auth = tmp_path / "auth.json"
    made_up = codex_fake.codex_auth_file()
    codex_fake.access_tokens.clear()  # the provider does not know this token
    auth.write_text(json.dumps(made_up))
    refused = await asyncio.to_thread(cli, "accounts", "import", "codex", str(auth))
    assert refused.code == 1 and refused.err.splitlines()[
        -1
    ].startswith(  # (the fake's own log lines come first)
        "kleis: ChatGPT refused this access token (HTTP 401)"
    )


# ── 7. database errors ──────────────────────────────────────────────────────


def test_a_database_in_a_missing_folder_is_one_line_and_exit_2(tmp_path, cli):
    config = write_config(tmp_path, {}, "s" * 32)
    config.write_text(config.read_text().replace("sqlite:///kleis.db", "sqlite:///missing/kleis.db"))
    for args in (("serve", "--port", str(free_port())), ("keys", "list")):
        result = cli(*args)
        assert result.code == 2, result
        assert result.err == (
            f"kleis: [database] url: cannot open SQLite database {tmp_path}/missing/kleis.db: "
            f"the folder {tmp_path}/missing does not exist\n"
        )
    proc = run(config, "serve", "--port", str(free_port()))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def refuse_writes(db_path: Path, table: str, when: str = "1") -> None:
    """Make the real SQLite database refuse writes to `table` (root ignores file modes, so a
    trigger stands in for a read-only file: the same SQLite error reaches Kleis)."""
    with sqlite3.connect(db_path) as db:
        for event in ("INSERT", "UPDATE"):
            db.execute(
                f"CREATE TRIGGER refuse_{table}_{event.lower()} BEFORE {event} ON {table} WHEN {when} "
                "BEGIN SELECT RAISE(ABORT, 'attempt to write a readonly database'); END"
            )


def test_a_database_that_refuses_writes_stops_start_up(tmp_path, cli):
    ok(cli("init"))
    ok(cli("keys", "list"))  # creates the database
    refuse_writes(tmp_path / "kleis.db", "cache_versions")
    result = cli("serve", "--port", str(free_port()))
    assert result.code == 2 and result.err.startswith(
        f"kleis: [database] url: cannot write to SQLite database {tmp_path}/kleis.db: "
        "attempt to write a readonly database"
    )
    assert result.err.count("\n") == 1


async def test_readyz_checks_that_writes_work(start_kleis, tmp_path, http):
    k = await start_kleis()
    async with http.get(k.url + "/readyz") as resp:
        assert resp.status == 200
    refuse_writes(tmp_path / "kleis.db", "cache_versions")
    async with http.get(k.url + "/readyz") as resp:
        assert resp.status == 503 and (await resp.json())["ok"] is False


async def test_refreshed_tokens_the_database_refuses_are_kept_and_reported(
    start_kleis, codex_fake, tmp_path, http, caplog
):
    k = await start_kleis()
    account = await k.import_account("codex", codex_fake.grant(account_id="acct_ro"))
    key, _ = await k.create_key()
    [row] = await k.rows("provider_accounts")
    refuse_writes(tmp_path / "kleis.db", "provider_accounts", "NEW.access_token_enc <> OLD.access_token_enc")
    with caplog.at_level(logging.ERROR, logger="kleis"):
        _, body = await k.admin("POST", f"/admin/accounts/{account['id']}/refresh", expect=200)
    view = body.get("account", body)
    assert view["lastRefreshStatus"] == "not_saved" and "kept in memory only" in view["lastError"]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("the database refused its refreshed tokens" in m and "needs a new login" in m for m in errors)
    codex_fake.expire_access_tokens()  # only the refreshed token (in memory) is still good ...
    codex_fake.access_tokens[k.services.pool.accounts[account["id"]].access_token]["exp"] = time.time() + 60
    async with http.post(
        k.url + "/openai/v1/responses",
        json={"model": "gpt-5.5", "input": "x", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.status == 200  # ... and the server goes on using it
    [after] = await k.rows("provider_accounts")
    assert after["access_token_enc"] == row["access_token_enc"]  # the database kept the old one


# ── 10. access log ──────────────────────────────────────────────────────────


async def test_access_log_line_per_proxied_request(start_kleis, codex_fake, http, caplog):
    k = await start_kleis()
    await k.import_account("codex", codex_fake.grant(account_id="acct_log"), label="work mac")
    key, _ = await k.create_key(label="laptop")
    caplog.set_level(logging.INFO, logger="kleis.access")
    async with http.post(
        k.url + "/openai/v1/responses",
        json={"model": "gpt-5.5", "input": "x", "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        await resp.read()
    async with http.post(
        k.url + "/openai/v1/responses",
        json={"model": "gpt-5.5"},
        headers={"Authorization": "Bearer kleis_" + "0" * 32},
    ) as resp:
        assert resp.status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "kleis.access"]
    assert len(lines) == 2
    assert re.fullmatch(
        r'POST /openai/v1/responses 200 key=laptop account="work mac" model=gpt-5\.5 ttfb_ms=\d+ '
        r"duration_ms=\d+ in=\d+ out=\d+ cache_read=\d+ cache_write=\d+ outcome=success",
        lines[0],
    ), lines[0]
    assert lines[1].startswith("POST /openai/v1/responses 401 key=- account=- model=- ttfb_ms=- duration_ms=")
    assert lines[1].endswith("outcome=refused")
    assert key not in "".join(lines) and "0" * 32 not in "".join(lines)
    print("\n".join(lines))


async def test_access_log_json_and_off(start_kleis, codex_fake, http, caplog):
    caplog.set_level(logging.INFO, logger="kleis.access")
    for mode in ("json", "off"):
        caplog.clear()
        k = await start_kleis(server={"access_log": mode})
        await k.import_account("codex", codex_fake.grant(account_id=f"acct_{mode}"), label="work")
        key, _ = await k.create_key(label="laptop")
        async with http.post(
            k.url + "/openai/v1/responses",
            json={"model": "gpt-5.5", "input": "x"},
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            assert resp.status == 200
        lines = [r.getMessage() for r in caplog.records if r.name == "kleis.access"]
        if mode == "off":
            assert lines == []
            continue
        (line,) = lines
        entry = json.loads(line)
        assert entry["status"] == 200 and entry["key"] == "laptop" and entry["account"] == "work"
        assert entry["outcome"] == "success" and entry["model"] == "gpt-5.5" and entry["tokens"]["input"] > 0


# ── 12. private files and the systemd unit ──────────────────────────────────


def test_database_files_are_created_private(tmp_path, cli):
    ok(cli("init"))
    ok(cli("keys", "create", "--label", "x"))
    for name in ("config.toml", "kleis.db", "kleis.db-wal", "kleis.db-shm"):
        path = tmp_path / name
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, name
    (tmp_path / "kleis.db").chmod(0o644)  # made by an older Kleis
    ok(cli("keys", "list"))
    assert stat.S_IMODE((tmp_path / "kleis.db").stat().st_mode) == 0o600


def test_systemd_unit_is_hardened(tmp_path, cli):
    unit = ok(cli("--config", "/var/lib/kleis/config.toml", "systemd-unit")).out
    for line in (
        "User=kleis",
        "StateDirectory=kleis",
        "UMask=0077",
        "LimitNOFILE=65536",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "SystemCallFilter=@system-service",
        f"ExecStart={sys.executable} {ROOT / 'kleis.py'} serve --config /var/lib/kleis/config.toml",
    ):
        assert f"\n{line}\n" in unit, line
    assert re.search(r"\nProtectHome=(yes|tmpfs)\n", unit)  # tmpfs: binds a checkout in /home or /root
    home = ok(cli("systemd-unit")).out  # a config in a home-like folder elsewhere is writable
    assert f"ReadWritePaths={tmp_path}" in home
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    path = tmp_path / "kleis.service"
    path.write_text(unit)
    verify = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(path)], capture_output=True, text=True
    )
    rating = re.search(r"Overall exposure level for kleis\.service: (\d+\.\d+)", security.stdout)
    assert rating and float(rating[1]) <= 2.0, security.stdout[-500:]


def test_dockerfile_and_compose_file():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "\nUSER 10001:10001\n" in dockerfile and 'VOLUME ["/data"]' in dockerfile
    assert "/readyz" in dockerfile and "KLEIS_CONFIG=/data/config.toml" in dockerfile
    compose = (ROOT / "compose.yaml").read_text()
    assert "kleis-data:/data" in compose and "no-new-privileges:true" in compose
    hadolint = shutil.which("hadolint")
    if hadolint:
        lint = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
        assert lint.returncode == 0, lint.stdout


async def test_log_lines_of_one_loop_tick_go_out_in_one_write():
    """The handler `setup_logging` installs: records logged in the event loop's thread are
    held until the tick ends, then written (and flushed) together, in order; flush() (what
    logging.shutdown runs at exit) writes whatever is held; a thread without a loop writes
    at once."""

    class Stream(io.StringIO):
        writes = 0

        def write(self, text: str) -> int:
            self.writes += 1
            return super().write(text)

    stream = Stream()
    handler = TickBufferedHandler(stream)
    logger = logging.getLogger("kleis.test.tick")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for i in range(100):
            logger.info("line %d", i)
        assert stream.writes == 0  # held: still in the tick that logged them
        await asyncio.sleep(0)  # yields once: the write scheduled by the first line runs
        assert stream.writes == 1
        assert stream.getvalue().splitlines() == [f"line {i}" for i in range(100)]
        logger.info("held at stop")
        handler.flush()
        assert stream.getvalue().endswith("line 99\nheld at stop\n") and stream.writes == 2
        await asyncio.to_thread(logger.info, "from a thread")
        assert stream.getvalue().endswith("held at stop\nfrom a thread\n")
    finally:
        logger.removeHandler(handler)
