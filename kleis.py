"""Kleis: one base URL and one scoped API key for OAuth-backed coding-agent accounts.

Run:    python kleis.py                 (same as `serve`; creates config.toml on first start)
Other:  python kleis.py init | check | keys create|list|revoke | accounts list|login|import|
        refresh|primary|remove | usage | rotate-secret | systemd-unit   (--help on each)

This file is the composition root and reads top to bottom: the provider loader, the proxy
path, discovery's routes, one Kleis instance (building, opening, stopping its parts), the app
with its one route table, and main(). Everything else lives in a sibling module named after
what it owns (the README's "Development" section has the map); none of them imports this file.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import faulthandler
import functools
import gc
import importlib
import importlib.util
import json
import logging
import os
import re
import resource
import socket
import sys
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import ModuleType
from urllib.parse import unquote

import aiohttp
import zstandard
from sanic import Request, Sanic
from sanic import response as sanic_response
from sanic.exceptions import SanicException
from sanic.http.constants import Stage
from sanic.server.protocols.http_protocol import HttpProtocol

import admin
import cli
import discovery
import providers
from accounts import (
    ERROR_COOLDOWN,
    AccountPool,
    AccountState,
    Logins,
    RefreshElsewhere,
    import_config,
    upstream_cooldown,
)
from errors import (
    AccountNeedsReauth,
    BadHeader,
    BadRequest,
    ConfigProblem,
    HeadersTooLarge,
    InvalidApiKey,
    InvalidJson,
    KleisError,
    LocalResourcesExhausted,
    MethodNotAllowed,
    MissingApiKey,
    MissingModel,
    ModelNotAllowed,
    ModelNotFound,
    NotFound,
    ProviderNotAllowed,
    RefreshInProgress,
    RequestTooLarge,
    ShuttingDown,
    StoreUnavailable,
    TooManyAttempts,
    TransformFailed,
    UnsupportedContentEncoding,
    UpstreamAccountRejected,
    UpstreamRedirected,
    UpstreamTimeout,
    UpstreamUnavailable,
    UriTooLong,
    error_body,
    from_provider,
)
from keys import Keys, Lockout, client_address, presented_key
from providers import Context, Cooldown, LoadedProvider, ProviderError, ProxyRequest, ReauthRequired
from providers._sse import JsonUnwritable, json_loads, last_boundary_end
from runtime import Background, Clock
from settings import ConfigError, ServerSettings, Settings, Vault, check_value, new_id
from store import INSTANCE_LIVE_MS, KeyRecord, Store, database_failure, database_problem
from usage import Metrics, Outcome, UsageQueue, classify

VERSION = "0.1.0"
HERE = Path(__file__).resolve().parent
log = logging.getLogger("kleis")


# ══ Providers ═══════════════════════════════════════════════════════════════
# Adapters are modules: providers/<entry>.py or <plugins_dir>/<entry>.py, checked at start-up.


def available_entries(plugins_dir: Path | None) -> list[str]:
    folders = [HERE / "providers"] + ([plugins_dir] if plugins_dir else [])
    names = {p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.py")}
    return sorted(n for n in names if not n.startswith("_"))


def import_entry(entry: str, plugins_dir: Path | None) -> ModuleType:
    if plugins_dir and (plugins_dir / f"{entry}.py").is_file():
        # Loaded under the providers package so `from . import Tokens` works in plugins too.
        name = f"providers.{entry}"
        spec = importlib.util.spec_from_file_location(name, plugins_dir / f"{entry}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    return importlib.import_module(f"providers.{entry}")


def load_providers(settings: Settings) -> dict[str, LoadedProvider]:
    """Import every enabled provider entry, check the contract and its options. Raises
    ConfigError naming what is wrong and what exists."""
    plugins_dir = settings.resolve(settings.server.plugins_dir) if settings.server.plugins_dir else None
    if plugins_dir and not plugins_dir.is_dir():
        raise ConfigError(f"[server] plugins_dir: {plugins_dir} is not a folder")
    available = available_entries(plugins_dir)
    loaded: dict[str, LoadedProvider] = {}
    routes: dict[str, str] = {}
    for name, section in settings.providers.items():
        if not section.enabled:
            continue
        where = f"[providers.{name}]"
        if section.entry not in available:
            raise ConfigError(
                f"{where} entry: {section.entry!r} not found; available: {', '.join(available)}"
            )
        try:
            module = import_entry(section.entry, plugins_dir)
        except Exception as exc:
            raise ConfigError(f"{where} entry: {section.entry!r} failed to import: {exc}") from None
        missing = [c for c in providers.REQUIRED_CONSTANTS if not hasattr(module, c)]
        missing += [f for f in providers.REQUIRED_FUNCTIONS if not callable(getattr(module, f, None))]
        if missing or module.CONTRACT != providers.API:
            raise ConfigError(
                f"{where} entry: {section.entry}.py does not meet contract v{providers.API}"
                f" (missing: {', '.join(missing) or 'none'}; CONTRACT={getattr(module, 'CONTRACT', None)})"
            )
        options = {}
        for key, value in section.options.items():
            if key not in module.OPTIONS:
                raise ConfigError(
                    f"{where} {key}: unknown key (known: enabled, entry, {', '.join(module.OPTIONS)})"
                )
            options[key] = check_value(f"providers.{name}", key, value, module.OPTIONS[key])
        for path in module.ROUTES:
            if path in routes:
                raise ConfigError(f"{where}: route {path} is already served by {routes[path]}")
            routes[path] = name
        loaded[name] = LoadedProvider(name=name, module=module, options={**module.OPTIONS, **options})
    return loaded


# ══ Proxy ═══════════════════════════════════════════════════════════════════
# Key auth and scopes, account choice with stickiness and failover before the first byte,
# streaming pass-through with keepalives at event boundaries, timeouts, usage recording.

REQUEST_HEADER_DROP = frozenset({
    "host", "content-length", "connection", "keep-alive", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "authorization", "x-api-key", "cookie", "accept-encoding",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "x-real-ip", "forwarded", "expect",
    "content-encoding",  # the body is decoded here and re-encoded by the adapter
})  # fmt: skip
RESPONSE_HEADER_DROP = frozenset({
    "content-length", "content-encoding", "connection", "keep-alive", "transfer-encoding", "upgrade",
    "proxy-authenticate", "trailer", "te", "set-cookie", "alt-svc", "strict-transport-security",
})  # fmt: skip
KEEPALIVE = b": kleis-keepalive\n\n"
FAILOVER_STATUSES = frozenset({429, 500, 502, 503, 504, 529})
MAX_ERROR_BODY = 1024 * 1024
MAX_MODEL_CHARS = 256
MODEL_UNFIT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# Errors that mean this process, not the upstream, ran out of something (see Proxy._send).
LOCAL_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
LOCAL_RESOURCE_RETRY_S = 2
INSTANCE_HEARTBEAT_S = 30  # `rotate-secret` counts a server seen within 90 s as running


class UpstreamFailure(Exception):
    """The upstream could not be reached or did not answer in time (no response to relay)."""

    def __init__(self, message: str, timeout: bool = False):
        super().__init__(message)
        self.timeout = timeout


class Drained(Exception):
    """Set on an upstream body still being relayed when the shutdown drain time is over."""


def unfinished_event(chunk: bytes, pending: int, before: bytes) -> int:
    """Bytes of the SSE event still unfinished after `chunk`, given `pending` such bytes
    before it and `before`, the 2 bytes that preceded it (a blank line may straddle chunks).
    Looks at each byte at most once over a stream, so a huge event costs linear time."""
    if chunk.endswith(b"\n\n"):  # whole events, the common case
        return 0
    cut = last_boundary_end(chunk)
    if cut >= 0:
        return len(chunk) - cut
    if pending:
        cut = last_boundary_end(before + chunk[:2])
        if cut >= 0:
            return len(chunk) - (cut - len(before))
    return pending + len(chunk)


def local_resources(exc: OSError) -> LocalResourcesExhausted:
    """The 503 for an OSError that means this process ran out of something (EMFILE, ...),
    logged once here with what to do."""
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    log.error("cannot serve a request: %s (%s); raise the open files limit (LimitNOFILE)", name, exc)
    message = f"Kleis is out of local resources ({name}); retry shortly"
    return LocalResourcesExhausted(message, LOCAL_RESOURCE_RETRY_S)


# What aiohttp refuses to send (RFC 9110 §5.5 allows no control character but HTAB in a field).
FORBIDDEN_HEADER_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# A field name is a token (RFC 9110 §5.1); Sanic passes `Bad Name:` or `x\xff:` through.
NOT_NAME_CHARS = re.compile(r"[^!#$%&'*+\-.^_`|~0-9a-z\t]")


def client_headers(request: Request) -> dict[str, str]:
    """The client's headers to forward: lower-case names, repeated lines joined with ", "
    (RFC 9110 §5.3: equal to one comma-separated line). Raises BadHeader (400) for a control
    character, which no upstream request may carry, and for a name that is not a token."""
    out: dict[str, str] = {}
    for name, value in request.headers.items():
        name = name.lower()
        if name in REQUEST_HEADER_DROP:
            continue
        seen = out.get(name)
        out[name] = value if seen is None else f"{seen}, {value}"
    # One search over everything (tab is allowed, so it cannot hide or make a match).
    if FORBIDDEN_HEADER_CHARS.search("\t".join(out) + "\t" + "\t".join(out.values())):
        bad = next(n for n, v in out.items() if FORBIDDEN_HEADER_CHARS.search(n + "\t" + v))
        raise BadHeader(f"the header {bad[:60]!r} contains a control character")
    if NOT_NAME_CHARS.search("\t".join(out)) or "" in out:
        bad = next(n for n in out if not n or NOT_NAME_CHARS.search(n))
        raise BadHeader(f"the header name {bad[:60]!r} is not a valid field name (RFC 9110 §5.1)")
    return out


def decoded_body(raw: bytes, content_encoding: str, limit: int) -> bytes:
    """The request body with its `Content-Encoding` undone (codings listed in the order they
    were applied, RFC 9110 §8.4). Codex CLI sends zstd; gzip and deflate are the other codings
    clients use. The size limit applies to the decoded body (RequestTooLarge, 413); an unknown
    coding is UnsupportedContentEncoding (415); a corrupt body is BadRequest (400)."""
    codings = [c.strip().lower() for c in content_encoding.split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        decode = BODY_DECODERS.get(coding)
        if decode is None:
            raise UnsupportedContentEncoding(
                f"Content-Encoding {coding[:40]!r} is not supported; send {', '.join(BODY_DECODERS)} or none"
            )
        try:
            raw = decode(raw, limit)
        except BodyTooLarge:
            raise RequestTooLarge(
                f"the decoded request body is larger than {limit // (1024 * 1024)} MB ([server] max_body_mb)"
            ) from None
        except (zlib.error, zstandard.ZstdError, ValueError) as exc:
            raise BadRequest(f"the request body is not valid {coding} ({str(exc)[:120]})") from None
    return raw


class BodyTooLarge(Exception):
    pass


def _zstd_decoded(raw: bytes, limit: int) -> bytes:
    # Fed 1 KB at a time: one zstd block inflates at most ~32,000 times, so a bomb is caught
    # a few MB past the limit, never in full. Frames may follow each other (RFC 8878 §3.1).
    out, frames = bytearray(), 0
    while raw:
        inflater = zstandard.ZstdDecompressor().decompressobj()
        for start in range(0, len(raw), 1024):
            out += inflater.decompress(raw[start : start + 1024])
            if len(out) > limit:
                raise BodyTooLarge
            if inflater.eof:
                raw = inflater.unused_data + raw[start + 1024 :]
                break
        else:
            if not inflater.eof:
                raise ValueError("truncated data")
            raw = inflater.unused_data
        frames += 1
    if not frames:
        raise ValueError("no data")
    return bytes(out)


def _zlib_decoded(raw: bytes, limit: int, wbits: int) -> bytes:
    # gzip bodies may hold several members one after another (RFC 1952 §2.2); anything else
    # after the end is an error, not ignored.
    out = bytearray()
    while True:
        inflater = zlib.decompressobj(wbits)
        out += inflater.decompress(raw, limit + 1 - len(out))
        if len(out) > limit or inflater.unconsumed_tail:
            raise BodyTooLarge
        if not inflater.eof:
            raise ValueError("truncated data")
        raw = inflater.unused_data
        if not raw:
            return bytes(out)
        if wbits != 16 + zlib.MAX_WBITS or not raw.startswith(b"\x1f\x8b"):
            raise ValueError("data after the end of the stream")


def _deflate_decoded(raw: bytes, limit: int) -> bytes:
    try:
        return _zlib_decoded(raw, limit, zlib.MAX_WBITS)  # "deflate" is the zlib format ...
    except zlib.error:
        return _zlib_decoded(raw, limit, -zlib.MAX_WBITS)  # ... though some clients send it raw


BODY_DECODERS = {
    "zstd": _zstd_decoded,
    "gzip": lambda raw, limit: _zlib_decoded(raw, limit, 16 + zlib.MAX_WBITS),
    "x-gzip": lambda raw, limit: _zlib_decoded(raw, limit, 16 + zlib.MAX_WBITS),
    "deflate": _deflate_decoded,
}


def relay_headers(upstream: Mapping[str, str], sse: bool) -> dict[str, str]:
    headers = {k: v for k, v in upstream.items() if k.lower() not in RESPONSE_HEADER_DROP}
    if sse:
        headers = {k: v for k, v in headers.items() if k.lower() not in ("cache-control", "content-type")}
        headers.update(
            {
                "cache-control": "no-cache, no-transform",
                "x-accel-buffering": "no",
                "content-type": "text/event-stream; charset=utf-8",
            }
        )
    return headers


def parse_proxy_body(raw: bytes) -> dict:
    if not raw:
        raise BadRequest("the request body is empty; send a JSON object with a model field")
    try:
        body = json_loads(raw)
    except ValueError as exc:
        if "depth" in str(exc):  # orjson reads 1024 levels; an agent's body has about ten
            raise BadRequest("the request body is nested too deeply (more than 1024 levels)") from None
        raise InvalidJson(
            f"the request body is not valid JSON ({exc.__class__.__name__}: {str(exc)[:120]})"
        ) from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise MissingModel("the request must include a non-empty model field")
    if len(model) > MAX_MODEL_CHARS:  # it is a usage key and a log field: bounded
        raise BadRequest(f"the model field is longer than {MAX_MODEL_CHARS} characters")
    if MODEL_UNFIT.search(model):
        # A lone surrogate cannot be stored as UTF-8 (the usage flush would fail for good and
        # hold every other bucket back); control characters would forge log lines.
        raise BadRequest("the model field has control characters or lone surrogate escapes")
    return body


class AccessLog:
    """One line per proxied request on the `kleis.access` logger at info, whatever
    `log_level` says ([server] access_log "text" or "json"; "off" makes none). Fields: method,
    path, status, key (its label, else its 12-character prefix: never the key), account
    (label), model, ttfb_ms, duration_ms, tokens (input, output, cache read, cache write) and
    outcome (the usage class: success, client_proxy, rate_limit, cancelled, ...). Built from
    what the request path already holds: no await, no lookup beyond a dict."""

    def __init__(self, mode: str):
        self.json = mode == "json"
        self.log = logging.getLogger("kleis.access")
        self.log.setLevel(logging.INFO)

    def write(self, request: Request, outcome: Outcome, key: KeyRecord, account: AccountState | None) -> None:
        if not self.log.isEnabledFor(logging.INFO):  # raised above info by hand: build nothing
            return
        usage = outcome.usage
        tokens = (
            (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens)
            if usage is not None
            else (0, 0, 0, 0)
        )
        self._emit(
            request.method, request.path, outcome.status or None, key.label or key.key_prefix,
            account.label if account is not None else None, outcome.model, outcome.ttfb_ms,
            outcome.duration_ms, tokens, classify(outcome),
        )  # fmt: skip

    def refused(self, request: Request, status: int, duration_ms: int) -> None:
        """A request refused before an account was chosen (bad key, scope, body)."""
        if not self.log.isEnabledFor(logging.INFO):
            return
        self._emit(request.method, request.path, status, None, None, None, None, duration_ms, None, "refused")

    def _emit(self, method, path, status, key, account, model, ttfb, duration, tokens, outcome) -> None:
        if self.json:
            line = json.dumps(
                {
                    "method": method, "path": path, "status": status, "key": key, "account": account,
                    "model": model, "ttfb_ms": ttfb, "duration_ms": duration,
                    "tokens": dict(zip(("input", "output", "cache_read", "cache_write"), tokens, strict=True))
                    if tokens else None,
                    "outcome": outcome,
                },
                separators=(",", ":"),
            )  # fmt: skip
        else:
            line = (
                f"{method} {path} {status or '-'} key={_field(key)} account={_field(account)} "
                f"model={_field(model)} ttfb_ms={'-' if ttfb is None else ttfb} duration_ms={duration} "
                + ("in={} out={} cache_read={} cache_write={} ".format(*tokens) if tokens else "")
                + f"outcome={outcome}"
            )
        self.log.info(line)


def _field(value: str | None) -> str:
    """A label as one token of a text line: `-` when missing, JSON-quoted when it has spaces,
    quotes or `=` (so a line always splits the same way)."""
    if not value:
        return "-"
    if any(c.isspace() or c in '"=' for c in value):
        return json.dumps(value)
    return value


class Proxy:
    """The request path shared by every provider route. `http` is set when the instance opens.

    Durations and stream deadlines are read from the event loop's clock, the one its
    timeouts run on; what is stored or compared with stored times comes from `clock`."""

    def __init__(
        self,
        settings: ServerSettings,
        keys: Keys,
        pool: AccountPool,
        usage: UsageQueue,
        metrics: Metrics,
        lockout: Lockout,
        clock: Clock,
    ):
        self.settings, self.keys, self.pool, self.usage, self.metrics = settings, keys, pool, usage, metrics
        self.lockout, self.clock = lockout, clock
        self.http: aiohttp.ClientSession | None = None
        self.open_streams = 0
        self.max_event = settings.max_event_mb * 1024 * 1024
        self.draining = False  # SIGTERM came: connections close after their answer
        self.drained = False  # the drain time is over: open and new streams end at once
        self._reading: set[aiohttp.StreamReader] = set()  # upstream bodies being relayed
        self.access = AccessLog(settings.access_log) if settings.access_log != "off" else None
        # The same for every upstream request: built once, not per request.
        self._client_timeout = aiohttp.ClientTimeout(
            total=None, connect=settings.connect_timeout, sock_connect=settings.connect_timeout
        )

    def drain(self, seconds: float) -> None:
        """Shutdown: from now on every answer closes its connection; after `seconds` each
        upstream body still being relayed is ended (Drained), so its stream gets its
        protocol's error event and is recorded incomplete instead of being cut."""
        self.draining = True
        if self._reading:
            log.info("shutting down: %d open streams may finish within %g s", len(self._reading), seconds)
        asyncio.get_running_loop().call_later(seconds, self._drained)

    def _drained(self) -> None:
        self.drained = True
        for content in list(self._reading):
            content.set_exception(Drained())
        if self._reading:
            log.warning("shutting down: ended %d streams still open after the drain", len(self._reading))

    def authenticate(self, request: Request) -> KeyRecord:
        address = client_address(
            request.headers, request.ip, self.settings.trust_forwarded, self.settings.trusted_proxies
        )
        wait = self.lockout.retry_after(address)
        if wait:
            raise TooManyAttempts(f"too many invalid API key attempts; retry in {wait} s", wait)
        key = presented_key(request.headers)
        if key is None:
            raise MissingApiKey()
        record = self.keys.authenticate(key)
        if record is None:
            self.lockout.fail(address)  # another key's success clears nothing (see keys.Lockout)
            raise InvalidApiKey()
        return record

    async def handle(self, request: Request, provider: LoadedProvider, endpoint: str):
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            key, preq = self._admit(request, provider, endpoint)
        except KleisError as exc:  # refused before any account was chosen: logged, not counted
            if self.access is not None:
                self.access.refused(request, exc.status, int((loop.time() - started) * 1000))
            raise
        outcome = Outcome(key_id=key.id, provider=provider.name, endpoint=endpoint, model=preq.body["model"])
        try:
            return await self._forward(request, provider, preq, key, outcome, started)
        except KleisError as exc:
            outcome.status, outcome.source = exc.status, "proxy"
            raise
        except asyncio.CancelledError:
            outcome.cancelled = True
            raise
        finally:
            outcome.duration_ms = int((loop.time() - started) * 1000)
            if outcome.ttfb_ms is None:  # no byte was sent (0 is a first byte within 1 ms)
                outcome.ttfb_ms = outcome.duration_ms
            self.usage.record(outcome)
            self.metrics.observe(outcome)
            if self.access is not None:
                self.access.write(request, outcome, key, self.pool.accounts.get(outcome.account_id))
            # Cancelled timers (aiohttp's, asyncio's) stay in the loop's heap until they would
            # have fired, and each keeps the context it was made in, which holds this request:
            # without this, ~100 finished requests' bodies (up to max_body_mb each) stay alive.
            request.body = b""

    def _admit(
        self, request: Request, provider: LoadedProvider, endpoint: str
    ) -> tuple[KeyRecord, ProxyRequest]:
        """The key, its scopes and the body: (key, request for the adapter) or a KleisError."""
        key = self.authenticate(request)
        if key.provider_scopes is not None and provider.name not in key.provider_scopes:
            raise ProviderNotAllowed(f"this API key is not allowed to use provider {provider.name}")
        raw = request.body
        if "content-encoding" in request.headers:  # every line of it (RFC 9110 §5.3)
            coding = ", ".join(request.headers.getall("content-encoding"))
            raw = decoded_body(raw, coding, self.settings.max_body_mb * 1024 * 1024)
        body = parse_proxy_body(raw)
        raw_model = body["model"].strip()
        prefixes = tuple(provider.module.PREFIXES)
        if not discovery.model_allowed(raw_model, prefixes, key.model_scopes):
            raise ModelNotAllowed(f"this API key is not allowed to use model {raw_model}")
        model = discovery.strip_prefix(raw_model, prefixes)
        body["model"] = model
        preq = ProxyRequest(
            endpoint=endpoint,
            headers=client_headers(request),
            query=request.query_string,
            body=body,
            api_key_id=key.id,
        )
        return key, preq

    async def _forward(
        self,
        request: Request,
        provider: LoadedProvider,
        preq: ProxyRequest,
        key: KeyRecord,
        outcome: Outcome,
        started: float,
    ):
        pool = self.pool
        session = provider.module.session_key(preq)
        accounts = pool.choose(provider.name, key, session)
        failure: UpstreamFailure | ProviderError | None = None
        relay: tuple[int, Mapping[str, str], bytes] | None = None
        rejected: AccountState | None = None  # the last account refused with 401 after a refresh
        for account in accounts:
            outcome.account_id = account.id
            try:
                account = await pool.fresh(account)
                resp = await self._send(provider, account, preq)
                if resp.status == 401:
                    await self._discard(resp)
                    account = await pool.fresh(account, force=True, seen_token=account.access_token)
                    resp = await self._send(provider, account, preq)
            except ReauthRequired as exc:
                failure = exc  # marked needs_reauth by the pool; try the next account
                continue
            except RefreshElsewhere as exc:  # another instance is on it: no cooldown, no streak
                failure = exc
                continue
            except UpstreamFailure as exc:
                failure = exc
                pool.failed(account, str(exc))
                continue
            except ProviderError as exc:  # the token endpoint failed: no usable token now
                failure = exc
                pool.cool_down(account, Cooldown(ERROR_COOLDOWN), str(exc), kind="error")
                continue
            if 300 <= resp.status < 400:
                await self._discard(resp)
                raise self._redirected(provider, resp)
            if resp.status in FAILOVER_STATUSES or resp.status == 401:
                body = await self._read_error(resp)
                relay = self._refused(provider, account, resp.status, resp.headers, body, preq.endpoint)
                rejected = account if resp.status == 401 else None
                continue
            transformer = self._transformer(provider, preq, resp)
            if getattr(transformer, "collect", False):
                # Nothing reaches the client before the whole answer is in, so a usage or rate
                # limit found inside it (Codex's in-stream usage_limit_reached) still fails over.
                # Any other error inside an accepted answer is about this request, not the
                # account: it is answered as it is, without failover or a cooldown.
                status, headers, body = await self._collected(provider, resp, transformer, outcome, started)
                if status == 429:
                    relay = self._refused(provider, account, status, headers, body, preq.endpoint)
                    continue
                pool.answered(account)
                pool.stick(provider.name, key, session, account)
                headers["x-kleis-account"] = account.id
                return sanic_response.raw(body, status=status, headers=headers)
            pool.answered(account)
            pool.stick(provider.name, key, session, account)
            return await self._stream(request, provider, resp, transformer, account, outcome, started)
        if relay is not None and rejected is not None and relay[0] == 401:
            # A relayed 401 reads as a wrong Kleis key to every SDK; the account is the problem.
            error = UpstreamAccountRejected(
                f"{provider.name}: the provider refused account {rejected.label!r} ({rejected.id}) with "
                f"HTTP 401 even after a token refresh; your Kleis key is fine. The account rests "
                f"{ERROR_COOLDOWN:g} s; if this persists, log in again on the admin page or with "
                f"`python kleis.py accounts login {provider.name}`"
            )
            outcome.status, outcome.source = error.status, "upstream"
            headers = {"cache-control": "no-store", "x-kleis-provider": provider.name}
            headers["x-kleis-account"] = rejected.id
            body = error_body(provider.error_style, error)
            return sanic_response.json(body, status=error.status, headers=headers)
        if relay is not None:
            status, headers, body = relay
            outcome.status, outcome.source = status, "upstream"
            return sanic_response.raw(body, status=status, headers=headers)
        if isinstance(failure, ReauthRequired):
            raise AccountNeedsReauth(
                f"{provider.name}: {failure}; log in again on the admin page or with "
                f"`python kleis.py accounts login {provider.name}`"
            )
        if isinstance(failure, RefreshElsewhere):
            raise RefreshInProgress(f"{provider.name}: {failure}; retry in a few seconds", 5)
        if isinstance(failure, UpstreamFailure) and failure.timeout:
            raise UpstreamTimeout(f"{provider.name}: {failure}")
        raise UpstreamUnavailable(f"{provider.name}: {failure or 'no account could serve the request'}")

    def _refused(
        self,
        provider: LoadedProvider,
        account: AccountState,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        endpoint: str,
    ) -> tuple[int, dict[str, str], bytes]:
        """Rest the account as the refusal warrants (see `upstream_cooldown`); returns the
        refusal as it is relayed when no other account can serve the request. A refusal on an
        endpoint with limits of its own (the adapter's `UNMETERED`, e.g. Claude's
        count_tokens) says nothing about the account's usage: no cooldown, no streak."""
        if endpoint not in getattr(provider.module, "UNMETERED", ()):
            self._rest(provider, account, status, headers, body)
        out_headers = relay_headers(headers, sse=False)
        out_headers["x-kleis-provider"] = provider.name
        return status, out_headers, body

    def _rest(
        self,
        provider: LoadedProvider,
        account: AccountState,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
    ) -> None:
        reason = f"upstream answered HTTP {status}"
        cooldown = upstream_cooldown(provider, status, headers, body, self.clock.now())
        if cooldown is not None:
            self.pool.cool_down(account, cooldown, reason, kind="transient" if status == 429 else "error")
        elif status == 401:  # refused even with a token refreshed a moment ago
            reason = "the provider refused the account's token (HTTP 401) even after a refresh; log in again"
            self.pool.cool_down(account, Cooldown(ERROR_COOLDOWN), reason, kind="error")
        else:
            self.pool.failed(account, reason)

    def _transformer(self, provider: LoadedProvider, preq: ProxyRequest, resp: aiohttp.ClientResponse):
        try:
            return provider.module.transformer(provider.ctx, preq, resp.status, resp.headers)
        except Exception:
            resp.close()
            log.exception("%s transformer failed", provider.name)
            raise TransformFailed(f"{provider.name}: the response could not be processed") from None

    async def _send(
        self, provider: LoadedProvider, account: AccountState, preq: ProxyRequest
    ) -> aiohttp.ClientResponse:
        """Send the prepared request; returns once the upstream's status line and headers came."""
        try:
            upstream = provider.module.prepare(provider.ctx, account.adapter_view(), preq)
        except (RecursionError, JsonUnwritable):  # it parsed, but is too deep to walk or write
            raise BadRequest("the request body is nested too deeply (more than 254 levels)") from None
        except OSError as exc:  # an adapter reading a file (Codex's instructions) at EMFILE
            raise local_resources(exc) if exc.errno in LOCAL_RESOURCE_ERRNOS else exc from None
        timeout = self._client_timeout
        try:
            async with asyncio.timeout(self.settings.first_byte_timeout):
                return await self.http.request(
                    "POST",
                    upstream.url,
                    headers=upstream.headers,
                    data=upstream.body,
                    timeout=timeout,
                    allow_redirects=False,
                )
        except TimeoutError:
            raise UpstreamFailure(
                f"no answer from upstream within {self.settings.first_byte_timeout:g} s", timeout=True
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            if getattr(exc, "errno", None) in LOCAL_RESOURCE_ERRNOS:
                # Kleis's own limit (file descriptors, buffers): failing over or resting the
                # account would blame the upstream for it.
                raise local_resources(exc) from None
            raise UpstreamFailure(f"cannot reach upstream ({type(exc).__name__})") from None

    @staticmethod
    def _redirected(provider: LoadedProvider, resp: aiohttp.ClientResponse) -> KleisError:
        """An upstream 3xx is never relayed: an SDK would follow `Location` and send the
        prompt (and any credentials it holds) wherever it points. Only its origin is logged."""
        location = resp.headers.get("location", "")
        origin = re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/?#]*", location)
        log.warning(
            "%s upstream answered HTTP %d redirecting to %s; not followed (check its *_url options)",
            provider.name,
            resp.status,
            origin[0] if origin else "a relative location",
        )
        return UpstreamRedirected(
            f"{provider.name}: the upstream answered HTTP {resp.status} (a redirect); Kleis does not "
            "follow or relay redirects"
        )

    async def _discard(self, resp: aiohttp.ClientResponse) -> None:
        with contextlib.suppress(Exception):
            await self._read_error(resp)

    async def _read_error(self, resp: aiohttp.ClientResponse) -> bytes:
        try:
            async with asyncio.timeout(self.settings.idle_timeout):
                return await resp.content.read(MAX_ERROR_BODY)
        except (aiohttp.ClientError, TimeoutError):
            return b""
        finally:
            resp.release()

    async def _stream(
        self,
        request: Request,
        provider: LoadedProvider,
        resp: aiohttp.ClientResponse,
        transformer,
        account: AccountState,
        outcome: Outcome,
        started: float,
    ):
        loop = asyncio.get_running_loop()
        settings = self.settings
        outcome.status, outcome.source = resp.status, "upstream"
        headers = relay_headers(resp.headers, transformer.is_sse)
        headers.update({"x-kleis-provider": provider.name, "x-kleis-account": account.id})
        content_type = getattr(transformer, "content_type", None)  # a transformer that reshapes the body
        if content_type:
            headers = {k: v for k, v in headers.items() if k.lower() != "content-type"}
            headers["content-type"] = content_type
        self.open_streams += 1
        oversized = False
        try:
            out = await request.respond(status=resp.status, headers=headers)
            outcome.ttfb_ms = int((loop.time() - started) * 1000)
            deadline = started + settings.response_timeout
            keepalive = (
                settings.keepalive_interval
                if transformer.is_sse and settings.keepalive_interval > 0
                else None
            )
            content = resp.content
            self._reading.add(content)
            if self.drained:
                content.set_exception(Drained())
            silent_since = loop.time()
            problem = None
            pending, before = 0, b""  # bytes of the event not finished yet, the 2 bytes before
            # An SSE transformer frames events anyway and says how many bytes of an unfinished
            # one it holds (`buffered`); only one written before that attribute existed has
            # the core find event boundaries itself (a second scan of every chunk).
            held = transformer.is_sse and hasattr(transformer, "buffered")
            while True:
                now = loop.time()
                if now >= deadline:
                    problem = f"the response took longer than {settings.response_timeout:g} s"
                    break
                try:
                    # Bytes already buffered are taken without arming a timer (the common case
                    # under load); only a real wait gets the idle/keepalive/total deadline.
                    chunk = content.read_nowait()
                    if not chunk and not content.at_eof():
                        wait = min(settings.idle_timeout - (now - silent_since), deadline - now)
                        if keepalive is not None:
                            wait = min(wait, keepalive)
                        async with asyncio.timeout(max(wait, 0.001)):
                            chunk = await content.readany()
                except TimeoutError:
                    now = loop.time()
                    if now >= deadline:
                        problem = f"the response took longer than {settings.response_timeout:g} s"
                        break
                    if now - silent_since >= settings.idle_timeout:
                        problem = f"upstream sent nothing for {settings.idle_timeout:g} s"
                        break
                    if transformer.at_boundary:
                        await out.send(KEEPALIVE)
                    continue
                except (aiohttp.ClientError, ConnectionError) as exc:
                    problem = f"upstream connection broke off ({type(exc).__name__})"
                    break
                except Drained:
                    problem = "shutting down (the stream ran past [server] drain_seconds)"
                    break
                if not chunk:
                    break
                silent_since = loop.time()
                if not transformer.is_sse:  # a JSON answer counts as one event
                    pending += len(chunk)
                elif not held:
                    pending = unfinished_event(chunk, pending, before)
                    if pending:  # only an unfinished event can have its blank line straddle chunks
                        before = chunk[-2:]
                if pending > self.max_event:  # checked before the adapter buffers any of it
                    problem = f"the upstream sent an event larger than {settings.max_event_mb} MB"
                    oversized = True
                    break
                try:
                    data = transformer.feed(chunk)
                except Exception:  # an adapter bug or an answer it cannot read: end cleanly
                    log.exception("%s could not process the upstream response", provider.name)
                    problem = "the upstream response could not be processed"
                    break
                if data:  # whole events only: those before a huge one still go out
                    await out.send(data)
                # The transformer holds at most one chunk past the cap before this ends it.
                if held and transformer.buffered > self.max_event:
                    problem = f"the upstream sent an event larger than {settings.max_event_mb} MB"
                    oversized = True
                    break
            try:
                tail = transformer.close() if not oversized else b""  # never half a huge event
            except Exception:
                log.exception("%s could not process the upstream response", provider.name)
                tail, problem = b"", problem or "the upstream response could not be processed"
            if tail:
                await out.send(tail)
            outcome.usage = transformer.usage
            if problem is None and not transformer.terminal and resp.status < 400:
                problem = "upstream stream ended without its final event"
            if problem is not None and (resp.status < 400 or oversized):
                outcome.incomplete = True
                log.warning(
                    "%s stream incomplete (account %s, model %s): %s",
                    provider.name,
                    account.label,
                    outcome.model,
                    problem,
                )
                if transformer.is_sse:
                    await out.send(transformer.error_event(f"Kleis: {problem}"))
                else:  # a JSON body has no error event: break the connection so the cut shows
                    request.transport.abort()
                    return None
            await out.eof()
        except asyncio.CancelledError:
            outcome.cancelled = True
            outcome.usage = transformer.usage
            raise
        finally:
            self.open_streams -= 1
            self._reading.discard(resp.content)
            if self.draining:  # no keep-alive while shutting down: the connection closes now
                with contextlib.suppress(AttributeError):
                    request.stream.keep_alive = False
            resp.close()  # closes the upstream connection at once if the body was not finished
        return None  # already sent via request.respond(); returning it makes Sanic log an error

    async def _collected(
        self,
        provider: LoadedProvider,
        resp: aiohttp.ClientResponse,
        transformer,
        outcome: Outcome,
        started: float,
    ) -> tuple[int, dict[str, str], bytes]:
        """A transformer with `collect = True` sees the whole upstream body before the client
        gets a status line, so it can answer with the status the body implies (an error event
        inside a 200 stream becomes a 4xx/5xx). A cut or silent upstream is a 502/504 here,
        not a broken connection: nothing was sent yet. Returns (status, headers, body)."""
        headers = relay_headers(resp.headers, transformer.is_sse)
        headers["x-kleis-provider"] = provider.name
        loop = asyncio.get_running_loop()
        settings = self.settings
        deadline = started + settings.response_timeout
        content = resp.content
        problem: KleisError | None = None
        size = 0
        self._reading.add(content)
        if self.drained:
            content.set_exception(Drained())
        try:
            while True:
                try:
                    chunk = content.read_nowait()  # buffered bytes: no timer to arm
                    if not chunk and not content.at_eof():
                        wait = min(settings.idle_timeout, deadline - loop.time())
                        if wait <= 0:
                            raise TimeoutError
                        async with asyncio.timeout(wait):
                            chunk = await content.readany()
                except TimeoutError:
                    problem = UpstreamTimeout(
                        f"{provider.name}: upstream sent nothing for {settings.idle_timeout:g} s"
                        if loop.time() < deadline
                        else f"{provider.name}: the response took longer than {settings.response_timeout:g} s"
                    )
                    break
                except (aiohttp.ClientError, ConnectionError) as exc:
                    problem = UpstreamUnavailable(
                        f"{provider.name}: upstream connection broke off ({type(exc).__name__})"
                    )
                    break
                except Drained:
                    problem = ShuttingDown("Kleis is shutting down; retry", 1)
                    break
                if not chunk:
                    break
                size += len(chunk)
                if size > self.max_event:  # the whole answer is held: bounded like one event
                    problem = UpstreamUnavailable(
                        f"{provider.name}: the upstream answer is larger than {settings.max_event_mb} MB"
                    )
                    break
                transformer.feed(chunk)
            body = transformer.close() if size <= self.max_event else b""  # never parse a huge one
        except asyncio.CancelledError:
            outcome.cancelled = True
            raise
        except Exception:  # an adapter bug or an answer it cannot read
            log.exception("%s could not process the upstream response", provider.name)
            raise TransformFailed(f"{provider.name}: the upstream response could not be processed") from None
        finally:
            outcome.usage = transformer.usage
            self._reading.discard(content)
            resp.close()
        if problem is None and not transformer.terminal and resp.status < 400:
            problem = UpstreamUnavailable(f"{provider.name}: upstream stream ended without its final event")
        if problem is not None:
            outcome.incomplete = True
            log.warning("%s response incomplete (model %s): %s", provider.name, outcome.model, problem)
            raise problem
        status = getattr(transformer, "status", None) or resp.status
        outcome.status, outcome.source = status, "upstream"
        outcome.ttfb_ms = int((loop.time() - started) * 1000)
        content_type = getattr(transformer, "content_type", None)
        if content_type:  # a reshaped body: the stream's own headers no longer describe it
            reshaped = ("content-type", "cache-control", "x-accel-buffering")
            headers = {k: v for k, v in headers.items() if k.lower() not in reshaped}
            headers["content-type"] = content_type
        return status, headers, body


# ══ Discovery ═══════════════════════════════════════════════════════════════
# /api.json for OpenCode and the SDK model lists; composition lives in discovery.py.


def external_base(request: Request, settings: ServerSettings) -> str:
    """The base URL clients use: [server] public_url, else the request's own origin."""
    if settings.public_url:
        return settings.public_url.rstrip("/")
    scheme, host = request.scheme, request.host
    if settings.trust_forwarded:
        proto = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
        scheme = proto if proto in ("http", "https") else scheme
        host = request.headers.get("x-forwarded-host", "").split(",")[0].strip() or host
    return f"{scheme}://{host}"


def key_scopes(key: KeyRecord | None, pool: AccountPool) -> discovery.Scopes | None:
    if key is None:
        return None
    account_providers = None
    if key.account_scopes is not None:
        account_providers = frozenset(
            pool.accounts[a].provider for a in key.account_scopes if a in pool.accounts
        )
    return discovery.Scopes(
        providers=frozenset(key.provider_scopes) if key.provider_scopes is not None else None,
        models=key.model_scopes,
        account_providers=account_providers,
        accounts=frozenset(key.account_scopes) if key.account_scopes is not None else None,
    )


class Registry:
    """The models.dev registry as each key sees it, for /api.json and the SDK model lists."""

    def __init__(
        self,
        catalogue: discovery.Catalogue,
        providers: Mapping[str, LoadedProvider],
        pool: AccountPool,
        settings: ServerSettings,
        models: discovery.AccountModels,
    ):
        self.catalogue, self.providers, self.pool, self.settings = catalogue, providers, pool, settings
        self.models = models

    def live(self, key: KeyRecord | None) -> discovery.LiveView:
        """The model lists of the accounts `key` may use (all enabled accounts without a key)."""
        scoped = key.account_scopes if key is not None else None
        return self.models.view(
            {
                name: [
                    a.id
                    for a in self.pool.by_provider.get(name, ())
                    if a.enabled and (scoped is None or a.id in scoped)
                ]
                for name in self.providers
            }
        )

    def routes(self) -> list[discovery.Route]:
        configured = self.pool.configured()
        return [
            discovery.Route.from_module(name, p.module, p.options)
            for name, p in self.providers.items()
            if name in configured
        ]

    def build(self, request: Request, key: KeyRecord | None) -> dict:
        base = external_base(request, self.settings)
        return self.catalogue.registry(self.routes(), base, key_scopes(key, self.pool), self.live(key))

    def response(self, request: Request, key: KeyRecord | None):
        """api.json from the memoised JSON (a rebuild + dump costs ~2 ms of CPU on a public route)."""
        base = external_base(request, self.settings)
        body = self.catalogue.registry_json(self.routes(), base, key_scopes(key, self.pool), self.live(key))
        return sanic_response.raw(
            body, content_type="application/json", headers={"cache-control": "no-store"}
        )


# ══ Instance ════════════════════════════════════════════════════════════════
# One Kleis: its store, caches, background tasks and HTTP session. Two instances in one
# process share nothing.


class Instance:
    """Every part of one Kleis instance, built without I/O; `open()` connects and loads,
    `start()` runs the background loops, `stop()` ends them and drains usage, `close()`
    releases the database and the HTTP session."""

    def __init__(self, settings: Settings, clock: Clock | None = None):
        self.settings = settings
        self.clock = clock = clock or Clock()
        self.providers = load_providers(settings)
        self.background = Background(log, expected=database_failure)
        url = database_url(settings)
        sec = settings.security
        self.store = Store(
            url, Vault(sec.secret_key, sec.previous_secret_keys), clock, settings.database.pool_size
        )
        self.keys = Keys(self.store, clock)
        self.pool = AccountPool(self.store, self.providers, clock, self.background)
        self.logins = Logins(self.store, self.pool, clock, self.background)
        self.usage = UsageQueue(self.store, clock, settings.usage.flush_interval)
        self.metrics = Metrics()
        sec = settings.security
        self.admin_lockout = Lockout(
            sec.admin_max_failures, sec.admin_lockout_seconds, clock.now, what="wrong admin tokens"
        )
        self.proxy = Proxy(
            settings.server,
            self.keys,
            self.pool,
            self.usage,
            self.metrics,
            Lockout(sec.key_max_failures, sec.key_lockout_seconds, clock.now, what="wrong API keys"),
            clock,
        )
        cache_dir = (
            settings.resolve(".")
            if not url.startswith("sqlite:///")
            else Path(url[len("sqlite:///") :]).parent
        )
        self.catalogue = discovery.Catalogue(
            snapshot_path=discovery.SNAPSHOT_PATH,
            cache_path=cache_dir / "models-cache.json",
            source_url=settings.models.source_url,
            refresh_hours=settings.models.refresh_hours,
            log=logging.getLogger("kleis.models"),
            now=lambda: clock.now() / 1000,
        )
        self.models = discovery.AccountModels(int(settings.models.account_refresh_hours * 3_600_000))
        self.registry = Registry(self.catalogue, self.providers, self.pool, settings.server, self.models)
        self.http: aiohttp.ClientSession | None = None
        self.versions: dict[str, int] = {}
        self.model_lists_lock = asyncio.Lock()
        self.instance_id = new_id()
        self.versions_lock = asyncio.Lock()
        self.changes = asyncio.Event()  # set by the PostgreSQL listener: poll the versions now
        self.listening = False
        self.poll_failing = False
        self.opened = False

    async def open(self) -> None:
        """Connect, apply the schema, load the caches, import [[accounts]]. Idempotent."""
        if self.opened:
            return
        self.opened = True
        await self.store.open()
        try:
            await check_secret_key(self.store, self.clock.now(), self.instance_id)
        except BaseException:
            await self.store.close()
            self.opened = False
            raise
        self.http = aiohttp.ClientSession(
            auto_decompress=True,
            trust_env=False,
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            headers={"User-Agent": f"kleis/{VERSION}"},
            skip_auto_headers=["User-Agent"],
        )
        self.proxy.http = self.http
        for provider in self.providers.values():
            provider.ctx = Context(
                http=self.http,
                options=provider.options,
                now=self.clock.now,
                log=logging.getLogger(f"kleis.{provider.name}"),
            )
        self.versions = await self.store.read_versions()
        await self.keys.load()
        await self.pool.load()
        await import_config(self.pool, self.settings.accounts, self.settings.resolve)

    def start(self) -> None:
        """The instance's loops; each ends when `stop()` is called."""
        b = self.background
        b.every("usage-flusher", self.usage.interval, self.usage.tick)
        b.every("token-refresher", 60, self.pool.refresh_due)
        b.start("cache-invalidation", self.watch_changes(), service=True)
        if self.settings.database.listen and not self.store.is_sqlite:
            b.start(
                "change-listener",
                self.store.listen(self.changes.set, self.pool.heard_sessions, self._listener_up),
                wait_on_stop=False,
                service=True,
            )
        b.every("heartbeat", INSTANCE_HEARTBEAT_S, self.announce)
        b.start("purge-first", self.purge())  # an instance restarted hourly still purges
        b.every("purge", 3600, self.purge)
        b.start("models-refresher", self.catalogue.run(self.http, b.stopping), service=True)
        if self.settings.models.account_lists:
            b.start("model-lists-first", self.refresh_model_lists())
            b.every("model-lists", 15, self.refresh_model_lists)

    async def refresh_model_lists(self, only: str | None = None, force: bool = False) -> None:
        """Ask each enabled account's provider which models it offers, where due (or `only`
        that account, `force`d). Failures are logged in one line and keep the last list."""
        async with self.model_lists_lock:  # one pass at a time: a second finds nothing due
            await self._refresh_model_lists(only, force)

    async def _refresh_model_lists(self, only: str | None, force: bool) -> None:
        now = self.clock.now()
        self.models.keep_only(self.pool.accounts)
        for account in list(self.pool.accounts.values()):
            provider = self.providers.get(account.provider)
            if (
                (only is not None and account.id != only)
                or provider is None
                or not provider.has("list_models")
                or not account.enabled
                or not (force or self.models.due(account.id, now))
            ):
                continue
            if account.status == "needs_reauth":  # said, so `?refresh=1` never looks like it worked
                self.models.failed(account.id, "the account needs a new login", now)
                continue
            try:
                async with asyncio.timeout(30):
                    fresh = await self.pool.fresh(account)
                    models = await provider.module.list_models(provider.ctx, fresh.adapter_view())
            except Exception as exc:  # ProviderError, network errors, timeouts: keep the last list
                reason = str(exc) if isinstance(exc, ProviderError) else type(exc).__name__
                self.models.failed(account.id, reason or type(exc).__name__, self.clock.now())
                log.warning(
                    "%s account %s: model list unavailable (%s)", account.provider, account.label, reason
                )
                continue
            self.models.put(account.id, list(models), self.clock.now())
            if self.models.lists[account.id].error is None:
                log.info("%s account %s offers %d models", account.provider, account.label, len(models))
            else:
                log.warning(
                    "%s account %s: the provider listed no usable models", account.provider, account.label
                )

    def _listener_up(self, up: bool) -> None:
        if up != self.listening:
            log.info("database change listener %s", "connected" if up else "down; polling for changes")
        self.listening = up

    async def watch_changes(self) -> None:
        """Reload what other instances changed: at once when the PostgreSQL listener hears of
        it, else every `[database] poll_interval` (and every second while listening, in case
        a notification was missed). Measured between two processes (tests/test_instances.py):
        a change is seen in ~10 ms listening, in up to poll_interval plus a reload polling."""
        stopping = self.background.stopping
        while not stopping.is_set():
            interval = 1.0 if self.listening else self.settings.database.poll_interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changes.wait(), interval)
            if stopping.is_set():
                return
            self.changes.clear()
            try:
                async with asyncio.timeout(5):  # not the pool's 30 s wait while the database is away
                    await self.poll_versions()
            except Exception as exc:  # the database is away: the caches stay as they are
                if not self.poll_failing:
                    reason = str(exc)[:200] or type(exc).__name__
                    log.warning("cannot read changes from the database (%s); serving from cache", reason)
                self.poll_failing = True
                continue
            if self.poll_failing:
                log.info("reading changes from the database again")
            self.poll_failing = False

    async def poll_versions(self, fresh: bool = False) -> None:
        """Reload caches another instance (or the CLI) changed (`watch_changes`), and at once
        on `POST /admin/reload` (the CLI asks after a change)."""
        # One pass at a time: an older pass finishing after a newer one would install a stale list.
        async with self.versions_lock:
            versions = await self.store.read_versions(fresh)
            if versions.get("keys") != self.versions.get("keys"):
                await self.keys.load()
            if versions.get("accounts") != self.versions.get("accounts"):
                await self.pool.load()
                if self.settings.models.account_lists:  # a new account's models, without waiting
                    self.background.start("model-lists-changed", self.refresh_model_lists())
            self.versions = versions

    async def purge(self) -> dict[str, int]:
        """The purge loop's job: usage buckets older than `[usage] retention_days` (0 keeps
        them), logins that expired a day ago, usage writers idle for 7 days (a batch retried
        after that long could be counted twice). Returns the rows deleted per table."""
        now, days = self.clock.now(), self.settings.usage.retention_days
        deleted = await self.store.purge(
            now - days * 86_400_000 if days > 0 else None, now - 86_400_000, now - 7 * 86_400_000
        )
        if any(deleted.values()):
            log.info("purged %s", ", ".join(f"{n} {table}" for table, n in deleted.items() if n))
        return deleted

    async def announce(self) -> None:
        """Tell `rotate-secret` this server runs and which secret keys it can open (at start,
        then every INSTANCE_HEARTBEAT_S)."""
        await self.store.announce_instance(
            self.instance_id, socket.gethostname(), os.getpid(), self.store.vault.key_ids
        )

    async def stop(self) -> None:
        """End the loops politely (before Sanic cancels tasks), then drain usage."""
        if self.opened:
            self.background.stopping.set()
            self.changes.set()  # wake the change watcher so it sees `stopping`
            await self.background.stop()
            await self.usage.flush()
            with contextlib.suppress(Exception):  # a stale row is ignored after 90 s anyway
                await self.store.retire_instance(self.instance_id)

    async def close(self) -> None:
        if not self.opened:
            return
        # Streams Sanic aborted at the end of its grace are cancelled now; let them record
        # their usage (bounded) before the last flush.
        for _ in range(200):  # 2 s at most
            if not self.proxy.open_streams:
                break
            await asyncio.sleep(0.01)
        await self.usage.flush()
        await self.background.drain()
        if self.http is not None:
            await self.http.close()
        await self.store.close()
        self.opened = False


