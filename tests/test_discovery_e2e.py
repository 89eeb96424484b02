"""Model discovery over real HTTP through the running app (SPEC S9, clients.md §2-§4).

Kleis runs with its real listeners; the upstream providers are the loopback fakes of
conftest, and the models catalogue (`[models] source_url`) is a small aiohttp server here.
Measurements (model counts, serve times) are attached with `record_property`, so they show
up in `--junitxml` output without printing anything.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import statistics
import time
from typing import Any

import anthropic
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import discovery
from runtime import ManualClock
from tests.conftest import wait_for

SNAPSHOT: dict = json.loads(discovery.SNAPSHOT_PATH.read_bytes())
UPSTREAM = ("openai", "anthropic", "github-copilot")
BASE_PATHS = {"codex": "/openai/v1", "claude": "/anthropic/v1", "copilot": "/copilot/v1"}
ENDPOINTS = {  # provider.npm → what the AI SDK posts to (clients.md §4)
    "@ai-sdk/openai": "/responses",
    "@ai-sdk/anthropic": "/messages",
    "@ai-sdk/openai-compatible": "/chat/completions",
    "@ai-sdk/github-copilot": "/chat/completions",
}


# ── Helpers ──────────────────────────────────────────────────────────────────


def dead_url() -> str:
    """A loopback URL on a port nobody listens on (connection refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api.json"


class CatalogueServer:
    """A models.dev stand-in: serves `body` (object → JSON, bytes → raw) with `status`."""

    def __init__(self, body: Any = None) -> None:
        self.body: Any = copy.deepcopy(SNAPSHOT) if body is None else body
        self.status = 200
        self.delay = 0.0
        self.requests = 0
        self.release = asyncio.Event()  # ends a delayed reply early (teardown)
        self.server: TestServer | None = None
        self.url = ""

    async def _serve(self, request: web.Request) -> web.Response:
        self.requests += 1
        if self.delay:
            try:
                await asyncio.wait_for(self.release.wait(), self.delay)
            except TimeoutError:
                pass
        raw = self.body if isinstance(self.body, bytes) else json.dumps(self.body).encode()
        return web.Response(body=raw, status=self.status, content_type="application/json")

    async def start(self) -> CatalogueServer:
        app = web.Application()
        app.router.add_get("/api.json", self._serve)
        self.server = TestServer(app, host="127.0.0.1", port=0)
        await self.server.start_server()
        self.url = str(self.server.make_url("/api.json"))
        return self

    async def stop(self) -> None:
        self.release.set()
        if self.server is not None:
            await self.server.close()


@pytest.fixture
async def catalogue_server():
    server = await CatalogueServer().start()
    yield server
    await server.stop()


async def get(http, url: str, headers: dict | None = None) -> tuple[int, Any, Any]:
    async with http.get(url, headers=headers or {}) as resp:
        return resp.status, resp.headers, await resp.json(content_type=None)


async def registry(kleis, http, path: str = "/api.json", headers: dict | None = None) -> dict:
    status, resp_headers, body = await get(http, kleis.url + path, headers)
    assert status == 200, body
    assert resp_headers.get("cache-control") == "no-store"
    return body


def kleis_models(reg: dict) -> dict:
    provider = reg["kleis"]
    assert provider["id"] == "kleis" and provider["env"] == ["KLEIS_API_KEY"]
    return provider["models"]


def by_route(models: dict) -> dict[str, int]:
    """Model counts per configured provider (from each model's provider.api)."""
    counts = dict.fromkeys(BASE_PATHS, 0)
    for model in models.values():
        for name, path in BASE_PATHS.items():
            if model["provider"]["api"].endswith(path):
                counts[name] += 1
    return counts


def assert_valid(reg: dict, base: str, catalogue: dict = SNAPSHOT) -> None:
    """What OpenCode needs of every model (clients.md §4), and Kleis's own routing fields."""
    for pid, provider in reg.items():
        assert provider["id"] == pid
        for model in provider["models"].values():
            assert isinstance(model["id"], str) and isinstance(model["name"], str)
            for field in ("context", "output"):
                value = model["limit"][field]
                assert isinstance(value, (int, float)) and not isinstance(value, bool)
    for key, model in reg["kleis"]["models"].items():
        api, npm = model["provider"]["api"], model["provider"]["npm"]
        assert api in {base + p for p in BASE_PATHS.values()}, (key, api)
        assert npm in ENDPOINTS, (key, npm)
        if api.endswith("/openai/v1"):
            assert key == model["id"] and npm == "@ai-sdk/openai"
            assert model["id"] in catalogue["openai"]["models"]
        elif api.endswith("/anthropic/v1"):
            assert key == "anthropic/" + model["id"] and npm == "@ai-sdk/anthropic"
            assert model["id"] in catalogue["anthropic"]["models"]
        else:
            assert key == "github-copilot/" + model["id"]
            gpt5 = model["id"].startswith("gpt-5")
            assert npm == ("@ai-sdk/openai" if gpt5 else "@ai-sdk/openai-compatible"), key


def upstream_unchanged(reg: dict, catalogue: dict = SNAPSHOT) -> bool:
    return all(reg[pid] == catalogue[pid] for pid in UPSTREAM)


async def all_accounts(kleis, codex_fake, claude_fake, copilot_fake) -> dict[str, dict]:
    return {
        "codex": await kleis.import_account("codex", codex_fake.grant()),
        "claude": await kleis.import_account("claude", claude_fake.grant()),
        "copilot": await kleis.import_account("copilot", copilot_fake.grant()),
    }


# ── Fresh install, offline ───────────────────────────────────────────────────


async def test_offline_install_serves_snapshot_and_kleis_follows_accounts(
    start_kleis, http, codex_fake, claude_fake, copilot_fake, record_property
):
    kleis = await start_kleis(models={"source_url": dead_url(), "refresh_hours": 6})
    reg = await registry(kleis, http)
    assert set(reg) == {*UPSTREAM, "kleis"}
    assert upstream_unchanged(reg)
    assert kleis_models(reg) == {}  # no account → no models (but the provider is there)

    codex = await kleis.import_account("codex", codex_fake.grant())
    reg = await registry(kleis, http)
    assert upstream_unchanged(reg)
    counts = by_route(kleis_models(reg))
    assert counts["codex"] > 0 and counts["claude"] == counts["copilot"] == 0
    assert_valid(reg, kleis.url)
    # Codex gate (prior art §4.4): newer than 5.4 plus the explicit allow list, minus the deny list.
    assert {"gpt-5.5", "gpt-5.4", "gpt-5.4-mini", "gpt-5.6-luna"} <= set(kleis_models(reg))
    assert not {"gpt-5.5-pro", "gpt-5.6", "gpt-5", "gpt-4o", "text-embedding-3-small"} & set(
        kleis_models(reg)
    )
    assert kleis_models(reg)["gpt-5.5"]["limit"] == {"context": 400000, "input": 272000, "output": 128000}
    assert (
        kleis_models(reg)["gpt-5.5"]["name"] == SNAPSHOT["openai"]["models"]["gpt-5.5"]["name"] + " (codex)"
    )

    await kleis.import_account("claude", claude_fake.grant())
    await kleis.import_account("copilot", copilot_fake.grant())
    reg = await registry(kleis, http)
    assert upstream_unchanged(reg)
    assert_valid(reg, kleis.url)
    counts = by_route(kleis_models(reg))
    assert counts["claude"] == len(SNAPSHOT["anthropic"]["models"])  # no gate for Claude or Copilot
    assert counts["copilot"] == len(SNAPSHOT["github-copilot"]["models"])
    record_property("kleis_models_all_accounts_public", counts)

    # a disabled account takes its provider out of discovery
    await kleis.admin("PATCH", f"/admin/accounts/{codex['id']}", {"enabled": False}, expect=200)
    counts = by_route(kleis_models(await registry(kleis, http)))
    assert counts["codex"] == 0 and counts["claude"] > 0 and counts["copilot"] > 0


# ── Scoped discovery ─────────────────────────────────────────────────────────


async def test_scoped_discovery_applies_key_scopes_to_kleis_only(
    start_kleis, http, codex_fake, claude_fake, copilot_fake, record_property
):
    kleis = await start_kleis(clock=ManualClock())
    accounts = await all_accounts(kleis, codex_fake, claude_fake, copilot_fake)
    public = kleis_models(await registry(kleis, http))

    async def scoped(**fields) -> dict:
        _, view = await kleis.create_key(**fields)
        reg = await registry(kleis, http, f"/api/{view['modelsDiscoveryToken']}/api.json")
        assert upstream_unchanged(reg)
        assert_valid(reg, kleis.url)
        return kleis_models(reg)

    everything = await scoped(label="all")
    assert everything == public
    claude_only = await scoped(providerScopes=["claude"])
    assert claude_only == {k: m for k, m in public.items() if m["provider"]["api"].endswith("/anthropic/v1")}
    record_property("kleis_models_all_providers_key", by_route(everything))
    record_property("kleis_models_claude_scoped_key", by_route(claude_only))
    two = await scoped(providerScopes=["codex", "copilot"])
    # editing a key's scopes changes what its URL serves at once (no stale memoised registry)
    _, listed = await kleis.admin("GET", "/admin/keys", expect=200)
    view = next(k for k in listed["keys"] if k["providerScopes"] == ["codex", "copilot"])
    await kleis.admin("PATCH", f"/admin/keys/{view['id']}", {"providerScopes": ["claude"]}, expect=200)
    assert (
        kleis_models(await registry(kleis, http, f"/api/{view['modelsDiscoveryToken']}/api.json"))
        == claude_only
    )
    assert by_route(two) == {**by_route(public), "claude": 0}

    # model scopes match raw, unprefixed and either route prefix (prior art §2.1)
    picked = await scoped(
        modelScopes=["codex/gpt-5.5", "anthropic/claude-opus-4-7", "copilot/gpt-5-mini", "nope"]
    )
    assert set(picked) == {"gpt-5.5", "anthropic/claude-opus-4-7", "github-copilot/gpt-5-mini"}
    bare = await scoped(modelScopes=["gpt-5.5"])  # unprefixed: every route serving that id
    assert set(bare) == {"gpt-5.5", "github-copilot/gpt-5.5"}
    assert picked["gpt-5.5"] == public["gpt-5.5"]

    # account scopes: only the providers of the scoped accounts
    assert set(by_route(await scoped(accountScopes=[accounts["copilot"]["id"]])).items()) == {
        ("codex", 0),
        ("claude", 0),
        ("copilot", by_route(public)["copilot"]),
    }

    # unknown, malformed, revoked and expired tokens: 404 JSON, nothing cached
    _, revoked = await kleis.create_key(label="revoked")
    await kleis.admin("POST", f"/admin/keys/{revoked['id']}/revoke", expect=200)
    _, expiring = await kleis.create_key(label="expiring", expiresAt=kleis.clock.now() + 60_000)
    assert (await get(http, f"{kleis.url}/api/{expiring['modelsDiscoveryToken']}/api.json"))[0] == 200
    kleis.clock.advance(60_000)
    for token in (
        "kmd_" + "0" * 32,
        "kmd-not-a-token",
        "x" * 121,
        revoked["modelsDiscoveryToken"],
        expiring["modelsDiscoveryToken"],
    ):
        status, headers, body = await get(http, f"{kleis.url}/api/{token}/api.json")
        assert status == 404, (token, body)
        assert body["error"] == "not_found" and body["message"]
        assert headers.get("cache-control") == "no-store"
        assert headers["content-type"].startswith("application/json")


# ── Base URLs ────────────────────────────────────────────────────────────────


FORWARDED = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "kleis.example.net"}


