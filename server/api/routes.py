"""HTTP routes: authenticate, validate, hand to the scheduler or the registry, shape the reply.
Never runs the model. Task ids are translated between the caller's names and stored ids (auth.py)."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Request, Response, UploadFile
from fastapi.responses import StreamingResponse

from server.api.auth import Caller, get_caller
from server.api.disconnect import unless_disconnected
from server.api.logprobs import generate_entries
from server.api.schemas import (
    TASK_ID_PATH_PATTERN,
    TASK_ID_PATTERN,
    ErrorResponse,
    FrameStop,
    FromTextRequest,
    GenerateRequest,
    GenerateResponse,
    Health,
    PrefixInfo,
    PrefixList,
    PrefixStatus,
    Ready,
    StreamEvent,
    TokenLogprobInfo,
    Usage,
)
from server.errors import (
    ClientDisconnected,
    InvalidRequest,
    NotReady,
    PayloadTooLarge,
    PrefixFormatError,
    PrefixNotFound,
    PrefixServerError,
    Unauthorized,
)
from server.registry import frame as frame_limits
from server.registry.frame import TaskFrame
from server.request import Request as GenRequest
from server.request import SamplingParams
from server.threads import in_own_thread

router = APIRouter()
log = logging.getLogger(__name__)
CallerDep = Annotated[Caller, Depends(get_caller)]
# The pattern is in the OpenAPI schema too, so a client can tell a valid task id from the schema alone.
TaskIdForm = Annotated[str, Form(pattern=TASK_ID_PATTERN, description="1-64 of A-Za-z0-9._-")]
TaskIdPath = Annotated[
    str, Path(pattern=TASK_ID_PATH_PATTERN, description="1-64 of A-Za-z0-9._-, not '.' or '..'")
]

# An upload's prompt frame (server/registry/frame.py); its limits are in the schema too.
TemplateForm = Form(
    max_length=frame_limits.MAX_TEMPLATE_CHARS,
    description="the task's prompt, {input} exactly once where the input goes",
)
DescriptionForm = Form(max_length=frame_limits.MAX_DESCRIPTION_CHARS, description="what the task does")
MaxNewTokensForm = Form(
    ge=1, le=frame_limits.MAX_DEFAULT_NEW_TOKENS, description="default of requests that omit it"
)
StopForm = Form(
    max_length=frame_limits.MAX_STOP_STRINGS, description="default stop strings (repeat the field)"
)

_ERR = {"model": ErrorResponse}
ERRORS = {400: _ERR, 401: _ERR, 404: _ERR, 422: _ERR, 503: _ERR}
UPLOAD_ERRORS = {**ERRORS, 413: _ERR, 429: _ERR}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
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


def _looks_like_pickle(data: bytes, filename: str) -> bool:
    """torch.save's zip, or a raw pickle (PROTO opcode). A safetensors file has its JSON header at byte 8."""
    if filename.endswith(PICKLE_SUFFIXES) or data.startswith(b"PK\x03\x04"):
        return True
    return len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5 and data[8:9] != b"{"


def _state(request: Request):
    """The server state, or 503 while the model is loading (or failed to load) or shutting down."""
    state = request.app.state.server
    if not state.ready:
        if state.scheduler is not None:
            why = "shutting down"
        elif state.load_error:
            why = f"startup failed: {state.load_error}"
        else:
            why = "the model is still loading"
        raise NotReady(f"not ready: {why}")
    return state


def _info(record, caller: Caller) -> PrefixInfo:
    return PrefixInfo(**{**record.to_dict(), "task_id": caller.visible_id(record.task_id)})


@router.get("/health", response_model=Health, tags=["ops"])
async def health() -> Health:
    """The process is alive (it may still be loading the model)."""
    return Health(status="ok")


@router.get("/metrics", tags=["ops"], response_class=Response, responses={401: _ERR})
async def metrics(request: Request) -> Response:
    """Prometheus metrics. With API keys configured, an admin key is required (labels name tasks)."""
    state = request.app.state.server
    if not state.keyring.open and not (await get_caller(request)).admin:
        raise Unauthorized("metrics need an admin key")
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


@router.get("/ready", response_model=Ready, responses={503: _ERR}, tags=["ops"])
async def ready(request: Request) -> Ready:
    """The model is loaded and the server accepts work (its scheduler loop is running)."""
    state = _state(request)
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
    state = _state(request)
    try:
        req = _build_request(body, state, caller)  # looks the task up (its frame): 404 here
    except PrefixNotFound as e:  # counted as before frames existed, when the 404 came from submit
        state.metrics.refused(caller.stored_id(body.task_id), e.code)
        raise
    req.request_id = request.state.request_id  # the reply, the X-Request-ID header and the logs agree
    state.limits.begin_request(caller)  # rate and concurrency quotas
    try:
        state.scheduler.submit(req)  # 404 / 422 / 429 here, before any byte of a stream is sent
    except BaseException as e:
        req.error = e
        _finished(state, req, caller)
        raise
    if body.stream:
        return StreamingResponse(_sse(state, req, caller), media_type="text/event-stream")
    try:
        await unless_disconnected(request, _wait(state.scheduler, req))
    except ClientDisconnected as e:
        req.error = e  # logged and counted as the client's leaving
        raise
    finally:
        _finished(state, req, caller)
    return _reply(req, caller, state.components.engine.tokenizer)