@contextlib.asynccontextmanager
async def opened(settings: Settings) -> AsyncIterator[Instance]:
    """An open instance without a server (the CLI's)."""
    instance = Instance(settings)
    await instance.open()
    try:
        yield instance
    finally:
        await instance.stop()
        await instance.close()


# ══ App ═════════════════════════════════════════════════════════════════════


def error_style_for(providers_: Mapping[str, LoadedProvider], path: str) -> str:
    for provider in providers_.values():
        if path.startswith(provider.module.BASE_PATH + "/") or path == provider.module.BASE_PATH:
            return provider.error_style
    return "admin"


TOKEN_LIKE = re.compile(r"[A-Za-z0-9_\-]{24,}")


HEAD_LIMIT = 8192  # Sanic's REQUEST_MAX_HEADER_SIZE: the request line and headers together


def request_line(request: Request) -> bytes:
    """The raw request line of a request whose head Sanic refused before parsing it (its
    `request.path` is then `*`): the start of the connection's receive buffer."""
    buf = getattr(getattr(request, "stream", None), "recv_buffer", None) or b""
    end = buf.find(b"\r\n", 0, HEAD_LIMIT + 2)
    return bytes(buf[: end if end >= 0 else HEAD_LIMIT])


def error_path(request: Request) -> str:
    """The path whose envelope an error takes: the request's, or for a head too large to
    parse, the target read from its raw request line."""
    if request.method != "NONE":
        return request.path
    parts = request_line(request).split(b" ")
    return parts[1].split(b"?")[0].decode("latin-1") if len(parts) > 1 else request.path


