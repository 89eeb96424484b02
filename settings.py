"""Kleis settings and secrets: the TOML config as validated frozen dataclasses, the generated
first config, token encryption and log masking.

Pure: no I/O beyond reading and creating the config file, no Sanic, no database; tested on
its own in tests/test_settings.py.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import ipaddress
import itertools
import logging
import math
import os
import re
import secrets
import string
import sys
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

# ══ Settings ════════════════════════════════════════════════════════════════
# TOML -> frozen dataclasses, validated once. Unknown keys and wrong types stop start-up with
# `kleis: [section] key: problem` (exit 2). Secrets may come from the environment instead.


class ConfigError(Exception):
    """A problem in the configuration; main() prints it as one line and exits 2."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8787
    public_url: str = ""
    trust_forwarded: bool = False
    trusted_proxies: tuple[str, ...] = ()  # CIDRs; () = loopback and the direct peer (see keys.py)
    response_timeout: float = 900.0
    first_byte_timeout: float = 300.0
    idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    keepalive_interval: float = 25.0
    max_body_mb: int = 32
    max_event_mb: int = 16  # one upstream SSE event (or a JSON answer Kleis must hold) at most
    drain_seconds: float = 60.0  # on SIGTERM, open streams may finish this long, then are ended
    metrics_token: str = ""
    plugins_dir: str = ""
    log_level: str = "info"
    access_log: str = "text"  # one line per proxied request: "text" | "json" | "off"


@dataclass(frozen=True)
class AdminSettings:
    token: str = ""
    device_wait_seconds: float = 60.0
    allow_weak_token: bool = False  # accept a short or low-entropy token (see admin_token_weakness)


@dataclass(frozen=True)
class SecuritySettings:
    secret_key: str = ""
    previous_secret_keys: tuple[str, ...] = ()  # decrypt-only fallbacks while rotating
    admin_max_failures: int = 10
    admin_lockout_seconds: int = 300
    key_max_failures: int = 100
    key_lockout_seconds: int = 60


@dataclass(frozen=True)
class DatabaseSettings:
    url: str = "sqlite:///kleis.db"
    pool_size: int = 10  # PostgreSQL connections per instance (SQLite opens one per query)
    listen: bool = True  # PostgreSQL: LISTEN/NOTIFY carries other instances' changes at once
    poll_interval: float = 0.25  # seconds between change polls when not listening (SQLite, or down)


@dataclass(frozen=True)
class UsageSettings:
    flush_interval: float = 1.0
    retention_days: int = 90


@dataclass(frozen=True)
class ModelsSettings:
    source_url: str = "https://models.dev/api.json"
    refresh_hours: float = 6.0
    account_lists: bool = True  # ask each account's provider which models it offers
    account_refresh_hours: float = 6.0


@dataclass(frozen=True)
class ProviderSettings:
    enabled: bool = True
    entry: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AccountImport:
    provider: str = ""
    label: str = ""
    auth_file: str = ""
    access_token: str = ""
    refresh_token: str = ""
    expires_at: int = 0
    account_id: str = ""
    priority: int = 0


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    admin: AdminSettings = AdminSettings()
    security: SecuritySettings = SecuritySettings()
    database: DatabaseSettings = DatabaseSettings()
    usage: UsageSettings = UsageSettings()
    models: ModelsSettings = ModelsSettings()
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)
    accounts: tuple[AccountImport, ...] = ()
    base_dir: Path = Path(".")

    def resolve(self, path: str) -> Path:
        """A path from the config, relative to the config file's folder, ~ expanded."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.base_dir / p


BUILTIN_PROVIDERS = ("codex", "claude", "copilot")
SECTIONS = {
    "server": ServerSettings,
    "admin": AdminSettings,
    "security": SecuritySettings,
    "database": DatabaseSettings,
    "usage": UsageSettings,
    "models": ModelsSettings,
}
ENV_SECRETS = {
    ("admin", "token"): "KLEIS_ADMIN_TOKEN",
    ("security", "secret_key"): "KLEIS_SECRET_KEY",
    ("database", "url"): "KLEIS_DATABASE_URL",
}


def check_value(where: str, key: str, value: Any, default: Any) -> Any:
    """Type-check one option against its default; ints are accepted for floats."""
    want = type(default)
    if want is float and type(value) is int:
        return float(value)
    if want is tuple:  # a TOML array of strings
        if type(value) is not list or not all(type(v) is str for v in value):
            raise ConfigError(f"[{where}] {key}: must be an array of strings, got {type(value).__name__}")
        return tuple(value)
    if type(value) is not want:
        raise ConfigError(f"[{where}] {key}: must be {want.__name__}, got {type(value).__name__} {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
        raise ConfigError(f"[{where}] {key}: must not be negative")
    return value


def build_table(cls: type, raw: Any, where: str) -> Any:
    """Build settings dataclass `cls` from one TOML table."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{where}]: must be a table")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        if key not in fields:
            raise ConfigError(f"[{where}] {key}: unknown key (known: {', '.join(fields)})")
        values[key] = check_value(where, key, value, fields[key].default)
    return cls(**values)


