"""The command line, run in-process through `kleis.main(argv)` (exit code, stdout, stderr and the
database it leaves), plus two real `python kleis.py …` processes: the script entry point, and
the real server stopped with SIGTERM."""

import asyncio
import json
import logging
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

import kleis
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
KLEIS = [sys.executable, str(ROOT / "kleis.py")]
SANIC_LOGGERS = ("sanic.root", "sanic.error", "sanic.access", "sanic.server")


@dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """`cli(*args, env=None)` runs `kleis --config tmp_path/config.toml *args` in this process
    and returns its exit code and output. Safe to call from a thread (`asyncio.to_thread`)."""
    config = tmp_path / "config.toml"
    monkeypatch.setenv("COLUMNS", "200")  # rich tables are not cut to 80 columns
    for name in ("KLEIS_SECRET_KEY", "KLEIS_NEW_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, env: dict | None = None) -> Result:
        capsys.readouterr()
        # main() replaces the root logger's handlers (settings.setup_logging); put them back, so
        # pytest's own capture (caplog) keeps working in this and later tests.
        root = logging.getLogger()
        handlers, level = list(root.handlers), root.level
        sanic = {
            name: (list(logging.getLogger(name).handlers), logging.getLogger(name).propagate)
            for name in SANIC_LOGGERS
        }
        try:
            with pytest.MonkeyPatch.context() as patch:
                for name, value in (env or {}).items():
                    patch.setenv(name, value)
                code = kleis.main(["--config", str(config), *args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            for name, (saved, propagate) in sanic.items():
                logging.getLogger(name).handlers[:] = saved
                logging.getLogger(name).propagate = propagate
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def script(*args, config: Path) -> subprocess.CompletedProcess:
    """`python kleis.py --config … *args` as a real process; it must succeed."""
    proc = subprocess.run(
        [*KLEIS, "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def ok(result: Result) -> Result:
    assert result.code == 0, result.err
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def db_rows(tmp_path: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(tmp_path / "kleis.db") as db:
        return db.execute(sql).fetchall()


def test_script_creates_and_lists_keys(tmp_path, cli):
    """The script entry point as a user runs it: `python kleis.py …`, a real process per command."""
    config = tmp_path / "config.toml"
    ok(cli("init"))
    created = json.loads(script("keys", "create", "--label", "laptop", "--json", config=config).stdout)
    assert created["key"].startswith("kleis_") and created["label"] == "laptop"
    listed = json.loads(script("keys", "list", "--json", config=config).stdout)
    assert [k["id"] for k in listed] == [created["id"]] and created["key"] not in json.dumps(listed)


def test_keys_commands(tmp_path, cli):
    ok(cli("init"))
    created = json.loads(ok(cli("keys", "create", "--label", "laptop", "--provider", "codex", "--json")).out)
    assert created["key"].startswith("kleis_") and created["providerScopes"] == ["codex"]
    listed = json.loads(ok(cli("keys", "list", "--json")).out)
    assert [k["id"] for k in listed] == [created["id"]] and created["key"] not in json.dumps(listed)
    table = ok(cli("keys", "list")).out
    assert "laptop" in table and created["keyPrefix"] in table and created["key"] not in table
    revoked = ok(cli("keys", "revoke", created["keyPrefix"]))
    assert f"revoked key laptop ({created['keyPrefix']}…" in revoked.out
    assert json.loads(ok(cli("keys", "list", "--json")).out)[0]["status"] == "revoked"
    [(revoked_at,)] = db_rows(tmp_path, "SELECT revoked_at FROM api_keys")
    assert revoked_at is not None
    again = cli("keys", "revoke", created["id"])
    assert again.code == 1 and again.err.strip().endswith("is already revoked")
    bad = cli("keys", "create", "--provider", "openai")
    assert bad.code == 1 and "unknown provider(s) openai" in bad.err
    assert db_rows(tmp_path, "SELECT id FROM api_keys") == [(created["id"],)]  # nothing half-created
    usage = ok(cli("--json", "usage"))
    assert json.loads(usage.out)["totals"]["requestCount"] == 0


def test_accounts_import_and_list(tmp_path, cli):
    ok(cli("init"))
    auth = tmp_path / "auth.json"
    auth.write_text((ROOT / "tests" / "data" / "codex-cli-auth.json").read_text())
    out = ok(cli("accounts", "import", "codex", str(auth), "--label", "work")).out
    assert "codex account work" in out
    ok(cli("accounts", "import", "codex", str(auth)))  # idempotent
    assert len(db_rows(tmp_path, "SELECT id FROM provider_accounts")) == 1
    accounts = json.loads(ok(cli("accounts", "list", "--json")).out)
    assert len(accounts) == 1 and accounts[0]["label"] == "work" and accounts[0]["isPrimary"]
    text = auth.read_text()
    listing = ok(cli("accounts", "list")).out
    assert "work" in listing and json.loads(text)["tokens"]["refresh_token"] not in listing
    assert cli("accounts", "remove", "work").code == 0
    assert json.loads(ok(cli("accounts", "list", "--json")).out) == []
    assert db_rows(tmp_path, "SELECT id FROM provider_accounts") == []
    missing = cli("accounts", "import", "codex", str(tmp_path / "nope.json"))
    assert missing.code == 1 and "cannot read" in missing.err


def test_usage_errors_exit_2(tmp_path, cli):
    result = cli("keys")
    assert result.code == 2 and "required" in result.err  # argparse: a subcommand is required
    result = cli("check")
    assert result.code == 2 and "no such config file" in result.err
    assert not (tmp_path / "config.toml").exists()


def test_systemd_unit(tmp_path, cli):
    unit = ok(cli("systemd-unit")).out
    assert "ExecStart=" in unit and str(ROOT / "kleis.py") in unit and "serve --config" in unit
    assert f"--config {tmp_path / 'config.toml'}" in unit


async def test_serve_creates_config_and_stops_cleanly_keeping_usage(tmp_path):
    """The real process: first start creates config.toml, SIGTERM drains queued usage."""
    config = tmp_path / "config.toml"
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen(  # noqa: ASYNC220
        [*KLEIS, "--config", str(config), "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    proc.kill()
                    raise AssertionError(
                        f"server did not start (exit {proc.poll()}): {proc.communicate()[1][-3000:]}"
                    )
                await __import__("asyncio").sleep(0.05)
            startup = time.monotonic() - started
            token = config.read_text().split('token = "')[1].split('"')[0]
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(
                f"http://127.0.0.1:{port}/admin/keys", json={"label": "x"}, headers=headers
            ) as resp:
                key = (await resp.json())["key"]["key"]
            # A request Kleis answers itself (no account) is recorded in usage, in memory only.
            for _ in range(3):
                async with http.post(
                    f"http://127.0.0.1:{port}/openai/v1/responses",
                    json={"model": "gpt-5.5"},
                    headers={"Authorization": f"Bearer {key}"},
                ) as resp:
                    assert resp.status == 400
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    out, err = proc.communicate()
    assert "Admin token (shown once" in out
    assert token not in err and key not in err  # secrets never reach the log
    with sqlite3.connect(tmp_path / "kleis.db") as db:
        (count,) = db.execute("SELECT SUM(request_count) FROM request_usage_buckets").fetchone()
    assert count == 3
    assert startup < 10


def config_with(tmp_path, providers: dict) -> Path:
    import tomli_w

    config = tmp_path / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "security": {"secret_key": "k" * 32},
                "admin": {"token": "kla_5f0c1e9a7b3d4c2e8a6f1b0d9c7e3a52"},
                "models": {"source_url": ""},
                "providers": providers,
            }
        )
    )
    return config


async def test_accounts_login_device_flow(tmp_path, copilot_fake, cli):
    """`accounts login copilot` shows the code, polls GitHub, and stores the account. The CLI runs
    its own event loop in a thread; the fake GitHub answers on this test's loop."""
    copilot_fake.device_interval = 0.05
    config_with(tmp_path, {"copilot": copilot_fake.options()})
    login = asyncio.create_task(asyncio.to_thread(cli, "accounts", "login", "copilot"))
    await wait_for(lambda: copilot_fake.calls("/login/oauth/access_token") or login.done(), timeout=20)
    assert not login.done(), f"the CLI stopped before polling: {login.result()}"
    copilot_fake.approve_device(login="octo", user_id=42)
    result = await asyncio.wait_for(login, 20)
    assert result.code == 0, result.err
    assert copilot_fake.devices and "copilot account" in result.out and "octo" in result.out
    accounts = json.loads(ok(await asyncio.to_thread(cli, "accounts", "list", "--json")).out)
    assert [(a["provider"], a["accountId"]) for a in accounts] == [("copilot", "42")]
    assert db_rows(tmp_path, "SELECT provider, account_id FROM provider_accounts") == [("copilot", "42")]


def test_rotate_secret_reencrypts_tokens(tmp_path, cli):
    config_with(tmp_path, {})
    auth = ROOT / "tests" / "data" / "codex-cli-auth.json"
    ok(cli("accounts", "import", "codex", str(auth)))
    [(before,)] = db_rows(tmp_path, "SELECT refresh_token_enc FROM provider_accounts")
    rotated = ok(cli("rotate-secret", env={"KLEIS_NEW_SECRET_KEY": "n" * 32}))
    assert rotated.out.strip().splitlines()[-1] == "n" * 32
    assert "Put this in [security] secret_key" in rotated.out  # not eaten as rich markup
    # The old key no longer opens the tokens; the new one does (via the environment).
    old = cli("accounts", "list", "--json")  # refused at once: it would see no account at all
    assert old.code == 2 and "sealed with another secret key" in old.err
    listed = ok(cli("accounts", "list", "--json", env={"KLEIS_SECRET_KEY": "n" * 32}))
    assert json.loads(listed.out)[0]["accountId"] == "acct_file"
    [(sealed,)] = db_rows(tmp_path, "SELECT refresh_token_enc FROM provider_accounts")
    assert "rt_file_fake_refresh" not in sealed and sealed != before


def test_out_of_range_numbers_are_one_line_errors(cli):
    ok(cli("init"))
    for days in ("0", "-1", "nan", "inf", "1e300"):
        bad = cli("keys", "create", "--expires-days", days)
        assert (
            bad.code == 2  # a usage error, as the README's exit codes say
            and bad.err.startswith("kleis: --expires-days must be")
            and "Traceback" not in bad.err
        )
    bad = cli("usage", "--hours", "-5")
    assert bad.code == 2 and bad.err.startswith("kleis: --hours must be")
    assert db_rows_count(cli) == 0  # nothing was created


def db_rows_count(cli) -> int:
    return len(json.loads(ok(cli("keys", "list", "--json")).out))
