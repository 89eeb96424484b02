"""The command line and the real server process: `python kleis.py …` as a user runs it."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
KLEIS = [sys.executable, str(ROOT / "kleis.py")]


def run(*args, config: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*KLEIS, "--config", str(config), *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "COLUMNS": "200", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_keys_commands(tmp_path):
    config = tmp_path / "config.toml"
    run("init", config=config)
    created = json.loads(run("keys", "create", "--label", "laptop", "--provider", "codex", "--json", config=config).stdout)
    assert created["key"].startswith("kleis_") and created["providerScopes"] == ["codex"]
    listed = json.loads(run("keys", "list", "--json", config=config).stdout)
    assert [k["id"] for k in listed] == [created["id"]] and created["key"] not in json.dumps(listed)
    table = run("keys", "list", config=config).stdout
    assert "laptop" in table and created["keyPrefix"] in table and created["key"] not in table
    run("keys", "revoke", created["keyPrefix"], config=config)
    assert json.loads(run("keys", "list", "--json", config=config).stdout)[0]["status"] == "revoked"
    again = run("keys", "revoke", created["id"], config=config, check=False)
    assert again.returncode == 1 and again.stderr.strip() == "kleis: that key is already revoked"
    bad = run("keys", "create", "--provider", "openai", config=config, check=False)
    assert bad.returncode == 1 and "unknown provider(s) openai" in bad.stderr
    usage = run("--json", "usage", config=config)
    assert json.loads(usage.stdout)["totals"]["requestCount"] == 0


def test_accounts_import_and_list(tmp_path):
    config = tmp_path / "config.toml"
    run("init", config=config)
    auth = tmp_path / "auth.json"
    auth.write_text((ROOT / "tests" / "data" / "codex-cli-auth.json").read_text())
    out = run("accounts", "import", "codex", str(auth), "--label", "work", config=config)
    assert "codex account work" in out.stdout
    run("accounts", "import", "codex", str(auth), config=config)  # idempotent
    accounts = json.loads(run("accounts", "list", "--json", config=config).stdout)
    assert len(accounts) == 1 and accounts[0]["label"] == "work" and accounts[0]["isPrimary"]
    text = auth.read_text()
    listing = run("accounts", "list", config=config).stdout
    assert json.loads(text)["tokens"]["refresh_token"] not in listing
    assert run("accounts", "remove", "work", config=config).returncode == 0
    assert json.loads(run("accounts", "list", "--json", config=config).stdout) == []
    missing = run("accounts", "import", "codex", str(tmp_path / "nope.json"), config=config, check=False)
    assert missing.returncode == 1 and "cannot read" in missing.stderr


def test_usage_errors_exit_2(tmp_path):
    config = tmp_path / "config.toml"
    proc = run("keys", config=config, check=False)
    assert proc.returncode == 2
    proc = run("check", config=config, check=False)
    assert proc.returncode == 2 and "no such config file" in proc.stderr


def test_systemd_unit(tmp_path):
    unit = run("systemd-unit", config=tmp_path / "config.toml").stdout
    assert "ExecStart=" in unit and str(ROOT / "kleis.py") in unit and "serve --config" in unit


async def test_serve_creates_config_and_stops_cleanly_keeping_usage(tmp_path):
    """The real process: first start creates config.toml, SIGTERM drains queued usage."""
    config = tmp_path / "config.toml"
    port = free_port()
    started = time.monotonic()
    proc = subprocess.Popen([*KLEIS, "--config", str(config), "serve", "--port", str(port)],  # noqa: ASYNC220
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
                    raise AssertionError(f"server did not start (exit {proc.poll()}): {proc.communicate()[1][-3000:]}")
                await __import__("asyncio").sleep(0.05)
            startup = time.monotonic() - started
            token = config.read_text().split('token = "')[1].split('"')[0]
            headers = {"Authorization": f"Bearer {token}"}
            async with http.post(f"http://127.0.0.1:{port}/admin/keys", json={"label": "x"}, headers=headers) as resp:
                key = (await resp.json())["key"]["key"]
            # A request Kleis answers itself (no account) is recorded in usage, in memory only.
            for _ in range(3):
                async with http.post(f"http://127.0.0.1:{port}/openai/v1/responses", json={"model": "gpt-5.5"},
                                     headers={"Authorization": f"Bearer {key}"}) as resp:
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
    config.write_text(tomli_w.dumps({
        "security": {"secret_key": "k" * 32}, "admin": {"token": "kla_test"},
        "models": {"source_url": ""}, "providers": providers}))
    return config


async def test_accounts_login_device_flow(tmp_path, copilot_fake):
    """`accounts login copilot` shows the code, polls GitHub, and stores the account."""
    import asyncio

    copilot_fake.device_interval = 0.05
    config = config_with(tmp_path, {"copilot": copilot_fake.options()})
    proc = await asyncio.create_subprocess_exec(*KLEIS, "--config", str(config), "accounts", "login", "copilot",
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    deadline = asyncio.get_running_loop().time() + 20
    while not copilot_fake.calls("/login/oauth/access_token"):
        assert asyncio.get_running_loop().time() < deadline, "the CLI never polled"
        await asyncio.sleep(0.05)
    copilot_fake.approve_device(login="octo", user_id=42)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert copilot_fake.devices and "copilot account" in text and "octo" in text
    accounts = json.loads(run("accounts", "list", "--json", config=config).stdout)
    assert [(a["provider"], a["accountId"]) for a in accounts] == [("copilot", "42")]


def test_rotate_secret_reencrypts_tokens(tmp_path):
    config = config_with(tmp_path, {})
    auth = ROOT / "tests" / "data" / "codex-cli-auth.json"
    run("accounts", "import", "codex", str(auth), config=config)
    rotated = run("rotate-secret", config=config, env={"KLEIS_NEW_SECRET_KEY": "n" * 32})
    assert rotated.stdout.strip().splitlines()[-1] == "n" * 32
    # The old key no longer opens the tokens; the new one does (via the environment).
    old = run("accounts", "list", "--json", config=config)
    assert json.loads(old.stdout) == [] and "secret_key changed" in old.stderr
    listed = run("accounts", "list", "--json", config=config, env={"KLEIS_SECRET_KEY": "n" * 32})
    assert json.loads(listed.stdout)[0]["accountId"] == "acct_file"
    with sqlite3.connect(tmp_path / "kleis.db") as db:
        (sealed,) = db.execute("SELECT refresh_token_enc FROM provider_accounts").fetchone()
    assert "rt_file_fake_refresh" not in sealed
