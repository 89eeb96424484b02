"""discovery.py: scope rules, validation, the api.json registry, model lists, and the
catalogue source against a fake catalogue server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import re
import socket
import time
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

import discovery
from discovery import (
    Catalogue,
    Route,
    Scopes,
    anthropic_model_list,
    build_registry,
    clean_catalogue,
    model_allowed,
    openai_model_list,
    scope_candidates,
    strip_prefix,
    valid_model,
)

BASE = "https://kleis.example/"
LOG = logging.getLogger("test.discovery")


# ── Stand-in adapters ────────────────────────────────────────────────────────

CODEX_ALLOW = {"gpt-5.3-codex-spark", "gpt-5.4", "gpt-5.4-mini", "gpt-5.5"}
CODEX_DENY = {"gpt-5.5-pro", "gpt-5.6"}
CODEX_LIMITS = {"gpt-5.5", "gpt-5.6-luna", "gpt-5.6-sol", "gpt-5.6-terra"}


def codex_gate(options, model_id, model):
    """Prior art §4.4: the Codex model gate and limit overrides."""
    mid = model_id.lower()
    if mid in CODEX_DENY:
        return None
    if mid not in CODEX_ALLOW:
        m = re.match(r"gpt-(\d+)\.(\d+)", mid)
        if not m or (int(m[1]), int(m[2])) <= (5, 4):
            return None
    if mid in CODEX_LIMITS:
        return {**model, "limit": {"context": 400000, "input": 272000, "output": 128000}}
    return model


def copilot_npm(options, model_id, model):
    """Sends the models listed in options to /responses."""
    if model_id in options.get("responses_models", ()):
        return {**model, "provider": {**model["provider"], "npm": "@ai-sdk/openai"}}
    return model


CODEX = SimpleNamespace(
    NAME="codex",
    CATALOGUE="openai",
    PREFIXES=("openai/", "codex/"),
    BASE_PATH="/openai/v1",
    ROUTES={"/openai/v1/responses": "responses"},
    NPM={"responses": "@ai-sdk/openai"},
    MODEL_KEY_PREFIX="",
    catalogue_model=codex_gate,
)
CLAUDE = SimpleNamespace(
    NAME="claude",
    CATALOGUE="anthropic",
    PREFIXES=("anthropic/", "claude/"),
    BASE_PATH="/anthropic/v1",
    ROUTES={"/anthropic/v1/messages": "messages"},
    NPM={"messages": "@ai-sdk/anthropic"},
)
COPILOT = SimpleNamespace(
    NAME="copilot",
    CATALOGUE="github-copilot",
    PREFIXES=("github-copilot/", "copilot/"),
    BASE_PATH="/copilot/v1",
    ROUTES={"/copilot/v1/chat/completions": "chat_completions", "/copilot/v1/responses": "responses"},
    NPM={"responses": "@ai-sdk/openai", "chat_completions": "@ai-sdk/openai-compatible"},
    catalogue_model=copilot_npm,
)


def routes(*names, copilot_options=None):
    modules = {"codex": CODEX, "claude": CLAUDE, "copilot": COPILOT}
    options = {"copilot": copilot_options or {}}
    return [Route.from_module(n, modules[n], options.get(n, {})) for n in names]


ALL = ("codex", "claude", "copilot")


# ── A small catalogue (prior art §9 models-dev-contract) ─────────────────────


def model(mid, name=None, **extra):
    return {"id": mid, "name": name or mid.upper(), "limit": {"context": 200000, "output": 32000}, **extra}


OPENAI_IDS = [
    "gpt-5.3-codex-spark",
    "gpt-5",
    "gpt-5.3-codex",
    "gpt-5.5",
    "gpt-5.5-pro",
    "gpt-5.6",
    "gpt-5.6-luna",
    "text-embedding-3-small",
]


def catalogue():
    return {
        "openai": {
            "id": "openai",
            "name": "OpenAI",
            "env": ["OPENAI_API_KEY"],
            "npm": "@ai-sdk/openai",
            "models": {m: model(m) for m in OPENAI_IDS},
        },
        "anthropic": {
            "id": "anthropic",
            "name": "Anthropic",
            "env": ["ANTHROPIC_API_KEY"],
            "npm": "@ai-sdk/anthropic",
            "models": {
                "claude-sonnet-4": model("claude-sonnet-4", "Claude Sonnet 4", release_date="2025-05-22")
            },
        },
        "github-copilot": {
            "id": "github-copilot",
            "name": "GitHub Copilot",
            "env": ["GITHUB_TOKEN"],
            "npm": "@ai-sdk/openai-compatible",
            "api": "https://api.githubcopilot.com",
            "models": {
                "gpt-5": model("gpt-5", "GPT-5"),
                "gpt-5-mini": model(
                    "gpt-5-mini",
                    "GPT-5 mini",
                    provider={"npm": "@ai-sdk/github-copilot", "api": "https://x", "extra": 1},
                ),
            },
        },
    }


def kleis_keys(registry):
    return list(registry["kleis"]["models"])


# ── Registry ─────────────────────────────────────────────────────────────────


def test_canonical_providers_untouched_and_input_not_mutated():
    cat = catalogue()
    before = copy.deepcopy(cat)
    reg = build_registry(cat, routes(*ALL, copilot_options={"responses_models": ["gpt-5"]}), BASE)
    assert cat == before
    for pid in ("openai", "anthropic", "github-copilot"):
        assert reg[pid] == before[pid]
    assert reg["github-copilot"]["api"] == "https://api.githubcopilot.com"
    assert reg["openai"]["env"] == ["OPENAI_API_KEY"]
    assert list(reg) == ["openai", "anthropic", "github-copilot", "kleis"]


def test_kleis_provider_and_codex_gate():
    reg = build_registry(catalogue(), routes(*ALL), BASE)
    kleis = reg["kleis"]
    assert {k: kleis[k] for k in ("id", "name", "env")} == {
        "id": "kleis",
        "name": "Kleis",
        "env": ["KLEIS_API_KEY"],
    }
    assert set(kleis) == {"id", "name", "env", "models"}  # no provider-level npm/api
    keys = kleis_keys(reg)
    for present in ("gpt-5.3-codex-spark", "gpt-5.5", "gpt-5.6-luna"):
        assert present in keys
    for absent in ("gpt-5.5-pro", "gpt-5.6", "gpt-5.3-codex", "gpt-5", "text-embedding-3-small"):
        assert absent not in keys
    assert not any(k.startswith("openai/") or k.startswith("codex/") for k in keys)
    limits = {"context": 400000, "input": 272000, "output": 128000}
    assert kleis["models"]["gpt-5.5"]["limit"] == limits
    assert kleis["models"]["gpt-5.6-luna"]["limit"] == limits
    assert kleis["models"]["gpt-5.3-codex-spark"]["limit"] == {"context": 200000, "output": 32000}


def test_prefixed_keys_names_api_and_npm():
    reg = build_registry(catalogue(), routes(*ALL, copilot_options={"responses_models": ["gpt-5"]}), BASE)
    models = reg["kleis"]["models"]
    assert kleis_keys(reg) == [
        "gpt-5.3-codex-spark",
        "gpt-5.5",
        "gpt-5.6-luna",
        "anthropic/claude-sonnet-4",
        "github-copilot/gpt-5",
        "github-copilot/gpt-5-mini",
    ]
    sonnet = models["anthropic/claude-sonnet-4"]
    assert sonnet["id"] == "claude-sonnet-4"  # the id OpenCode sends stays the upstream id
    assert sonnet["name"] == "Claude Sonnet 4 (claude)"
    assert sonnet["provider"] == {"api": "https://kleis.example/anthropic/v1", "npm": "@ai-sdk/anthropic"}
    assert models["gpt-5.5"]["name"] == "GPT-5.5 (codex)"
    assert models["gpt-5.5"]["provider"] == {
        "api": "https://kleis.example/openai/v1",
        "npm": "@ai-sdk/openai",
    }
    # the adapter's per-model npm wins; otherwise the primary (first ROUTES) endpoint's npm
    assert models["github-copilot/gpt-5"]["provider"] == {
        "api": "https://kleis.example/copilot/v1",
        "npm": "@ai-sdk/openai",
    }
    # the upstream model's own npm/api are replaced, its other provider fields kept
    assert models["github-copilot/gpt-5-mini"]["provider"] == {
        "extra": 1,
        "api": "https://kleis.example/copilot/v1",
        "npm": "@ai-sdk/openai-compatible",
    }
    assert models["github-copilot/gpt-5-mini"]["name"] == "GPT-5 mini (copilot)"


def test_existing_upstream_kleis_provider_is_merged():
    cat = catalogue()
    cat["kleis"] = {
        "id": "kleis",
        "name": "Upstream Kleis",
        "env": ["OTHER_KEY"],
        "models": {"mine": model("mine"), "gpt-5.5": model("gpt-5.5", "theirs"), "bad": {"id": "bad"}},
    }
    before = copy.deepcopy(cat)
    reg = build_registry(cat, routes(*ALL), BASE)
    kleis = reg["kleis"]
    assert cat == before
    assert kleis["name"] == "Upstream Kleis"
    assert kleis["env"] == ["OTHER_KEY", "KLEIS_API_KEY"]
    assert kleis["models"]["mine"] == model("mine")
    assert kleis["models"]["gpt-5.5"]["name"] == "theirs"  # theirs wins
    assert "bad" not in kleis["models"]
    assert (
        kleis["models"]["anthropic/claude-sonnet-4"]["provider"]["api"]
        == "https://kleis.example/anthropic/v1"
    )
    cat["kleis"]["env"] = ["KLEIS_API_KEY"]
    assert build_registry(cat, routes(*ALL), BASE)["kleis"]["env"] == ["KLEIS_API_KEY"]


def test_only_codex_configured():
    reg = build_registry(catalogue(), routes("codex"), BASE)
    assert kleis_keys(reg) == ["gpt-5.3-codex-spark", "gpt-5.5", "gpt-5.6-luna"]
    assert len(reg["openai"]["models"]) == 8


def test_nothing_configured():
    reg = build_registry(catalogue(), [], BASE)
    assert reg["kleis"] == {"id": "kleis", "name": "Kleis", "env": ["KLEIS_API_KEY"], "models": {}}


def test_provider_and_model_scopes():
    cat = catalogue()
    scopes = Scopes(providers=frozenset({"codex", "copilot"}), models=("openai/gpt-5.6-luna", "gpt-5-mini"))
    reg = build_registry(cat, routes(*ALL), BASE, scopes)
    assert set(kleis_keys(reg)) == {"github-copilot/gpt-5-mini", "gpt-5.6-luna"}
    for pid in ("openai", "anthropic", "github-copilot"):
        assert reg[pid] == catalogue()[pid]


def test_provider_scope_keeps_upstream_order():
    reg = build_registry(catalogue(), routes(*ALL), BASE, Scopes(providers=frozenset({"codex"})))
    assert kleis_keys(reg) == ["gpt-5.3-codex-spark", "gpt-5.5", "gpt-5.6-luna"]


@pytest.mark.parametrize("providers", [None, frozenset(), frozenset({"codex", "claude"})])
def test_account_provider_scopes(providers):
    scopes = Scopes(providers=providers, account_providers=frozenset({"claude"}))
    reg = build_registry(catalogue(), routes(*ALL), BASE, scopes)
    assert kleis_keys(reg) == ["anthropic/claude-sonnet-4"]


def test_account_scopes_without_accounts_allow_nothing():
    reg = build_registry(catalogue(), routes(*ALL), BASE, Scopes(account_providers=frozenset()))
    assert kleis_keys(reg) == []


def test_empty_scopes_are_unrestricted():
    full = build_registry(catalogue(), routes(*ALL), BASE)
    assert build_registry(catalogue(), routes(*ALL), BASE, Scopes(frozenset(), (), None)) == full


def test_bad_models_are_dropped():
    cat = catalogue()
    cat["anthropic"]["models"]["broken"] = {"id": "broken", "name": "Broken"}  # no limit
    cat["anthropic"]["models"]["odd"] = "not a model"

    def bad_hook(options, model_id, m):
        if model_id == "claude-sonnet-4":
            return {**m, "limit": {"context": "200k", "output": 1}}
        return m

    claude = Route.from_module("claude", SimpleNamespace(**{**vars(CLAUDE), "catalogue_model": bad_hook}), {})
    reg = build_registry(cat, [claude], BASE)
    assert kleis_keys(reg) == []


def test_route_from_module():
    route = Route.from_module("copilot", COPILOT, {"x": 1})
    assert route.model_key_prefix == "github-copilot/"
    assert route.primary_npm == "@ai-sdk/openai-compatible"  # first ROUTES value, not first NPM key
    assert list(route.npm) == ["chat_completions", "responses"]
    assert route.options == {"x": 1}
    assert route.catalogue_model is copilot_npm
    bare = Route.from_module("c2", SimpleNamespace(**{**vars(CLAUDE), "PREFIXES": ("anthropic",)}), {})
    assert bare.prefixes == ("anthropic/",)
    assert bare.catalogue_model is None
    assert Route.from_module("codex", CODEX, {}).model_key_prefix == ""


# ── Validation ───────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    "m, ok",
    [
        (model("a"), True),
        ({"id": "a", "name": "A", "limit": {"context": 0, "output": 1.5}}, True),
        ({"name": "A", "limit": {"context": 1, "output": 1}}, False),
        ({"id": 1, "name": "A", "limit": {"context": 1, "output": 1}}, False),
        ({"id": "a", "limit": {"context": 1, "output": 1}}, False),
        ({"id": "a", "name": "A"}, False),
        ({"id": "a", "name": "A", "limit": {"context": 1}}, False),
        ({"id": "a", "name": "A", "limit": {"context": True, "output": 1}}, False),
        ({"id": "a", "name": "A", "limit": {"context": "1", "output": 1}}, False),
        ({"id": "a", "name": "A", "limit": {"context": float("nan"), "output": 1}}, False),
        ({"id": "a", "name": "A", "limit": {"context": -1, "output": 1}}, False),
        ({"id": "a", "name": "A", "limit": [1, 2]}, False),
        ("a", False),
        (None, False),
    ],
)
def test_valid_model(m, ok):
    assert valid_model(m) is ok


def test_clean_catalogue_drops_and_logs_once(caplog):
    raw = catalogue()
    raw["anthropic"]["models"]["broken"] = {"id": "broken", "name": "Broken", "limit": {"context": 1}}
    raw["anthropic"]["models"]["flag"] = {"id": "flag", "name": "F", "limit": {"context": 1, "output": False}}
    raw["junk"] = ["not", "a", "provider"]
    raw["nomodels"] = {"id": "nomodels", "name": "No models"}
    raw["mismatch"] = {"id": "other", "models": {}}
    before = copy.deepcopy(raw)
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        clean = clean_catalogue(raw, LOG)
    assert raw == before
    assert list(clean) == ["openai", "anthropic", "github-copilot"]
    assert list(clean["anthropic"]["models"]) == ["claude-sonnet-4"]
    assert clean["openai"] is raw["openai"]  # untouched providers are not copied
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 5
    assert sum("anthropic/'broken'" in m for m in messages) == 1
    assert sum("anthropic/'flag'" in m for m in messages) == 1
    assert all(len(m) < 200 for m in messages)
    assert clean_catalogue([], LOG) == {}


# ── The real bundled snapshot ────────────────────────────────────────────────


def load_snapshot():
    return json.loads(discovery.SNAPSHOT_PATH.read_text(encoding="utf-8"))


def test_bundled_snapshot_is_clean_and_small():
    snap = load_snapshot()
    assert list(snap) == ["openai", "anthropic", "github-copilot"]
    assert clean_catalogue(snap, LOG) == snap
    assert "\n " not in discovery.SNAPSHOT_PATH.read_text(encoding="utf-8")  # compact


def test_registry_from_snapshot_is_valid_and_fast():
    snap = load_snapshot()
    reg = build_registry(snap, routes(*ALL), "http://127.0.0.1:8787")
    assert reg.keys() == {"openai", "anthropic", "github-copilot", "kleis"}
    for pid, provider in reg.items():
        assert provider["id"] == pid
        for m in provider["models"].values():
            assert valid_model(m), (pid, m.get("id"))
    kleis = reg["kleis"]["models"]
    counts = {
        "codex": sum(not k.startswith(("anthropic/", "github-copilot/")) for k in kleis),
        "claude": sum(k.startswith("anthropic/") for k in kleis),
        "copilot": sum(k.startswith("github-copilot/") for k in kleis),
    }
    assert counts == {
        "codex": 7,
        "claude": len(snap["anthropic"]["models"]),
        "copilot": len(snap["github-copilot"]["models"]),
    }
    assert all(m["provider"]["api"].startswith("http://127.0.0.1:8787/") for m in kleis.values())
    json.dumps(reg, allow_nan=False)
    rs = routes(*ALL)
    start = time.perf_counter()
    for _ in range(20):
        build_registry(snap, rs, BASE, Scopes(models=("gpt-5.5", "claude-opus-5")))
    assert (time.perf_counter() - start) / 20 < 0.05


# ── Scope rules ──────────────────────────────────────────────────────────────

CODEX_PREFIXES = ("openai/", "codex/")


@pytest.mark.parametrize(
    "model, expected",
    [
        ("openai/gpt-5", ["openai/gpt-5", "gpt-5", "codex/gpt-5"]),
        ("codex/gpt-5", ["codex/gpt-5", "gpt-5", "openai/gpt-5"]),
        ("gpt-5", ["gpt-5", "openai/gpt-5", "codex/gpt-5"]),
        ("  gpt-5 ", ["gpt-5", "openai/gpt-5", "codex/gpt-5"]),
        ("anthropic/claude", []),
        ("openai/org/model", ["openai/org/model", "org/model", "codex/org/model"]),
        ("openai/", ["openai/", "openai/openai/", "codex/openai/"]),
        ("OpenAI/gpt-5", []),
        ("", []),
    ],
)
def test_scope_candidates(model, expected):
    assert scope_candidates(model, CODEX_PREFIXES) == expected


def test_strip_prefix_and_model_allowed():
    assert strip_prefix("openai/gpt-5", CODEX_PREFIXES) == "gpt-5"
    assert strip_prefix("codex/gpt-5", CODEX_PREFIXES) == "gpt-5"
    assert strip_prefix("gpt-5", CODEX_PREFIXES) == "gpt-5"
    assert strip_prefix("anthropic/claude", CODEX_PREFIXES) == "anthropic/claude"
    assert strip_prefix("openai/", CODEX_PREFIXES) == "openai/"
    assert model_allowed("anthropic/claude", CODEX_PREFIXES, None)
    assert model_allowed("anything", CODEX_PREFIXES, ())
    assert model_allowed("gpt-5", CODEX_PREFIXES, ("codex/gpt-5",))
    assert model_allowed("openai/gpt-5", CODEX_PREFIXES, frozenset({"gpt-5"}))
    assert not model_allowed("gpt-5-mini", CODEX_PREFIXES, ("gpt-5",))
    assert not model_allowed("anthropic/gpt-5", CODEX_PREFIXES, ("gpt-5", "anthropic/gpt-5"))


# ── Model lists ──────────────────────────────────────────────────────────────


def test_openai_model_list():
    rs = routes(*ALL)
    reg = build_registry(catalogue(), rs, BASE)
    assert openai_model_list(reg, rs[2]) == {
        "object": "list",
        "data": [
            {"id": "gpt-5", "object": "model", "created": 0, "owned_by": "kleis"},
            {"id": "gpt-5-mini", "object": "model", "created": 0, "owned_by": "kleis"},
        ],
    }
    assert [m["id"] for m in openai_model_list(reg, rs[0])["data"]] == [
        "gpt-5.3-codex-spark",
        "gpt-5.5",
        "gpt-5.6-luna",
    ]


def test_anthropic_model_list():
    rs = routes(*ALL)
    cat = catalogue()
    cat["anthropic"]["models"]["claude-haiku-4-5"] = model("claude-haiku-4-5", "Claude Haiku 4.5")
    reg = build_registry(cat, rs, BASE)
    assert anthropic_model_list(reg, rs[1]) == {
        "data": [
            {
                "type": "model",
                "id": "claude-sonnet-4",
                "display_name": "Claude Sonnet 4",
                "created_at": "2025-05-22T00:00:00Z",
            },
            {
                "type": "model",
                "id": "claude-haiku-4-5",
                "display_name": "Claude Haiku 4.5",
                "created_at": "1970-01-01T00:00:00Z",
            },
        ],
        "has_more": False,
        "first_id": "claude-sonnet-4",
        "last_id": "claude-haiku-4-5",
    }
    empty = build_registry(cat, rs, BASE, Scopes(providers=frozenset({"codex"})))
    assert anthropic_model_list(empty, rs[1]) == {
        "data": [],
        "has_more": False,
        "first_id": None,
        "last_id": None,
    }


# ── Catalogue against a fake catalogue server ────────────────────────────────


class FakeCatalogue:
    """Serves GET /api.json: a catalogue, a 500, or garbage; counts requests."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.body = {"openai": catalogue()["openai"], "kleis-test": {"id": "kleis-test", "models": {}}}
        self.hits = 0
        self.accept: list[str | None] = []
        self.gate: asyncio.Event | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        self.accept.append(request.headers.get("Accept"))
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "500":
            return web.Response(status=500, text="upstream broke")
        if self.mode == "garbage":
            return web.Response(text="{not json", content_type="application/json")
        if self.mode == "list":
            return web.json_response([1, 2, 3])
        return web.json_response(self.body)


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def upstream():
    fake = FakeCatalogue()
    app = web.Application()
    app.router.add_get("/api.json", fake.handle)
    async with TestServer(app, host="127.0.0.1", port=0) as server:
        fake.url = str(server.make_url("/api.json"))
        yield fake
        if fake.gate is not None:
            fake.gate.set()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def snapshot(tmp_path):
    path = tmp_path / "snapshot.json"
    path.write_text(json.dumps({"anthropic": catalogue()["anthropic"]}))
    return path


