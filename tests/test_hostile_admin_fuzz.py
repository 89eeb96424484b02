"""Property-based fuzzing of every admin route (issue 13), and a grep of every log line.

One Kleis (three accounts, a key, a pending login) takes generated requests on every route of
`AdminApi.routes()`: JSON bodies of any shape (nesting up to 20,000 deep, integers far beyond
2^63, lone surrogates, NaN/Infinity literals, `1e400`), known and unknown fields, random
bytes, hostile path segments and query strings. Every answer must be below 500, in the admin
envelope when it is an error, and free of "Traceback" and of every secret the test created
(admin token, API key, OAuth tokens). Bounded by `max_examples`, the module runs in seconds.

The last test greps every log line this module's tests produced (caplog at DEBUG on "kleis"
and "sanic", passed through the production MaskingFilter) for every secret they created.
"""

from __future__ import annotations

import json
import logging
import re
from urllib.parse import quote, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from admin import ACCOUNT_IMPORT_FIELDS, AdminApi
from keys import KEY_FIELDS
from settings import MaskingFilter

LOG_LINES: list[str] = []  # every log line of this module's tests (masked as in production)
SECRETS: set[str] = set()  # every secret this module's tests created


@pytest.fixture(autouse=True)
def collect_logs(caplog):
    caplog.set_level(logging.DEBUG, logger="kleis")
    caplog.set_level(logging.DEBUG, logger="sanic")
    yield
    masking = MaskingFilter()
    records = [r for phase in ("setup", "call", "teardown") for r in caplog.get_records(phase)]
    for record in records:
        masking.filter(record)
        LOG_LINES.append(f"{record.name} {record.levelname} {record.getMessage()}")


# ── what the fuzzer sends ──

LONE = st.sampled_from(["\ud800", "\udfff", "a\udc00b", "\ud83d"])
TEXT = st.one_of(st.text(max_size=40), LONE, st.sampled_from(["", " ", "²", "٣", "0" * 5000, "x" * 70_000]))
NUMBER = st.one_of(
    st.integers(),
    st.integers(min_value=2**53 - 2, max_value=2**53 + 2),
    st.sampled_from([2**63, 2**64, -(2**63) - 1, 10**400]),
    st.floats(allow_nan=True, allow_infinity=True),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.text(max_size=12), LONE), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "label", "priority", "enabled", "metadata", "options", "state", "code", "authFile", "accessToken",
    "refreshToken", "expiresAt", "accountId", "providerScopes", "modelScopes", "accountScopes",
]  # fmt: skip
NUMBER_LITERALS = ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "9" * 5000, "1" + "0" * 30, "1E-400"]


def encode(value) -> bytes:
    # allow_nan writes NaN/Infinity literals; ensure_ascii writes lone surrogates as \\udXXX escapes.
    return json.dumps(value, allow_nan=True).encode()


# The fields each handler reads, so most generated bodies get past the unknown-field check.
HANDLER_FIELDS = {
    "patch_provider": ["enabled"],
    "oauth_start": ["options"],
    "oauth_complete": ["state", "code"],
    "import_account": list(ACCOUNT_IMPORT_FIELDS),
    "patch_account": ["label", "priority", "enabled", "metadata"],
    "post_key": list(KEY_FIELDS),
    "patch_key": list(KEY_FIELDS),
}


