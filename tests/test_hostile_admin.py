"""Hostile input on the admin API (issue 13, point 9): no input makes a 500.

Every admin route gets the inputs that made 500s before (JSON nested 10,000 deep, integers of
2^63 and beyond, lone surrogates, NaN/Infinity literals and `1e400` in an auth file, `windowMs`
values such as `²` or 5,000 digits) and must answer 400 in the admin envelope
`{"error": code, "message"}` with a message naming what is wrong. The property-based version
of the same idea, over every route, is tests/test_hostile_admin_fuzz.py.
"""

from __future__ import annotations

import json

import pytest

DEEP = ("[" * 10_000 + "]" * 10_000).encode()
DEEP_OBJECT = ('{"a":' * 10_000 + "1" + "}" * 10_000).encode()


async def setup(start_kleis, codex_fake, **config):
    kleis = await start_kleis(**config)
    account = await kleis.import_account("codex", codex_fake.grant(), label="main")
    key, view = await kleis.create_key(label="laptop")
    return kleis, account, key, view


async def raw(kleis, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    sent = {**kleis.admin_headers, "content-type": "application/json", **(headers or {})}
    async with kleis.http.request(method, kleis.url + path, data=body, headers=sent) as resp:
        return resp.status, await resp.read()


def bad_request(status: int, body: bytes, *words: str) -> dict:
    """A 400 in the admin envelope whose message names `words`."""
    assert status == 400, (status, body[:300])
    parsed = json.loads(body)
    assert set(parsed) == {"error", "message"} and parsed["error"] in ("bad_request", "invalid_json"), parsed
    for word in words:
        assert word in parsed["message"], (word, parsed)
    assert "Traceback" not in parsed["message"]
    return parsed


def body_routes(account: dict, view: dict) -> list[tuple[str, str]]:
    """Every admin route that reads a JSON body."""
    return [
        ("PATCH", "/admin/accounts/providers/codex"),
        ("POST", "/admin/accounts/codex/oauth/start"),
        ("POST", "/admin/accounts/codex/oauth/complete"),
        ("POST", "/admin/accounts/codex/import"),
        ("POST", "/admin/accounts/claude/import"),
        ("POST", "/admin/accounts/copilot/import"),
        ("PATCH", f"/admin/accounts/{account['id']}"),
        ("POST", "/admin/keys"),
        ("PATCH", f"/admin/keys/{view['id']}"),
    ]


async def test_deep_nesting_is_400_on_every_body_route(start_kleis, codex_fake):
    kleis, account, _, view = await setup(start_kleis, codex_fake)
    for method, path in body_routes(account, view):
        for body in (DEEP, DEEP_OBJECT):
            bad_request(*await raw(kleis, method, path, body))
        # Deep but parseable: inside a field, close to the parser's own limit.
        inner = "[" * 900 + "]" * 900
        for field in ("metadata", "label", "options", "authFile", "providerScopes", "enabled", "state"):
            status, answer = await raw(kleis, method, path, f'{{"{field}": {inner}}}'.encode())
            assert status < 500, (method, path, field, status, answer[:200])
    deep_metadata = b'{"metadata": {"a": ' + b"[" * 900 + b"]" * 900 + b"}}"
    status, answer = await raw(kleis, "PATCH", f"/admin/accounts/{account['id']}", deep_metadata)
    bad_request(status, answer, "metadata", "nested")


@pytest.mark.parametrize(
    "number", ["9223372036854775808", "18446744073709551616", "1" + "0" * 400, "-" + "9" * 30]
)
async def test_huge_integers_are_400(start_kleis, codex_fake, number):
    kleis, account, _, view = await setup(start_kleis, codex_fake)
    cases = [
        ("PATCH", f"/admin/accounts/{account['id']}", f'{{"priority": {number}}}', "priority"),
        ("PATCH", f"/admin/accounts/{account['id']}", f'{{"metadata": {{"n": {number}}}}}', "integer"),
        ("POST", "/admin/keys", f'{{"expiresAt": {number}}}', "expiresAt"),
        ("PATCH", f"/admin/keys/{view['id']}", f'{{"expiresAt": {number}}}', "expiresAt"),
        ("POST", "/admin/accounts/codex/import",
         f'{{"accessToken": "a", "refreshToken": "r", "expiresAt": {number}}}', "expiresAt"),
        ("POST", "/admin/accounts/codex/import", f'{{"label": "x", "priority": {number}}}', "priority"),
    ]  # fmt: skip
    for method, path, body, word in cases:
        bad_request(*await raw(kleis, method, path, body.encode()), word)


async def test_huge_expiry_inside_an_auth_file_is_400(start_kleis, codex_fake, claude_fake, copilot_fake):
    kleis, *_ = await setup(start_kleis, codex_fake)
    grant = claude_fake.grant()
    for expires in ("1e400", "-1e400", "9223372036854775808", "1" + "0" * 40, "NaN", "Infinity", "-Infinity"):
        credentials = (
            f'{{"claudeAiOauth": {{"accessToken": "{grant["access_token"]}", '
            f'"refreshToken": "{grant["refresh_token"]}", "expiresAt": {expires}}}}}'
        )
        # As the file's text, and as the JSON object itself.
        for body in (json.dumps({"authFile": credentials}), f'{{"authFile": {credentials}}}'):
            status, answer = await raw(kleis, "POST", "/admin/accounts/claude/import", body.encode())
            bad_request(status, answer)
        opencode = f'{{"openai": {{"type": "oauth", "access": "a", "refresh": "r", "expires": {expires}}}}}'
        status, answer = await raw(
            kleis, "POST", "/admin/accounts/codex/import", json.dumps({"authFile": opencode}).encode()
        )
        bad_request(status, answer)


async def test_lone_surrogates_are_400(start_kleis, codex_fake):
    kleis, account, _, view = await setup(start_kleis, codex_fake)
    lone = '"\\ud800"'
    cases = [
        ("POST", "/admin/keys", f'{{"label": {lone}}}'),
        ("POST", "/admin/keys", f'{{"modelScopes": [{lone}]}}'),
        ("PATCH", f"/admin/keys/{view['id']}", f'{{"label": {lone}}}'),
        ("PATCH", f"/admin/accounts/{account['id']}", f'{{"label": {lone}}}'),
        ("PATCH", f"/admin/accounts/{account['id']}", f'{{"metadata": {{{lone}: 1}}}}'),
        ("POST", "/admin/accounts/codex/oauth/start", f'{{"options": {{"mode": {lone}}}}}'),
        ("POST", "/admin/accounts/codex/oauth/complete", f'{{"state": {lone}, "code": "x"}}'),
        ("POST", "/admin/accounts/codex/import", f'{{"accessToken": {lone}, "refreshToken": "r"}}'),
        ("POST", "/admin/accounts/copilot/import", '{"authFile": "github.com:\\n  oauth_token: \\udc00x"}'),
    ]
    for method, path, body in cases:
        bad_request(*await raw(kleis, method, path, body.encode()), "Unicode")
    # Undecodable bytes in the body itself.
    bad_request(*await raw(kleis, "POST", "/admin/keys", b'{"label": "\xff\xfe"}'))


async def test_hostile_path_and_query_values_are_4xx(start_kleis, codex_fake):
    kleis, account, _, view = await setup(start_kleis, codex_fake)
    windows = ("²", "٣٠٠٠٠٠", "9" * 5000, "1e5", "-60000", " 60000", "0x10", "%ff", "%ED%A0%80", "\uff160000")
    for window in windows:
        for path in (
            "/admin/usage/dashboard",
            "/admin/keys/usage",
            "/admin/accounts/usage",
            f"/admin/keys/{view['id']}/usage",
            f"/admin/accounts/{account['id']}/usage",
            "/admin/usage/export",
        ):
            status, answer = await raw(kleis, "GET", f"{path}?windowMs={window}")
            bad_request(status, answer, "windowMs")
    for fmt in ("%ff", "%ED%A0%80", "x" * 5000):
        bad_request(*await raw(kleis, "GET", f"/admin/usage/export?format={fmt}"), "format")
    for segment in ("%ff", "%ED%A0%80", "%00", "x" * 3000, "%C0%AF"):
        for method, path in (
            ("GET", f"/admin/accounts/codex/oauth/{segment}"),
            ("PATCH", f"/admin/keys/{segment}"),
            ("GET", f"/admin/keys/{segment}/usage"),
            ("DELETE", f"/admin/accounts/{segment}"),
            ("POST", f"/admin/accounts/{segment}/refresh"),
            ("PATCH", f"/admin/accounts/providers/{segment}"),
        ):
            status, answer = await raw(kleis, method, path, b"{}")
            assert 400 <= status < 500, (method, path, status, answer[:200])
            assert set(json.loads(answer)) == {"error", "message"}


async def test_nul_and_control_characters_in_text_fields_are_400(db_url, start_kleis):
    """PostgreSQL text cannot hold NUL (a 500 there before), and names with control characters
    would reach terminals raw through `keys list`."""
    kleis = await start_kleis(db_url=db_url)
    _, key = await kleis.create_key(label="fine")
    bad = [
        ("POST", "/admin/keys", {"label": "\u0000ctl"}),
        ("POST", "/admin/keys", {"label": "\u001b[31mRED\u001b[0m"}),
        ("POST", "/admin/keys", {"label": "ok", "modelScopes": ["a\u0000b"]}),
        ("POST", "/admin/keys", {"label": "ok", "modelScopes": ["a\nb"]}),
        ("PATCH", f"/admin/keys/{key['id']}", {"label": "\u0000x"}),
    ]
    for method, path, body in bad:
        status, answer = await kleis.admin(method, path, body)
        assert status == 400 and answer["error"] in ("bad_request", "invalid_json"), (body, answer)
    assert [r["label"] for r in await kleis.rows("api_keys")] == ["fine"]