async def test_public_url_wins(start_kleis, http, codex_fake):
    kleis = await start_kleis(
        server={"public_url": "https://kleis.example.com/proxy/", "trust_forwarded": True}
    )
    await kleis.import_account("codex", codex_fake.grant())
    reg = await registry(kleis, http, headers=FORWARDED)
    assert_valid(reg, "https://kleis.example.com/proxy")
    _, view = await kleis.create_key(label="x")
    assert view["scopedModelsUrl"] == f"https://kleis.example.com/proxy/api/{view['modelsDiscoveryToken']}"


async def test_request_origin_and_forwarded_headers_only_when_trusted(start_kleis, http, codex_fake):
    plain = await start_kleis()
    await plain.import_account("codex", codex_fake.grant())
    assert_valid(await registry(plain, http), plain.url)
    assert_valid(await registry(plain, http, headers={"Host": "kleis.lan:9000"}), "http://kleis.lan:9000")
    assert_valid(await registry(plain, http, headers=FORWARDED), plain.url)  # not trusted: ignored

    trusting = await start_kleis(server={"trust_forwarded": True})
    assert_valid(await registry(trusting, http, headers=FORWARDED), "https://kleis.example.net")
    proto_only = {"X-Forwarded-Proto": "https, http"}
    assert_valid(
        await registry(trusting, http, headers=proto_only), "https://" + trusting.url.split("://")[1]
    )
    bogus = {"X-Forwarded-Proto": "gopher"}
    assert_valid(await registry(trusting, http, headers=bogus), trusting.url)
    _, view = await trusting.create_key(label="x")
    async with http.get(
        trusting.url + "/admin/keys", headers={**trusting.admin_headers, **FORWARDED}
    ) as resp:
        keys = (await resp.json())["keys"]
    assert keys[0]["scopedModelsUrl"] == f"https://kleis.example.net/api/{view['modelsDiscoveryToken']}"


