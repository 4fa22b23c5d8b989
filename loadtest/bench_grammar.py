"""Benchmark JSON-schema-constrained decoding masks for 16 rows on the CPU.

Groundwork for structured output: every row of a 16-row decode batch has its
OWN JSON schema, and before each sampling step the server must compute, per
row, the bitmask of tokens the schema allows next.  This script measures that
cost for three grammar libraries (llguidance, xgrammar, outlines-core) with
the server's default tokenizer (SmolLM2-135M-Instruct, vocabulary 49152):

* tokenizer setup time (once per library) and compile time per schema;
* per token: the mask computation alone (microseconds per row), the
  commit/advance of the sampled token (reported separately), and the sum of
  the 16 row masks of one decode step;
* the library's batched / multi-threaded mask fill API for several matchers
  at once, where there is one (llguidance LLExecutor, xgrammar
  BatchGrammarMatcher);
* applying a [16, 49152] bitmask to float32 logits: each library's own helper
  (xgrammar: C++ CPU kernel; llguidance, outlines-core: torch.compile'd, so
  the first call compiles) and a plain torch unpack + masked_fill_.

Options: --only NAME..., --repeat N (fresh matchers per decode, default 5),
--no-batched, --torch-threads N (default 1), --tokenizer FOLDER.

Decoding is simulated: a valid instance of each schema is serialized
compactly, tokenized with the Hugging Face tokenizer (plus EOS), and at each
step the "sampled" token is the next target token if the mask allows it
(otherwise the lowest-id allowed token, counted as a miss).

The libraries are not project dependencies; install them in a scratch venv
that also sees the repo venv's torch/transformers, then run from the repo::

    /work/main/.venv/bin/python -m venv /tmp/gramvenv
    echo /work/main/.venv/lib/python3.11/site-packages \\
        > /tmp/gramvenv/lib/python3.11/site-packages/repo_venv.pth
    /tmp/gramvenv/bin/pip install llguidance xgrammar outlines-core
    cd /work/main && /tmp/gramvenv/bin/python -m loadtest.bench_grammar

A library that fails to import is reported as not installed and skipped.
"""

from __future__ import annotations

import argparse
import glob
import importlib.metadata
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

ROWS = 16
MODEL_GLOB = "/root/.cache/prefix-server/models/SmolLM2-135M-Instruct.Q4_1-*"

# --------------------------------------------------------------------------
# Schemas and one valid instance of each (properties in schema order).
# --------------------------------------------------------------------------


