"""Chunked prefill: how long do running rows wait for their next token while a long prompt joins?

Engine-level (no HTTP), default model, eager decode step unless --compile. 8 rows decode (30-token prompts);
then one request with a long prompt (--long-tokens, default 3000) joins. Measured for each chunk budget
(0 = the whole prompt in one prefill, as before chunking; then --chunks), alternating, --repeats times:
- the running rows' longest wait between two tokens while the long prompt is prefilled (their stall),
- the long request's time to first token,
- the running rows' tokens/s over the whole run.
Prints medians and the ratios against budget 0.

    python -m loadtest.bench_chunked                          # ~3 minutes on 2 cores
    python -m loadtest.bench_chunked --chunks 256 512 1024 --long-tokens 2000
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import load_model
from server.request import Request, SamplingParams


def run(engine: Engine, chunk: int, long_tokens: int, rows: int = 8) -> dict[str, float]:
    engine.prefill_chunk_tokens = chunk
    gen = torch.Generator().manual_seed(0)
    vocab = engine.model.get_input_embeddings().num_embeddings

    def ids(n):
        return torch.randint(100, vocab - 1, (n,), generator=gen).tolist()

    short = [Request(ids(30), SamplingParams(max_new_tokens=64, ignore_eos=True)) for _ in range(rows)]
    engine.admit(short)
    for _ in range(3):  # running steadily
        engine.step()
    long = Request(ids(long_tokens), SamplingParams(max_new_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    engine.admit([long])  # its first chunk (all of it with budget 0)
    last_token, stall, first_token = start, 0.0, None
    while engine.running:
        before = len(short[0].output_token_ids)
        engine.step()
        now = time.perf_counter()
        if first_token is None and len(short[0].output_token_ids) > before:
            stall = max(stall, now - last_token)  # a running row's wait, while the long prompt goes in
            last_token = now
        if first_token is None and long.output_token_ids:
            first_token = now - start
    wall = time.perf_counter() - start
    tokens = sum(len(r.output_token_ids) for r in short)
    return {"stall_s": stall, "ttft_s": first_token or wall, "rows_tok_s": tokens / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--long-tokens", type=int, default=3000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[512])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="compiled decode step (minutes the first time)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    loaded = load_model("default", dtype="float32", device="cpu", cache_dir=Settings().model_cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=16, max_seq_len=args.long_tokens + 512)
    if args.compile:
        engine.compile()
    budgets = [0, *args.chunks]
    results: dict[int, list[dict[str, float]]] = {b: [] for b in budgets}
    run(engine, 0, 64)  # warm-up
    for repeat in range(args.repeats):
        for b in budgets if repeat % 2 == 0 else reversed(budgets):
            results[b].append(run(engine, b, args.long_tokens))
            r = results[b][-1]
            print(
                f"repeat {repeat + 1}, chunk {b or 'whole'}: stall {r['stall_s']:.2f} s, ttft {r['ttft_s']:.2f} s, "
                f"rows {r['rows_tok_s']:.1f} tok/s",
                flush=True,
            )
    med = {b: {k: statistics.median(r[k] for r in results[b]) for k in results[b][0]} for b in budgets}
    print(f"\n{args.long_tokens}-token prompt joining 8 decoding rows (medians of {args.repeats}):")
    print("| prefill chunk | rows' longest wait for a token | long prompt's first token | rows' tokens/s |")
    print("|---|---:|---:|---:|")
    for b in budgets:
        m, base = med[b], med[0]
        print(
            f"| {b or 'whole prompt (0)'} | {m['stall_s']:.2f} s ({m['stall_s'] / base['stall_s']:.2f}x) | "
            f"{m['ttft_s']:.2f} s ({m['ttft_s'] / base['ttft_s']:.2f}x) | "
            f"{m['rows_tok_s']:.1f} ({m['rows_tok_s'] / base['rows_tok_s']:.2f}x) |"
        )
    if args.json:
        args.json.write_text(json.dumps({"long_tokens": args.long_tokens, "medians": med}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
