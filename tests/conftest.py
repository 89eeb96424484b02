"""Shared fixtures: loopback fakes of every upstream, and a real Kleis server per test.

`kleis = await start_kleis()` writes a config.toml in tmp_path (every provider URL pointing at
its fake), runs the real app with its real listeners on 127.0.0.1:<random port> in the test's
event loop, and stops it (draining usage) at the end. `kleis.services` is the running app's
`kleis.Instance`, so a test can flush usage explicitly instead of sleeping, and `clock=ManualClock()`
lets a test move time instead of waiting for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import tomli_w
from sanic import Sanic

import kleis
from runtime import Clock
from settings import Settings, load_settings
from tests.fakes.claude import FakeClaude
from tests.fakes.codex import FakeCodex
from tests.fakes.copilot import FakeCopilot

Sanic.test_mode = True  # several apps per process, each with its own name
PG_DSN = os.environ.get("KLEIS_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
DATA = Path(__file__).parent / "data"


def fake_upstream(cls, name: str):
    """A fixture running one upstream fake on 127.0.0.1:<random port> for a test."""

    @pytest.fixture(name=name)
    async def fixture():
        fake = await cls().start()
        yield fake
        await fake.stop()

    return fixture


codex_fake = fake_upstream(FakeCodex, "codex_fake")
claude_fake = fake_upstream(FakeClaude, "claude_fake")
copilot_fake = fake_upstream(FakeCopilot, "copilot_fake")


@pytest.fixture
async def sdk_clients():
    """Keeps official SDK clients made in a test and closes them afterwards:
    `client = sdk_clients(openai.AsyncOpenAI(...))`."""
    clients = []

    def keep(client):
        clients.append(client)
        return client

    yield keep
    for client in clients:
        await client.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def pg_available() -> bool:
    import psycopg

    try:
        with psycopg.connect(PG_DSN, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test (dropped afterwards)."""
    import psycopg

    if not pg_available():
        if os.environ.get("KLEIS_REQUIRE_PG"):
            pytest.fail(f"PostgreSQL is required (KLEIS_REQUIRE_PG) but {PG_DSN} is not reachable")
        pytest.skip(f"PostgreSQL not reachable at {PG_DSN}")
    name = "kleis_test_" + secrets.token_hex(6)
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = PG_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """Run a test on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/kleis.db"
    return request.getfixturevalue("pg_url")


@dataclass
class RunningKleis:
    url: str
    app: Sanic
    server: Any
    services: kleis.Instance
    settings: Settings
    admin_token: str
    config_path: Path
    http: aiohttp.ClientSession

    @property
    def admin_headers(self) -> dict:
        return {"Authorization": f"Bearer {self.admin_token}"}

    async def admin(
        self, method: str, path: str, json: Any = None, expect: int | None = None
    ) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=json, headers=self.admin_headers) as resp:
            body = await resp.json(content_type=None)
            if expect is not None:
                assert resp.status == expect, (resp.status, body)
            return resp.status, body

    async def create_key(self, **fields) -> tuple[str, dict]:
        _, body = await self.admin("POST", "/admin/keys", fields, expect=201)
        return body["key"]["key"], body["key"]

    async def import_account(self, provider: str, grant: dict, **extra) -> dict:
        payload = {
            "accessToken": grant["access_token"],
            "refreshToken": grant["refresh_token"],
            "expiresAt": grant["expires_at"],
            "accountId": grant.get("account_id"),
            **extra,
        }
        _, body = await self.admin("POST", f"/admin/accounts/{provider}/import", payload, expect=201)
        return body["account"]

    async def flush(self) -> None:
        await self.services.usage.flush()

    async def buckets(self) -> list[dict]:
        await self.flush()
        return await self.services.store.rows("request_usage_buckets")

    async def rows(self, table: str, **equal) -> list[dict]:
        """Rows of a table as stored (see Store.rows)."""
        return await self.services.store.rows(table, **equal)

    def unseal(self, sealed: str) -> str:
        """A stored token, decrypted with this instance's secret key."""
        return self.services.store.vault.open(sealed)

    @property
    def clock(self) -> Clock:
        return self.services.clock

    async def stop(self) -> None:
        await self.server.before_stop()
        self.server.close()
        await self.server.wait_closed()
        await self.server.after_stop()


