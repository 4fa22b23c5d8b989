"""Issue #16's device check: one run on a machine with one NVIDIA GPU measures the engine and the HTTP
server against Hugging Face transformers on the same GPU, the decode step against the GPU's memory
floor, exactness of mixed-task batches, and recompiles after start-up; it writes OUT/gpu_check.json,
OUT/gpu_check.md (a table of each figure against its goal) and OUT/gpu_check.parts.log (every part's
output and its server's log). Exit code 0 when every part ran through, 3 when one failed, ran out of
time or was skipped (the report is written either way).

    bash loadtest/gpu_check.sh OUT                          # on the GPU machine: carried wheels, then this
    python -m loadtest.gpu_check --out OUT                  # the driver alone (cuda, both model shapes)
    python -m loadtest.gpu_check --out OUT --device cpu --tiny   # the whole pipeline on a CPU in ~1 min

Models are made on the machine from a LlamaConfig with random weights (a SmolLM2-135M and a Llama-3.2-1B
shape, bfloat16; throughput does not depend on the values), saved with a word-level tokenizer made in
code: nothing is downloaded. The workload: 128-token prompts, 128 new tokens, `ignore_eos`, greedy, at 1,
16, 64 and 256 requests in flight, every request in flight a different task (a random 16-token prefix;
each of the N clients keeps one task), 2 waves per level; and 256 in flight on one task.

Each part runs in a child process with its own time budget (the driver's `--budget-s` shared out, each
later part keeping a minimum); a part that fails or runs out of time is recorded with its error and the
others still run; a part that cannot get its minimum is "skipped: time budget". Parts write what they have
measured as they go, so a part stopped at its limit keeps its finished figures. The JSON and the
Markdown are rewritten after every part.

Parts, in order: prepare (both model folders, the GPU's copy bandwidth), then for the 1B shape and then
the 135M shape: engine (compile, exactness, decode step per batch size, tokens/s per level, one-task
level, joins/leaves/hot swap with compile and CUDA-graph counters), transformers (its continuous
batching, `generate_batch`, or batched `generate`, whichever this transformers has), http (a real
`prefix-server serve` process; prefixes uploaded through the API; httpx clients).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import zlib
from collections import deque
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Prompt tokens per prefill forward on the GPU: the server's default (512) is sized for a 2-core CPU; a GPU
# takes 256 joiners' 128-token prompts (32,768 tokens) in 4 chunks at this budget, not 64.
PREFILL_CHUNK_TOKENS = 8192
GIB = 1 << 30

# Architectures as published (config.json of HuggingFaceTB/SmolLM2-135M and meta-llama/Llama-3.2-1B);
# Llama-3.2's rope scaling is left out (the step's cost does not depend on it) and contexts are capped at
# 4096 (the workload's rows are 272 tokens).
SHAPES = {
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        vocab_size=49152,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
}
TINY_SHAPES = {
    "tiny-1b": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        vocab_size=1024,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    ),
    "tiny-135m": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    ),
}
GOAL_MODEL = {"full": "llama-3.2-1b", "tiny": "tiny-1b"}  # the goals are stated for the 1B shape
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
EMBED_SCALE = 4.0  # random init's logits are nearly flat (near-ties everywhere); this peaks them a little


@dataclass(frozen=True)
class Workload:
    levels: tuple[int, ...] = (1, 16, 64, 256)
    prompt_len: int = 128
    new_tokens: int = 128
    prefix_len: int = 16
    waves: int = 2  # requests per client at each level
    exact_rows: int = 8
    exact_new_tokens: int = 16
    step_warm: int = 3
    step_timed: int = 10
    kv_cache_bytes: int = 4 * GIB

    @property
    def max_level(self) -> int:
        return max(self.levels)


FULL = Workload()
TINY = Workload(
    levels=(1, 4),
    prompt_len=8,
    new_tokens=8,
    exact_rows=4,
    exact_new_tokens=8,
    step_warm=1,
    step_timed=3,
    kv_cache_bytes=64 << 20,
)

# (part, cap seconds, minimum seconds) per model, in order; prepare comes first. Caps are for the default
# budget and scale with --budget-s; a part gets min(cap, what is left less the later parts' minimums).
PREPARE = ("prepare", 45, 15)
PER_MODEL = [("engine", 130, 30), ("transformers", 60, 20), ("http", 90, 25)]
DEFAULT_BUDGET_S = 420.0
PARTS_NOT_OK = 3  # exit code: the report is written, but a part failed, ran out of time or was skipped
MIN_PART_S = 5.0  # no part starts with less (a child process's imports alone take seconds)


def log(message: str, t0: float | None = None) -> None:
    at = f"[{time.monotonic() - t0:6.1f} s] " if t0 is not None else ""
    print(f"gpu_check: {at}{message}", flush=True)


def write_json(path: Path, data) -> None:
    """Atomically: a reader (the driver, after a kill) sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


class OutOfTime(Exception):
    """A part's own deadline is near: what is left of it is skipped."""


# --------------------------------------------------------------------------------------------------
# the parts' shared context


