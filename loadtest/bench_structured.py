"""Structured output on the default model: what a JSON schema costs per token, and what it does to answers.

Two parts, both engine-direct (the server's Engine, float32, eager step unless --compile):

* quality: the `booking` example's held-out prompts (prefixes/examples/booking/eval.jsonl), greedy, with and
  without its prefix, with and without its schema (prefixes/examples/booking/schema.json): the share of
  answers that parse as JSON and validate, and the held-out exact match; then prompts that are not
  booking requests at all, with the prefix and the schema: still valid JSON?
* cost: `--rows` rows (default 16), each row its own schema (the booking schema with a different name
  length, so 16 grammars), against the same rows unconstrained, alternating `--repeats` times: decode
  tokens/s of each, and the time the grammar work takes per step (the masks of every row, applying them,
  and advancing each row's matcher), measured around engine/grammar.py's two calls.

    python -m loadtest.bench_structured [--rows 16] [--repeats 3] [--compile] [--skip-quality]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import jsonschema
import torch

from server.config import Settings
from server.engine import grammar
from server.engine.engine import Engine
from server.engine.model import load_model
from server.output import finish_texts
from server.registry.format import load_prefix
from server.request import Request, SamplingParams
from server.training.data import answer, prompt_token_ids, read_jsonl
from server.training.evaluate import evaluate

BOOKING = Path(__file__).resolve().parent.parent / "prefixes" / "examples" / "booking"
OTHER_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Request: I would like to cancel my order.\nJSON:",
    "Tell me a joke about cats.",
    "Translate 'good morning' into German.",
    "Request: Table for six at the window please, Sunday lunch.\nJSON:",
    "List three prime numbers.",
    "Request: hi\nJSON:",
    "Explain photosynthesis in one sentence.",
    "Request: Can I bring my dog?\nJSON:",
]


def valid_share(texts: list[str], schema: dict) -> float:
    ok = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text), schema)
            ok += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    return ok / len(texts)


def quality(engine: Engine, prefix, schema: dict) -> None:
    examples = read_jsonl(BOOKING / "eval.jsonl")
    constraint = grammar.json_schema_constraint(schema, "json_schema")
    print(f"\n## booking held-out ({len(examples)} prompts, greedy)\n")
    print("| prefix | schema | valid JSON (schema) | exact match | seconds |")
    print("|---|---|---|---|---|")
    for use_prefix in (False, True):
        for use_schema in (False, True):
            start = time.perf_counter()
            result = evaluate(
                engine,
                examples,
                prefix if use_prefix else None,
                chat_template=False,
                constraint=constraint if use_schema else None,
            )
            seconds = time.perf_counter() - start
            texts = [answer(t) for t in result.outputs]
            print(
                f"| {'booking' if use_prefix else 'none'} | {'yes' if use_schema else 'no'} | "
                f"{valid_share(texts, schema):.0%} | {result.score:.0%} | {seconds:.1f} |"
            )
    tokenizer = engine.tokenizer
    requests = [
        Request(
            prompt_token_ids(p, tokenizer, False),
            SamplingParams(max_new_tokens=64, constraint=constraint),
            prefix=prefix,
        )
        for p in OTHER_PROMPTS
    ]
    texts = [r.text for r in finish_texts(engine.generate(requests), tokenizer)]
    print(
        f"\nprompts that are not booking requests ({len(texts)}), booking prefix + schema: "
        f"{valid_share(texts, schema):.0%} valid JSON; finish reasons "
        f"{sorted({r.finish_reason.value for r in requests})}"
    )
    for p, t in list(zip(OTHER_PROMPTS, texts, strict=True))[:4]:
        print(f"  {p!r:60.60} -> {t!r}")


class GrammarTimer:
    """Seconds spent in engine/grammar.py's per-step calls (constrain: masks; advance: matchers)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._constrain, self._advance = grammar.constrain, grammar.advance

    def __enter__(self) -> GrammarTimer:
        def timed(fn):
            def run(*args):
                start = time.perf_counter()
                try:
                    return fn(*args)
                finally:
                    self.seconds += time.perf_counter() - start

            return run

        def constrain(logits, matchers):
            self.calls += 1
            return timed(self._constrain)(logits, matchers)

        grammar.constrain, grammar.advance = constrain, timed(self._advance)
        return self

    def __exit__(self, *exc) -> None:
        grammar.constrain, grammar.advance = self._constrain, self._advance


def cost(engine: Engine, prefix, schema: dict, rows: int, repeats: int, max_new_tokens: int) -> None:
    examples = read_jsonl(BOOKING / "eval.jsonl")[:rows]
    prompts = [prompt_token_ids(ex.prompt, engine.tokenizer, False) for ex in examples]
    schemas = []
    for i in range(rows):  # each row its own grammar
        s = copy.deepcopy(schema)
        s["properties"]["name"]["maxLength"] = 20 + i
        schemas.append(grammar.json_schema_constraint(s, "json_schema"))

    def run(constrained: bool) -> tuple[float, int, float, int]:
        requests = [
            Request(
                p,
                SamplingParams(max_new_tokens=max_new_tokens, constraint=c if constrained else None),
                prefix=prefix,
            )
            for p, c in zip(prompts, schemas, strict=True)
        ]
        with GrammarTimer() as timer:
            start = time.perf_counter()
            engine.generate(requests)
            seconds = time.perf_counter() - start
        return seconds, sum(len(r.output_token_ids) for r in requests), timer.seconds, timer.calls

    run(True), run(False)  # warm: grammars compiled, kernels loaded
    results = {True: [], False: []}
    for _ in range(repeats):
        for constrained in (False, True):
            results[constrained].append(run(constrained))
    print(f"\n## cost: {rows} rows, each its own schema, vs unconstrained ({repeats} alternating runs)\n")
    print("| rows | tokens/s | ratio | grammar ms per step | grammar share of the time |")
    print("|---|---|---|---|---|")
    tps = {k: statistics.median(n / s for s, n, _, _ in v) for k, v in results.items()}
    for constrained in (False, True):
        per_step = statistics.median(g / max(c, 1) * 1e3 for _, _, g, c in results[constrained])
        share = statistics.median(g / s for s, _, g, _ in results[constrained])
        print(
            f"| {'each its own schema' if constrained else 'unconstrained'} | {tps[constrained]:.1f} | "
            f"{tps[constrained] / tps[False]:.2f} | {per_step:.2f} | {share:.1%} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--compile", action="store_true", help="the compiled decode step (minutes to build)")
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    loaded = load_model("default", dtype="float32", cache_dir=Settings().model_cache_dir)
    engine = Engine(loaded.model, loaded.tokenizer, max_rows=max(args.rows, 16))
    if args.compile:
        engine.compile()
    prefix = load_prefix((BOOKING / "prefix.safetensors").read_bytes(), engine.fingerprint)
    schema = json.loads((BOOKING / "schema.json").read_text())
    print(
        f"# structured output, {torch.get_num_threads()} threads, {'compiled' if args.compile else 'eager'} step"
    )
    if not args.skip_quality:
        quality(engine, prefix, schema)
    cost(engine, prefix, schema, args.rows, args.repeats, args.max_new_tokens)


if __name__ == "__main__":
    main()