def _obj(props: dict[str, Any]) -> dict[str, Any]:
    """Closed object schema with every property required."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


STR = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}

CASES: list[tuple[str, dict[str, Any], Any]] = [
    (
        "booking",
        _obj(
            {
                "name": {"type": "string", "maxLength": 40},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "time": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"},
                "party_size": {"type": "integer", "minimum": 1, "maximum": 20},
            }
        ),
        {"name": "Ada Lovelace", "date": "2026-12-24", "time": "19:30", "party_size": 4},
    ),
    ("point", _obj({"x": INT, "y": INT}), {"x": 12, "y": -7}),
    (
        "user",
        _obj({"id": INT, "email": STR, "active": BOOL}),
        {"id": 4711, "email": "ada@example.com", "active": True},
    ),
    (
        "sentiment",
        _obj(
            {
                "label": {"enum": ["positive", "negative", "neutral"]},
                "confidence": {"type": "number"},
            }
        ),
        {"label": "neutral", "confidence": 0.75},
    ),
    (
        "tags",
        _obj({"title": STR, "tags": {"type": "array", "items": STR, "maxItems": 5}}),
        {"title": "Grammar benchmarks", "tags": ["json", "schema", "cpu"]},
    ),
    (
        "address",
        _obj(
            {
                "person": STR,
                "address": _obj({"street": STR, "city": STR, "zip": STR}),
            }
        ),
        {
            "person": "Grace Hopper",
            "address": {"street": "1 Main St", "city": "Arlington", "zip": "22201"},
        },
    ),
    (
        "order",
        _obj(
            {
                "order_id": STR,
                "items": {
                    "type": "array",
                    "items": _obj({"sku": STR, "qty": INT}),
                    "minItems": 1,
                },
                "express": BOOL,
            }
        ),
        {
            "order_id": "A-1001",
            "items": [{"sku": "pen", "qty": 3}, {"sku": "ink", "qty": 1}],
            "express": False,
        },
    ),
    (
        "weather",
        _obj(
            {
                "city": STR,
                "unit": {"enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 14},
            }
        ),
        {"city": "Oslo", "unit": "celsius", "days": 3},
    ),
    (
        "tool_call",
        _obj(
            {
                "tool": {"const": "search"},
                "arguments": _obj({"query": STR, "limit": INT}),
            }
        ),
        {"tool": "search", "arguments": {"query": "prefix caching", "limit": 5}},
    ),
    (
        "yes_no",
        _obj({"answer": BOOL, "reason": STR}),
        {"answer": True, "reason": "The schema allows it."},
    ),
    (
        "product",
        _obj(
            {
                "name": STR,
                "price_cents": {"type": "integer", "minimum": 0},
                "in_stock": BOOL,
                "category": {"enum": ["book", "toy", "food", "tool"]},
                "rating": {"type": "integer", "minimum": 1, "maximum": 5},
            }
        ),
        {
            "name": "Lamp",
            "price_cents": 2599,
            "in_stock": True,
            "category": "tool",
            "rating": 4,
        },
    ),
    (
        "matrix",
        _obj(
            {
                "rows": {
                    "type": "array",
                    "items": {"type": "array", "items": INT},
                }
            }
        ),
        {"rows": [[1, 2], [3, 4], [5, 6]]},
    ),
    (
        "event",
        _obj(
            {
                "title": STR,
                "when": {"type": "string", "format": "date"},
                "attendees": {"type": "array", "items": STR},
            }
        ),
        {"title": "Standup", "when": "2026-12-08", "attendees": ["ann", "bob"]},
    ),
    (
        "color",
        _obj({"r": INT, "g": INT, "b": INT, "name": STR}),
        {"r": 255, "g": 128, "b": 0, "name": "orange"},
    ),
    (
        "login",
        _obj(
            {
                "username": {"type": "string", "pattern": "^[a-z][a-z0-9_]{2,15}$"},
                "remember": BOOL,
            }
        ),
        {"username": "ada_99", "remember": False},
    ),
    (
        "review",
        _obj(
            {
                "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                "summary": STR,
                "pros": {"type": "array", "items": STR},
                "cons": {"type": "array", "items": STR},
            }
        ),
        {"stars": 5, "summary": "Fast", "pros": ["cheap"], "cons": []},
    ),
]

# --------------------------------------------------------------------------
# Library adapters: the same small interface over three different APIs.
# --------------------------------------------------------------------------


class Adapter(Protocol):
    """What the benchmark needs from a grammar library."""

    name: str
    dist: str
    batched_api: str

    def setup(self, hf_tok: Any, vocab_size: int) -> None: ...
    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None: ...
    def advance(self, m: Any, token: int) -> bool: ...
    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None: ...


class LLGuidanceAdapter:
    """llguidance: LLTokenizer + LLMatcher; LLExecutor for parallel fills."""

    name = "llguidance"
    dist = "llguidance"
    batched_api = "LLExecutor + fill_next_token_bitmask_par"

    def setup(self, hf_tok: Any, vocab_size: int) -> None:
        import llguidance
        import llguidance.hf
        import llguidance.torch

        self._ll = llguidance
        self._llt = llguidance.torch
        self.tok = llguidance.hf.from_tokenizer(hf_tok, n_vocab=vocab_size)
        self.executor = llguidance.LLExecutor(num_threads=os.cpu_count())

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self._ll.LLMatcher.grammar_from_json_schema(schema)
        # llguidance has no compiled-grammar object: LLMatcher() builds the
        # grammar (~0.3 ms here), so keep a prototype matcher and deep_copy()
        # it per request (~10 us).
        proto = self._ll.LLMatcher(self.tok, grammar, log_level=0)
        if proto.is_error():
            raise ValueError(proto.get_error())
        return proto

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        self._llt.fill_next_token_bitmask(m, bitmask, row)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token))

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None:
        self._llt.fill_next_token_bitmask_par(self.executor, list(zip(ms, rows, strict=True)), bitmask)


class XGrammarAdapter:
    """xgrammar: TokenizerInfo + GrammarCompiler + GrammarMatcher."""

    name = "xgrammar"
    dist = "xgrammar"
    batched_api = "BatchGrammarMatcher.batch_fill_next_token_bitmask"

    def setup(self, hf_tok: Any, vocab_size: int) -> None:
        import xgrammar

        self._xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(hf_tok, vocab_size=vocab_size)
        threads = os.cpu_count() or 1
        # Cache off so a repeated run measures real compiles.
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema))

    def matcher(self, compiled: Any) -> Any:
        return self._xgr.GrammarMatcher(compiled)

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(bitmask, row)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None:
        self.batch.batch_fill_next_token_bitmask(ms, bitmask, rows)


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode (byte-level BPE token spelling)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class OutlinesCoreAdapter:
    """outlines-core: schema -> regex -> Index (DFA over the vocabulary) -> Guide."""

    name = "outlines-core"
    dist = "outlines_core"
    batched_api = ""

    def setup(self, hf_tok: Any, vocab_size: int) -> None:
        import outlines_core

        self._oc = outlines_core
        decoder = _byte_decoder()
        special = set(hf_tok.all_special_ids)
        vocab: dict[bytes, list[int]] = {}
        for token, tid in hf_tok.get_vocab().items():
            if tid in special or tid >= vocab_size:
                continue
            raw = bytes(decoder[ch] for ch in token)
            vocab.setdefault(raw, []).append(tid)
        self.eos = hf_tok.eos_token_id
        self.vocab = outlines_core.Vocabulary(self.eos, vocab)

    def compile(self, schema: dict[str, Any]) -> Any:
        regex = self._oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self._oc.Index(regex, self.vocab)

    def matcher(self, compiled: Any) -> Any:
        return self._oc.Guide(compiled)

    def fill(self, m: Any, bitmask: torch.Tensor, row: int) -> None:
        m.write_mask_into(bitmask[row].data_ptr(), bitmask.shape[1], 4)

    def advance(self, m: Any, token: int) -> bool:
        # The mask allows EOS in a final state, but Guide.advance(EOS) raises
        # ("No next state found"): the caller is expected to stop on EOS.
        if token == self.eos and m.is_finished():
            return True
        m.advance(token, return_tokens=False)
        return True

    def fill_batch(self, ms: list[Any], bitmask: torch.Tensor, rows: list[int]) -> None:
        raise NotImplementedError


ADAPTERS: list[type] = [LLGuidanceAdapter, XGrammarAdapter, OutlinesCoreAdapter]

# --------------------------------------------------------------------------
# Measurement.
# --------------------------------------------------------------------------


@dataclass
class ApplyTiming:
    """Cost of masking [ROWS, vocab] float32 logits with an int32 bitmask."""

    median_ms: float
    first_call_ms: float  # includes torch.compile for the compiled helpers
    correct: bool


@dataclass
class Result:
    """Everything measured for one library."""

    name: str
    version: str = "-"
    installed: bool = False
    error: str = ""
    setup_s: float = float("nan")
    compile_ms: dict[str, float] = field(default_factory=dict)
    compile_errors: dict[str, str] = field(default_factory=dict)
    mask_us: list[float] = field(default_factory=list)
    first_mask_us: list[float] = field(default_factory=list)
    matcher_us: list[float] = field(default_factory=list)
    advance_us: list[float] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    batch_step_ms: list[float] = field(default_factory=list)
    batched_api: str = ""
    masks: int = 0
    target_allowed: int = 0
    apply: ApplyTiming | None = None
    rows: int = 0


def is_allowed(mask_row: np.ndarray, token: int) -> bool:
    """Test one token's bit in an int32 bitmask row."""
    return bool((int(mask_row[token >> 5]) >> (token & 31)) & 1)


