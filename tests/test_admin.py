"""Admin API and public routes over HTTP: admin auth, lockout, keys, bad input changes nothing."""

import hashlib

import pytest


async def key_rows(instance) -> list[dict]:
    return await instance.rows("api_keys")


async def test_public_routes(start_kleis, http):
    k = await start_kleis()
    async with http.get(k.url + "/healthz") as resp:
        assert resp.status == 200 and await resp.json() == {"ok": True}
    async with http.get(k.url + "/readyz") as resp:
        assert resp.status == 200 and (await resp.json())["database"] == "ok"
    async with http.get(k.url + "/") as resp:
        body = await resp.json()
        assert body["service"] == "kleis" and body["providers"] == ["claude", "codex", "copilot"]
        assert body["configured"] == []
    async with http.get(k.url + "/nope") as resp:
        assert resp.status == 404
        assert await resp.json() == {"error": "not_found", "message": "no route for GET /nope"}


async def test_admin_token_required_and_constant_answers(start_kleis, http):
    k = await start_kleis()
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Basic " + k.admin_token},
        {"x-api-key": k.admin_token},
    ):
        async with http.get(k.url + "/admin/keys", headers=headers) as resp:
            assert resp.status == 401
            assert await resp.json() == {
                "error": "unauthorized",
                "message": "missing or invalid admin bearer token",
            }
            assert resp.headers["cache-control"] == "no-store"
    async with http.get(k.url + "/admin/keys", headers={"Authorization": "bEaReR " + k.admin_token}) as resp:
        assert resp.status == 200


async def test_admin_lockout_after_repeated_failures(start_kleis, http, caplog):
    k = await start_kleis(security={"admin_max_failures": 3, "admin_lockout_seconds": 120})
    for _ in range(3):
        async with http.get(k.url + "/admin/keys", headers={"Authorization": "Bearer nope"}) as resp:
            assert resp.status == 401
    # The operator is told once, with the address (never the tokens tried).
    blocked = [r.getMessage() for r in caplog.records if "refused for" in r.getMessage()]
    assert blocked == ["wrong admin tokens from 127.0.0.1: 3 within 60 s; refused for 120 s"]
    assert "nope" not in caplog.text
    # Locked: even the right token is refused until the lockout ends.
    async with http.get(k.url + "/admin/keys", headers=k.admin_headers) as resp:
        assert resp.status == 429
        assert 110 <= int(resp.headers["retry-after"]) <= 120
        body = await resp.json()
        assert body["error"] == "too_many_requests" and "retry in" in body["message"]