def as_kleis_error(exc: Exception, request: Request, max_body_mb: int) -> KleisError:
    """Any exception as the catalogue's error (an unexpected one is logged and a 500)."""
    if isinstance(exc, KleisError):
        return exc
    if isinstance(exc, ProviderError):
        return from_provider(exc)
    if isinstance(exc, SanicException):
        status = getattr(exc, "status_code", 500) or 500
        if status == 404:
            # What clients try that Kleis does not serve, for the operator (token-like
            # path segments masked: a mistyped scoped models URL carries its token).
            path = TOKEN_LIKE.sub("…", request.path[:300])
            log.info("no route for %s %s", request.method, path)
            return NotFound(f"no route for {request.method} {path}")
        if status == 405:
            return MethodNotAllowed(f"{request.method} is not allowed here")
        if status == 413 and request.method == "NONE":  # Sanic gave up before parsing the head
            line = request_line(request)
            if len(line) >= HEAD_LIMIT:
                return UriTooLong(f"the request line is longer than {HEAD_LIMIT // 1024} KB; shorten the URL")
            return HeadersTooLarge(
                f"the request headers are larger than {HEAD_LIMIT // 1024} KB in all; send fewer or shorter"
            )
        if status == 413:
            return RequestTooLarge(f"the request body is larger than {max_body_mb} MB ([server] max_body_mb)")
        error = KleisError(str(exc) if status < 500 else None)
        error.status, error.code = status, "error"  # Sanic's own refusal, relayed as it is
        return error
    if isinstance(exc, ConfigError):
        return ConfigProblem(str(exc))
    if database_failure(exc):  # read-only after a failover, restarting, unreachable
        cause = (str(exc).strip().splitlines() or [""])[0][:200]
        log.error("database error on %s %s: %s: %s", request.method, request.path, type(exc).__name__, cause)
        return StoreUnavailable("the database did not accept this operation; retry in a few seconds", 5)
    log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
    return KleisError()


