"""Blocking library calls from async routes, on the worker thread pool.

FAISS's OpenMP thread count is a per-thread setting: `Retriever` sets it to 1 in the thread that builds it, but
requests run on pool threads, where FAISS would start a team of spinning OpenMP threads per thread. Measured on
2 cores: an exact search over 284 vectors took 11.8 ms on a fresh thread against 0.01 ms with one OpenMP thread,
and the spinning slowed everything else. FAISS and torch ship separate libgomp copies, so torch keeps its threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import faiss
from starlette.concurrency import run_in_threadpool

T = TypeVar("T")
_local = threading.local()


def _single_openmp(function: Callable[..., T], *args, **kwargs) -> T:
    if not getattr(_local, "configured", False):
        faiss.omp_set_num_threads(1)
        _local.configured = True
    return function(*args, **kwargs)


async def run_blocking(function: Callable[..., T], *args, **kwargs) -> T:
    return await run_in_threadpool(_single_openmp, function, *args, **kwargs)
