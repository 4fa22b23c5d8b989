"""OpenAI's fine-tuning jobs API, as the official `openai` client calls it: POST /v1/fine_tuning/jobs, GET
/v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs/{id}, POST /v1/fine_tuning/jobs/{id}/cancel and GET
/v1/fine_tuning/jobs/{id}/events.

These routes only translate: the body -> a JobRequest for server/finetune/manager.py, its job records ->
OpenAI's objects. A job trains a prefix on the base model (`model` must name it) from the caller's files;
when it succeeds its `fine_tuned_model` is a new task of the caller's, usable as `model` at once. Errors
come in OpenAI's shape (api/openai_errors.py), like the other /v1 routes.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from server.api.auth import get_caller
from server.api.files import owner_of
from server.api.openai_errors import OpenAIError, error_response
from server.api.openai_schemas import ErrorBody
from server.api.state import serving
from server.errors import NotReady, shown
from server.finetune.jobs import Hyperparameters
from server.finetune.manager import JobRequest

router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])
_ERR = {"model": ErrorBody}
ERRORS = {s: _ERR for s in (400, 401, 404, 503)}
Auto = Literal["auto"]


class HyperparametersBody(BaseModel):
    """OpenAI's hyperparameters ("auto": this server's default), and num_virtual_tokens."""

    model_config = ConfigDict(strict=True, extra="forbid")

    n_epochs: int | Auto = "auto"
    batch_size: int | Auto = "auto"
    learning_rate_multiplier: float | int | Auto = "auto"
    num_virtual_tokens: int | Auto = "auto"

    @field_validator("*", mode="plain")
    @classmethod
    def _number_or_auto(cls, value: object, info: ValidationInfo) -> object:
        number = (float, int) if info.field_name == "learning_rate_multiplier" else (int,)
        if value == "auto" or (isinstance(value, number) and not isinstance(value, bool)):
            return value
        kind = "a number" if float in number else "an integer"
        raise ValueError(f"expected {kind} or 'auto', got {shown(value)}")

    def checked(self) -> Hyperparameters:
        given = {k: v for k, v in self.model_dump().items() if v != "auto"}
        return Hyperparameters(**given)


class _Supervised(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    hyperparameters: HyperparametersBody | None = None


class MethodBody(BaseModel):
    """OpenAI's `method`: only supervised training (of a prefix) is offered."""

    model_config = ConfigDict(strict=True, extra="forbid")
    type: Literal["supervised"]
    supervised: _Supervised | None = None


class JobBody(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(min_length=1, description="the base model's name (GET /v1/models lists it first)")
    training_file: str = Field(min_length=1, description="a file id from POST /v1/files")
    validation_file: str | None = Field(None, description="held-out examples: the job's score is on them")
    suffix: str | None = Field(None, description="1-40 of A-Za-z0-9_-, part of the new task's name")
    seed: int | None = Field(None, ge=0, lt=2**31)
    hyperparameters: HyperparametersBody | None = None
    method: MethodBody | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = Field(None, max_length=0, description="none are offered")

    def job_request(self) -> JobRequest:
        hp = self.hyperparameters
        if self.method is not None and self.method.supervised is not None:
            if hp is not None and self.method.supervised.hyperparameters is not None:
                raise OpenAIError(
                    400,
                    "give hyperparameters once: at the top level or in method.supervised",
                    "hyperparameters",
                )
            hp = hp or self.method.supervised.hyperparameters
        return JobRequest(
            model=self.model,
            training_file=self.training_file,
            validation_file=self.validation_file,
            suffix=self.suffix,
            seed=self.seed,
            hyperparameters=(hp or HyperparametersBody()).checked(),
        )


class _Page(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the query's strings: "5" is 5 here
    after: str | None = None
    limit: int = Field(20, ge=1, le=1000)


async def _context(request: Request):
    """(the caller, its owner name, the jobs); 503 while the model loads: jobs train on it."""
    caller = await get_caller(request)
    state = serving(request)
    if state.fine_tuning is None:
        raise NotReady("fine-tuning is not running on this server")
    return caller, owner_of(caller), state


@router.post("/jobs", responses=ERRORS | {429: _ERR})
async def create_job(request: Request):
    """Create a job that trains a prefix from the caller's training file; queued, then run in turn."""
    try:
        caller, owner, state = await _context(request)
        try:
            raw = await request.json()
        except ValueError as e:
            raise OpenAIError(400, f"the body is not valid JSON: {e}", code="malformed_json") from e
        body = JobBody.model_validate(raw)
        job_request = body.job_request()
        base = state.components.model_name
        if job_request.model != base:
            raise OpenAIError(
                400,
                f"model must be the base model {base!r} (a prefix trains on it), got {shown(job_request.model)}",
                "model",
                "model_not_found",
            )
        name = f"ft-{job_request.suffix + '-' if job_request.suffix else ''}{secrets.token_hex(4)}"
        task_id = caller.stored_id(name)
        return await asyncio.to_thread(
            state.fine_tuning.create, owner, job_request, task_id=task_id, task_name=name
        )
    except Exception as e:
        return error_response(e, request)


@router.get("/jobs", responses=ERRORS)
async def list_jobs(request: Request):
    """The caller's jobs, newest first; `after` = the previous page's last id."""
    try:
        _, owner, state = await _context(request)
        page = _Page.model_validate(dict(request.query_params))
        jobs, more = await asyncio.to_thread(
            state.fine_tuning.list, owner, after=page.after, limit=page.limit
        )
        return {"object": "list", "data": jobs, "has_more": more}
    except Exception as e:
        return error_response(e, request)


@router.get("/jobs/{fine_tuning_job_id}", responses=ERRORS)
async def retrieve_job(fine_tuning_job_id: str, request: Request):
    try:
        _, owner, state = await _context(request)
        return await asyncio.to_thread(state.fine_tuning.get, owner, fine_tuning_job_id)
    except Exception as e:
        return error_response(e, request)


@router.post("/jobs/{fine_tuning_job_id}/cancel", responses=ERRORS)
async def cancel_job(fine_tuning_job_id: str, request: Request):
    """Cancel a queued or running job (a running one stops before its next step; nothing is registered)."""
    try:
        _, owner, state = await _context(request)
        return await asyncio.to_thread(state.fine_tuning.cancel, owner, fine_tuning_job_id)
    except Exception as e:
        return error_response(e, request)


@router.get("/jobs/{fine_tuning_job_id}/events", responses=ERRORS)
async def list_events(fine_tuning_job_id: str, request: Request):
    """The job's events, newest first: its steps with their training loss, the held-out score, the end."""
    try:
        _, owner, state = await _context(request)
        page = _Page.model_validate(dict(request.query_params))
        events, more = await asyncio.to_thread(
            state.fine_tuning.events, owner, fine_tuning_job_id, after=page.after, limit=page.limit
        )
        return {"object": "list", "data": events, "has_more": more}
    except Exception as e:
        return error_response(e, request)