def create_app(
    settings: Settings, instance: Instance | None = None, name: str = "kleis", clock: Clock | None = None
) -> Sanic:
    """The Sanic app with its one route table. With `instance` given the caller owns its
    lifecycle; otherwise one is built (with `clock`, default the real one) and opened,
    started, stopped and closed by the app's listeners."""
    app = Sanic(name, configure_logging=False)
    app.config.REQUEST_MAX_SIZE = settings.server.max_body_mb * 1024 * 1024
    app.config.REQUEST_MAX_HEADER_SIZE = HEAD_LIMIT
    app.config.RESPONSE_TIMEOUT = settings.server.response_timeout + 60  # our own deadline comes first
    app.config.KEEP_ALIVE_TIMEOUT = 75
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = settings.server.drain_seconds + 5  # after our own drain
    app.ctx.max_connections = 0  # set by serve() from the open-files limit (0 = no cap)
    app.ctx.refusing = 0  # connections past the cap waiting for their 503 (KleisProtocol)
    app.config.ACCESS_LOG = False
    app.config.NOISY_EXCEPTIONS = False
    app.config.AUTO_EXTEND = False  # sanic-ext stays off: no OpenAPI docs, no permissive CORS
    owned = instance is None
    kleis = instance or Instance(settings, clock)
    app.ctx.kleis = kleis
    proxy, registry = kleis.proxy, kleis.registry
    auth = admin.AdminAuth(
        settings.admin.token,
        kleis.admin_lockout,
        settings.server.trust_forwarded,
        settings.server.trusted_proxies,
    )

    if owned:

        @app.before_server_start
        async def start(app, _loop=None):
            await kleis.open()
            await kleis.announce()
            kleis.start()

        @app.before_server_stop
        async def stop(app, _loop=None):
            # Sanic closes the listener after this, then waits GRACEFUL_SHUTDOWN_TIMEOUT for
            # open connections: streams end themselves at the drain, idle ones close here.
            proxy.drain(settings.server.drain_seconds)
            app.ctx.closing = asyncio.get_running_loop().create_task(
                close_idle_connections(app, app.config.GRACEFUL_SHUTDOWN_TIMEOUT)
            )
            await kleis.stop()

        @app.after_server_stop
        async def close(app, _loop=None):
            await kleis.close()

    @app.exception(Exception)
    async def render_error(request: Request, exc: Exception):
        error = as_kleis_error(exc, request, settings.server.max_body_mb)
        body = error_body(error_style_for(kleis.providers, error_path(request)), error)
        return sanic_response.json(
            body, status=error.status, headers={**error.headers, "cache-control": "no-store"}
        )

    # ── public routes ──
    async def index(request):
        return sanic_response.json(
            {
                "service": "kleis",
                "version": VERSION,
                "providers": sorted(kleis.providers),
                "configured": sorted(kleis.pool.configured()),
            }
        )

    async def healthz(request):
        return sanic_response.json({"ok": True})

    async def readyz(request):
        # A write, not only a read: a read-only database answers SELECT but loses usage and
        # refreshed tokens. The exception's class only: its text may name paths or hosts.
        try:
            async with asyncio.timeout(2):  # a balancer's probe gives up after a few seconds
                await kleis.store.check_writable()
        except Exception as exc:
            log.error("readiness: the database does not accept writes (%s)", str(exc)[:200])
            return sanic_response.json({"ok": False, "database": type(exc).__name__}, status=503)
        return sanic_response.json({"ok": True, "database": "ok"})

    async def metrics(request):
        auth.check(request, token=settings.server.metrics_token)
        now = kleis.clock.now()
        accounts: dict[tuple[str, str], int] = {}
        for account in kleis.pool.accounts.values():
            status = (account.provider, account.view_status(now))
            accounts[status] = accounts.get(status, 0) + 1
        text = kleis.metrics.render(
            open_streams=proxy.open_streams,
            refresh_outcomes=kleis.pool.refresh_outcomes,
            queue=kleis.usage,
            now=now,
            accounts=accounts,
        )
        return sanic_response.text(text, content_type="text/plain; version=0.0.4")

    async def api_json(request):
        if request.args.get("refresh") in ("1", "true"):
            await kleis.catalogue.fetch(kleis.http, force=True)
        return registry.response(request, None)

    async def scoped_api_json(request, token: str):
        record = kleis.keys.by_discovery_token(token) if re.fullmatch(r"[A-Za-z0-9_]{1,120}", token) else None
        if record is None:
            raise NotFound("scoped models URL was not found")
        if request.args.get("refresh") in ("1", "true"):
            await kleis.catalogue.fetch(kleis.http, force=True)
        return registry.response(request, record)

    def proxy_route(provider: LoadedProvider, endpoint: str):
        async def handler(request):
            return await proxy.handle(request, provider, endpoint)

        return handler

    def models_route(provider: LoadedProvider):
        route = discovery.Route.from_module(provider.name, provider.module, provider.options)

        async def handler(request):
            reg = registry.build(request, proxy.authenticate(request))
            if provider.error_style != "anthropic":
                return sanic_response.json(discovery.openai_model_list(reg, route))
            args = request.args
            try:
                limit = int(args.get("limit", discovery.ANTHROPIC_PAGE_DEFAULT))
                page = discovery.anthropic_model_list(
                    reg, route, limit, args.get("after_id"), args.get("before_id")
                )
            except ValueError as exc:  # PageError, or a limit that is not a number
                raise BadRequest(
                    str(exc) if isinstance(exc, discovery.PageError) else "limit: must be a whole number"
                ) from None
            return sanic_response.json(page)

        async def one(request, model_id: str):
            # The SDKs percent-encode the id ("anthropic%2Fclaude-…"), and /api.json hands out
            # prefixed ids the proxy routes accept: both name the same model here.
            model_id = discovery.strip_prefix(unquote(model_id), route.prefixes)
            reg = registry.build(request, proxy.authenticate(request))
            if provider.error_style == "anthropic":
                model = discovery.anthropic_model(reg, route, model_id)
            else:
                model = discovery.openai_model(reg, route, model_id)
            if model is None:
                raise ModelNotFound(f"the model {model_id[:120]!r} does not exist on {route.base_path}")
            return sanic_response.json(model)

        return handler, one

    # ── the admin page: static/ (no build step), strict CSP, revalidated on every load ──
    page_headers = {
        "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self';"
        " img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'self'; form-action 'none';"
        " frame-ancestors 'none'",
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "x-frame-options": "DENY",
        "cache-control": "no-cache",
    }
    page_types = {"html": "text/html", "js": "text/javascript", "css": "text/css", "svg": "image/svg+xml"}

    async def admin_page(request, name: str = "index.html"):
        match = re.fullmatch(r"[a-z0-9_-]{1,40}\.(html|js|css|svg)", name)
        path = HERE / "static" / name
        if match is None or not path.is_file():
            raise NotFound(f"no route for GET {request.path[:300]}")
        body = path.read_bytes()  # small files, read each time: a new version shows at once
        headers = {**page_headers, "etag": f'"{zlib.crc32(body):08x}-{len(body):x}"'}
        if request.headers.get("if-none-match") == headers["etag"]:
            return sanic_response.empty(status=304, headers=headers)
        kind = page_types[match.group(1)]
        return sanic_response.raw(body, content_type=f"{kind}; charset=utf-8", headers=headers)

    # ── the route table ──
    routes = [
        ("GET", "/", index, "index"),
        ("GET", "/admin/", admin_page, "admin_page"),
        ("GET", "/admin/index.html", admin_page, "admin_page_index"),
        ("GET", "/admin/static/<name>", admin_page, "admin_page_static"),
        ("GET", "/healthz", healthz, "healthz"),
        ("GET", "/readyz", readyz, "readyz"),
        ("GET", "/metrics", metrics, "metrics"),
        ("GET", "/api.json", api_json, "api_json"),
        ("GET", "/api/<token>/api.json", scoped_api_json, "scoped_api_json"),
    ]
    for pname, provider in kleis.providers.items():
        for path, endpoint in provider.module.ROUTES.items():
            routes.append(("POST", path, proxy_route(provider, endpoint), f"proxy_{pname}_{endpoint}"))
        listed, one = models_route(provider)
        routes.append(("GET", f"{provider.module.BASE_PATH}/models", listed, f"models_{pname}"))
        routes.append(("GET", f"{provider.module.BASE_PATH}/models/<model_id:path>", one, f"model_{pname}"))
    for method, path, handler, route_name in routes:
        # HEAD wherever GET works (RFC 9110 §9.3.2): uptime monitors and `curl -I` use it.
        methods = [method, "HEAD"] if method == "GET" else [method]
        app.add_route(handler, path, methods=methods, name=route_name)
    admin_api = admin.AdminApi(
        keys=kleis.keys,
        pool=kleis.pool,
        logins=kleis.logins,
        usage=kleis.usage,
        store=kleis.store,
        providers=kleis.providers,
        clock=kleis.clock,
        base_url=lambda request: external_base(request, settings.server),
        models=kleis.models,
        refresh_models=kleis.refresh_model_lists,
        device_wait=settings.admin.device_wait_seconds,
        reload=functools.partial(kleis.poll_versions, fresh=True),
    )
    app.blueprint(admin.blueprint(admin_api, auth))
    return app


