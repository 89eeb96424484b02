"""Device logins finished through `POST /admin/accounts/<provider>/oauth/complete` (issue 10):
the call waits (bounded by `[admin] device_wait_seconds`) for Kleis's background poller and
answers 200 with the account, 400 when the login failed or expired, else 202 with the status
route. Driven over HTTP against the GitHub (Copilot) and OpenAI (Codex) device-flow fakes."""

from __future__ import annotations

import asyncio
import time

from runtime import ManualClock
from tests.conftest import wait_for


async def start_login(kleis, provider: str, options: dict | None = None) -> dict:
    body = {"options": options} if options else {}
    _, login = await kleis.admin("POST", f"/admin/accounts/{provider}/oauth/start", body, expect=200)
    assert login["method"] == "device"
    return login


def complete(kleis, provider: str, state: str) -> asyncio.Task:
    """POST oauth/complete in the background; the task's result is (status, body, seconds)."""

    async def call():
        began = time.monotonic()
        status, body = await kleis.admin(
            "POST", f"/admin/accounts/{provider}/oauth/complete", {"state": state}
        )
        return status, body, time.monotonic() - began

    return asyncio.ensure_future(call())


async def polled(fake, path: str, times: int) -> None:
    """Kleis's poller has asked the fake `times` times (so a complete call is waiting now)."""
    await wait_for(lambda: len(fake.calls(path)) >= times)


GITHUB_POLL = "/login/oauth/access_token"
CODEX_POLL = "/api/accounts/deviceauth/token"


async def test_complete_waits_for_approval_and_answers_with_the_account(db_url, start_kleis, copilot_fake):
    copilot_fake.device_interval = 0.02
    kleis = await start_kleis(db_url=db_url)
    login = await start_login(kleis, "copilot")
    waiting = complete(kleis, "copilot", login["state"])
    await polled(copilot_fake, GITHUB_POLL, 3)
    assert not waiting.done()  # still waiting for the user
    copilot_fake.approve_device(login="octo", user_id=4242, email="octo@example.test")
    status, body, took = await waiting
    assert status == 200, body
    account = body["account"]
    assert (account["provider"], account["accountId"], account["label"]) == (
        "copilot",
        "4242",
        "octo@example.test",
    )
    assert body["status"] == "complete" and body["state"] == login["state"]
    assert took < 5
    (row,) = await kleis.rows("provider_accounts")
    assert row["id"] == account["id"]
    # The status route stays, and says the same.
    _, seen = await kleis.admin("GET", f"/admin/accounts/copilot/oauth/{login['state']}", expect=200)
    assert seen["account"]["id"] == account["id"]


async def test_codex_headless_login_completes_through_complete(start_kleis, codex_fake):
    codex_fake.device_interval = "0.02"  # the real endpoint sends a string
    kleis = await start_kleis()
    login = await start_login(kleis, "codex", {"mode": "headless"})
    waiting = complete(kleis, "codex", login["state"])
    await polled(codex_fake, CODEX_POLL, 2)
    assert not waiting.done()
    codex_fake.approve_device(account_id="acct_dev", email="dev@example.com")
    status, body, _ = await waiting
    assert status == 200, body
    assert (body["account"]["accountId"], body["account"]["label"]) == ("acct_dev", "dev@example.com")


async def test_a_denied_login_is_a_400_login_failed(start_kleis, copilot_fake, codex_fake):
    copilot_fake.device_interval = 0.02
    codex_fake.device_interval = "0.02"
    kleis = await start_kleis()
    login = await start_login(kleis, "copilot")
    waiting = complete(kleis, "copilot", login["state"])
    await polled(copilot_fake, GITHUB_POLL, 2)
    copilot_fake.deny_device()
    status, body, _ = await waiting
    assert (status, body["error"]) == (400, "login_failed"), body
    assert "denied" in body["message"]

    login = await start_login(kleis, "codex", {"mode": "headless"})
    waiting = complete(kleis, "codex", login["state"])
    await polled(codex_fake, CODEX_POLL, 1)
    codex_fake.device_script.append("denied")
    status, body, _ = await waiting
    assert (status, body["error"]) == (400, "login_failed"), body
    assert await kleis.rows("provider_accounts") == []
    # Asked again, the same answer at once.
    status, again = await kleis.admin(
        "POST", "/admin/accounts/codex/oauth/complete", {"state": login["state"]}
    )
    assert (status, again["error"]) == (400, "login_failed")


async def test_a_login_that_expires_while_waiting_is_a_400_login_expired(start_kleis, copilot_fake):
    copilot_fake.device_interval = 0.02
    clock = ManualClock()
    kleis = await start_kleis(clock=clock)
    login = await start_login(kleis, "copilot")
    waiting = complete(kleis, "copilot", login["state"])
    await polled(copilot_fake, GITHUB_POLL, 2)
    clock.advance(login["expiresAt"] - clock.now() + 1000)  # the poller gives up at its next round
    status, body, _ = await waiting
    assert (status, body["error"]) == (400, "login_expired"), body
    assert "expired" in body["message"]


async def test_no_answer_within_the_wait_is_202_with_the_status_route(start_kleis, copilot_fake):
    copilot_fake.device_interval = 0.02
    kleis = await start_kleis(admin={"device_wait_seconds": 0.3})
    login = await start_login(kleis, "copilot")
    status, body, took = await complete(kleis, "copilot", login["state"])
    assert status == 202, body
    assert body["status"] == "pending" and "account" not in body
    assert body["statusUrl"] == f"/admin/accounts/copilot/oauth/{login['state']}"
    assert 0.3 <= took < 3
    pending, _ = await kleis.admin("GET", body["statusUrl"])
    assert pending == 202
    copilot_fake.approve_device(login="mona", user_id=7)

    async def done():
        code, seen = await kleis.admin("GET", body["statusUrl"])
        return code == 200 and seen

    assert (await wait_for(done))["account"]["accountId"] == "7"


async def test_a_login_polled_by_another_instance_is_seen(pg_url, start_kleis, copilot_fake):
    """Two instances on one PostgreSQL database: A polls the provider, B's complete call sees
    A finish it by reading the login again (no event of its own to wake it)."""
    copilot_fake.device_interval = 0.02
    polling = await start_kleis(db_url=pg_url)
    other = await start_kleis(db_url=pg_url)
    other.services.logins.RECHECK_S = 0.1  # the default 2 s, shortened for the test
    login = await start_login(polling, "copilot")
    waiting = complete(other, "copilot", login["state"])
    await polled(copilot_fake, GITHUB_POLL, 2)
    assert not waiting.done()
    copilot_fake.approve_device(login="octo", user_id=99)
    status, body, _ = await waiting
    assert status == 200, body
    assert body["account"]["accountId"] == "99"