@dataclass
class Ctx:
    workdir: Path
    device: str
    dtype: str
    tiny: bool
    compile: str  # on | off
    deadline: float  # time.time() by which the part must have written its results
    workload: Workload
    result_path: Path
    data: dict
    models: tuple[str, ...] = ()  # prepare: only these (default: every shape)

    def save(self) -> None:
        write_json(self.result_path, self.data)

    def left(self) -> float:
        return self.deadline - time.time()

    def need(self, seconds: float, what: str) -> None:
        if self.left() < seconds:
            raise OutOfTime(f"skipped: time budget ({what} needs ~{seconds:.0f} s, {self.left():.0f} s left)")

    def step(self, name: str, fn, *, need_s: float = 2.0):
        """Run one measurement; its result (or error, or skip) goes under data[name] and is saved."""
        started = time.monotonic()
        try:
            self.need(need_s, name)
            value = fn()
            self.data[name] = value
        except OutOfTime as e:
            self.data[name] = {"status": "skipped", "error": str(e)}
        except Exception as e:
            self.data[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            self.data.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
        self.data.setdefault("seconds", {})[name] = round(time.monotonic() - started, 2)
        self.save()
        print(
            f"gpu_check:   {name}: {_brief(self.data[name])} ({time.monotonic() - started:.1f} s)", flush=True
        )
        return self.data[name]

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def model_dir(self, name: str) -> Path:
        return self.workdir / "models" / name


def _brief(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) < 160 else text[:157] + "..."


def torch_dtype(name: str):
    import torch

    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[name]


def shapes_for(tiny: bool) -> dict:
    return TINY_SHAPES if tiny else SHAPES


# --------------------------------------------------------------------------------------------------
# prepare: model folders and the GPU's memory bandwidth


def make_tokenizer(vocab_size: int):
    """A word-level tokenizer over the model's whole vocabulary: "w17" is token 17, words split on
    whitespace, no special tokens added, so a prompt of N words is exactly N tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, "<eos>": EOS_ID, "<unk>": UNK_ID} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def build_model_folder(ctx: Ctx, name: str, shape: dict, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = ctx.model_dir(name)
    config = LlamaConfig(
        **shape, pad_token_id=PAD_ID, eos_token_id=EOS_ID, bos_token_id=None, attn_implementation="sdpa"
    )
    torch.manual_seed(seed)
    started = time.monotonic()
    with torch.device(ctx.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(ctx.dtype))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(EMBED_SCALE)  # tied: the lm_head too
    ctx.sync()
    init_s = time.monotonic() - started
    params = {id(p): p for p in model.parameters()}.values()
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    model.save_pretrained(folder)
    make_tokenizer(shape["vocab_size"]).save_pretrained(folder)
    del model
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "folder": str(folder),
        "shape": shape,
        "dtype": ctx.dtype,
        "parameters": sum(p.numel() for p in params),
        "weight_bytes": weight_bytes,
        "init_s": round(init_s, 1),
        "saved_s": round(time.monotonic() - started - init_s, 1),
    }


def copy_bandwidth(ctx: Ctx) -> dict:
    """A device-to-device copy of a large buffer: (bytes read + bytes written) / time, best of 3 runs of 10."""
    import torch

    n = (64 << 20) if ctx.tiny else GIB
    src = torch.empty(n, dtype=torch.uint8, device=ctx.device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ctx.sync()
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        ctx.sync()
        best = min(best, (time.perf_counter() - started) / 10)
    return {
        "buffer_bytes": n,
        "seconds_per_copy": best,
        "bytes_per_s": 2 * n / best,
        "gb_per_s": round(2 * n / best / 1e9, 1),
    }


def part_prepare(ctx: Ctx) -> None:
    import torch

    ctx.data["environment"] = environment(ctx.device)
    for seed, (name, shape) in enumerate(shapes_for(ctx.tiny).items()):
        if not ctx.models or name in ctx.models:
            ctx.step(f"model:{name}", lambda n=name, s=shape, i=seed: build_model_folder(ctx, n, s, i))
    ctx.step("bandwidth", lambda: copy_bandwidth(ctx))
    if ctx.device.startswith("cuda"):
        torch.cuda.empty_cache()


def environment(device: str) -> dict:
    import torch
    import transformers

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers_from": str(Path(transformers.__file__).parent.parent),
        "device": device,
        "host": platform.node(),
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / GIB, 1),
            "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda,
        }
    return env


# --------------------------------------------------------------------------------------------------
# engine-level


_CAPTURES = [0]


def count_cuda_graph_captures() -> None:
    """Count every CUDA graph capture in this process (torch.cuda.graph and inductor's cudagraph trees
    both go through CUDAGraph.capture_begin)."""
    import torch

    if not torch.cuda.is_available():
        return
    cls = torch.cuda.CUDAGraph
    original = cls.capture_begin

    def capture_begin(self, *args, **kwargs):
        _CAPTURES[0] += 1
        return original(self, *args, **kwargs)

    cls.capture_begin = capture_begin


ENGINE_COUNTER_NAMES = (
    "num_captures",
    "captures",
    "graph_captures",
    "capture_count",
    "num_compiles",
    "compiles",
    "recompiles",
    "num_recompiles",
)


def compile_counters(engine) -> dict:
    """What counts graphs compiled or captured: dynamo's unique graphs, AOT autograd's graphs, CUDA graph
    captures, and any counter the engine or its decoder exposes under a usual name."""
    from torch._dynamo.utils import counters

    out = {
        "dynamo_unique_graphs": int(counters["stats"]["unique_graphs"]),
        "aot_autograd_graphs": int(counters["aot_autograd"]["total"]),
        "cuda_graph_captures": _CAPTURES[0],
    }
    for obj in (engine, getattr(engine, "decoder", None)):
        if obj is None:
            continue
        for name in ENGINE_COUNTER_NAMES:
            value = getattr(obj, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                out[f"{type(obj).__name__}.{name}"] = value
    return out


class Fixture:
    """An engine on one model folder, with random prefixes and prompts."""

    def __init__(self, ctx: Ctx, name: str, quantize: str = "off"):
        from server.engine.engine import Engine
        from server.engine.model import load_model

        self.ctx, self.name = ctx, name
        w = ctx.workload
        started = time.monotonic()
        self.loaded = load_model(
            str(ctx.model_dir(name)),
            dtype=ctx.dtype,
            device=ctx.device,
            cache_dir=ctx.workdir / "model-cache",
            **({"quantize": quantize} if quantize != "off" else {}),  # loadtest/gpu_int8.py's int8 engine
        )
        self.engine = Engine(
            self.loaded.model,
            self.loaded.tokenizer,
            max_rows=w.max_level,
            kv_cache_bytes=w.kv_cache_bytes,
            prefill_chunk_tokens=PREFILL_CHUNK_TOKENS,
        )
        self.load_s = time.monotonic() - started
        self.vocab = self.loaded.model.get_input_embeddings().num_embeddings
        self.rng = random.Random(1234)
        self._prefixes: dict[tuple[str, int], object] = {}

    def __repr__(self) -> str:
        return f"engine on {self.name}, loaded in {self.load_s:.1f} s"

    def prefix(self, task: str, version: int = 1):
        """A random prefix of `prefix_len` virtual tokens for (task, version), made once."""
        import torch

        from server.registry.format import PrefixKV

        key = (task, version)
        if key not in self._prefixes:
            fp = self.engine.fingerprint
            shape = (fp.num_layers, fp.kv_heads, self.ctx.workload.prefix_len, fp.head_dim)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{task}/{version}".encode()))
            keys, values = (torch.randn(shape, generator=gen) for _ in range(2))
            self._prefixes[key] = PrefixKV(
                keys.to(self.engine.device, self.engine.dtype),
                values.to(self.engine.device, self.engine.dtype),
                fp,
            )
        return self._prefixes[key]

    def prompt(self, length: int | None = None) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(length or self.ctx.workload.prompt_len)]

    def request(self, task: str | None, new_tokens: int, *, version: int = 1, logprobs=None, prompt=None):
        from server.request import Request, SamplingParams

        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=logprobs)
        prefix = self.prefix(task, version) if task is not None else None
        key = (task, version, f"{task}-v{version}") if task is not None else None
        return Request(prompt or self.prompt(), params, task_id=task, prefix=prefix, prefix_key=key)


def run_in_flight(engine, requests, in_flight: int, deadline: float | None = None) -> None:
    """Run `requests` keeping at most `in_flight` running, admitting in order as rows free up, as the
    scheduler does (each iteration: admit what fits, then one decode step)."""
    pending = deque(requests)
    while pending or engine.running:
        free = in_flight - len(engine.running)
        if free > 0 and pending:
            head = [pending[i] for i in range(min(free, len(pending)))]
            take = engine.num_admissible(head)
            if take == 0 and not engine.running:
                engine.validate(head[0])
                raise RuntimeError("a request fits no empty engine")
            engine.admit(head[:take])
            for _ in range(take):
                pending.popleft()
        engine.step()
        if deadline is not None and time.time() > deadline:
            engine.abort(list(engine.running))
            raise OutOfTime("skipped: time budget (stopped mid-level)")


def tokens_per_s(fx: Fixture, n: int, one_task: bool) -> dict:
    ctx, w = fx.ctx, fx.ctx.workload
    reqs = [
        fx.request("t0" if one_task else f"t{i % n}", w.new_tokens)
        for wave in range(w.waves)
        for i in range(n)
    ]
    ctx.sync()
    started = time.perf_counter()
    run_in_flight(fx.engine, reqs, n, deadline=ctx.deadline - 3)
    ctx.sync()
    seconds = time.perf_counter() - started
    tokens = sum(len(r.output_token_ids) for r in reqs)
    short = sum(len(r.output_token_ids) != w.new_tokens for r in reqs)
    return {
        "in_flight": n,
        "requests": len(reqs),
        "tasks": 1 if one_task else n,
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "short_replies": short,
        "compiled": _compiled(fx.engine),
    }


def _compiled(engine) -> bool:
    decoder = getattr(engine, "decoder", None)
    return bool(decoder is not None and getattr(decoder, "ready", True))


def step_time(fx: Fixture, rows: int, floor_ms: float | None) -> dict:
    """ms per `Engine.step` with `rows` running rows, each of its own task (prompt_len tokens in, a few
    out): median of `step_timed` steps after `step_warm`, each bracketed by synchronize."""
    ctx, w, engine = fx.ctx, fx.ctx.workload, fx.engine
    # A chunked prefill (Engine.prefill_chunk_tokens) takes several steps to get every row decoding; the
    # first rows in decode meanwhile, so they need tokens to spare.
    chunk = getattr(engine, "prefill_chunk_tokens", 0) or rows * w.prompt_len
    prefill_steps = -(-rows * w.prompt_len // chunk) + 1
    reqs = [fx.request(f"t{i}", prefill_steps + w.step_warm + w.step_timed + 4) for i in range(rows)]
    pending = list(reqs)
    while pending:
        take = engine.num_admissible(pending)
        if take == 0:
            raise RuntimeError(f"{rows} rows do not fit the engine ({engine.kv_stats()})")
        engine.admit(pending[:take])
        pending = pending[take:]
    for _ in range(prefill_steps + 2):  # until every row decodes: a step is then one decode forward
        if not getattr(engine, "prefilling", None):
            break
        engine.step()
    if getattr(engine, "prefilling", None):
        raise RuntimeError(f"rows still prefilling after {prefill_steps + 2} steps")
    if len(engine.running) != rows:
        raise RuntimeError(f"{len(engine.running)} rows running, expected {rows}")
    for _ in range(w.step_warm):
        engine.step()
    times = []
    try:
        for _ in range(w.step_timed):
            ctx.sync()
            started = time.perf_counter()
            engine.step()
            ctx.sync()
            times.append((time.perf_counter() - started) * 1000)
    finally:
        engine.abort(list(engine.running))
    ms = statistics.median(times)
    out = {
        "rows": rows,
        "step_ms": round(ms, 3),
        "step_ms_min": round(min(times), 3),
        "compiled": _compiled(engine),
    }
    if floor_ms:
        out |= {"floor_ms": round(floor_ms, 4), "ratio_to_floor": round(ms / floor_ms, 2)}
    return out


def exactness(fx: Fixture) -> dict:
    """`exact_rows` requests of as many different tasks in one batch vs each alone: greedy tokens equal?
    Where they part, the top-2 logprob margin at that step in each run (a near-tie in bfloat16 is not
    a wrong row)."""
    w, engine = fx.ctx.workload, fx.engine
    prompts = [fx.prompt() for _ in range(w.exact_rows)]
    tasks = [f"exact{i}" for i in range(w.exact_rows)]

    def make():
        return [
            fx.request(t, w.exact_new_tokens, logprobs=2, prompt=p)
            for t, p in zip(tasks, prompts, strict=True)
        ]

    batch = make()
    run_in_flight(engine, batch, len(batch))
    alone = make()
    for r in alone:
        run_in_flight(engine, [r], 1)
    rows = []
    for i, (b, a) in enumerate(zip(batch, alone, strict=True)):
        if b.output_token_ids == a.output_token_ids:
            continue
        at = next(
            j for j, (x, y) in enumerate(zip(b.output_token_ids, a.output_token_ids, strict=False)) if x != y
        )
        rows.append(
            {
                "row": i,
                "first_difference_at": at,
                "margin_batch": _margin(b, at),
                "margin_alone": _margin(a, at),
            }
        )
    return {
        "rows": w.exact_rows,
        "new_tokens": w.exact_new_tokens,
        "equal": w.exact_rows - len(rows),
        "all_equal": not rows,
        "differences": rows,
        "compiled": _compiled(engine),
        "dtype": str(engine.dtype).removeprefix("torch."),
    }


def _margin(request, at: int) -> float | None:
    try:
        top = request.output_logprobs[at].top
        return round(top[0][1] - top[1][1], 5)
    except (IndexError, AttributeError):
        return None


def churn(fx: Fixture) -> dict:
    """Joins a few per step, leaves (finished and aborted rows), 1 to 48 rows in flight, and a hot swap
    (task h0's version 2 arrives while its version 1 rows still run; later h0 requests use version 2):
    every row that was not aborted finishes with all its tokens."""
    engine = fx.engine
    rng = random.Random(7)
    max_new = 12 if fx.ctx.tiny else 40

    def make(task: str, version: int = 1):
        return fx.request(
            task, rng.randrange(2, max_new), version=version, prompt=fx.prompt(rng.randrange(4, 48))
        )

    pending = deque(make(f"h{rng.randrange(6)}") for _ in range(48))
    submitted, aborted, swapped = [], [], 0
    step = 0
    while pending or engine.running:
        joins = rng.randrange(0, 4)
        head = [pending[i] for i in range(min(joins, len(pending), engine.num_free_rows))]
        take = engine.num_admissible(head)
        engine.admit(head[:take])
        submitted += head[:take]
        for _ in range(take):
            pending.popleft()
        if step == 6 and len(engine.running) > 2:
            doomed = list(engine.running[:2])
            engine.abort(doomed)
            aborted += doomed
        if step == 8:  # hot swap: h0's version 2; its waiting requests and 4 new ones use it
            later = [make("h0", version=2) if r.task_id == "h0" else r for r in pending]
            swapped = sum(r.task_id == "h0" for r in later) + 4
            pending = deque([make("h0", version=2) for _ in range(4)] + later)
        engine.step()
        step += 1
        if step > 2000:
            raise RuntimeError("churn did not finish in 2000 steps")
    wrong = [
        r.request_id
        for r in submitted
        if r not in aborted and len(r.output_token_ids) != r.sampling.max_new_tokens
    ]
    return {
        "requests": len(submitted),
        "aborted": len(aborted),
        "hot_swapped_requests": swapped,
        "steps": step,
        "rows_with_wrong_length": wrong,
        "compiled": _compiled(engine),
    }


def _compile_in_thread(engine, budget_s: float, graphs: bool = False) -> dict:
    """engine.compile() on a thread, waited on for `budget_s`: a compile that takes longer goes on in the
    background (the engine switches to it when done) and the figures say whether each ran compiled.
    graphs: `engine.compile(graphs=True)` (the CUDA-graph step; on a CPU its code without capture)."""
    box: dict = {}
    kwargs = {"graphs": True} if graphs else {}
    if graphs and "graphs" not in inspect.signature(engine.compile).parameters:
        return {"ok": False, "finished": True, "error": "this engine's compile() takes no graphs= argument"}

    def run():
        started = time.monotonic()
        try:
            box["seconds"] = round(engine.compile(**kwargs), 1)
            box["ok"] = True
        except Exception as e:
            box["ok"] = False
            box["error"] = f"{type(e).__name__}: {e}"
            box["traceback"] = traceback.format_exc()[-3000:]
        box["wall_s"] = round(time.monotonic() - started, 1)

    thread = threading.Thread(target=run, name="gpu-check-compile", daemon=True)
    thread.start()
    thread.join(budget_s)
    if thread.is_alive():
        return {
            "ok": False,
            "error": f"not finished within {budget_s:.0f} s; measuring eager meanwhile",
            "finished": False,
        }
    box["finished"] = True
    decoder = getattr(engine, "decoder", None)
    if decoder is not None:
        box["buckets"] = list(getattr(decoder, "buckets", []) or [])
        box["decoder"] = type(decoder).__name__
        for attr in ("packed", "attention_kernel"):
            if hasattr(decoder, attr):
                box[attr] = getattr(decoder, attr)
    return box


def part_engine(ctx: Ctx, name: str, floor_ms: float | None) -> None:
    count_cuda_graph_captures()
    w = ctx.workload
    fx = ctx.step("load", lambda: Fixture(ctx, name), need_s=5)
    if not isinstance(fx, Fixture):
        return
    ctx.data["load"] = {
        "seconds": round(fx.load_s, 1),
        "kv": fx.engine.kv_stats(),
        "max_rows": fx.engine.max_rows,
        "prefill_chunk_tokens": getattr(fx.engine, "prefill_chunk_tokens", None),
    }
    ctx.save()
    counters = {"before_compile": compile_counters(fx.engine)}
    if ctx.compile in ("on", "graphs"):
        budget = max(10.0, min(0.6 * ctx.left(), ctx.left() - 30))
        ctx.step("compile", lambda: _compile_in_thread(fx.engine, budget, ctx.compile == "graphs"), need_s=10)
    else:
        ctx.data["compile"] = {"ok": False, "error": "skipped: --compile off"}

    def warm_up():
        run_in_flight(fx.engine, [fx.request(f"t{i}", 4) for i in range(w.max_level)], w.max_level)
        run_in_flight(fx.engine, [fx.request("t0", 4)], 1)
        return {"ok": True, "compiled": _compiled(fx.engine)}

    def clean(fn):
        """fn, then no row left running (a measurement that failed midway leaves the next one an empty engine)."""

        def run():
            try:
                return fn()
            finally:
                if fx.engine.running:
                    fx.engine.abort(list(fx.engine.running))

        return run

    ctx.step("warm_up", clean(warm_up), need_s=5)
    counters["after_warm_up"] = compile_counters(fx.engine)
    ctx.data["counters"] = counters
    ctx.step("exactness", clean(lambda: exactness(fx)), need_s=5)
    for rows in w.levels:
        ctx.step(f"step_time:{rows}", clean(lambda r=rows: step_time(fx, r, floor_ms)), need_s=3)
    for n in w.levels:
        ctx.step(f"tokens_per_s:{n}", clean(lambda n=n: tokens_per_s(fx, n, one_task=False)), need_s=4)
    ctx.step("one_task", clean(lambda: tokens_per_s(fx, w.max_level, one_task=True)), need_s=4)
    ctx.step("churn", clean(lambda: churn(fx)), need_s=4)
    counters["end"] = compile_counters(fx.engine)
    base = counters["after_warm_up"]
    counters["after_start_up"] = {k: v - base.get(k, 0) for k, v in counters["end"].items()}
    ctx.data["counters"] = counters
    ctx.data["compiled_at_end"] = _compiled(fx.engine)
    ctx.save()


# --------------------------------------------------------------------------------------------------
# transformers baseline


def hf_level_order(w: Workload) -> list[int]:
    """The goal's level (64) first: transformers is the slow side, and its budget may not cover them all."""
    first = [n for n in w.levels if n == 64] or [max(w.levels)]
    return first + [n for n in w.levels if n not in first]


def _kwargs_for(fn, **kwargs) -> dict:
    """Only the keyword arguments `fn` takes (transformers' continuous batching API moves between versions)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return kwargs
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _hf_cb_config(w: Workload, max_level: int, **extra):
    """Its config with room for `max_level` rows of the workload (twice over), as our engine's pool has;
    left to itself it sizes its cache from the device's free memory (on a CPU: 90% of the RAM, zeroed,
    which takes minutes)."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        try:
            from transformers.generation.configuration_utils import ContinuousBatchingConfig
        except ImportError:
            return None
    try:
        page = getattr(ContinuousBatchingConfig, "page_size", 256) or 256
        blocks = 2 * max_level * -(-(w.prompt_len + w.new_tokens) // page) + 16
        return ContinuousBatchingConfig(
            **_kwargs_for(
                ContinuousBatchingConfig, max_requests_per_batch=max_level, num_blocks=blocks, **extra
            )
        )
    except Exception:
        return None


def _hf_hints(w: Workload):
    try:
        from transformers.generation.continuous_batching.utils import WorkloadHints
    except ImportError:
        return None
    return WorkloadHints(
        max_prompt_length=w.prompt_len, max_generated_length=w.new_tokens, num_requests=w.max_level * w.waves
    )


def hf_manager_levels(ctx: Ctx, model, prompts_for, auto_flash: bool) -> dict:
    """Transformers' own continuous batching through its manager: one manager for every level (its
    warm-up, e.g. CUDA graph captures, outside the timing), N requests kept in flight per level."""
    from transformers import GenerationConfig

    w = ctx.workload
    gen = GenerationConfig(
        max_new_tokens=w.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID
    )
    extra = {} if auto_flash else {"auto_switch_to_flash": False}
    kwargs = _kwargs_for(
        model.continuous_batching_context_manager,
        generation_config=gen,
        continuous_batching_config=_hf_cb_config(w, w.max_level, **extra),
        block=True,
        timeout=10,
        workload_hints=_hf_hints(w),
        # its warm-up captures CUDA graphs; on a CPU it only costs time (17-35 s for a tiny model here)
        warmup=ctx.device.startswith("cuda"),
    )
    out: dict = {"mode": "continuous_batching_context_manager", "levels": {}}
    started = time.monotonic()
    with model.continuous_batching_context_manager(**kwargs) as manager:
        out["warm_up_s"] = round(time.monotonic() - started, 1)
        out["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
        try:
            _hf_manager_run(ctx, manager, prompts_for, out)
        except BaseException:
            # its stop would otherwise flush every request still queued before the context exits
            with contextlib.suppress(Exception):
                manager.stop(**_kwargs_for(manager.stop, block=True, timeout=5, hard_stop=True))
            raise
    return out


def _hf_manager_run(ctx: Ctx, manager, prompts_for, out: dict) -> None:
    w = ctx.workload
    for n in hf_level_order(w):
        ctx.need(4, f"transformers level {n}")
        prompts = prompts_for(n)
        ctx.sync()
        t0 = time.perf_counter()
        submitted = done = tokens = 0
        for _ in range(min(n, len(prompts))):
            manager.add_request(
                prompts[submitted], request_id=f"L{n}-{submitted}", max_new_tokens=w.new_tokens
            )
            submitted += 1
        while done < len(prompts):
            result = manager.get_result(timeout=1)
            if time.time() > ctx.deadline - 3:
                raise OutOfTime(f"skipped: time budget (transformers level {n} unfinished)")
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped")
                continue
            if not result.is_finished():
                continue
            if getattr(result, "error", None):
                raise RuntimeError(f"transformers request failed: {result.error}")
            done += 1
            tokens += len(result.generated_tokens)
            if submitted < len(prompts):
                manager.add_request(
                    prompts[submitted], request_id=f"L{n}-{submitted}", max_new_tokens=w.new_tokens
                )
                submitted += 1
        ctx.sync()
        seconds = time.perf_counter() - t0
        out["levels"][str(n)] = {
            "in_flight": n,
            "requests": len(prompts),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
        }
        ctx.data["levels_so_far"] = out
        ctx.save()


def hf_generate_batch_levels(ctx: Ctx, model, prompts_for) -> dict:
    """`generate_batch` per level, every prompt of the level at once, at most N per batch (its warm-up is
    inside each call's time)."""
    from transformers import GenerationConfig

    w = ctx.workload
    out: dict = {"mode": "generate_batch (warm-up inside the timing)", "levels": {}}
    for n in hf_level_order(w):
        ctx.need(4, f"transformers level {n}")
        prompts = prompts_for(n)
        gen = GenerationConfig(
            max_new_tokens=w.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=PAD_ID
        )
        kwargs = _kwargs_for(
            model.generate_batch,
            generation_config=gen,
            continuous_batching_config=_hf_cb_config(w, n),
            progress_bar=False,
        )
        ctx.sync()
        t0 = time.perf_counter()
        results = model.generate_batch(prompts, **kwargs)
        ctx.sync()
        seconds = time.perf_counter() - t0
        tokens = sum(len(r.generated_tokens) for r in results.values())
        out["levels"][str(n)] = {
            "in_flight": n,
            "requests": len(prompts),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
        }
    return out


def hf_generate_levels(ctx: Ctx, model, prompts_for) -> dict:
    """Batched `generate`, N prompts per batch (all the same length: no padding), one batch after another."""
    import torch

    w = ctx.workload
    out: dict = {"mode": "generate (static batches of N)", "levels": {}}
    for n in hf_level_order(w):
        ctx.need(4, f"transformers level {n}")
        prompts = prompts_for(n)
        ctx.sync()
        t0 = time.perf_counter()
        tokens = 0
        for start in range(0, len(prompts), n):
            ids = torch.tensor(prompts[start : start + n], device=model.device)
            with torch.inference_mode():
                gen = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=w.new_tokens,
                    min_new_tokens=w.new_tokens,
                    do_sample=False,
                    pad_token_id=PAD_ID,
                )
            tokens += (gen.shape[1] - ids.shape[1]) * ids.shape[0]
        ctx.sync()
        seconds = time.perf_counter() - t0
        out["levels"][str(n)] = {
            "in_flight": n,
            "requests": len(prompts),
            "tokens": tokens,
            "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
        }
    return out


def part_transformers(ctx: Ctx, name: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    w = ctx.workload
    started = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir(name)), dtype=torch_dtype(ctx.dtype))
    model = model.to(ctx.device).eval()
    model.requires_grad_(False)
    for cfg in (model.config, model.generation_config):  # ignore_eos: nothing ends a row early
        cfg.eos_token_id = None
    vocab = model.get_input_embeddings().num_embeddings
    ctx.data["load_s"] = round(time.monotonic() - started, 1)
    rng = random.Random(99)

    def prompts_for(n: int) -> list[list[int]]:
        return [[rng.randrange(3, vocab) for _ in range(w.prompt_len)] for _ in range(n * w.waves)]

    # warm up the plain forward (cuBLAS handles, allocator) once, outside every timing
    with torch.inference_mode():
        model(input_ids=torch.tensor(prompts_for(1)[:1], device=ctx.device))
    ctx.sync()
    attempts = []
    if hasattr(model, "continuous_batching_context_manager"):
        attempts += [
            ("continuous batching", lambda: hf_manager_levels(ctx, model, prompts_for, auto_flash=True)),
            (
                "continuous batching, SDPA",
                lambda: hf_manager_levels(ctx, model, prompts_for, auto_flash=False),
            ),
        ]
    if hasattr(model, "generate_batch"):
        attempts.append(("generate_batch", lambda: hf_generate_batch_levels(ctx, model, prompts_for)))
    attempts.append(("generate", lambda: hf_generate_levels(ctx, model, prompts_for)))
    errors = []
    for label, run in attempts:
        try:
            ctx.need(8, f"transformers ({label})")
            result = run()
        except OutOfTime as e:
            partial = ctx.data.pop("levels_so_far", None)
            if partial:
                result = partial | {"stopped": str(e)}
            else:
                errors.append({"mode": label, "error": str(e)})
                break
        except Exception as e:
            errors.append(
                {
                    "mode": label,
                    "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()[-2000:],
                }
            )
            ctx.data.pop("levels_so_far", None)
            ctx.data["errors"] = errors
            ctx.save()
            log(f"  transformers: {label} failed ({type(e).__name__}: {e}); trying the next way")
            continue
        ctx.data.pop("levels_so_far", None)
        ctx.data |= result
        break
    ctx.data["errors"] = errors
    ctx.save()


# --------------------------------------------------------------------------------------------------
# HTTP


def _native_prefix_bytes(fingerprint, prefix_len: int, seed: int) -> bytes:
    import torch

    from server.registry.format import PrefixKV, save_native

    shape = (fingerprint.num_layers, fingerprint.kv_heads, prefix_len, fingerprint.head_dim)
    gen = torch.Generator().manual_seed(seed)
    keys, values = (torch.randn(shape, generator=gen).to(torch.bfloat16) for _ in range(2))
    return save_native(PrefixKV(keys, values, fingerprint))


async def _upload(client, task: str, blob: bytes) -> dict:
    resp = await client.post(
        "/prefixes",
        data={"task_id": task},
        files={"file": (f"{task}.safetensors", blob, "application/octet-stream")},
    )
    if resp.status_code != 201:
        raise RuntimeError(f"upload of {task}: {resp.status_code} {resp.text[:300]}")
    return resp.json()


async def _http_level(client, ctx: Ctx, n: int, one_task: bool, vocab: int, during=None) -> dict:
    w = ctx.workload
    rng = random.Random(n * 7 + one_task)
    texts = [
        [" ".join(f"w{rng.randrange(3, vocab)}" for _ in range(w.prompt_len)) for _ in range(w.waves)]
        for _ in range(n)
    ]
    results = []

    async def client_loop(c: int) -> None:
        for text in texts[c]:
            body = {
                "task_id": "t0" if one_task else f"t{c}",
                "prompt": text,
                "max_new_tokens": w.new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            resp = await client.post("/generate", json=body)
            if resp.status_code != 200:
                results.append({"status": resp.status_code, "error": resp.text[:200]})
                continue
            usage = resp.json()["usage"]
            results.append(
                {"status": 200, "tokens": usage["completion_tokens"], "prompt_tokens": usage["prompt_tokens"]}
            )

    started = time.perf_counter()
    tasks = [asyncio.create_task(client_loop(c)) for c in range(n)]
    side = asyncio.create_task(during()) if during is not None else None
    timeout = max(1.0, ctx.deadline - time.time() - 5)
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    except asyncio.TimeoutError:
        raise OutOfTime(f"skipped: time budget (HTTP level {n} unfinished)") from None
    seconds = time.perf_counter() - started
    side_result = await side if side is not None else None
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    out = {
        "in_flight": n,
        "requests": len(results),
        "tasks": 1 if one_task else n,
        "errors": len(results) - len(ok),
        "error_examples": [r for r in results if r["status"] != 200][:3],
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 1),
        "prompt_tokens": sorted({r["prompt_tokens"] for r in ok}),
        "short_replies": sum(r["tokens"] != w.new_tokens for r in ok),
    }
    if side_result is not None:
        out["during"] = side_result
    return out


def _metric_lines(text: str) -> list[str]:
    words = ("compile", "capture", "graph")
    return [line for line in text.splitlines() if not line.startswith("#") and any(k in line for k in words)]


async def _http_measure(ctx: Ctx, base: str, fingerprint, vocab: int) -> None:
    from loadtest.loadgen import make_client

    w = ctx.workload
    async with make_client(base, timeout_s=max(30.0, ctx.left())) as client:
        metrics_before = _metric_lines((await client.get("/metrics")).text)
        started = time.monotonic()
        blobs = [_native_prefix_bytes(fingerprint, w.prefix_len, seed) for seed in range(w.max_level)]
        limit = asyncio.Semaphore(16)

        async def one(i: int):
            async with limit:
                return await _upload(client, f"t{i}", blobs[i])

        await asyncio.gather(*(one(i) for i in range(w.max_level)))
        ctx.data["upload"] = {
            "tasks": w.max_level,
            "seconds": round(time.monotonic() - started, 1),
            "bytes_each": len(blobs[0]),
        }
        ctx.save()
        # warm-up: every task's prefix resident once, the largest batch once (short replies)
        body = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True, "prompt": "w3 w4 w5 w6"}
        await asyncio.gather(
            *(client.post("/generate", json=body | {"task_id": f"t{i}"}) for i in range(w.max_level))
        )
        levels = {}
        swap_level = min(w.levels)  # the hot swap's uploads cost the level they run in a little

        async def hot_swap():
            await asyncio.sleep(0.3)
            infos = [
                await _upload(client, f"t{i}", _native_prefix_bytes(fingerprint, w.prefix_len, 1000 + i))
                for i in range(4)
            ]
            return {"hot_swapped_tasks": 4, "new_versions": [i.get("version") for i in infos]}

        for n in w.levels:

            async def level(n=n):
                return await _http_level(
                    client, ctx, n, False, vocab, during=hot_swap if n == swap_level else None
                )

            levels[str(n)] = await _async_step(ctx, f"tokens_per_s:{n}", level)
        await _async_step(ctx, "one_task", lambda: _http_level(client, ctx, w.max_level, True, vocab))
        ctx.data["metrics_before"] = metrics_before
        ctx.data["metrics_after"] = _metric_lines((await client.get("/metrics")).text)
        ctx.save()