def make(snapshot, tmp_path, url, hours=6.0, now=None):
    return Catalogue(snapshot, tmp_path / "cache" / "models-cache.json", url, hours, LOG, now=now or Clock())


async def test_fresh_start_uses_snapshot(snapshot, tmp_path):
    cat = make(snapshot, tmp_path, "http://127.0.0.1:9/api.json")
    assert cat.origin == "snapshot"
    assert cat.current() == {"anthropic": catalogue()["anthropic"]}
    assert cat.due()


async def test_fetch_swaps_in_and_writes_cache(snapshot, tmp_path, upstream, http):
    clock = Clock()
    cat = make(snapshot, tmp_path, upstream.url, hours=6, now=clock)
    assert await cat.fetch(http) is True
    assert cat.current() == upstream.body
    assert cat.origin == "fetched"
    assert upstream.accept == ["application/json"]
    cache = tmp_path / "cache" / "models-cache.json"
    assert json.loads(cache.read_text()) == upstream.body
    assert [p.name for p in cache.parent.iterdir()] == ["models-cache.json"]  # no temp file left
    assert not cat.due()
    assert await cat.fetch(http) is False  # not due: no request
    assert upstream.hits == 1
    clock.t += 6 * 3600
    assert cat.due()


@pytest.mark.parametrize("mode", ["500", "garbage", "list"])
async def test_failing_fetch_keeps_previous_data(snapshot, tmp_path, upstream, http, caplog, mode):
    clock = Clock()
    cat = make(snapshot, tmp_path, upstream.url, now=clock)
    assert await cat.fetch(http)
    good = cat.current()
    upstream.mode = mode
    clock.t += 6 * 3600
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert await cat.fetch(http) is False
    assert cat.current() is good
    assert not cat.due()  # a failed attempt also waits refresh_hours
    fetch_lines = [r for r in caplog.records if "fetch from" in r.getMessage()]
    assert len(fetch_lines) == 1 and fetch_lines[0].exc_info is None
    assert json.loads((tmp_path / "cache" / "models-cache.json").read_text()) == upstream.body


