"""Eight-bit weights (`--quantize int8 | w8a8`) on the default model: how much they change outputs, and how fast.

Variants: float32, bfloat16, int8 as the server runs it here (int8 x int16 on a CPU with AVX-512 VNNI) on
float32 and on bfloat16 activations, w8a8 (int8 x int8: llama.cpp's Q8_0 arithmetic), and int8 weight-only
(widened, the path without VNNI) for comparison (engine/quantize.py).
Quality (eager engines, greedy; the eager int8 linears multiply as the compiled step's do):
  - greedy agreement with float32: N prompts (the shipped examples' held-out prompts, then windows of
    loadtest/data/public_domain.txt) x 32 new tokens; the share of prompts whose tokens are all
    identical, and the mean index of the first difference (32 when identical);
  - perplexity on loadtest/data/public_domain.txt (one forward over the whole text), and in
    llama-perplexity's convention (`-c 128`: chunks, each one's second half scored);
  - the shipped example tasks' held-out exact match with their trained prefixes;
  - with --peer URL (a llama-server, e.g. on the Q8_0 GGUF): the same agreement measure for its greedy
    tokens (prompts sent as token ids to its /completion).
Speed (compiled engines, engine-direct, rounds alternating the variants): one request alone x 64 new
tokens, and 8 concurrent requests of 8 different prefixes x 32 new tokens; tokens/s and ratios.

    python -m loadtest.bench_int8 [--prompts 200] [--rounds 3] [--no-speed] [--speed int8,w8a8] [--peer URL]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import Settings
from server.engine.engine import Engine
from server.engine.model import DEFAULT_MODEL, load_model
from server.engine.quantize import quantize_model
from server.registry.format import load_prefix
from server.request import Request, SamplingParams
from server.training.data import read_jsonl
from server.training.evaluate import evaluate

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "loadtest" / "data" / "public_domain.txt").read_text(encoding="utf-8")
EXAMPLES = ROOT / "prefixes" / "examples"
# name -> (activation dtype, --quantize, vnni: the mode's VNNI kernel where this CPU runs it, as served)
VARIANTS = {
    "float32": ("float32", "off", True),
    "bfloat16": ("bfloat16", "off", True),
    "int8": ("float32", "int8", True),
    "int8+bf16": ("bfloat16", "int8", True),
    "w8a8": ("float32", "w8a8", True),
    "int8 weight-only": ("float32", "int8", False),
}


def load(variant: str) -> Engine:
    dtype, quantize, vnni = VARIANTS[variant]
    # As the server loads it (the GGUF's Q8_0 lm_head blocks included); weight-only by hand (float32: the
    # same blocks, re-rounded from the exact float32 embedding)
    cache = Settings().model_cache_dir
    loaded = load_model(DEFAULT_MODEL, dtype=dtype, cache_dir=cache, quantize=quantize if vnni else "off")
    if not vnni:
        quantize_model(loaded.model, quantize, vnni=False)
    return Engine(loaded.model, loaded.tokenizer, max_rows=16)


def agreement_prompts(tokenizer, n: int) -> list[list[int]]:
    """The examples' held-out prompts, then 24-token windows of the public-domain text."""
    prompts = [tokenizer(ex.prompt)["input_ids"] for d in ("sentiment", "booking") for ex in eval_set(d)]
    ids = tokenizer(TEXT)["input_ids"]
    step = max(1, (len(ids) - 24) // max(1, n - len(prompts)))
    prompts += [ids[i : i + 24] for i in range(0, len(ids) - 24, step)]
    return prompts[:n]


def eval_set(task: str):
    return read_jsonl(EXAMPLES / task / "eval.jsonl")


def greedy(engine: Engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    outputs = []
    for start in range(0, len(prompts), 16):
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        batch = [Request(p, params) for p in prompts[start : start + 16]]
        outputs += [r.output_token_ids for r in engine.generate(batch)]
    return outputs


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))


@torch.inference_mode()
def perplexity(engine: Engine) -> float:
    ids = torch.tensor([engine.tokenizer(TEXT)["input_ids"]], device=engine.device)  # [1, T]
    logits = engine.model(input_ids=ids).logits[0, :-1].float()  # [T - 1, vocab]
    nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:])
    return math.exp(nll.item())


@torch.inference_mode()
def chunked_perplexity(engine: Engine, ctx: int) -> float:
    """llama.cpp's `llama-perplexity -c ctx` convention: the text's tokens in chunks of ctx, each chunk's
    second half scored (the first half is context), so that its figures sit beside these."""
    ids = engine.tokenizer(TEXT)["input_ids"]
    nll, count = 0.0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        chunk = torch.tensor([ids[start : start + ctx]], device=engine.device)  # [1, ctx]
        logits = engine.model(input_ids=chunk).logits[0].float()  # [ctx, vocab]
        first = ctx // 2
        nll += torch.nn.functional.cross_entropy(
            logits[first - 1 : -1], chunk[0, first:], reduction="sum"
        ).item()
        count += ctx - first
    return math.exp(nll / count)


