"""Errors on the OpenAI-compatible routes, in OpenAI's shape: {"error": {message, type, param, code}}.
Every error of those routes passes `error_response`; the app-wide handlers (api/errors.py) are not involved."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from server.api.auth import Caller
from server.api.errors import HTTP_CODES, error_headers, shown_input, status_for
from server.errors import PrefixNotFound, PrefixServerError, shown

log = logging.getLogger(__name__)
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


class OpenAIError(Exception):
    """An error as OpenAI reports it: a status, a message, the parameter at fault and a code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = ERROR_TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---- errors ----
def as_openai(e: Exception, caller: Caller | None = None) -> OpenAIError:
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
        return OpenAIError(400 if status == 422 else status, message, param=e.param, code=e.code)
    if isinstance(e, HTTPException):
        return OpenAIError(e.status_code, str(e.detail), code=HTTP_CODES.get(e.status_code, "http_error"))
    log.error("unhandled error", exc_info=e)
    return OpenAIError(500, "internal server error", code="internal_error")


def error_response(e: Exception, request: Request) -> JSONResponse:
    """The JSON reply for an error of these routes; Retry-After on 429 and 503, as /generate does."""
    err = as_openai(e, getattr(request.state, "caller", None))
    if err.status >= 500:
        log.error("server error: %s", err.message)
    return JSONResponse(err.body(), status_code=err.status, headers=error_headers(err.status))


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