async def test_admin_without_token_configured_is_503(start_kleis, http, monkeypatch):
    k = await start_kleis(admin={"token": ""})
    async with http.get(k.url + "/admin/keys", headers={"Authorization": "Bearer x"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"] == "admin_token_not_configured"


async def test_key_lifecycle(start_kleis, http, db_url):
    k = await start_kleis(db_url=db_url)
    status, body = await k.admin(
        "POST",
        "/admin/keys",
        {"label": " laptop ", "providerScopes": ["codex"], "modelScopes": ["gpt-5.5", "gpt-5.5"]},
    )
    assert status == 201
    view, key = body["key"], body["key"]["key"]
    assert key.startswith("kleis_") and len(key) == 38 and view["keyPrefix"] == key[:12]
    assert (
        view["label"] == "laptop"
        and view["providerScopes"] == ["codex"]
        and view["modelScopes"] == ["gpt-5.5"]
    )
    assert view["modelsDiscoveryToken"].startswith("kmd_")
    assert view["scopedModelsUrl"] == f"{k.url}/api/{view['modelsDiscoveryToken']}"
    assert view["opencode"]["KLEIS_API_KEY"] == key
    rows = await key_rows(k)
    assert len(rows) == 1 and rows[0]["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert key not in str(rows)  # only the hash is stored

    status, listed = await k.admin("GET", "/admin/keys")
    assert status == 200 and len(listed["keys"]) == 1
    assert key not in str(listed) and "key" not in listed["keys"][0]

    _, patched = await k.admin("PATCH", f"/admin/keys/{view['id']}", {"label": "desk", "modelScopes": None})
    assert patched["key"]["label"] == "desk" and patched["key"]["modelScopes"] is None
    assert patched["key"]["providerScopes"] == ["codex"]

    status, body = await k.admin("DELETE", f"/admin/keys/{view['id']}")
    assert status == 400 and "revoke it first" in body["message"]
    assert (await k.admin("POST", f"/admin/keys/{view['id']}/revoke"))[1] == {"revoked": True}
    status, body = await k.admin("POST", f"/admin/keys/{view['id']}/revoke")
    assert status == 404 and body == {
        "error": "not_found",
        "message": "API key was not found or already revoked",
    }
    _, listed = await k.admin("GET", "/admin/keys")
    assert listed["keys"][0]["status"] == "revoked"
    # The revoked key no longer authenticates anywhere.
    async with http.post(
        k.url + "/openai/v1/responses", json={"model": "gpt-5.5"}, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 401
        assert (await resp.json())["error"]["type"] == "authentication_error"
    assert (await k.admin("DELETE", f"/admin/keys/{view['id']}"))[1] == {"deleted": True}
    assert await key_rows(k) == []


@pytest.mark.parametrize(
    ("method", "payload", "message"),
    [
        ("POST", b"{not json", "the request body is not valid JSON"),
        ("POST", b"[1, 2]", "the request body must be a JSON object"),
        ("POST", {"label": 5}, "label must be a string"),
        ("POST", {"label": "x" * 121}, "label must be at most 120 characters"),
        ("POST", {"colour": "red"}, "unknown field(s): colour"),
        ("POST", {"providerScopes": ["openai"]}, "providerScopes: unknown provider(s) openai"),
        ("POST", {"providerScopes": "codex"}, "providerScopes must be a list of non-empty strings"),
        ("POST", {"modelScopes": [""]}, "modelScopes must be a list of non-empty strings"),
        (
            "POST",
            {"accountScopes": ["no-such-account"]},
            "accountScopes must reference existing provider accounts",
        ),
        ("POST", {"expiresAt": 1000}, "expiresAt must be in the future"),
        ("POST", {"expiresAt": "tomorrow"}, "expiresAt must be an integer"),
        ("PATCH", {"expiresAt": 1_600_000_000}, "expiresAt must be in the future"),
        ("PATCH", {"providerScopes": [1]}, "providerScopes must be a list of non-empty strings"),
    ],
)
async def test_bad_key_input_changes_nothing(start_kleis, http, method, payload, message):
    k = await start_kleis()
    _, original = await k.create_key(label="keep")
    before = await key_rows(k)
    path = "/admin/keys" if method == "POST" else f"/admin/keys/{original['id']}"
    kwargs = {"data": payload} if isinstance(payload, bytes) else {"json": payload}
    async with http.request(method, k.url + path, headers=k.admin_headers, **kwargs) as resp:
        assert resp.status == 400
        body = await resp.json()
    assert body["error"] in ("bad_request", "invalid_json") and message in body["message"], body
    assert await key_rows(k) == before


async def test_unknown_ids_are_404_and_change_nothing(start_kleis):
    k = await start_kleis()
    await k.create_key(label="keep")
    before = await key_rows(k)
    for method, path in (
        ("PATCH", "/admin/keys/nope"),
        ("DELETE", "/admin/keys/nope"),
        ("POST", "/admin/keys/nope/revoke"),
        ("GET", "/admin/keys/nope/usage"),
        ("PATCH", "/admin/accounts/nope"),
        ("DELETE", "/admin/accounts/nope"),
        ("POST", "/admin/accounts/nope/primary"),
        ("POST", "/admin/accounts/nope/refresh"),
        ("POST", "/admin/accounts/openai/import"),
        ("POST", "/admin/accounts/nope/oauth/start"),
    ):
        status, body = await k.admin(method, path, {"label": "x"} if method == "PATCH" else None)
        assert status == 404, (method, path, body)
        assert body["error"] == "not_found" and body["message"], body
    assert await key_rows(k) == before


async def test_account_scopes_rules(start_kleis, codex_fake, claude_fake):
    k = await start_kleis()
    a1 = await k.import_account("codex", codex_fake.grant(account_id="a1"))
    a2 = await k.import_account("codex", codex_fake.grant(account_id="a2"))
    c1 = await k.import_account("claude", claude_fake.grant())
    status, body = await k.admin("POST", "/admin/keys", {"accountScopes": [a1["id"], a2["id"]]})
    assert status == 400 and body["message"] == "accountScopes can include at most one account per provider"
    status, body = await k.admin(
        "POST", "/admin/keys", {"providerScopes": ["codex"], "accountScopes": [c1["id"]]}
    )
    assert (
        status == 400
        and body["message"] == "accountScopes must belong to providers allowed by providerScopes"
    )
    status, body = await k.admin("POST", "/admin/keys", {"accountScopes": [a2["id"], c1["id"]]})
    assert status == 201 and body["key"]["accountScopes"] == [a2["id"], c1["id"]]


async def test_key_usage_route_shape(start_kleis):
    k = await start_kleis()
    _, view = await k.create_key(label="x")
    status, body = await k.admin("GET", f"/admin/keys/{view['id']}/usage?windowMs=3600000")
    assert status == 200 and body["apiKeyId"] == view["id"] and body["windowMs"] == 3600000
    assert body["totals"]["requestCount"] == 0 and body["totals"]["successRate"] is None
    assert body["endpoints"] == [] and body["models"] == [] and body["buckets"] == []
    status, body = await k.admin("GET", f"/admin/keys/{view['id']}/usage?windowMs=5")
    assert status == 400 and "windowMs must be an integer" in body["message"]


async def test_account_admin_routes(start_kleis, codex_fake):
    k = await start_kleis()
    first = await k.import_account("codex", codex_fake.grant(account_id="a1"), label="one")
    second = await k.import_account("codex", codex_fake.grant(account_id="a2"), label="two")
    assert first["isPrimary"] and not second["isPrimary"]
    _, listed = await k.admin("GET", "/admin/accounts")
    assert [a["label"] for a in listed["accounts"]] == ["one", "two"]
    for account in listed["accounts"]:
        assert not any("token" in field.lower() for field in account), account  # never tokens
    await k.admin("POST", f"/admin/accounts/{second['id']}/primary", expect=200)
    _, listed = await k.admin("GET", "/admin/accounts")
    assert [(a["label"], a["isPrimary"]) for a in listed["accounts"]] == [("two", True), ("one", False)]
    _, patched = await k.admin("PATCH", f"/admin/accounts/{first['id']}", {"label": "renamed", "priority": 3})
    assert patched["account"]["label"] == "renamed" and patched["account"]["priority"] == 3
    status, body = await k.admin("PATCH", f"/admin/accounts/{first['id']}", {"priority": "high"})
    assert status == 400 and body["message"] == "priority must be an integer"
    # Re-importing the same identity updates the account (label kept), never duplicates it.
    again = await k.import_account("codex", codex_fake.grant(account_id="a1"))
    assert again["id"] == first["id"] and again["label"] == "renamed"
    _, providers_ = await k.admin("PATCH", "/admin/accounts/providers/codex", {"enabled": False})
    assert providers_["provider"] == {
        "provider": "codex",
        "enabled": False,
        "accountCount": 2,
        "enabledAccountCount": 0,
    }
    await k.admin("DELETE", f"/admin/accounts/{second['id']}", expect=200)
    _, listed = await k.admin("GET", "/admin/accounts")
    assert [a["label"] for a in listed["accounts"]] == ["renamed"] and listed["accounts"][0]["isPrimary"]
    status, body = await k.admin(
        "POST", "/admin/accounts/codex/import", {"accessToken": "a", "refreshToken": "r", "expiresAt": 5}
    )
    assert status == 400 and body["message"] == "expiresAt must be in the future"


async def test_metrics_needs_a_token_and_counts_requests(start_kleis, http, codex_fake):
    k = await start_kleis(server={"metrics_token": "scrape-me"})
    await k.import_account("codex", codex_fake.grant())
    key, _ = await k.create_key()
    async with http.get(k.url + "/metrics") as resp:
        assert resp.status == 401
    body = {"model": "gpt-5.5", "input": "hi", "stream": True}
    async with http.post(
        k.url + "/openai/v1/responses", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 200
        await resp.read()
    for token in ("scrape-me", k.admin_token):
        async with http.get(k.url + "/metrics", headers={"Authorization": f"Bearer {token}"}) as resp:
            assert resp.status == 200
            text = await resp.text()
        assert 'kleis_requests_total{provider="codex",endpoint="responses",status="2xx"} 1' in text
        assert 'kleis_ttfb_seconds_count{provider="codex"} 1' in text
        assert 'kleis_accounts{provider="codex",status="ok"} 1' in text
        assert "kleis_usage_queue_depth 1" in text and "kleis_open_streams 0" in text


async def test_no_openapi_docs_and_no_cors(start_kleis, http):
    """sanic-ext stays off: no /docs on a home server, no permissive CORS on the admin API."""
    k = await start_kleis()
    for path in ("/docs", "/docs/swagger", "/docs/openapi.json"):
        async with http.get(k.url + path) as resp:
            assert resp.status == 404, path
    headers = {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}
    async with http.options(k.url + "/admin/keys", headers=headers) as resp:
        assert "access-control-allow-origin" not in resp.headers
    async with http.get(
        k.url + "/admin/keys", headers={**k.admin_headers, "Origin": "https://evil.example"}
    ) as resp:
        assert resp.status == 200 and "access-control-allow-origin" not in resp.headers


async def test_forwarded_for_is_ignored_unless_trusted(start_kleis, http):
    bad = {"Authorization": "Bearer nope"}
    k = await start_kleis(security={"admin_max_failures": 2})
    # Untrusted: a client cannot dodge the lockout by inventing X-Forwarded-For addresses.
    for i in range(2):
        async with http.get(k.url + "/admin/keys", headers={**bad, "X-Forwarded-For": f"10.0.0.{i}"}) as resp:
            assert resp.status == 401
    async with http.get(
        k.url + "/admin/keys", headers={**k.admin_headers, "X-Forwarded-For": "10.0.0.9"}
    ) as resp:
        assert resp.status == 429
    # Trusted (behind the owner's proxy): each forwarded client has its own count.
    t = await start_kleis(server={"trust_forwarded": True}, security={"admin_max_failures": 2})
    for _ in range(2):
        async with http.get(t.url + "/admin/keys", headers={**bad, "X-Forwarded-For": "10.0.0.1"}) as resp:
            assert resp.status == 401
    async with http.get(
        t.url + "/admin/keys", headers={**t.admin_headers, "X-Forwarded-For": "10.0.0.1"}
    ) as resp:
        assert resp.status == 429
    async with http.get(
        t.url + "/admin/keys", headers={**t.admin_headers, "X-Forwarded-For": "10.0.0.2"}
    ) as resp:
        assert resp.status == 200


async def test_account_quota_is_fetched_on_demand_and_cached(start_kleis, codex_fake, copilot_fake):
    k = await start_kleis()
    account = await k.import_account("codex", codex_fake.grant(account_id="acct_q"))
    codex_fake.requests.clear()  # the import checked the token once
    _, body = await k.admin("GET", f"/admin/accounts/{account['id']}/quota", expect=200)
    quota = body["quota"]
    assert quota["error"] is None and quota["fetchedAt"]
    assert quota["data"]["planType"] == "plus"
    assert quota["data"]["primaryWindow"]["usedPercent"] == 12
    (call,) = codex_fake.calls("/wham/usage")
    assert call.headers["chatgpt-account-id"] == "acct_q" and call.headers["authorization"].startswith(
        "Bearer "
    )
    await k.admin("GET", f"/admin/accounts/{account['id']}/quota", expect=200)
    assert len(codex_fake.calls("/wham/usage")) == 1  # cached for 60 s
    copilot = await k.import_account("copilot", copilot_fake.grant())
    _, body = await k.admin("GET", f"/admin/accounts/{copilot['id']}/quota", expect=200)
    assert body == {"quota": None}  # Copilot has no quota endpoint


async def test_a_rejected_refresh_token_is_one_condition_everywhere(start_kleis, codex_fake):
    """The error catalogue: 'needs a new login' is 403 account_needs_reauth on the admin API
    and on the proxy route, each in its own envelope."""
    k = await start_kleis()
    account = await k.import_account("codex", codex_fake.grant())
    key, _ = await k.create_key()
    codex_fake.revoke_refresh_tokens()
    status, body = await k.admin("POST", f"/admin/accounts/{account['id']}/refresh")
    assert status == 403 and body["error"] == "account_needs_reauth" and "log in again" in body["message"]
    _, listed = await k.admin("GET", "/admin/accounts", expect=200)
    assert listed["accounts"][0]["status"] == "needs_reauth"
    async with k.http.post(
        k.url + "/openai/v1/responses",
        json={"model": "gpt-5.5", "input": "hi"},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        answer = await resp.json()
    assert resp.status == 403 and answer["error"]["code"] == "account_needs_reauth"
    assert answer["error"]["type"] == "permission_error"


async def test_integers_beyond_what_json_clients_read_are_a_400(start_kleis, codex_fake):
    k = await start_kleis()
    account = await k.import_account("codex", codex_fake.grant())
    for method, path, body in (
        ("POST", "/admin/keys", {"expiresAt": 10**23}),
        ("PATCH", f"/admin/accounts/{account['id']}", {"priority": 10**23}),
        ("PATCH", f"/admin/accounts/{account['id']}", {"priority": -(2**63)}),
    ):
        status, answer = await k.admin(method, path, body)
        assert status == 400 and answer["error"] == "bad_request" and "between" in answer["message"], answer
    assert await k.rows("api_keys") == []
    (row,) = await k.rows("provider_accounts")
    assert row["priority"] == 0
