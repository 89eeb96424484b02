"""Kleis over time: the one clock and the one way to run work in the background.

`Clock` is injected everywhere a time is read (epoch milliseconds for what is stored or
shown, a monotonic reading in seconds for deadlines and durations), so tests move time
instead of sleeping. `Background` names, tracks and logs every task Kleis starts outside a
request, runs the periodic loops, and stops them all on shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any


class Clock:
    """Wall time (`now`, epoch ms) and monotonic time (`monotonic`, seconds)."""

    def now(self) -> int:
        return int(time.time() * 1000)

    def monotonic(self) -> float:
        return time.monotonic()


class ManualClock(Clock):
    """A clock that starts at real time and moves only by `advance` (tests, replays).
    `monotonic` moves with it, so deadlines measured in either agree."""

    def __init__(self, start_ms: int | None = None):
        self._now = int(time.time() * 1000) if start_ms is None else start_ms
        self._mono = time.monotonic()

    def now(self) -> int:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, ms: int) -> None:
        self._now += ms
        self._mono += ms / 1000


class Background:
    """Every task Kleis runs outside a request.

    `start(name, coro)` runs a one-off task (a strong reference is kept until it ends; a
    failure is logged with its name, never lost). `every(name, seconds, job)` runs `job`
    every `seconds` until `stop()`. `stop()` ends the loops (they finish their current
    round), waits up to `timeout` seconds for the rest and cancels what is left."""

    def __init__(self, log: logging.Logger, expected: Callable[[BaseException], bool] = lambda exc: False):
        """`expected(exc)`: failures logged in one line, without a traceback (the database
        being away is an operating condition, not a bug)."""
        self.log = log
        self.expected = expected
        self.stopping = asyncio.Event()
        self.tasks: set[asyncio.Task] = set()
        self._loops: set[asyncio.Task] = set()
        self._abandon: set[asyncio.Task] = set()
        self._quiet: set[asyncio.Task] = set()
        self._ids = itertools.count(1)

    def start(
        self,
        name: str,
        coro: Coroutine[Any, Any, Any],
        *,
        wait_on_stop: bool = True,
        report: bool = True,
        service: bool = False,
    ) -> asyncio.Task:
        """Run `coro` as task `name#N`. `wait_on_stop=False`: stop() cancels it at once
        (a login poller that may run for minutes) instead of letting it finish.
        `report=False`: its failure is the awaiting caller's to handle, not logged here.
        `service=True`: it runs until `stopping` is set, like the `every` loops (drain() does
        not wait for it)."""
        task = asyncio.get_running_loop().create_task(coro, name=f"{name}#{next(self._ids)}")
        self.tasks.add(task)
        if service:
            self._loops.add(task)
        if not wait_on_stop:
            self._abandon.add(task)
        if not report:
            self._quiet.add(task)
        task.add_done_callback(self._finished)
        return task

    def every(self, name: str, seconds: float, job: Callable[[], Awaitable[Any]]) -> asyncio.Task:
        return self.start(name, self._repeat(name, seconds, job), service=True)

    def named(self, prefix: str) -> list[asyncio.Task]:
        """The running tasks whose name starts with `prefix`."""
        return [t for t in self.tasks if t.get_name().startswith(prefix) and not t.done()]

    async def _repeat(self, name: str, seconds: float, job: Callable[[], Awaitable[Any]]) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), seconds)
            if self.stopping.is_set():
                return
            try:
                await job()
            except Exception as exc:
                self._report(f"background job {name}", exc)

    def _finished(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._loops.discard(task)
        self._abandon.discard(task)
        quiet = task in self._quiet
        self._quiet.discard(task)
        if not task.cancelled() and task.exception() is not None and not quiet:
            self._report(f"background task {task.get_name()}", task.exception())

    def _report(self, what: str, exc: BaseException) -> None:
        if self.expected(exc):
            cause = (str(exc).strip().splitlines() or [""])[0][:200]
            self.log.error("%s failed: %s: %s", what, type(exc).__name__, cause)
        else:
            self.log.error("%s failed", what, exc_info=exc)

    async def drain(self, timeout: float = 10.0) -> None:
        """Wait (bounded) for the one-off tasks running now, e.g. pending writes."""
        pending = [t for t in self.tasks if t not in self._loops and t not in self._abandon]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    async def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        for task in list(self._abandon):
            task.cancel()
        if self._loops:
            await asyncio.wait(list(self._loops), timeout=timeout)
        await self.drain(timeout)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1)