# ── Catalogue fetch, refresh, stale data, cache ──────────────────────────────


def changed_catalogue() -> dict:
    """The snapshot with one new good Claude model and bad models in two providers."""
    data = copy.deepcopy(SNAPSHOT)
    good = {**data["anthropic"]["models"]["claude-opus-4-7"], "id": "claude-new-9", "name": "Claude New 9"}
    data["anthropic"]["models"]["claude-new-9"] = good
    data["anthropic"]["models"]["claude-broken"] = {
        "id": "claude-broken",
        "name": "Broken",
        "limit": {"context": 1},
    }
    data["openai"]["models"]["gpt-5.9-bad"] = {"id": "gpt-5.9-bad", "limit": {"context": 1, "output": 1}}
    data["github-copilot"]["models"]["gpt-5.9-bad"] = {"name": "no id", "limit": {"context": 1, "output": 1}}
    return data


async def test_refresh_fetches_drops_bad_models_and_keeps_data_on_errors(
    start_kleis, http, claude_fake, codex_fake, catalogue_server, tmp_path
):
    catalogue_server.body = changed_catalogue()
    kleis = await start_kleis(models={"source_url": catalogue_server.url, "refresh_hours": 0})
    await kleis.import_account("claude", claude_fake.grant())
    await kleis.import_account("codex", codex_fake.grant())
    reg = await registry(kleis, http)
    assert catalogue_server.requests == 0  # refresh_hours = 0: no background fetch
    assert "claude-new-9" not in reg["anthropic"]["models"]

    reg = await registry(kleis, http, "/api.json?refresh=1")
    assert catalogue_server.requests == 1
    assert reg["anthropic"]["models"]["claude-new-9"]["name"] == "Claude New 9"
    assert kleis_models(reg)["anthropic/claude-new-9"]["name"] == "Claude New 9 (claude)"
    for pid, mid in (
        ("anthropic", "claude-broken"),
        ("openai", "gpt-5.9-bad"),
        ("github-copilot", "gpt-5.9-bad"),
    ):
        assert mid not in reg[pid]["models"]
    assert "anthropic/claude-broken" not in kleis_models(reg) and "gpt-5.9-bad" not in kleis_models(reg)
    kept = {pid: {k: m for k, m in SNAPSHOT[pid]["models"].items()} for pid in UPSTREAM}
    assert all(set(kept[pid]) <= set(reg[pid]["models"]) for pid in UPSTREAM)  # the good ones stay
    assert reg["openai"] == SNAPSHOT["openai"] and reg["github-copilot"] == SNAPSHOT["github-copilot"]
    assert_valid(reg, kleis.url, changed_catalogue())
    fetched = reg

    # the cache file beside the database holds the cleaned catalogue
    cache = json.loads((tmp_path / "models-cache.json").read_text())
    assert (
        "claude-new-9" in cache["anthropic"]["models"] and "claude-broken" not in cache["anthropic"]["models"]
    )

    # forced refreshes are rate-limited (public URL): the next one within a minute does not fetch
    await registry(kleis, http, "/api.json?refresh=true")
    assert catalogue_server.requests == 1
    kleis.services.catalogue.force_interval = 0

    # fetch errors keep serving the previous data
    for status, body in ((500, {"error": "boom"}), (200, b"{not json"), (200, b"[1, 2]"), (200, {"x": 1})):
        catalogue_server.status, catalogue_server.body = status, body
        before = catalogue_server.requests
        assert await registry(kleis, http, "/api.json?refresh=1") == fetched, (status, body)
        assert catalogue_server.requests == before + 1
    assert "claude-new-9" in json.loads((tmp_path / "models-cache.json").read_text())["anthropic"]["models"]

    # a scoped refresh also fetches
    catalogue_server.status, catalogue_server.body = 200, copy.deepcopy(SNAPSHOT)
    _, view = await kleis.create_key(label="x")
    reg = await registry(kleis, http, f"/api/{view['modelsDiscoveryToken']}/api.json?refresh=1")
    assert "claude-new-9" not in reg["anthropic"]["models"] and upstream_unchanged(reg)


