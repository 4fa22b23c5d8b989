"""The load generator: creates the tasks' prefixes, then drives the server open-loop at each rate.

Open loop: request i is sent at its Poisson arrival time whatever the server is doing; no send waits for
an earlier reply (unless `concurrency_limit` caps requests in flight), so an overloaded server shows up
as growing latency or 429s, never as a politely slower client.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import httpx

from loadtest.progress import Progress
from loadtest.stats import RequestResult, summarize
from loadtest.workload import LengthDist, PlannedRequest, instruction_text, make_plan, parse_dist, task_ids


class LoadgenError(Exception):
    """The run cannot start: the server is not ready, or refused to create a task's prefix."""


@dataclass(frozen=True)
class LoadConfig:
    url: str
    rates: tuple[float, ...]
    duration_s: float | None = 60.0  # seconds of arrivals per rate; or num_requests per rate
    num_requests: int | None = None
    num_tasks: int = 8  # 0: every request uses the base model (no prefix)
    zipf_s: float = 1.1
    prompt_len: LengthDist = field(default_factory=lambda: parse_dist("uniform:16:64"))
    output_len: LengthDist = field(default_factory=lambda: parse_dist("uniform:4:128"))
    stream: bool = False
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 300.0
    warmup: int = 0
    concurrency_limit: int | None = None
    label: str = "run"
    task_prefix: str = "lt"
    create_tasks: bool = True
    keep_tasks: bool = False  # False: the tasks this run created are deleted at its end
    window_s: float = 15.0
    ready_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not self.rates or min(self.rates) <= 0:
            raise ValueError(f"rates must be > 0 requests/s, got {list(self.rates)}")
        if (self.duration_s is None) == (self.num_requests is None):
            raise ValueError("give exactly one of duration_s and num_requests")
        if self.duration_s is not None and not self.duration_s > 0:
            raise ValueError(f"duration must be > 0 s, got {self.duration_s}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.num_tasks < 0 or self.warmup < 0:
            raise ValueError(f"tasks and warmup must be >= 0, got {self.num_tasks} and {self.warmup}")
        if self.concurrency_limit is not None and self.concurrency_limit < 1:
            raise ValueError(f"concurrency limit must be >= 1, got {self.concurrency_limit}")
        if not (self.timeout_s > 0 and self.window_s > 0):
            raise ValueError(f"timeout and window must be > 0 s, got {self.timeout_s} and {self.window_s}")

    def to_json(self) -> dict:
        out = asdict(self)
        out["rates"] = list(self.rates)
        out["prompt_len"], out["output_len"] = self.prompt_len.spec, self.output_len.spec
        return out


def make_client(url: str, timeout_s: float, transport: httpx.AsyncBaseTransport | None = None):
    """An AsyncClient with no connection cap: httpx's default pool (100) would silently close the loop."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=512)
    return httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits, transport=transport)


def request_body(p: PlannedRequest, config: LoadConfig) -> dict:
    body = {
        "task_id": p.task_id,
        "prompt": p.prompt,
        "max_new_tokens": p.max_new_tokens,
        "temperature": config.temperature,
        "ignore_eos": True,  # output length is what was drawn, not what the model felt like
    }
    if config.temperature > 0:
        body["seed"] = p.seed
    if config.stream:  # only when asked: a server without streaming refuses unknown fields
        body["stream"] = True
    return body


def _error_code(resp: httpx.Response) -> str:
    try:
        return str(resp.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return f"http_{resp.status_code}"


async def _send_json(client: httpx.AsyncClient, body: dict):
    resp = await client.post("/generate", json=body)
    if resp.status_code != 200:
        return resp.status_code, _error_code(resp), None, 0
    return 200, None, None, int(resp.json()["usage"]["completion_tokens"])


async def _send_stream(client: httpx.AsyncClient, body: dict, started: float):
    """SSE: `data: {json}` lines; token events, then one `done` (or `error`) event."""
    async with client.stream("POST", "/generate", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return resp.status_code, _error_code(resp), None, 0
        ttft_ms, num_tokens = None, 0
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            kind = event.get("type")
            if kind == "token":
                if ttft_ms is None:
                    ttft_ms = (time.perf_counter() - started) * 1000
                num_tokens += 1
            elif kind == "done":
                usage = event.get("usage") or {}
                return 200, None, ttft_ms, int(usage.get("completion_tokens", num_tokens))
            elif kind == "error":
                return 200, str((event.get("error") or {}).get("code", "stream_error")), ttft_ms, num_tokens
        return 200, "stream_incomplete", ttft_ms, num_tokens


async def send_request(
    client: httpx.AsyncClient, p: PlannedRequest, config: LoadConfig, t0: float
) -> RequestResult:
    """Send one request now and time it; never raises for what the server or the network did."""
    started = time.perf_counter()
    body = request_body(p, config)
    try:
        send = _send_stream(client, body, started) if config.stream else _send_json(client, body)
        status, code, ttft_ms, tokens = await asyncio.wait_for(send, config.timeout_s)
    except asyncio.TimeoutError:
        status, code, ttft_ms, tokens = None, "timeout", None, 0
    except httpx.HTTPError as e:
        status, code, ttft_ms, tokens = None, type(e).__name__, None, 0
    except (ValueError, KeyError, TypeError) as e:  # a reply that is not what the API promises
        status, code, ttft_ms, tokens = None, f"bad_reply:{type(e).__name__}", None, 0
    return RequestResult(
        index=p.index,
        task_id=p.task_id,
        max_new_tokens=p.max_new_tokens,
        scheduled_s=round(p.offset_s, 6),
        start_s=round(started - t0, 6),
        status=status,
        error_code=code,
        latency_ms=round((time.perf_counter() - started) * 1000, 3),
        ttft_ms=None if ttft_ms is None else round(ttft_ms, 3),
        completion_tokens=tokens,
    )


async def run_rate(
    client: httpx.AsyncClient, plan: list[PlannedRequest], config: LoadConfig, progress: Progress
) -> list[RequestResult]:
    """Send every planned request at its arrival time (wall clock), then wait for all replies."""
    limit = asyncio.Semaphore(config.concurrency_limit) if config.concurrency_limit else None
    results: list[RequestResult] = []
    t0 = time.perf_counter()

    async def fire(p: PlannedRequest) -> None:
        try:
            result = await send_request(client, p, config, t0)
        finally:
            if limit is not None:
                limit.release()
        results.append(result)
        progress.update(result)

    in_flight = []
    for p in plan:
        delay = t0 + p.offset_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if limit is not None:
            await limit.acquire()  # the cap delays sends; `send_lag_ms` in the summary shows by how much
        in_flight.append(asyncio.create_task(fire(p)))
    await asyncio.gather(*in_flight)
    return sorted(results, key=lambda r: r.index)


async def wait_ready(client: httpx.AsyncClient, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while True:
        try:
            resp = await client.get("/ready", timeout=5)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as e:
            last = type(e).__name__
        if time.monotonic() > deadline:
            raise LoadgenError(f"{client.base_url}/ready did not answer 200 within {timeout_s:g} s ({last})")
        await asyncio.sleep(0.5)


async def create_prefixes(
    client: httpx.AsyncClient, tasks: list[str], texts: list[str] | None = None
) -> list[dict]:
    """One prefix per task from a distinct instruction text (`texts[i]`, default `instruction_text(i)`);
    an existing task just gets a new version. Returns the server's answers (PrefixInfo)."""
    infos = []
    for i, task in enumerate(tasks):
        text = instruction_text(i) if texts is None else texts[i]
        try:
            resp = await client.post("/prefixes/from-text", json={"task_id": task, "text": text})
        except httpx.HTTPError as e:
            raise LoadgenError(
                f"creating prefix {task!r}: POST {client.base_url}/prefixes/from-text got no reply "
                f"({type(e).__name__}: {e})"
            ) from None
        if resp.status_code != 201:
            raise LoadgenError(
                f"creating prefix {task!r}: expected 201, got {resp.status_code} {resp.text[:300]}"
            )
        try:
            infos.append(resp.json())
        except ValueError:
            raise LoadgenError(
                f"creating prefix {task!r}: the 201 reply is not JSON: {resp.text[:300]}"
            ) from None
    return infos


async def delete_prefixes(client: httpx.AsyncClient, tasks: list[str]) -> None:
    """Delete the tasks a run created; one that cannot be deleted is reported, not fatal."""
    for task in tasks:
        try:
            resp = await client.delete(f"/prefixes/{task}")
        except httpx.HTTPError as e:
            print(f"loadtest: could not delete task {task!r}: {type(e).__name__}", file=sys.stderr)
            continue
        if resp.status_code not in (204, 404):
            print(f"loadtest: could not delete task {task!r}: {resp.status_code}", file=sys.stderr)


async def server_up(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/health", timeout=10)).status_code == 200
    except httpx.HTTPError:
        return False


def _log(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)


async def run_load(
    config: LoadConfig,
    client: httpx.AsyncClient | None = None,
    *,
    verbose: bool = True,
    on_run: Callable[[dict], None] | None = None,
) -> dict:
    """Set up the tasks, warm up, run every rate; returns the whole result (what goes into the JSON).

    `on_run(result)` is called after each rate with the runs so far (to save partial results).
    """
    own_client = client is None
    client = client or make_client(config.url, config.timeout_s)
    created: list[str] = []  # tasks that did not exist before this run
    try:
        await wait_ready(client, config.ready_timeout_s)
        tasks = task_ids(config.num_tasks, config.task_prefix)
        if config.create_tasks and tasks:
            created = [t for t in tasks if (await client.get(f"/prefixes/{t}")).status_code == 404]
            await create_prefixes(client, tasks)
            _log(verbose, f"created prefixes for {len(tasks)} tasks: {tasks[0]} .. {tasks[-1]}")
        plan_args = dict(
            seed=config.seed,
            tasks=tasks,
            zipf_s=config.zipf_s,
            prompt_len=config.prompt_len,
            output_len=config.output_len,
        )
        if config.warmup:
            warm = make_plan(rate=1.0, count=config.warmup, **plan_args | {"seed": config.seed + 1})
            t0 = time.perf_counter()
            done = await asyncio.gather(*(send_request(client, p, config, t0) for p in warm))
            num_ok = sum(r.category == "ok" for r in done)
            _log(verbose, f"warm-up: {num_ok}/{len(done)} ok in {time.perf_counter() - t0:.1f} s")
        result = {
            "label": config.label,
            "url": config.url,
            "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "config": config.to_json(),
            "runs": [],
        }
        for rate in config.rates:
            plan = make_plan(rate=rate, duration_s=config.duration_s, count=config.num_requests, **plan_args)
            progress = Progress(len(plan), f"{config.label} @ {rate:g} req/s", enabled=verbose)
            try:
                results = await run_rate(client, plan, config, progress)
            finally:
                progress.close()
            span = config.duration_s if config.duration_s is not None else plan[-1].offset_s
            summary = summarize(
                results,
                offered_rate=rate,
                num_planned=len(plan),
                arrival_span_s=span,
                window_s=config.window_s,
            )
            summary["server_up_after"] = await server_up(client)
            result["runs"].append(summary | {"requests": [asdict(r) for r in results]})
            result["capacity_rps"] = max(r["throughput_rps"] for r in result["runs"])
            if on_run is not None:
                on_run(result)
        return result
    finally:
        if created and not config.keep_tasks:
            await delete_prefixes(client, created)
            _log(verbose, f"deleted the {len(created)} tasks this run created (--keep-tasks keeps them)")
        if own_client:
            await client.aclose()
