"""The prefix routes: upload a task (a prefix file, or a text to encode), list, look up and delete tasks.
Task ids are translated between the caller's names and stored ids (auth.py); quotas are per tenant."""

from __future__ import annotations

import asyncio
import functools
from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Path, Request, Response, UploadFile

from server.api.auth import Caller, get_caller
from server.api.limits import read_limited
from server.api.schemas import (
    TASK_ID_PATH_PATTERN,
    TASK_ID_PATTERN,
    ErrorResponse,
    FrameStop,
    FromTextRequest,
    PrefixInfo,
    PrefixList,
    PrefixStatus,
)
from server.api.state import serving
from server.errors import PrefixFormatError
from server.registry import frame as frame_limits
from server.registry.frame import TaskFrame
from server.threads import in_own_thread

router = APIRouter()
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


def _looks_like_pickle(data: bytes, filename: str) -> bool:
    """torch.save's zip, or a raw pickle (PROTO opcode). A safetensors file has its JSON header at byte 8."""
    if filename.endswith(PICKLE_SUFFIXES) or data.startswith(b"PK\x03\x04"):
        return True
    return len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5 and data[8:9] != b"{"


def _info(record, caller: Caller) -> PrefixInfo:
    return PrefixInfo(**{**record.to_dict(), "task_id": caller.visible_id(record.task_id)})


def frame_fields(
    template: str | None, description: str | None, max_new_tokens: int | None, stop: list[str] | None
) -> TaskFrame | None:
    """An upload's frame fields as a TaskFrame (None if it sets none); InvalidRequest (422) if invalid."""
    frame = TaskFrame(template, description, max_new_tokens, None if stop is None else tuple(stop))
    return None if frame.empty else frame


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
    state = serving(request)
    frame = frame_fields(template, description, max_new_tokens, stop)
    stored_id = caller.stored_id(task_id)
    data = await read_limited(file, state.settings.max_upload_bytes, "file")
    if _looks_like_pickle(data, file.filename or ""):
        raise PrefixFormatError(
            "only safetensors prefix files are accepted; this looks like a pickle (.bin/.pt) and was not read"
        )
    config_bytes = await read_limited(config, 1 << 20, "config") if config is not None else None
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
    state = serving(request)
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
    state = serving(request)
    records = [r for r in state.components.registry.list() if caller.owns(r.task_id)]
    return PrefixList(prefixes=[_info(r, caller) for r in records])


@router.get("/prefixes/{task_id}", response_model=PrefixStatus, responses=ERRORS, tags=["prefixes"])
async def get_prefix(task_id: TaskIdPath, request: Request, caller: CallerDep) -> PrefixStatus:
    """The task's latest version, and whether its K/V are resident in the engine's page pool."""
    state = serving(request)
    record = state.components.registry.get(caller.stored_id(task_id))
    resident = state.components.engine.is_resident((record.task_id, record.version, record.sha256))
    return PrefixStatus(**_info(record, caller).model_dump(), resident=resident)


@router.delete("/prefixes/{task_id}", status_code=204, responses=ERRORS, tags=["prefixes"])
async def delete_prefix(task_id: TaskIdPath, request: Request, caller: CallerDep) -> Response:
    """Delete a task: running requests finish on their version; new ones get 404."""
    state = serving(request)
    stored_id = caller.stored_id(task_id)
    await asyncio.to_thread(state.components.registry.delete, stored_id)
    return Response(status_code=204)
