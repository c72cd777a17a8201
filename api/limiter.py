"""Back-pressure for the decoder: a few generations at a time, a bounded FIFO queue behind them, 503 beyond."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class Busy(Exception):
    """Every generation slot is taken and the queue is full."""

    def __init__(self, retry_after: int):
        super().__init__("The server is busy: too many generations are running or queued. Retry later.")
        self.retry_after = retry_after


class GenerationLimiter:
    """`async with limiter.slot(): ...` runs at most `max_concurrent` bodies; up to `max_queue` more wait, in
    arrival order (asyncio.Semaphore wakes waiters first-in first-out); any further caller gets `Busy` at once.

    >>> limiter = GenerationLimiter(max_concurrent=1, max_queue=16, retry_after=2)
    """

    def __init__(self, max_concurrent: int, max_queue: int, retry_after: int):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.retry_after = retry_after
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self.running = 0
        self.waiting = 0

    async def acquire(self) -> None:
        # Nobody may overtake the queue: a free slot goes to the first waiter, not to a newcomer.
        if self.waiting >= self.max_queue and (self._semaphore.locked() or self.waiting):
            raise Busy(self.retry_after)
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._semaphore.release()

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self.acquire()
        try:
            yield
        finally:
            self.release()
