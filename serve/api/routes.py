"""HTTP routes (FastAPI): auth, body parsing (JSON or multipart) and mapping to `VideoService` calls.

(No `from __future__ import annotations` here: FastAPI resolves the `Caller` dependency alias, local to
`create_app`, from the evaluated annotations.)

`create_app` is a factory so each ingress replica builds its own app around its own object graph (no
module-global app), and unit tests build one around a fake pipeline.
"""


import asyncio
import copy
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, Protocol

from fastapi import Depends, FastAPI, Query, Request, Response, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from starlette.concurrency import iterate_in_threadpool

from serve.api import zhipu
from serve.api.body import OBJECT_FIELDS, read_fields, validated
from serve.api.errors import ErrorEnvelope, install_error_handlers
from serve.api.hardening import BodyLimit, HeaderLimits
from serve.api.ranges import byte_range
from serve.api.request_id import RequestIds, request_id_of
from serve.api.wire import (
    CreateVideoRequest,
    ModelList,
    UploadedFile,
    Video,
    VideoDeleted,
    VideoList,
)
from serve.billing.usage import UsageResponse
from serve.config import AppConfig
from serve.errors import ServiceError
from serve.jobs.service import VideoService
from serve.tenancy.keys import KeyRing, Principal

# every error status an operation can answer (the framework's and the middlewares' included), in the envelope of
# its routes: OpenAI's, or Zhipu's on /api/paas/v4
_ERROR_STATUSES = (400, 401, 403, 404, 409, 413, 415, 422, 429, 431, 500, 503)
_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorEnvelope} for code in _ERROR_STATUSES}
_BINARY = {media: {"schema": {"type": "string", "format": "binary"}} for media in ("video/mp4", "image/jpeg")}
_CONTENT: dict[int | str, dict[str, Any]] = {
    **_ERRORS, 416: {"model": ErrorEnvelope},
    200: {"content": _BINARY},
    302: {"description": "With api.content_redirect: the presigned S3 URL to fetch instead",
          "headers": {"Location": {"description": "Presigned S3 URL", "schema": {"type": "string"}}}},
    206: {"description": "The requested byte range", "content": _BINARY},
}
POLL_AFTER_MS = "1000"
_ZHIPU_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": zhipu.ZhipuErrorEnvelope} for code in _ERROR_STATUSES}


def _body_schema(model: type[BaseModel], multipart: bool = True) -> dict[str, Any]:
    """The request body a route reads itself (`read_fields`), declared for the OpenAPI document: JSON, and the
    same fields as a form where the route takes one (there the input image is a file part, or the flattened
    `input_reference[image_url]` field the SDK writes for the object)."""
    schema = model.model_json_schema()
    content = {"application/json": {"schema": schema}}
    if multipart:
        content |= {"multipart/form-data": {"schema": _form_schema(schema, files=True)},
                    "application/x-www-form-urlencoded": {"schema": _form_schema(schema, files=False)}}
    return {"requestBody": {"required": True, "content": content}}


def _form_schema(schema: dict[str, Any], *, files: bool) -> dict[str, Any]:
    form = copy.deepcopy(schema)
    props = form.get("properties", {})
    if props.pop("input_reference", None) is not None:
        for name in OBJECT_FIELDS["input_reference"]:
            props[f"input_reference[{name}]"] = {"type": "string", "description": f"input_reference.{name}"}
        if files:
            props["input_reference"] = {"type": "string", "format": "binary",
                                        "description": "The input image as a file part: PNG, JPEG or WebP."}
    return form


def _trace(request: Request, own: str | None = None) -> dict[str, str]:
    """The request id a create stores on its job and sends with its webhooks (serve/api/request_id.py)."""
    return {"request_id": own or request_id_of(request)}


class Live(Protocol):
    """What the routes read per request (`serve.jobs.wiring.IngressGraph`)."""

    service: VideoService
    config: AppConfig
    keyring: KeyRing


# declares the scheme in the OpenAPI document (every authenticated operation lists it); the header itself is
# read below, so the answers stay this API's 401s
_BEARER = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")


