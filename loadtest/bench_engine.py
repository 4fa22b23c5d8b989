"""Engine benchmark: does a mixed-prefix batch cost what a plain batch costs?

Prints tokens/s of
  (a) a batch of N requests, each with its own prefix (N different prefixes),
  (b) the same batch with no prefixes,
  (c) the same N requests one at a time (each with its prefix),
and the ratios a/b (target >= 0.95) and a/c (target >= 4 for N = 8). Baselines run in the same process.
With --compile (the default) the engine uses the compiled decode step, and the eager step's (a) and (c)
run too, interleaved, on a second engine over the same weights: the compiled/eager ratios, and the lone
request's milliseconds per token.

    python loadtest/bench_engine.py                      # default model, float32 on CPU, compiled
    python loadtest/bench_engine.py --no-compile         # eager only
    python loadtest/bench_engine.py --dtype bfloat16
    python loadtest/bench_engine.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.workload import TEXT
from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import load_model
from server.request import Request, SamplingParams


def fixed_len_ids(tokenizer, text: str, length: int, offset: int) -> list[int]:
    ids = tokenizer(text * 4)["input_ids"]
    return ids[offset : offset + length]


def run(engine: Engine, batches: list[list[Request]]) -> tuple[float, int]:
    """Seconds and generated tokens for running the given batches one after another."""
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in batches:
        engine.generate(b)
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, sum(len(r.output_token_ids) for b in batches for r in b)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prefix-len", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    cache_dir = Settings().model_cache_dir
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir / "inductor"))  # as the server's
    loaded = load_model(args.model, dtype=args.dtype, device=args.device, cache_dir=cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=args.batch)  # compiled buckets up to the batch
    eager = Engine(loaded.model, loaded.tokenizer, max_rows=args.batch)  # same weights, never compiled
    compile_s = engine.compile() if args.compile else None
    tok = loaded.tokenizer
    prefixes = [
        engine.encode_prefix(fixed_len_ids(tok, TEXT, args.prefix_len, 3 * i)) for i in range(args.batch)
    ]
    prompts = [fixed_len_ids(tok, TEXT, args.prompt_len, 5 * i + 1) for i in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

    def requests(with_prefix: bool) -> list[Request]:
        return [
            Request(p, params, prefix=pre if with_prefix else None)
            for p, pre in zip(prompts, prefixes, strict=True)
        ]

    scenarios = {
        "a_mixed_prefixes": (engine, lambda: [requests(True)]),
        "b_no_prefixes": (engine, lambda: [requests(False)]),
        "c_one_at_a_time": (engine, lambda: [[r] for r in requests(True)]),
    }
    if args.compile:
        scenarios["a_eager"] = (eager, scenarios["a_mixed_prefixes"][1])
        scenarios["c_eager"] = (eager, scenarios["c_one_at_a_time"][1])
    for e in {id(e): e for e, _ in scenarios.values()}.values():
        run(e, [requests(True)])  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in scenarios}
    for _ in range(args.repeats):  # interleaved so drift hits every scenario alike
        for name, (e, make) in scenarios.items():
            seconds, tokens = run(e, make())
            samples[name].append(tokens / seconds)
    tps = {k: statistics.median(v) for k, v in samples.items()}
    result = {
        "model": loaded.name,
        "device": str(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "prefix_len": args.prefix_len,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "a_over_b": round(tps["a_mixed_prefixes"] / tps["b_no_prefixes"], 3),
        "a_over_c": round(tps["a_mixed_prefixes"] / tps["c_one_at_a_time"], 2),
        "compiled": args.compile,
        "ms_per_token_alone": round(1000 / tps["c_one_at_a_time"], 1),
    }
    if args.compile:
        result["compile_s"] = round(compile_s, 1)
        result["compiled_over_eager_batch"] = round(tps["a_mixed_prefixes"] / tps["a_eager"], 2)
        result["compiled_over_eager_alone"] = round(tps["c_one_at_a_time"] / tps["c_eager"], 2)
    print(
        f"{loaded.name} on {result['device']} ({result['dtype']}), {args.batch} requests, "
        f"{args.prefix_len}-token prefixes, {args.prompt_len}-token prompts, {args.new_tokens} new tokens"
    )
    print("| scenario | tokens/s |\n|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:.1f} |")
    print(f"a/b = {result['a_over_b']:.3f} (target >= 0.95)   a/c = {result['a_over_c']:.2f} (target >= 4)")
    print(f"lone request: {result['ms_per_token_alone']} ms/token (prefill included)")
    if args.compile:
        print(
            f"compiled/eager: batch {result['compiled_over_eager_batch']:.2f}, "
            f"alone {result['compiled_over_eager_alone']:.2f}; compiling took {result['compile_s']} s"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
