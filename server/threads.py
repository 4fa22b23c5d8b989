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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


async def in_own_thread(fn: Callable[..., T], *args) -> T:
    """Await `fn(*args)` run on a new thread that ends when it returns."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-job")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
    finally:
        pool.shutdown(wait=False)  # the thread exits now that its only job is done
