import asyncio, time
import pytest
from tests.test_proxy import send, account_row, upstream_calls
from tests.conftest import wait_for

async def test_x(start_kleis, codex_fake):
    kleis = await start_kleis()
    codex_fake.access_ttl = 30
    account = await kleis.import_account("codex", codex_fake.grant())
    key, _ = await kleis.create_key(label="laptop")
    codex_fake.access_ttl = 3600
    codex_fake.token_delay = 0.5
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await send(kleis, key)
    await asyncio.sleep(0.6)
    codex_fake.token_delay = 0
    t = time.monotonic()
    answer = await send(kleis, key)
    print("status", answer.status, answer.raw[:300], time.monotonic() - t, "refresh calls", codex_fake.refresh_calls)
    print(await account_row(account["id"]))
