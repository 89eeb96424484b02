"""The clock and the one background-task helper."""

import asyncio
import logging

from runtime import Background, ManualClock


def test_manual_clock_moves_both_readings_together():
    clock = ManualClock(start_ms=1_000)
    mono = clock.monotonic()
    clock.advance(2_500)
    assert clock.now() == 3_500 and clock.monotonic() == mono + 2.5


async def test_a_failing_task_is_logged_by_name(caplog):
    background = Background(logging.getLogger("kleis.test"))

    async def broken():
        raise ValueError("boom")

    task = background.start("broken-job", broken())
    await asyncio.wait([task])
    assert any("broken-job" in r.getMessage() and r.exc_info for r in caplog.records)
    assert background.tasks == set()  # no reference kept after it ended


async def test_stop_ends_loops_waits_for_writes_and_cancels_pollers():
    background = Background(logging.getLogger("kleis.test"))
    ran, written = asyncio.Event(), []
    gate = asyncio.Event()

    async def job():
        ran.set()

    async def write():
        await gate.wait()
        written.append(1)

    async def poller():
        await asyncio.Event().wait()  # would run for minutes

    background.every("loop", 0.001, job)
    background.start("write", write())
    polling = background.start("login", poller(), wait_on_stop=False)
    await asyncio.wait_for(ran.wait(), 5)
    stopping = asyncio.create_task(background.stop(timeout=5))
    await asyncio.sleep(0)
    assert polling.cancelled() or polling.cancelling()
    gate.set()  # the write finishes during the stop, it is not cut
    await stopping
    assert written == [1] and background.tasks == set()
