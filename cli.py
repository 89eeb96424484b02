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
import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from accounts import import_auth, read_auth_file
from errors import KleisError
from keys import key_fields, key_view
from providers import ProviderError
from settings import ConfigError, Settings, Vault, load_settings, setup_logging, write_new_config
from usage import usage_report


class CliError(Exception):
    """A command failed in a way the user can fix; printed as one line, exit 1."""


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


SYSTEMD_UNIT = """[Unit]
Description=Kleis OAuth account proxy
After=network-online.target
Wants=network-online.target

[Service]
WorkingDirectory={cwd}
ExecStart={python} {script} serve --config {config}
Restart=on-failure
RestartSec=3
NoNewPrivileges=true
PrivateTmp=true
ProtectSystem=strict
ReadWritePaths={data}

[Install]
WantedBy=multi-user.target
"""


def config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("KLEIS_CONFIG") or "config.toml").expanduser()


def ensure_config(path: Path, console: Console) -> None:
    """Create the config file (0600, random secrets) if it is missing; print the admin token once."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    token = write_new_config(path)
    console.print(f"[bold]Created {path}[/bold] (mode 0600) with a random secret key and SQLite database.")
    console.print(f"Admin token (shown once, also stored in the file): [bold yellow]{token}[/bold yellow]")


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


def fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ms / 1000))


def days_ms(days: float, flag: str) -> int:
    """A positive, finite number of days (at most 100 years) as milliseconds."""
    if not (0 < days <= 36_500):  # also false for NaN
        raise CliError(f"{flag} must be a positive number of days (at most 36500 days)")
    return max(1, int(days * 86_400_000))


def base_url(settings: Settings) -> str:
    return settings.server.public_url.rstrip("/") or f"http://{settings.server.host}:{settings.server.port}"


# ══ Commands ════════════════════════════════════════════════════════════════
# Each takes the parsed arguments, the opened instance and the console.


async def keys_command(args, kleis, console: Console, settings: Settings) -> int:
    now = kleis.clock.now()
    if args.keys_command == "create":
        body = {
            "label": args.label,
            "providerScopes": args.provider or None,
            "modelScopes": args.model or None,
            "accountScopes": args.account or None,
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
        view = key_view(record, base_url(settings), now, key=key)
        if args.json:
            print_json(view)
        else:
            console.print(f"[bold]API key[/bold] (shown once): [bold yellow]{key}[/bold yellow]")
            console.print(
                f'OpenCode:\n  export OPENCODE_MODELS_URL="{view["scopedModelsUrl"]}"\n'
                f'  export KLEIS_API_KEY="{key}"'
            )
        return 0
    if args.keys_command == "list":
        records = kleis.keys.newest_first()
        if args.json:
            print_json([key_view(r, "", now) for r in records])
            return 0
        table = Table("id", "prefix", "label", "status", "providers", "models", "expires", "created")
        for r in records:
            table.add_row(
                r.id,
                r.key_prefix + "…",
                r.label or "",
                r.status(now),
                ",".join(r.provider_scopes or ["all"]),
                ",".join(r.model_scopes or ["all"]),
                fmt_time(r.expires_at),
                fmt_time(r.created_at),
            )
        console.print(table)
        return 0
    record = kleis.keys.find(args.id)
    if record.revoked_at is not None:
        raise CliError("that key is already revoked")
    await kleis.keys.revoke(record.id)
    console.print(f"revoked {record.key_prefix}…") if not args.json else print_json({"revoked": True})
    return 0


async def accounts_command(args, kleis, console: Console, settings: Settings) -> int:
    pool, now, sub = kleis.pool, kleis.clock.now(), args.accounts_command
    if sub == "list":
        views = [a.view(now) for items in pool.by_provider.values() for a in items]
        if args.json:
            print_json(views)
            return 0
        table = Table("id", "provider", "label", "primary", "status", "expires", "last error")
        for v in views:
            table.add_row(
                v["id"],
                v["provider"],
                v["label"],
                "yes" if v["isPrimary"] else "",
                v["status"],
                fmt_time(v["expiresAt"]),
                (v["lastError"] or "")[:60],
            )
        console.print(table)
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
        for account in accounts:
            console.print(
                f"[green]✓[/green] {account.provider} account [bold]{account.label}[/bold] ({account.id})"
            )
        return 0
    account = pool.find(args.id)
    if sub == "refresh":
        await pool.fresh(account, force=True)
    elif sub == "primary":
        await pool.set_primary(account.id)
    elif sub == "remove":
        await pool.delete(account.id)
    console.print(f"{sub}: {account.provider} account {account.label} done")
    return 0


async def login(kleis, provider, args, console: Console):
    """The same login the admin API runs: a code flow asks for the pasted code; a device flow
    shows the user code while the instance's background poller waits for approval."""
    options = {k: v for k, v in (("mode", args.mode), ("enterprise_domain", args.enterprise_domain)) if v}
    started = await kleis.logins.start(provider, options)
    console.print(f"Open [bold]{started['authorizationUrl']}[/bold]")
    console.print(started["instructions"])
    state = started["state"]
    if started["method"] == "code":
        code = console.input("Paste the code or the callback URL: ")
        return await kleis.logins.finish_code(provider, state, code)
    with console.status(f"Waiting for approval (code {started['userCode']})…"):
        while True:
            status = await kleis.logins.status(provider, state)
            if status.status == "complete" and status.account is not None:
                return status.account
            if status.status == "failed":
                raise CliError(status.message or "the login failed")
            await asyncio.sleep(min(max(started["interval"], 0.01), 0.25))


