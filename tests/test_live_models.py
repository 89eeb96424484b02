"""Live model lists (issue 9): discovery offers what each provider's accounts can use today.

Kleis asks each account's provider for its model list in the background (Codex
`GET /models?client_version=…`, Copilot `GET /models`, Anthropic `GET /v1/models`), merges it
with the catalogue's metadata, and falls back to the catalogue offline. These tests run the
real app against the loopback fakes and read `/api.json`, the SDK model lists and the admin
API. Lists are fetched by the background task (polled with a deadline) or on demand with
`GET /admin/accounts/{id}/models?refresh=1`.
"""

from __future__ import annotations

import pytest

from tests.conftest import wait_for
from tests.fakes import Reply

LIVE = {"models": {"account_lists": True}}
CODEX_LISTED = {
    "gpt-6-astra",
    "gpt-6.1-sol",
    "gpt-6.1-terra",
    "gpt-6-sol",
    "gpt-6-luna",
    "gpt-5.6-sol",
    "gpt-5.6-terra",
    "gpt-5.6-luna",
    "gpt-5.5",
}
CODEX_HIDDEN = {"gpt-daybreak-blue-latest", "gpt-daybreak-red-latest", "codex-auto-review"}


async def kleis_models(kleis, path: str = "/api.json") -> dict:
    async with kleis.http.get(kleis.url + path) as resp:
        assert resp.status == 200
        return (await resp.json())["kleis"]["models"]


def route_ids(models: dict, api_suffix: str) -> set[str]:
    return {m["id"] for m in models.values() if m["provider"]["api"].endswith(api_suffix)}


async def refresh(kleis, account_id: str) -> dict:
    _, body = await kleis.admin("GET", f"/admin/accounts/{account_id}/models?refresh=1", expect=200)
    return body


async def test_background_fetch_replaces_the_catalogue_rule(
    start_kleis, codex_fake, claude_fake, copilot_fake
):
    kleis = await start_kleis(**LIVE)
    codex = await kleis.import_account("codex", codex_fake.grant(), label="codex")
    before = route_ids(await kleis_models(kleis), "/openai/v1")
    assert (
        "gpt-5.4-mini" in before and "gpt-6.1-terra" not in before
    )  # the offline rule (snapshot + version floor) until a list arrives

    async def listed():
        return "gpt-6.1-terra" in route_ids(await kleis_models(kleis), "/openai/v1")

    await wait_for(listed, timeout=30)  # the background task picks the new account up
    models = await kleis_models(kleis)
    assert route_ids(models, "/openai/v1") == CODEX_LISTED
    (call,) = codex_fake.calls("/models")
    assert call.query["client_version"] == "0.169.0"
    assert call.headers["authorization"].startswith("Bearer ") and call.headers["chatgpt-account-id"]

    # Known to the catalogue: its metadata (costs, dates) with the backend's own window.
    known = models["gpt-5.5"]
    assert known["cost"]["input"] == 5 and known["release_date"] == "2026-04-23"
    assert known["limit"]["context"] == 272_000 and known["limit"]["input"] <= 272_000
    assert known["limit"]["output"] == 128_000 and known["name"] == "GPT-5.5 (codex)"
    # Unknown to the catalogue: a sane entry from what the backend said.
    fresh = models["gpt-6.1-terra"]
    assert (
        fresh["name"].endswith("(codex)") and fresh["limit"]["context"] > 0 and fresh["limit"]["output"] > 0
    )
    assert fresh["modalities"]["input"] == ["text", "image"] and fresh["attachment"] is True
    assert fresh["reasoning"] is True and fresh["tool_call"] is True
    assert fresh["provider"]["npm"] == "@ai-sdk/openai"

    _, listing = await kleis.admin("GET", "/admin/accounts", expect=200)
    (view,) = [a for a in listing["accounts"] if a["id"] == codex["id"]]
    assert view["models"]["source"] == "provider" and set(view["models"]["ids"]) == CODEX_LISTED


