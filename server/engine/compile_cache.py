"""Inductor's cache, guarded against a compile killed midway.

Inductor writes most of its cache atomically (a temporary file renamed into place) under `filelock`
locks (fcntl.flock, released when their holder dies). One step is not atomic: a C++ kernel's library is
linked straight to its final path, and a later process that finds the file there loads it without
building it again; a process killed during that link leaves a truncated library that every later compile
trusts, and fails on. So each compile registers itself as a writer of the cache (a marker file it holds a
flock on while it compiles); a compile that finds the marker of a writer that died, and no writer alive,
empties the cache before it starts. A cold compile after a killed one costs minutes; a poisoned cache
would cost the compiled step for good.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


def inductor_cache_dir() -> Path:
    """The folder inductor caches its artifacts in (TORCHINDUCTOR_CACHE_DIR, else its default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


@contextlib.contextmanager
def writing(cache: Path) -> Iterator[None]:
    """While compiling into `cache`: registered as a live writer; first, the cache is emptied if a
    writer died in it and none is alive."""
    writers = cache.parent / f".{cache.name}.writers"
    writers.mkdir(parents=True, exist_ok=True)
    # Locked under a hidden name, then renamed: no other writer ever sees this marker unlocked.
    fd, new = tempfile.mkstemp(prefix=".new-", dir=writers)
    fcntl.flock(fd, fcntl.LOCK_EX)
    marker = writers / f"{os.getpid()}-{Path(new).name.removeprefix('.new-')}"
    os.rename(new, marker)
    try:
        dead, alive = _other_writers(writers, marker)
        if dead and not alive and cache.exists():
            log.warning(
                "a compile was killed while writing %s: emptying it (this compile starts cold)", cache
            )
            trash = Path(tempfile.mkdtemp(prefix=f".{cache.name}.trash-", dir=cache.parent))
            os.rename(cache, trash / cache.name)
            shutil.rmtree(trash, ignore_errors=True)
        for path in dead:
            path.unlink(missing_ok=True)
        yield
    finally:
        marker.unlink(missing_ok=True)
        os.close(fd)


def _other_writers(writers: Path, mine: Path) -> tuple[list[Path], int]:
    """(markers of writers that died, number of writers alive), other than `mine`."""
    dead, alive = [], 0
    for path in writers.iterdir():
        if path == mine or path.name.startswith("."):
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # its writer finished meanwhile
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            dead.append(path)  # nobody holds it: its writer is gone without removing it
        except BlockingIOError:
            alive += 1
        finally:
            os.close(fd)
    return dead, alive
