"""OpenAI's Files API for fine-tuning data, as the official `openai` client calls it: POST /v1/files,
GET /v1/files, GET and DELETE /v1/files/{file_id}, GET /v1/files/{file_id}/content.

These routes only translate: the multipart form and the query -> the file store (server/finetune/files.py,
which checks the lines and the quota and writes crash-safely), its records -> OpenAI's File objects.
Each caller sees its own files: a tenant's (API keys), or in open mode and for admins the shared ones;
another tenant's file is a 404, as on every route. They need no model, so they answer while it loads.
Errors come in OpenAI's shape (api/openai_errors.py), like the other /v1 routes: bodies and queries are
read here, not by FastAPI, whose 422s have the server's own shape.
"""

from __future__ import annotations

import asyncio
from typing import Literal

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from server.api.auth import Caller, get_caller
from server.api.limits import read_limited
from server.api.openai_errors import OpenAIError, error_response
from server.api.openai_schemas import ErrorBody
from server.api.state import app_state
from server.errors import shown
from server.finetune.files import PURPOSES, SHARED_OWNER, FileRecord, FileStore
from server.finetune.training_file import CHAT, PROMPT_COMPLETION

router = APIRouter(prefix="/v1", tags=["files"])
_ERR = {"model": ErrorBody}
ERRORS = {s: _ERR for s in (400, 401, 404)}
UPLOAD_ERRORS = {**ERRORS, 413: _ERR, 429: _ERR, 503: _ERR, 507: _ERR}
MAX_FILENAME_CHARS = 255
INVALID = "invalid_request"  # the code of a 400 for a bad value, as api/openai_errors.py names it


class FileExtras(BaseModel):
    """What this server says of a file beyond OpenAI's fields."""

    shape: Literal["prompt_completion", "chat"] = Field(description="the shape of every line")
    num_examples: int


class FileObject(BaseModel):
    """OpenAI's File object (`status` is always processed: a file is checked before it is stored)."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(description="unix seconds")
    filename: str
    purpose: Literal["fine-tune"]
    status: Literal["processed"] = "processed"
    status_details: None = None
    expires_at: None = None
    prefix_server: FileExtras


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: Literal[True] = True


class _ListQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the query's strings: "5" is 5 here

    purpose: str | None = None
    limit: int = Field(10_000, ge=1, le=10_000)
    after: str | None = None
    order: Literal["asc", "desc"] = "desc"


def owner_of(caller: Caller) -> str:
    """Whose files a caller sees: its tenant's, or the shared ones (open mode, admins)."""
    return caller.tenant if caller.tenant is not None else SHARED_OWNER


def _file_object(record: FileRecord) -> FileObject:
    extras = FileExtras(shape=record.shape, num_examples=record.num_examples)
    fields = ("id", "bytes", "created_at", "filename", "purpose")
    return FileObject(**{name: getattr(record, name) for name in fields}, prefix_server=extras)


async def _caller_and_store(request: Request) -> tuple[str, FileStore]:
    caller = await get_caller(request)  # 401 without a valid key when keys are set
    return owner_of(caller), app_state(request).files