async def test_restarted_kleis_serves_the_cached_catalogue(start_kleis, http, claude_fake, catalogue_server):
    catalogue_server.body = changed_catalogue()
    first = await start_kleis(models={"source_url": catalogue_server.url, "refresh_hours": 0})
    await first.import_account("claude", claude_fake.grant())
    assert "claude-new-9" in (await registry(first, http, "/api.json?refresh=1"))["anthropic"]["models"]

    second = await start_kleis(  # same database path and secret, so the same accounts
        models={"source_url": dead_url(), "refresh_hours": 6},
        security={"secret_key": first.settings.security.secret_key},
    )
    assert second.services.catalogue.origin == "cache"
    reg = await registry(second, http)
    assert "claude-new-9" in reg["anthropic"]["models"]
    assert "anthropic/claude-new-9" in kleis_models(reg)
    assert reg == await registry(first, http, headers={"Host": second.url.split("://")[1]})


async def test_background_refresh_fetches_when_due(start_kleis, http, claude_fake, catalogue_server):
    kleis = await start_kleis(models={"source_url": catalogue_server.url, "refresh_hours": 0.0002})
    await kleis.import_account("claude", claude_fake.grant())
    await wait_for(lambda: catalogue_server.requests >= 1)  # at start-up (never fetched)
    assert "claude-new-9" not in (await registry(kleis, http))["anthropic"]["models"]
    catalogue_server.body = changed_catalogue()
    await wait_for(lambda: catalogue_server.requests >= 2, timeout=5)  # ~0.7 s later, floored at 1 s

    async def served():
        return "anthropic/claude-new-9" in kleis_models(await registry(kleis, http))

    await wait_for(served, timeout=3)


