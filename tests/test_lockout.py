"""Lockouts that hold (issue 13, points 1 and 2), end to end over HTTP.

- Behind a proxy (`trust_forwarded = true`) the client is the rightmost X-Forwarded-For entry
  that is not one of our proxies, so addresses a client writes to the left of what the proxy
  appended change nothing (nginx `real_ip_recursive`, Caddy `trusted_proxies`).
- Failures are counted per address and a success clears none of them: a valid key sent
  between wrong ones does not buy more guesses.
- The lockout table is bounded and never scanned.

Each test counts the guesses that were actually evaluated (401) before the 429s began.
Time moves by ManualClock only.
"""

from __future__ import annotations

import asyncio
import ipaddress

from keys import Lockout, client_address
from runtime import ManualClock

BAD_ADMIN = {"Authorization": "Bearer kla_wrong"}


async def admin_get(kleis, headers: dict) -> int:
    async with kleis.http.get(kleis.url + "/admin/keys", headers=headers) as resp:
        await resp.read()
        return resp.status


async def proxy_post(kleis, key: str, headers: dict | None = None) -> int:
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    body = {"model": "gpt-5.5", "input": "hi"}
    async with kleis.http.post(kleis.url + "/openai/v1/responses", json=body, headers=sent) as resp:
        await resp.read()
        return resp.status


async def test_spoofed_forwarded_for_does_not_dodge_the_admin_lockout(start_kleis):
    kleis = await start_kleis(server={"trust_forwarded": True}, security={"admin_max_failures": 5})
    # The proxy at 127.0.0.1 appended the real client, 203.0.113.7; the client wrote the rest.
    statuses = [
        await admin_get(kleis, {**BAD_ADMIN, "X-Forwarded-For": f"198.51.100.{i}, 10.9.{i}.1, 203.0.113.7"})
        for i in range(60)
    ]
    assert statuses.count(401) == 5 and statuses[5:] == [429] * 55, statuses
    # The same client is refused even with the right token; another client is not.
    good = kleis.admin_headers
    assert await admin_get(kleis, {**good, "X-Forwarded-For": "1.1.1.1, 203.0.113.7"}) == 429
    assert await admin_get(kleis, {**good, "X-Forwarded-For": "203.0.113.7, 203.0.113.8"}) == 200


async def test_spoofed_forwarded_for_does_not_dodge_the_key_lockout(start_kleis):
    kleis = await start_kleis(server={"trust_forwarded": True}, security={"key_max_failures": 8})
    wrong = "kleis_" + "0" * 32
    statuses = [
        await proxy_post(kleis, wrong, {"X-Forwarded-For": f"10.0.{i // 250}.{i % 250}, 192.0.2.1"})
        for i in range(400)
    ]
    assert statuses.count(401) == 8 and set(statuses[8:]) == {429}, statuses[:20]


async def test_trusted_proxies_decide_which_entries_are_believed(start_kleis):
    kleis = await start_kleis(
        server={"trust_forwarded": True, "trusted_proxies": ["127.0.0.0/8", "10.0.0.0/8"]},
        security={"admin_max_failures": 3},
    )
    # Two of our proxies (127.0.0.1, then 10.1.2.3) in front of 203.0.113.9.
    chain = "203.0.113.9, 10.1.2.3"
    statuses = [
        await admin_get(kleis, {**BAD_ADMIN, "X-Forwarded-For": f"198.51.100.{i}, {chain}"})
        for i in range(10)
    ]
    assert statuses == [401] * 3 + [429] * 7
    assert await admin_get(kleis, {**kleis.admin_headers, "X-Forwarded-For": "203.0.113.10, 10.1.2.3"}) == 200

    # A peer that is not one of the listed proxies is the client, whatever its header says.
    direct = await start_kleis(
        server={"trust_forwarded": True, "trusted_proxies": ["10.0.0.0/8"]},
        security={"admin_max_failures": 3},
    )
    statuses = [await admin_get(direct, {**BAD_ADMIN, "X-Forwarded-For": f"203.0.113.{i}"}) for i in range(6)]
    assert statuses == [401] * 3 + [429] * 3


async def test_a_valid_key_does_not_reset_the_count(start_kleis, codex_fake):
    clock = ManualClock()
    kleis = await start_kleis(clock=clock, security={"key_max_failures": 100})
    key, _ = await kleis.create_key(label="mine")
    # 990 wrong keys with the valid key after every 99, one short of the limit (the probe that
    # got all 990 evaluated when a success cleared the count).
    evaluated = 0
    for i in range(990):
        if i and i % 99 == 0:
            await proxy_post(kleis, key)
        status = await proxy_post(kleis, "kleis_" + f"{i:032x}")
        assert status in (401, 429)
        evaluated += status == 401
    assert evaluated == 100


