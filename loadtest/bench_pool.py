"""Benchmark of the paged K/V pool (issue #15): what a task's prefix costs once its pages live once.

Every scenario runs alternately with its baseline on the same server, `--repeats` times after one
warm-up of each (the order flips every repeat); a ratio is the median of the per-repeat ratios. This
machine's speed drifts 20-30% between runs, so only ratios against a baseline measured alongside mean
anything. A run sends `--rounds` x concurrency POST /generate (30-token prompts, 32 new tokens, greedy,
ignore_eos), at most `concurrency` in flight.

| scenario | baseline |
|---|---|
| p250: 16 concurrent, one task, 250-token prefix | 16 concurrent, no prefix |
| p16: 16 concurrent, one task, 16-token prefix | 16 concurrent, no prefix |
| tasks: 16 concurrent, every request another of 1,000 tasks (16-token prefixes), round-robin: each cold | p16 |
| tasks-slow-store: the same on a second server (store reads sleep 200 ms, a small prefix cache) | p16 there |
| tasks-slow-store-staggered: the same, the first 16 requests of a run sent 0.1 s apart | p16 there, staggered too |
| c32, c64: 32 and 64 concurrent, no prefix | 16 concurrent, no prefix |

Then, while 64 requests of the 250-token task run, the K/V pool's gauges from GET /metrics beside the
pages one 250-token prefix takes (ceil(tokens / 16)): used pages near "prefix once" mean it is shared.

    python -m loadtest.bench_pool              # two servers (--compile wait), ~30 minutes on 2 cores
    python -m loadtest.bench_pool --quick      # 1 repeat, 1 round, 50 tasks: a smoke run
    python -m loadtest.bench_pool --url http://127.0.0.1:8000   # a running server (--max-batch-size 64)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import httpx
import torch

from loadtest import machine, serverproc
from loadtest.loadgen import delete_prefixes, make_client
from loadtest.versus import default_tokenizer_path, load_tokenizer, make_texts
from server.registry.format import ModelFingerprint, PrefixKV, save_native

PAGE_TOKENS = 16  # tokens per K/V page
PROMPT_TOKENS, NEW_TOKENS = 30, 32
STAGGER_S = 0.1  # the staggered pair: 16 starts over ~1.6 s, about one request's life here
LONG_PREFIX_TOKENS, SHORT_PREFIX_TOKENS = 250, 16
KV_GAUGES = (
    "prefix_server_kv_pages_total",
    "prefix_server_kv_pages_used",
    "prefix_server_kv_pages_shared",
    "prefix_server_kv_prefix_pages_resident",
)
ROWS_GAUGE = "prefix_server_running_batch_size"
MISSES = "prefix_server_prefix_cache_misses_total"
SERVE_ARGS = ["--compile", "wait", "--dtype", "float32"]
_started = time.monotonic()


class BenchError(RuntimeError):
    """The benchmark cannot go on: a server refused a request, or the default model is not in the cache."""


def say(line: str) -> None:
    print(f"[{time.monotonic() - _started:6.0f} s] {line}", flush=True)


@dataclass
class Workload:
    """What one run sends: request k of a run goes to tasks[(cursor + k) % len(tasks)] (None: no prefix)."""

    label: str
    concurrency: int
    tasks: list[str | None]
    cursor: int = 0  # carried from run to run, so a round-robin over many tasks reaches each one once


@dataclass(frozen=True)
class Pair:
    name: str
    scenario: Workload
    baseline: Workload
    # Seconds between the starts of a run's first `concurrency` requests. 0: all at once, and since every
    # request has the same length, they finish together and the next ones start together (waves).
    stagger_s: float = 0.0


# ---- pure parts -------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="defaults 1 repeat, 1 round, 50 tasks")
    ap.add_argument("--repeats", type=int, help="measured runs of each scenario (default 3)")
    ap.add_argument("--rounds", type=int, help="requests per run = rounds x concurrency (default 4)")
    ap.add_argument("--tasks", type=int, help="tasks of the many-tasks scenarios (default 1000)")
    ap.add_argument("--read-delay-ms", type=int, default=200, help="the second server's store read delay")
    ap.add_argument("--url", help="a running server (--max-batch-size 64) instead of starting one")
    ap.add_argument("--out", type=Path, help="folder for the result and server logs (default: a temp one)")
    ap.add_argument("--json", type=Path, help="the result file (default OUT/bench_pool.json)")
    args = ap.parse_args(argv)
    for name, full, quick in (("repeats", 3, 1), ("rounds", 4, 1), ("tasks", 1000, 50)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.repeats, args.rounds, args.tasks) < 1 or args.read_delay_ms < 0:
        ap.error("--repeats, --rounds and --tasks must be >= 1, --read-delay-ms >= 0")
    return args


def summarize(scenario_tok_s: list[float], baseline_tok_s: list[float]) -> dict:
    """Medians of both, and the median of the per-repeat ratios scenario / baseline."""
    ratios = [s / b for s, b in zip(scenario_tok_s, baseline_tok_s, strict=True)]
    return {
        "scenario_tok_s": round(statistics.median(scenario_tok_s), 1),
        "baseline_tok_s": round(statistics.median(baseline_tok_s), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
    }


def parse_metrics(text: str, names: tuple[str, ...]) -> dict[str, float | None]:
    """The unlabelled samples `names` of a Prometheus text page; None for a name it lacks."""
    found: dict[str, float | None] = dict.fromkeys(names)
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in found:
            found[name] = float(value)
    return found


def pages(tokens: int) -> int:
    return math.ceil(tokens / PAGE_TOKENS)


def format_table(rows: list[dict]) -> str:
    """Markdown: one row per scenario, tokens/s of it and of its baseline, the ratio (or why skipped)."""
    lines = ["| scenario | baseline | tok/s | baseline tok/s | ratio |", "|---|---|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['scenario']} | {r['baseline']} | skipped: {r['skipped']} | | |")
        else:
            lines.append(
                f"| {r['scenario']} | {r['baseline']} | {r['scenario_tok_s']:.1f} | "
                f"{r['baseline_tok_s']:.1f} | {r['ratio']:.2f} |"
            )
    return "\n".join(lines)


def format_memory(peak: dict[str, float | None], prefix_tokens: int, row_tokens: int) -> str:
    """Markdown: the pool's gauges at the peak of the run, and what a shared or a copied prefix would use."""
    rows = peak.get(ROWS_GAUGE) or 0
    shown = {
        name: "n/a" if peak.get(name) is None else f"{peak[name]:.0f}" for name in (*KV_GAUGES, ROWS_GAUGE)
    }
    prefix_pages, row_pages = pages(prefix_tokens), pages(row_tokens)
    lines = ["| K/V memory | pages |", "|---|---:|"]
    lines += [f"| {name} | {value} |" for name, value in shown.items()]
    lines += [
        f"| one {prefix_tokens}-token prefix, ceil({prefix_tokens} / {PAGE_TOKENS}) | {prefix_pages} |",
        f"| about, prefix once: {prefix_pages} + {rows:.0f} rows x {row_pages} | {prefix_pages + rows * row_pages:.0f} |",
        f"| about, a copy per row: {rows:.0f} x ({prefix_pages} + {row_pages}) | {rows * (prefix_pages + row_pages):.0f} |",
    ]
    return "\n".join(lines)


