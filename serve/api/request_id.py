"""The id of one API request: the client's own `X-Request-ID` when it is usable, else the one Ray Serve gave the
request, else one made here. A create stores it on its job (`JobRecord.request_id`); the job's webhooks carry
it back (serve/webhooks/sender.py).

Under Ray Serve the proxy stamps every HTTP request before a replica sees it (RequestIdMiddleware,
ray/serve/_private/http_util.py, 2.60): it keeps a client's `x-request-id` header as it is, whatever it holds,
or adds one (a uuid4); that value becomes the request context's id (`_get_serve_request_context().request_id`,
which the proxy reads from the same header) and the proxy appends `X-Request-ID: <it>` to every response.
So the header the app reads *is* Serve's request id, and the only id the app needs to make is one for a
request that came without a usable one.

`RequestIds` (ASGI middleware, in front of the app) settles the id once per request, where routes read it
(`request_id_of`), and echoes it on the response only when the request carried no `X-Request-ID` at all: a
request that has one either came through Serve's proxy, which echoes it itself (a second header would make
clients read "a, a"), or from a client that sent it. A client's unusable value is not stored; behind Serve it is
still what the proxy echoes, and the job keeps the id made here.
"""

from __future__ import annotations

import logging
import uuid

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.jobs.record import MAX_REQUEST_ID_LEN, is_request_id

REQUEST_ID_HEADER = "x-request-id"
_HEADER = REQUEST_ID_HEADER.encode("latin-1")
_STATE_KEY = "request_id"  # in the ASGI scope's "state" (Starlette's `request.state`)

log = logging.getLogger(__name__)


def new_request_id() -> str:
    return uuid.uuid4().hex


def settle(sent: str | None) -> str:
    """The request id for a request whose `X-Request-ID` is `sent` (None: none): `sent` if it is a usable
    token (1..128 visible ASCII characters), else a new one."""
    if sent is not None and is_request_id(sent):
        return sent
    if sent is not None:  # its value is not logged: it may be long or hold control characters
        log.info("X-Request-ID of %d characters not used (1..%d visible ASCII characters are); this request is "
                 "known by a new id", len(sent), MAX_REQUEST_ID_LEN)
    return new_request_id()


def _sent(headers: list[tuple[bytes, bytes]]) -> str | None:
    return next((v.decode("latin-1") for k, v in headers if k.lower() == _HEADER), None)


def request_id_of(request: Request) -> str:
    """The id of `request`: as `RequestIds` settled it, else settled from its header now (an app without the
    middleware: each call without a usable header then makes a new id)."""
    settled = request.scope.get("state", {}).get(_STATE_KEY)
    return settled if isinstance(settled, str) else settle(request.headers.get(REQUEST_ID_HEADER))


class RequestIds:
    """Settle each HTTP request's id before the app runs; answer `X-Request-ID` where nobody in front will."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = _sent(scope["headers"])
        request_id = settle(sent)
        scope.setdefault("state", {})[_STATE_KEY] = request_id
        if sent is not None:  # Serve's proxy echoes it (or the client sent it itself)
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append("X-Request-ID", request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)