# ══ Serving and main ════════════════════════════════════════════════════════


REFUSING_MAX = 32  # refused connections waiting to read their request before their 503


class KleisProtocol(HttpProtocol):
    """Sanic's HTTP/1.1 protocol with a cap on client connections (`app.ctx.max_connections`,
    0 = none), so idle or slow clients cannot take the file descriptors upstream connections
    need: past the cap an idle keep-alive connection is closed to make room, else the new
    one is answered 503 with Retry-After (admin envelope: no request was read) and closed."""

    __slots__ = ("refused",)  # Sanic's protocol classes have slots: no instance dict
    REFUSAL = b'{"error":"too_many_connections","message":"Kleis has too many open connections; retry"}'

    def connection_made(self, transport):
        self.refused: bool | bytearray | str = False
        ctx = self.app.ctx
        cap = ctx.max_connections
        conns = self.connections
        crowd = len(conns) if cap else 0  # a closed connection leaves the set a bit later
        if cap and crowd >= cap:
            # Only connections idle for a while: a new one that has not sent its request yet
            # is idle too, and closing it would fail a client that did nothing wrong.
            now = time.monotonic()  # Sanic's clock for `_time`, a connection's last activity
            for conn in list(conns):
                http = conn.http
                if http is not None and http.stage is Stage.IDLE and now - conn._time >= 1:
                    conn.close()
                    crowd -= 1
                    if crowd < cap:
                        break
        if cap and crowd >= cap:
            if ctx.refusing >= REFUSING_MAX:  # a flood: every waiting refusal holds a descriptor
                self.refused = "aborted"
                transport.abort()
                return
            # Answered once the request starts to arrive, closed 2 s later: the client reads
            # the 503 (closing at once, with its request unread, would reset the connection).
            self.refused, self.transport = True, transport
            ctx.refusing += 1
            self.loop.call_later(2, transport.close)
            return
        super().connection_made(transport)
        ctx.connections = conns  # for the shutdown drain (close_idle_connections)

    def data_received(self, data: bytes):
        if not self.refused:
            super().data_received(data)
            return
        # A refused connection: read the request (head and a small body) before answering, so
        # a client still writing it sees the 503, not a failed write.
        if self.refused is True:
            self.refused = bytearray()
        if not isinstance(self.refused, bytearray):
            return  # answered: the rest is discarded
        seen = self.refused
        seen += data[: 65536 - len(seen)]
        end = seen.find(b"\r\n\r\n")
        if end < 0 and len(seen) < 65536:
            return
        length = re.search(rb"(?im)^content-length:[ \t]*(\d{1,6})[ \t]*\r?$", bytes(seen[:end]))
        if end >= 0 and length and len(seen) < min(end + 4 + int(length[1]), 65536):
            return
        self.refused = "answered"
        self.transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(self.REFUSAL), self.REFUSAL)
        )

    def connection_lost(self, exc):
        if not self.refused:
            super().connection_lost(exc)
        elif self.refused != "aborted":
            self.app.ctx.refusing -= 1


