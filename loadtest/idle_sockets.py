"""Idle sockets against a real server: is a normal client served while they are open, and when are they closed?

    python -m loadtest.idle_sockets                                  # 300 sockets, the server's defaults
    python -m loadtest.idle_sockets --nofile 256 -- --max-connections 200
    python -m loadtest.idle_sockets --nofile 256 -- --header-timeout-s 1e6 --max-connections 100000

Starts `prefix-server serve SERVE_FLAGS` on 127.0.0.1 (its open-file limit set to --nofile), opens --sockets
connections (half send nothing, half the first bytes of a request line and stop), sends one normal
/generate, and prints how many of the idle sockets are still open at a few times. The last example
turns the head deadline and the connection cap off: uvicorn alone.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time

import httpx

from loadtest import serverproc


def still_open(socks: list[socket.socket]) -> int:
    """How many of `socks` the server has not closed (what it sent, e.g. a 408, is read and dropped)."""
    num_open = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            while sock.recv(65536):
                pass
        except BlockingIOError:
            num_open += 1
        except OSError:
            pass
    return num_open


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.idle_sockets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--sockets", type=int, default=300, help="idle connections to open (300)")
    ap.add_argument("--nofile", type=int, help="the server's open-file limit (default: inherited)")
    ap.add_argument("--at", default="1,5,12,25", help="seconds at which to count open sockets (1,5,12,25)")
    ap.add_argument("serve_flags", nargs="*", help="flags for `prefix-server serve` (after --)")
    args = ap.parse_args(argv)
    if not 1 <= args.sockets <= 10_000:
        ap.error(f"--sockets must be in 1..10000, got {args.sockets}")

    def set_limit() -> None:
        if args.nofile:
            resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, args.nofile))

    port = serverproc.free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *args.serve_flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, env=env, preexec_fn=set_limit
    )
    socks: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 600
        while not serverproc.ready(base):
            if proc.poll() is not None or time.monotonic() > deadline:
                print(f"{' '.join(cmd)}: not ready", file=sys.stderr)
                return 2
            time.sleep(0.5)
        for i in range(args.sockets):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            if i % 2:
                socks[-1].sendall(b"GET /hea")
        t0 = time.monotonic()
        body = {"prompt": "Hello", "max_new_tokens": 4}
        try:
            resp = httpx.post(base + "/generate", json=body, timeout=30)
            print(f"normal client: HTTP {resp.status_code} in {time.monotonic() - t0:.2f} s")
        except httpx.HTTPError as e:
            print(f"normal client: no reply ({type(e).__name__}) after {time.monotonic() - t0:.1f} s")
        for at in (float(x) for x in args.at.split(",")):
            time.sleep(max(0.0, at - (time.monotonic() - t0)))
            print(f"t={at:>4g} s: {still_open(socks)} of {len(socks)} idle sockets still open")
    finally:
        for sock in socks:
            sock.close()
        serverproc.stop(proc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