async def _async_step(ctx: Ctx, name: str, make, need_s: float = 4.0):
    started = time.monotonic()
    try:
        ctx.need(need_s, name)
        ctx.data[name] = await make()
    except OutOfTime as e:
        ctx.data[name] = {"status": "skipped", "error": str(e)}
    except Exception as e:
        ctx.data[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"}
        ctx.data.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
    ctx.data.setdefault("seconds", {})[name] = round(time.monotonic() - started, 2)
    ctx.save()
    print(f"gpu_check:   {name}: {_brief(ctx.data[name])} ({time.monotonic() - started:.1f} s)", flush=True)
    return ctx.data[name]


def part_http(ctx: Ctx, name: str, server_compile: str) -> None:
    from loadtest import serverproc
    from server.registry.format import ModelFingerprint

    w = ctx.workload
    folder = ctx.model_dir(name)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    fingerprint = ModelFingerprint.from_config(config)
    per_row = w.prefix_len + w.prompt_len + w.new_tokens
    args = [
        "--model", str(folder),
        "--device", ctx.device,
        "--dtype", ctx.dtype,
        "--compile", server_compile,
        "--max-batch-size", str(w.max_level),
        "--max-batch-tokens", str(2 * w.max_level * per_row),
        "--max-queue", str(8 * w.max_level),
        "--kv-cache-bytes", str(w.kv_cache_bytes),
        "--prefill-chunk-tokens", str(PREFILL_CHUNK_TOKENS),
        "--prefix-dir", str(ctx.workdir / f"prefixes-{name}"),
        "--model-cache-dir", str(ctx.workdir / "model-cache"),
        "--prefix-cache-bytes", str(2 * GIB),
        "--shutdown-timeout-s", "5",
        "--log-level", "warning",
        "--log-format", "text",
    ]  # fmt: skip
    ctx.data["server_args"] = args
    server_log = ctx.workdir / f"server-{name}.log"
    started = time.monotonic()
    with open(server_log, "w+") as logf:
        try:
            proc, base = serverproc.start(args, log=logf, timeout_s=max(10.0, ctx.left() - 20))
        except serverproc.ServerNotReady as e:
            ctx.data["start"] = {"status": "error", "error": str(e)[-3000:]}
            ctx.save()
            raise RuntimeError(f"server did not become ready: {str(e)[-500:]}") from None
        ctx.data["start"] = {"ready_s": round(time.monotonic() - started, 1), "compile": server_compile}
        ctx.save()
        try:
            asyncio.run(_http_measure(ctx, base, fingerprint, config.vocab_size))
        finally:
            code = serverproc.stop(proc, timeout_s=15)
            ctx.data["server_exit_code"] = code
            ctx.data["server_log_tail"] = serverproc.tail(logf, 2000)
            ctx.save()


# --------------------------------------------------------------------------------------------------
# the driver


def run_part(args) -> int:
    """Child process: one part; its figures in --result as it goes."""
    w = TINY if args.tiny else FULL
    ctx = Ctx(
        workdir=Path(args.workdir),
        device=args.device,
        dtype=args.dtype,
        tiny=args.tiny,
        compile=args.compile,
        deadline=args.deadline,
        workload=w,
        result_path=Path(args.result),
        data={},
        models=tuple(m for m in (args.models or "").split(",") if m),
    )
    if args.part == "prepare":
        part_prepare(ctx)
    elif args.part == "engine":
        part_engine(ctx, args.model, args.floor_ms)
    elif args.part == "transformers":
        part_transformers(ctx, args.model)
    elif args.part == "http":
        part_http(ctx, args.model, args.server_compile)
    else:
        raise SystemExit(f"unknown part {args.part}")
    ctx.save()
    # No interpreter teardown: a background thread (transformers' generation loop, a compile that ran
    # past its budget) must not hold the part open once its figures are written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@dataclass
class PartRun:
    part: str
    model: str | None
    status: str = "pending"  # ok | error | timeout | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    error: str | None = None
    log_tail: str | None = None

    @property
    def key(self) -> str:
        return self.part if self.model is None else f"{self.part}:{self.model}"


def _child_env(workdir: Path) -> dict:
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workdir / "inductor"))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(workdir / "torch_extensions"))
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def launch(run: PartRun, args, workdir: Path, timeout_s: float, extra: list[str], t0: float) -> dict:
    """Run one part in a child process (its own process group: a timeout kills a server it started too)."""
    result = workdir / f"part-{run.key.replace(':', '-')}.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable, "-m", "loadtest.gpu_check",
        "--part", run.part,
        "--workdir", str(workdir),
        "--result", str(result),
        "--device", args.device,
        "--dtype", args.dtype,
        "--compile", args.compile,
        "--deadline", str(time.time() + timeout_s - 5),
        *(["--model", run.model] if run.model else []),
        *(["--tiny"] if args.tiny else []),
        *(["--models", args.models] if args.models else []),
        *extra,
    ]  # fmt: skip
    output = workdir / f"part-{run.key.replace(':', '-')}.log"
    run.budget_s = round(timeout_s, 1)
    log(f"{run.key}: start (budget {timeout_s:.0f} s)", t0)
    started = time.monotonic()
    with open(output, "w+") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=_child_env(workdir),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

        def pump():
            for line in proc.stdout:
                out.write(line)
                out.flush()
                if line.startswith("gpu_check:"):
                    print(
                        f"gpu_check: [{time.monotonic() - t0:6.1f} s] {line.removeprefix('gpu_check:').strip()}",
                        flush=True,
                    )

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait(timeout=timeout_s)
            run.status = "ok" if code == 0 else "error"
            if code != 0:
                run.error = f"exit code {code}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            run.status = "timeout"
            run.error = f"killed after its budget of {timeout_s:.0f} s (figures measured before are kept)"
        reader.join(5)
        out.seek(0)
        text = out.read()
    run.seconds = round(time.monotonic() - started, 1)
    if run.status != "ok":
        run.log_tail = text[-2500:]
        lines = [line for line in text.strip().splitlines() if line.strip()]
        if run.status == "error" and lines:
            run.error = f"{run.error}: {lines[-1][:300]}"
    log(f"{run.key}: {run.status} in {run.seconds:.0f} s" + (f" ({run.error})" if run.error else ""), t0)
    try:
        return json.loads(result.read_text())
    except (OSError, ValueError):
        return {}