def first_allowed(mask_row: np.ndarray, vocab_size: int) -> int:
    """Lowest allowed token id, or -1 if the mask is empty."""
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab_size]
    hits = np.flatnonzero(bits)
    return int(hits[0]) if hits.size else -1


def target_tokens(hf_tok: Any, instance: Any) -> list[int]:
    """Token ids of the compact JSON text of `instance`, followed by EOS."""
    text = json.dumps(instance, separators=(",", ":"))
    return [*hf_tok.encode(text, add_special_tokens=False), hf_tok.eos_token_id]


def decode_sequential(
    lib: Adapter,
    compiled: list[Any],
    targets: list[list[int]],
    vocab_size: int,
    res: Result,
) -> None:
    """One mask per active row per step, rows one after another; times each."""
    matchers = []
    for c in compiled:
        t0 = time.perf_counter()
        matchers.append(lib.matcher(c))
        res.matcher_us.append((time.perf_counter() - t0) * 1e6)
    bitmask = torch.zeros((len(matchers), (vocab_size + 31) // 32), dtype=torch.int32)
    view = bitmask.numpy()
    pos = [0] * len(matchers)
    while True:
        active = [i for i, t in enumerate(targets) if pos[i] < len(t)]
        if not active:
            return
        step = 0.0
        for i in active:
            t0 = time.perf_counter()
            lib.fill(matchers[i], bitmask, i)
            dt = time.perf_counter() - t0
            step += dt
            res.mask_us.append(dt * 1e6)
            if pos[i] == 0:
                res.first_mask_us.append(dt * 1e6)
            token = targets[i][pos[i]]
            res.masks += 1
            if is_allowed(view[i], token):
                res.target_allowed += 1
            else:
                token = first_allowed(view[i], vocab_size)
                targets[i] = [*targets[i][: pos[i]], token]  # off-script: stop here
            t0 = time.perf_counter()
            ok = lib.advance(matchers[i], token)
            res.advance_us.append((time.perf_counter() - t0) * 1e6)
            if not ok:
                targets[i] = targets[i][: pos[i] + 1]
            pos[i] += 1
        if len(active) == len(matchers):
            res.step_ms.append(step * 1e3)


def decode_batched(
    lib: Adapter,
    compiled: list[Any],
    targets: list[list[int]],
    vocab_size: int,
    res: Result,
) -> None:
    """Same decode, but one batched mask fill per step for all active rows."""
    matchers = [lib.matcher(c) for c in compiled]
    bitmask = torch.zeros((len(matchers), (vocab_size + 31) // 32), dtype=torch.int32)
    pos = [0] * len(matchers)
    while True:
        active = [i for i, t in enumerate(targets) if pos[i] < len(t)]
        if not active:
            return
        t0 = time.perf_counter()
        lib.fill_batch([matchers[i] for i in active], bitmask, active)
        dt = time.perf_counter() - t0
        if len(active) == len(matchers):
            res.batch_step_ms.append(dt * 1e3)
        for i in active:
            lib.advance(matchers[i], targets[i][pos[i]])
            pos[i] += 1


def apply_fn(lib: Adapter | None) -> Any:
    """The library's own apply-bitmask helper, or None for the plain torch one.

    xgrammar: C++ CPU kernel; llguidance and outlines-core: torch.compile'd
    (inductor) kernels, compiled on first call.
    """
    if isinstance(lib, XGrammarAdapter):
        import xgrammar

        return lambda logits, bm: xgrammar.apply_token_bitmask_inplace(logits, bm, backend="cpu")
    if isinstance(lib, LLGuidanceAdapter):
        import llguidance.torch

        return llguidance.torch.apply_token_bitmask_inplace
    if isinstance(lib, OutlinesCoreAdapter):
        import outlines_core.kernels.torch

        return outlines_core.kernels.torch.apply_token_bitmask_inplace
    return None


def apply_plain(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Unpack the bitmask to bool with shifts, then masked_fill_ (no compile)."""
    rows, vocab = logits.shape
    shifts = torch.arange(32, dtype=torch.int32)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().view(rows, -1)[:, :vocab]
    logits.masked_fill_(~bits, float("-inf"))


def time_apply_mask(lib: Adapter | None, vocab_size: int, reps: int = 50) -> ApplyTiming:
    """Time one apply of a random [ROWS, vocab] bitmask to fresh logits."""
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(
        -(2**31), 2**31 - 1, (ROWS, (vocab_size + 31) // 32), dtype=torch.int32, generator=gen
    )
    base = torch.randn((ROWS, vocab_size), generator=gen)
    expected = base.clone()
    apply_plain(expected, bitmask)
    fn = apply_fn(lib) or apply_plain

    logits = base.clone()
    t0 = time.perf_counter()
    fn(logits, bitmask)
    first = (time.perf_counter() - t0) * 1e3
    correct = torch.equal(torch.isinf(logits), torch.isinf(expected))
    times = []
    for _ in range(reps):
        logits.copy_(base)
        t0 = time.perf_counter()
        fn(logits, bitmask)
        times.append((time.perf_counter() - t0) * 1e3)
    return ApplyTiming(statistics.median(times), first, correct)


def bench_library(cls: type, hf_tok: Any, vocab_size: int, batched: bool, repeat: int) -> Result:
    """Install check, setup, compile all schemas, then decode all rows `repeat` times."""
    lib: Adapter = cls()
    res = Result(name=lib.name, batched_api=lib.batched_api)
    try:
        res.version = importlib.metadata.version(lib.dist)
        t0 = time.perf_counter()
        lib.setup(hf_tok, vocab_size)
        res.setup_s = time.perf_counter() - t0
        res.installed = True
    except Exception as exc:  # any import/setup failure is a result
        res.error = f"{type(exc).__name__}: {exc}"
        return res

    compiled: list[Any] = []
    targets: list[list[int]] = []
    for name, schema, instance in CASES:
        t0 = time.perf_counter()
        try:
            c = lib.compile(schema)
        except Exception as exc:
            res.compile_errors[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
            continue
        res.compile_ms[name] = (time.perf_counter() - t0) * 1e3
        compiled.append(c)
        targets.append(target_tokens(hf_tok, instance))
    res.rows = len(compiled)

    for _ in range(repeat):  # fresh matchers each time
        decode_sequential(lib, compiled, [list(t) for t in targets], vocab_size, res)
        if batched and lib.batched_api:
            decode_batched(lib, compiled, [list(t) for t in targets], vocab_size, res)
    res.apply = time_apply_mask(lib, vocab_size)
    return res


# --------------------------------------------------------------------------
# Reporting.
# --------------------------------------------------------------------------


def pct(xs: list[float], q: float) -> float:
    """q-quantile (0..1) by nearest rank; NaN for an empty list."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


def print_details(res: Result) -> None:
    """Per-library detail lines (compile per schema, errors, advance cost)."""
    print(f"\n## {res.name} {res.version}")
    if not res.installed:
        print(f"not usable: {res.error}")
        return
    print(f"tokenizer setup: {res.setup_s:.2f} s; rows decoded: {res.rows}/{len(CASES)}")
    print("compile ms: " + ", ".join(f"{k}={v:.1f}" for k, v in res.compile_ms.items()))
    for k, v in res.compile_errors.items():
        print(f"compile FAILED {k}: {v}")
    print(
        f"mask us/token: median {pct(res.mask_us, 0.5):.1f}, p90 {pct(res.mask_us, 0.9):.1f}, "
        f"max {max(res.mask_us, default=float('nan')):.1f} (n={len(res.mask_us)})"
    )
    print(
        f"new matcher from compiled grammar us: median {pct(res.matcher_us, 0.5):.1f}, "
        f"max {max(res.matcher_us, default=float('nan')):.1f}"
    )
    print(
        f"first mask of a fresh matcher us: median {pct(res.first_mask_us, 0.5):.1f}, "
        f"max {max(res.first_mask_us, default=float('nan')):.1f}"
    )
    print(f"advance us/token: median {pct(res.advance_us, 0.5):.1f}, p90 {pct(res.advance_us, 0.9):.1f}")
    print(
        f"16-row step ms (sequential, {len(res.step_ms)} full steps): "
        f"median {pct(res.step_ms, 0.5):.3f}, p90 {pct(res.step_ms, 0.9):.3f}"
    )
    if res.batch_step_ms:
        print(
            f"16-row step ms ({res.batched_api}, {os.cpu_count()} threads): "
            f"median {pct(res.batch_step_ms, 0.5):.3f}, p90 {pct(res.batch_step_ms, 0.9):.3f}"
        )
    print(
        f"all masks of the whole decode: {sum(res.mask_us) / 1e3:.2f} ms "
        f"({len(res.mask_us)} masks), all advances: {sum(res.advance_us) / 1e3:.2f} ms"
    )
    print(f"target token allowed: {res.target_allowed}/{res.masks}")


def fmt_apply(a: ApplyTiming | None) -> str:
    """'median ms (first call ms)' plus a flag if the result was wrong."""
    if a is None:
        return "-"
    ok = "" if a.correct else " WRONG"
    return f"{a.median_ms:.2f} (1st {a.first_call_ms:.0f}){ok}"


def print_table(results: list[Result]) -> None:
    """The Markdown summary table."""
    head = (
        "| library | version | install ok | tokenizer setup s | schema compile ms (median) "
        "| mask us/token median | mask us/token p90 | advance us/token median "
        "| 16-row step ms seq (median) | 16-row step ms batched (median) "
        "| target allowed | own apply-mask ms [16x49152] (1st call ms) |"
    )
    print("\n" + head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for r in results:
        if not r.installed:
            print(f"| {r.name} | {r.version} | no | - | - | - | - | - | - | - | - | - |")
            continue
        compile_med = statistics.median(r.compile_ms.values()) if r.compile_ms else float("nan")
        batch = f"{pct(r.batch_step_ms, 0.5):.3f}" if r.batch_step_ms else "n/a"
        print(
            f"| {r.name} | {r.version} | yes ({r.rows}/{len(CASES)} schemas) "
            f"| {r.setup_s:.2f} | {compile_med:.1f} "
            f"| {pct(r.mask_us, 0.5):.1f} | {pct(r.mask_us, 0.9):.1f} "
            f"| {pct(r.advance_us, 0.5):.1f} "
            f"| {pct(r.step_ms, 0.5):.3f} | {batch} "
            f"| {100 * r.target_allowed / max(r.masks, 1):.1f}% | {fmt_apply(r.apply)} |"
        )


def load_tokenizer(folder: str | None) -> Any:
    """The server default model's Hugging Face tokenizer."""
    from transformers import AutoTokenizer

    if folder is None:
        found = sorted(p for p in glob.glob(MODEL_GLOB) if os.path.isdir(p))
        if not found:
            raise SystemExit(f"no tokenizer folder matches {MODEL_GLOB}")
        folder = found[0]
    return AutoTokenizer.from_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", help="tokenizer folder (default: cached SmolLM2)")
    parser.add_argument("--only", nargs="*", help="library names to run")
    parser.add_argument("--no-batched", action="store_true", help="skip batched fill APIs")
    parser.add_argument("--repeat", type=int, default=5, help="decodes per library")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for apply-mask (default 1: on 2 busy cores more is slower)",
    )
    args = parser.parse_args()

    torch.set_num_threads(args.torch_threads)
    hf_tok = load_tokenizer(args.tokenizer)
    vocab_size = len(hf_tok)
    print(
        f"tokenizer vocab {vocab_size}, rows {len(CASES)}, cpus {os.cpu_count()}, "
        f"torch threads {torch.get_num_threads()}, repeat {args.repeat}, "
        f"load avg {os.getloadavg()}"
    )
    results = []
    for cls in ADAPTERS:
        if args.only and cls.name not in args.only:
            continue
        res = bench_library(cls, hf_tok, vocab_size, batched=not args.no_batched, repeat=args.repeat)
        print_details(res)
        results.append(res)
    plain = time_apply_mask(None, vocab_size)
    print(f"\napply-mask, plain torch unpack + masked_fill_: {fmt_apply(plain)}")
    print_table(results)


if __name__ == "__main__":
    main()
