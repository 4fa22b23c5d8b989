"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

`model` selects the prefix, as vLLM, LoRAX and SGLang select an adapter: a task id, or the base model's
name for none. A request walks the same path as /generate (a Request per choice -> scheduler.submit ->
scheduler.events), so choices of any task batch with everything else. Errors on these routes come in
OpenAI's shape, {"error": {message, type, param, code}}; the app-wide handlers are not involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from server.api import routes
from server.api.auth import Caller, get_caller
from server.api.disconnect import unless_disconnected
from server.api.errors import json_error_message, shown_input, status_for
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.openai_schemas import (
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ErrorBody,
    SamplingFields,
    body_schema,
    refused_extras,
)
from server.api.schemas import TASK_ID_PATTERN
from server.errors import ClientDisconnected, InvalidRequest, PrefixNotFound, PrefixServerError, shown
from server.registry.frame import TaskFrame
from server.registry.store import PrefixRecord
from server.request import FinishReason, SamplingParams
from server.request import Request as GenRequest
from server.scheduler import Event

if TYPE_CHECKING:
    from server.api.app import ServerState

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])
_ERR = {"model": ErrorBody}
ERRORS = {s: _ERR for s in (400, 401, 404, 413, 429, 500, 503, 504)}
STARTED = int(time.time())  # the base model's `created`
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    """An error as OpenAI reports it: a status, a message, the parameter at fault and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- who calls, and which tasks they see (api/auth.py: API keys -> tenants, namespaced task ids) ----
@dataclass(frozen=True)
class Call:
    """Who asks: the server state, the authenticated caller, and the id its log lines carry."""

    state: ServerState
    caller: Caller
    request_id: str  # X-Request-ID
    http: Request  # the HTTP request: a plain reply is aborted when its client leaves


async def _call(request: Request) -> Call:
    """Who calls: 401 without a valid key when keys are set, then 503 while the model loads."""
    caller = await get_caller(request)
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex[:16]
    return Call(routes._state(request), caller, request_id, request)


def _visible_tasks(call: Call) -> list[tuple[str, PrefixRecord]]:
    """(the caller's name for it, record) of every task the caller may use."""
    caller = call.caller
    records = call.state.components.registry.list()
    return [(caller.visible_id(r.task_id), r) for r in records if caller.owns(r.task_id)]


def _find_task(call: Call, model: str) -> PrefixRecord | None:
    """The task `model` names, or None for the base model; 404 model_not_found otherwise (another
    tenant's task too: it is invisible, as on every other route)."""
    if model == call.state.components.model_name:
        return None
    try:
        if not re.fullmatch(TASK_ID_PATTERN, model):
            raise PrefixNotFound(model)
        return call.state.components.registry.get(call.caller.stored_id(model))
    except (PrefixNotFound, InvalidRequest):
        raise OpenAIError(
            404, f"the model {shown(model)} does not exist", param="model", code="model_not_found"
        ) from None


def _body(model: type[SamplingFields]) -> dict:
    """The OpenAPI of a route that reads its JSON body itself (`_parse`), so errors keep OpenAI's shape."""
    content = {"application/json": {"schema": body_schema(model)}}
    return {"requestBody": {"required": True, "content": content}}


# With `stream`, a reply is server-sent events; each event (OpenAPI 3.1: the schema of one item):
_STREAMED = {
    "description": "the reply; with `stream: true`, server-sent events instead",
    "content": {
        "text/event-stream": {
            "schema": {
                "type": "object",
                "required": ["data"],
                "properties": {
                    "data": {
                        "type": "string",
                        "description": "a chunk (or an error) as JSON; the last event is [DONE]",
                    }
                },
            }
        }
    },
}


# ---- routes ----
@router.get("/models", responses=ERRORS)
async def list_models(request: Request):
    """The base model (no prefix) and every task, each usable as `model`."""
    try:
        call = await _call(request)
        cards = [_model_card(call.state.components.model_name, STARTED)]
        cards += [_model_card(name, record.created_at, record) for name, record in _visible_tasks(call)]
        return {"object": "list", "data": cards}
    except Exception as e:
        return error_response(e, request)


@router.get("/models/{model}", responses=ERRORS)
async def get_model(model: str, request: Request):
    """One model: the base model or one of the caller's tasks."""
    try:
        record = _find_task(await _call(request), model)
        return _model_card(model, STARTED if record is None else record.created_at, record)
    except Exception as e:
        return error_response(e, request)


@router.post("/completions", responses={**ERRORS, 200: _STREAMED}, openapi_extra=_body(CompletionRequest))
async def completions(request: Request):
    """Complete prompts with a task's prefix (`model` = task id) or the base model; SSE with `stream`.

    The prompt is used as given, also for a task with a template (this is the raw route: send the
    filled template, or use /v1/chat/completions, which fills it); a task's default max_tokens and
    stop apply when the request gives none."""
    try:
        call = await _call(request)
        body = await _parse(request, CompletionRequest, COMPLETION_FIELDS)
        record = _find_task(call, body.model)
        body = _with_task_stop(body, record)
        prompts = _completion_prompts(body.prompt, call.state.components.engine.tokenizer)
        limit = call.state.settings.max_new_tokens
        max_tokens = body.max_tokens or routes.default_max_new_tokens(
            _frame(record), limit, COMPLETION_DEFAULT_MAX_TOKENS
        )
        return await _run(call, body, record, prompts, max_tokens, "max_tokens", chat=False)
    except Exception as e:
        return error_response(e, request)


@router.post(
    "/chat/completions", responses={**ERRORS, 200: _STREAMED}, openapi_extra=_body(ChatCompletionRequest)
)
async def chat_completions(request: Request):
    """Answer a conversation, formatted with the model's chat template; SSE with `stream`.

    A task with a template (its `prefix_server.frame` in /v1/models) was trained on that prompt, not on
    the chat template: the last message, which must be the user's, fills the template, and earlier
    messages (a system prompt, former turns) are ignored. The task's default max_tokens and stop apply
    when the request gives none. A task without a template, and the base model, get the chat template."""
    try:
        call = await _call(request)
        state = call.state
        body = await _parse(request, ChatCompletionRequest, CHAT_FIELDS)
        record = _find_task(call, body.model)
        body = _with_task_stop(body, record)
        frame = _frame(record)
        tokenizer = state.components.engine.tokenizer
        if frame is not None and frame.template is not None:
            prompt_ids = tokenizer(frame.fill(_last_user_text(body.messages)))["input_ids"]
        else:
            prompt_ids = _chat_prompt_ids(tokenizer, body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is None and frame is not None and frame.max_new_tokens is not None:
            max_tokens = routes.default_max_new_tokens(frame, state.settings.max_new_tokens, 0)
        if max_tokens is None:  # as much as the context leaves, up to the server's limit
            prefix_len = 0 if record is None else record.num_virtual_tokens
            room = _context_limit(state) - prefix_len - len(prompt_ids)
            max_tokens = max(1, min(state.settings.max_new_tokens, room))  # room < 1: validate says why
        return await _run(call, body, record, [prompt_ids], max_tokens, param, chat=True)
    except Exception as e:
        return error_response(e, request)


# ---- request side ----
async def _parse(request: Request, model: type[SamplingFields], known: set[str]) -> SamplingFields:
    try:
        raw = await request.json()
    except (ValueError, RecursionError) as e:  # RecursionError: arrays nested thousands deep
        raise OpenAIError(400, json_error_message(e), code="malformed_json") from e
    body = model.model_validate(raw)
    refused = refused_extras(body.model_extra or {}, known)
    if refused is not None:
        param, code, message = refused
        raise OpenAIError(400, message, param=param, code=code)
    return body


def _completion_prompts(prompt, tokenizer) -> list[list[int]]:
    """Token ids of each prompt: strings are tokenized as /generate does, token id lists kept."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(p, str) for p in prompt):
        return [tokenizer(p)["input_ids"] for p in prompt]
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt]


def _frame(record: PrefixRecord | None) -> TaskFrame | None:
    return None if record is None else record.frame


def _with_task_stop(body: SamplingFields, record: PrefixRecord | None) -> SamplingFields:
    """The body with the task's default stop strings when it gives none."""
    frame = _frame(record)
    if body.stop is not None or frame is None or frame.stop is None:
        return body
    return body.model_copy(update={"stop": list(frame.stop)})


def _last_user_text(messages: list[ChatMessage]) -> str:
    """What a templated task answers: the last message, which must be the user's."""
    last = messages[-1]
    if last.role != "user":
        raise OpenAIError(
            400,
            f"this task fills its template with the last message, which must be the user's; it is "
            f"{last.role!r}",
            param=f"messages[{len(messages) - 1}].role",
        )
    return last.content


def _chat_prompt_ids(tokenizer, messages: list[ChatMessage]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise OpenAIError(
            400,
            "this model's tokenizer has no chat template; use /v1/completions with a formatted prompt",
            param="messages",
            code="no_chat_template",
        )
    conversation = [
        {
            "role": "system" if m.role == "developer" else m.role,  # newer OpenAI name, older templates
            "content": m.content,
            **({"name": m.name} if m.name is not None else {}),
        }
        for m in messages
    ]
    try:
        encoded = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )
    except TemplateError as e:  # the template is code from the model's files: jinja's raise_exception
        raise OpenAIError(
            400, f"the chat template refused the messages: {shown(str(e), quoted=False)}", param="messages"
        ) from e
    except Exception as e:  # the tokenizer's own errors say nothing a client can act on
        log.warning("chat template failed", exc_info=e)
        raise OpenAIError(400, "the chat template could not format the messages", param="messages") from e
    return list(encoded["input_ids"])


def _context_limit(state) -> int:
    engine = state.components.engine
    limit = min(engine.max_seq_len, engine.max_context or engine.max_seq_len)
    return min(limit, state.scheduler.config.max_batch_tokens)


def _make_requests(
    call: Call, body: SamplingFields, record, prompts: list[list[int]], max_tokens: int, param: str
) -> list[GenRequest]:
    """One Request per choice: prompt-major, then n; choice j of a prompt samples with seed + j."""
    settings, engine = call.state.settings, call.state.components.engine
    if max_tokens > settings.max_new_tokens:
        raise OpenAIError(
            400, f"{param} must be <= {settings.max_new_tokens}, got {shown(max_tokens)}", param
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    task_id = None if record is None else record.task_id  # the stored (tenant-namespaced) id
    requests = []
    for prompt_ids in prompts:
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise OpenAIError(
                400, f"prompt has {len(prompt_ids)} tokens, the limit is {settings.max_prompt_tokens}"
            )
        for j in range(body.n):
            sampling = SamplingParams(
                max_new_tokens=max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                seed=None if body.seed is None else (body.seed + j) % 2**63,
                stop=stop,
                ignore_eos=body.ignore_eos,
                logprobs=body.num_top_logprobs,
            )
            req = GenRequest(prompt_token_ids=list(prompt_ids), sampling=sampling, task_id=task_id)
            req.tenant, req.stream = call.caller.tenant, body.stream
            req.request_id = f"{call.request_id}-{len(requests)}"  # X-Request-ID, then the choice
            engine.validate(req)
            requests.append(req)
    return requests


async def _run(call: Call, body, record, prompts, max_tokens: int, param: str, *, chat: bool):
    """Submit every choice (all or none), then answer: one reply, or SSE chunks as tokens come.

    Each choice is a request to the scheduler, to the tenant's quotas and to the metrics, as n calls of
    /generate would be."""
    requests = _make_requests(call, body, record, prompts, max_tokens, param)
    state, caller = call.state, call.caller
    scheduler, limits = state.scheduler, state.limits
    begun = []
    try:
        for req in requests:
            limits.begin_request(caller)  # the tenant's rate and concurrency quotas
            begun.append(req)
            scheduler.submit(req)  # 404 / 400 / 429 here, before any byte of a stream is sent
    except BaseException:
        for req in begun:
            scheduler.abort(req)
            limits.end_request(caller)
        raise

    def finished() -> None:
        for req in requests:
            routes._finished(state, req, caller)  # quotas given back, metrics, a log line

    tokenizer = state.components.engine.tokenizer
    reply = Reply(body.model, chat, requests, sum(len(p) for p in prompts), caller, tokenizer)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(
            reply.stream(scheduler, include_usage, finished), media_type="text/event-stream"
        )
    try:
        await unless_disconnected(call.http, _wait_all(scheduler, requests))
    except ClientDisconnected as e:
        for req in requests:
            req.error = req.error or e  # logged and counted as the client's leaving
        raise
    finally:
        finished()
    return reply.full()


async def _wait_all(scheduler, requests: list[GenRequest]) -> None:
    async with contextlib.aclosing(_merged_events(scheduler, requests)) as events:
        async for _, event in events:
            if event.kind == "error":
                raise event.error


async def _merged_events(scheduler, requests: list[GenRequest]) -> AsyncIterator[tuple[int, Event]]:
    """The events of several requests as they come, tagged with the request's index, until each has
    ended; on exit (done, error, client gone) whatever still runs is aborted."""
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, req: GenRequest) -> None:
        try:
            async for event in scheduler.events(req):
                queue.put_nowait((index, event))
        except Exception as e:  # the request timeout
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
                scheduler.abort(req)


# ---- reply side ----
class Reply:
    """The OpenAI objects for a set of choices: one reply, or its SSE chunks."""

    def __init__(
        self,
        model: str,
        chat: bool,
        requests: list[GenRequest],
        num_prompt_tokens: int,
        caller: Caller,
        tokenizer=None,  # names the tokens of logprobs
    ):
        self.model, self.chat, self.requests = model, chat, requests
        self.num_prompt_tokens, self.caller, self.tokenizer = num_prompt_tokens, caller, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def usage(self) -> dict:
        completion = sum(len(r.output_token_ids) for r in self.requests)
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.num_prompt_tokens + completion,
        }

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def full(self) -> dict:
        choices = []
        for index, req in enumerate(self.requests):
            choice: dict = {"index": index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": req.text}
            else:
                choice["text"] = req.text
            logprobs = self._logprobs(req, 0, len(req.output_logprobs))
            choices.append({**choice, "logprobs": logprobs, "finish_reason": _finish_reason(req)})
        kind = "chat.completion" if self.chat else "text_completion"
        return {**self._head(kind), "choices": choices, "usage": self.usage()}

    def _logprobs(self, req: GenRequest, start: int, end: int) -> dict | None:
        """A choice's `logprobs` for its tokens start..end-1; None if it asked for none or there are none."""
        if req.sampling.logprobs is None or start >= end:
            return None
        entries = req.output_logprobs[start:end]
        if self.chat:
            return chat_logprobs(self.tokenizer, entries)
        return completion_logprobs(self.tokenizer, entries, req.output_token_ids, start, req.text)

    def _chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        usage: bool,
        logprobs: dict | None = None,
    ) -> str:
        choice: dict = {"index": index}
        if self.chat:  # the first chunk (text None) carries the role, the last ("") an empty delta
            if text is None:
                choice["delta"] = {"role": "assistant", "content": ""}
            else:
                choice["delta"] = {"content": text} if text else {}
        else:
            choice["text"] = text or ""
        choice.update(logprobs=logprobs, finish_reason=finish_reason)
        chunk = {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": [choice],
        }
        return _sse({**chunk, "usage": None} if usage else chunk)

    async def stream(self, scheduler, include_usage: bool, on_end: Callable[[], None]) -> AsyncIterator[str]:
        """Role chunks (chat), a chunk per text delta, a finish_reason chunk per choice, the usage chunk
        when asked for, then `data: [DONE]`. An error after the first byte is an `error` event.
        A chunk carries the logprobs of its tokens; tokens whose text is held back (part of a character,
        maybe a stop string) go with the next chunk."""
        num_seen = [0] * len(self.requests)  # tokens the events announced, per choice
        num_sent = [0] * len(self.requests)  # ... and those whose logprobs went out
        try:
            if self.chat:
                for index in range(len(self.requests)):
                    yield self._chunk(index, None, None, include_usage)
            async with contextlib.aclosing(_merged_events(scheduler, self.requests)) as events:
                async for index, event in events:
                    req = self.requests[index]
                    if event.kind == "token":
                        num_seen[index] += len(event.token_ids or [])
                        if event.text:
                            logprobs = self._logprobs(req, num_sent[index], num_seen[index])
                            num_sent[index] = num_seen[index]
                            yield self._chunk(index, event.text, None, include_usage, logprobs)
                    elif event.kind == "done":
                        logprobs = self._logprobs(req, num_sent[index], len(req.output_logprobs))
                        yield self._chunk(index, "", _finish_reason(req), include_usage, logprobs)
                    elif event.kind == "error":
                        raise event.error
            if include_usage:
                kind = "chat.completion.chunk" if self.chat else "text_completion"
                yield _sse({**self._head(kind), "choices": [], "usage": self.usage()})
        except Exception as e:
            yield _sse(_as_openai(e, self.caller).body())
        finally:
            on_end()
        yield "data: [DONE]\n\n"


def _finish_reason(req: GenRequest) -> str:
    return "length" if req.finish_reason is FinishReason.LENGTH else "stop"


def _model_card(name: str, created: float, record: PrefixRecord | None = None) -> dict:
    """OpenAI's model object, plus `prefix_server`: what this model is and how it takes prompts."""
    if record is None:
        extra = {"kind": "base_model", "chat": "chat_template"}
    else:
        frame = record.frame
        templated = frame is not None and frame.template is not None
        extra = {
            "kind": "task",
            "version": record.version,
            "num_virtual_tokens": record.num_virtual_tokens,
            "chat": "template" if templated else "chat_template",  # how /v1/chat/completions prompts it
            "frame": None if frame is None else frame.to_dict(),
        }
    card = {"id": name, "object": "model", "created": int(created), "owned_by": "prefix-server"}
    return {**card, "prefix_server": extra}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- errors ----
def _as_openai(e: Exception, caller: Caller | None = None) -> OpenAIError:
    """Any error of these routes as OpenAI reports it (422 is 400 in OpenAI's API); a tenant sees its
    task ids as it names them."""
    if isinstance(e, OpenAIError):
        return e
    if isinstance(e, ValidationError):
        return _from_validation(e)
    message = str(e) if caller is None else caller.visible_text(str(e))
    if isinstance(e, PrefixNotFound):  # deleted between lookup and submit
        return OpenAIError(404, message, param="model", code="model_not_found")
    if isinstance(e, PrefixServerError):
        status = status_for(e)
        return OpenAIError(400 if status == 422 else status, message, code=e.code)
    if isinstance(e, HTTPException):
        return OpenAIError(e.status_code, str(e.detail), code="http_error")
    log.error("unhandled error", exc_info=e)
    return OpenAIError(500, "internal server error", code="internal_error")


def error_response(e: Exception, request: Request) -> JSONResponse:
    """The JSON reply for an error of these routes; Retry-After on 429 and 503, as /generate does."""
    err = _as_openai(e, getattr(request.state, "caller", None))
    if err.status >= 500:
        log.error("server error: %s", err.message)
    headers = {"Retry-After": "1"} if err.status in (429, 503) else None
    if err.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _from_validation(e: ValidationError) -> OpenAIError:
    """A 400 naming each field at fault (param: the first), what it expects, and what arrived."""
    parts, params = [], []
    for err in e.errors():
        where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
        where = shown(where, quoted=False)  # dict keys are the client's: a field name may be long
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing":
            parts.append(f"{where}: required")
        else:
            parts.append(f"{where or 'body'}: {message} (got {shown_input(err.get('input'))})")
        params.append(where or None)
    return OpenAIError(400, "; ".join(parts), param=params[0], code="invalid_request")