# ---- HTTP ---------------------------------------------------------------------------------------------
async def get_metrics(client: httpx.AsyncClient, names: tuple[str, ...]) -> dict[str, float | None]:
    return parse_metrics((await client.get("/metrics")).text, names)


async def run_workload(
    client: httpx.AsyncClient, w: Workload, prompts: list[str], num_requests: int, stagger_s: float = 0.0
) -> dict:
    """`num_requests` POST /generate, at most `w.concurrency` at once, the first of them `stagger_s` apart:
    tokens/s, prefix cache misses."""
    slots = asyncio.Semaphore(w.concurrency)

    async def one(k: int) -> tuple[int, int, float]:
        body = {
            "task_id": w.tasks[(w.cursor + k) % len(w.tasks)],
            "prompt": prompts[k % len(prompts)],
            "max_new_tokens": NEW_TOKENS,
            "ignore_eos": True,
        }
        async with slots:
            if k < w.concurrency:
                await asyncio.sleep(k * stagger_s)  # inside: the slot is held, so no later request overtakes
            sent = time.perf_counter()
            resp = await client.post("/generate", json=body)
            latency = time.perf_counter() - sent
        if resp.status_code != 200:
            raise BenchError(
                f"POST /generate ({w.label}): expected 200, got {resp.status_code}: {resp.text[:300]}"
            )
        usage = resp.json()["usage"]
        return usage["completion_tokens"], usage["prompt_tokens"], latency

    misses0 = (await get_metrics(client, (MISSES,)))[MISSES]
    start = time.perf_counter()
    replies = await asyncio.gather(*(one(k) for k in range(num_requests)))
    seconds = time.perf_counter() - start
    misses1 = (await get_metrics(client, (MISSES,)))[MISSES]
    w.cursor += num_requests
    tokens = sum(c for c, _, _ in replies)
    return {
        "seconds": round(seconds, 3),
        "completion_tokens": tokens,
        "tok_s": tokens / seconds,
        "prompt_tokens": statistics.median(p for _, p, _ in replies),
        "latency_s": round(statistics.median(t for _, _, t in replies), 3),  # a request's, sent to reply
        "prefix_cache_misses": None if misses0 is None else misses1 - misses0,
    }