async def test_every_provider_offers_its_listed_models_everywhere(
    start_kleis, codex_fake, claude_fake, copilot_fake, http
):
    kleis = await start_kleis(**LIVE)
    accounts = {
        name: await kleis.import_account(name, fake.grant(), label=name)
        for name, fake in (("codex", codex_fake), ("claude", claude_fake), ("copilot", copilot_fake))
    }
    listed = {
        name: {m["id"] for m in (await refresh(kleis, a["id"]))["models"]} for name, a in accounts.items()
    }
    assert listed["codex"] == CODEX_LISTED and not listed["codex"] & CODEX_HIDDEN
    assert listed["claude"] == {m["id"] for m in claude_fake.models}
    assert listed["copilot"] and listed["copilot"] < {m["id"] for m in copilot_fake.models}

    models = await kleis_models(kleis)
    # Copilot's prompt limit (max_prompt_tokens) is below its window: it becomes limit.input.
    assert models["github-copilot/gpt-5-mini"]["limit"] == {
        "context": 264_000,
        "input": 128_000,
        "output": 64_000,
    }
    key, _ = await kleis.create_key(label="all")
    auth = {"authorization": f"Bearer {key}"}
    for name, suffix in (("codex", "/openai/v1"), ("claude", "/anthropic/v1"), ("copilot", "/copilot/v1")):
        assert route_ids(models, suffix) == listed[name], name
        async with http.get(kleis.url + suffix + "/models", headers=auth, params={"limit": "1000"}) as resp:
            assert {m["id"] for m in (await resp.json())["data"]} == listed[name]
        one = sorted(listed[name])[0]
        async with http.get(kleis.url + f"{suffix}/models/{one}", headers=auth) as resp:
            assert resp.status == 200 and (await resp.json())["id"] == one


async def test_offline_falls_back_and_a_failed_refetch_keeps_the_last_list(start_kleis, codex_fake):
    kleis = await start_kleis(**LIVE)
    codex_fake.models_status = 503
    account = await kleis.import_account("codex", codex_fake.grant(), label="codex")
    failed = await refresh(kleis, account["id"])
    assert failed["source"] == "catalogue" and failed["models"] == [] and "503" in failed["error"]
    offline = route_ids(await kleis_models(kleis), "/openai/v1")
    assert "gpt-5.5" in offline and "gpt-6.1-terra" not in offline  # the snapshot rule serves

    codex_fake.models_status = 200
    assert (await refresh(kleis, account["id"]))["source"] == "provider"
    codex_fake.models_payload = "not json"
    again = await refresh(kleis, account["id"])
    assert (
        again["source"] == "provider"
        and again["error"]
        and {m["id"] for m in again["models"]} == CODEX_LISTED
    )
    assert route_ids(await kleis_models(kleis), "/openai/v1") == CODEX_LISTED


async def test_a_key_scoped_to_accounts_sees_what_those_accounts_offer(start_kleis, claude_fake, http):
    kleis = await start_kleis(**LIVE)
    first = await kleis.import_account("claude", claude_fake.grant("uuid-1", "one@example.com"), label="one")
    second = await kleis.import_account("claude", claude_fake.grant("uuid-2", "two@example.com"), label="two")
    everything = list(claude_fake.models)
    claude_fake.models = everything[:2]
    await refresh(kleis, first["id"])
    claude_fake.models = everything[1:4]
    await refresh(kleis, second["id"])
    ids = [m["id"] for m in everything]

    _, scoped_one = await kleis.admin("POST", "/admin/keys", {"label": "one", "accountScopes": [first["id"]]})
    _, scoped_two = await kleis.admin(
        "POST", "/admin/keys", {"label": "two", "accountScopes": [second["id"]]}
    )
    for view, expected in ((scoped_one, ids[:2]), (scoped_two, ids[1:4])):
        async with http.get(view["key"]["scopedModelsUrl"] + "/api.json") as resp:  # as OpenCode asks
            models = (await resp.json())["kleis"]["models"]
        assert route_ids(models, "/anthropic/v1") == set(expected)
        auth = {"x-api-key": view["key"]["key"]}
        async with http.get(kleis.url + "/anthropic/v1/models", headers=auth) as resp:
            assert [m["id"] for m in (await resp.json())["data"]] == expected
    assert route_ids(await kleis_models(kleis), "/anthropic/v1") == set(ids[:4])


