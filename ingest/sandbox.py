"""Parse worker processes that a runaway file cannot take down with it: each call has a time limit and each worker
an address-space limit; a file past either fails with that reason, and its worker is replaced.

A pool of `workers` processes runs any module-level function (`call`, `map`); the time limit counts from when the
worker receives the task, so a file waiting for a free worker is not charged for it. Workers are forked from
multiprocessing's forkserver, a fresh interpreter (never this process, whose torch thread pools do not survive a
fork) into which the parsers and their models are loaded once (`ingest.preload`): a worker, including one that
replaces a killed one, starts in milliseconds and warm.

>>> with ParsePool(workers=2, timeout_s=60, memory_mb=2048) as pool:  # doctest: +SKIP
...     pool.call(parse_file, *arguments)
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import resource
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from typing import Any

import psutil

from ingest.limits import env_name
from ingest.load import LoadError

PRELOAD = ["ingest.preload"]
# A worker asked to stop gets this long to exit before it is killed.
STOP_GRACE_S = 1.0


class BudgetError(LoadError):
    """A file took longer or more memory than a parse worker may spend on one; the message names the setting."""


def _context() -> multiprocessing.context.BaseContext:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # takes effect when the forkserver starts: the first pool's first worker
    return context


def _serve(connection: Connection, memory_mb: int) -> None:
    """A worker's loop: run each function sent, send back ("ok", result) or ("error", exception); ("memory", None)
    when the address-space limit was hit, after which the worker exits (its heap may be in any state)."""
    _die_with_parent()
    # On top of what the worker holds already (the preloaded parsers: about 1.2 GB of address space, mostly shared
    # with the forkserver), so that the budget is the file's own.
    limit = psutil.Process().memory_info().vms + memory_mb * (1 << 20)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            function, args, kwargs = connection.recv()
        except EOFError:  # the pool closed its end: done
            return
        try:
            connection.send(("ok", function(*args, **kwargs)))
        except MemoryError:
            connection.send(("memory", None))
            return
        except Exception as error:  # the caller's to handle, as if the function had run in its own process
            try:
                connection.send(("error", error))
            except Exception:  # an exception that does not pickle: its text does
                connection.send(("error", RuntimeError(f"{type(error).__name__}: {error}")))


def _die_with_parent() -> None:
    """Ask Linux to kill this worker when its parent (the forkserver, which exits with the ingest process) dies,
    even by SIGKILL, so that no parse outlives the job that wanted it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the forkserver died while this worker was starting up
        os._exit(1)


class _Worker:
    def __init__(self, context: multiprocessing.context.BaseContext, memory_mb: int):
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_serve, args=(child, memory_mb), daemon=True, name="rag-parse")
        self.process.start()
        child.close()

    def stop(self) -> None:
        self.connection.close()  # the worker's recv() ends: it exits
        self.process.join(STOP_GRACE_S)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


class ParsePool:
    """Runs functions in worker processes, each call within `timeout_s` and `memory_mb` (see the module's doc)."""

    def __init__(self, workers: int, timeout_s: float, memory_mb: int,
                 warm_up: tuple[Callable, tuple] | None = None):
        """`warm_up`: a function and its arguments that each worker runs when it starts (loading what every task
        needs, e.g. a tokenizer), within the same limits but not charged to the first task."""
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.warm_up = warm_up
        self._context = _context()
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(None)  # a slot; its worker starts on first use
        self._busy: set[_Worker] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._threads = ThreadPoolExecutor(workers, thread_name_prefix="parse-map")

    def call(self, function: Callable, *args: Any, **kwargs: Any) -> Any:
        """`function(*args, **kwargs)` in a worker; BudgetError when it runs past the time or memory limit (its
        worker is then replaced), and the function's own exception re-raised where it raised one."""
        worker = self._idle.get()  # waits for a free worker
        if self._closed:
            if worker is not None:
                worker.stop()
            self._idle.put(None)
            raise BudgetError("parsing stopped: the ingestion ended before this file was read")
        try:
            if worker is None:
                worker = self._start()
            with self._lock:
                self._busy.add(worker)
            outcome, value = self._exchange(worker, function, args, kwargs)
        except BaseException:
            if worker is not None:
                self._retire(worker)
            self._idle.put(None)
            raise
        if outcome == "ok" or outcome == "error":
            with self._lock:
                self._busy.discard(worker)
            if self._closed:  # closed while this task ran: nobody will take the worker back out
                worker.stop()
                worker = None
            self._idle.put(worker)
            if outcome == "error":
                raise value
            return value
        self._retire(worker)
        self._idle.put(None)
        raise BudgetError(value)

    def _start(self) -> _Worker:
        worker = _Worker(self._context, self.memory_mb)
        if self.warm_up:
            outcome, value = self._exchange(worker, self.warm_up[0], self.warm_up[1], {})
            if outcome != "ok":
                self._retire(worker)
                raise BudgetError(f"the parse worker could not start: {value}")
        return worker

    def _exchange(self, worker: _Worker, function: Callable, args: tuple, kwargs: dict) -> tuple[str, Any]:
        """Send one task and wait for its answer within the time limit: ("ok"|"error", value), or ("budget",
        why) when the worker ran out of time or memory or died."""
        try:
            worker.connection.send((function, args, kwargs))
            if not worker.connection.poll(self.timeout_s):
                return "budget", (f"parsing took longer than {self.timeout_s:g} s, the limit per file "
                                  f"({env_name('parse_timeout_s')}); stopped")
            outcome, value = worker.connection.recv()
        except (EOFError, OSError):  # the worker died: a signal (the kernel's OOM killer, a crash in C code)
            worker.process.join(STOP_GRACE_S)
            return "budget", (f"the parse worker died (exit code {worker.process.exitcode}) on this file; reading it "
                              f"may need more than the {self.memory_mb:,} MB a file may take "
                              f"({env_name('parse_memory_mb')})")
        if outcome == "memory":
            return "budget", (f"parsing needed more than {self.memory_mb:,} MB of memory, the limit per file "
                              f"({env_name('parse_memory_mb')}); stopped")
        return outcome, value

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            self._busy.discard(worker)
        worker.process.kill()  # mid-task: it would not read the end of its pipe
        worker.process.join()
        worker.connection.close()

    def map(self, function: Callable, *iterables: Iterable) -> Iterator:
        """Like the builtin map, with each call in a worker (`call`), several at once; for `parse_pdf`'s pages."""
        futures = [self._threads.submit(self.call, function, *args) for args in zip(*iterables)]
        try:
            for future in futures:
                yield future.result()
        finally:
            for future in futures:
                future.cancel()

    def close(self) -> None:
        """Stop every worker (a busy one is killed: its task's caller gets BudgetError or EOF)."""
        if self._closed:
            return
        self._closed = True
        self._threads.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            busy = list(self._busy)
        for worker in busy:
            worker.process.kill()
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            if worker is not None:
                worker.stop()

    def __enter__(self) -> ParsePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
