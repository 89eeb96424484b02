"""Client-chosen session ids and prompts cost bounded memory (issue 13, point 3).

A session id (`prompt_cache_key`, `x-session-id`, Claude's `metadata.user_id`) is the
client's string and may be a megabyte long; Kleis remembers sessions (sticky accounts) under
a 16-byte digest. The Claude adapter's caches (sanitised system prompts, tool-name maps) are
bounded by bytes as well as entries. Measured as the server process's resident memory after
100 requests with distinct 1 MB values, through the running app.
"""

from __future__ import annotations

import ctypes
import gc
import secrets

from providers import claude

MB = 1 << 20


def rss() -> int:
    """Resident bytes of this process (the server runs in it), after returning freed memory."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def big(n: int = MB) -> str:
    return secrets.token_hex(n // 2)


async def post(kleis, key: str, path: str, body: dict, headers: dict | None = None) -> int:
    sent = {"authorization": f"Bearer {key}", **(headers or {})}
    async with kleis.http.post(kleis.url + path, json=body, headers=sent) as resp:
        await resp.read()
        return resp.status


async def test_megabyte_session_ids_are_not_kept(start_kleis, codex_fake):
    kleis = await start_kleis()
    await kleis.import_account("codex", codex_fake.grant())
    key, _ = await kleis.create_key(label="hostile")

    async def send() -> None:
        body = {"model": "gpt-5.5", "input": "hi", "prompt_cache_key": big()}
        assert await post(kleis, key, "/openai/v1/responses", body) == 200
        codex_fake.requests.clear()  # the fake keeps what it received; Kleis must not

    for _ in range(5):  # warm up the allocator and the connection pool
        await send()
    before = rss()
    for _ in range(100):
        await send()
    grown = rss() - before
    print(f"RSS growth after 100 distinct 1 MB prompt_cache_key values: {grown / MB:.1f} MB")
    assert grown < 20 * MB
    sticky = kleis.services.pool.sticky
    assert len(sticky) == 105 and all(len(entry[2]) == 16 for entry in sticky)


async def test_megabyte_claude_prompts_and_tools_are_bounded(start_kleis, claude_fake):
    kleis = await start_kleis()
    await kleis.import_account("claude", claude_fake.grant())
    key, _ = await kleis.create_key(label="hostile")

    async def send() -> None:
        # Just under the fake's own 1 MiB limit (aiohttp's default), so every request is answered.
        body = {
            "model": "claude-sonnet-4-5",
            "max_tokens": 16,
            "system": big(600 << 10),
            "metadata": {"user_id": f"user_x_account_y_session_{big(200 << 10)}"},
            "tools": [{"name": big(64 << 10), "input_schema": {"type": "object"}} for _ in range(2)],
            "messages": [{"role": "user", "content": "hi"}],
        }
        status = await post(kleis, key, "/anthropic/v1/messages", body)
        assert status == 200, status
        claude_fake.requests.clear()

    for _ in range(5):
        await send()
    before = rss()
    for _ in range(100):
        await send()
    grown = rss() - before
    print(f"RSS growth, 100 distinct ~1 MB Claude system prompts, session ids, tools: {grown / MB:.1f} MB")
    assert grown < 40 * MB
    assert claude.SANITIZED.bytes <= claude.SANITIZED.max_bytes
    assert claude.TOOL_MAPS.bytes <= claude.TOOL_MAPS.max_bytes