def load_settings(path: Path, env: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the TOML config at `path` (provider options are checked later,
    against each adapter's OPTIONS, by load_providers)."""
    import tomllib

    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (run `python kleis.py init`)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    known = {*SECTIONS, "providers", "accounts"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"[{key}]: unknown section (known: {', '.join(sorted(known))})")
    tables = {}
    for name, cls in SECTIONS.items():
        table = dict(raw.get(name, {})) if isinstance(raw.get(name, {}), dict) else raw[name]
        for (section, key), var in ENV_SECRETS.items():
            if section == name and env.get(var):
                table[key] = env[var]
        tables[name] = build_table(cls, table, name)
    raw_providers = raw.get("providers", {})
    if not isinstance(raw_providers, dict):
        raise ConfigError("[providers]: must be a table of [providers.<name>] tables")
    provider_tables = {}
    for name in dict.fromkeys([*BUILTIN_PROVIDERS, *raw_providers]):
        table = raw_providers.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(f"[providers.{name}]: must be a table")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ConfigError(f"[providers.{name}]: names are lower-case letters, digits and _")
        enabled = check_value(f"providers.{name}", "enabled", table.get("enabled", True), True)
        entry = check_value(f"providers.{name}", "entry", table.get("entry", name), "")
        options = {k: v for k, v in table.items() if k not in ("enabled", "entry")}
        provider_tables[name] = ProviderSettings(enabled=enabled, entry=entry or name, options=options)
    raw_accounts = raw.get("accounts", [])
    if not isinstance(raw_accounts, list):
        raise ConfigError("[[accounts]]: must be an array of tables")
    accounts = tuple(build_table(AccountImport, a, f"accounts.{i}") for i, a in enumerate(raw_accounts))
    for i, account in enumerate(accounts):
        if not account.provider:
            raise ConfigError(f"[accounts.{i}] provider: required")
        if not account.auth_file and not account.refresh_token:
            raise ConfigError(f"[accounts.{i}]: give auth_file, or access_token + refresh_token")
    settings = Settings(
        **tables, providers=provider_tables, accounts=accounts, base_dir=path.parent.resolve()
    )
    validate_settings(settings)
    return settings


def validate_settings(s: Settings) -> None:
    if not (0 < s.server.port < 65536):
        raise ConfigError("[server] port: must be 1-65535")
    if s.server.public_url and not s.server.public_url.startswith(("http://", "https://")):
        raise ConfigError("[server] public_url: must start with http:// or https://")
    if not s.security.secret_key:
        raise ConfigError(
            "[security] secret_key: required (or set KLEIS_SECRET_KEY); `python kleis.py init` makes one"
        )
    if len(s.security.secret_key) < 16:
        raise ConfigError("[security] secret_key: too short; use at least 16 random characters")
    if not s.database.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ConfigError("[database] url: must start with sqlite:/// or postgresql://")
    if not 1 <= s.database.pool_size <= 200:
        raise ConfigError("[database] pool_size: must be 1-200")
    if not 0.05 <= s.database.poll_interval <= 60:
        raise ConfigError("[database] poll_interval: must be 0.05-60 seconds")
    if s.usage.flush_interval <= 0:
        raise ConfigError("[usage] flush_interval: must be greater than 0")
    if s.usage.retention_days < 0:
        raise ConfigError("[usage] retention_days: must be 0 (keep forever) or more")
    if not 0 <= s.admin.device_wait_seconds <= 600:
        raise ConfigError("[admin] device_wait_seconds: must be 0-600")
    if not 1 <= s.server.max_event_mb <= 1024:
        raise ConfigError("[server] max_event_mb: must be 1-1024")
    if s.server.drain_seconds > 3600:
        raise ConfigError("[server] drain_seconds: must be 0-3600")
    for cidr in s.server.trusted_proxies:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ConfigError(
                f"[server] trusted_proxies: {cidr[:60]!r} is not an address or CIDR (10.0.0.0/8, ::1)"
            ) from None
    weakness = admin_token_weakness(s.admin.token) if s.admin.token else None
    if weakness and not s.admin.allow_weak_token:
        raise ConfigError(
            f"[admin] token: {weakness}; anyone who can reach Kleis may guess it. Make one with "
            '`python -c "import secrets; print(secrets.token_urlsafe(32))"` (or a new config with '
            "`python kleis.py init`), or set [admin] allow_weak_token = true to accept it"
        )
    if s.server.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError("[server] log_level: one of debug, info, warning, error")
    if s.server.access_log not in ("text", "json", "off"):
        raise ConfigError("[server] access_log: one of text, json, off")
    if any(len(k) < 16 for k in s.security.previous_secret_keys):
        raise ConfigError("[security] previous_secret_keys: each key has at least 16 characters")


def admin_token_weakness(token: str) -> str | None:
    """Why `token` is too weak for the admin API, or None: shorter than 24 characters, a
    repeated handful of characters or pattern (under 2.5 bits of Shannon entropy per
    character, or fewer distinct 3-character pieces than half its length), mostly
    runs such as `abcd`/`1111`, or under 128 bits at its alphabet's size (16 for hex, else the
    classes it uses: lower, upper, digits, others). Random tokens of 24+ characters from
    secrets.token_urlsafe or token_hex(16+) pass (`kla_` + 32 hex, `init`'s `kla_` + 48 hex).
    The answer never contains the token."""
    n = len(token)
    if n < 24:
        return f"too short ({n} characters; use at least 24 random ones)"
    entropy = -sum(c / n * math.log2(c / n) for c in Counter(token).values())
    trigrams = len({token[i : i + 3] for i in range(n - 2)})
    if entropy < 2.5 or trigrams * 2 < n - 2:
        return "a repeated pattern or a handful of characters, not a random token"
    runs = sum(abs(ord(a) - ord(b)) <= 1 for a, b in itertools.pairwise(token))
    if runs * 3 >= (n - 1) * 2:
        return "mostly runs of neighbouring characters (like abcd or 1111), not a random token"
    if set(token) <= set(string.hexdigits.lower()) or set(token) <= set(string.hexdigits.upper()):
        alphabet = 16
    else:
        classes = (string.ascii_lowercase, string.ascii_uppercase, string.digits)
        alphabet = sum(len(chars) for chars in classes if any(c in chars for c in token))
        alphabet += 32 if any(not (c.isascii() and c.isalnum()) for c in token) else 0
    bits = n * math.log2(alphabet)
    if bits < 128:
        return f"too guessable (about {bits:.0f} bits; use at least 128)"
    return None


def write_new_config(path: Path) -> str:
    """Create a config file with a random admin token and secret key (mode 0600); returns the
    admin token so the caller can print it once. Never overwrites an existing file."""
    import tomli_w

    token = "kla_" + secrets.token_hex(24)
    body = {
        "admin": {"token": token},
        "security": {"secret_key": secrets.token_urlsafe(32)},
        "database": {"url": "sqlite:///kleis.db"},
    }
    header = (
        "# Kleis configuration, generated on first start. Every option, with its default and a\n"
        "# comment, is in config.example.toml; copy the ones you want to change into this file.\n"
        "# Kleis never rewrites this file.\n\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(header + tomli_w.dumps(body))
    return token


# ══ Secrets ═════════════════════════════════════════════════════════════════
# OAuth tokens are encrypted at rest; API keys are only ever stored as SHA-256; nothing secret
# reaches a log line.

SECRET_PATTERNS = [
    re.compile(r"kleis_[0-9a-f]{8,}"),
    re.compile(r"kla_[0-9a-f]{8,}"),
    re.compile(r"kmd_[0-9a-f]{8,}"),
    re.compile(r"(?i)(bearer\s+)[^\s\"']+"),
    re.compile(r"(?i)(\"?(?:access|refresh|id)_?token\"?\s*[:=]\s*\"?)[^\s\"',]+"),
    re.compile(r"\bgh[opsu]_[A-Za-z0-9]{8,}"),
    re.compile(r"\bsk-ant-[A-Za-z0-9_-]{8,}"),
]


# A literal each pattern above needs (the case-insensitive ones in lower case): a line with
# none of them cannot match any, and most lines (one per proxied request) have none. Cheaper
# than the seven regex passes by ~10x; str.lower() maps the Kelvin sign to "k" as re.I does.
SECRET_HINTS = ("kleis_", "kla_", "kmd_", "gho_", "ghp_", "ghs_", "ghu_", "sk-ant-")
SECRET_HINTS_ANY_CASE = ("bearer", "token")


def mask_secrets(text: str) -> str:
    if not any(hint in text for hint in SECRET_HINTS):
        lowered = text.lower()
        if not any(hint in lowered for hint in SECRET_HINTS_ANY_CASE):
            return text
    for pattern in SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "***", text)
    return text


class MaskingFilter(logging.Filter):
    """Masks keys and tokens in every record, whatever logged it. Used where a record is
    written once (tests, tools); handlers use `MaskingFormatter`, which never changes the
    record other handlers (pytest's capture, a second sink) see."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message or record.exc_info:
            record.msg, record.args = masked, None
            if record.exc_info:
                import traceback

                record.msg += "\n" + mask_secrets("".join(traceback.format_exception(*record.exc_info)))
                record.exc_info = None
        return True


class MaskingFormatter(logging.Formatter):
    """The standard format with keys and tokens masked in the whole line, traceback included."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))


class TickBufferedHandler(logging.StreamHandler):
    """A StreamHandler that writes the lines of one event-loop tick together. A record logged
    in a thread running an event loop is formatted at once and held; the first one of a tick
    schedules one write (and flush) of everything held at the tick's end, so a proxy logging
    a line per request makes one write per tick instead of one per line. Elsewhere (start-up,
    other threads, no loop) a record is written at once, after anything held. `flush()` and
    `close()` (logging.shutdown runs them at exit) write what is held: no line is lost on a
    normal stop; a SIGKILL loses at most one tick's lines."""

    def __init__(self, stream=None):
        super().__init__(stream)
        self._held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        # Called with the handler's lock held (Handler.handle), like `_write_held`.
        self._held.append(line)
        if loop is None:
            self._write_held()
        elif len(self._held) == 1:
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._write_held()
        finally:
            self.release()

    def _write_held(self) -> None:
        if not self._held:
            return
        held, self._held = self._held, []
        try:
            self.stream.write("".join(held))
            if hasattr(self.stream, "flush"):
                self.stream.flush()
        except Exception:  # a closed or broken stderr: what logging does for one record
            with contextlib.suppress(Exception):
                sys.__stderr__.write(f"--- Logging error: lost {len(held)} log lines ---\n")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# A record's caller, thread, process and multiprocessing names: the format above uses none of
# them, and the Logging HOWTO ("Optimization") names these switches for not collecting them.
# ~2.4 of the ~7 µs an access-log line costs per request (tests/bench_parts.py, issue 14).
SKIPPED_RECORD_FIELDS = ("logThreads", "logProcesses", "logMultiprocessing")


def setup_logging(level: str = "info") -> None:
    """Kleis's one handler on the root logger (Sanic's loggers propagate to it)."""
    logging._srcfile = None  # no sys._getframe() walk per record (the HOWTO's switch for it)
    for name in SKIPPED_RECORD_FIELDS:
        setattr(logging, name, False)
    handler = TickBufferedHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("sanic.root", "sanic.error", "sanic.access", "sanic.server"):
        sanic_logger = logging.getLogger(name)
        sanic_logger.handlers[:] = []
        sanic_logger.propagate = True


class Vault:
    """Encrypts OAuth tokens with a key derived from [security] secret_key (Fernet: AES-128-CBC
    + HMAC-SHA256). `previous` secrets only decrypt: tokens sealed with a key being rotated
    out stay readable until `rotate-secret` has resealed them."""

    def __init__(self, secret: str, previous: tuple[str, ...] | list[str] = ()):
        secrets_ = [secret, *(p for p in previous if p != secret)]
        self.key_ids = tuple(vault_key_id(s) for s in secrets_)  # active first
        self._fernet = MultiFernet([Fernet(_fernet_key(s)) for s in secrets_])

    @property
    def key_id(self) -> str:
        """A public fingerprint of the sealing key (not the key, not derivable into it)."""
        return self.key_ids[0]

    def seal(self, text: str) -> str:
        return self._fernet.encrypt(text.encode()).decode()

    def open(self, sealed: str) -> str:
        try:
            return self._fernet.decrypt(sealed.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                "stored tokens cannot be decrypted: [security] secret_key changed "
                "(keep the old key in [security] previous_secret_keys; see `rotate-secret` in the README)"
            ) from None


def _fernet_key(secret: str) -> bytes:
    return base64.urlsafe_b64encode(hashlib.sha256(("kleis-vault:" + secret).encode()).digest())


def vault_key_id(secret: str) -> str:
    """12 hex digits naming a secret key in the database and in messages (a salted hash of a
    high-entropy secret: it tells keys apart without revealing them)."""
    return hashlib.sha256(("kleis-vault-id:" + secret).encode()).hexdigest()[:12]


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_api_key() -> str:
    return "kleis_" + secrets.token_hex(16)


def new_id() -> str:
    return str(uuid.uuid4())
