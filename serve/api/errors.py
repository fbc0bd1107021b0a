"""One JSON error envelope for every endpoint: `{"error": {"message", "type", "param", "code"}}`.

The HTTP layer's only error code: it maps the domain's `ServiceError` (serve/errors.py), storage errors,
FastAPI's validation errors and anything unexpected to the envelope.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from serve.api import zhipu
from serve.errors import ServiceError
from serve.storage import StorageError

log = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    503: "service_unavailable_error",
}


# StorageError subclasses carry their HTTP status; anything else from S3 means it is unreachable or refusing.
_STORAGE_ERRORS: dict[int, tuple[str, str]] = {
    404: ("not_found", "a stored object this request needs does not exist"),
    409: ("conflict", "the video was changed by a concurrent request; retry"),
}


# codes of the errors the framework raises itself (Starlette's HTTPException)
_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    431: "request_headers_too_large",
}


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(BaseModel):
    error: ErrorBody


def _encodable(text: str | None) -> str | None:
    """`text` as UTF-8 can carry it: a lone surrogate from a request (which the body checks refuse, but an error
    may quote input from anywhere) is written as its escape instead of failing the response with a 500."""
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_content(status: int, message: str, param: str | None = None, code: str | None = None,
                  path: str = "") -> dict[str, Any]:
    """The envelope's JSON: Zhipu's on its routes (`serve.api.zhipu`), OpenAI's everywhere else."""
    message, param = _encodable(message) or "", _encodable(param)
    if zhipu.is_zhipu_path(path):
        return zhipu.error_body(status, message, param, code)
    return ErrorEnvelope(error=ErrorBody(message=message, type=_TYPES.get(status, "api_error"), param=param,
                                         code=code)).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    return JSONResponse(status_code=status, content=error_content(status, message, param, code, path),
                        headers=headers)


def _param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers, request.url.path)

    @app.exception_handler(StorageError)
    async def _storage(request: Request, exc: StorageError) -> JSONResponse:
        # the exception names the bucket, key and endpoint: log it, answer without them
        log.warning("storage error: %s", exc)
        if exc.status_code in _STORAGE_ERRORS:
            code, message = _STORAGE_ERRORS[exc.status_code]
            return error_response(exc.status_code, message, code=code, path=request.url.path)
        return error_response(503, "the object store is unavailable; retry later", code="storage_unavailable",
                              headers={"Retry-After": "1"}, path=request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = _param_of(tuple(first.get("loc", ())))
        msg = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            msg = f"unknown field {param!r}; see GET /docs for accepted fields"
        elif param:
            msg = f"{param}: {msg}"
        return error_response(422, msg, param=param, code="invalid_value", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # what the framework raises itself (no route, wrong method, a form it could not parse)
        status = exc.status_code
        code = _HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal_error")
        return error_response(status, str(exc.detail), code=code, headers=getattr(exc, "headers", None),
                              path=request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error: %s", type(exc).__name__)
        return error_response(500, "internal error; the request was not applied", code="internal_error",
                              path=request.url.path)
