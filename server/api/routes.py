"""The native HTTP routes: /health, /ready, /metrics and POST /generate (one JSON reply, or server-sent
events with `stream`). /generate only translates its body to the generation service's terms
(api/service.py) and the service's events back to its reply; the prefix routes are in api/prefixes.py."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse

from server.api.auth import Caller, get_caller
from server.api.logprobs import generate_entries
from server.api.prefixes import ERRORS, CallerDep
from server.api.schemas import (
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    Health,
    Ready,
    StreamEvent,
    TokenLogprobInfo,
    Usage,
)
from server.api.service import GenerationService, frame_of, sse
from server.api.state import app_state, serving
from server.errors import InvalidRequest, NotReady, PrefixNotFound, PrefixServerError, Unauthorized
from server.registry.frame import TaskFrame
from server.request import Request as GenRequest

router = APIRouter()
_ERR = {"model": ErrorResponse}
DEFAULT_MAX_NEW_TOKENS = 64  # when neither the request nor its task sets max_new_tokens
# One server-sent event, as OpenAPI 3.2 describes a text/event-stream item: its `data` is a StreamEvent
# as JSON. Inline: no route returns StreamEvent as its model, so FastAPI would not put it in the
# components and a $ref to it would dangle. Its own refs (Usage, ErrorDetail) are components through
# GenerateResponse and ErrorResponse.
_STREAM_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {
                k: v
                for k, v in StreamEvent.model_json_schema(ref_template="#/components/schemas/{model}").items()
                if k != "$defs"
            },
        }
    },
}


@router.get("/health", response_model=Health, tags=["ops"])
async def health() -> Health:
    """The process is alive (it may still be loading the model)."""
    return Health(status="ok")


@router.get("/metrics", tags=["ops"], response_class=Response, responses={401: _ERR})
async def metrics(request: Request) -> Response:
    """Prometheus metrics. With API keys configured, an admin key is required (labels name tasks)."""
    state = app_state(request)
    if not state.keyring.open and not (await get_caller(request)).admin:
        raise Unauthorized("metrics need an admin key")
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/ready", response_model=Ready, responses={503: _ERR}, tags=["ops"])
async def ready(request: Request) -> Ready:
    """The model is loaded and the server accepts work (its scheduler loop is running)."""
    state = serving(request)
    if not state.scheduler.loop_running:
        raise NotReady("not ready: the scheduler loop stopped; see the server log")
    return Ready(status="ready", model=state.components.model_name)


@router.post(
    "/generate",
    response_model=GenerateResponse,
    responses={
        **ERRORS,
        429: _ERR,
        504: _ERR,
        200: {
            "description": "the reply; with `stream: true`, server-sent events instead (see StreamEvent)",
            "content": {"text/event-stream": {"schema": _STREAM_EVENT_SCHEMA}},
        },
    },
    tags=["generate"],
)
async def generate(body: GenerateRequest, request: Request, caller: CallerDep):
    """Generate text for one prompt, with the task's current prefix (or the base model)."""
    state = serving(request)
    service = GenerationService(state)
    try:
        record = service.find_task(caller, body.task_id)  # its frame is needed to build the prompt: 404 here
    except PrefixNotFound as e:
        state.metrics.refused(caller.stored_id(body.task_id), e.code)
        raise
    frame = frame_of(record)
    prompt = body.prompt if body.input is None else fill_input(frame, body.task_id, body.input)
    max_new_tokens = body.max_new_tokens or service.task_max_new_tokens(record) or DEFAULT_MAX_NEW_TOKENS
    sampling = service.sampling(record, body, max_new_tokens=max_new_tokens, logprobs=body.logprobs)
    prompt_ids = await service.tokenize(prompt)
    # the reply, the X-Request-ID header and the logs agree on the id
    requests = service.build(
        caller, record, [prompt_ids], sampling, request_id=request.state.request_id, stream=body.stream
    )
    service.submit(caller, requests)
    if body.stream:
        return StreamingResponse(_stream(service, requests[0], caller), media_type="text/event-stream")
    await service.wait(request, caller, requests)
    return _reply(requests[0], caller, service.engine.tokenizer)


def fill_input(frame: TaskFrame | None, task_name: str | None, text: str) -> str:
    """`text` filled into the task's template; InvalidRequest saying what to do when there is none."""
    if task_name is None:
        raise InvalidRequest(
            "input needs a task with a template (task_id); for the base model send the whole text as prompt"
        )
    if frame is None or frame.template is None:
        raise InvalidRequest(
            f"task {task_name!r} has no template to fill input into: send the whole text as prompt, or "
            "upload the task again with a template (e.g. form field template='Review: {input}\\nSentiment:')"
        )
    return frame.fill(text)


def _reply(req: GenRequest, caller: Caller, tokenizer) -> GenerateResponse:
    logprobs = None
    if req.sampling.logprobs is not None:
        logprobs = [TokenLogprobInfo(**e) for e in generate_entries(tokenizer, req.output_logprobs)]
    return GenerateResponse(
        request_id=req.request_id,
        task_id=caller.visible_id(req.task_id) if req.task_id is not None else None,
        prefix_version=req.prefix_version,
        text=req.text,
        token_ids=req.output_token_ids,
        finish_reason=req.finish_reason.value,
        usage=Usage(prompt_tokens=req.num_prompt_tokens, completion_tokens=len(req.output_token_ids)),
        logprobs=logprobs,
    )


async def _stream(service: GenerationService, req: GenRequest, caller: Caller) -> AsyncIterator[str]:
    """One `data:` event per generated token, then a final `done` (or `error`) event."""
    tokenizer = service.engine.tokenizer
    num_sent = 0  # tokens sent: their logprobs are req.output_logprobs[:num_sent]
    try:
        async for _, event in service.events([req]):
            if event.kind == "token":
                ids = event.token_ids or []
                entries = req.output_logprobs[num_sent : num_sent + len(ids)]
                for i, token_id in enumerate(ids):
                    text = event.text if i == len(ids) - 1 else ""
                    line = {"type": "token", "token_id": token_id, "text": text}
                    if req.sampling.logprobs is not None:
                        line["logprobs"] = generate_entries(tokenizer, entries[i : i + 1])
                    yield sse(line)
                num_sent += len(ids)
            elif event.kind == "error":
                yield _error_event(event.error, caller)
            else:
                yield sse({"type": "done", **_reply(req, caller, tokenizer).model_dump()})
    finally:
        service.finish(caller, [req])


def _error_event(err: BaseException, caller: Caller) -> str:
    """A stream's `error` event; a tenant sees its task ids as it names them."""
    code = err.code if isinstance(err, PrefixServerError) else "internal_error"
    return sse({"type": "error", "error": {"code": code, "message": caller.visible_text(str(err))}})
