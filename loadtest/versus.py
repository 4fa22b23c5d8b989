"""Comparison mode: the same fixed workload against this server and an OpenAI-compatible peer.

    python -m loadtest --url http://127.0.0.1:8000 --peer http://127.0.0.1:8080

Both servers get the same prompt texts through POST /v1/completions (`max_tokens` = new tokens,
`temperature` 0, `ignore_eos` true). Ours: request i names task PREFIX-i (made with
POST /prefixes/from-text from a 16-token text), or our base model with `--model-tasks 0`; the peer: its
one model. Runs alternate (ours one at a time, peer one at a time, ours all at once, peer all at once),
`--repeats` times after one warm-up of each; tokens are counted from each reply's
`usage.completion_tokens`. Prints the median tokens/s of each server and the ratios ours / peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx

from loadtest.loadgen import LoadgenError, create_prefixes, delete_prefixes, make_client
from loadtest.workload import TEXT, make_prompt, task_ids

WORDS_TOKENIZER = "words"  # --tokenizer words: prompts from the fixed word list (about a token a word)
DEFAULT_TOKENIZER_GLOB = "SmolLM2-135M-Instruct*/tokenizer.json"  # the default model's converted cache


class VersusError(LoadgenError):
    """The comparison cannot go on: a server is unreachable, or answered something unexpected."""


@dataclass(frozen=True)
class VersusConfig:
    url: str
    peer_url: str
    peer_model: str | None = None  # None: the first id of the peer's GET /v1/models
    model_tasks: int = 8  # tasks on our server, request i -> task i % N; 0 = our base model
    requests: int = 8
    prompt_tokens: int = 30
    new_tokens: int = 32
    prefix_tokens: int = 16
    repeats: int = 3
    create_tasks: bool = True
    keep_tasks: bool = False  # False: the tasks this run created are deleted at its end
    task_prefix: str = "lt"
    tokenizer: str | None = None  # tokenizer.json or its folder; None: the default model's; "words"
    timeout_s: float = 300.0
    ready_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name in ("requests", "prompt_tokens", "new_tokens", "prefix_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.model_tasks < 0:
            raise ValueError(f"model tasks must be >= 0, got {self.model_tasks}")
        if not (self.timeout_s > 0 and self.ready_timeout_s >= 0):
            raise ValueError(f"timeouts must be > 0 s, got {self.timeout_s} and {self.ready_timeout_s}")


# ---- the workload's texts ----
def default_tokenizer_path() -> Path | None:
    """tokenizer.json of the default model's converted cache (server/engine/model.py), if there is one."""
    cache = os.environ.get("PREFIX_SERVER_MODEL_CACHE_DIR") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "prefix-server", "models"
    )
    found = sorted(Path(cache).glob(DEFAULT_TOKENIZER_GLOB), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def load_tokenizer(spec: str | None):
    """(a `tokenizers.Tokenizer` or None for word lists, what it is, in words)."""
    if spec == WORDS_TOKENIZER:
        return None, "fixed word list (about one token a word)"
    path = Path(spec) if spec else default_tokenizer_path()
    if path is None:
        return None, "fixed word list (about one token a word; no default model tokenizer found)"
    if path.is_dir():
        path = path / "tokenizer.json"
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(path)), f"tokenizer {path}"
    except Exception as e:  # a missing or unreadable file; the tokenizers package missing
        if spec:
            raise VersusError(f"--tokenizer {spec}: cannot load a tokenizer.json from {path} ({e})") from None
        return None, f"fixed word list (about one token a word; {path} did not load: {e})"


