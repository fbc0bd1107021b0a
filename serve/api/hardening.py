"""Request-header limits: a pure ASGI middleware in front of the app, refusing oversized header sets with a 431.

The HTTP server in front (Ray Serve's proxy, uvicorn) bounds a request line and its headers loosely or not at all;
this bounds the number of headers, one header's value and all headers together, before any route, auth or body
parsing runs. The refusal is the service's JSON error envelope (serve/api/errors.py).
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serve.api.errors import error_response

MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024  # names and values of all headers together
MAX_VALUE_BYTES = 8 * 1024  # one header's value


class HeaderLimits:
    """Answer 431 (`request_headers_too_large`) to an HTTP request with more than `max_headers` headers, a value
    longer than `max_value_bytes`, or more than `max_header_bytes` of names and values in all."""

    def __init__(self, app: ASGIApp, *, max_headers: int = MAX_HEADERS, max_header_bytes: int = MAX_HEADER_BYTES,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> None:
        for name, limit in (("max_headers", max_headers), ("max_header_bytes", max_header_bytes),
                            ("max_value_bytes", max_value_bytes)):
            if limit < 1:
                raise ValueError(f"{name} must be at least 1, not {limit}")
        self.app = app
        self.max_headers = max_headers
        self.max_header_bytes = max_header_bytes
        self.max_value_bytes = max_value_bytes

    def refusal(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why these headers are refused, or None."""
        if len(headers) > self.max_headers:
            return f"{len(headers)} request headers; at most {self.max_headers} are accepted"
        total = 0
        for name, value in headers:
            if len(value) > self.max_value_bytes:
                shown = name[:64].decode("latin-1")
                return f"header {shown!r} is {len(value)} bytes; at most {self.max_value_bytes} are accepted"
            total += len(name) + len(value)
        if total > self.max_header_bytes:
            return f"request headers are {total} bytes in all; at most {self.max_header_bytes} are accepted"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            why = self.refusal(scope["headers"])
            if why is not None:
                await error_response(431, why, code="request_headers_too_large")(scope, receive, send)
                return
        await self.app(scope, receive, send)
