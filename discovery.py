"""Model discovery: the models.dev-format registry Kleis serves at `/api.json` (SPEC S9).

This module is pure and separately tested. `kleis.py` owns the HTTP routes; it hands this
module plain data (the upstream catalogue, one `Route` per configured provider, the key's
`Scopes`) and serves what comes back, so the registry rules are tested without a server.

What it holds, top to bottom:

- model-scope rules (`scope_candidates`, `strip_prefix`, `model_allowed`), also used by the
  proxy path, so they are small and allocation-light;
- validation of catalogue models (`valid_model`, `clean_catalogue`): one model without `id`,
  `name` or numeric `limit.context` / `limit.output` breaks every provider in OpenCode;
- `build_registry`: the upstream providers unchanged plus the `kleis` provider;
- the OpenAI and Anthropic `GET /v1/models` lists built from that registry;
- `Catalogue`: the upstream catalogue in memory, from the on-disk cache or the bundled
  snapshot, refreshed in the background from `[models] source_url`.

Decisions worth knowing:

- A `kleis` model's key is `MODEL_KEY_PREFIX + id` (`gpt-5.5`, `anthropic/claude-opus-4-7`,
  `github-copilot/gpt-5-mini`), but its `id` stays the upstream id. OpenCode sends the `id`, so
  requests arrive unprefixed and the SDKs' id-based feature checks (`gpt-5*` reasoning in
  `@ai-sdk/openai`, Claude capabilities in `@ai-sdk/anthropic`) keep working. The model lists
  use the same unprefixed ids; the proxy strips prefixes anyway.
- The registry shares nested values (limits, costs, …) with the catalogue it was built from.
  Nothing here mutates either; callers must treat both as read-only.
- Scope sets: `None` or empty `providers` / `models` means unrestricted (how a key with no
  scopes stores them); `account_providers` is `None` when the key has no account scopes, and
  a set, even an empty one, restricts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp

from providers import ModelInfo

KLEIS_ID = "kleis"
KLEIS_ENV = "KLEIS_API_KEY"
SNAPSHOT_PATH = Path(__file__).resolve().parent / "providers" / "models-snapshot.json"


# ── Model scopes ─────────────────────────────────────────────────────────────


def _upstream_id(model: str, prefixes: tuple[str, ...]) -> str | None:
    """The model without a route prefix; None when it carries another route's prefix."""
    slash = model.find("/")
    if slash < 0:
        return model
    if model[: slash + 1] in prefixes:
        return model[slash + 1 :] or model
    return None


def strip_prefix(model: str, prefixes: tuple[str, ...]) -> str:
    """`openai/gpt-5` → `gpt-5` when `openai/` is one of the route's prefixes; else unchanged."""
    return _upstream_id(model, prefixes) or model


def scope_candidates(model: str, prefixes: tuple[str, ...]) -> list[str]:
    """The strings a model scope may match: raw, upstream id, then each prefix + upstream id.

    A model carrying a prefix that is not this route's has no candidates (always forbidden
    when the key has model scopes). Example on codex, `openai/gpt-5` →
    `["openai/gpt-5", "gpt-5", "codex/gpt-5"]`.
    """
    raw = model.strip()
    upstream = _upstream_id(raw, prefixes) if raw else None
    if upstream is None:
        return []
    out = [raw] if upstream == raw else [raw, upstream]
    for prefix in prefixes:
        candidate = prefix + upstream
        if candidate not in out:
            out.append(candidate)
    return out


def model_allowed(model: str, prefixes: tuple[str, ...], model_scopes: Collection[str] | None) -> bool:
    """Whether a key with these model scopes may use `model` on a route with these prefixes."""
    if not model_scopes:
        return True
    return any(c in model_scopes for c in scope_candidates(model, prefixes))


# ── Validation ───────────────────────────────────────────────────────────────


