"""Soak: a long run at a steady rate against a real server on 127.0.0.1, checking every reply.

    python -m loadtest.soak                                   # starts `prefix-server serve`, 20 min at 80%
    python -m loadtest.soak --minutes 5 --serve-args "--compile wait --max-batch-size 8"
    python -m loadtest.soak --url http://127.0.0.1:8000 --pid 1234 --rate 2

Open-loop Poisson arrivals (as `python -m loadtest`) over --tasks tasks with Zipf popularity and a pool of
--prompts prompts, so the same (task, version, prompt) comes back again and again: greedy, each must give
the same tokens every time, first reply = the reference (and a few are asked again alone at the end).
Meanwhile tasks get new versions and are deleted and re-created (404s for a deleted task are expected),
some streaming clients hang up after their first token, and the server's RSS is sampled. The rate is
--rate, or --capacity-fraction of a capacity measured first (--capacity-requests sent at once).

Exits 1 if any reply was 5xx, lost (sent, no final answer), wrong, an unexpected 4xx, if rows or queued
requests are left on the server afterwards, or if RSS grew more than --max-rss-growth-mib after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import shlex
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from loadtest import serverproc
from loadtest.loadgen import LoadgenError, create_prefixes, make_client, wait_ready
from loadtest.soak_traffic import (
    SoakConfig,
    Tally,
    churn,
    drive,
    make_asks,
    measure_capacity,
    reference_check,
)
from loadtest.stats import percentile
from loadtest.workload import make_prompt, parse_dist, task_ids

LOCAL_HOSTS = ("127.0.0.1", "localhost")


def rss_mib(pid: int) -> float | None:
    """Resident set size of process `pid` in MiB, from /proc (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def sample_rss(pid: int | None, every_s: float, samples: list, stop, status) -> None:
    t0 = time.monotonic()
    while True:
        t = time.monotonic() - t0
        rss = rss_mib(pid) if pid else None
        samples.append((round(t, 1), rss))
        load = os.getloadavg()[0]  # the machine's: other work on it slows the server
        print(f"  t={t:7.1f} s  rss={rss or 0:8.1f} MiB  load {load:4.1f}  {status()}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
            return
        except asyncio.TimeoutError:
            pass


def read_metrics(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """The unlabelled samples `names` of a Prometheus text page."""
    return {
        n: float(line.split()[-1]) for line in text.splitlines() for n in names if line.startswith(n + " ")
    }


async def leftovers(client: httpx.AsyncClient, wait_s: float = 30.0) -> dict[str, float]:
    """Running rows and queued requests still on the server (from /metrics), once they had `wait_s` to go."""
    names = ("prefix_server_running_batch_size", "prefix_server_queue_depth")
    deadline, found = time.monotonic() + wait_s, {}
    while time.monotonic() < deadline:
        found = read_metrics((await client.get("/metrics")).text, names)
        if not any(found.values()):
            break
        await asyncio.sleep(1)
    return found


async def engine_step_ms(client: httpx.AsyncClient) -> float | None:
    """The engine's mean step (admissions + one decode) so far, in ms: how fast the machine ran it."""
    names = ("prefix_server_engine_steps_total", "prefix_server_engine_busy_seconds_total")
    found = read_metrics((await client.get("/metrics")).text, names)
    steps, busy = (found.get(n) for n in names)
    return 1000 * busy / steps if steps and busy is not None else None


async def run_soak(config: SoakConfig, url: str, pid: int | None) -> dict:
    tally, samples = Tally(), []
    rng = random.Random(f"prompts/{config.seed}")
    prompts = [
        (make_prompt(rng, config.prompt_len.sample(rng)), config.output_len.sample(rng))
        for _ in range(config.num_prompts)
    ]
    tasks = task_ids(config.num_tasks, "soak")
    async with make_client(url, config.timeout_s) as client:
        await wait_ready(client, 60)
        await create_prefixes(client, tasks)
        print(f"created {len(tasks)} tasks {tasks[0]}..{tasks[-1]}; {len(prompts)} prompts", flush=True)
        capacity = None
        if config.rate is None:
            capacity = await measure_capacity(client, config, tasks, prompts, tally)
            print(f"capacity: {capacity:.2f} req/s ({config.capacity_requests} sent at once)", flush=True)
            tally.latencies_ms.clear()  # the summary's latencies are the soak's
        rate = config.rate or config.capacity_fraction * capacity
        asks = make_asks(config, tasks, rate, config.minutes * 60, config.seed)
        print(
            f"soak: {config.minutes:g} min at {rate:.2f} req/s, {len(asks)} requests "
            f"({sum(a.stream for a in asks)} streamed, {sum(a.disconnect for a in asks)} hang up); "
            f"RSS every {config.sample_every_s:g} s, warm-up {config.warmup:g} s",
            flush=True,
        )
        stop, started = asyncio.Event(), time.perf_counter()

        def status() -> str:
            k = tally.kinds
            done = sum(n for kind, n in k.items() if kind not in ("upload", "delete"))
            return f"replies {done}  ok {k.get('ok', 0)}  wrong {len(tally.wrong)}  5xx {k.get('server_error', 0)}"

        background = [
            asyncio.create_task(sample_rss(pid, config.sample_every_s, samples, stop, status)),
            asyncio.create_task(churn(client, tasks, config, tally, stop)),
        ]
        await drive(client, asks, prompts, tally)
        elapsed = time.perf_counter() - started
        stop.set()
        await asyncio.gather(*background)
        left = await leftovers(client)
        step_ms = await engine_step_ms(client)
        references = await reference_check(client, tally, prompts, config.reference_checks)
        samples.append((round(time.perf_counter() - started, 1), rss_mib(pid) if pid else None))
    return {
        "capacity_rps": capacity,
        "rate_rps": rate,
        "elapsed_s": elapsed,
        "num_requests": len(asks),
        "tally": tally,
        "samples": samples,
        "leftovers": left,
        "engine_step_ms": step_ms,
        "references": references,
    }


def verdict(result: dict, config: SoakConfig) -> tuple[list[str], list[str]]:
    """(summary lines, failures): the figures printed at the end, and what makes the run fail."""
    tally, k = result["tally"], result["tally"].kinds
    rss = [(t, r) for t, r in result["samples"] if r is not None]
    warm = next((r for t, r in rss if t >= config.warmup), None)
    end = rss[-1][1] if rss else None
    lat = tally.latencies_ms
    lines = [
        f"requests: {result['num_requests']} in {result['elapsed_s']:.0f} s at {result['rate_rps']:.2f} req/s"
        + (f" (capacity {result['capacity_rps']:.2f} req/s)" if result["capacity_rps"] else ""),
        "outcomes (with the capacity run): " + ", ".join(f"{name} {n}" for name, n in sorted(k.items())),
        f"replies checked against an earlier one for the same (task, version, prompt): {tally.checked} "
        f"({len(tally.first)} keys; {result['references']} asked again alone at the end)",
        f"latency ms (completed, soak phase): p50 {percentile(lat, 50) or 0:.0f}, p99 {percentile(lat, 99) or 0:.0f}",
        f"5xx: {k.get('server_error', 0)}  lost: {k.get('lost', 0)}  wrong: {len(tally.wrong)}  "
        f"unexpected 4xx: {k.get('client_error', 0)}  429: {k.get('rate_limited', 0)}",
        f"left on the server after the run: {result['leftovers']}",
        f"engine: mean step {result.get('engine_step_ms') or 0:.0f} ms (admissions + one decode, from /metrics)",
    ]
    if tally.codes:
        lines.append(f"codes: {dict(sorted(tally.codes.items()))}")
    failures = [
        f"{n} {name}"
        for name, n in (
            ("5xx", k.get("server_error", 0)),
            ("lost replies", k.get("lost", 0)),
            ("wrong replies", len(tally.wrong)),
            ("unexpected 4xx", k.get("client_error", 0)),
        )
        if n
    ]
    failures += [f"{tally.wrong[i]}" for i in range(min(5, len(tally.wrong)))]
    if any(result["leftovers"].values()):
        failures.append(f"rows or requests left on the server: {result['leftovers']}")
    if warm is not None and end is not None:
        growth = end - warm
        lines.append(
            f"RSS: {warm:.1f} MiB after warm-up ({config.warmup:g} s), {end:.1f} MiB at the end "
            f"({growth:+.1f} MiB; bound +{config.max_rss_growth_mib:g}), max {max(r for _, r in rss):.1f} MiB"
        )
        if growth > config.max_rss_growth_mib:
            failures.append(f"RSS grew {growth:.1f} MiB after warm-up (bound {config.max_rss_growth_mib:g})")
    else:
        lines.append("RSS: not sampled (no server pid)")
    return lines, failures


def rss_curve(samples: list[tuple[float, float | None]], width: int = 40) -> list[str]:
    """One line per sample: time, RSS and a bar scaled between the lowest and the highest sample."""
    rss = [r for _, r in samples if r is not None]
    if not rss:
        return []
    lo, hi = min(rss), max(rss)
    lines = [f"RSS curve (MiB; bar from {lo:.0f} to {hi:.0f}):"]
    for t, r in samples:
        if r is not None:
            bar = "#" * (1 + round((width - 1) * (r - lo) / (hi - lo))) if hi > lo else "#"
            lines.append(f"  {t:7.1f} s {r:8.1f} {bar}")
    return lines


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SoakConfig()
    ap.add_argument("--url", help="a running server on 127.0.0.1 (default: start one, see --serve-args)")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for its RSS")
    ap.add_argument("--serve-args", default="", help="flags for the `prefix-server serve` started here")
    ap.add_argument("--server-log", type=Path, default=Path("loadtest/results/soak-server.log"))
    ap.add_argument("--ready-timeout", type=float, default=1200, help="s for that server's /ready (1200)")
    ap.add_argument("--minutes", type=float, default=d.minutes, help="length of the soak (%(default)s)")
    ap.add_argument("--rate", type=float, help="requests/s (default: --capacity-fraction x measured)")
    ap.add_argument("--capacity-fraction", type=float, default=d.capacity_fraction, help="(%(default)s)")
    ap.add_argument("--capacity-requests", type=int, default=d.capacity_requests, help="(%(default)s)")
    ap.add_argument("--tasks", dest="num_tasks", type=int, default=d.num_tasks, help="(%(default)s)")
    ap.add_argument("--zipf", dest="zipf_s", type=float, default=d.zipf_s, help="exponent (%(default)s)")
    ap.add_argument(
        "--prompts", dest="num_prompts", type=int, default=d.num_prompts, help="pool (%(default)s)"
    )
    ap.add_argument("--prompt-len", type=parse_dist, default=d.prompt_len, help="words (uniform:16:64)")
    ap.add_argument("--output-len", type=parse_dist, default=d.output_len, help="new tokens (uniform:4:64)")
    ap.add_argument("--stream-fraction", type=float, default=d.stream_fraction, help="(%(default)s)")
    ap.add_argument("--disconnect-fraction", type=float, default=d.disconnect_fraction, help="(%(default)s)")
    ap.add_argument("--churn-every-s", type=float, default=d.churn_every_s, help="(%(default)s)")
    ap.add_argument("--sample-every-s", type=float, default=d.sample_every_s, help="(%(default)s)")
    ap.add_argument("--warmup-s", type=float, help="RSS reference time (default min(120, 20%% of the run))")
    ap.add_argument("--max-rss-growth-mib", type=float, default=d.max_rss_growth_mib, help="(%(default)s)")
    ap.add_argument("--reference-checks", type=int, default=d.reference_checks, help="(%(default)s)")
    ap.add_argument("--timeout", dest="timeout_s", type=float, default=d.timeout_s, help="s (%(default)s)")
    ap.add_argument("--seed", type=int, default=d.seed)
    return ap


def run(config: SoakConfig, url: str, pid: int | None) -> dict | int:
    """The soak's result, or an exit code (2: the server was not ready, 130: interrupted)."""
    try:
        return asyncio.run(run_soak(config, url, pid))
    except LoadgenError as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.url and urlsplit(args.url).hostname not in LOCAL_HOSTS:
        ap.error(f"the soak talks to 127.0.0.1 only, got --url {args.url}")
    try:
        config = SoakConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SoakConfig)})
    except ValueError as e:
        ap.error(str(e))
    server_lines, server_failures = [], []
    if args.url:
        result = run(config, args.url, args.pid)
    else:
        args.server_log.parent.mkdir(parents=True, exist_ok=True)
        serve_args = shlex.split(args.serve_args)
        print(f"starting prefix-server serve {' '.join(serve_args)} (log: {args.server_log})", flush=True)
        with open(args.server_log, "w+") as log:
            try:
                proc, url = serverproc.start(serve_args, log=log, timeout_s=args.ready_timeout)
            except serverproc.ServerNotReady as e:
                print(f"soak: {e}", file=sys.stderr)
                return 2
            try:
                result = run(config, url, proc.pid)
            finally:
                exit_code = serverproc.stop(proc, timeout_s=60)
            log.seek(0)
            errors = sum('"level": "error"' in line for line in log)
        server_lines.append(f"server: exit code {exit_code} after SIGTERM, {errors} error lines in its log")
        server_failures += [f"server exit code {exit_code}"] if exit_code != 0 else []
    if isinstance(result, int):
        return result
    lines, failures = verdict(result, config)
    lines, failures = lines + server_lines, failures + server_failures
    print("\n".join(["", *rss_curve(result["samples"]), "", "summary:", *(f"  {x}" for x in lines)]))
    print("FAIL: " + "; ".join(failures) if failures else "PASS", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