async def test_requests_never_wait_for_a_slow_catalogue(start_kleis, http, claude_fake, catalogue_server):
    catalogue_server.delay = 5.0
    kleis = await start_kleis(models={"source_url": catalogue_server.url, "refresh_hours": 6})
    await kleis.import_account("claude", claude_fake.grant())
    await wait_for(lambda: catalogue_server.requests >= 1)  # the background fetch is hanging now
    started = time.perf_counter()
    reg = await registry(kleis, http)
    assert time.perf_counter() - started < 1.0
    assert upstream_unchanged(reg) and by_route(kleis_models(reg))["claude"] > 0
    _, view = await kleis.create_key(label="x")
    started = time.perf_counter()
    await registry(kleis, http, f"/api/{view['modelsDiscoveryToken']}/api.json")
    assert time.perf_counter() - started < 1.0

    # shutting down does not wait for the hanging fetch either
    started = time.perf_counter()
    await kleis.stop()
    assert time.perf_counter() - started < 2.0


# ── SDK model lists ──────────────────────────────────────────────────────────


async def test_model_lists_in_each_sdk_format(start_kleis, http, codex_fake, claude_fake, copilot_fake):
    kleis = await start_kleis()
    await all_accounts(kleis, codex_fake, claude_fake, copilot_fake)
    models = kleis_models(await registry(kleis, http))

    def ids(base_path: str) -> list[str]:
        return [m["id"] for m in models.values() if m["provider"]["api"].endswith(base_path)]

    key, _ = await kleis.create_key(label="all")
    oa = openai.AsyncOpenAI(base_url=kleis.url + "/openai/v1", api_key=key, max_retries=0)
    listed = [m async for m in oa.models.list()]
    assert [m.id for m in listed] == ids("/openai/v1") and listed[0].object == "model"
    cp = openai.AsyncOpenAI(base_url=kleis.url + "/copilot/v1", api_key=key, max_retries=0)
    assert [m.id async for m in cp.models.list()] == ids("/copilot/v1")
    an = anthropic.AsyncAnthropic(base_url=kleis.url + "/anthropic", api_key=key, max_retries=0)
    listed = [m async for m in an.models.list()]
    assert [m.id for m in listed] == ids("/anthropic/v1")
    opus = next(m for m in listed if m.id == "claude-opus-4-7")
    assert (
        opus.type == "model"
        and opus.display_name == SNAPSHOT["anthropic"]["models"]["claude-opus-4-7"]["name"]
    )
    assert opus.created_at.year >= 2025

    # filtered by the key's scopes
    claude_key, _ = await kleis.create_key(providerScopes=["claude"])
    assert [m.id async for m in an.with_options(api_key=claude_key).models.list()] == ids("/anthropic/v1")
    assert [m async for m in oa.with_options(api_key=claude_key).models.list()] == []
    assert [m async for m in cp.with_options(api_key=claude_key).models.list()] == []
    picky, _ = await kleis.create_key(modelScopes=["openai/gpt-5.5", "claude-opus-4-7"])
    assert [m.id async for m in oa.with_options(api_key=picky).models.list()] == ["gpt-5.5"]
    assert [m.id async for m in an.with_options(api_key=picky).models.list()] == ["claude-opus-4-7"]

    # the API key is required, and errors come in the SDK's own envelope
    with pytest.raises(openai.AuthenticationError):
        await oa.with_options(api_key="kleis_wrong").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        await an.with_options(api_key="kleis_wrong").models.list()
    for path in BASE_PATHS.values():
        status, _, body = await get(http, f"{kleis.url}{path}/models")
        assert status == 401, (path, body)
        if path == "/anthropic/v1":
            assert body["type"] == "error" and body["error"]["type"] == "authentication_error"
        else:
            assert body["error"]["type"] == "authentication_error"


