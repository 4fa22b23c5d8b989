"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

`model` selects the prefix, as vLLM, LoRAX and SGLang select an adapter: a task id, or the base model's
name for none. These routes only translate: OpenAI's body -> the generation service (api/service.py: the
same path /generate takes, a Request per choice), its events -> OpenAI's objects (api/openai_reply.py),
so choices of any task batch with everything else. Errors come in OpenAI's shape (api/openai_errors.py).
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from server.api.auth import Caller, get_caller
from server.api.errors import json_error_message
from server.api.openai_errors import OpenAIError, error_response
from server.api.openai_reply import Reply, model_card
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
from server.api.service import GenerationService, frame_of
from server.api.state import ServerState, serving
from server.errors import InvalidRequest, PrefixNotFound, shown
from server.registry.store import PrefixRecord

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1", tags=["openai"])
_ERR = {"model": ErrorBody}
ERRORS = {s: _ERR for s in (400, 401, 404, 413, 429, 500, 503, 504)}
STARTED = int(time.time())  # the base model's `created`
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---- who calls, and which tasks they see (api/auth.py: API keys -> tenants, namespaced task ids) ----
@dataclass(frozen=True)
class Call:
    """Who asks: the server state, the authenticated caller, and the id its log lines carry."""

    state: ServerState
    service: GenerationService
    caller: Caller
    request_id: str  # X-Request-ID
    http: Request  # the HTTP request: a plain reply is aborted when its client leaves


async def _call(request: Request) -> Call:
    """Who calls: 401 without a valid key when keys are set, then 503 while the model loads."""
    caller = await get_caller(request)
    request_id = getattr(request.state, "request_id", None) or uuid.uuid4().hex[:16]
    state = serving(request)
    return Call(state, GenerationService(state), caller, request_id, request)


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
        return call.service.find_task(call.caller, model)
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


# ---- routes ----
@router.get("/models", responses=ERRORS)
async def list_models(request: Request):
    """The base model (no prefix) and every task, each usable as `model`."""
    try:
        call = await _call(request)
        cards = [model_card(call.state.components.model_name, STARTED)]
        cards += [model_card(name, record.created_at, record) for name, record in _visible_tasks(call)]
        return {"object": "list", "data": cards}
    except Exception as e:
        return error_response(e, request)


@router.get("/models/{model}", responses=ERRORS)
async def get_model(model: str, request: Request):
    """One model: the base model or one of the caller's tasks."""
    try:
        record = _find_task(await _call(request), model)
        return model_card(model, STARTED if record is None else record.created_at, record)
    except Exception as e:
        return error_response(e, request)


@router.post("/completions", responses={**ERRORS, 200: _STREAMED}, openapi_extra=_body(CompletionRequest))
async def completions(request: Request):
    """Complete prompts with a task's prefix (`model` = task id) or the base model; SSE with `stream`.

    The prompt is used as given, also for a task with a template (this is the raw route: send the
    filled template, or use /v1/chat/completions, which fills it); a task's default max_tokens and
    stop apply when the request gives none. A prompt may be token ids, as OpenAI's API allows."""
    try:
        call = await _call(request)
        body = await _parse(request, CompletionRequest, COMPLETION_FIELDS)
        record = _find_task(call, body.model)
        prompts = await _completion_prompts(call.service, body.prompt)
        max_tokens = (
            body.max_tokens or call.service.task_max_new_tokens(record) or COMPLETION_DEFAULT_MAX_TOKENS
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
        service = call.service
        body = await _parse(request, ChatCompletionRequest, CHAT_FIELDS)
        record = _find_task(call, body.model)
        frame = frame_of(record)
        if frame is not None and frame.template is not None:
            prompt_ids = await service.tokenize(frame.fill(_last_user_text(body.messages)))
        else:
            prompt_ids = await service.off_loop(_chat_prompt_ids, service.engine.tokenizer, body.messages)
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = body.max_completion_tokens or body.max_tokens or service.task_max_new_tokens(record)
        if max_tokens is None:  # as much as the context leaves, up to the server's limit
            room = service.context_room(record, len(prompt_ids))
            max_tokens = max(1, min(call.state.settings.max_new_tokens, room))  # room < 1: build says why
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


async def _completion_prompts(service: GenerationService, prompt) -> list[list[int]]:
    """Token ids of each prompt: strings are tokenized as /generate does, token id lists kept."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if all(isinstance(p, str) for p in prompt):
        return [await service.tokenize(p) for p in prompt]
    if all(isinstance(t, int) for t in prompt):
        return [list(prompt)]
    return [list(p) for p in prompt]


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
    """The conversation through the model's chat template (runs off the event loop)."""
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


async def _run(call: Call, body, record, prompts, max_tokens: int, param: str, *, chat: bool):
    """Submit every choice (all or none), then answer: one reply, or SSE chunks as tokens come.

    Each choice is a request to the scheduler, to the tenant's quotas and to the metrics, as n calls of
    /generate would be."""
    service = call.service
    sampling = service.sampling(record, body, max_new_tokens=max_tokens, logprobs=body.num_top_logprobs)
    requests = service.build(
        call.caller,
        record,
        prompts,
        sampling,
        request_id=call.request_id,  # X-Request-ID, then the choice
        n=body.n,
        stream=body.stream,
        numbered=True,
        max_tokens_param=param,
    )
    service.submit(call.caller, requests)
    num_prompt_tokens = sum(len(p) for p in prompts)
    reply = Reply(body.model, chat, requests, num_prompt_tokens, call.caller, service.engine.tokenizer)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(reply.stream(service, include_usage), media_type="text/event-stream")
    await service.wait(call.http, call.caller, requests)
    return reply.full()
