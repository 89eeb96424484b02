"""The admin page (static/, SPEC S11) in real Chromium, against the running app and the fakes.

Debian's Chromium (/usr/bin/chromium) driven by Playwright. The tests skip only when it is
absent on a developer's machine; CI sets KLEIS_REQUIRE_CHROMIUM=1 and they fail instead.
Every screen is checked for console errors, failed requests and HTTP errors the test did not
cause on purpose, and scanned with axe-core (no serious or critical violations). Screenshots
(desktop and phone, light and dark) go to tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.conftest import DATA

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
HERE = Path(__file__).parent
ARTIFACTS = HERE / "artifacts"
AXE = HERE / "vendor" / "axe.min.js"
STATIC = HERE.parent / "static"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 900}
TIMEOUT = 10_000  # ms, for expect(): background work shows up on its own, no sleeps


def chromium_or_skip():
    if CHROMIUM.exists():
        return
    if os.environ.get("KLEIS_REQUIRE_CHROMIUM") or os.environ.get("CI"):
        pytest.fail(
            f"{CHROMIUM} is required (KLEIS_REQUIRE_CHROMIUM/CI) but absent: apt-get install chromium"
        )
    pytest.skip(f"{CHROMIUM} is absent (apt-get install chromium)")


@pytest.fixture
async def browser():
    chromium_or_skip()
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        await browser.close()


class Watch:
    """What went wrong on a page: console errors, uncaught exceptions, failed requests and
    HTTP errors. `check()` asserts only the expected ones happened, then starts over."""

    def __init__(self, page):
        self.errors: list[str] = []
        self.failed: list[str] = []
        self.statuses: list[tuple[int, str]] = []
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.failed.append(f"{r.method} {r.url}: {r.failure}"))
        page.on(
            "response",
            lambda r: self.statuses.append((r.status, urlsplit(r.url).path)) if r.status >= 400 else None,
        )

    def check(self, screen: str, expected: list[tuple[int, str]] = ()) -> None:
        assert self.statuses == list(expected), (screen, self.statuses)
        # Chromium logs every 4xx/5xx fetch as "Failed to load resource"; those are the expected ones.
        loads = [e for e in self.errors if e.startswith("Failed to load resource")]
        others = [e for e in self.errors if not e.startswith("Failed to load resource")]
        assert others == [] and len(loads) == len(expected), (screen, self.errors)
        assert self.failed == [], (screen, self.failed)
        self.errors.clear()
        self.failed.clear()
        self.statuses.clear()


async def axe_scan(page, screen: str) -> None:
    if not await page.evaluate("typeof window.axe !== 'undefined'"):
        await page.evaluate(AXE.read_text())  # through DevTools: the page's CSP stays strict
    result = await page.evaluate(
        "axe.run(document, {resultTypes: ['violations'],"
        " runOnly: {type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}})"
    )
    serious = [
        (v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3])
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert serious == [], (screen, serious)


async def shoot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    return path


async def sign_in(page, token: str) -> None:
    await page.get_by_label("Admin token").fill(token)
    await page.get_by_role("button", name="Sign in").click()


async def open_tab(page, name: str) -> None:
    await page.get_by_role("navigation", name="Sections").get_by_role("link", name=name).click()


# ── the static routes, without a browser ─────────────────────────────────────


async def test_page_routes_headers_and_json_404s(start_kleis, http):
    kleis = await start_kleis()
    for path in ("/admin/", "/admin/index.html", "/admin"):
        async with http.get(kleis.url + path) as resp:
            assert resp.status == 200, path
            assert resp.headers["content-type"] == "text/html; charset=utf-8"
            page = await resp.text()
            assert '<script type="module" src="static/app.js">' in page and "<style" not in page
            csp = resp.headers["content-security-policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp
            assert resp.headers["x-content-type-options"] == "nosniff"
            assert resp.headers["referrer-policy"] == "no-referrer"
            assert resp.headers["cache-control"] == "no-cache"
            etag = resp.headers["etag"]
    async with http.get(kleis.url + "/admin/", headers={"if-none-match": etag}) as resp:
        assert resp.status == 304
    async with http.get(kleis.url + "/admin/static/app.js") as resp:
        assert resp.status == 200 and resp.headers["content-type"] == "text/javascript; charset=utf-8"
        assert "nosniff" in resp.headers["x-content-type-options"]
    for path in ("/admin/static/../kleis.py", "/admin/static/README.md", "/admin/static/nope.js"):
        async with http.get(kleis.url + path) as resp:
            assert resp.status == 404 and (await resp.json())["error"] == "not_found", path
    # The admin API keeps answering JSON, and unknown admin paths are JSON 404s, not the page.
    async with http.get(kleis.url + "/admin/nope", headers=kleis.admin_headers) as resp:
        assert resp.status == 404 and (await resp.json())["error"] == "not_found"
    async with http.get(kleis.url + "/admin/accounts") as resp:
        assert resp.status == 401
    # No inline script or style anywhere in static/, and the whole page stays small.
    total = 0
    for file in STATIC.iterdir():
        total += file.stat().st_size
        if file.suffix in (".html", ".js"):
            text = file.read_text()
            assert not re.search(r"<script>|<script(?![^>]*\bsrc=)[^>]*>|\sstyle=|\son[a-z]+=\"", text), (
                file.name
            )
            assert ".innerHTML" not in text and "insertAdjacentHTML" not in text, file.name
    assert total <= 150 * 1024, total


# ── the whole owner's day, desktop ───────────────────────────────────────────


async def test_owner_flow_in_chromium(start_kleis, browser, codex_fake, claude_fake, copilot_fake, http):
    from playwright.async_api import expect

    codex_fake.device_interval = "0.02"
    copilot_fake.users["gho_fakeLegacyToken0000000000000000000"] = {"id": 13, "login": "octo", "email": None}
    kleis = await start_kleis()
    context = await browser.new_context(viewport=DESKTOP, color_scheme="light")
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(kleis.url + "/admin/")

    # Sign in: a wrong token first.
    await sign_in(page, "kla_wrong")
    await expect(page.locator("#login-error")).to_have_text(re.compile("not right"), timeout=TIMEOUT)
    watch.check("wrong token", [(401, "/admin/accounts/providers")])
    assert await page.evaluate("sessionStorage.length") == 0 and "kla_" not in page.url
    await axe_scan(page, "login")
    await sign_in(page, kleis.admin_token)
    await expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
    await expect(page.locator("#kpi-requests .value")).to_have_text("0")
    assert kleis.admin_token not in page.url
    watch.check("empty dashboard")

    # Connect Codex with the device flow.
    await open_tab(page, "Accounts")
    await expect(page.get_by_role("heading", name="Connect an account")).to_be_visible()
    await page.get_by_label("Account type").select_option("codex-device")
    await page.get_by_role("button", name="Start login").click()
    await expect(page.locator("#connect-usercode")).not_to_be_empty()
    await expect(page.get_by_role("button", name="Copy user code")).to_be_visible()
    codex_fake.approve_device(account_id="acct_dev", email="dev@example.com")
    await expect(page.locator("#connect-flow")).to_contain_text(
        "Connected OpenAI Codex account dev@example.com", timeout=TIMEOUT
    )
    await expect(page.get_by_role("article", name="OpenAI Codex account dev@example.com")).to_be_visible()

    # Connect Claude Pro/Max with the paste flow (the fake approves at once and shows code#state).
    await page.get_by_label("Account type").select_option("claude-max")
    await page.get_by_role("button", name="Start login").click()
    url = await page.locator("#connect-url").get_attribute("href")
    assert url.startswith(claude_fake.url + "/oauth/authorize?")
    async with http.get(url) as resp:
        pasted = await resp.text()
    await page.get_by_label(re.compile("Paste the code")).fill(pasted)
    await page.get_by_role("button", name="Finish login").click()
    await expect(page.locator("#connect-flow")).to_contain_text("Connected Anthropic Claude account")
    claude = page.get_by_role("article", name=re.compile("^Anthropic Claude account"))
    await expect(claude).to_be_visible()

    # Import a GitHub CLI hosts.yml by choosing the file.
    await page.get_by_label("Provider", exact=True).select_option("copilot")
    await page.get_by_label("Choose a file").set_input_files(str(DATA / "copilot-gh-hosts.yml"))
    await expect(page.get_by_label("…or paste its contents")).to_have_value(re.compile("oauth_token"))
    await page.get_by_role("button", name="Import", exact=True).click()
    await expect(page.locator("#import-result")).to_contain_text("Imported 1 GitHub Copilot account: octo")
    await expect(page.get_by_role("article", name="GitHub Copilot account octo")).to_be_visible()
    accounts = {a["provider"]: a for a in (await kleis.admin("GET", "/admin/accounts"))[1]["accounts"]}
    assert set(accounts) == {"codex", "claude", "copilot"}

    # Relabel the Claude account and give it a priority.
    await claude.get_by_text("Edit label and priority").click()
    await claude.get_by_label("Label").fill("claude max")
    await claude.get_by_label(re.compile("Priority")).fill("3")
    await claude.get_by_role("button", name="Save").click()
    claude = page.get_by_role("article", name="Anthropic Claude account claude max")
    await expect(claude).to_contain_text("priority 3")
    # Disable and enable again; the provider cards follow.
    await claude.get_by_role("button", name="Disable: claude max").click()
    await expect(claude).to_contain_text("disabled")
    await claude.get_by_role("button", name="Enable: claude max").click()
    await expect(claude).to_contain_text("Serving requests")
    watch.check("accounts")
    await axe_scan(page, "accounts")
    await shoot(page, "admin-desktop-light-accounts")

    # A scoped key, shown once.
    await open_tab(page, "Keys")
    form = page.locator("#key-form")
    await form.get_by_label("Label").fill("laptop")
    await form.get_by_label("OpenAI Codex", exact=True).check()
    await form.get_by_label("Anthropic Claude", exact=True).check()
    await form.get_by_label("OpenAI Codex account").select_option(accounts["codex"]["id"])
    await form.get_by_label("Anthropic Claude account").select_option(accounts["claude"]["id"])
    await form.get_by_label("Expires").select_option("30")
    await form.get_by_role("button", name="Create key").click()
    new_key = page.locator("#new-key")
    await expect(new_key).to_have_text(re.compile(r"^kleis_[0-9a-f]{32}$"))
    key = await new_key.text_content()
    reveal = page.locator("#key-reveal")
    await expect(reveal).to_contain_text("never show it again")
    await expect(reveal.locator("details").first).to_contain_text(f'KLEIS_API_KEY="{key}"')
    for name, needle in (
        ("Claude Code", f'ANTHROPIC_BASE_URL="{kleis.url}/anthropic"'),
        ("Codex CLI", f'base_url = "{kleis.url}/openai/v1"'),
        ("Python SDKs", f'OpenAI(base_url="{kleis.url}/openai/v1", api_key="{key}")'),
    ):
        await reveal.get_by_text(name, exact=True).click()
        await expect(reveal).to_contain_text(needle)
    assert "copilot/v1" not in await reveal.text_content()  # not in the key's scope
    await reveal.get_by_role("button", name="I have copied it").click()
    await expect(reveal).to_be_hidden()
    assert key not in await page.content()
    card = page.get_by_role("article", name="Key laptop")
    await expect(card).to_contain_text(key[:12] + "…")
    await expect(card).to_contain_text("OpenAI Codex, Anthropic Claude · only dev@example.com, claude max")
    (view,) = (await kleis.admin("GET", "/admin/keys"))[1]["keys"]
    assert view["providerScopes"] == ["codex", "claude"] and view["accountScopes"] == [
        accounts["codex"]["id"],
        accounts["claude"]["id"],
    ]
    watch.check("keys")
    await axe_scan(page, "keys")

    # Traffic through the proxy with that key: 2 Codex, 1 Claude, and one out of its scope.
    auth = {"authorization": f"Bearer {key}"}
    for _ in range(2):
        async with http.post(
            kleis.url + "/openai/v1/responses", json={"model": "gpt-5.5", "input": "hi"}, headers=auth
        ) as r:
            assert r.status == 200, await r.text()
    body = {"model": "claude-sonnet-4-5", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(kleis.url + "/anthropic/v1/messages", json=body, headers=auth) as r:
        assert r.status == 200, await r.text()
    chat = {"model": "gpt-4.1", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(kleis.url + "/copilot/v1/chat/completions", json=chat, headers=auth) as r:
        assert r.status == 403
    await kleis.flush()
    _, report = await kleis.admin("GET", "/admin/usage/dashboard?windowMs=3600000", expect=200)
    totals = report["totals"]
    assert totals["requestCount"] == 3  # a key refused for its scope is not a request

    # The dashboard shows what was sent.
    await open_tab(page, "Dashboard")
    await page.get_by_label("Window").select_option("3600000")
    await expect(page.locator("#kpi-requests .value")).to_have_text(str(totals["requestCount"]))
    # The charts are of the chosen window: one bar slot per bucket of the report.
    await expect(page.locator("#chart-requests svg")).to_have_attribute(
        "aria-label", re.compile(rf"^Requests over time: 3 requests in {len(report['buckets'])} intervals")
    )
    await expect(page.locator("#kpi-requests")).to_contain_text("none in the previous hour")
    assert totals["requestCount"] == sum(p["requestCount"] for p in report["byProvider"])
    providers = {p["provider"]: p["requestCount"] for p in report["byProvider"]}
    assert providers.get("codex") == 2 and providers.get("claude") == 1
    by_provider = page.get_by_role("table", name="By provider")
    await expect(by_provider.get_by_role("row", name=re.compile("^OpenAI Codex 2 "))).to_be_visible()
    await expect(by_provider.get_by_role("row", name=re.compile("^Anthropic Claude 1 "))).to_be_visible()
    await expect(page.locator("#kpi-success .value")).to_have_text(f"{totals['successRate']}%")
    tokens = sum(totals[t] for t in ("inputTokens", "outputTokens", "cacheReadTokens", "cacheWriteTokens"))
    assert tokens > 0
    await expect(page.locator("#kpi-tokens .value")).to_have_text(re.compile(rf"^{tokens:,}$|k$|M$"))
    by_key = page.get_by_role("table", name="By key")
    await expect(by_key.get_by_role("row", name=re.compile(r"^laptop \(kleis_"))).to_contain_text(
        str(totals["requestCount"])
    )
    # The charts hold the same numbers: hover the last bucket.
    chart = page.locator("#chart-requests svg")
    await chart.focus()
    await page.keyboard.press("End")
    await expect(page.locator("#chart-requests .readout")).to_contain_text(
        f"{totals['requestCount']} requests"
    )
    await page.locator("#chart-tokens svg").hover()
    await expect(page.locator("#chart-tokens .readout")).to_contain_text("tokens")
    watch.check("dashboard")
    await axe_scan(page, "dashboard")
    await shoot(page, "admin-desktop-light-dashboard")
    await page.emulate_media(color_scheme="dark")
    await shoot(page, "admin-desktop-dark-dashboard")
    await page.emulate_media(color_scheme="light")

    # Per-key usage, then revoke and delete it.
    await open_tab(page, "Keys")
    await page.get_by_label("Usage over").select_option("3600000")
    card = page.get_by_role("article", name="Key laptop")
    await expect(card.locator(".key-usage")).to_contain_text(f"{totals['requestCount']} requests")
    await card.get_by_role("button", name="Usage: key laptop").click()
    await expect(page.locator("#detail-requests")).to_have_text(str(totals["requestCount"]))
    await axe_scan(page, "key usage")
    await page.get_by_role("button", name="Close").click()
    await card.get_by_role("button", name="Revoke: key laptop").click()
    await expect(page.locator("#confirm-title")).to_have_text("Revoke the key “laptop”?")
    await page.locator("#confirm-ok").click()
    await expect(page.get_by_role("article", name="Key laptop")).to_be_hidden()
    async with http.post(
        kleis.url + "/openai/v1/responses", json={"model": "gpt-5.5", "input": "x"}, headers=auth
    ) as r:
        assert r.status == 401
    await page.get_by_label("Show revoked").check()
    card = page.get_by_role("article", name="Key laptop")
    await expect(card).to_contain_text("revoked")
    await card.get_by_role("button", name="Delete: key laptop").click()
    await page.locator("#confirm-ok").click()
    await expect(page.locator("#key-list")).to_contain_text("No keys yet")
    watch.check("revoke")

    # Account controls: primary, refresh, delete with a confirmation naming it.
    await open_tab(page, "Accounts")
    octo = page.get_by_role("article", name="GitHub Copilot account octo")
    await octo.get_by_role("button", name="Refresh now: octo").click()
    await expect(page.locator("#announcer")).to_have_text("Refreshed the token of octo")
    await octo.get_by_role("button", name="Delete: octo").click()
    await expect(page.locator("#confirm-title")).to_have_text("Delete the account “octo”?")
    await page.get_by_role("button", name="Cancel").click()
    await expect(octo).to_be_visible()
    await octo.get_by_role("button", name="Delete: octo").click()
    await page.locator("#confirm-ok").click()
    await expect(octo).to_be_hidden()
    assert "copilot" not in {
        a["provider"] for a in (await kleis.admin("GET", "/admin/accounts"))[1]["accounts"]
    }
    watch.check("account controls")

    # Sign out forgets the token.
    await page.get_by_role("button", name="Sign out").click()
    await expect(page.get_by_label("Admin token")).to_be_visible()
    assert await page.evaluate("sessionStorage.getItem('kleis.adminToken')") is None
    watch.check("sign out")
    await context.close()


# ── a phone, dark and light; the lockout ─────────────────────────────────────


async def test_phone_screens_and_lockout(start_kleis, browser, codex_fake):
    from playwright.async_api import expect

    kleis = await start_kleis(security={"admin_max_failures": 2, "admin_lockout_seconds": 300})
    await kleis.import_account("codex", codex_fake.grant(), label="phone test")
    for scheme in ("light", "dark"):
        context = await browser.new_context(
            viewport=PHONE, color_scheme=scheme, is_mobile=True, has_touch=True, device_scale_factor=2
        )
        page = await context.new_page()
        watch = Watch(page)
        await page.goto(kleis.url + "/admin")  # no slash: the page still loads its modules
        await sign_in(page, kleis.admin_token)
        await expect(page.locator("#kpi-requests .value")).to_have_text("0")
        for tab, heading in (("Dashboard", "Dashboard"), ("Accounts", "Accounts"), ("Keys", "API keys")):
            await open_tab(page, tab)
            await expect(page.get_by_role("heading", name=heading, exact=True)).to_be_visible()
            if tab == "Accounts":
                await expect(
                    page.get_by_role("article", name="OpenAI Codex account phone test")
                ).to_be_visible()
            # Nothing is wider than the phone.
            assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], tab
            watch.check(f"phone {tab}")
            await axe_scan(page, f"phone {scheme} {tab}")
            await shoot(page, f"admin-phone-{scheme}-{tab.lower()}")
        if scheme == "dark":  # a key created on the phone: the key and its copy button fit
            await page.locator("#key-form").get_by_label("Label").fill("phone")
            await page.get_by_role("button", name="Create key").click()
            await expect(page.locator("#new-key")).to_have_text(re.compile("^kleis_"))
            await expect(page.get_by_role("button", name="Copy API key")).to_be_visible()
            assert await page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
            await shoot(page, "admin-phone-dark-new-key")
            watch.check("phone key")
        await context.close()

    # Wrong tokens until the address is locked out: the page says for how long.
    context = await browser.new_context(viewport=DESKTOP)
    page = await context.new_page()
    watch = Watch(page)
    await page.goto(kleis.url + "/admin/")
    for _ in range(2):
        await sign_in(page, "kla_wrong")
        await expect(page.locator("#login-error")).to_have_text(re.compile("not right"))
        await page.locator("#login-error").evaluate("e => e.textContent = ''")
    await sign_in(page, "kla_wrong")
    await expect(page.locator("#login-error")).to_have_text(
        re.compile(r"Too many wrong admin tokens from this address\. Try again in (4|5) min \d+ s\.")
    )
    watch.check("lockout", [(401, "/admin/accounts/providers")] * 2 + [(429, "/admin/accounts/providers")])
    await axe_scan(page, "lockout")
    await shoot(page, "admin-desktop-light-lockout")
    await context.close()