async def usage_command(args, kleis, console: Console, settings: Settings) -> int:
    report = await usage_report(
        kleis.store, days_ms(args.hours / 24, "--hours"), kleis.clock.now(), group="api_key_id"
    )
    if args.json:
        print_json(report)
        return 0
    table = Table("key", "requests", "success %", "input", "output", "cache read", "avg ms")
    labels = {r.id: r.label or r.key_prefix for r in kleis.keys.by_id.values()}
    for row in report["byKey"]:
        rate = row["successRate"]
        table.add_row(
            labels.get(row["apiKeyId"], row["apiKeyId"]),
            str(row["requestCount"]),
            "-" if rate is None else str(rate),
            str(row["inputTokens"]),
            str(row["outputTokens"]),
            str(row["cacheReadTokens"]),
            str(row["avgLatencyMs"]),
        )
    console.print(table)
    return 0


async def rotate_secret_command(args, kleis, console: Console, settings: Settings) -> int:
    new_secret = os.environ.get("KLEIS_NEW_SECRET_KEY") or secrets.token_urlsafe(32)
    if len(new_secret) < 16:
        raise CliError("KLEIS_NEW_SECRET_KEY is too short; use at least 16 random characters")
    await kleis.store.reseal(Vault(new_secret))
    await kleis.store.bump_version("accounts")
    console.print(
        "Tokens re-encrypted. Put this in [security] secret_key (or KLEIS_SECRET_KEY) and restart:",
        markup=False,
    )
    print(new_secret)
    return 0


COMMANDS = {
    "keys": keys_command,
    "accounts": accounts_command,
    "usage": usage_command,
    "rotate-secret": rotate_secret_command,
}


# ══ Parsing and dispatch ════════════════════════════════════════════════════


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output"
    )
    common.add_argument("--config", default=argparse.SUPPRESS, help="config file")
    top = argparse.ArgumentParser(prog="kleis", description="Kleis OAuth account proxy")
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
    create.add_argument("--account", action="append", help="limit to an account id (repeatable)")
    create.add_argument("--expires-days", type=float)
    keys.add_parser("list", parents=[common], help="list keys")
    keys.add_parser("revoke", parents=[common], help="revoke a key by id or prefix").add_argument("id")
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
    for name in ("refresh", "primary", "remove"):
        accounts.add_parser(name, parents=[common]).add_argument("id", help="account id or label")
    usage = sub.add_parser("usage", parents=[common], help="usage per key")
    usage.add_argument("--hours", type=float, default=24)
    sub.add_parser("rotate-secret", parents=[common], help="re-encrypt tokens with a new secret key")
    sub.add_parser("systemd-unit", parents=[common], help="print a systemd unit for this install")
    return top


async def run_command(root: Root, settings: Settings, args, console: Console) -> int:
    async with root.open(settings) as kleis:
        return await COMMANDS[args.command](args, kleis, console, settings)


def main(root: Root, argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    command = args.command or "serve"
    path = config_path(args.config)
    console = Console(stderr=False)
    try:
        if command in ("serve", "init"):
            ensure_config(path, console)
            if command == "init":
                return 0
        if command == "systemd-unit":
            print(
                SYSTEMD_UNIT.format(
                    cwd=root.script.parent,
                    python=sys.executable,
                    script=root.script,
                    config=path.resolve(),
                    data=path.resolve().parent,
                )
            )
            return 0
        settings = load_settings(path)
        setup_logging(settings.server.log_level)
        if command == "check":
            root.check(settings)
            console.print(
                f"[green]ok[/green]: {path} is valid; providers: "
                f"{', '.join(n for n, p in settings.providers.items() if p.enabled)}"
            )
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
    except ConfigError as exc:
        print(f"kleis: {exc}", file=sys.stderr)
        return 2
    except KleisError as exc:
        print(f"kleis: {exc.message}", file=sys.stderr)
        return 1
    except (CliError, ProviderError) as exc:
        print(f"kleis: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