async def close_idle_connections(app: Sanic, seconds: float) -> None:
    """While shutting down (at most `seconds`): close client connections as they become idle.
    Sanic closes the idle ones once; a keep-alive connection whose answer ends during the
    drain would otherwise hold the shutdown until GRACEFUL_SHUTDOWN_TIMEOUT."""
    conns = getattr(app.ctx, "connections", None)
    deadline = asyncio.get_running_loop().time() + seconds
    while conns and asyncio.get_running_loop().time() < deadline:
        for conn in list(conns):
            conn.close_if_idle()
        await asyncio.sleep(0.1)


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit where allowed (every stream holds two
    descriptors: the client's and the upstream's). Returns (soft, hard) as they are now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server socket, with TCP_NODELAY (inherited by every accepted connection): Sanic
    writes a response's head and body separately, and Nagle's algorithm would hold the body
    back until the client's delayed ACK, about 40 ms per request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def database_url(settings: Settings) -> str:
    """[database] url with a relative SQLite path made absolute (beside the config file)."""
    url = settings.database.url
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        url = f"sqlite:///{settings.resolve(url[len('sqlite:///') :])}"
    return url


async def check_secret_key(store: Store, now: int, me: str | None = None) -> None:
    """Refuse to run (ConfigError, exit 2) with a `[security] secret_key` that cannot open
    the tokens in the database, or that differs from a running instance's sealing key (`me`:
    this instance's id, not compared with itself): such an instance would answer every client
    `no_account` while looking healthy, and accounts it imported would be invisible to the
    others."""
    hint = (
        "every instance and CLI sharing a database needs the same [security] secret_key "
        "(during a rotation, the old one in previous_secret_keys; see `rotate-secret`)"
    )
    unreadable = await store.unreadable_accounts()
    if unreadable:
        raise ConfigError(
            f"[security] secret_key: {unreadable} account(s) in the database are sealed with "
            f"another secret key; {hint}"
        )
    mine = store.vault.key_ids
    for other in await store.live_instances(now - INSTANCE_LIVE_MS):
        if other["id"] != me and other["key_ids"][0] not in mine:
            raise ConfigError(
                f"[security] secret_key: the Kleis running on {other['host']} (pid {other['pid']}) "
                f"seals tokens with key {other['key_ids'][0]}, this config has {', '.join(mine)}; {hint}"
            )


