"""A `prefix-server serve` child process for the benchmarks and the real-process tests: started on a free
port, waited on until /ready, stopped with SIGTERM (the server's graceful drain)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import IO

import httpx


class ServerNotReady(RuntimeError):
    """The server exited, or /ready did not answer 200 in time; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(
    args: list[str], *, log: IO | None = None, timeout_s: float = 180, launcher: list[str] | None = None
) -> tuple[subprocess.Popen, str]:
    """Run `LAUNCHER serve --port P ARGS` (LAUNCHER: `python -m server.cli`) with its output in `log`
    (a file opened "w+", or discarded), and wait until /ready answers 200. Returns (process, base url)."""
    port = free_port()
    cmd = [*(launcher or [sys.executable, "-m", "server.cli"]), "serve", "--port", str(port), *args]
    proc = subprocess.Popen(
        cmd,
        stdout=log or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while not ready(base):
        if proc.poll() is not None or time.monotonic() > deadline:
            why = (
                f"exited with {proc.returncode}"
                if proc.poll() is not None
                else f"not ready in {timeout_s:.0f} s"
            )
            proc.kill()
            proc.wait()
            raise ServerNotReady(f"{' '.join(cmd)}: {why}\n{tail(log)}")
        time.sleep(0.5)
    return proc, base


@contextlib.contextmanager
def running(
    args: list[str], *, log: IO | None = None, timeout_s: float = 180, launcher: list[str] | None = None
) -> Iterator[tuple[subprocess.Popen, str]]:
    """`start`, then `stop` when the block ends (however it ends): (process, base url)."""
    proc, base = start(args, log=log, timeout_s=timeout_s, launcher=launcher)
    try:
        yield proc, base
    finally:
        if proc.poll() is None:
            stop(proc)


def ready(base: str) -> bool:
    try:
        return httpx.get(base + "/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def stop(proc: subprocess.Popen, timeout_s: float = 30) -> int:
    """SIGTERM, then a kill if it has not exited in `timeout_s`. Returns the exit code."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def tail(log: IO | None, chars: int = 3000) -> str:
    """The end of a server log opened "w+" (empty when the output was discarded)."""
    if log is None:
        return ""
    log.seek(0)
    return log.read()[-chars:]