async def test_failures_drain_over_the_window_and_blocks_end(start_kleis):
    clock = ManualClock()
    kleis = await start_kleis(clock=clock, security={"admin_max_failures": 4, "admin_lockout_seconds": 120})
    assert [await admin_get(kleis, BAD_ADMIN) for _ in range(3)] == [401] * 3
    clock.advance(30_000)  # half the window: two of the three failures have drained
    assert [await admin_get(kleis, BAD_ADMIN) for _ in range(4)] == [401, 401, 401, 429]
    async with kleis.http.get(kleis.url + "/admin/keys", headers=kleis.admin_headers) as resp:
        assert resp.status == 429 and int(resp.headers["retry-after"]) == 120
    clock.advance(120_000)
    assert await admin_get(kleis, kleis.admin_headers) == 200
    # After a block the address starts again from zero, not one failure from the next block.
    assert [await admin_get(kleis, BAD_ADMIN) for _ in range(5)] == [401] * 4 + [429]


async def test_ipv6_clients_are_counted_per_64(start_kleis):
    kleis = await start_kleis(server={"trust_forwarded": True}, security={"admin_max_failures": 4})
    statuses = [
        await admin_get(kleis, {**BAD_ADMIN, "X-Forwarded-For": f"2001:db8:1:2::{i:x}"}) for i in range(1, 9)
    ]
    assert statuses == [401] * 4 + [429] * 4
    assert await admin_get(kleis, {**kleis.admin_headers, "X-Forwarded-For": "[2001:db8:1:3::1]:443"}) == 200


async def test_the_lockout_table_is_bounded(start_kleis):
    kleis = await start_kleis(server={"trust_forwarded": True}, security={"admin_max_failures": 2})
    lockout = kleis.services.admin_lockout
    lockout.max_entries = 100
    # One address blocked, then failures from 300 others push it out of the table at the old end.
    assert [await admin_get(kleis, {**BAD_ADMIN, "X-Forwarded-For": "192.0.2.1"}) for _ in range(3)] == [
        401,
        401,
        429,
    ]
    for i in range(300):
        assert await admin_get(kleis, {**BAD_ADMIN, "X-Forwarded-For": f"10.{i // 200}.{i % 200}.1"}) == 401
        assert len(lockout) <= 100


async def test_repeated_header_lines_are_one_list(start_kleis):
    """Two X-Forwarded-For lines are one list (RFC 9110 §5.3): the last line's last entry counts."""
    kleis = await start_kleis(server={"trust_forwarded": True}, security={"admin_max_failures": 2})
    host, port = kleis.url.removeprefix("http://").split(":")

    async def send(token: str, first: str, second: str) -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            (
                f"GET /admin/keys HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                f"X-Forwarded-For: {first}\r\nX-Forwarded-For: {second}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        answer = await reader.read()
        writer.close()
        return int(answer.split(b" ", 2)[1])

    statuses = [await send("kla_wrong", f"198.51.100.{i}", "203.0.113.5") for i in range(4)]
    assert statuses == [401, 401, 429, 429]
    assert await send(kleis.admin_token, "203.0.113.5", "203.0.113.6") == 200


def test_client_address_reads_from_the_right():
    xff = {"x-forwarded-for": "6.6.6.6, 203.0.113.1, 127.0.0.1"}
    assert client_address(xff, "127.0.0.1", False) == "127.0.0.1"
    assert client_address(xff, "127.0.0.1", True) == "203.0.113.1"
    assert client_address(xff, "::ffff:127.0.0.1", True) == "203.0.113.1"
    assert client_address({"x-forwarded-for": "[2001:db8::1]:443"}, "127.0.0.1", True) == "2001:db8::1"
    assert client_address({"x-forwarded-for": "203.0.113.1:5555"}, "127.0.0.1", True) == "203.0.113.1"
    # Garbage stops the walk at the hop that passed it on.
    garbage = {"x-forwarded-for": "1.2.3.4, garbage, 127.0.0.2"}
    assert client_address(garbage, "127.0.0.1", True) == "127.0.0.2"
    assert client_address({"x-forwarded-for": "x" * 5000}, "192.0.2.9", True) == "192.0.2.9"
    assert client_address({}, "192.0.2.9", True) == "192.0.2.9"
    # Only our proxies' entries are skipped; with a list, a peer outside it is the client.
    nets = ["10.0.0.0/8"]
    assert client_address({"x-forwarded-for": "6.6.6.6, 10.2.3.4"}, "10.0.0.1", True, nets) == "6.6.6.6"
    assert client_address({"x-forwarded-for": "6.6.6.6"}, "192.0.2.9", True, nets) == "192.0.2.9"
    # All of them ours: the leftmost one is as far as anyone can tell.
    assert client_address({"x-forwarded-for": "10.1.1.1, 10.2.2.2"}, "10.0.0.1", True, nets) == "10.1.1.1"


def test_lockout_table_forgets_the_oldest_failures_first():
    now = [0]
    lockout = Lockout(3, 60, lambda: now[0], max_entries=1000)
    for i in range(5000):
        lockout.fail(str(ipaddress.IPv4Address(0x0A000000 + i)))
    assert len(lockout) == 1000
    # The oldest addresses were forgotten, the newest remembered.
    assert "10.0.0.0" not in lockout._entries and "10.0.19.135" in lockout._entries