# ── Admin key view ───────────────────────────────────────────────────────────


async def test_admin_key_view_carries_the_opencode_setup(start_kleis, http, codex_fake):
    kleis = await start_kleis()
    await kleis.import_account("codex", codex_fake.grant())
    key, view = await kleis.create_key(label="laptop", providerScopes=["codex"])
    scoped = f"{kleis.url}/api/{view['modelsDiscoveryToken']}"
    assert view["key"] == key and view["scopedModelsUrl"] == scoped
    assert view["opencode"]["OPENCODE_MODELS_URL"] == scoped
    assert view["opencode"]["KLEIS_API_KEY"] == key
    assert f'OPENCODE_MODELS_URL="{scoped}"' in view["opencode"]["snippet"]
    assert f'KLEIS_API_KEY="{key}"' in view["opencode"]["snippet"]
    # OpenCode appends /api.json to OPENCODE_MODELS_URL
    reg = await registry(kleis, http, scoped.removeprefix(kleis.url) + "/api.json")
    assert by_route(kleis_models(reg))["codex"] > 0

    _, listed = await kleis.admin("GET", "/admin/keys", expect=200)
    assert key not in json.dumps(listed)
    (item,) = listed["keys"]
    assert "key" not in item and item["keyPrefix"] == key[:12]
    assert item["scopedModelsUrl"] == scoped and item["opencode"]["OPENCODE_MODELS_URL"] == scoped
    assert item["opencode"]["KLEIS_API_KEY"] != key and "<the key>" in item["opencode"]["snippet"]
    _, patched = await kleis.admin("PATCH", f"/admin/keys/{view['id']}", {"label": "desk"}, expect=200)
    assert key not in json.dumps(patched)


# ── Round trip: every discovered model answers through Kleis ─────────────────


