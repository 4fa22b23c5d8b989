"""The one way a generation goes through the server, whatever wire format asked for it.

/generate (routes.py) and the OpenAI routes (openai.py) only translate: their body -> the task, token ids
and SamplingParams, then this service's

    find_task -> tokenize -> build (limits, one Request per choice) -> submit (quotas) -> events -> finish

and the events back into their own replies. What every request must pass (the server's length limits,
the task's defaults, the quotas, the metrics and the log line) is here once. (vLLM's `OpenAIServing`
and LoRAX's validation component play this part there.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeVar

from starlette.requests import Request as HttpRequest

from server.api.auth import Caller
from server.api.disconnect import unless_disconnected
from server.api.state import ServerState
from server.errors import ClientDisconnected, InvalidRequest, PrefixServerError, shown
from server.registry.frame import TaskFrame
from server.registry.store import PrefixRecord
from server.request import FinishReason, SamplingParams
from server.request import Request as GenRequest
from server.scheduler import Event

log = logging.getLogger(__name__)
T = TypeVar("T")


def sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON (both wire formats stream these)."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def frame_of(record: PrefixRecord | None) -> TaskFrame | None:
    """The prompt frame of the task's version (None for the base model or a task without one)."""
    return None if record is None else record.frame


class GenerationService:
    """Prepares, submits, follows and finishes generation requests for one server state."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.settings = state.settings
        self.engine = state.components.engine
        self.scheduler = state.scheduler

    # ---- prepare ----
    def find_task(self, caller: Caller, name: str | None) -> PrefixRecord | None:
        """The latest version of the task the caller calls `name` (None: the base model); PrefixNotFound
        (404) for an unknown task or another tenant's. A request admitted after an upload runs the newer
        version's prefix with the frame read here: hot swap is per request, frames included."""
        if name is None:
            return None
        return self.state.components.registry.get(caller.stored_id(name))

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        """`fn(*args)` on a worker thread: tokenizing a long prompt or running a chat template must not
        hold the event loop (and with it every stream) for milliseconds. Never torch work: a pool thread
        that ran torch ops would keep an OpenMP team alive (server/threads.py)."""
        return await asyncio.to_thread(fn, *args)

    async def tokenize(self, text: str) -> list[int]:
        return await self.off_loop(lambda: self.engine.tokenizer(text)["input_ids"])

    def task_max_new_tokens(self, record: PrefixRecord | None) -> int | None:
        """The task's default max_new_tokens within the server's limit; None if it sets none."""
        frame = frame_of(record)
        if frame is None or frame.max_new_tokens is None:
            return None
        return min(frame.max_new_tokens, self.settings.max_new_tokens)

    def task_stop(self, record: PrefixRecord | None, stop: str | Sequence[str] | None) -> tuple[str, ...]:
        """The stop strings a request asked for, or the task's defaults when it gave none."""
        if stop is None:
            frame = frame_of(record)
            return () if frame is None or frame.stop is None else tuple(frame.stop)
        return (stop,) if isinstance(stop, str) else tuple(stop)

    def sampling(
        self, record: PrefixRecord | None, body, *, max_new_tokens: int, logprobs: int | None
    ) -> SamplingParams:
        """SamplingParams from a request body's sampling fields, which both wire formats name alike
        (temperature, top_p, top_k, seed, stop, ignore_eos, and structured output's constraint); the task's
        stop strings if it gives none."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=body.top_k,
            seed=body.seed,
            stop=self.task_stop(record, body.stop),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            constraint=body.constraint,
        )

    def context_room(self, record: PrefixRecord | None, num_prompt_tokens: int) -> int:
        """How many tokens a request may still generate: the model's context and the batch token budget,
        less the prefix and the prompt (may be < 1: `build` then says why the request cannot run)."""
        limit = min(self.engine.max_request_tokens, self.scheduler.config.max_batch_tokens)
        prefix_len = 0 if record is None else record.num_virtual_tokens
        return limit - prefix_len - num_prompt_tokens

    def build(
        self,
        caller: Caller,
        record: PrefixRecord | None,
        prompts: Sequence[list[int]],
        sampling: SamplingParams,
        *,
        request_id: str,
        n: int = 1,
        stream: bool = False,
        numbered: bool = False,
        max_tokens_param: str = "max_new_tokens",
    ) -> list[GenRequest]:
        """One Request per choice, prompt-major then n (choice j samples with seed + j), each checked
        against the server's limits and the model; InvalidRequest (naming the wire's field) if one fails.
        Ids: `request_id`, or `request_id-k` for the k-th when `numbered`."""
        limit = self.settings.max_new_tokens
        if sampling.max_new_tokens > limit:
            raise InvalidRequest(
                f"{max_tokens_param} must be <= {limit}, got {shown(sampling.max_new_tokens)}",
                param=max_tokens_param,
            )
        task_id = None if record is None else record.task_id  # the stored (tenant-namespaced) id
        requests = []
        for prompt_ids in prompts:
            if len(prompt_ids) > self.settings.max_prompt_tokens:
                raise InvalidRequest(
                    f"prompt has {len(prompt_ids)} tokens, the limit is {self.settings.max_prompt_tokens}",
                    param="prompt",
                )
            for j in range(n):
                seed = None if sampling.seed is None else (sampling.seed + j) % 2**63
                req = GenRequest(
                    prompt_ids,
                    dataclasses.replace(sampling, seed=seed) if j else sampling,
                    task_id,
                    tenant=caller.tenant,
                    stream=stream,
                    request_id=f"{request_id}-{len(requests)}" if numbered else request_id,
                )
                self.engine.validate(req)  # prompt and lengths now (the prefix again when admitted)
                requests.append(req)
        return requests

    # ---- run ----
    def submit(self, caller: Caller, requests: list[GenRequest]) -> None:
        """Queue every request or none: each is one request to the tenant's quotas (rate, concurrency) and
        to the scheduler (404 / 422 / 429 here, before any byte of a reply is sent)."""
        begun: list[GenRequest] = []  # holding a quota
        num_queued = 0
        try:
            for req in requests:
                self.state.limits.begin_request(caller)
                begun.append(req)
                self.scheduler.submit(req)
                num_queued += 1
        except BaseException as e:
            for req in begun[:num_queued]:
                self.scheduler.abort(req)
            for req in begun:
                req.error = e
            self.finish(caller, begun)
            raise

    async def events(self, requests: list[GenRequest]) -> AsyncIterator[tuple[int, Event]]:
        """The requests' events as they come, tagged with the request's index, until each has ended (an
        error, the request timeout included, is an `error` event, and the request's error if it had
        none); on exit (done, error, client gone) whatever still runs is aborted."""
        async for index, event in self._events(requests):
            if event.kind == "error":
                requests[index].error = requests[index].error or event.error
            yield index, event

    async def _events(self, requests: list[GenRequest]) -> AsyncIterator[tuple[int, Event]]:
        if len(requests) == 1:  # the common case, without a queue in between
            try:
                async for event in self.scheduler.events(requests[0]):
                    yield 0, event
            except Exception as e:  # the request timeout
                yield 0, Event("error", error=e)
            return
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        async def pump(index: int, req: GenRequest) -> None:
            try:
                async for event in self.scheduler.events(req):
                    queue.put_nowait((index, event))
            except Exception as e:
                queue.put_nowait((index, Event("error", error=e)))

        pumps = [asyncio.create_task(pump(i, req)) for i, req in enumerate(requests)]
        try:
            num_open = len(requests)
            while num_open:
                index, event = await queue.get()
                num_open -= event.kind != "token"
                yield index, event
        finally:
            for task in pumps:
                task.cancel()
            for req in requests:
                if not req.finished:
                    self.scheduler.abort(req)

    async def wait(self, http: HttpRequest, caller: Caller, requests: list[GenRequest]) -> None:
        """Wait for a plain (not streamed) reply's requests; raise the first error. Aborted if the client
        leaves (ClientDisconnected). Finishes the requests either way."""
        try:
            await unless_disconnected(http, self._wait_all(requests))
        except ClientDisconnected as e:
            for req in requests:
                req.error = req.error or e  # logged and counted as the client's leaving
            raise
        finally:
            self.finish(caller, requests)

    async def _wait_all(self, requests: list[GenRequest]) -> None:
        async with contextlib.aclosing(self.events(requests)) as events:
            async for _, event in events:
                if event.kind == "error":
                    raise event.error

    def finish(self, caller: Caller, requests: list[GenRequest]) -> None:
        """Every request ends here once: its quota given back, its metrics and its log line recorded."""
        for req in requests:
            self.state.limits.end_request(caller)
            status = "ok" if req.error is None else "error"
            if isinstance(req.error, PrefixServerError):
                status = req.error.code
            elif req.finish_reason is FinishReason.ABORT:
                status = "aborted"
            task = req.task_id or "__base__"
            self.state.metrics.observe(req, task, status)
            log.info(
                "generate",
                extra={
                    "request_id": req.request_id,
                    "tenant": req.tenant,
                    "task": task,
                    "prefix_version": req.prefix_version,
                    "status": status,
                    "prompt_tokens": req.num_prompt_tokens,
                    "completion_tokens": len(req.output_token_ids),
                    "finish_reason": req.finish_reason.value if req.finish_reason else None,
                },
            )