async def from_text(client: httpx.AsyncClient, task: str, text: str) -> dict:
    resp = await client.post("/prefixes/from-text", json={"task_id": task, "text": text})
    if resp.status_code != 201:
        raise BenchError(
            f"POST /prefixes/from-text ({task}): expected 201, got {resp.status_code}: {resp.text[:300]}"
        )
    return resp.json()


def model_fingerprint() -> ModelFingerprint:
    """The default model's geometry, from config.json of its converted folder (a server start makes it)."""
    tokenizer = default_tokenizer_path()
    if tokenizer is None:
        raise BenchError("no converted default model in the model cache: start `prefix-server serve` once")
    config = json.loads((tokenizer.parent / "config.json").read_text())
    return ModelFingerprint.from_config(SimpleNamespace(**config))


async def upload_tasks(client: httpx.AsyncClient, tasks: list[str], fp: ModelFingerprint) -> None:
    """One native file per task through POST /prefixes (far faster than from-text): random K/V of the
    model's geometry, distinct per task (what a prefix costs does not depend on its values)."""
    gen = torch.Generator().manual_seed(0)
    shape = (fp.num_layers, fp.kv_heads, SHORT_PREFIX_TOKENS, fp.head_dim)  # [layers, kv_heads, P, head_dim]
    uploads = asyncio.Semaphore(8)

    async def one(task: str) -> None:
        data = save_native(PrefixKV(torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), fp))
        async with uploads:
            resp = await client.post(
                "/prefixes", data={"task_id": task}, files={"file": ("p.safetensors", data)}
            )
        if resp.status_code != 201:
            raise BenchError(
                f"POST /prefixes ({task}): expected 201, got {resp.status_code}: {resp.text[:300]}"
            )

    for start in range(0, len(tasks), 100):
        await asyncio.gather(*(one(t) for t in tasks[start : start + 100]))
        say(f"uploaded {min(start + 100, len(tasks))} / {len(tasks)} tasks")


async def measure(client, pairs: list[Pair], prompts: list[str], args, server: str) -> list[dict]:
    """A warm-up of each workload, then every pair `args.repeats` times, scenario and baseline in turn."""
    workloads = list({id(w): w for p in pairs for w in (p.baseline, p.scenario)}.values())
    for w in workloads:
        say(f"{server}: warm-up {w.label}")
        await run_workload(client, w, prompts, args.rounds * w.concurrency)
    runs: dict[str, dict[str, list]] = {p.name: {"scenario": [], "baseline": []} for p in pairs}
    for r in range(args.repeats):
        for p in pairs:
            order = [("baseline", p.baseline), ("scenario", p.scenario)]
            for role, w in order if r % 2 == 0 else order[::-1]:  # ABBA: a steady drift cancels out
                run = await run_workload(client, w, prompts, args.rounds * w.concurrency, p.stagger_s)
                runs[p.name][role].append(run)
                misses = run["prefix_cache_misses"]
                misses = "" if misses is None else f", {misses:.0f} prefix cache misses"
                say(
                    f"{server}: repeat {r + 1}/{args.repeats}, {p.name} {role}: {run['tok_s']:.1f} tok/s{misses}"
                )
    return [
        {
            "name": p.name,
            "server": server,
            "scenario": p.scenario.label + (", staggered starts" if p.stagger_s else ""),
            "baseline": p.baseline.label + (", staggered starts" if p.stagger_s else ""),
            **summarize(*([x["tok_s"] for x in runs[p.name][role]] for role in ("scenario", "baseline"))),
            "runs": runs[p.name],
        }
        for p in pairs
    ]


async def kv_memory(client: httpx.AsyncClient, task: str, prompts: list[str], rows: int = 64) -> dict:
    """The pool's gauges at the fullest moment of `rows` concurrent requests of `task`."""
    run = asyncio.ensure_future(run_workload(client, Workload("memory", rows, [task]), prompts, rows))
    peak: dict[str, float | None] = {}
    while not run.done():
        now = await get_metrics(client, (*KV_GAUGES, ROWS_GAUGE))
        if fullness(now) > fullness(peak):
            peak = now
        await asyncio.sleep(0.2)
    return {"peak": peak, "prompt_tokens": (await run)["prompt_tokens"]}