def keep_logs(path: Path, workdir: Path, run: PartRun, limit: int = 200_000) -> None:
    """The part's whole output (and its server's log), the last `limit` characters of each, appended to
    one file beside the report (the work folder goes away; the device tool brings back few files)."""
    logs = [workdir / f"part-{run.key.replace(':', '-')}.log"]
    if run.part == "http":
        logs.append(workdir / f"server-{run.model}.log")
    with open(path, "a") as out:
        for log_path in logs:
            try:
                text = log_path.read_text(errors="replace")
            except OSError:
                continue
            out.write(f"===== {run.key}: {log_path.name} ({run.status}, {run.seconds} s) =====\n")
            out.write(text[-limit:] + "\n")


def plan_parts(models: list[str]) -> list[tuple[str, str | None, float, float]]:
    plan = [(PREPARE[0], None, PREPARE[1], PREPARE[2])]
    for model in models:
        plan += [(part, model, cap, minimum) for part, cap, minimum in PER_MODEL]
    return plan


def drive(args) -> int:
    t0 = time.monotonic()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.parts.log").unlink(missing_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    w = TINY if args.tiny else FULL
    models = list(shapes_for(args.tiny))
    if args.models:
        models = [m for m in args.models.split(",") if m]
    budget = args.budget_s
    deadline = time.monotonic() + budget
    scale = budget / DEFAULT_BUDGET_S
    report: dict = {
        "issue": 16,
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "mode": {
            "device": args.device,
            "dtype": args.dtype,
            "tiny": args.tiny,
            "compile": args.compile,
            "budget_s": budget,
            "wheels": os.environ.get("GPU_CHECK_WHEELS_STATUS", "not run through gpu_check.sh"),
        },
        "workload": asdict(w),
        "workdir": str(workdir),
        "parts": {},
        "environment": {},
        "bandwidth": {},
        "models": {m: {"shape": shapes_for(args.tiny).get(m)} for m in models},
        "goals": [],
    }
    log(
        f"device {args.device}, {'tiny' if args.tiny else 'full'} workload, budget {budget:.0f} s, work folder {workdir}",
        t0,
    )
    plan = plan_parts(models)
    runs = [PartRun(part, model) for part, model, _, _ in plan]
    engine_compile: dict[str, dict] = {}
    for i, ((part, model, cap, minimum), run) in enumerate(zip(plan, runs, strict=True)):
        cap, minimum = cap * scale, max(MIN_PART_S, minimum * scale)
        left = deadline - time.monotonic()
        reserve = sum(max(MIN_PART_S, m * scale) for _, _, _, m in plan[i + 1 :])
        timeout = min(cap, left - reserve)
        if run.part != "prepare" and not report["models"].get(model, {}).get("weight_bytes"):
            run.status, run.error = "skipped", "skipped: no model folder (prepare failed)"
        elif timeout < minimum:
            run.status = "skipped"
            run.error = f"skipped: time budget ({left:.0f} s left, {reserve:.0f} s kept for later parts, needs {minimum:.0f} s)"
        else:
            extra: list[str] = []
            if part == "engine":
                floor = report["models"][model].get("floor_ms")
                if floor:
                    extra += ["--floor-ms", str(floor)]
            if part == "http":
                compiled = engine_compile.get(model, {})
                fast = compiled.get("wall_s", 1e9) < 0.5 * timeout  # inductor's cache is warm by now
                server_compile = "wait" if args.compile == "on" and compiled.get("ok") and fast else "off"
                extra += ["--server-compile", server_compile]
            report["parts"][run.key] = asdict(run) | {"status": "running", "budget_s": round(timeout, 1)}
            finish(report, out_dir, models, t0)  # a driver killed now leaves this part marked running
            data = launch(run, args, workdir, timeout, extra, t0)
            keep_logs(out_dir / "gpu_check.parts.log", workdir, run)
            absorb(report, run, data)
            if part == "engine":
                engine_compile[model] = data.get("compile") or {}
        report["parts"][run.key] = asdict(run)
        finish(report, out_dir, models, t0)
    report["finished_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    finish(report, out_dir, models, t0)
    log(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.md'}", t0)
    print(render_markdown(report), flush=True)
    if not args.workdir:  # the models (GBs) and stores; a --workdir given is kept
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(r.status == "ok" for r in runs) else PARTS_NOT_OK


def absorb(report: dict, run: PartRun, data: dict) -> None:
    """A part's figures into the report."""
    if run.part == "prepare":
        report["environment"] = data.get("environment", {})
        report["bandwidth"] = data.get("bandwidth", {})
        bw = report["bandwidth"].get("bytes_per_s") if isinstance(report["bandwidth"], dict) else None
        for key, value in data.items():
            if key.startswith("model:"):
                name = key.removeprefix("model:")
                if name in report["models"] and isinstance(value, dict):
                    report["models"][name] |= value
                    if bw and value.get("weight_bytes"):
                        report["models"][name]["floor_ms"] = round(value["weight_bytes"] / bw * 1000, 4)
        report["prepare"] = {k: v for k, v in data.items() if k in ("seconds", "tracebacks")}
        return
    report["models"].setdefault(run.model, {})[run.part] = data


def finish(report: dict, out_dir: Path, models: list[str], t0: float) -> None:
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    report["goals"] = goals(report)
    write_json(out_dir / "gpu_check.json", report)
    (out_dir / "gpu_check.md").write_text(render_markdown(report))


# --------------------------------------------------------------------------------------------------
# goals and the Markdown


def _fig(section, *path):
    for key in path:
        if not isinstance(section, dict):
            return None
        section = section.get(key)
    return section


def _tps(model_data: dict, kind: str, level) -> float | None:
    if kind == "transformers":
        return _fig(model_data, "transformers", "levels", str(level), "tokens_per_s")
    return _fig(model_data, kind, f"tokens_per_s:{level}", "tokens_per_s")


def goals(report: dict) -> list[dict]:
    tiny = report["mode"]["tiny"]
    name = GOAL_MODEL["tiny" if tiny else "full"]
    m = report["models"].get(name, {})
    w = report["workload"]
    mid = 64 if 64 in w["levels"] else max(w["levels"])
    top = max(w["levels"])
    out = []

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    def add(what, measured, goal, op, why_missing):
        met = (
            None
            if measured is None
            else (measured >= goal if op == ">=" else measured <= goal if op == "<=" else measured == goal)
        )
        out.append(
            {
                "goal": what,
                "measured": measured,
                "target": f"{op} {goal}",
                "met": met,
                "note": None if measured is not None else why_missing,
            }
        )

    hf = _tps(m, "transformers", mid)
    add(
        f"{name}, {mid} concurrent, {mid} tasks: engine tokens/s / transformers' own batching",
        ratio(_tps(m, "engine", mid), hf),
        3,
        ">=",
        "engine or transformers figure missing",
    )
    add(
        f"{name}, {mid} concurrent, {mid} tasks: HTTP tokens/s / transformers' own batching",
        ratio(_tps(m, "http", mid), hf),
        3,
        ">=",
        "HTTP or transformers figure missing",
    )
    add(
        f"{name}: decode step at {mid} rows / weight-read floor",
        _fig(m, "engine", f"step_time:{mid}", "ratio_to_floor"),
        2.5,
        "<=",
        "step time or floor missing",
    )
    add(
        f"{name}, {top} concurrent: {top} tasks / one task (engine)",
        ratio(_tps(m, "engine", top), _fig(m, "engine", "one_task", "tokens_per_s")),
        0.9,
        ">=",
        "engine figure missing",
    )
    add(
        f"{name}, {top} concurrent: {top} tasks / one task (HTTP)",
        ratio(_tps(m, "http", top), _fig(m, "http", "one_task", "tokens_per_s")),
        0.9,
        ">=",
        "HTTP figure missing",
    )
    after = _fig(m, "engine", "counters", "after_start_up")
    compiled = bool(_fig(m, "engine", "compiled_at_end"))
    recompiles = None
    if isinstance(after, dict):  # a capture is counted twice (torch's CUDAGraph and the decoder's counter)
        captures = [v for k, v in after.items() if "capture" in k]
        recompiles = after.get("dynamo_unique_graphs", 0) + max(captures or [0])
    why = "engine counters missing"
    if _fig(m, "engine", "compile", "finished") is False:  # it finished (or not) after start-up: not counted
        recompiles, why = None, "the compile had not finished at start-up"
    add(
        f"{name}: compiles / graph captures after start-up (joins, leaves, hot swap)"
        + ("" if compiled or recompiles is None else " [engine ran eager]"),
        recompiles,
        0,
        "==",
        why,
    )
    exact = _fig(m, "engine", "exactness")
    equal = exact.get("equal") if isinstance(exact, dict) and "equal" in exact else None
    add(
        f"{name}: mixed-task batch == each request alone (greedy, {report['mode']['dtype']}), rows equal",
        equal,
        w["exact_rows"],
        "==",
        "exactness missing",
    )
    return out


def _cell(value, fmt="{:.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return fmt.format(value)
    return str(value)


def render_markdown(report: dict) -> str:
    env = report.get("environment") or {}
    bw = report.get("bandwidth") or {}
    w = report["workload"]
    lines = [
        "# GPU device check (issue #16)",
        "",
        f"{env.get('gpu', report['mode']['device'])}; torch {env.get('torch', '?')}, transformers "
        f"{env.get('transformers', '?')}, Python {env.get('python', '?')}; {report['mode']['dtype']}; "
        f"started {report.get('started_at')}, {report.get('elapsed_s')} s"
        + (" (tiny CPU rehearsal)" if report["mode"]["tiny"] else ""),
        "",
        f"Workload: {w['prompt_len']}-token prompts, {w['new_tokens']} new tokens, ignore_eos, greedy; "
        f"{w['prefix_len']}-token random prefixes, every request in flight its own task; {w['waves']} waves "
        f"per level. Copy bandwidth (read + write): {_cell(bw.get('gb_per_s'))} GB/s.",
        "",
        "## Goals",
        "",
        "| goal | measured | target | met |",
        "|---|---:|---:|:---:|",
    ]
    for g in report.get("goals", []):
        met = {True: "yes", False: "**no**", None: "-"}[g["met"]]
        measured = _cell(g["measured"], "{:g}") if g["measured"] is not None else f"- ({g['note']})"
        lines.append(f"| {g['goal']} | {measured} | {g['target']} | {met} |")
    for name, m in report.get("models", {}).items():
        lines += ["", f"## {name}", ""]
        if m.get("weight_bytes"):
            lines.append(
                f"{m.get('parameters', 0) / 1e6:.3g}M parameters, {m['weight_bytes'] / 1e6:.4g} MB of weights; "
                f"weight-read floor {_cell(m.get('floor_ms'), '{:.4g}')} ms per step."
            )
            lines.append("")
        compile_info = _fig(m, "engine", "compile")
        if isinstance(compile_info, dict):
            lines.append(
                f"Engine compile: {'ok' if compile_info.get('ok') else 'no'}"
                + (f", {compile_info.get('wall_s')} s" if compile_info.get("wall_s") is not None else "")
                + (f" ({compile_info.get('error')})" if compile_info.get("error") else "")
                + f"; compiled at the end: {_fig(m, 'engine', 'compiled_at_end')}."
            )
            lines.append("")
        hf_mode = _fig(m, "transformers", "mode")
        lines += [
            f"| in flight | engine tok/s | HTTP tok/s | transformers tok/s ({hf_mode or '-'}) | engine / transformers | HTTP / transformers |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for n in w["levels"]:
            e, h, t = _tps(m, "engine", n), _tps(m, "http", n), _tps(m, "transformers", n)
            lines.append(
                f"| {n} | {_cell(e)} | {_cell(h)} | {_cell(t)} | {_cell(e / t if e and t else None, '{:.2f}')} | "
                f"{_cell(h / t if h and t else None, '{:.2f}')} |"
            )
        e1, h1 = _fig(m, "engine", "one_task", "tokens_per_s"), _fig(m, "http", "one_task", "tokens_per_s")
        lines.append(f"| {max(w['levels'])}, one task | {_cell(e1)} | {_cell(h1)} | | | |")
        lines += ["", "| rows | decode step ms | floor ms | ratio |", "|---:|---:|---:|---:|"]
        for n in w["levels"]:
            s = _fig(m, "engine", f"step_time:{n}") or {}
            lines.append(
                f"| {n} | {_cell(s.get('step_ms'), '{:.3f}')} | {_cell(s.get('floor_ms'), '{:.3f}')} | "
                f"{_cell(s.get('ratio_to_floor'), '{:.2f}')} |"
            )
        exact = _fig(m, "engine", "exactness")
        if isinstance(exact, dict) and "equal" in exact:
            lines += ["", f"Exactness: {exact['equal']}/{exact['rows']} rows equal alone and batched."]
            for d in exact.get("differences", []):
                lines.append(
                    f"- row {d['row']} parts at token {d['first_difference_at']} (top-2 logprob margin "
                    f"{d['margin_batch']} batched, {d['margin_alone']} alone)"
                )
        after = _fig(m, "engine", "counters", "after_start_up")
        if isinstance(after, dict):
            lines += ["", "Counted after start-up: " + ", ".join(f"{k} {v}" for k, v in after.items())]
    lines += ["", "## Parts", "", "| part | status | seconds | budget s | error |", "|---|---|---:|---:|---|"]
    for key, p in report.get("parts", {}).items():
        error = (p.get("error") or "").replace("|", "/").replace("\n", " ")[:200]
        lines.append(f"| {key} | {p['status']} | {p['seconds']} | {p['budget_s']} | {error} |")
    errors = []
    for name, m in report.get("models", {}).items():
        for kind in ("engine", "transformers", "http"):
            section = m.get(kind)
            if not isinstance(section, dict):
                continue
            for key, value in section.items():
                if isinstance(value, dict) and value.get("status") in ("error", "skipped"):
                    errors.append(f"- {name} {kind} {key}: {value['error'][:300]}")
            for e in section.get("errors", []) if isinstance(section.get("errors"), list) else []:
                errors.append(f"- {name} {kind} ({e.get('mode')}): {str(e.get('error'))[:300]}")
    if errors:
        lines += ["", "Errors and skips inside parts:", "", *errors]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", default="cuda", help="cuda (default) | cpu | cuda:N")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="tiny models and counts: a rehearsal on a CPU")
    ap.add_argument(
        "--compile",
        choices=["on", "off", "auto", "graphs"],
        default="auto",
        help="the engine's fast decode step: engine.compile() (auto: on for cuda, off elsewhere); graphs: "
        "engine.compile(graphs=True), on a CPU the CUDA-graph code without capture (a rehearsal)",
    )
    ap.add_argument(
        "--budget-s",
        type=float,
        help=f"seconds for every part together (default {DEFAULT_BUDGET_S:.0f}; tiny 150)",
    )
    ap.add_argument("--models", help="comma-separated subset of the model names")
    ap.add_argument("--workdir", help="for the models, logs and stores (default: a new temporary folder)")
    # a part's child process
    ap.add_argument("--part", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--floor-ms", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--server-compile", default="off", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.compile == "auto":
        args.compile = "on" if args.device.startswith("cuda") else "off"
    if args.part:
        return run_part(args)
    if not args.out:
        ap.error("--out is required")
    if args.budget_s is None:
        args.budget_s = 150.0 if args.tiny else DEFAULT_BUDGET_S
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