def token_text(tokenizer, length: int, offset: int) -> str:
    """A slice of TEXT that the tokenizer reads back as exactly `length` tokens (a nearby offset if the
    first slice's decode re-tokenizes differently)."""
    ids = tokenizer.encode(TEXT * (2 + (offset + 2 * length) // 40), add_special_tokens=False).ids
    for start in range(offset, offset + 50):
        text = tokenizer.decode(ids[start : start + length])
        if len(tokenizer.encode(text, add_special_tokens=False).ids) == length:
            return text
    return tokenizer.decode(ids[offset : offset + length])


def make_texts(tokenizer, count: int, length: int, offset_step: int, offset0: int, seed: str) -> list[str]:
    if tokenizer is None:
        rng = random.Random(seed)
        return [make_prompt(rng, length) for _ in range(count)]
    return [token_text(tokenizer, length, offset_step * i + offset0) for i in range(count)]


# ---- HTTP ----
def _describe(resp: httpx.Response) -> str:
    text = resp.text.strip().replace("\n", " ")
    return f"HTTP {resp.status_code}: {text[:300] or '(empty body)'}"


async def _get_models(client: httpx.AsyncClient, who: str, ready_timeout_s: float) -> list[str]:
    """The model ids of GET /v1/models, waiting while the server answers 503 (still loading)."""
    url = f"{client.base_url}/v1/models"
    deadline = time.monotonic() + ready_timeout_s
    while True:
        try:
            resp = await client.get("/v1/models", timeout=10)
        except httpx.HTTPError as e:
            raise VersusError(
                f"{who}: GET {url} got no reply ({type(e).__name__}: {e or 'no message'}); is it running?"
            ) from None
        if resp.status_code != 503 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if resp.status_code != 200:
        raise VersusError(f"{who}: GET {url}: expected 200 with a model list, got {_describe(resp)}")
    try:
        ids = [str(m["id"]) for m in resp.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise VersusError(
            f"{who}: GET {url}: expected {{'data': [{{'id': ...}}, ...]}}, got {resp.text[:300]}"
        ) from None
    if not ids:
        raise VersusError(f"{who}: GET {url} lists no model")
    return ids


@dataclass
class Reply:
    completion_tokens: int
    prompt_tokens: int | None
    latency_s: float


async def complete(client: httpx.AsyncClient, who: str, body: dict) -> Reply:
    """One POST /v1/completions; VersusError for anything but a 200 with `usage.completion_tokens`."""
    url = f"{client.base_url}/v1/completions"
    started = time.perf_counter()
    try:
        resp = await client.post("/v1/completions", json=body)
    except httpx.HTTPError as e:
        raise VersusError(
            f"{who}: POST {url} (model {body['model']!r}) got no reply ({type(e).__name__}: {e or 'no message'})"
        ) from None
    latency = time.perf_counter() - started
    if resp.status_code != 200:
        raise VersusError(f"{who}: POST {url} (model {body['model']!r}): expected 200, got {_describe(resp)}")
    try:
        usage = resp.json()["usage"]
        prompt_tokens = usage.get("prompt_tokens")
        return Reply(
            int(usage["completion_tokens"]), None if prompt_tokens is None else int(prompt_tokens), latency
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise VersusError(
            f"{who}: POST {url}: expected a completion with usage.completion_tokens, got {resp.text[:300]}"
        ) from None


@dataclass
class Side:
    """One server of the comparison and what it is sent."""

    name: str  # "ours" / "peer"
    url: str
    client: httpx.AsyncClient
    bodies: list[dict]
    model_desc: str


async def timed_run(side: Side, concurrent: bool) -> dict:
    """All the side's requests, one after another or all at once: seconds, tokens, tokens/s."""
    started = time.perf_counter()
    if concurrent:
        replies = await asyncio.gather(*(complete(side.client, side.name, b) for b in side.bodies))
    else:
        replies = [await complete(side.client, side.name, b) for b in side.bodies]
    seconds = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in replies)
    prompt = [r.prompt_tokens for r in replies]
    return {
        "seconds": round(seconds, 4),
        "completion_tokens": tokens,
        "completion_tokens_each": [r.completion_tokens for r in replies],
        "prompt_tokens_each": prompt,
        "tok_s": round(tokens / seconds, 2),
    }


async def _drop_ignore_eos_if_refused(side: Side, log) -> str | None:
    """A peer that refuses `ignore_eos` (400/422 naming it) is asked again without it; the note says so."""
    try:
        await complete(side.client, side.name, side.bodies[0])
        return None
    except VersusError as e:
        if "ignore_eos" not in str(e) or not any(f"HTTP {c}" in str(e) for c in (400, 422)):
            raise
    for b in side.bodies:
        b.pop("ignore_eos", None)
    note = f"{side.name} refused ignore_eos; sent without it (it may stop at EOS; usage counts what came)"
    log(note)
    await complete(side.client, side.name, side.bodies[0])
    return note


# ---- the comparison ----
def _log_to(verbose: bool):
    def log(message: str) -> None:
        if verbose:
            print(message, file=sys.stderr, flush=True)

    return log


async def run_versus(
    config: VersusConfig,
    ours: httpx.AsyncClient | None = None,
    peer: httpx.AsyncClient | None = None,
    *,
    verbose: bool = True,
) -> dict:
    """Set both servers up, warm up, alternate the runs; returns the result (what goes into --json)."""
    log = _log_to(verbose)
    async with contextlib.AsyncExitStack() as stack:
        if ours is None:
            ours = await stack.enter_async_context(make_client(config.url, config.timeout_s))
        if peer is None:
            peer = await stack.enter_async_context(make_client(config.peer_url, config.timeout_s))
        our_models = await _get_models(ours, "ours", config.ready_timeout_s)
        peer_models = await _get_models(peer, "peer", config.ready_timeout_s)
        peer_model = config.peer_model or peer_models[0]

        tokenizer, tokenizer_desc = load_tokenizer(config.tokenizer)
        prompts = make_texts(tokenizer, config.requests, config.prompt_tokens, 5, 1, "versus-prompts")
        log(f"prompts: {config.requests} x {config.prompt_tokens} tokens, from the {tokenizer_desc}")

        prefixes: list[dict] = []
        if config.model_tasks:
            tasks = task_ids(config.model_tasks, config.task_prefix)
            if config.create_tasks:
                created = [t for t in tasks if (await ours.get(f"/prefixes/{t}")).status_code == 404]
                if not config.keep_tasks:  # at the end, before the client closes (the stack is LIFO)
                    stack.push_async_callback(delete_prefixes, ours, created)
                texts = make_texts(tokenizer, len(tasks), config.prefix_tokens, 3, 0, "versus-prefixes")
                prefixes = await create_prefixes(ours, tasks, texts)
                lengths = sorted({p.get("num_virtual_tokens") for p in prefixes}, key=str)
                log(f"ours: created {len(tasks)} tasks {tasks[0]} .. {tasks[-1]} ({lengths} virtual tokens)")
            our_model_ids = [tasks[i % len(tasks)] for i in range(config.requests)]
            our_desc = f"{len(tasks)} tasks {tasks[0]}..{tasks[-1]}"
        else:
            our_model_ids = [our_models[0]] * config.requests
            our_desc = our_models[0]

        def body(model: str, prompt: str) -> dict:
            return {
                "model": model,
                "prompt": prompt,
                "max_tokens": config.new_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }

        sides = [
            Side(
                "ours",
                config.url,
                ours,
                [body(m, p) for m, p in zip(our_model_ids, prompts, strict=True)],
                our_desc,
            ),
            Side("peer", config.peer_url, peer, [body(peer_model, p) for p in prompts], peer_model),
        ]
        notes = [n for n in [await _drop_ignore_eos_if_refused(sides[1], log)] if n]
        for side in sides:  # one warm-up of each (all at once: it opens every connection)
            warm = await timed_run(side, concurrent=True)
            log(f"{side.name}: warm-up {warm['tok_s']:.1f} tok/s")

        modes = {"one_at_a_time": False, "concurrent": True}
        samples: dict[str, dict[str, list[dict]]] = {s.name: {m: [] for m in modes} for s in sides}
        for r in range(config.repeats):
            for mode, concurrent in modes.items():
                for side in sides:
                    run = await timed_run(side, concurrent)
                    samples[side.name][mode].append(run)
                    log(f"repeat {r + 1}/{config.repeats} {side.name} {mode}: {run['tok_s']:.1f} tok/s")

    expected = config.requests * config.new_tokens
    servers = {}
    for side in sides:
        runs = samples[side.name]
        counts = sorted({run["completion_tokens"] for mode in modes for run in runs[mode]})
        if counts != [expected]:
            notes.append(
                f"{side.name}: expected {expected} completion tokens a run "
                f"({config.requests} x {config.new_tokens}), usage said {counts}"
            )
        prompt_counts = sorted(
            {t for mode in modes for run in runs[mode] for t in run["prompt_tokens_each"] if t is not None}
        )
        servers[side.name] = {
            "url": side.url,
            "model": side.model_desc,
            "prompt_tokens": prompt_counts,
            "tok_s": {mode: round(statistics.median(r["tok_s"] for r in runs[mode]), 2) for mode in modes},
            "runs": runs,
        }
    ratio = {
        mode: round(servers["ours"]["tok_s"][mode] / servers["peer"]["tok_s"][mode], 3)
        if servers["peer"]["tok_s"][mode] > 0
        else None
        for mode in modes
    }
    return {
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": asdict(config) | {"peer_model": peer_model},
        "prompts": prompts,
        "prompt_source": tokenizer_desc,
        "prefixes": prefixes,
        "servers": servers,
        "ratio_ours_over_peer": ratio,
        "notes": notes,
    }


def format_versus(result: dict) -> str:
    """The markdown table: server, one at a time tok/s, N concurrent tok/s (medians), then ours / peer."""
    c = result["config"]
    ours, peer = result["servers"]["ours"], result["servers"]["peer"]
    n = c["requests"]
    prefix = f", {c['prefix_tokens']}-token prefixes" if c["model_tasks"] else ""
    lines = [
        f"{n} requests, {c['prompt_tokens']}-token prompts, {c['new_tokens']} new tokens, greedy; "
        f"median of {c['repeats']} runs each",
        "",
        f"| server | model | one at a time, tok/s | {n} concurrent, tok/s |",
        "|---|---|---:|---:|",
        f"| ours {ours['url']} | {ours['model']}{prefix} | {ours['tok_s']['one_at_a_time']:.1f} "
        f"| {ours['tok_s']['concurrent']:.1f} |",
        f"| peer {peer['url']} | {peer['model']} | {peer['tok_s']['one_at_a_time']:.1f} "
        f"| {peer['tok_s']['concurrent']:.1f} |",
    ]
    ratio = result["ratio_ours_over_peer"]
    shown = ["-" if ratio[m] is None else f"{ratio[m]:.2f}" for m in ("one_at_a_time", "concurrent")]
    lines.append(f"| ours / peer | | {shown[0]} | {shown[1]} |")
    lines.append("")
    lines.append(
        f"prompts from the {result['prompt_source']}; usage.prompt_tokens: ours {ours['prompt_tokens']}, "
        f"peer {peer['prompt_tokens']}"
    )
    lines += [f"note: {note}" for note in result["notes"]]
    return "\n".join(lines)
