"""The one table from failures to HTTP: status, OpenAI error body, SSE error event.

Owns: `TABLE` (exception class → status and OpenAI `type`), the error body
`{"error": {"message", "type", "param", "code"}}`, and the FastAPI handlers
that use them for our exceptions, request-validation failures, unknown routes
and anything unexpected (500, the only status a client can never cause).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import errors as E

log = logging.getLogger("loraplex.api")

TABLE: dict[type[E.LoraplexError], tuple[int, str]] = {
    E.InvalidRequest: (400, "invalid_request_error"),
    E.Unauthorized: (401, "authentication_error"),
    E.Forbidden: (403, "permission_error"),
    E.NotFound: (404, "not_found_error"),
    E.RequestTimeout: (408, "timeout_error"),
    E.Conflict: (409, "conflict_error"),
    E.PayloadTooLarge: (413, "invalid_request_error"),
    E.InvalidAdapter: (422, "invalid_request_error"),
    E.Overloaded: (429, "rate_limit_error"),
    E.NotReady: (503, "service_unavailable_error"),
    E.StorageError: (503, "service_unavailable_error"),
}
_HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable_error"}


def body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(status, error body, extra headers) for any exception."""
    if isinstance(exc, E.LoraplexError):
        for cls in type(exc).__mro__:
            if cls in TABLE:
                status, type_ = TABLE[cls]
                break
        else:
            status, type_ = 500, "internal_error"
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, E.Overloaded) else {}
        return status, body(exc.message, type_, exc.param, exc.code), headers
    return 500, body(f"internal error: {type(exc).__name__}", "internal_error"), {}


def error_response(exc: BaseException) -> JSONResponse:
    status, content, headers = describe(exc)
    return JSONResponse(content, status_code=status, headers=headers)


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (part in {"str", "int", "float", "bool", "none"} or "[" in part
                                      or part[:1].isupper())


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if not errs:
        return "invalid request", None
    first = errs[0]
    loc = []
    for part in first.get("loc", ())[1:] if first.get("loc", ())[:1] == ("body",) else first.get("loc", ()):
        if _is_union_tag(part):  # pydantic names the union member tried; the field is what matters
            break
        loc.append(str(part))
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    more = f" (and {len(errs) - 1} more problems)" if len(errs) > 1 else ""
    where = f"{param}: " if param else ""
    return f"{where}{first.get('msg', 'invalid value')}{more}", param


def install(app: FastAPI) -> None:
    @app.exception_handler(E.LoraplexError)
    async def _ours(request: Request, exc: E.LoraplexError) -> Any:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Any:
        message, param = _validation_message(exc)
        return JSONResponse(body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        return JSONResponse(body(detail, _HTTP_TYPES.get(exc.status_code, "invalid_request_error")),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(exc)