@pytest.fixture(autouse=True)
def restore_logging():
    """CLI tests run `main()` in-process, and main() points the root logger at this test's
    stderr; later tests must not log into a closed capture."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


def closed_port() -> int:
    """A loopback port nothing listens on (taken and released), so a test config never points
    the CLI's reload call at a real server (e.g. a developer's `make run` on 8787)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(
    path: Path, db_url: str, fakes: dict[str, Any], extra: dict | None = None, secret_key: str | None = None
) -> str:
    token = "kla_" + secrets.token_hex(16)
    config: dict[str, Any] = {
        "server": {
            "host": "127.0.0.1",
            "port": closed_port(),  # what the CLI's reload call would reach: nothing
            "first_byte_timeout": 5,
            "idle_timeout": 5,
            "response_timeout": 30,
            "connect_timeout": 2,
        },
        "admin": {"token": token},
        "security": {"secret_key": secret_key or secrets.token_urlsafe(24)},
        "database": {"url": db_url},
        "usage": {"flush_interval": 3600.0},  # tests flush explicitly
        # Account model lists are fetched in the background at start; tests that are about
        # them turn them on, so no other test sees extra upstream calls or token refreshes.
        "models": {"source_url": "", "refresh_hours": 0, "account_lists": False},
        "providers": {name: fake.options() for name, fake in fakes.items()},
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict):
            config.setdefault(section, {})
            for k, v in values.items():
                if isinstance(v, dict) and isinstance(config[section].get(k), dict):
                    config[section][k] = {**config[section][k], **v}
                else:
                    config[section][k] = v
        else:
            config[section] = values
    path.write_text(tomli_w.dumps(config))
    return token


@pytest.fixture
async def start_kleis(tmp_path, http, codex_fake, claude_fake, copilot_fake, request):
    """Factory: `await start_kleis(db_url=None, fakes=None, clock=None, **config_sections)`."""
    # Set up a test's database first so it is dropped only after its Kleis servers stopped
    # (whatever order the test lists its fixtures in).
    for name in ("db_url", "pg_url"):
        if name in request.fixturenames:
            request.getfixturevalue(name)
    running: list[RunningKleis] = []
    secret_key = secrets.token_urlsafe(24)  # one per test, so a restarted Kleis reads its own tokens

    async def start(
        db_url: str | None = None, fakes: dict | None = None, clock: Clock | None = None, **extra
    ) -> RunningKleis:
        if fakes is None:
            fakes = {"codex": codex_fake, "claude": claude_fake, "copilot": copilot_fake}
        path = tmp_path / f"config-{len(running)}.toml"
        token = write_config(path, db_url or f"sqlite:///{tmp_path}/kleis.db", fakes, extra, secret_key)
        settings = load_settings(path)
        app = kleis.create_app(settings, name=f"kleis_{uuid.uuid4().hex[:10]}", clock=clock)
        sock = kleis.listening_socket("127.0.0.1", 0)  # Sanic reads port=0 as "use 8000"
        server = await app.create_server(sock=sock, return_asyncio_server=True, access_log=False)
        await server.startup()
        await server.before_start()
        await server.after_start()
        port = server.server.sockets[0].getsockname()[1]
        instance = RunningKleis(
            url=f"http://127.0.0.1:{port}",
            app=app,
            server=server,
            services=app.ctx.kleis,
            settings=settings,
            admin_token=token,
            config_path=path,
            http=http,
        )
        running.append(instance)
        return instance

    yield start
    for instance in reversed(running):
        await instance.stop()


async def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll `predicate` (sync or async) until truthy, with a deadline; returns its value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(interval)


async def until_serving(http, url: str, exited, path: str = "/readyz", timeout: float = 20) -> None:
    """Poll `url + path` until it answers 200 (a server process starting up). `exited()`
    returns None while the process runs, else what it printed: then fail with that."""

    async def up():
        output = exited()
        if asyncio.iscoroutine(output):
            output = await output
        if output is not None:
            raise AssertionError(f"the server exited: {output[-2000:]}")
        try:
            async with http.get(url + path) as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(up, timeout=timeout, interval=0.05)