@pytest.mark.parametrize("reply", [Reply(status=401, body={"error": "bad token"}), Reply(drop=True)])
async def test_list_failures_are_reported_not_raised(start_kleis, claude_fake, reply):
    kleis = await start_kleis(**LIVE)
    account = await kleis.import_account("claude", claude_fake.grant(), label="main")
    claude_fake.models_reply = reply
    view = await refresh(kleis, account["id"])
    assert view["source"] == "catalogue" and view["error"]
    assert claude_fake.grant()["access_token"] not in view["error"]
    models = await kleis_models(kleis)
    assert route_ids(models, "/anthropic/v1")  # the catalogue still serves


async def test_what_a_provider_lists_is_checked_before_it_is_believed(start_kleis, codex_fake, claude_fake):
    """An empty list keeps the last good one; ids that cannot be model ids are left out;
    `visibility` is read in any case; Anthropic's own limits and dates are used."""
    kleis = await start_kleis(**LIVE)
    codex = await kleis.import_account("codex", codex_fake.grant(), label="codex")
    assert (await refresh(kleis, codex["id"]))["source"] == "provider"

    codex_fake.models_payload = {"models": []}
    empty = await refresh(kleis, codex["id"])
    assert empty["error"] == "the provider listed no usable models"
    assert {m["id"] for m in empty["models"]} == CODEX_LISTED  # the last good list serves on

    entry = {"display_name": "X", "visibility": "list", "supported_in_api": True, "context_window": 1000}
    codex_fake.models_payload = {
        "models": [
            {**entry, "slug": "gpt-7"},
            {**entry, "slug": "has space"},
            {**entry, "slug": "../../etc"},
            {**entry, "slug": "g" * 5000},
            {**entry, "slug": "gpt-secret", "visibility": "HIDE"},
        ]
    }
    checked = await refresh(kleis, codex["id"])
    assert [m["id"] for m in checked["models"]] == ["gpt-7"] and checked["error"] is None
    assert route_ids(await kleis_models(kleis), "/openai/v1") == {"gpt-7"}

    claude_fake.models = [
        {
            "type": "model",
            "id": "claude-next-9",
            "display_name": "Claude Next 9",
            "created_at": "2026-10-01T00:00:00Z",
            "max_input_tokens": 500_000,
            "max_tokens": 100_000,
        }
    ]
    claude = await kleis.import_account("claude", claude_fake.grant(), label="claude")
    await refresh(kleis, claude["id"])
    model = (await kleis_models(kleis))["anthropic/claude-next-9"]
    assert model["limit"] == {"context": 500_000, "output": 100_000}
    assert model["release_date"] == "2026-10-01"


async def test_an_account_that_needs_a_new_login_says_so(start_kleis, claude_fake):
    kleis = await start_kleis(**LIVE)
    account = await kleis.import_account("claude", claude_fake.grant(), label="main")
    assert (await refresh(kleis, account["id"]))["source"] == "provider"
    claude_fake.refresh_tokens.clear()  # the refresh token is dead
    await kleis.admin("POST", f"/admin/accounts/{account['id']}/refresh", expect=403)
    view = await refresh(kleis, account["id"])
    assert view["error"] == "the account needs a new login"


async def test_a_redirect_is_not_followed_for_a_model_list(start_kleis, claude_fake):
    kleis = await start_kleis(**LIVE)
    account = await kleis.import_account("claude", claude_fake.grant(), label="main")
    claude_fake.models_reply = Reply(
        status=302, body={}, headers={"Location": claude_fake.url + "/v1/models"}
    )
    view = await refresh(kleis, account["id"])
    assert view["source"] == "catalogue" and "302" in view["error"]
    assert len(claude_fake.calls("/v1/models")) == 1
