"""The prefill on the packed linears (engine/prefill_step.py) against transformers' forward.

Engine-level (no HTTP), default model, the compiled decode step (its packed weights serve both). For each
scenario, `admit` of a batch of new requests (the prefill and its first token, max_new_tokens=1) runs with
`engine.packed_prefill` on and off, alternating, --repeats times; prints the median milliseconds, the
ratio, and how far the two prefills' first-token logits are apart (max |difference|) and whether their
greedy first tokens agree.

    python -m loadtest.bench_prefill                  # ~3 minutes on 2 cores (the step compiles first)
    python -m loadtest.bench_prefill --dtype bfloat16 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import load_model
from server.registry.format import PrefixKV
from server.request import Request, SamplingParams

# (name, rows, prompt tokens per row, prefix tokens: one prefix shared by every row, or 0)
SCENARIOS = [
    ("1 row, 30 tokens", 1, 30, 0),
    ("4 rows, 30 tokens", 4, 30, 0),
    ("16 rows, 30 tokens", 16, 30, 0),
    ("16 rows, 30 tokens, a 250-token prefix", 16, 30, 250),
    ("16 rows, 8-60 tokens (mixed lengths)", 16, None, 0),
    ("1 row, 500 tokens", 1, 500, 0),
]


def requests(engine: Engine, rows: int, tokens: int | None, prefix: PrefixKV | None, seed: int):
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.model.get_input_embeddings().num_embeddings
    out = []
    for i in range(rows):
        n = tokens if tokens is not None else 8 + (i * 52) // max(1, rows - 1)
        ids = torch.randint(100, vocab - 1, (n,), generator=gen).tolist()
        sampling = SamplingParams(max_new_tokens=1, ignore_eos=True, logprobs=0)
        key = None if prefix is None else ("bench", 1, "bench")  # one version: its rows share its pages
        out.append(Request(ids, prefix=prefix, prefix_key=key, sampling=sampling))
    return out


def run_once(engine: Engine, packed: bool, scenario, prefix) -> tuple[float, list[int], list[float]]:
    _, rows, tokens, _ = scenario
    engine.packed_prefill = packed
    reqs = requests(engine, rows, tokens, prefix, seed=rows)
    start = time.perf_counter()
    engine.admit(reqs)
    seconds = time.perf_counter() - start
    while engine.running:  # nothing left: max_new_tokens=1 finishes at the prefill
        engine.step()
    return seconds, [r.output_token_ids[0] for r in reqs], [r.output_logprobs[0].logprob for r in reqs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None, help="write the results here too")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    cache_dir = Settings().model_cache_dir
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))  # as the server's
    loaded = load_model(args.model, dtype=args.dtype, device="cpu", cache_dir=cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=16)
    print(f"compiling the decode step ({args.dtype}) ...", file=sys.stderr, flush=True)
    engine.compile()
    fp = engine.fingerprint
    results = []
    print(
        f"| scenario ({args.dtype}) | transformers ms | packed ms | ratio | max logprob diff | same tokens |"
    )
    print("|---|---:|---:|---:|---:|---|")
    for scenario in SCENARIOS:
        name, _, _, p = scenario
        prefix = None
        if p:
            g = torch.Generator().manual_seed(p)
            shape = (fp.num_layers, fp.kv_heads, p, fp.head_dim)
            prefix = PrefixKV(
                keys=torch.randn(shape, generator=g).to(engine.dtype),
                values=torch.randn(shape, generator=g).to(engine.dtype),
                fingerprint=fp,
            )
        times = {True: [], False: []}
        outs = {}
        with torch.inference_mode():
            for packed in (True, False):  # warm-up
                run_once(engine, packed, scenario, prefix)
            for _ in range(args.repeats):
                for packed in (False, True):
                    seconds, tokens, logprobs = run_once(engine, packed, scenario, prefix)
                    times[packed].append(seconds)
                    outs[packed] = (tokens, logprobs)
        eager, packed = (statistics.median(times[k]) * 1000 for k in (False, True))
        diff = max(abs(a - b) for a, b in zip(outs[True][1], outs[False][1], strict=True))
        same = outs[True][0] == outs[False][0]
        row = {"scenario": name, "transformers_ms": eager, "packed_ms": packed, "ratio": eager / packed}
        row |= {"max_logprob_diff": diff, "same_tokens": same, "runs": {str(k): v for k, v in times.items()}}
        results.append(row)
        print(
            f"| {name} | {eager:.1f} | {packed:.1f} | {eager / packed:.2f}x | {diff:.1e} | {same} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dtype": args.dtype, "model": loaded.name, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
