"""Back-pressure for the decoder: a few generations at a time, a bounded FIFO queue behind them with a wait
deadline, and 503 with an estimated Retry-After beyond, so that clients are told to come back rather than left to
time out."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from collections import deque
from collections.abc import Callable

import anyio

# Slot holds averaged to estimate waits: enough to smooth over one odd question, few enough to follow the load.
RECENT_GENERATIONS = 16


class Busy(Exception):
    """No generation slot within the wait deadline: every slot is taken and the queue is full, or too long."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class GenerationLimiter:
    """Between `granted = await limiter.acquire()` and `limiter.release(granted)` at most `max_concurrent` callers
    run; up to `max_queue` more wait, in arrival order (asyncio.Semaphore wakes waiters first-in first-out), each
    for at most `queue_timeout` seconds. A caller gets `Busy` at once when the queue is full or its expected wait
    is past the deadline, and `Busy` after `queue_timeout` seconds when the wait ran longer than expected.

    The expected wait is the queue ahead served at the pace of the recent generations (how long each held its
    slot); before any generation was timed, nothing is refused early and Retry-After is `retry_after`.

    >>> limiter = GenerationLimiter(max_concurrent=1, max_queue=16, queue_timeout=30, retry_after=2,
    ...                             on_wait=metrics.queue_wait.observe)  # doctest: +SKIP
    """

    def __init__(self, max_concurrent: int, max_queue: int, queue_timeout: float, retry_after: int,
                 on_wait: Callable[[float], None]):
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        self.on_wait = on_wait  # seconds each admitted caller spent queued (it got a slot, timed out or left)
        self._semaphore = asyncio.Semaphore(max_concurrent)
        self._holds: deque[float] = deque(maxlen=RECENT_GENERATIONS)
        self.running = 0
        self.waiting = 0

    def expected_wait(self) -> float | None:
        """Seconds a newcomer would wait for a slot; None before any generation was timed. Everyone queued ahead,
        plus one turn for the generations running now, at the recent pace spread over the slots."""
        if not self._would_queue():
            return 0.0
        if not self._holds:
            return None
        return statistics.fmean(self._holds) * (self.waiting + 1) / self.max_concurrent

    def retry_after_s(self) -> int:
        """Retry-After for a refused caller: when the queue in front of it now should have been served."""
        expected = self.expected_wait()
        return self.retry_after if expected is None else max(1, math.ceil(expected))

    async def acquire(self) -> float:
        """Waits for a slot; returns the `time.monotonic()` it was granted at, to give back to `release`."""
        if self._would_queue():
            if self.waiting >= self.max_queue:
                raise Busy(f"The server is busy: {self.waiting} generations are already queued (RAG_MAX_QUEUE). "
                           "Retry later.", self.retry_after_s())
            expected = self.expected_wait()
            if expected is not None and expected > self.queue_timeout:
                raise self._past_deadline()
        self.waiting += 1
        queued = time.monotonic()
        try:
            with anyio.move_on_after(self.queue_timeout) as deadline:
                await self._semaphore.acquire()
        finally:
            self.waiting -= 1
            self.on_wait(time.monotonic() - queued)
        if deadline.cancelled_caught:
            raise self._past_deadline()
        self.running += 1
        return time.monotonic()

    def release(self, granted: float) -> None:
        self._holds.append(time.monotonic() - granted)
        self.running -= 1
        self._semaphore.release()

    def _would_queue(self) -> bool:
        # Nobody may overtake the queue: a free slot goes to the first waiter, not to a newcomer.
        return self._semaphore.locked() or self.waiting > 0

    def _past_deadline(self) -> Busy:
        return Busy(f"The server is busy: a generation slot is not expected within {self.queue_timeout:g} s "
                    "(RAG_QUEUE_TIMEOUT_S). Retry later.", self.retry_after_s())