def _is_limit(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _model_problem(model: Any) -> str | None:
    """Why OpenCode would reject this model, or None when it is fine."""
    if not isinstance(model, dict):
        return "not an object"
    if not isinstance(model.get("id"), str):
        return "no string id"
    if not isinstance(model.get("name"), str):
        return "no string name"
    limit = model.get("limit")
    if not isinstance(limit, dict):
        return "no limit object"
    for key in ("context", "output"):
        if not _is_limit(limit.get(key)):
            return f"limit.{key} is not a non-negative number"
    return None


def valid_model(model: Any) -> bool:
    """True when the model has a str `id` and `name` and numeric `limit.context`/`limit.output`."""
    return _model_problem(model) is None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def clean_catalogue(raw: Any, log: logging.Logger) -> dict:
    """A fetched catalogue without the providers and models OpenCode would choke on.

    Drops providers that are not objects with an `id` equal to their key and a `models`
    object, and models failing `valid_model`, with one warning line per dropped entry. The
    input is never mutated; untouched providers are returned as the same objects.
    """
    if not isinstance(raw, dict):
        log.warning("models catalogue: not a JSON object; ignored")
        return {}
    out: dict[str, Any] = {}
    for pid, provider in raw.items():
        if not (
            isinstance(provider, dict)
            and provider.get("id") == pid
            and isinstance(provider.get("models"), dict)
        ):
            log.warning(
                "models catalogue: dropped provider %s (needs id equal to its key and models)", _short(pid)
            )
            continue
        models = provider["models"]
        kept = {}
        for mid, model in models.items():
            problem = _model_problem(model)
            if problem is None:
                kept[mid] = model
            else:
                log.warning("models catalogue: dropped %s/%s (%s)", pid, _short(mid), problem)
        out[pid] = provider if len(kept) == len(models) else {**provider, "models": kept}
    return out


# ── Registry ─────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Scopes:
    """What a discovery token's key may see of the `kleis` provider (see module docstring)."""

    providers: frozenset[str] | None = None  # provider (config entry) names
    models: tuple[str, ...] | None = None  # model scopes, matched with scope_candidates
    account_providers: frozenset[str] | None = None  # providers of the key's scoped accounts
    accounts: frozenset[str] | None = None  # the key's account scopes (ids), None = any account

    def allows_provider(self, name: str) -> bool:
        if self.providers and name not in self.providers:
            return False
        return self.account_providers is None or name in self.account_providers


@dataclass(frozen=True)
class Route:
    """One configured provider as discovery sees it.

    `npm` maps endpoint id → AI SDK package in the order of the adapter's ROUTES, so its first
    value is the primary endpoint's package (what every model of this route gets unless the
    adapter's `catalogue_model` picks another).
    """

    name: str  # config entry name: codex / claude / copilot
    catalogue: str  # models.dev provider id whose models it serves
    prefixes: tuple[str, ...]  # each ends in "/"
    base_path: str  # e.g. /openai/v1
    npm: Mapping[str, str]
    model_key_prefix: str
    options: Mapping[str, Any] = field(default_factory=dict)
    catalogue_model: Callable[[Mapping[str, Any], str, dict], dict | None] | None = None

    @property
    def primary_npm(self) -> str | None:
        return next(iter(self.npm.values()), None)

    @classmethod
    def from_module(cls, name: str, module: Any, options: Mapping[str, Any]) -> Route:
        """The Route of a loaded adapter module (see providers/__init__.py)."""
        endpoints = list(dict.fromkeys(module.ROUTES.values()))
        endpoints += [e for e in module.NPM if e not in endpoints]
        return cls(
            name=name,
            catalogue=module.CATALOGUE,
            prefixes=tuple(p if p.endswith("/") else p + "/" for p in module.PREFIXES),
            base_path=module.BASE_PATH.rstrip("/"),
            npm=MappingProxyType({e: module.NPM[e] for e in endpoints if e in module.NPM}),
            model_key_prefix=getattr(module, "MODEL_KEY_PREFIX", f"{module.CATALOGUE}/"),
            options=options,
            catalogue_model=getattr(module, "catalogue_model", None),
        )


DEFAULT_LIMIT = {"context": 128_000, "output": 16_384}  # for a live model the catalogue does not know


def live_entry(info: ModelInfo, known: Any) -> dict:
    """The models.dev entry of a model a provider lists: the catalogue's entry when it knows
    the id (costs, dates, modalities), with the provider's own numbers winning where it gives
    them (they are what the account can use, e.g. the ChatGPT backend's smaller window);
    otherwise a conservative entry built from what the provider said."""
    if isinstance(known, dict):
        entry = dict(known)
        limit = dict(known.get("limit") or {})
    else:
        modalities = list(info.input_modalities or ("text",))
        entry = {
            "id": info.id,
            "name": info.name or info.id,
            "attachment": "image" in modalities or "pdf" in modalities,
            "reasoning": bool(info.reasoning),
            "tool_call": info.tool_call is not False,
            "temperature": True,
            "release_date": info.release_date or "",
            "modalities": {"input": modalities, "output": ["text"]},
            "options": {},
        }
        limit = dict(DEFAULT_LIMIT)
    entry["id"] = info.id
    if info.context:
        limit["context"] = info.context
        if isinstance(limit.get("input"), (int, float)) and limit["input"] > info.context:
            limit["input"] = info.context
    if info.input:
        limit["input"] = min(info.input, limit.get("context") or info.input)
    if info.output:
        limit["output"] = info.output
    if isinstance(limit.get("output"), (int, float)) and isinstance(limit.get("context"), (int, float)):
        limit["output"] = min(limit["output"], limit["context"])
    entry["limit"] = limit
    if info.input_modalities and isinstance(entry.get("modalities"), dict):
        entry["modalities"] = {**entry["modalities"], "input": list(info.input_modalities)}
        entry["attachment"] = any(m in info.input_modalities for m in ("image", "pdf"))
    return entry


def _route_models(
    route: Route,
    upstream: Any,
    api: str,
    scopes: Scopes | None,
    out: dict,
    live: Collection[ModelInfo] | None = None,
) -> None:
    """Add the kleis models of one route to `out` (first key wins): the models its accounts
    list (`live`) when any account's list is known, else the catalogue's through the adapter's
    `catalogue_model` rule (offline, or a provider without a model list)."""
    models = upstream.get("models") if isinstance(upstream, dict) else None
    if not isinstance(models, dict):
        models = {}
    model_scopes = scopes.models if scopes else None
    hook = route.catalogue_model
    suffix = f" ({route.name})"
    if live is not None:
        hook = None  # the provider's own list is the truth; the offline rule is not applied
        models = {info.id: live_entry(info, models.get(info.id)) for info in live}
    for key, model in models.items():
        if not isinstance(model, dict):
            continue
        mid = model.get("id")
        if not isinstance(mid, str):
            mid = key
        if model_scopes and not model_allowed(mid, route.prefixes, model_scopes):
            continue
        out_key = route.model_key_prefix + mid
        if out_key in out:
            continue
        # The upstream model's own npm/api point at the vendor; the adapter sees the model
        # without them, so any npm it sets is its own choice.
        provider = model.get("provider")
        provider = (
            {k: v for k, v in provider.items() if k not in ("npm", "api")}
            if isinstance(provider, dict)
            else {}
        )
        entry: Any = {**model, "provider": provider}
        if hook is not None:
            entry = hook(route.options, mid, entry)
            if not isinstance(entry, dict):
                continue
        provider = entry.get("provider")
        provider = dict(provider) if isinstance(provider, dict) else {}
        provider["api"] = api
        npm = provider.get("npm") or route.primary_npm
        if npm:
            provider["npm"] = npm
        name = entry.get("name")
        entry = {**entry, "name": (name if isinstance(name, str) else mid) + suffix, "provider": provider}
        if valid_model(entry):
            out[out_key] = entry


def build_registry(
    catalogue: dict,
    routes: list[Route],
    base_url: str,
    scopes: Scopes | None = None,
    live: Mapping[str, Collection[ModelInfo]] | None = None,
) -> dict:
    """The api.json document: every upstream provider unchanged plus the `kleis` provider.

    `routes` are the providers with an enabled account; `base_url` is the external origin
    (plus any path prefix) that the generated `provider.api` URLs start with; `live` maps a
    route name to the models its (key-visible) accounts list, for routes where one is known.
    """
    base = base_url.rstrip("/")
    generated: dict[str, Any] = {}
    live = live or {}
    for route in routes:
        if scopes is not None and not scopes.allows_provider(route.name):
            continue
        _route_models(
            route,
            catalogue.get(route.catalogue),
            base + route.base_path,
            scopes,
            generated,
            live.get(route.name),
        )
    kleis: dict[str, Any] = {"id": KLEIS_ID, "name": "Kleis", "env": [KLEIS_ENV], "models": generated}
    existing = catalogue.get(KLEIS_ID)
    if isinstance(existing, dict):
        # Upstream already knows a `kleis` provider: its fields and models win, ours fill in.
        env = existing.get("env")
        env = [e for e in env if isinstance(e, str)] if isinstance(env, list) else []
        if KLEIS_ENV not in env:
            env.append(KLEIS_ENV)
        theirs = existing.get("models")
        theirs = {k: m for k, m in theirs.items() if valid_model(m)} if isinstance(theirs, dict) else {}
        kleis = {**kleis, **existing, "id": KLEIS_ID, "env": env, "models": {**generated, **theirs}}
    registry = dict(catalogue)
    registry[KLEIS_ID] = kleis
    return registry


# ── Model lists (GET /<route>/v1/models) ─────────────────────────────────────


def _listed(registry: dict, route: Route) -> list[tuple[str, dict]]:
    """(id, model) of the kleis models served by `route`, in registry order."""
    models = registry.get(KLEIS_ID, {}).get("models", {})
    out = []
    for key, model in models.items():
        if not isinstance(model, dict):
            continue
        mid = model.get("id")
        provider = model.get("provider")
        api = provider.get("api") if isinstance(provider, dict) else None
        if (
            key == route.model_key_prefix + str(mid)
            and isinstance(api, str)
            and api.endswith(route.base_path)
        ):
            out.append((mid, model))
    return out


def openai_model_list(registry: dict, route: Route) -> dict:
    """`GET /v1/models` in the OpenAI shape; ids are unprefixed upstream ids."""
    data = [
        {"id": mid, "object": "model", "created": 0, "owned_by": "kleis"}
        for mid, _ in _listed(registry, route)
    ]
    return {"object": "list", "data": data}


def _created_at(model: dict) -> str:
    date = model.get("release_date")
    if isinstance(date, str) and len(date) == 10 and date[4] == "-" and date[7] == "-":
        return f"{date}T00:00:00Z"
    return "1970-01-01T00:00:00Z"


def openai_model(registry: dict, route: Route, model_id: str) -> dict | None:
    """`GET /v1/models/{id}` in the OpenAI shape, or None when the route does not list it."""
    return next((m for m in openai_model_list(registry, route)["data"] if m["id"] == model_id), None)


def _anthropic_entries(registry: dict, route: Route) -> list[dict]:
    suffix = f" ({route.name})"
    return [
        {
            "type": "model",
            "id": mid,
            "display_name": model["name"].removesuffix(suffix),
            "created_at": _created_at(model),
        }
        for mid, model in _listed(registry, route)
    ]


ANTHROPIC_PAGE_DEFAULT, ANTHROPIC_PAGE_MAX = 20, 1000  # the Models API's `limit` default and range


class PageError(ValueError):
    """A paging parameter the Anthropic Models API would refuse (message names it)."""


def anthropic_model_list(
    registry: dict,
    route: Route,
    limit: int = ANTHROPIC_PAGE_DEFAULT,
    after_id: str | None = None,
    before_id: str | None = None,
) -> dict:
    """`GET /v1/models` in the Anthropic shape: one page of `limit` models (1 to 1000, default
    20) after `after_id` or before `before_id`, with `has_more`, `first_id`, `last_id` as the
    Models API pages (docs.anthropic.com, "List Models"). Ids are unprefixed upstream ids.
    Raises PageError for a limit out of range, both cursors, or a cursor that is not listed."""
    if not 1 <= limit <= ANTHROPIC_PAGE_MAX:
        raise PageError(f"limit: must be between 1 and {ANTHROPIC_PAGE_MAX}")
    if after_id is not None and before_id is not None:
        raise PageError("send either after_id or before_id, not both")
    entries = _anthropic_entries(registry, route)
    ids = [e["id"] for e in entries]
    if after_id is not None:
        if after_id not in ids:
            raise PageError(f"after_id: no model {after_id[:80]!r} in this list")
        start = ids.index(after_id) + 1
        data, has_more = entries[start : start + limit], start + limit < len(entries)
    elif before_id is not None:
        if before_id not in ids:
            raise PageError(f"before_id: no model {before_id[:80]!r} in this list")
        end = ids.index(before_id)
        data, has_more = entries[max(end - limit, 0) : end], end - limit > 0
    else:
        data, has_more = entries[:limit], limit < len(entries)
    return {
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def anthropic_model(registry: dict, route: Route, model_id: str) -> dict | None:
    """`GET /v1/models/{id}` in the Anthropic shape, or None when the route does not list it."""
    return next((m for m in _anthropic_entries(registry, route) if m["id"] == model_id), None)


# ── Catalogue source ─────────────────────────────────────────────────────────


class Catalogue:
    """The upstream catalogue: in memory, from the cache file or the bundled snapshot, and
    refreshed from `source_url` by `run()` (or `fetch(force=True)` for `?refresh=1`).

    `refresh_hours = 0` turns the background refresh off; a forced fetch still happens unless
    `source_url` is "". Forced fetches come from a public URL, so they are limited to one per
    `force_interval` seconds. A failed fetch counts as an attempt for `due()`: an offline
    install tries once per `refresh_hours`, not in a loop.
    """

    timeout = 10.0  # seconds for the whole fetch
    max_bytes = 64 * 1024 * 1024

    def __init__(
        self,
        snapshot_path: str | os.PathLike,
        cache_path: str | os.PathLike | None,
        source_url: str,
        refresh_hours: float,
        log: logging.Logger,
        now: Callable[[], float] = time.time,
        force_interval: float = 60.0,
    ):
        self.snapshot_path = Path(snapshot_path)
        self.cache_path = Path(cache_path) if cache_path else None
        self.source_url = source_url
        self.refresh_hours = refresh_hours
        self.log = log
        self.now = now
        self.force_interval = force_interval
        self.last_attempt: float | None = None  # epoch s of the last fetch (or the cache file's mtime)
        self.fetched_at: float | None = None  # epoch s of the last successful fetch in this process
        self._inflight: asyncio.Task | None = None
        self._data: dict = {}
        self._registries: dict[tuple, list] = {}  # see _registry_entry
        self._registry_of: dict | None = None
        self.origin = "none"  # where current() came from: cache / snapshot / fetched / none
        if self.cache_path is not None and self.cache_path.exists():
            data = self._load(self.cache_path, "cache")
            if data:
                self._data, self.origin = data, "cache"
                self.last_attempt = self.cache_path.stat().st_mtime
        if not self._data:
            data = self._load(self.snapshot_path, "snapshot")
            if data:
                self._data, self.origin = data, "snapshot"
            else:
                log.error("models catalogue: no usable cache or snapshot; serving only the kleis provider")

    def _load(self, path: Path, what: str) -> dict | None:
        try:
            data = clean_catalogue(json.loads(path.read_bytes()), self.log)
        except (OSError, ValueError) as e:
            self.log.warning("models catalogue: cannot read %s %s (%s)", what, path, e)
            return None
        return data or None

    def current(self) -> dict:
        """The catalogue to build registries from; never blocks. Read-only."""
        return self._data

    registry_cache_size = 16  # built registries kept (~0.2 MB each with the snapshot)

    def registry(self, routes: list[Route], base_url: str, scopes: Scopes | None = None, live=None) -> dict:
        """`build_registry` on `current()`, memoised; the result is shared and read-only.
        `live` is a `LiveView` (the account model lists as this key sees them) or None."""
        return self._registry_entry(routes, base_url, scopes, live)[0]

    def registry_json(
        self, routes: list[Route], base_url: str, scopes: Scopes | None = None, live=None
    ) -> bytes:
        """The same registry serialised as UTF-8 JSON, memoised with it."""
        entry = self._registry_entry(routes, base_url, scopes, live)
        if entry[1] is None:
            entry[1] = json.dumps(entry[0], separators=(",", ":"), ensure_ascii=False).encode()
        return entry[1]

    def _registry_entry(self, routes: list[Route], base_url: str, scopes: Scopes | None, live) -> list:
        # The key holds everything build_registry reads except the catalogue, which is never
        # mutated but replaced on fetch (so identity says "same data"), and each route's
        # contents, fixed per name for the life of a process (adapters load once at start-up).
        # Live lists are named by their version: any change to any list makes a new key.
        data = self._data
        if self._registry_of is not data:
            self._registries, self._registry_of = {}, data
        key = (tuple(r.name for r in routes), base_url, scopes, live.key if live else None)
        entry = self._registries.get(key)
        if entry is None:
            lists = live.lists if live else None
            entry = [build_registry(data, routes, base_url, scopes, lists), None]
            if len(self._registries) >= self.registry_cache_size:  # Host and scopes vary: bounded
                del self._registries[next(iter(self._registries))]
            self._registries[key] = entry
        return entry

    def due(self) -> bool:
        """Whether the background refresh should fetch now."""
        wait = self._seconds_until_due()
        return wait is not None and wait <= 0

    def _seconds_until_due(self) -> float | None:
        if not self.source_url or self.refresh_hours <= 0:
            return None
        if self.last_attempt is None:
            return 0.0
        return self.last_attempt + self.refresh_hours * 3600 - self.now()

    async def fetch(self, http: aiohttp.ClientSession, *, force: bool = False) -> bool:
        """Fetch `source_url` if due (or forced); True when new data was swapped in.

        Concurrent callers share one request. Errors are logged in one line and the previous
        data keeps being served.
        """
        if self._inflight is None:
            if not self.source_url:
                return False
            if force:
                if self.last_attempt is not None and self.now() - self.last_attempt < self.force_interval:
                    return False
            elif not self.due():
                return False
            self._inflight = asyncio.create_task(self._fetch(http), name="kleis-models-fetch")
            self._inflight.add_done_callback(self._fetched)
        # shield: a caller that goes away (client disconnect) must not cancel the shared fetch
        return await asyncio.shield(self._inflight)

    def _fetched(self, task: asyncio.Task) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self, http: aiohttp.ClientSession) -> bool:
        self.last_attempt = self.now()
        try:
            async with http.get(
                self.source_url,
                headers={"Accept": "application/json"},
                timeout=aiohttp.ClientTimeout(total=self.timeout),
            ) as resp:
                if resp.status // 100 != 2:
                    raise ValueError(f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise ValueError(f"larger than {self.max_bytes} bytes")
            data = await asyncio.to_thread(self._parse, bytes(body))
        except Exception as e:
            if isinstance(e, TimeoutError):
                reason = f"timed out after {self.timeout:g} s"
            elif isinstance(e, json.JSONDecodeError):
                reason = "invalid JSON"
            else:
                reason = str(e) or type(e).__name__
            self.log.warning(
                "models catalogue: fetch from %s failed (%s); keeping the %s copy",
                self.source_url,
                reason[:200],
                self.origin,
            )
            return False
        self._data, self.origin, self.fetched_at = data, "fetched", self.now()
        self.log.info("models catalogue: fetched %d providers from %s", len(data), self.source_url)
        if self.cache_path is not None:
            await asyncio.to_thread(self._write_cache, data)
        return True

    def _parse(self, body: bytes) -> dict:
        data = clean_catalogue(json.loads(body), self.log)
        if not data:
            raise ValueError("no valid providers")
        return data

    def _write_cache(self, data: dict) -> None:
        assert self.cache_path is not None
        tmp = self.cache_path.with_name(f"{self.cache_path.name}.{os.getpid()}.tmp")
        try:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            # 0600 like the database beside it (the umask may be wider than the service's).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(data, separators=(",", ":"), ensure_ascii=False))
            os.replace(tmp, self.cache_path)
        except OSError as e:
            self.log.warning("models catalogue: cannot write cache %s (%s)", self.cache_path, e)
            tmp.unlink(missing_ok=True)

    async def run(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        """Background refresh: fetch whenever due until `stop` is set.

        `stop` also abandons a fetch in flight, so shutting down never waits for a slow or
        black-holed catalogue server (up to `timeout` seconds otherwise).
        """
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                fetch = asyncio.ensure_future(self.fetch(http))
                await asyncio.wait((fetch, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not fetch.done():
                    fetch.cancel()
                    if self._inflight is not None:
                        self._inflight.cancel()
                    return
                await fetch  # re-raises what fetch raised
                wait = self._seconds_until_due()
                if wait is None:
                    await stopping
                    return
                # capped so a suspended machine or a clock jump is noticed within the hour
                await asyncio.wait((stopping,), timeout=min(max(wait, 1.0), 3600.0))
        finally:
            stopping.cancel()


# ── Account model lists ──────────────────────────────────────────────────────


MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")


@dataclass
class AccountList:
    """What one account's provider listed: `models` (None until a fetch succeeded),
    `fetched_at` / `tried_at` (epoch ms) and the last `error` (None after a success)."""

    models: tuple[ModelInfo, ...] | None = None
    fetched_at: int | None = None
    tried_at: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class LiveView:
    """The account lists one key sees, per route name, and a hashable `key` naming them."""

    lists: Mapping[str, tuple[ModelInfo, ...]]
    key: tuple


class AccountModels:
    """Per-account model lists from the providers' own model endpoints, kept in memory.

    The instance fetches them in the background (`due` says which, `put` / `failed` record
    the answers); requests only read. A list is refetched `ttl_ms` after it was fetched, and
    `retry_ms` after a failed try; a failed refetch keeps serving the last good list. No
    list at all (offline since start-up, or a provider without one) means the catalogue."""

    def __init__(self, ttl_ms: int, retry_ms: int = 600_000):
        self.ttl_ms, self.retry_ms = ttl_ms, retry_ms
        self.lists: dict[str, AccountList] = {}
        self.version = 0  # bumped whenever any list changes (registry memo key)

    def due(self, account_id: str, now: int) -> bool:
        entry = self.lists.get(account_id)
        if entry is None or entry.tried_at is None:
            return True
        if entry.error is not None:
            return now - entry.tried_at >= self.retry_ms
        return now - (entry.fetched_at or 0) >= self.ttl_ms

    def put(self, account_id: str, models: list[ModelInfo], now: int) -> None:
        """A successful fetch. Ids that cannot be model ids (spaces, slashes, over 128
        characters) are left out; a list with no usable model counts as a failure, so the
        last good list (or the catalogue) keeps serving."""
        unique = tuple({m.id: m for m in models if MODEL_ID.fullmatch(m.id)}.values())
        if not unique:
            self.failed(account_id, "the provider listed no usable models", now)
            return
        entry = self.lists.setdefault(account_id, AccountList())
        if entry.models != unique:
            self.version += 1
        entry.models, entry.fetched_at, entry.tried_at, entry.error = unique, now, now, None

    def failed(self, account_id: str, error: str, now: int) -> None:
        entry = self.lists.setdefault(account_id, AccountList())
        entry.tried_at, entry.error = now, error[:300]

    def keep_only(self, account_ids: Collection[str]) -> None:
        """Forget accounts that were removed."""
        for gone in [a for a in self.lists if a not in account_ids]:
            del self.lists[gone]
            self.version += 1

    def view(self, routes_accounts: Mapping[str, list[str]]) -> LiveView:
        """The union of the listed models per route, accounts in the given order (first
        listing of an id wins); routes whose accounts have no list yet are left out."""
        lists: dict[str, tuple[ModelInfo, ...]] = {}
        for route, account_ids in routes_accounts.items():
            known = [self.lists[a].models for a in account_ids if a in self.lists]
            known = [m for m in known if m is not None]
            if known:
                merged: dict[str, ModelInfo] = {}
                for models in known:
                    for info in models:
                        merged.setdefault(info.id, info)
                lists[route] = tuple(merged.values())
        key = (self.version, tuple((r, tuple(a)) for r, a in sorted(routes_accounts.items())))
        return LiveView(lists, key)

    def admin_view(self, account_id: str) -> dict:
        """For the admin API: the ids an account offers and where they came from."""
        entry = self.lists.get(account_id)
        if entry is None or entry.models is None:
            return {
                "source": "catalogue",
                "ids": None,
                "fetchedAt": None,
                "error": entry.error if entry else None,
            }
        return {
            "source": "provider",
            "ids": [m.id for m in entry.models],
            "fetchedAt": entry.fetched_at,
            "error": entry.error,
        }