def peer_greedy(url: str, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """A llama-server's greedy tokens for each prompt (token ids in, ids out: no tokenizer between)."""
    import httpx

    body = {"n_predict": new_tokens, "temperature": 0, "samplers": ["top_k"], "top_k": 1, "ignore_eos": True}
    body |= {"return_tokens": True, "cache_prompt": False}
    with httpx.Client(base_url=url, timeout=120) as client:
        outputs = []
        for prompt in prompts:
            reply = client.post("/completion", json={**body, "prompt": prompt})
            reply.raise_for_status()
            outputs.append(reply.json()["tokens"])
    return outputs


def held_out(engine: Engine) -> dict[str, float]:
    scores = {}
    for task in ("sentiment", "booking"):
        summary = json.loads((EXAMPLES / task / "prefix.json").read_text())
        prefix = load_prefix(
            (EXAMPLES / task / "prefix.safetensors").read_bytes(), engine.fingerprint, dtype=engine.dtype
        )
        result = evaluate(engine, eval_set(task), prefix, chat_template=summary["chat_template"])
        scores[task] = result.score
    return scores


def speed_batches(engine: Engine) -> tuple[list[Request], list[Request]]:
    ids = engine.tokenizer(TEXT)["input_ids"]
    prefixes = [engine.encode_prefix(ids[20 * i : 20 * i + 16]) for i in range(8)]
    alone = [Request(ids[100:132], SamplingParams(max_new_tokens=64, ignore_eos=True))]
    eight = [
        Request(ids[40 * i : 40 * i + 32], SamplingParams(max_new_tokens=32, ignore_eos=True), prefix=p)
        for i, p in enumerate(prefixes)
    ]
    return alone, eight


def tokens_per_s(engine: Engine, requests: list[Request]) -> float:
    fresh = [Request(r.prompt_token_ids, r.sampling, prefix=r.prefix) for r in requests]
    start = time.perf_counter()
    engine.generate(fresh)
    return sum(len(r.output_token_ids) for r in fresh) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-speed", action="store_true")
    ap.add_argument("--quality", default=",".join(VARIANTS), help="variants to measure the quality of")
    ap.add_argument("--peer", help="a llama-server URL: its greedy agreement with float32, same prompts")
    ap.add_argument("--ctx", type=int, default=128, help="chunk size of the llama-perplexity-style figure")
    ap.add_argument("--speed", default=",".join(VARIANTS), help="variants to measure the speed of")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    report: dict = {"quality": {}, "speed": {}}

    print("quality (eager engines, greedy)")
    reference = None
    for variant in ["float32", *(v for v in args.quality.split(",") if v != "float32")]:
        engine = load(variant)
        prompts = agreement_prompts(engine.tokenizer, args.prompts)
        outputs = greedy(engine, prompts, args.new_tokens)
        reference = reference or outputs
        firsts = [first_difference(a, b) for a, b in zip(outputs, reference, strict=True)]
        row = {
            "identical": sum(f == args.new_tokens for f in firsts) / len(firsts),
            "mean_first_difference": statistics.mean(firsts),
            "perplexity": perplexity(engine),
            f"perplexity_c{args.ctx}": chunked_perplexity(engine, args.ctx),
            "held_out": held_out(engine),
        }
        report["quality"][variant] = row
        print(
            f"  {variant:16s} identical to float32 {row['identical']:.1%} of {len(prompts)} prompts, "
            f"first difference at {row['mean_first_difference']:.1f} of {args.new_tokens} (mean); "
            f"perplexity {row['perplexity']:.3f} (-c {args.ctx}: {row[f'perplexity_c{args.ctx}']:.3f}); "
            "held-out exact match " + ", ".join(f"{k} {v:.2f}" for k, v in row["held_out"].items())
        )
        del engine
    if args.peer:
        outputs = peer_greedy(args.peer, prompts, args.new_tokens)
        firsts = [first_difference(a, b) for a, b in zip(outputs, reference, strict=True)]
        row = {"identical": sum(f == args.new_tokens for f in firsts) / len(firsts)}
        row["mean_first_difference"] = statistics.mean(firsts)
        report["quality"][f"peer {args.peer}"] = row
        print(
            f"  peer {args.peer}: identical to float32 {row['identical']:.1%} of {len(prompts)} prompts, "
            f"first difference at {row['mean_first_difference']:.1f} of {args.new_tokens} (mean)"
        )

    if not args.no_speed:
        print("speed (compiled, engine-direct; tokens/s, median of rounds)")
        engines = {}
        measured = [
            "float32",
            "bfloat16",
            *(v for v in args.speed.split(",") if v not in ("float32", "bfloat16")),
        ]
        for variant in measured:
            engines[variant] = load(variant)
            engines[variant].compile()
        batches = {v: speed_batches(e) for v, e in engines.items()}
        samples: dict[str, dict[str, list[float]]] = {v: {"alone": [], "8": []} for v in measured}
        for _ in range(args.rounds):
            for variant, engine in engines.items():  # alternating: the machine's drift hits all alike
                alone, eight = batches[variant]
                samples[variant]["alone"].append(tokens_per_s(engine, alone))
                samples[variant]["8"].append(tokens_per_s(engine, eight))
        base = {k: statistics.median(samples["float32"][k]) for k in ("alone", "8")}
        bf16 = {k: statistics.median(samples["bfloat16"][k]) for k in ("alone", "8")}
        for variant in measured:
            med = {k: statistics.median(samples[variant][k]) for k in ("alone", "8")}
            report["speed"][variant] = med
            print(
                f"  {variant:16s} alone {med['alone']:6.1f} ({med['alone'] / base['alone']:.2f}x float32, "
                f"{med['alone'] / bf16['alone']:.2f}x bfloat16)   8 concurrent {med['8']:6.1f} "
                f"({med['8'] / base['8']:.2f}x float32, {med['8'] / bf16['8']:.2f}x bfloat16)"
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