async def _wait(scheduler, req: GenRequest) -> None:
    async for event in scheduler.events(req):
        if event.kind == "error":
            raise event.error


def _finished(state, req: GenRequest, caller: Caller) -> None:
    """Every generate request ends here once: quotas given back, metrics and a log line recorded."""
    state.limits.end_request(caller)
    status = "ok" if req.error is None else "error"
    if isinstance(req.error, PrefixServerError):
        status = req.error.code
    elif req.finish_reason is not None and req.finish_reason.value == "abort":
        status = "aborted"
    task = req.task_id or "__base__"
    state.metrics.observe(req, task, status)
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


def _build_request(body: GenerateRequest, state, caller: Caller) -> GenRequest:
    settings, engine = state.settings, state.components.engine
    task_id = caller.stored_id(body.task_id) if body.task_id is not None else None
    frame = task_frame(state, task_id)
    prompt = body.prompt if body.input is None else fill_input(frame, body.task_id, body.input)
    max_new_tokens = body.max_new_tokens or default_max_new_tokens(frame, settings.max_new_tokens, 64)
    if max_new_tokens > settings.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens must be <= {settings.max_new_tokens}, got {max_new_tokens}")
    prompt_ids = engine.tokenizer(prompt)["input_ids"]
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise InvalidRequest(
            f"prompt has {len(prompt_ids)} tokens, the limit is {settings.max_prompt_tokens}"
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    if body.stop is None and frame is not None:
        stop = frame.stop or ()
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
        logprobs=body.logprobs,
    )
    req = GenRequest(prompt_token_ids=prompt_ids, sampling=sampling, task_id=task_id, prompt=prompt)
    req.tenant, req.stream = caller.tenant, body.stream
    engine.validate(req)  # prompt and length checks now (the prefix is checked again when admitted)
    return req


def task_frame(state, stored_id: str | None) -> TaskFrame | None:
    """The prompt frame of a task's latest version (None for the base model or a task without one);
    PrefixNotFound (404) for an unknown task. A request admitted after an upload runs the newer
    version's prefix with the frame read here: hot swap is per request, frames included."""
    if stored_id is None:
        return None
    return state.components.registry.get(stored_id).frame


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


def default_max_new_tokens(frame: TaskFrame | None, server_limit: int, fallback: int) -> int:
    """A request's max_new_tokens when it gives none: the task's default (within the server's limit)."""
    if frame is not None and frame.max_new_tokens is not None:
        return min(frame.max_new_tokens, server_limit)
    return fallback


def frame_fields(
    template: str | None, description: str | None, max_new_tokens: int | None, stop: list[str] | None
) -> TaskFrame | None:
    """An upload's frame fields as a TaskFrame (None if it sets none); InvalidRequest (422) if invalid."""
    frame = TaskFrame(template, description, max_new_tokens, None if stop is None else tuple(stop))
    return None if frame.empty else frame


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