async def test_every_kleis_model_round_trips_to_the_right_fake(
    start_kleis, http, codex_fake, claude_fake, copilot_fake, record_property
):
    kleis = await start_kleis()
    await all_accounts(kleis, codex_fake, claude_fake, copilot_fake)
    key, view = await kleis.create_key(label="all")
    models = kleis_models(await registry(kleis, http, f"/api/{view['modelsDiscoveryToken']}/api.json"))
    fakes = {"/openai/v1": codex_fake, "/anthropic/v1": claude_fake, "/copilot/v1": copilot_fake}
    hi = [{"role": "user", "content": "hi"}]
    bodies = {
        "/responses": lambda m: {"model": m, "input": "hi", "stream": True},
        "/messages": lambda m: {"model": m, "max_tokens": 16, "messages": hi, "stream": True},
        "/chat/completions": lambda m: {"model": m, "messages": hi, "stream": True},
    }
    seen: dict[str, int] = {}
    for mkey, model in models.items():
        api, npm = model["provider"]["api"], model["provider"]["npm"]
        endpoint = ENDPOINTS[npm]
        fake = fakes[api.removeprefix(kleis.url)]
        before = len(fake.requests)
        async with http.post(
            api + endpoint, json=bodies[endpoint](model["id"]), headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            text = await resp.text()
            assert resp.status == 200, (mkey, npm, text[:300])
            assert resp.headers["content-type"].startswith("text/event-stream"), mkey
        api_calls = [r for r in fake.requests[before:] if r.method == "POST" and r.path.endswith(endpoint)]
        assert [r.json["model"] for r in api_calls] == [model["id"]], mkey
        seen[endpoint] = seen.get(endpoint, 0) + 1
    assert set(seen) == {"/responses", "/messages", "/chat/completions"}
    record_property("round_trip_requests_per_endpoint", seen)


# ── Measurement ──────────────────────────────────────────────────────────────


async def test_serve_time(start_kleis, http, codex_fake, claude_fake, copilot_fake, record_property):
    kleis = await start_kleis()
    await all_accounts(kleis, codex_fake, claude_fake, copilot_fake)
    _, view = await kleis.create_key(providerScopes=["claude", "codex"])
    for path in ("/api.json", f"/api/{view['modelsDiscoveryToken']}/api.json"):
        await registry(kleis, http, path)  # warm
        times = []
        for _ in range(20):
            started = time.perf_counter()
            async with http.get(kleis.url + path) as resp:
                assert resp.status == 200
                await resp.read()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        record_property(
            "median_ms " + ("public" if path == "/api.json" else "scoped"), round(median * 1000, 3)
        )
        assert median < 0.25


# ── The memoised registry behind /api.json ───────────────────────────────────


def test_catalogue_memoises_registries_per_catalogue_routes_base_and_scopes(tmp_path):
    import logging

    import providers.claude
    import providers.codex

    cat = discovery.Catalogue(discovery.SNAPSHOT_PATH, tmp_path / "c.json", "", 0, logging.getLogger("t"))
    codex = discovery.Route.from_module("codex", providers.codex, providers.codex.OPTIONS)
    claude = discovery.Route.from_module("claude", providers.claude, providers.claude.OPTIONS)
    scopes = discovery.Scopes(providers=frozenset({"claude"}))
    first = cat.registry([codex, claude], "http://a")
    assert cat.registry([codex, claude], "http://a") is first
    assert cat.registry_json([codex, claude], "http://a") is cat.registry_json([codex, claude], "http://a")
    assert json.loads(cat.registry_json([codex, claude], "http://a")) == first
    assert first == discovery.build_registry(cat.current(), [codex, claude], "http://a")
    for other in (
        ([codex], "http://a", None),
        ([codex, claude], "http://b", None),
        ([codex, claude], "http://a", scopes),
    ):
        assert cat.registry(*other) is not first
        assert cat.registry(*other) == discovery.build_registry(cat.current(), *other)
    cat._data = copy.deepcopy(cat.current())  # a fetch swaps the object in
    assert cat.registry([codex, claude], "http://a") is not first
    for i in range(cat.registry_cache_size * 3):  # client-chosen Host headers cannot grow it
        cat.registry([codex], f"http://h{i}")
    assert len(cat._registries) <= cat.registry_cache_size
