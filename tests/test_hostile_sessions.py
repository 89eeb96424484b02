"""Client-chosen session ids and prompts cost bounded memory (issue 13, point 3).

A session id (`prompt_cache_key`, `x-session-id`, Claude's `metadata.user_id`) is the
client's string and may be a megabyte long; Kleis remembers sessions (sticky accounts) under
a 16-byte digest. The Claude adapter's caches (sanitised system prompts, tool-name maps) are
bounded by bytes as well as entries. Measured with `tracemalloc` (the server runs in this
process) over 100 requests with distinct 1 MB values, through the running app: resident memory
was too noisy (allocator fragmentation moved it by 20+ MB between runs).
"""

from __future__ import annotations

import gc
import secrets
import tracemalloc
from contextlib import contextmanager

from providers import claude

MB = 1 << 20


@contextmanager
def held():
    """Yields a one-item list that receives the bytes of Python memory still held at the end
    (after a collection) minus those held at the start."""
    result = [0]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        yield result
        gc.collect()
        result[0] = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


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
    with held() as grown:
        for _ in range(100):
            await send()
    print(f"Memory held after 100 distinct 1 MB prompt_cache_key values: {grown[0] / MB:.1f} MB")
    assert grown[0] < 3 * MB  # keeping the ids would be 100 MB; finished bodies, 20+ MB
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
    with held() as grown:
        for _ in range(100):
            await send()
    print(f"Held after 100 distinct ~1 MB Claude system prompts, session ids, tools: {grown[0] / MB:.1f} MB")
    # The two caches may hold 8 MB each; keeping every prompt would be 60 MB, every id 20 MB.
    assert grown[0] < 20 * MB
    assert claude.SANITIZED.bytes <= claude.SANITIZED.max_bytes
    assert claude.TOOL_MAPS.bytes <= claude.TOOL_MAPS.max_bytes
