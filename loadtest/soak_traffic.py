"""What the soak sends and how it checks the replies: Poisson arrivals over Zipf tasks and a prompt pool,
streamed requests and clients that hang up, uploads and deletes meanwhile, greedy replies compared per
(task, version, prompt). See loadtest/soak.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

import httpx

from loadtest.workload import LengthDist, instruction_text, parse_dist, poisson_offsets, zipf_weights

MAX_REQUESTS = 200_000  # the plan's hard bound, whatever the rate and duration


@dataclass(frozen=True)
class SoakConfig:
    minutes: float = 20.0
    rate: float | None = None  # requests/s; None: capacity_fraction x the measured capacity
    capacity_fraction: float = 0.8
    capacity_requests: int = 48
    num_tasks: int = 50
    zipf_s: float = 1.1
    num_prompts: int = 20
    prompt_len: LengthDist = field(default_factory=lambda: parse_dist("uniform:16:64"))
    output_len: LengthDist = field(default_factory=lambda: parse_dist("uniform:4:64"))
    stream_fraction: float = 0.5
    disconnect_fraction: float = 0.05  # of all requests: stream, hang up after the first token
    churn_every_s: float = 5.0  # one upload or delete of a task this often
    sample_every_s: float = 10.0
    warmup_s: float | None = None  # RSS reference point; default min(120 s, 20% of the run)
    max_rss_growth_mib: float = 64.0
    reference_checks: int = 5
    timeout_s: float = 600.0  # a reply later than this is lost
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.minutes <= 24 * 60:
            raise ValueError(f"minutes must be in (0, 1440], got {self.minutes}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be > 0 requests/s, got {self.rate}")
        if not (0 < self.capacity_fraction <= 2 and self.capacity_requests >= 1):
            raise ValueError("capacity fraction must be in (0, 2] and capacity requests >= 1")
        if self.num_tasks < 1 or self.num_prompts < 1:
            raise ValueError(f"tasks and prompts must be >= 1, got {self.num_tasks}, {self.num_prompts}")
        for name in ("stream_fraction", "disconnect_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (self.churn_every_s > 0 and self.sample_every_s > 0 and self.timeout_s > 0):
            raise ValueError("churn, sample and timeout intervals must be > 0 s")

    @property
    def warmup(self) -> float:
        return self.warmup_s if self.warmup_s is not None else min(120.0, 0.2 * self.minutes * 60)


@dataclass(frozen=True)
class Ask:
    index: int
    offset_s: float
    task_id: str
    prompt_index: int
    stream: bool
    disconnect: bool


def make_asks(config: SoakConfig, tasks: list[str], rate: float, duration_s: float, seed: int) -> list[Ask]:
    """Poisson arrivals; Zipf task, uniform prompt from the pool, streamed / hung up by the fractions."""
    rng = random.Random(f"soak/{seed}")
    offsets = poisson_offsets(rate, rng, duration_s=duration_s)
    if len(offsets) > MAX_REQUESTS:
        raise ValueError(f"{len(offsets)} requests planned, more than the bound {MAX_REQUESTS}")
    weights = zipf_weights(len(tasks), config.zipf_s)
    asks = []
    for i, offset in enumerate(offsets):
        disconnect = rng.random() < config.disconnect_fraction
        stream = disconnect or rng.random() < config.stream_fraction
        task = rng.choices(tasks, weights)[0]
        asks.append(Ask(i, offset, task, rng.randrange(config.num_prompts), stream, disconnect))
    return asks


@dataclass
class Tally:
    """Every outcome by kind, and the reply check: (task, version, prompt) -> the first tokens seen."""

    kinds: dict[str, int] = field(default_factory=dict)
    codes: dict[str, int] = field(default_factory=dict)
    first: dict[tuple, list[int]] = field(default_factory=dict)
    checked: int = 0
    wrong: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)

    def count(self, kind: str, code: str | None = None) -> None:
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if code is not None:
            self.codes[f"{kind} {code}"] = self.codes.get(f"{kind} {code}", 0) + 1

    def check(self, key: tuple, token_ids: list[int]) -> bool:
        """True if `token_ids` equal the first reply for `key` (or are the first)."""
        reference = self.first.setdefault(key, token_ids)
        if reference is token_ids:
            return True
        self.checked += 1
        if token_ids != reference:
            self.wrong.append(f"{key}: first {reference[:12]}..., now {token_ids[:12]}...")
            return False
        return True


def classify(status: int, code: str | None) -> str:
    if status == 404 and code == "task_not_found":
        return "deleted"  # the churn deleted it; expected
    if status == 429:
        return "rate_limited"
    return "server_error" if status >= 500 else "client_error"


def _code(resp: httpx.Response) -> str | None:
    try:
        return resp.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None


async def send_ask(client: httpx.AsyncClient, ask: Ask, prompts: list[tuple[str, int]], tally: Tally) -> None:
    """Send one request and record what came of it; never raises for what the server or network did."""
    prompt, max_new = prompts[ask.prompt_index]
    body = {"task_id": ask.task_id, "prompt": prompt, "max_new_tokens": max_new, "ignore_eos": True}
    started = time.perf_counter()
    try:
        if ask.stream:
            result = await _streamed(client, body | {"stream": True}, ask.disconnect)
        else:
            resp = await client.post("/generate", json=body)
            reply = resp.json() if resp.status_code == 200 else None
            result = (resp.status_code, _code(resp), reply)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        return tally.count("lost", type(e).__name__)
    status, code, reply = result
    if status == 0:
        return tally.count("disconnected")
    if status != 200 or reply is None:
        return tally.count(classify(status, code) if status != 200 else "lost", code)
    tally.latencies_ms.append((time.perf_counter() - started) * 1000)
    key = (ask.task_id, reply["prefix_version"], ask.prompt_index)
    tally.count("ok" if tally.check(key, reply["token_ids"]) else "wrong")


async def _streamed(
    client: httpx.AsyncClient, body: dict, disconnect: bool
) -> tuple[int, str | None, dict | None]:
    """(status, error code, the `done` event) of an SSE request; status 0 = hung up on purpose."""
    async with client.stream("POST", "/generate", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, _code(resp), None
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if event["type"] == "token" and disconnect:
                return 0, None, None  # leaving the block closes the connection mid-stream
            if event["type"] == "done":
                return 200, None, event
            if event["type"] == "error":
                code = event["error"]["code"]
                return {"task_not_found": 404, "overloaded": 429}.get(code, 500), code, None
    return 200, "stream_incomplete", None


async def churn(client: httpx.AsyncClient, tasks: list[str], config: SoakConfig, tally: Tally, stop) -> None:
    """Every churn_every_s: re-create a deleted task, else give a random task a new version or delete it."""
    rng, deleted, n = random.Random(f"churn/{config.seed}"), [], 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), config.churn_every_s)
            return
        except asyncio.TimeoutError:
            pass
        n += 1
        try:
            if deleted or rng.random() < 0.6:
                task = deleted.pop() if deleted else rng.choice(tasks)
                text = f"{instruction_text(tasks.index(task))} Note {n}."
                resp = await client.post("/prefixes/from-text", json={"task_id": task, "text": text})
                expected, kind = 201, "upload"
            else:
                task = rng.choice(tasks)
                resp = await client.delete(f"/prefixes/{task}")
                expected, kind = 204, "delete"
                deleted.append(task) if resp.status_code == expected else None
        except httpx.HTTPError as e:
            tally.count("lost", f"{type(e).__name__} (churn)")
            continue
        if resp.status_code == expected:
            tally.count(kind)
        else:
            tally.count(classify(resp.status_code, _code(resp)), f"{_code(resp)} ({kind})")


async def drive(client: httpx.AsyncClient, asks: list[Ask], prompts, tally: Tally) -> None:
    """Send each ask at its arrival time by the wall clock (open loop), then wait for every reply."""
    t0, in_flight = time.perf_counter(), []
    for ask in asks:
        delay = t0 + ask.offset_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        in_flight.append(asyncio.create_task(send_ask(client, ask, prompts, tally)))
    await asyncio.gather(*in_flight)


async def measure_capacity(client, config: SoakConfig, tasks, prompts, tally: Tally) -> float:
    """Completed requests/s with `capacity_requests` sent at once (non-streamed), the batch kept full."""
    rng = random.Random(f"capacity/{config.seed}")
    weights = zipf_weights(len(tasks), config.zipf_s)
    asks = [
        Ask(i, 0.0, rng.choices(tasks, weights)[0], rng.randrange(len(prompts)), False, False)
        for i in range(config.capacity_requests)
    ]
    before = tally.kinds.get("ok", 0)
    t0 = time.perf_counter()
    await asyncio.gather(*(send_ask(client, ask, prompts, tally) for ask in asks))
    return (tally.kinds.get("ok", 0) - before) / (time.perf_counter() - t0)


async def reference_check(client, tally: Tally, prompts, count: int) -> int:
    """Ask up to `count` keys of each task's latest version seen again, one at a time (2 x count tries:
    a version may have been replaced since); returns how many were compared."""
    latest: dict[str, int] = {}
    for task, version, _ in tally.first:
        latest[task] = max(version, latest.get(task, 0))
    newest_first = reversed(list(tally.first))  # the oldest keys' versions are likelier replaced
    candidates = [key for key in newest_first if key[1] == latest[key[0]]][: 2 * count]
    done = 0
    for task, version, prompt_index in candidates:
        if done >= count:
            break
        prompt, max_new = prompts[prompt_index]
        body = {"task_id": task, "prompt": prompt, "max_new_tokens": max_new, "ignore_eos": True}
        resp = await client.post("/generate", json=body)
        if resp.status_code != 200 or resp.json()["prefix_version"] != version:
            continue  # replaced or deleted since
        done += 1
        tally.check((task, version, prompt_index), resp.json()["token_ids"])
    return done
