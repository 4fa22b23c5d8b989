"""Build the CPU decode kernels into LIBRARY's folder: `python -m server.engine.kernels.build LIBRARY [TIMEOUT_S]`.

Run by `kernels.load` in a child process. Safe against being killed at any instruction:
- one build at a time per library, under `fcntl.flock` on `<folder>.lock`: the kernel drops the lock
  when its holder dies, however it dies, so nobody waits on a dead builder;
- torch's builder works in a fresh temporary folder (its own lock file, which a kill would leave
  behind, is in there), renamed to the final folder only once the library is whole: a later process
  either finds the whole library or no folder at all;
- temporary folders of builders that died are removed by the next holder of the lock;
- the process ends itself after TIMEOUT_S (the compilers it started are not waited for), so a build that
  outlives the server that asked for it still cannot hold the lock for ever.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from server.engine.kernels import CFLAGS, LDFLAGS, NAME, SOURCE


def build(library: Path) -> None:
    folder = library.parent
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{folder}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a live builder; a dead one holds nothing
        if library.is_file():
            return  # built while we waited
        for stale in folder.parent.glob(f".{folder.name}-*"):  # builders that died mid-build
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        _compile(work)
        work.chmod(0o755)  # mkdtemp's folder is private; the library is for every user of the machine
        os.rename(work, folder)  # atomic; `folder` cannot exist: we hold the lock and checked


def _compile(work: Path) -> None:
    from torch.utils import cpp_extension

    try:
        import ninja  # the pip package: its binary, for machines without a system ninja

        os.environ["PATH"] = f"{ninja.BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}"
    except ImportError:
        pass
    cpp_extension.load(
        name=NAME,
        sources=[str(SOURCE)],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(work),
        is_python_module=False,
        verbose=False,
    )


def main(argv: list[str]) -> int:
    library = Path(argv[0])
    if len(argv) > 1:
        signal.alarm(max(1, int(float(argv[1]))))  # SIGALRM's default action ends the process
    try:
        build(library)
    except Exception as e:
        print(f"{type(e).__name__}: {' '.join(str(e).split())[-500:]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
