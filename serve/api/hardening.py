"""Request limits: pure ASGI middleware in front of the app, refusing oversized header sets (431) and bodies (413).

The HTTP server in front (Ray Serve's proxy, uvicorn) bounds a request line and its headers loosely or not at all,
and a body not at all. `HeaderLimits` bounds the number of headers, one header's value and all headers together;
`BodyLimit` bounds the body's bytes while it streams in. Both answer before any route, auth or body parsing runs
(a body is refused from its Content-Length at once, or the moment a chunked body passes the cap), and the refusal
is the service's JSON error envelope (serve/api/errors.py). The front proxy the k8s manifests ship
(k8s/base/proxy.yaml) applies the same body cap and the timeouts an ASGI app cannot: reading the headers, the body.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.api.errors import error_response

MAX_HEADERS = 100
MAX_HEADER_BYTES = 32 * 1024  # names and values of all headers together
MAX_VALUE_BYTES = 8 * 1024  # one header's value
# A create request is a small JSON or multipart form (a prompt: at most body.MAX_FIELD_BYTES per field, in practice
# a few KiB). The cap leaves room for an image-to-video reference image of up to 20 MiB as a multipart file, plus
# the other fields and multipart framing; the same number is client_max_body_size in k8s/base/proxy-nginx.conf
# (the tests compare them). A base64 image in JSON would need a third more: raise both then.
MAX_BODY_BYTES = 25 * 1024 * 1024


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
                await error_response(431, why, code="request_headers_too_large",
                                     path=scope.get("path", ""))(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyTooLarge(Exception):
    """Raised into the app from `receive` once the body passes the cap; `BodyLimit` turns it into the 413."""


class BodyLimit:
    """Answer 413 (`request_too_large`) to an HTTP request whose body is longer than `max_body_bytes`: at once when
    its Content-Length says so, else as soon as the bytes received pass the cap (a chunked body, or one longer
    than it declared). The app reads the body through `receive`, so a request the app refuses first (a 401, a 404)
    is answered without its body being read at all.

    The refusal replaces whatever the app answers after the cap was passed (an app may catch the error `receive`
    raises and render its own 400, as FastAPI does for body parameters), unless its response had already started;
    then the connection is cut instead. It says `Connection: close`: the rest of the body is never read."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int = MAX_BODY_BYTES) -> None:
        if max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be at least 0, not {max_body_bytes}")
        self.app = app
        self.max_body_bytes = max_body_bytes

    def declared_refusal(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why the Content-Length refuses this request, or None. A value that is not a number is left to the
        server, which frames the body (h11 and httptools refuse it); the byte count applies anyway."""
        for name, value in headers:
            if name.lower() == b"content-length" and value.strip().isdigit() \
                    and int(value) > self.max_body_bytes:
                return f"request body is {int(value)} bytes; at most {self.max_body_bytes} are accepted"
        return None

    def _refusal(self, message: str, path: str = "") -> ASGIApp:
        # `path`: the envelope of the route asked for (Zhipu's on /api/paas/v4)
        return error_response(413, message, code="request_too_large", headers={"Connection": "close"}, path=path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        why = self.declared_refusal(scope["headers"])
        if why is not None:
            await self._refusal(why, scope.get("path", ""))(scope, receive, send)
            return
        received = 0
        over = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            if over:  # the app asks again after the refusal: nothing more is read
                raise _BodyTooLarge()
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:  # the app's own answer to the refused body: ours replaces it
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            # whatever the app raised once the body was refused (the refusal itself, or an error made of it)
            if not over or started:
                raise
        if over and not started:
            await self._refusal(f"request body is longer than {self.max_body_bytes} bytes; at most "
                                f"{self.max_body_bytes} are accepted", scope.get("path", ""))(scope, receive, send)
