"""Domain errors -> HTTP status codes, in one place. Every error body is {"error": {"code", "message"}}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.errors import (
    InsufficientStorage,
    InvalidRequest,
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
    Unauthorized,
    UnsupportedModel,
)

log = logging.getLogger(__name__)

STATUS_CODES: dict[type[PrefixServerError], int] = {
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
}


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def status_for(error: PrefixServerError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]
    return 500


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    got = err.get("input")
    shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{where}: {err.get('msg', 'invalid')} (got {shown})"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(PrefixServerError)
    async def _domain(_: Request, exc: PrefixServerError) -> JSONResponse:
        status = status_for(exc)
        if status == 500:  # 503 (loading, draining) and 504 (timeout) are expected states, not faults
            log.error("server error: %s", exc)
        headers = {"Retry-After": "1"} if status in (429, 503) else None
        if status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return error_response(status, exc.code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "malformed_json", "request body is not valid JSON")
        return error_response(422, "invalid_request", "; ".join(_describe(e) for e in errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "bad_request",
            404: "not_found",
            405: "method_not_allowed",
            413: "payload_too_large",
        }.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return error_response(500, "internal_error", "internal server error")
