"""Continuous batching: calls from many sessions, gathered for a short window, run as one batch.

A batch starts as soon as every live session has a call waiting (a single stream never waits), or
when the window since the first waiting call has passed; calls that arrive while a batch runs go
into the next one. With ``isolate``, a batch that fails is run again one call at a time, so one
bad call fails alone (``run`` must then leave no trace of a call that raised); without it, every
caller of the failed batch learns why.

Sessions may come in pipeline groups: a batch then holds the calls of one group (that of the
oldest waiting call) and waits for that group's live sessions only. With two groups, one group's
sessions verify while the other's draft, so both pools work at once instead of taking turns.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class BusyClock:
    """Seconds during which at least one batch was running: batchers that share a clock (a
    target's prefills and verifications, which queue for the same passes) are counted once."""

    def __init__(self) -> None:
        self._seconds, self._running, self._since = 0.0, 0, 0.0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        if not self._running:
            self._since = time.perf_counter()
        self._running += 1
        try:
            yield
        finally:
            self._running -= 1
            if not self._running:
                self._seconds += time.perf_counter() - self._since

    @property
    def seconds(self) -> float:
        return self._seconds + (time.perf_counter() - self._since if self._running else 0.0)


class Batcher(Generic[Item, Result]):
    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[list[Result]]],
        window_s: float,
        live: Callable[[int], int],
        isolate: bool = True,
        busy: BusyClock | None = None,
    ) -> None:
        self.run = run  # one result per item, in order
        self.isolate = isolate
        self.window_s = window_s
        self.live = live  # sessions of a group that may submit: waiting for all of them is never too long
        self.batches = 0
        self.busy = busy or BusyClock()  # over a stretch of time: the share the pool was working
        self._pending: list[tuple[Item, asyncio.Future[Result], int]] = []  # item, its caller, its group
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def submit(self, item: Item, group: int = 0) -> Result:
        if self._task is None:
            self._task = asyncio.create_task(self._loop())
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future, group))
        self._wake.set()
        return await future

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._pending:
                continue
            group = self._pending[0][2]
            deadline = time.monotonic() + self.window_s
            while self._waiting(group) < self.live(group) and (left := deadline - time.monotonic()) > 0:
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
                self._wake.clear()
            batch = [(item, future) for item, future, g in self._pending if g == group and not future.cancelled()]
            self._pending = [call for call in self._pending if call[2] != group]
            if self._pending:  # other groups' calls: their turn next
                self._wake.set()
            if batch:
                await self._run(batch)

    def _waiting(self, group: int) -> int:
        return sum(g == group for *_, g in self._pending)

    async def _run(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        self.batches += 1
        try:
            results = await self._timed([item for item, _ in batch])
        except Exception as exc:
            if self.isolate and len(batch) > 1:  # find the call that failed: the others must not fail with it
                for one in batch:
                    await self._run([one])
                return
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():
                future.set_result(result)

    async def _timed(self, items: list[Item]) -> list[Result]:
        with self.busy.running():
            return await self.run(items)
