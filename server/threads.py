"""Where torch work may run outside the engine thread: on a thread that ends when the work does.

Measured here (torch's OpenMP build, libgomp, 2 cores): every live thread that has run a parallel torch
op keeps its own OpenMP team, and while two teams exist every one of them runs slower (a lone decode step
of the default model: 46 ms with one team, 70 ms with two, in any thread). The engine thread is the team
that matters, so other torch work (model loading, compiling, parsing uploads, loading a prefix ahead of
time) runs on a fresh thread that exits afterwards, which frees its team; never on asyncio's default
executor, whose threads live on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

# libgomp (torch's OpenMP on Linux) cuts its workers' spin to 100 iterations once it manages more threads
# than there are CPUs, and a server always does: the main thread counts, and the engine thread's team takes
# every core. Its workers then sleep between the hundreds of parallel regions of a decode step, and each
# region starts with a futex wake-up: the default model's 8-row step took 40-45 ms on the engine thread
# against 22-25 ms on the main thread. OMP_WAIT_POLICY=ACTIVE raises that throttled spin to 1000 (22-29 ms
# on the engine thread; the server's 8-concurrent tokens/s 1.3-1.4x); GOMP_SPINCOUNT keeps the unthrottled
# spin at libgomp's own default (~3 ms), so an idle server does not spin (ACTIVE alone spins for minutes).
OPENMP_ENV = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def openmp_env() -> dict[str, str]:
    """OPENMP_ENV, where this process's environment sets a value already: that value."""
    return {name: os.environ.get(name, value) for name, value in OPENMP_ENV.items()}


def set_openmp_env() -> None:
    """Put `openmp_env()` in this process's environment. libgomp reads it once, when torch is first
    imported: call this before that (a process of its own, e.g. a Ray replica, gets it at its start)."""
    os.environ.update(openmp_env())


async def in_own_thread(fn: Callable[..., T], *args) -> T:
    """Await `fn(*args)` run on a new thread that ends when it returns."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-job")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)  # the thread exits now that its only job is done
