"""HTTP benchmark: does the server batch concurrent mixed-task requests, and what does HTTP cost?

Prints tokens/s of
  (h8) N concurrent POST /generate, each for a different task (N different 16-token prefixes),
  (h1) the same N requests sent one by one,
  (e8) the same N requests run engine-direct in this process, as one batch (no HTTP, no scheduler),
and the ratios h8/h1 (target >= 3) and h8/e8 (target >= 0.9). It starts its own server on a free
port (default model, a temporary prefix folder) unless --url is given.

    python loadtest/bench_http.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest import serverproc
from loadtest.bench_engine import TEXT, fixed_len_ids
from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import load_model
from server.registry.format import save_native
from server.request import Request, SamplingParams


async def send(client: httpx.AsyncClient, body: dict) -> int:
    resp = await client.post("/generate", json=body)
    resp.raise_for_status()
    return resp.json()["usage"]["completion_tokens"]


async def engine_counters(client: httpx.AsyncClient) -> tuple[float, float]:
    """The server's engine steps and busy seconds so far (from /metrics)."""
    text = (await client.get("/metrics")).text
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("prefix_server_engine_steps_total", "prefix_server_engine_busy_seconds_total"):
            values[name] = float(value)
    return values.get("prefix_server_engine_steps_total", 0.0), values.get(
        "prefix_server_engine_busy_seconds_total", 0.0
    )


async def http_run(client: httpx.AsyncClient, bodies: list[dict], concurrent: bool) -> tuple[float, int]:
    start = time.perf_counter()
    if concurrent:
        tokens = sum(await asyncio.gather(*(send(client, b) for b in bodies)))
    else:
        tokens = 0
        for b in bodies:
            tokens += await send(client, b)
    return time.perf_counter() - start, tokens


def start_server(extra: list[str]) -> tuple[subprocess.Popen, str]:
    """The server under test on a fresh prefix folder; exits if it does not become ready."""
    prefix_dir = tempfile.mkdtemp(prefix="bench-prefixes-")
    try:  # --compile wait: minutes on a small CPU
        return serverproc.start(["--prefix-dir", prefix_dir, *extra], timeout_s=1200)
    except serverproc.ServerNotReady as e:
        raise SystemExit(f"bench_http: {e}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="an already running server (default: start one)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="server (--compile wait) and engine-direct both on the compiled decode step",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    cache_dir = Settings().model_cache_dir
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))  # as the server's
    loaded = load_model("default", cache_dir=cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer)
    tok = loaded.tokenizer
    compile_flag = ["--compile", "wait" if args.compile else "off"]
    proc, url = (None, args.url) if args.url else start_server(["--max-batch-wait-ms", "20", *compile_flag])
    if args.compile:  # after the server's compile: the same graphs, from the same inductor cache
        engine.compile()
    try:
        prefixes = [engine.encode_prefix(fixed_len_ids(tok, TEXT, 16, 3 * i)) for i in range(args.batch)]
        for i, prefix in enumerate(prefixes):
            files = {"file": ("p.safetensors", save_native(prefix))}
            httpx.post(
                url + "/prefixes", data={"task_id": f"bench-{i}"}, files=files, timeout=60
            ).raise_for_status()
        prompts = [tok.decode(fixed_len_ids(tok, TEXT, 30, 5 * i + 1)) for i in range(args.batch)]
        bodies = [
            {"task_id": f"bench-{i}", "prompt": p, "max_new_tokens": args.new_tokens, "ignore_eos": True}
            for i, p in enumerate(prompts)
        ]
        params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

        def engine_run() -> tuple[float, int]:
            reqs = [
                Request(tok(p)["input_ids"], params, prefix=x) for p, x in zip(prompts, prefixes, strict=True)
            ]
            start = time.perf_counter()
            engine.generate(reqs)
            return time.perf_counter() - start, sum(len(r.output_token_ids) for r in reqs)

        busy_share: list[float] = []  # h8: the server engine's busy seconds / the run's wall seconds
        step_ms: list[float] = []  # h8: the server's mean step time

        async def measure() -> dict[str, list[float]]:
            # One client for the whole run: its connections stay open, as a real client's would.
            limits = httpx.Limits(max_keepalive_connections=args.batch, max_connections=args.batch)
            async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
                scenarios = {
                    "h8_http_concurrent": lambda: http_run(client, bodies, concurrent=True),
                    "h1_http_one_by_one": lambda: http_run(client, bodies, concurrent=False),
                }
                await scenarios["h8_http_concurrent"]()  # warm-up (and opens the connections)
                samples: dict[str, list[float]] = {k: [] for k in [*scenarios, "e8_engine_direct"]}
                for _ in range(args.repeats):  # interleaved so drift hits every scenario alike
                    for name, run in scenarios.items():
                        steps0, busy0 = await engine_counters(client)
                        seconds, tokens = await run()
                        samples[name].append(tokens / seconds)
                        if name == "h8_http_concurrent":  # where the server's wall time went
                            steps1, busy1 = await engine_counters(client)
                            busy_share.append((busy1 - busy0) / seconds)
                            step_ms.append(1000 * (busy1 - busy0) / max(steps1 - steps0, 1))
                    seconds, tokens = engine_run()  # blocks the loop: nothing else is running
                    samples["e8_engine_direct"].append(tokens / seconds)
                return samples

        samples = asyncio.run(measure())
    finally:
        if proc is not None:
            serverproc.stop(proc, timeout_s=60)
    tps = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "batch": args.batch,
        "new_tokens": args.new_tokens,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "h8_over_h1": round(tps["h8_http_concurrent"] / tps["h1_http_one_by_one"], 2),
        "h8_over_e8": round(tps["h8_http_concurrent"] / tps["e8_engine_direct"], 3),
        "h8_server_engine_busy_share": round(statistics.median(busy_share), 3),
        "h8_server_step_ms": round(statistics.median(step_ms), 1),
    }
    print(
        f"{loaded.name}, {args.batch} requests for {args.batch} tasks, 16-token prefixes, {args.new_tokens} new tokens"
    )
    print("| scenario | tokens/s |\n|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:.1f} |")
    print(
        f"h8/h1 = {result['h8_over_h1']:.2f} (target >= 3)   h8/e8 = {result['h8_over_e8']:.3f} (target >= 0.9)"
    )
    print(
        f"during h8 the server's engine was busy {result['h8_server_engine_busy_share']:.1%} of the time, "
        f"{result['h8_server_step_ms']} ms per step"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