def fullness(sample: dict[str, float | None]) -> tuple[float, float]:
    """(running rows, K/V pages used): which of two /metrics samples saw the fuller pool."""
    return sample.get(ROWS_GAUGE) or 0, sample.get("prefix_server_kv_pages_used") or 0


# ---- the two servers ----------------------------------------------------------------------------------
def make_pairs(num_tasks: int, short_tokens: int, long_tokens: int, read_delay_ms: int | None) -> list[Pair]:
    """The main server's scenarios and their baselines; with `read_delay_ms`, the slow-store server's."""
    base16 = Workload("16 concurrent, no prefix", 16, [None])
    p16 = Workload(f"16 concurrent, one task, {short_tokens}-token prefix", 16, ["pool-short"])
    slow = "" if read_delay_ms is None else f", {read_delay_ms} ms store reads"
    many = Workload(
        f"16 concurrent, each request another of {num_tasks} tasks{slow}", 16, task_ids(num_tasks)
    )
    if read_delay_ms is not None:  # the staggered pair shares the workloads (one cursor: every task cold)
        return [
            Pair("tasks-slow-store", many, p16),
            Pair("tasks-slow-store-staggered", many, p16, stagger_s=STAGGER_S),
        ]
    return [
        Pair(
            "p250",
            Workload(f"16 concurrent, one task, {long_tokens}-token prefix", 16, ["pool-long"]),
            base16,
        ),
        Pair("p16", p16, base16),
        Pair("tasks", many, p16),
        Pair("c32", Workload("32 concurrent, no prefix", 32, [None]), base16),
        Pair("c64", Workload("64 concurrent, no prefix", 64, [None]), base16),
    ]


def task_ids(num_tasks: int) -> list[str]:
    return [f"pool-{i}" for i in range(num_tasks)]


async def bench_server(url: str, args, texts: dict, fp: ModelFingerprint, read_delay_ms: int | None) -> dict:
    """Create the tasks, measure the server's pairs and, on the main server, the K/V memory."""
    async with make_client(url, 600) as client:
        infos = {name: await from_text(client, f"pool-{name}", texts[name]) for name in ("short", "long")}
        await upload_tasks(client, task_ids(args.tasks), fp)
        short_n, long_n = (infos[name]["num_virtual_tokens"] for name in ("short", "long"))
        busy_before = machine.busy_share()
        server = "main" if read_delay_ms is None else "slow-store"
        result = {
            "prefixes": infos,
            "rows": await measure(
                client, make_pairs(args.tasks, short_n, long_n, read_delay_ms), texts["prompts"], args, server
            ),
        }
        if read_delay_ms is None:
            say(f"main: K/V memory, 64 concurrent requests of the {long_n}-token task")
            result["memory"] = {
                "prefix_tokens": long_n,
                **await kv_memory(client, "pool-long", texts["prompts"]),
            }
        result["machine"] = machine.summary(busy_before)
        if args.url:  # not ours: leave it as it was
            await delete_prefixes(client, ["pool-short", "pool-long", *task_ids(args.tasks)])
    return result


def slow_store_args(args: argparse.Namespace, fp: ModelFingerprint) -> list[str]:
    """Every prefix file read sleeps; the prefix cache holds twice the running rows' prefixes, so the
    round-robin's next task is never still cached."""
    cache_bytes = 2 * 16 * 2 * fp.num_layers * fp.kv_heads * SHORT_PREFIX_TOKENS * fp.head_dim * 4  # float32
    return ["--store-read-delay-ms", str(args.read_delay_ms), "--prefix-cache-bytes", str(cache_bytes)]


@contextlib.contextmanager
def server(url: str | None, extra: list[str], log_path: Path) -> Iterator[str]:
    """`url` as it is, or a server started here on a new prefix folder (the server stopped and the
    folder, ~0.7 GB with 1,000 tasks, removed when the block ends)."""
    if url:
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="bench-pool-") as prefix_dir, log_path.open("w+") as log:
        serve_args = [*SERVE_ARGS, *extra, "--prefix-dir", prefix_dir]
        say(f"starting prefix-server serve {' '.join(serve_args)} (--compile wait: minutes)")
        with serverproc.running(serve_args, log=log, timeout_s=1200) as (_, base):
            yield base