@st.composite
def bodies(draw, known: list[str]) -> bytes | None:
    kind = draw(st.sampled_from(["object", "object", "object", "deep", "literal", "bytes", "none", "auth"]))
    if kind == "none":
        return None
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "deep":
        depth = draw(st.sampled_from([33, 500, 990, 1000, 5000, 20_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        inner = opener * depth + "1" + closer * depth if opener != "[" else opener * depth + closer * depth
        field = draw(st.sampled_from([None, *FIELDS]))
        return (inner if field is None else f'{{"{field}": {inner}}}').encode()
    if kind == "literal":
        field, literal = draw(st.sampled_from(FIELDS)), draw(st.sampled_from(NUMBER_LITERALS))
        return f'{{"{field}": {literal}}}'.encode()
    if kind == "auth":  # an auth file (object or text) with a hostile expiry or token
        literal = draw(st.sampled_from(NUMBER_LITERALS))
        shape = draw(st.sampled_from(["claude", "opencode", "codex"]))
        token = draw(st.sampled_from(['"a"', '"\\ud800"', "1e400", "[]"]))
        text = {
            "claude": f'{{"claudeAiOauth": {{"accessToken": {token}, "refreshToken": "r", '
            f'"expiresAt": {literal}}}}}',
            "opencode": f'{{"openai": {{"type": "oauth", "access": {token}, "refresh": "r", '
            f'"expires": {literal}}}}}',
            "codex": f'{{"tokens": {{"access_token": {token}, "refresh_token": "r", '
            f'"account_id": {literal}}}}}',
        }[shape]
        if draw(st.booleans()):
            return f'{{"authFile": {text}}}'.encode()
        return json.dumps({"authFile": text}).encode()
    names = st.sampled_from(known or FIELDS)
    if draw(st.integers(0, 9)) == 0:
        names = st.one_of(names, st.text(max_size=10), LONE)
    fields = draw(st.lists(names, min_size=1, max_size=4, unique=True))
    return encode({field: draw(st.one_of(LONE, NUMBER, JSON)) for field in fields})


def segments(known: list[str]):
    hostile = st.one_of(
        st.text(min_size=1, max_size=30).map(lambda s: quote(s, safe="")),
        LONE.map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe="")),
        st.sampled_from(
            ["%ff", "%00", "%C0%AF", "..", "%2e%2e", "x" * 3000, "%ED%A0%80", "kleis_" + "0" * 32]
        ),
    )
    return st.one_of(st.sampled_from(known), hostile)


QUERY = st.dictionaries(
    st.sampled_from(["windowMs", "format", "refresh", "x", "windowMs[]"]),
    st.one_of(TEXT, st.sampled_from(["60000", "7776000000", "7776000001", "1e5", "-1", "²", "csv", "json"])),
    max_size=3,
)


# ── the fuzz ──


@pytest.fixture
async def target(start_kleis, codex_fake, claude_fake, copilot_fake):
    kleis = await start_kleis(admin={"device_wait_seconds": 0})
    grants = {"codex": codex_fake.grant(), "claude": claude_fake.grant(), "copilot": copilot_fake.grant()}
    accounts = [await kleis.import_account(name, grant) for name, grant in grants.items()]
    key, view = await kleis.create_key(label="fuzz")
    _, login = await kleis.admin("POST", "/admin/accounts/claude/oauth/start", {}, expect=200)
    SECRETS.update({kleis.admin_token, key, view["modelsDiscoveryToken"]})
    for grant in grants.values():
        SECRETS.update({grant["access_token"], grant["refresh_token"]})
    names = {
        "name": ["codex", "claude", "copilot"],
        "account_id": [a["id"] for a in accounts],
        "key_id": [view["id"]],
        "state": [login["state"]],
    }
    yield kleis, names
    SECRETS.update(codex_fake.access_tokens, codex_fake.refresh_tokens)
    SECRETS.update(claude_fake.access_tokens, claude_fake.refresh_tokens, copilot_fake.users)
    for row in await kleis.rows("provider_accounts"):
        for column in ("access_token", "refresh_token"):
            if row.get(column):
                SECRETS.add(kleis.unseal(row[column]))


ANSWERS: list[bytes] = []
ROUTES = AdminApi.routes(AdminApi.__new__(AdminApi))  # the table itself, no handler is called
PARAM = re.compile(r"<(\w+)>")


@settings(
    max_examples=1500,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(data=st.data())
async def test_no_admin_input_makes_a_5xx(target, data):
    kleis, names = target
    method, path, handler = data.draw(st.sampled_from(ROUTES), label="route")
    path = PARAM.sub(lambda m: data.draw(segments(names[m.group(1)]), label=m.group(1)), path)
    query = data.draw(QUERY, label="query")
    if query:
        path += "?" + urlencode(query, encoding="utf-8", errors="surrogatepass")
    url = f"{kleis.url}/admin{path}"
    known = HANDLER_FIELDS.get(handler.__name__, [])
    body = data.draw(bodies(known), label="body") if method != "GET" else None
    headers = {**kleis.admin_headers, "content-type": "application/json"}
    async with kleis.http.request(method, url, data=body, headers=headers) as resp:
        answer = await resp.read()
    assert resp.status < 500, (method, url[:200], (body or b"")[:200], resp.status, answer[:300])
    assert b"Traceback" not in answer
    if resp.status >= 400 and resp.content_type == "application/json":
        assert set(json.loads(answer)) == {"error", "message"}, answer[:300]
    ANSWERS.append(answer)


async def test_every_admin_route_was_fuzzed():
    """The table the fuzz draws from is the app's own (a new route is fuzzed without edits)."""
    assert len(ROUTES) >= 26 and len(ANSWERS) >= 100


async def test_no_answer_carries_a_secret():
    if not ANSWERS:
        pytest.skip("run with test_no_admin_input_makes_a_5xx")
    # The scoped models token (kmd_) is part of every key view by design: a capability URL
    # for the admin to hand out. Everything else must never appear.
    secrets_ = [s for s in SECRETS if len(s) >= 8 and not s.startswith("kmd_")]
    assert secrets_
    leaked = [s[:10] for s in secrets_ for answer in ANSWERS if s.encode() in answer]
    assert not leaked, leaked


async def test_secrets_in_odd_places_stay_out_of_the_log(start_kleis, codex_fake):
    """Requests that put secrets where they get logged if anything is: a wrong admin token
    that is an API key, a key in a path, a refused import with a real token."""
    kleis = await start_kleis()
    key, view = await kleis.create_key(label="logs")
    grant = codex_fake.grant(account_id="acct_logs")
    SECRETS.update({kleis.admin_token, key, view["modelsDiscoveryToken"]})
    SECRETS.update({grant["access_token"], grant["refresh_token"]})
    async with kleis.http.get(kleis.url + "/admin/keys", headers={"Authorization": f"Bearer {key}"}) as resp:
        assert resp.status == 401
    async with kleis.http.get(f"{kleis.url}/admin/nothing/{kleis.admin_token}/{key}") as resp:
        assert resp.status in (401, 404)
    async with kleis.http.get(f"{kleis.url}/openai/v1/nothing/{key}", headers={"x-api-key": key}) as resp:
        assert resp.status == 404
    async with kleis.http.get(f"{kleis.url}/api/{view['modelsDiscoveryToken']}x/api.json") as resp:
        assert resp.status == 404
    codex_fake.revoke_refresh_tokens()
    status, _ = await kleis.admin(
        "POST",
        "/admin/accounts/codex/import",
        {"accessToken": grant["access_token"] + "x", "refreshToken": grant["refresh_token"], "expiresAt": 1},
    )
    assert status == 400


def test_no_log_line_carries_a_secret():
    """Runs last in this module: every line logged above, against every secret created."""
    if not LOG_LINES:
        pytest.skip("run with the rest of this module")
    secrets_ = [s for s in SECRETS if len(s) >= 8]
    leaked = {s[:10] for s in secrets_ for line in LOG_LINES if s in line}
    assert not leaked, leaked
    print(f"{len(LOG_LINES)} log lines, {len(secrets_)} secrets, none leaked")