def _auth_dependency(current: Callable[[], KeyRing]) -> Callable[[Request], Principal]:
    # a plain `def`: the key ring's once-a-second reload check stats a file, so FastAPI runs it in a thread
    def authenticate(request: Request, _declared: Annotated[Any, Security(_BEARER)] = None) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ServiceError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        principal = current().authenticate(token.strip())
        if principal is None:
            raise ServiceError(401, "invalid API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        return principal

    return authenticate


async def _parse_create(request: Request) -> tuple[CreateVideoRequest, UploadedFile | None]:
    # JSON, multipart and urlencoded bodies share one decoding and validation path (serve/api/body.py); a
    # multipart file part `input_reference` (the input image) comes apart from the validated fields
    raw = await read_fields(request)
    upload = raw.pop("input_reference") if isinstance(raw.get("input_reference"), UploadedFile) else None
    return validated(CreateVideoRequest, raw), upload


def create_app(live: Live, readiness: Callable[[], Awaitable[dict[str, Any]]]) -> FastAPI:
    """The HTTP app of one ingress replica around `live` (the replica's `IngressGraph`). Its service, config
    and keyring are read per request, so settings applied by a reconfigure reach the next request."""
    # redirect_slashes=False: Starlette's slash redirect builds its Location from the request's Host header (an
    # open redirect, e.g. GET /v1/videos/%2e%2e%2f); a path no route matches is a 404 in the envelope instead
    # the document and its page are routes of their own, so `api.docs` applies per request (a reconfigure
    # switches them without a restart)
    app = FastAPI(title="videogen-serve", version="0.1.0", redirect_slashes=False, openapi_url=None, docs_url=None,
                  redoc_url=None, description="Text to video with CogVideoX; OpenAI Videos API shape.")
    install_error_handlers(app)
    app.add_middleware(BodyLimit)  # the body cap, inside the header check (the last added runs first)
    app.add_middleware(HeaderLimits)  # before routing, auth and body parsing
    app.add_middleware(RequestIds)  # outermost: a refused request is answered with its id too
    authenticate = _auth_dependency(lambda: live.keyring)

    def docs_mode(request: Request) -> None:
        mode = live.config.api.docs
        if mode == "off":
            raise ServiceError(404, f"no route {request.url.path}", code="not_found")
        if mode == "authenticated":
            authenticate(request)

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        await asyncio.to_thread(docs_mode, request)  # the key ring's reload check stats a file
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False)
    async def docs(request: Request) -> Response:
        await asyncio.to_thread(docs_mode, request)
        if live.config.api.docs != "public":  # a browser page cannot send the bearer key
            raise ServiceError(404, "the docs page is served only with api.docs: public; fetch /openapi.json "
                                    "with your key", code="not_found")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="videogen-serve")
    Caller = Annotated[Principal, Depends(authenticate)]

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        checks = await readiness()
        ready = all(v is True for v in checks.values())
        return JSONResponse(status_code=200 if ready else 503,
                            content={"status": "ready" if ready else "not_ready", "checks": checks})

    @app.post("/v1/videos", response_model=Video, responses=_ERRORS, openapi_extra=_body_schema(CreateVideoRequest))
    async def create_video(request: Request, caller: Caller, response: Response) -> Video:
        req, upload = await _parse_create(request)
        headers: dict[str, str] = {}
        video = await live.service.create(req, caller, request.headers.get("idempotency-key"), headers,
                                          **_trace(request), upload=upload)
        response.headers.update(headers)
        response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
        return video

    @app.post("/v1/videos/sync", response_model=Video, openapi_extra=_body_schema(CreateVideoRequest),
              responses={**_ERRORS, 202: {
                  "model": Video, "description": "The wait ended first: the job goes on; poll the `Location`",
                  "headers": {"Location": {"description": "GET /v1/videos/{id} of the job",
                                           "schema": {"type": "string"}}}}})
    async def create_video_sync(
            request: Request, caller: Caller, response: Response,
            wait_s: Annotated[float | None, Query(gt=0, description="Seconds to wait (default api.sync_wait_s, "
                                                                  "at most api.sync_max_wait_s)")] = None) -> Video:
        """Create a video (as POST /v1/videos, Idempotency-Key included) and answer once it ended: 200 with the
        finished video object. A job that outlives the wait keeps running: 202 with the job as it stands, and
        `Location` naming where to poll it."""
        api = live.config.api
        if wait_s is not None and wait_s > api.sync_max_wait_s:
            raise ServiceError(400, f"wait_s may be at most {api.sync_max_wait_s:g} seconds here, got {wait_s:g}",
                               param="wait_s", code="invalid_value")
        req, upload = await _parse_create(request)
        headers: dict[str, str] = {}
        video = await live.service.create(req, caller, request.headers.get("idempotency-key"), headers,
                                          **_trace(request), upload=upload)
        response.headers.update(headers)
        video = await live.service.wait(video.id, caller.tenant, api.sync_wait_s if wait_s is None else wait_s)
        if video.status in ("queued", "in_progress"):
            response.status_code = 202
            response.headers["Location"] = f"/v1/videos/{video.id}"
            response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
        return video

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models(caller: Caller) -> ModelList:
        return live.service.models()

    @app.get("/v1/videos", response_model=VideoList, responses=_ERRORS)
    async def list_videos(caller: Caller, after: str | None = None,
                          limit: Annotated[int | None, Query(description="1..100; default from config")] = None,
                          order: Literal["asc", "desc"] = "desc") -> VideoList:
        return await live.service.list(after, live.config.api.default_page_limit if limit is None else limit, order,
                                  tenant=caller.tenant)

    @app.get("/v1/videos/{video_id}", response_model=Video, responses=_ERRORS)
    async def get_video(video_id: str, caller: Caller, response: Response) -> Video:
        video = await live.service.get(video_id, caller.tenant)
        if video.status in ("queued", "in_progress"):
            response.headers["openai-poll-after-ms"] = POLL_AFTER_MS
        return video

    @app.post("/v1/videos/{video_id}/cancel", response_model=Video, responses=_ERRORS)
    async def cancel_video(video_id: str, caller: Caller) -> Video:
        return await live.service.cancel(video_id, caller.tenant)

    @app.delete("/v1/videos/{video_id}", response_model=VideoDeleted, responses=_ERRORS)
    async def delete_video(video_id: str, caller: Caller) -> VideoDeleted:
        return await live.service.delete(video_id, caller.tenant)

    @app.get("/v1/videos/{video_id}/content", responses=_CONTENT, response_class=StreamingResponse)
    async def video_content(request: Request, video_id: str, caller: Caller, variant: str = "video") -> Response:
        """The mp4 (or cover JPEG), streamed from S3; a `Range: bytes=...` header gets 206 and that part only.
        With `api.content_redirect`, a redirect to a presigned S3 URL instead."""
        content = await live.service.content(video_id, variant, caller.tenant)
        if live.config.api.content_redirect:
            url = await asyncio.to_thread(live.service.content_url, content)
            return RedirectResponse(url, status_code=302, headers={"Cache-Control": "no-store"})
        wanted = byte_range(request.headers.get("range"), content.size)
        start, end = wanted or (0, content.size - 1)
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(max(0, end - start + 1)),
                   "Content-Disposition": f'attachment; filename="{content.filename}"'}
        if wanted is not None:
            headers["Content-Range"] = f"bytes {start}-{end}/{content.size}"
        if content.size == 0:
            return Response(b"", media_type=content.media_type, headers=headers)
        # opened before the answer starts: a missing object is still a 404, not a cut-off 200
        chunks = await asyncio.to_thread(live.service.open_content, content, start, end)
        return StreamingResponse(iterate_in_threadpool(chunks), status_code=206 if wanted else 200,
                                 media_type=content.media_type, headers=headers)

    @app.get("/v1/usage", response_model=UsageResponse, responses=_ERRORS)
    async def usage(caller: Caller, start: str | None = None, end: str | None = None) -> UsageResponse:
        """The caller's own usage: GPU-seconds per stage and output seconds of completed jobs, per UTC day."""
        return await live.service.usage(caller.tenant, start, end)

    # ---- Zhipu's open-platform API (serve/api/zhipu.py): the same service, Zhipu's shapes and error envelope ----

    @app.post(zhipu.CREATE_PATH, response_model=zhipu.ZhipuTask, responses=_ZHIPU_ERRORS, tags=["zhipu"],
              openapi_extra=_body_schema(zhipu.ZhipuCreateRequest, multipart=False))
    async def zhipu_create(request: Request, caller: Caller, response: Response) -> zhipu.ZhipuTask:
        """Zhipu's `videos.generations`: a text-to-video task; poll `/api/paas/v4/async-result/{id}`."""
        # the SDK sends every parameter it knows, `null` when unset: null is absent
        raw = {k: v for k, v in (await read_fields(request)).items() if v is not None}
        req = validated(zhipu.ZhipuCreateRequest, raw)
        create = zhipu.to_create_request(req, live.config)
        key = zhipu.idempotency_key(req)
        if key is not None:
            zhipu.check_request_id(req.request_id)
        headers: dict[str, str] = {}
        try:
            video = await live.service.create(create, caller, key, headers, **_trace(request, req.request_id),
                                              user_id=req.user_id, image_param="image_url")
        except ServiceError as exc:
            raise zhipu.as_zhipu_error(exc) from None
        response.headers.update(headers)
        return zhipu.ZhipuTask(id=video.id, model=video.model, request_id=video.request_id or video.id,
                               task_status=zhipu.task_status(video))

    @app.get(zhipu.RESULT_PATH, response_model=zhipu.ZhipuResult, responses=_ZHIPU_ERRORS, tags=["zhipu"])
    async def zhipu_result(task_id: str, caller: Caller) -> zhipu.ZhipuResult:
        """Zhipu's `async-result`: the task's status and, once SUCCESS, fresh presigned URLs of the video and
        its cover."""
        video = await live.service.get(task_id, caller.tenant)
        return zhipu.result(video, video.request_id or video.id)

    return app
