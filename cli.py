"""Kleis command line: `python kleis.py [command]`. The only module that imports rich.

Exit codes: 0 ok, 1 a failure the user can fix (one line on stderr), 2 a usage or
configuration error. `--json` and `--config` are accepted before or after any command.

The composition root hands this module what it needs as a `Root` (how to open an instance,
how to serve, how to check providers), so the CLI never imports `kleis` and runs the same
operations the admin API runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

import analytics
from accounts import import_auth, read_auth_file
from errors import KleisError
from keys import key_fields, key_view
from providers import ProviderError
from settings import (
    ConfigError,
    ServerSettings,
    Settings,
    Vault,
    hash_key,
    load_settings,
    setup_logging,
    vault_key_id,
    write_new_config,
)
from store import INSTANCE_LIVE_MS

if TYPE_CHECKING:  # rich is imported when something is printed with it: ~1 MB that `serve` skips
    from rich.console import Console
    from rich.table import Table


class CliError(Exception):
    """A command failed in a way the user can fix; printed as one line, exit 1 (`code` is
    the `error` field of the --json error object, `extra` more fields of it)."""

    def __init__(self, message: str, code: str = "failed", **extra: Any):
        super().__init__(message)
        self.code, self.extra = code, extra


class UsageError(Exception):
    """The command line itself is wrong (argparse's complaint); exit 2."""

    def __init__(self, message: str, usage: str = ""):
        super().__init__(message)
        self.usage = usage


class Parser(argparse.ArgumentParser):
    """argparse, raising UsageError instead of printing and exiting, so that --json can
    answer a bad command line with a JSON error too."""

    def error(self, message: str):
        raise UsageError(message, self.format_usage())


@dataclass(frozen=True)
class Root:
    """What the composition root lends the CLI. `open` yields an opened instance (its
    `keys`, `pool`, `logins`, `store`, `providers`, `clock`) and closes it afterwards;
    `serve(settings, host, port, config_path)` runs the server until it stops;
    `check(settings)` loads the providers (raises ConfigError)."""

    version: str
    script: Path
    open: Callable[[Settings], contextlib.AbstractAsyncContextManager]
    serve: Callable[[Settings, str, int, Path], None]
    check: Callable[[Settings], Any]


SYSTEMD_UNIT = """# Kleis as a hardened system service: `systemd-analyze security kleis` rates it 1.2 OK
# (1.3 with the checkout in a home folder).
# Once, as root:  useradd --system --home-dir /var/lib/kleis --shell /usr/sbin/nologin kleis
# Run CLI commands as that user too (files it cannot read break the service), e.g.
#   sudo -u kleis {python} {script} --config {config} keys create
[Unit]
Description=Kleis OAuth account proxy
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User=kleis
Group=kleis
WorkingDirectory={data}
ExecStart={python} {script} serve --config {config}
Restart=on-failure
RestartSec=3
{data_access}
UMask=0077
LimitNOFILE=65536
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
{home_access}
PrivateTmp=yes
PrivateDevices=yes
PrivateUsers=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
ProcSubset=pid
RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
KeyringMode=private
DevicePolicy=closed
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""
HOME_DIRS = (Path("/home"), Path("/root"), Path("/run/user"))


def systemd_unit(script: Path, python: str, config: Path) -> str:
    """The hardened unit for this checkout, interpreter and config (absolute paths). The data
    folder (the config's) is the unit's StateDirectory when it lies in /var/lib, else a
    ReadWritePaths entry. The home folders stay hidden (ProtectHome); a checkout, interpreter
    or data folder inside one is bound back in, read-only except the data."""
    data = config.parent
    var_lib = Path("/var/lib")
    if data.is_relative_to(var_lib) and data != var_lib:
        data_access = f"StateDirectory={data.relative_to(var_lib)}\nStateDirectoryMode=0700"
    else:
        data_access = f"ReadWritePaths={data}"
    in_home = lambda p: any(p.is_relative_to(h) for h in HOME_DIRS)  # noqa: E731
    code = [p for p in dict.fromkeys((script.parent, Path(sys.base_prefix).resolve())) if in_home(p)]
    binds = [f"BindReadOnlyPaths={p}" for p in code] + ([f"BindPaths={data}"] if in_home(data) else [])
    home_access = "\n".join(["ProtectHome=tmpfs", *binds]) if binds else "ProtectHome=yes"
    return SYSTEMD_UNIT.format(
        python=python, script=script, config=config, data=data, data_access=data_access,
        home_access=home_access,
    )  # fmt: skip


def config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("KLEIS_CONFIG") or "config.toml").expanduser()


def new_console(stderr: bool = False) -> Console:
    """A rich console that never breaks a line of text with real newlines (pipes, logs and SSH
    windows kept them, and a wrapped URL or command no longer pastes); tables still fit."""
    from rich.console import Console

    return Console(stderr=stderr, soft_wrap=True)


def ensure_config(path: Path, as_json: bool) -> str | None:
    """Create the config file (0600, random secrets) if it is missing and print the admin
    token once; returns the token when the file was created, else None."""
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    token = write_new_config(path)
    if not as_json:
        console = new_console()
        console.print(
            f"[bold]Created {path}[/bold] (mode 0600) with a random secret key and SQLite database."
        )
        console.print("Admin token (shown once, also stored in the file):")
        print(token, flush=True)  # plain print: a token rich wrapped would not paste
    return token


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str), flush=True)


def paste(*lines: str) -> None:
    """Lines meant to be copied (keys, export lines, URLs): printed as they are, never wrapped
    or folded at the terminal's width the way rich prints, each on its own line."""
    for line in lines:
        print(line, flush=True)


def fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def table(*columns: str, keep: Iterable[str] = ("id",)) -> Table:
    """A compact table for 80 columns; the `keep` columns are never wrapped (ids are typed
    back into commands)."""
    from rich import box
    from rich.table import Table

    keep = set(keep)
    t = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False)
    for name in columns:
        t.add_column(name, no_wrap=name in keep)
    return t


def days_ms(days: float, flag: str) -> int:
    """A positive, finite number of days (at most 100 years) as milliseconds."""
    if not (0 < days <= 36_500):  # also false for NaN
        raise UsageError(f"{flag} must be a positive number of days (at most 36500 days)")
    return max(1, int(days * 86_400_000))


# ══ The address clients use ═════════════════════════════════════════════════

WILDCARD_HOSTS = ("0.0.0.0", "::", "", "*")


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def lan_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None
    without a route."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: only the route lookup matters
        address = s.getsockname()[0]
        if address and not address.startswith(("0.", "127.")):
            return address
    return None


def client_url(server: ServerSettings, config: Path, host: str | None = None, port: int | None = None):
    """(base URL, note) for what a laptop should use, without a trailing slash. `[server]
    public_url` when set (note ""); for a wildcard listen address this machine's LAN address
    (else its hostname), with a note to set public_url; for a loopback address the URL with a
    note that only this machine can use it and what to change. `host`/`port` override the
    config's (`serve --host/--port`)."""
    host = server.host if host is None else host
    port = port or server.port
    if server.public_url:
        return server.public_url.rstrip("/"), ""
    if host in WILDCARD_HOSTS:
        guess = lan_address() or socket.gethostname()
        return f"http://{url_host(guess)}:{port}", (
            f"Kleis listens on every interface and guessed this address. If laptops reach this "
            f'server by another name, set [server] public_url = "http://NAME:{port}" in {config}.'
        )
    if is_loopback(host):
        return f"http://{url_host(host)}:{port}", (
            f"Kleis listens on {host}: only this machine can use this URL. To serve laptops, set "
            f'[server] host = "0.0.0.0" and public_url = "http://<this server\'s name>:{port}" in '
            f"{config} and restart Kleis."
        )
    return f"http://{url_host(host)}:{port}", ""


# ══ Which key or account the user means ═════════════════════════════════════

MIN_PREFIX = 4  # shorter prefixes match too much to act on safely


def pick(ref: str, kind: str, candidates: Iterable[tuple[Any, dict[str, str | None]]]):
    """The one candidate `ref` names, and how: (record, "id" | "label" | …). A candidate is
    (record, {form: value}); "id" is exact or a unique prefix of at least MIN_PREFIX
    characters, forms ending in "prefix" match by prefix too, the others exactly. An exact id
    wins, then exact values, then prefixes. Raises CliError `not_found`, or `ambiguous` listing
    the candidates (`candidates`: [{"id", "label"}])."""
    ref = ref.strip().removesuffix("…").removesuffix("...")
    candidates = list(candidates)
    for record, forms in candidates:
        if forms.get("id") == ref:
            return record, "id"
    for exact in (True, False):
        found: dict[int, tuple[Any, str]] = {}
        for record, forms in candidates:
            for form, value in forms.items():
                if not value or not ref:
                    continue
                if exact and value == ref:
                    found.setdefault(id(record), (record, form))
                elif (
                    not exact
                    and (form == "id" or form.endswith("prefix"))
                    and len(ref) >= MIN_PREFIX
                    and value.startswith(ref)
                ):
                    found.setdefault(id(record), (record, f"{form} prefix" if form == "id" else form))
        if len(found) == 1:
            return next(iter(found.values()))
        if len(found) > 1:
            listed = [forms for record, forms in candidates if id(record) in found]
            names = ", ".join(f"{f['id'][:8]} ({f.get('label') or 'no label'})" for f in listed)
            raise CliError(
                f"{ref!r} matches {len(found)} {kind}s: {names}; give more of the id",
                "ambiguous",
                candidates=[{"id": f["id"], "label": f.get("label")} for f in listed],
            )
    hint = f" (a prefix needs at least {MIN_PREFIX} characters)" if len(ref) < MIN_PREFIX else ""
    raise CliError(
        f"no {kind} matches {ref!r}{hint}; give its id, a unique id prefix or its exact label "
        f"(see `kleis {kind}s list`)",
        "not_found",
    )


def find_key(kleis, ref: str, active_only: bool = False):
    """The key `ref` names: id, unique id prefix, its 12-character prefix (`kleis_…`), exact
    label, or the full key; among the unrevoked keys only with `active_only`. Returns
    (record, how it matched)."""
    by_hash = kleis.keys.by_hash.get(hash_key(ref.strip()))
    if by_hash is not None and not (active_only and by_hash.revoked_at is not None):
        return by_hash, "key"
    return pick(
        ref,
        "key",
        (
            (r, {"id": r.id, "label": r.label, "key prefix": r.key_prefix})
            for r in kleis.keys.newest_first()
            if not (active_only and r.revoked_at is not None)
        ),
    )


def find_account(kleis, ref: str):
    """The account `ref` names: id, unique id prefix or exact label. Returns (account, how)."""
    return pick(ref, "account", ((a, {"id": a.id, "label": a.label}) for a in kleis.pool.accounts.values()))


def matched(ref: str, how: str) -> dict:
    return {"ref": ref, "by": how}


def key_name(record) -> str:
    label = f" {record.label}" if record.label else ""
    return f"key{label} ({record.key_prefix}…, id {record.id[:8]})"


def account_name(account) -> str:
    return f"{account.provider} account {account.label} (id {account.id[:8]})"


# ══ Commands ════════════════════════════════════════════════════════════════
# Each takes the parsed arguments, the opened instance and the console.


async def keys_command(args, kleis, console: Console, settings: Settings) -> int:
    now = kleis.clock.now()
    base, note = client_url(settings.server, args.config_path)
    if args.keys_command == "create":
        accounts = [find_account(kleis, ref)[0] for ref in args.account or ()]
        body = {
            "label": args.label,
            "providerScopes": args.provider or None,
            "modelScopes": args.model or None,
            "accountScopes": [a.id for a in accounts] or None,
            "expiresAt": None
            if args.expires_days is None
            else now + days_ms(args.expires_days, "--expires-days"),
        }
        fields = key_fields(
            body,
            partial=False,
            providers=list(kleis.providers),
            account_providers=kleis.pool.provider_of(),
            now=now,
        )
        key, record = await kleis.keys.create(**fields)
        view = key_view(record, base, now, key=key)
        if args.json:
            print_json({**view, "baseUrl": base, "baseUrlNote": note or None})
            return 0
        for account in accounts:
            console.print(f"Limited to {account_name(account)}", markup=False, highlight=False)
        console.print(
            f"New {key_name(record)}, shown once (Kleis keeps only its SHA-256):",
            markup=False,
            highlight=False,
        )
        paste(key)
        console.print("\nOn the laptop (OpenCode; the models appear under the provider kleis):")
        paste(*view["opencode"]["snippet"].splitlines())
        console.print("\nSDK base URLs (Codex with the OpenAI SDK, Copilot, Claude):")
        paste(f"{base}/openai/v1", f"{base}/copilot/v1", f"{base}/anthropic")
        if note:
            console.print(f"\nNote: {note}", markup=False, highlight=False)
        return 0
    if args.keys_command == "list":
        records = kleis.keys.newest_first()
        if args.json:
            print_json([key_view(r, base, now) for r in records])
            return 0
        listing = table(
            "id", "prefix", "label", "status", "providers", "models", "expires", "created",
            keep=("id", "prefix", "status", "expires", "created"),
        )  # fmt: skip
        for r in records:
            listing.add_row(
                r.id[:8],
                r.key_prefix + "…",
                r.label or "",
                r.status(now),
                ",".join(r.provider_scopes or ["all"]),
                ",".join(r.model_scopes or ["all"]),
                fmt_time(r.expires_at)[:10],
                fmt_time(r.created_at)[:10],
            )
        console.print(listing)
        return 0
    try:  # a label or prefix that a revoked key shares still names the one active key
        record, how = find_key(kleis, args.id, active_only=True)
    except CliError as exc:
        if exc.code != "not_found":
            raise
        record, how = find_key(kleis, args.id)
    name = key_name(record)
    if record.revoked_at is not None:
        raise CliError(f"{name} is already revoked", "already_revoked")
    record = await kleis.keys.revoke(record.id)
    if args.json:
        print_json({"revoked": True, "key": key_view(record, base, now), "matched": matched(args.id, how)})
    else:
        console.print(f"revoked {name}, matched by {how}", markup=False, highlight=False)
    return 0


async def accounts_command(args, kleis, console: Console, settings: Settings) -> int:
    pool, now, sub = kleis.pool, kleis.clock.now(), args.accounts_command
    if sub == "list":
        views = [a.view(now) for items in pool.by_provider.values() for a in items]
        if args.json:
            print_json(views)
            return 0
        listing = table(
            "id", "provider", "label", "primary", "priority", "status", "expires", "last error",
            keep=("id", "provider", "status", "expires"),
        )  # fmt: skip
        for v in views:
            listing.add_row(
                v["id"][:8],
                v["provider"],
                v["label"],
                "yes" if v["isPrimary"] else "",
                str(v["priority"]),
                v["status"],
                fmt_time(v["expiresAt"]),
                (v["lastError"] or "")[:60],
            )
        console.print(listing)
        return 0
    if sub in ("login", "import"):
        provider = kleis.providers.get(args.provider)
        if provider is None:
            raise CliError(
                f"unknown or disabled provider {args.provider!r}; enabled: {', '.join(kleis.providers)}"
            )
        if sub == "import":
            try:
                content = await asyncio.to_thread(read_auth_file, args.file)
            except OSError as exc:
                raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
            accounts = await import_auth(pool, provider, content, label=args.label)
        else:
            accounts = [await login(kleis, provider, args, console)]
        warnings = getattr(accounts, "warnings", [])  # imports: a shared login, an unchecked token
        if args.json:
            views = [a.view(kleis.clock.now()) for a in accounts]
            print_json(
                {"account": views[0], "accounts": views, "warnings": warnings}
                if sub == "import"
                else {"account": views[0]}
            )
            return 0
        for account in accounts:
            console.print(
                f"[green]✓[/green] {account.provider} account [bold]{account.label}[/bold] ({account.id})"
            )
        for warning in warnings:
            console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
        return 0
    account, how = find_account(kleis, args.id)
    return await ACCOUNT_ACTIONS[sub if sub != "cooldown" else "cooldown clear"](
        args, kleis, console, account, how
    )


def account_done(args, kleis, console: Console, what: str, account, how: str, **fields: Any) -> int:
    """Report an action on one account: `{"account", "matched", **fields}` with --json, else one
    line naming the account and what matched."""
    if args.json:
        print_json({"account": account.view(kleis.clock.now()), "matched": matched(args.id, how), **fields})
    else:
        console.print(f"{what}: {account_name(account)}, matched by {how}", markup=False, highlight=False)
    return 0


async def account_refresh(args, kleis, console, account, how) -> int:
    account = await kleis.pool.refresh_now(account.id)
    return account_done(args, kleis, console, "refreshed", account, how, refreshed=True)


async def account_primary(args, kleis, console, account, how) -> int:
    account = await kleis.pool.set_primary(account.id)
    return account_done(args, kleis, console, "primary", account, how, primary=True)


async def account_remove(args, kleis, console, account, how) -> int:
    await kleis.pool.delete(account.id)
    return account_done(args, kleis, console, "removed", account, how, deleted=True)


async def account_enable(args, kleis, console, account, how) -> int:
    enabled = args.accounts_command == "enable"
    account = await kleis.pool.update(account.id, enabled=enabled)
    what = "enabled" if enabled else "disabled"
    return account_done(args, kleis, console, what, account, how, updated=True)


async def account_set(args, kleis, console, account, how) -> int:
    """`accounts set ID --label L --priority N`: the fields PATCH /admin/accounts/<id> takes."""
    fields: dict[str, Any] = {}
    if args.label is not None:
        if len(args.label) > 160:
            raise CliError("--label must be at most 160 characters")
        fields["label"] = args.label
    if args.priority is not None:
        fields["priority"] = args.priority
    if not fields:
        raise UsageError(
            "give --label and/or --priority", "usage: kleis accounts set ID [--label L] [--priority N]\n"
        )
    account = await kleis.pool.update(account.id, **fields)
    return account_done(args, kleis, console, "updated", account, how, updated=True)


async def account_cooldown_clear(args, kleis, console, account, how) -> int:
    was = account.cooling(kleis.clock.now())
    account = await kleis.pool.clear_cooldown(account.id)
    what = "cooldown cleared" if was else "was not cooling down"
    return account_done(args, kleis, console, what, account, how, cleared=was)


async def account_quota(args, kleis, console, account, how) -> int:
    """The provider's quota view (the admin API's GET …/quota); exit 1 when the provider has
    none or could not be asked."""
    if account.provider not in kleis.providers:
        raise CliError(f"provider {account.provider} is not enabled in the config")
    quota = await kleis.pool.quota(account)
    if quota is None:
        raise CliError(f"the {account.provider} provider reports no quota", "no_quota")
    if quota["error"]:
        raise CliError(f"quota of {account_name(account)} unavailable: {quota['error']}", "quota_unavailable")
    if args.json:
        view = account.view(kleis.clock.now())
        print_json({"account": view, "matched": matched(args.id, how), "quota": quota})
        return 0
    console.print(f"quota of {account_name(account)}, matched by {how}", markup=False, highlight=False)
    listing = table("field", "value", keep=("field",))
    for name, value in flat(quota["data"]):
        listing.add_row(name, "-" if value is None else str(value))
    console.print(listing)
    return 0


def flat(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """A nested dict as (dotted.name, leaf) rows."""
    if isinstance(value, dict):
        rows: list[tuple[str, Any]] = []
        for key, item in value.items():
            rows.extend(flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return rows or [(prefix, None)]
    return [(prefix, value)]


ACCOUNT_ACTIONS = {
    "refresh": account_refresh,
    "primary": account_primary,
    "remove": account_remove,
    "enable": account_enable,
    "disable": account_enable,
    "set": account_set,
    "cooldown clear": account_cooldown_clear,
    "quota": account_quota,
}


async def login(kleis, provider, args, console: Console):
    """The same login the admin API runs: a code flow asks for the pasted code; a device flow
    shows the user code while the instance's background poller waits for approval. With
    --json everything but the final JSON goes to stderr."""
    options = {k: v for k, v in (("mode", args.mode), ("enterprise_domain", args.enterprise_domain)) if v}
    started = await kleis.logins.start(provider, options)
    talk = new_console(stderr=True) if args.json else console
    out = sys.stderr if args.json else sys.stdout
    talk.print("Open this URL in a browser (on any machine):")
    print(started["authorizationUrl"], file=out, flush=True)  # unwrapped: it is pasted whole
    talk.print(started["instructions"], markup=False, highlight=False)
    if started.get("userCode"):
        talk.print("Code:")
        print(started["userCode"], file=out, flush=True)
    state = started["state"]
    if started["method"] == "code":
        try:
            code = talk.input("Paste the code or the callback URL: ")
        except EOFError:
            raise CliError("no code was pasted (standard input ended)", "no_code") from None
        return await kleis.logins.finish_code(provider, state, code)
    with talk.status(f"Waiting for approval (code {started['userCode']})…"):
        while True:
            status = await kleis.logins.status(provider, state)
            if status.status == "complete" and status.account is not None:
                return status.account
            if status.status == "failed":
                raise CliError(status.message or "the login failed", "login_failed")
            await asyncio.sleep(min(max(started["interval"], 0.01), 0.25))


USAGE_BY = {  # --by: the dashboard breakdown, its columns, the first column's title
    "key": ("byKey", ("apiKeyId",), "key"),
    "provider": ("byProvider", ("provider",), "provider"),
    "model": ("byModel", ("provider", "model"), "model"),
    "account": ("byAccount", ("providerAccountId",), "account"),
}
WINDOW_UNITS_MS = {"m": 60_000, "h": 3_600_000, "d": 86_400_000}


def window_arg(text: str) -> int:
    """`--window`: a number and a unit (`30m`, `24h`, `7d`, `1.5h`) as milliseconds, from one
    minute to 90 days."""
    number, unit = text[:-1], text[-1:].lower()
    try:
        value = float(number) * WINDOW_UNITS_MS[unit]
    except (KeyError, ValueError):
        value = float("nan")
    if not (60_000 <= value <= 90 * 86_400_000):  # also false for NaN
        raise UsageError(
            f"--window must be a number and m, h or d (30m, 24h, 7d), 1 minute to 90 days; got {text!r}"
        )
    return int(value)


async def usage_command(args, kleis, console: Console, settings: Settings) -> int:
    """`usage [--by key|provider|model|account] [--window 24h | --hours N] [--json]`: the
    dashboard's breakdown for the window. JSON: `{windowMs, since, now, by, totals,
    previousTotals, countTokens, rows}` with the admin API's row shapes."""
    window = window_arg(args.window) if args.window else days_ms(args.hours / 24, "--hours")
    report = await analytics.dashboard(kleis.store, window, kleis.clock.now())
    field, columns, title = USAGE_BY[args.by]
    rows = report[field]
    if args.json:
        keep = ("windowMs", "since", "now", "totals", "previousTotals", "countTokens")
        print_json({**{k: report[k] for k in keep}, "by": args.by, "rows": rows})
        return 0
    from rich.table import Table

    labels = {r.id: r.label or r.key_prefix for r in kleis.keys.by_id.values()}
    labels.update((a.id, a.label or a.id) for a in getattr(kleis.pool, "accounts", {}).values())
    table = Table(
        title, "requests", "success %", "incomplete", "cancelled", "429", "count_tokens",
        "input", "output", "cache read", "avg TTFB ms", "p95 TTFB ms", "avg duration ms",
        title=f"usage over {window // 60_000} min (success % ignores 429s, cancellations, upstream errors)",
    )  # fmt: skip

    def cells(row: dict, name: str) -> list[str]:
        rate, p95 = row["successRate"], row["p95LatencyMs"]
        return [
            name,
            str(row["requestCount"]),
            "-" if rate is None else str(rate),
            str(row["incompleteCount"]),
            str(row["cancelledCount"]),
            str(row["rateLimitCount"]),
            str(row["countTokensCount"]),
            str(row["inputTokens"]),
            str(row["outputTokens"]),
            str(row["cacheReadTokens"]),
            str(row["avgLatencyMs"]),
            "-" if p95 is None else str(p95),
            str(row["avgDurationMs"]),
        ]

    for row in rows:
        name = "/".join(str(labels.get(row[c], row[c]) or "-") for c in columns)
        table.add_row(*cells(row, name))
    table.add_row(*cells(report["totals"], "total"), style="bold")
    console.print(table)
    return 0


ROTATION_STEPS = """To change the secret key while Kleis serves, without any server losing its accounts:
  1. In [security], set secret_key to the new key and keep the current one as a fallback:
       secret_key = "<the new key>"
       previous_secret_keys = ["<the current key>"]
  2. Restart every Kleis server: it reads tokens sealed with either key and seals with the new one.
  3. Run `python kleis.py rotate-secret` (without KLEIS_NEW_SECRET_KEY): it re-encrypts every token
     with secret_key.
  4. Remove previous_secret_keys and restart when convenient."""


async def rotate_secret_command(args, kleis, console: Console, settings: Settings) -> int:
    """Re-encrypt every stored token and login with one key, never with a key a running server
    does not seal with (servers announce their keys in the database, see Instance.announce).

    - `previous_secret_keys` set, no KLEIS_NEW_SECRET_KEY: finish a rotation, resealing with
      the configured secret_key (step 3 of ROTATION_STEPS).
    - otherwise: reseal with KLEIS_NEW_SECRET_KEY, or a new random key that is printed.

    Exit 1 with the steps when a server seen in the last 90 s seals with another key."""
    sec = settings.security
    given = os.environ.get("KLEIS_NEW_SECRET_KEY")
    if given is not None and len(given) < 16:
        raise CliError("KLEIS_NEW_SECRET_KEY is too short; use at least 16 random characters")
    finishing = given is None and bool(sec.previous_secret_keys)
    target = sec.secret_key if finishing else (given or secrets.token_urlsafe(32))
    now = kleis.clock.now()
    live = await kleis.store.live_instances(now - INSTANCE_LIVE_MS)
    blocking = [i for i in live if i["key_ids"][0] != vault_key_id(target)]
    if blocking:
        servers = ", ".join(
            f"pid {i['pid']} on {i['host']} (seen {(now - i['seen_at']) // 1000} s ago)" for i in blocking
        )
        reason = (
            f"not re-encrypting: a running Kleis seals tokens with another key ({servers}); it would "
            "lose every account"
        )
        if args.json:
            print_json({"error": "rotation_refused", "message": reason, "steps": ROTATION_STEPS,
                        "newSecretKey": None if given or finishing else target})  # fmt: skip
            print(f"kleis: {reason}", file=sys.stderr)
        else:
            print(f"kleis: {reason}.\n{ROTATION_STEPS}", file=sys.stderr)
            if not (given or finishing):
                print("A new random key for step 1:", file=sys.stderr)
                print(target)
        return 1
    count = await kleis.store.reseal(Vault(target, (sec.secret_key, *sec.previous_secret_keys)))
    await kleis.store.bump_version("accounts")
    if args.json:
        print_json({"ok": True, "accounts": count, "newSecretKey": None if finishing else target})
    elif finishing:
        console.print(
            f"Every token is now sealed with [security] secret_key ({count} accounts). Remove "
            "previous_secret_keys and restart when convenient.",
            markup=False,
        )
    else:
        console.print(
            "Tokens re-encrypted. Put this in [security] secret_key (or KLEIS_SECRET_KEY) and restart:",
            markup=False,
        )
        print(target)
    return 0


COMMANDS = {
    "keys": keys_command,
    "accounts": accounts_command,
    "usage": usage_command,
    "rotate-secret": rotate_secret_command,
}


# ══ Parsing and dispatch ════════════════════════════════════════════════════


ACCOUNT_REF = "account id, unique id prefix or exact label"


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    top = Parser(prog="kleis", description="Kleis OAuth account proxy")
    top.add_argument("--config", help="config file (default: $KLEIS_CONFIG or ./config.toml)")
    top.add_argument("--json", action="store_true", help="machine-readable output")
    sub = top.add_subparsers(dest="command")
    serve = sub.add_parser("serve", parents=[common], help="run the server (default)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    sub.add_parser("init", parents=[common], help="create the config file if missing")
    sub.add_parser("check", parents=[common], help="validate the config and providers, then exit")
    keys = sub.add_parser("keys", parents=[common], help="API keys").add_subparsers(
        dest="keys_command", required=True
    )
    create = keys.add_parser("create", parents=[common], help="create a key (shown once)")
    create.add_argument("--label")
    create.add_argument("--provider", action="append", help="limit to a provider (repeatable)")
    create.add_argument("--model", action="append", help="limit to a model (repeatable)")
    create.add_argument(
        "--account", action="append", help="limit to an account: id, id prefix or label (repeatable)"
    )
    create.add_argument("--expires-days", type=float)
    keys.add_parser("list", parents=[common], help="list keys")
    keys.add_parser("revoke", parents=[common], help="revoke a key").add_argument(
        "id", help="id, unique id prefix, key prefix (kleis_…) or exact label"
    )
    accounts = sub.add_parser("accounts", parents=[common], help="provider accounts").add_subparsers(
        dest="accounts_command", required=True
    )
    accounts.add_parser("list", parents=[common])
    login_ = accounts.add_parser(
        "login", parents=[common], help="log in to a provider (browser code or device flow)"
    )
    login_.add_argument("provider")
    login_.add_argument("--mode", help="codex: browser|headless; claude: max|console")
    login_.add_argument("--enterprise-domain", help="copilot: GitHub Enterprise host")
    imp = accounts.add_parser("import", parents=[common], help="import an official client's auth file")
    imp.add_argument("provider")
    imp.add_argument("file")
    imp.add_argument("--label")
    for name, what in (
        ("refresh", "refresh the tokens now"),
        ("primary", "make it its provider's first choice"),
        ("remove", "delete the account"),
        ("enable", "use the account again"),
        ("disable", "stop using the account (kept, still refreshed)"),
        ("quota", "the provider's usage windows for the account"),
    ):
        accounts.add_parser(name, parents=[common], help=what).add_argument("id", help=ACCOUNT_REF)
    set_ = accounts.add_parser("set", parents=[common], help="change an account's label or priority")
    set_.add_argument("id", help=ACCOUNT_REF)
    set_.add_argument("--label")
    set_.add_argument("--priority", type=int, help="lower is tried first (after the primary)")
    cooldown = accounts.add_parser("cooldown", parents=[common], help="an account's cooldown")
    clear = cooldown.add_subparsers(dest="cooldown_command", required=True).add_parser(
        "clear", parents=[common], help="end the account's cooldown now"
    )
    clear.add_argument("id", help=ACCOUNT_REF)
    usage = sub.add_parser("usage", parents=[common], help="usage by key, provider, model or account")
    usage.add_argument("--by", choices=sorted(USAGE_BY), default="key", help="breakdown (default key)")
    usage.add_argument("--window", help="window: 30m, 24h, 7d (default 24h; 1 minute to 90 days)")
    usage.add_argument("--hours", type=float, default=24, help="window in hours (older spelling)")
    sub.add_parser("rotate-secret", parents=[common], help="re-encrypt tokens with a new secret key")
    sub.add_parser("systemd-unit", parents=[common], help="print a systemd unit for this install")
    return top


RELOAD_TIMEOUT = 2.0  # seconds; a server that does not answer in time polls within a second anyway


async def run_command(root: Root, settings: Settings, args, console: Console) -> int:
    async with root.open(settings) as kleis:
        code = await COMMANDS[args.command](args, kleis, console, settings)
        if await kleis.store.read_versions() != kleis.versions:  # this command changed something
            await tell_server(settings, console if not args.json else None)
        return code


async def tell_server(settings: Settings, console: Console | None) -> bool:
    """Ask the Kleis serving this config on this machine (its host and port, the config's
    admin token) to reload its caches now, so a key or account written here is used at once
    instead of after its next one-second poll. Best effort: True when it reloaded; no
    server, no admin token or a timeout is silently False; a refusal is one line on
    `console` (None: say nothing)."""
    server = settings.server
    if not settings.admin.token:
        return False
    host = server.host
    if host in WILDCARD_HOSTS:
        host = "::1" if host == "::" else "127.0.0.1"
    url = f"http://{url_host(host)}:{server.port}/admin/reload"
    try:
        timeout = aiohttp.ClientTimeout(total=RELOAD_TIMEOUT)
        async with (
            aiohttp.ClientSession(trust_env=False, timeout=timeout) as http,
            http.post(url, headers={"Authorization": f"Bearer {settings.admin.token}"}) as resp,
        ):
            if resp.status == 200:
                return True
            if console is not None and resp.status != 404:  # 404: an older Kleis, or not Kleis
                console.print(
                    f"The server on {host}:{server.port} refused to reload (HTTP {resp.status}); "
                    "it will see the change within about a second.",
                    markup=False,
                    highlight=False,
                )
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass  # no server here: nothing to tell
    return False


def json_wanted(argv: list[str] | None) -> bool:
    """Whether --json was given, read before parsing so a bad command line answers in JSON."""
    return "--json" in (sys.argv[1:] if argv is None else argv)


def fail(as_json: bool, code: str, message: str, status: int, **extra: Any) -> int:
    """Report a failure: one `kleis: message` line on stderr, and with --json the object
    `{"error": code, "message", **extra}` on stdout. Returns the exit code `status`."""
    print(f"kleis: {message}", file=sys.stderr, flush=True)
    if as_json:
        print_json({"error": code, "message": message, **extra})
    return status


def main(root: Root, argv: list[str] | None = None) -> int:
    as_json = json_wanted(argv)
    try:
        args = parser().parse_args(argv)
    except UsageError as exc:
        if not as_json:
            print(exc.usage, end="", file=sys.stderr)
        return fail(as_json, "usage_error", f"error: {exc}", 2)
    as_json = bool(args.json)
    command = args.command or "serve"
    path = args.config_path = config_path(args.config)
    try:
        if command in ("serve", "init"):
            token = ensure_config(path, as_json)
            if as_json and (command == "init" or token is not None):  # serve: the token, shown once
                print_json({"config": str(path), "created": token is not None, "adminToken": token})
            if command == "init":
                if token is None and not as_json:
                    print(f"{path} exists; nothing to do.", flush=True)
                return 0
        if command == "systemd-unit":
            print(systemd_unit(root.script, sys.executable, path.resolve()), end="")
            return 0
        settings = load_settings(path)
        setup_logging(settings.server.log_level)
        console = new_console() if command != "serve" else None
        if command == "check":
            root.check(settings)
            enabled = [n for n, p in settings.providers.items() if p.enabled]
            base, note = client_url(settings.server, path)
            if as_json:
                print_json(
                    {"ok": True, "config": str(path), "providers": enabled, "baseUrl": base,
                     "baseUrlNote": note or None}
                )  # fmt: skip
                return 0
            console.print(f"[green]ok[/green]: {path} is valid; providers: {', '.join(enabled)}")
            console.print("Clients use:")
            paste(base)
            if note:
                console.print(f"Note: {note}", markup=False, highlight=False)
            return 0
        if command in COMMANDS:
            return asyncio.run(run_command(root, settings, args, console))
        root.serve(
            settings,
            getattr(args, "host", None) or settings.server.host,
            getattr(args, "port", None) or settings.server.port,
            path,
        )
        return 0
    except BrokenPipeError:  # `kleis.py keys list | head -1`: the reader is gone; nothing to say
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ConfigError as exc:
        return fail(as_json, "config_error", str(exc), 2)
    except UsageError as exc:
        return fail(as_json, "usage_error", str(exc), 2)
    except KleisError as exc:
        return fail(as_json, exc.code, exc.message, 1)
    except CliError as exc:
        return fail(as_json, exc.code, str(exc), 1, **exc.extra)
    except ProviderError as exc:
        return fail(as_json, "provider_error", str(exc), 1)
    except KeyboardInterrupt:
        return 130