# ---- the OpenAPI of what these routes read themselves ----
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": f"JSONL: one {PROMPT_COMPLETION} or {CHAT} example per line",
                        },
                        "purpose": {"type": "string", "enum": list(PURPOSES)},
                    },
                }
            }
        },
    }
}
_LIST_QUERY = {
    "parameters": [
        {"name": "purpose", "in": "query", "required": False, "schema": {"type": "string"}},
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 10_000, "default": 10_000},
        },
        {
            "name": "after",
            "in": "query",
            "required": False,
            "schema": {"type": "string"},
            "description": "a file id of the previous page (its last_id): the files that follow it",
        },
        {
            "name": "order",
            "in": "query",
            "required": False,
            "schema": {"type": "string", "enum": ["asc", "desc"], "default": "desc"},
            "description": "by created_at",
        },
    ]
}
_CONTENT = {
    200: {
        "description": "the file's bytes, as uploaded",
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


# ---- routes ----
@router.post("/files", response_model=FileObject, responses=UPLOAD_ERRORS, openapi_extra=_UPLOAD_BODY)
async def create_file(request: Request):
    """Upload a fine-tuning file (multipart: `file`, `purpose` = fine-tune). Its lines are checked first
    (400 naming the first bad line, and nothing is stored); then the caller's quota of stored bytes."""
    try:
        owner, store = await _caller_and_store(request)
        kind = request.headers.get("content-type", "")
        if not kind.lower().startswith("multipart/form-data"):
            raise OpenAIError(
                400,
                "expected a multipart/form-data body with the fields file and purpose, got content-type "
                f"{shown(kind or 'none')}",
                code=INVALID,
            )
        async with request.form(max_files=1, max_fields=16) as form:
            _refuse_other_fields(form)
            purpose, upload = form.get("purpose"), form.get("file")
            if purpose not in PURPOSES:
                expected = " or ".join(repr(p) for p in PURPOSES)
                got = shown(purpose) if isinstance(purpose, str) else "a file part" if purpose else "none"
                raise OpenAIError(400, f"purpose must be {expected}, got {got}", "purpose", INVALID)
            if not isinstance(upload, UploadFile):
                got = "none" if upload is None else "a text field"
                raise OpenAIError(
                    400, f"file: expected a file part (with a filename), got {got}", "file", INVALID
                )
            filename = _filename(upload)
            data = await read_limited(upload, store.max_file_bytes, "file")
        record = await asyncio.to_thread(store.create, owner, filename, purpose, data)
        return _file_object(record)
    except Exception as e:
        return error_response(e, request)


@router.get("/files", response_model=FileList, responses=ERRORS, openapi_extra=_LIST_QUERY)
async def list_files(request: Request):
    """The caller's files, newest first (`order=asc`: oldest first); `after` = the previous page's last id."""
    try:
        owner, store = await _caller_and_store(request)
        query = _ListQuery.model_validate(dict(request.query_params))
        records, has_more = await asyncio.to_thread(
            store.list, owner, purpose=query.purpose, order=query.order, after=query.after, limit=query.limit
        )
        data = [_file_object(r) for r in records]
        first, last = (data[0].id, data[-1].id) if data else (None, None)
        return FileList(data=data, first_id=first, last_id=last, has_more=has_more)
    except Exception as e:
        return error_response(e, request)


@router.get("/files/{file_id}", response_model=FileObject, responses=ERRORS)
async def retrieve_file(file_id: str, request: Request):
    """One of the caller's files."""
    try:
        owner, store = await _caller_and_store(request)
        return _file_object(await asyncio.to_thread(store.get, owner, file_id))
    except Exception as e:
        return error_response(e, request)


@router.delete("/files/{file_id}", response_model=FileDeleted, responses={**ERRORS, 503: _ERR})
async def delete_file(file_id: str, request: Request):
    """Delete one of the caller's files (jobs that trained on it keep their copy of its examples)."""
    try:
        owner, store = await _caller_and_store(request)
        record = await asyncio.to_thread(store.delete, owner, file_id)
        return FileDeleted(id=record.id)
    except Exception as e:
        return error_response(e, request)


@router.get("/files/{file_id}/content", response_class=Response, responses={**ERRORS, **_CONTENT})
async def file_content(file_id: str, request: Request):
    """The file's bytes, as uploaded."""
    try:
        owner, store = await _caller_and_store(request)
        data = await asyncio.to_thread(store.content, owner, file_id)
        return Response(data, media_type="application/octet-stream")
    except Exception as e:
        return error_response(e, request)


# ---- request side ----
def _refuse_other_fields(form) -> None:
    """Fields other than file and purpose are refused, not ignored (as the other /v1 routes refuse them)."""
    for name in form:
        if name in ("file", "purpose"):
            continue
        param = shown(name, quoted=False)
        if name.startswith("expires_after"):
            message = f"{param} is not supported by this server: files are kept until deleted"
            raise OpenAIError(400, message, param=param, code="unsupported_parameter")
        raise OpenAIError(
            400, f"unrecognized request argument: {param}", param=param, code="unknown_parameter"
        )


def _filename(upload: UploadFile) -> str:
    """The part's file name, as the File object shows it; a name is never a path here."""
    filename = upload.filename or ""
    if len(filename) > MAX_FILENAME_CHARS:
        raise OpenAIError(
            400,
            f"file: the file name has {len(filename)} characters, the limit is {MAX_FILENAME_CHARS}",
            "file",
            INVALID,
        )
    return filename