async def check_database(settings: Settings) -> None:
    """Before serving: the database opens (schema applied) and takes a write. Raises
    DatabaseUnavailable, one line (a missing folder, a read-only file, a refused login), so
    start-up fails with exit 2 instead of a server that loses usage and refreshed tokens."""
    url = database_url(settings)
    sec = settings.security
    store = Store(url, Vault(sec.secret_key, sec.previous_secret_keys))
    await store.open()
    try:
        await store.check_writable()
        await check_secret_key(store, store.clock.now())
    except ConfigError:
        raise
    except Exception as exc:
        raise database_problem(url, exc, "write to") from None
    finally:
        await store.close()


def serve(settings: Settings, host: str, port: int, config: Path) -> None:
    """Run the server in this process until SIGINT/SIGTERM."""
    asyncio.run(check_database(settings))
    app = create_app(settings)
    log.info("Kleis %s on http://%s:%d (config %s)", VERSION, host, port, config)
    url, note = cli.client_url(settings.server, config, host, port)
    log.info("clients use %s%s", url, f" ({note})" if note else "")
    with contextlib.suppress(ValueError, OSError):  # stderr may be no real file (embedding)
        faulthandler.enable()  # a crash in a C extension still leaves a Python traceback
    try:
        sock = listening_socket(host, port)
    except OSError as exc:
        raise cli.CliError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    soft, hard = raise_open_files_limit()
    # Half the descriptors left after the process's own for client connections: each stream
    # also holds an upstream one.
    app.ctx.max_connections = max((soft - 64) // 2, 16) if soft != resource.RLIM_INFINITY else 0
    log.info(
        "open files limit %s (hard %s): at most %s client connections",
        soft, "unlimited" if hard == resource.RLIM_INFINITY else hard, app.ctx.max_connections or "unlimited",
    )  # fmt: skip
    if soft != resource.RLIM_INFINITY and soft < 4096:
        log.warning("the open files limit is %d; raise it (LimitNOFILE, ulimit -n) for many streams", soft)

    @app.after_server_start
    async def settled(app, _loop=None):
        # Start-up parsed and dropped a lot (the models catalogue, migrations, the database
        # check): glibc keeps such freed memory mapped until asked to give it back.
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
            ctypes.CDLL("libc.so.6").malloc_trim(0)

    app.run(
        sock=sock, backlog=1024, single_process=True, access_log=False, motd=False, protocol=KleisProtocol
    )


def main(argv: list[str] | None = None) -> int:
    root = cli.Root(version=VERSION, script=HERE / "kleis.py", open=opened, serve=serve, check=load_providers)
    return cli.main(root, argv)


if __name__ == "__main__":
    sys.exit(main())
