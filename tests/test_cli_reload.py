"""A key made or revoked with the CLI on the server's machine works (or stops working) on the
running server at once: the CLI asks the server to reload (`POST /admin/reload`) before it
exits, instead of leaving it to the server's one-second poll. Real processes on both sides."""

import asyncio
import json
import subprocess
import time
from pathlib import Path

import aiohttp
import tomli_w

import cli as cli_module
from settings import AdminSettings, ServerSettings, Settings
from tests.test_cli import KLEIS, free_port

ADMIN = "kla_reload_7Tq3Wm9Xz2Lc5Vb8Nh1Jk4Rp6Y"


def write_config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "security": {"secret_key": "k" * 32},
                "admin": {"token": ADMIN},
                "models": {"source_url": "", "account_lists": False},
            }
        )
    )
    return config


async def kleis_cli(config: Path, *args: str) -> dict:
    """`python kleis.py --config … *args --json` as a real process; its JSON answer."""
    proc = await asyncio.create_subprocess_exec(
        *KLEIS,
        "--config",
        str(config),
        *args,
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_cli_changes_reach_the_running_server_at_once(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)
    server = subprocess.Popen(  # noqa: ASYNC220
        [*KLEIS, "--config", str(config), "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:  # the server's start-up, not background work
                try:
                    async with http.get(f"{base}/healthz") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                await asyncio.sleep(0.05)

            async def status_with(key: str) -> int:
                async with http.get(
                    f"{base}/openai/v1/models", headers={"Authorization": f"Bearer {key}"}
                ) as resp:
                    return resp.status

            delays = []
            for n in range(3):  # without the reload, each would be refused with ~90% probability
                created = await kleis_cli(config, "keys", "create", "--label", f"laptop{n}")
                exited = time.monotonic()
                assert await status_with(created["key"]) == 200
                delays.append(time.monotonic() - exited)
            await kleis_cli(config, "keys", "revoke", "laptop0")
            assert await status_with(created["key"]) == 200  # laptop2 still works
            first = (await kleis_cli(config, "keys", "list"))[-1]
            assert first["label"] == "laptop0" and first["status"] == "revoked"
    finally:
        server.terminate()
        _, err = server.communicate(timeout=20)
    # The first request after the CLI exits already works: the delay is that request's own time.
    assert max(delays) < 0.1, delays
    assert f"clients use http://127.0.0.1:{port} (Kleis listens on 127.0.0.1: only this machine" in err
    assert ADMIN not in err


async def test_revoked_key_is_refused_at_once(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port)
    created = await kleis_cli(config, "keys", "create", "--label", "old")  # before the server starts
    server = subprocess.Popen(  # noqa: ASYNC220
        [*KLEIS, "--config", str(config), "serve"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {created['key']}"}
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with http.get(f"{base}/openai/v1/models", headers=headers) as resp:
                        assert resp.status == 200
                        break
                except aiohttp.ClientError:
                    assert server.poll() is None and time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            for _ in range(3):  # a revoke is seen at once too (no poll window)
                again = await kleis_cli(config, "keys", "create", "--label", "tmp")
                await kleis_cli(config, "keys", "revoke", again["id"])
                async with http.get(
                    f"{base}/openai/v1/models", headers={"Authorization": f"Bearer {again['key']}"}
                ) as resp:
                    assert resp.status == 401
    finally:
        server.terminate()
        server.wait(timeout=20)


async def test_no_server_is_skipped_quietly_and_fast():
    """No server on the port: the CLI neither waits nor complains; no admin token: not even tried."""
    settings = Settings(server=ServerSettings(port=free_port()), admin=AdminSettings(token="kla_x"))
    started = time.monotonic()
    assert await cli_module.tell_server(settings, None) is False
    assert time.monotonic() - started < 1
    assert await cli_module.tell_server(Settings(admin=AdminSettings(token="")), None) is False