async def test_connection_refused_keeps_snapshot(snapshot, tmp_path, http, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cat = make(snapshot, tmp_path, f"http://127.0.0.1:{port}/api.json")
    before = cat.current()
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert await cat.fetch(http, force=True) is False
    assert cat.current() is before
    assert cat.origin == "snapshot"
    assert len(caplog.records) == 1 and caplog.records[0].exc_info is None
    assert not (tmp_path / "cache" / "models-cache.json").exists()


async def test_timeout_keeps_data(snapshot, tmp_path, upstream, http, caplog):
    upstream.gate = asyncio.Event()
    cat = make(snapshot, tmp_path, upstream.url)
    cat.timeout = 0.2
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        assert await cat.fetch(http) is False
    assert cat.origin == "snapshot"
    assert "timed out" in caplog.records[-1].getMessage()


async def test_restart_reads_cache(snapshot, tmp_path, upstream, http):
    first = Catalogue(snapshot, tmp_path / "models-cache.json", upstream.url, 6, LOG)
    assert await first.fetch(http)
    again = Catalogue(snapshot, tmp_path / "models-cache.json", upstream.url, 6, LOG)
    assert again.origin == "cache"
    assert again.current() == upstream.body
    assert not again.due()  # the cache file's age counts


async def test_invalid_cache_falls_back_to_snapshot(snapshot, tmp_path, caplog):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models-cache.json").write_text("{broken")
    with caplog.at_level(logging.WARNING, logger=LOG.name):
        cat = make(snapshot, tmp_path, "")
    assert cat.origin == "snapshot"
    assert len(caplog.records) == 1


async def test_single_flight(snapshot, tmp_path, upstream, http):
    upstream.gate = asyncio.Event()
    cat = make(snapshot, tmp_path, upstream.url)
    first = asyncio.create_task(cat.fetch(http))
    second = asyncio.create_task(cat.fetch(http, force=True))
    for _ in range(200):
        if upstream.hits:
            break
        await asyncio.sleep(0.01)
    upstream.gate.set()
    assert await asyncio.gather(first, second) == [True, True]
    assert upstream.hits == 1


async def test_refresh_hours_zero_never_due_but_force_fetches(snapshot, tmp_path, upstream, http):
    clock = Clock()
    cat = make(snapshot, tmp_path, upstream.url, hours=0, now=clock)
    assert not cat.due()
    clock.t += 10**9
    assert not cat.due()
    assert await cat.fetch(http) is False
    assert upstream.hits == 0
    assert await cat.fetch(http, force=True) is True
    assert await cat.fetch(http, force=True) is False  # forced fetches: at most one a minute
    clock.t += 61
    assert await cat.fetch(http, force=True) is True
    assert upstream.hits == 2
    offline = make(snapshot, tmp_path, "", hours=6)
    assert not offline.due()
    assert await offline.fetch(http, force=True) is False


async def test_run_fetches_when_due_and_stops(snapshot, tmp_path, upstream, http):
    cat = make(snapshot, tmp_path, upstream.url, now=Clock())
    stop = asyncio.Event()
    task = asyncio.create_task(cat.run(http, stop))
    for _ in range(200):
        if cat.origin == "fetched":
            break
        await asyncio.sleep(0.01)
    assert cat.origin == "fetched"
    stop.set()
    await asyncio.wait_for(task, 2)
    assert upstream.hits == 1

    never = make(snapshot, tmp_path, upstream.url, hours=0)
    stop = asyncio.Event()
    task = asyncio.create_task(never.run(http, stop))
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(task, 2)
    assert upstream.hits == 1