def _sse_line(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _sse(state, req: GenRequest, caller: Caller) -> AsyncIterator[str]:
    """One `data:` event per generated token, then a final `done` (or `error`) event."""
    tokenizer = state.components.engine.tokenizer
    num_sent = 0  # tokens sent: their logprobs are req.output_logprobs[:num_sent]
    try:
        async for event in state.scheduler.events(req):
            if event.kind == "token":
                ids = event.token_ids or []
                entries = req.output_logprobs[num_sent : num_sent + len(ids)]
                for i, token_id in enumerate(ids):
                    text = event.text if i == len(ids) - 1 else ""
                    line = {"type": "token", "token_id": token_id, "text": text}
                    if req.sampling.logprobs is not None:
                        line["logprobs"] = generate_entries(tokenizer, entries[i : i + 1])
                    yield _sse_line(line)
                num_sent += len(ids)
            elif event.kind == "error":
                yield _error_event(event.error, caller)
            else:
                yield _sse_line({"type": "done", **_reply(req, caller, tokenizer).model_dump()})
    except PrefixServerError as e:  # e.g. the request timeout
        req.error = req.error or e
        yield _error_event(e, caller)
    finally:
        _finished(state, req, caller)


def _error_event(err: BaseException, caller: Caller) -> str:
    """A stream's `error` event; a tenant sees its task ids as it names them."""
    code = err.code if isinstance(err, PrefixServerError) else "internal_error"
    return _sse_line({"type": "error", "error": {"code": code, "message": caller.visible_text(str(err))}})


async def _read_limited(upload: UploadFile | str, limit: int, what: str) -> bytes:
    data = upload.encode() if isinstance(upload, str) else await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{what} is larger than the limit of {limit} bytes")
    return data


def _store(state, caller: Caller, stored_id: str, new_bytes: int, put):
    """Quota check and write as one step per tenant (runs in a worker thread)."""
    registry = state.components.registry
    with state.limits.prefix_lock(caller):
        state.limits.check_prefix_quota(caller, registry.list(), stored_id, new_bytes)
        return put()


@router.post(
    "/prefixes", response_model=PrefixInfo, status_code=201, responses=UPLOAD_ERRORS, tags=["prefixes"]
)
async def upload_prefix(
    request: Request,
    caller: CallerDep,
    task_id: TaskIdForm,
    file: Annotated[UploadFile, File(description="a native prefix file or a PEFT adapter_model.safetensors")],
    # A file part, or a text part: `curl -F 'config=<adapter_config.json'` sends the JSON without a filename.
    config: Annotated[UploadFile | str | None, File(description="optional PEFT adapter_config.json")] = None,
    # Typed without None, so the schema offers no null (a form cannot send one); absent is None.
    template: Annotated[str, TemplateForm] = None,  # noqa: RUF013
    description: Annotated[str, DescriptionForm] = None,  # noqa: RUF013
    max_new_tokens: Annotated[int, MaxNewTokensForm] = None,  # noqa: RUF013
    stop: Annotated[list[FrameStop], StopForm] = None,  # noqa: RUF013
) -> PrefixInfo:
    """Add a task, or a new version of it (hot swap: new requests use it at once).

    A native file's prompt frame (template, description, max_new_tokens, stop) is kept; the form fields
    of the same names set or replace it."""
    state = _state(request)
    frame = frame_fields(template, description, max_new_tokens, stop)
    stored_id = caller.stored_id(task_id)
    data = await _read_limited(file, state.settings.max_upload_bytes, "file")
    if _looks_like_pickle(data, file.filename or ""):
        raise PrefixFormatError(
            "only safetensors prefix files are accepted; this looks like a pickle (.bin/.pt) and was not read"
        )
    config_bytes = await _read_limited(config, 1 << 20, "config") if config is not None else None
    registry = state.components.registry
    put = functools.partial(registry.upload, stored_id, data, config_bytes, frame)
    # parses tensors: not on a long-lived thread (see server/threads.py)
    record = await in_own_thread(_store, state, caller, stored_id, len(data), put)
    return _info(record, caller)


@router.post(
    "/prefixes/from-text",
    response_model=PrefixInfo,
    status_code=201,
    responses={**ERRORS, 429: _ERR},
    tags=["prefixes"],
)
async def prefix_from_text(body: FromTextRequest, request: Request, caller: CallerDep) -> PrefixInfo:
    """Make a task's prefix from an instruction text: its K/V under the base model (no training)."""
    state = _state(request)
    stored_id = caller.stored_id(body.task_id)
    frame = frame_fields(body.template, body.description, body.max_new_tokens, body.stop)
    engine, registry = state.components.engine, state.components.registry
    token_ids = engine.tokenizer(body.text)["input_ids"]
    prefix = await state.scheduler.run_exclusive(lambda: engine.encode_prefix(token_ids))
    put = functools.partial(registry.add, stored_id, prefix, "text", frame)
    record = await in_own_thread(_store, state, caller, stored_id, prefix.nbytes, put)
    return _info(record, caller)


@router.get("/prefixes", response_model=PrefixList, responses={401: _ERR, 503: _ERR}, tags=["prefixes"])
async def list_prefixes(request: Request, caller: CallerDep) -> PrefixList:
    """The latest version of every task the caller owns."""
    state = _state(request)
    records = [r for r in state.components.registry.list() if caller.owns(r.task_id)]
    return PrefixList(prefixes=[_info(r, caller) for r in records])


@router.get("/prefixes/{task_id}", response_model=PrefixStatus, responses=ERRORS, tags=["prefixes"])
async def get_prefix(task_id: TaskIdPath, request: Request, caller: CallerDep) -> PrefixStatus:
    """The task's latest version, and whether its K/V are resident in the engine's page pool."""
    state = _state(request)
    record = state.components.registry.get(caller.stored_id(task_id))
    resident = state.components.engine.is_resident((record.task_id, record.version, record.sha256))
    return PrefixStatus(**_info(record, caller).model_dump(), resident=resident)


@router.delete("/prefixes/{task_id}", status_code=204, responses=ERRORS, tags=["prefixes"])
async def delete_prefix(task_id: TaskIdPath, request: Request, caller: CallerDep) -> Response:
    """Delete a task: running requests finish on their version; new ones get 404."""
    state = _state(request)
    stored_id = caller.stored_id(task_id)
    await asyncio.to_thread(state.components.registry.delete, stored_id)
    return Response(status_code=204)
