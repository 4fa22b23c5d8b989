"""Domain errors -> HTTP status codes, in one place. Every error body is {"error": {"code", "message"}}."""

from __future__ import annotations

import json
import logging
import sys

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import (
    ClientDisconnected,
    FileNotFound,
    InsufficientStorage,
    InvalidRequest,
    JobNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    PrefixFormatError,
    PrefixNotFound,
    PrefixServerError,
    QuotaExceeded,
    RequestTimeout,
    StoreReadOnly,
    StoreUnavailable,
    TrainingDataError,
    Unauthorized,
    UnsupportedModel,
    shown,
)

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[PrefixServerError], int] = {
    ClientDisconnected: 499,
    InvalidRequest: 422,
    PrefixFormatError: 422,
    PrefixNotFound: 404,
    PayloadTooLarge: 413,
    Overloaded: 429,
    NotReady: 503,
    Unauthorized: 401,
    QuotaExceeded: 429,
    RequestTimeout: 504,
    UnsupportedModel: 500,
    InsufficientStorage: 507,
    StoreReadOnly: 503,
    StoreUnavailable: 503,
    TrainingDataError: 422,
    FileNotFound: 404,
    JobNotFound: 404,
}
# Starlette's own errors (routing, form parsing, the body limits in limits.py): their codes.
HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def error_headers(status: int) -> dict | None:
    """The headers an error reply carries, on every route: when to retry, or how to authenticate."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    return {"Retry-After": "1"} if status in (429, 503) else None


def status_for(error: PrefixServerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 500


def shown_input(value: object) -> str:
    """An input that failed validation as a message quotes it: capped (`shown`); an object or a list by
    its type; a file part by its name and size (its repr holds the raw part headers, Latin-1 mojibake)."""
    if isinstance(value, UploadFile):
        return f"a file part named {shown(value.filename)} ({value.size} bytes)"
    return type(value).__name__ if isinstance(value, (dict, list)) else shown(value)


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    message = err.get("msg", "invalid").removeprefix("Value error, ")
    return f"{shown(where, quoted=False)}: {message} (got {shown_input(err.get('input'))})"


def json_error_message(e: BaseException) -> str:
    """What made a request body unreadable as JSON (400 malformed_json): syntax, bytes that are not
    UTF-8, nesting deeper than the parser goes, or an integer longer than Python converts."""
    if isinstance(e, json.JSONDecodeError):
        return f"request body is not valid JSON: {e.msg} at character {e.pos}"
    if isinstance(e, UnicodeDecodeError):
        return (
            f"request body is not valid JSON: expected UTF-8 text, got byte 0x{e.object[e.start]:02x} "
            f"at offset {e.start} ({e.reason})"
        )
    if isinstance(e, RecursionError):
        return "request body cannot be parsed as JSON: arrays or objects are nested too deeply"
    if "integer string conversion" in str(e):
        limit = sys.get_int_max_str_digits()
        return (
            f"request body cannot be parsed as JSON: integers may have at most {limit} digits, one has more"
        )
    return f"request body is not valid JSON: {shown(str(e), quoted=False)}"


def _is_form(request: Request) -> bool:
    kind = request.headers.get("content-type", "").lower()
    return kind.startswith(("multipart/", "application/x-www-form-urlencoded"))


def _not_json(request: Request, errors: list[dict]) -> bool:
    """A JSON route's body arrived as raw bytes: it was not sent as application/json."""
    kind = request.headers.get("content-type", "").lower()
    return "json" not in kind and any(
        tuple(e.get("loc", ())) == ("body",) and isinstance(e.get("input"), (bytes, str)) for e in errors
    )


def _known_tasks(request: Request) -> str:
    """For a 404 on a task: the tasks this caller can use (a few), so a typo is easy to see."""
    caller = getattr(request.state, "caller", None)
    components = getattr(getattr(request.app.state, "server", None), "components", None)
    if caller is None or components is None:
        return ""
    try:
        names = sorted(
            caller.visible_id(r.task_id) for r in components.registry.list() if caller.owns(r.task_id)
        )
    except PrefixServerError:  # e.g. the store is unreachable: the 404 stands alone
        return ""
    if not names:
        return "; there are no tasks yet (POST /prefixes uploads one)"
    more = f", ... ({len(names)} in all)" if len(names) > 10 else ""
    return f"; known tasks: {', '.join(names[:10])}{more} (GET /prefixes lists them)"


def _caller_message(request: Request, message: str) -> str:
    """The message as the caller names things: a tenant sees its task ids without the namespace."""
    caller = getattr(request.state, "caller", None)
    return message if caller is None else caller.visible_text(message)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PrefixServerError)
    async def _domain(request: Request, exc: PrefixServerError) -> JSONResponse:
        status = status_for(exc)
        if status == 500:  # 503 (loading, draining) and 504 (timeout) are expected states, not faults
            log.error("server error: %s", exc)
        message = _caller_message(request, str(exc))
        if isinstance(exc, PrefixNotFound):
            message += _known_tasks(request)
        return error_response(status, exc.code, message, error_headers(status))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        for e in errors:
            if e.get("type") == "json_invalid":
                at = e["loc"][-1] if e.get("loc") else "?"
                detail = e.get("ctx", {}).get("error", "invalid")
                return error_response(
                    400, "malformed_json", f"request body is not valid JSON: {detail} at character {at}"
                )
        if _not_json(request, errors):
            kind = request.headers.get("content-type") or "none"
            return error_response(
                422,
                "invalid_request",
                f"expected a JSON object body with content-type: application/json, got content-type "
                f"{shown(kind)} (curl -d sends application/x-www-form-urlencoded unless given "
                "-H 'content-type: application/json')",
            )
        return error_response(422, "invalid_request", "; ".join(_describe(e) for e in errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        cause = exc.__cause__
        if (
            exc.status_code == 400
            and isinstance(cause, (ValueError, RecursionError))
            and not _is_form(request)
        ):
            # FastAPI's 400 "error parsing the body" for what its JSON decoding does not report itself
            return error_response(400, "malformed_json", json_error_message(cause))
        code = HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