def workload_texts() -> tuple[dict, str]:
    """Prompts and prefix texts of exact token lengths, from the default model's tokenizer (its converted
    folder exists once a server has started), and where they came from."""
    tokenizer, source = load_tokenizer(None)
    texts = {
        "prompts": make_texts(tokenizer, 64, PROMPT_TOKENS, 5, 1, "pool-prompts"),
        "long": make_texts(tokenizer, 1, LONG_PREFIX_TOKENS, 0, 0, "pool-long")[0],
        "short": make_texts(tokenizer, 1, SHORT_PREFIX_TOKENS, 0, 3, "pool-short")[0],
    }
    return texts, source


def run(args: argparse.Namespace, out: Path) -> dict:
    """The main server's scenarios, then the slow-store server's (started here, never with --url)."""
    result: dict = {"config": vars(args) | {"out": out}, "started_at": datetime.now(timezone.utc).isoformat()}
    main_args = ["--max-batch-size", "64"]
    with server(args.url, main_args, out / "server-main.log") as url:
        texts, result["prompt_source"] = workload_texts()
        fp = model_fingerprint()
        result["main"] = {
            "url": url,
            "args": main_args,
            **asyncio.run(bench_server(url, args, texts, fp, None)),
        }
    if args.url:
        result["slow_store"] = {"skipped": "needs a server this script starts (no --url)"}
        return result
    slow_args = slow_store_args(args, fp)
    try:
        with server(None, slow_args, out / "server-slow-store.log") as url:
            measured = asyncio.run(bench_server(url, args, texts, fp, args.read_delay_ms))
            result["slow_store"] = {"url": url, "args": slow_args, **measured}
    except serverproc.ServerNotReady as e:
        if "unrecognized arguments: --store-read-delay-ms" not in str(e):
            raise
        say("skipping the slow-store scenario: the server has no --store-read-delay-ms flag yet")
        result["slow_store"] = {"skipped": "the server refused --store-read-delay-ms (not there yet)"}
    return result


def report(result: dict) -> None:
    rows = list(result["main"]["rows"])
    slow = result["slow_store"]
    skipped = {"scenario": "each request another task, slow store reads", "baseline": "one task"}
    rows[3:3] = [{**skipped, "skipped": slow["skipped"]}] if "skipped" in slow else slow["rows"]
    config, memory = result["config"], result["main"]["memory"]
    print(
        f"\n{PROMPT_TOKENS}-token prompts, {NEW_TOKENS} new tokens, greedy; {config['rounds']} x concurrency "
        f"requests a run; medians of {config['repeats']} repeats (ratio: of the per-repeat ratios)"
    )
    print(format_table(rows))
    print("\nwhile 64 requests of the long-prefix task ran (the fullest moment seen):")
    print(format_memory(memory["peak"], memory["prefix_tokens"], int(memory["prompt_tokens"]) + NEW_TOKENS))
    if "skipped" not in slow:
        print(no_stall_line(slow["rows"][0], config["read_delay_ms"]))


def baseline_latency(row: dict) -> float:
    """The median of the baseline runs' median request latencies (seconds)."""
    return statistics.median(run["latency_s"] for run in row["runs"]["baseline"])


def no_stall_bound(row: dict, read_delay_ms: float) -> float:
    """The slow-store ratio a closed loop reaches if the loads stall nothing: each request lives T s in the
    baseline (its median latency) and cannot start before its read, so at best T / (T + delay) of it runs."""
    t = baseline_latency(row)
    return t / (t + read_delay_ms / 1000)


def no_stall_line(row: dict, read_delay_ms: float) -> str:
    bound = no_stall_bound(row, read_delay_ms)
    return (
        f"\nslow store: a request lives {baseline_latency(row):.2f} s in its baseline; {NEW_TOKENS}-token replies "
        f"that cannot start before a {read_delay_ms:.0f} ms read reach at most {bound:.2f} of it in a closed "
        f"loop, with nothing stalled; measured {row['ratio']:.2f} ({row['ratio'] / bound:.2f} of that bound)"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-pool-out-"))
    out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or out / "bench_pool.json"
    try:
        result = run(args, out)
    except (BenchError, serverproc.ServerNotReady) as e:
        print(f"bench_pool: {e}", file=sys.stderr)
        return 2
    report(result)
    json_path.write_text(json.dumps(result, indent=1, default=str))
    for name in ("main", "slow_store"):
        for warning in machine.warnings(result[name]["machine"]) if "machine" in result[name] else ():
            print(f"bench_pool: warning ({name} server): {warning}", file=sys.stderr)
    print(f"wrote {json_path} (server logs in {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
