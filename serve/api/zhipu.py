"""Zhipu's open-platform video API (`/api/paas/v4`), beside `/v1/videos`, on the same jobs.

A customer of Zhipu's CogVideoX API points its client (the official `zai-sdk`: `ZhipuAiClient(base_url=...)`) at
this service and changes nothing else. A create here is a `VideoService.create` like any other: the same tenant,
plan limits, idempotency (Zhipu's `request_id` is the idempotency key), prompt policy, webhooks and usage; only
the wire shape differs:

    POST /api/paas/v4/videos/generations   {model, prompt, quality, size, fps, duration, request_id, ...}
                                           -> {id, model, request_id, task_status: PROCESSING}
    GET  /api/paas/v4/async-result/{id}    -> {..., task_status: PROCESSING|SUCCESS|FAIL,
                                               video_result: [{url, cover_image_url}]}  (fresh presigned URLs)

The SDK sends every parameter of its signature on every call, as an explicit `null` when unset: `null` means
absent. Each other field is honoured, or refused with a 400 when set to something this service cannot do
(`REFUSED`); README lists them. Errors on these routes use Zhipu's envelope, `{"error": {"code", "message"}}`
with Zhipu's numeric codes (`zhipu_code`), plus this service's own `param` and `videogen_code`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from serve.admission.idempotency import HEADER as IDEMPOTENCY_HEADER
from serve.api.wire import CreateVideoRequest, InputReference, Video
from serve.config import AppConfig
from serve.errors import ServiceError
from serve.jobs.record import MAX_REQUEST_ID_LEN, is_request_id

PREFIX = "/api/paas/v4"
CREATE_PATH = f"{PREFIX}/videos/generations"
RESULT_PATH = f"{PREFIX}/async-result/{{task_id}}"
# the idempotency store is shared with /v1/videos: a Zhipu request_id and an Idempotency-Key of the same
# text are different keys
IDEMPOTENCY_NAMESPACE = "zhipu-request-id:"

# the CogVideoX model names Zhipu's platform offers: the shipped configs list them as `aliases` of their model,
# so a Zhipu client's `model` reaches it unchanged (tests/unit/test_zhipu.py checks every shipped config)
ZHIPU_MODELS = ("cogvideox", "cogvideox-2", "cogvideox-3", "cogvideox-flash")

TaskStatus = Literal["PROCESSING", "SUCCESS", "FAIL"]


class ZhipuCreateRequest(BaseModel):
    """Body of `POST /api/paas/v4/videos/generations`: the `zai-sdk` `videos.generations` parameters.
    `null` is the same as leaving a field out."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="A served model's name or alias (e.g. cogvideox-flash, when so aliased).")
    prompt: str | None = Field(default=None, description="What the video shows (required, with an image too).")
    quality: Literal["quality", "speed"] | None = Field(
        default=None, description="'speed' uses the deployment's step cache (faster, lossy); default 'quality'.")
    image_url: str | list[str] | dict[str, Any] | None = Field(
        default=None, description="Image-to-video: the input image, as a URL (fetched only where the operator "
                                  "enabled it), a data URL or bare base64 (PNG, JPEG or WebP); a list of one.")
    with_audio: bool | None = Field(default=None, description="Only false: no audio is produced.")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT; default: the model's native size.")
    # strict: JSON `true` is not 1 second (the route reads JSON, where numbers come typed)
    fps: StrictInt | None = Field(default=None, description="Frames per second; default: the model's.")
    duration: StrictInt | None = Field(default=None, description="Seconds; default: the model's native length.")
    style: str | None = Field(default=None, description="Only 'general'.")
    aspect_ratio: str | None = Field(default=None, description="W:H; must agree with the size generated.")
    off_peak: bool | None = Field(default=None, description="Only false: jobs run when admitted.")
    movement_amplitude: str | None = Field(default=None, description="Only 'auto'.")
    sensitive_word_check: dict[str, Any] | None = Field(
        default=None, description="Only status ENABLE: the prompt policy always applies.")
    watermark_enabled: bool | None = Field(default=None, description="Only false: no watermark is drawn.")
    request_id: str | None = Field(default=None, description="Unique per task: the idempotency key of the create.")
    user_id: str | None = Field(default=None, min_length=1, max_length=128,
                                description="Your end user's id (1..128 characters); stored on the job.")
    # this service's extensions (as on /v1/videos)
    negative_prompt: str | None = Field(default=None, description="What the video should not show.")
    seed: StrictInt | None = Field(default=None, description="0..2**32-1; random when omitted.")


class ZhipuTask(BaseModel):
    """The answer to a create: the task, still processing."""

    id: str = Field(description="The task id to pass to /async-result/{id}.")
    model: str
    request_id: str
    task_status: TaskStatus


class ZhipuVideoResult(BaseModel):
    url: str = Field(description="Presigned URL of the mp4 (expires).")
    cover_image_url: str = Field(description="Presigned URL of the cover JPEG (expires).")


class ZhipuTaskError(BaseModel):
    code: str
    message: str


class ZhipuResult(ZhipuTask):
    """The answer to `GET /async-result/{id}`."""

    video_result: list[ZhipuVideoResult] = Field(default_factory=list, description="One item once SUCCESS.")
    error: ZhipuTaskError | None = Field(default=None, description="Why the task is FAIL (an extension).")


class ZhipuErrorBody(BaseModel):
    code: str = Field(description="Zhipu's error code, e.g. '1214' (invalid parameter).")
    message: str
    param: str | None = None
    videogen_code: str | None = Field(default=None, description="This service's own error code.")


class ZhipuErrorEnvelope(BaseModel):
    error: ZhipuErrorBody


# ---- requests ---------------------------------------------------------------------------------------------------


def _refuse(param: str, message: str) -> ServiceError:
    return ServiceError(400, message, param=param, code="unsupported_parameter")


def _ratio(text: str) -> tuple[int, int] | None:
    w, sep, h = text.partition(":")
    try:
        a, b = int(w), int(h)
    except ValueError:
        return None
    return (a, b) if sep and a > 0 and b > 0 else None


def to_create_request(req: ZhipuCreateRequest, config: AppConfig) -> CreateVideoRequest:
    """The `/v1/videos` request this Zhipu request asks for, or a 400 naming the field this service cannot do."""
    reference = None if req.image_url is None else InputReference(image_url=_image_url(req.image_url))
    if req.prompt is None or not req.prompt.strip():
        raise ServiceError(400, "prompt is required: this deployment generates video from a prompt (with image_url, "
                                "from an image and a prompt)", param="prompt", code="missing_prompt")
    if req.with_audio:
        raise _refuse("with_audio", "with_audio: true is not possible: this service produces video without audio; "
                                    "send with_audio false or leave it out")
    if req.style not in (None, "general"):
        raise _refuse("style", f"style {req.style!r} is not offered; only 'general' (or leave it out)")
    if req.off_peak:
        raise _refuse("off_peak", "off_peak: true is not offered: jobs run as soon as they are admitted; send "
                                  "off_peak false or leave it out")
    if req.movement_amplitude not in (None, "auto"):
        raise _refuse("movement_amplitude", f"movement_amplitude {req.movement_amplitude!r} is not offered; "
                                            "only 'auto' (or leave it out)")
    if req.watermark_enabled:
        raise _refuse("watermark_enabled", "watermark_enabled: true is not offered: no watermark is drawn; "
                                           "send false or leave it out")
    check = req.sensitive_word_check
    if check is not None and str(check.get("status") or "ENABLE").upper() != "ENABLE":  # null: absent
        raise _refuse("sensitive_word_check", "the prompt policy cannot be disabled; send "
                                              "sensitive_word_check.status ENABLE or leave it out")
    if req.aspect_ratio is not None:
        _check_aspect(req, config)
    return CreateVideoRequest(
        prompt=req.prompt, model=req.model, size=req.size, fps=req.fps, quality=req.quality,
        seconds=None if req.duration is None else str(req.duration), negative_prompt=req.negative_prompt,
        seed=req.seed, input_reference=reference,
    )


# a bare base64 image has no media type: it goes on as a typeless data URL, and its bytes say what it is
_BARE_BASE64 = "data:;base64,"


def _image_url(value: str | list[str] | dict[str, Any]) -> str:
    """Zhipu's `image_url` as one `input_reference.image_url`: a URL or data URL as it is, bare base64 as a data
    URL. A list is one image (CogVideoX-I2V takes one); a first-and-last-frame pair is refused."""
    if isinstance(value, list):
        if len(value) != 1 or not isinstance(value[0], str):
            raise _refuse("image_url", f"image_url holds {len(value)} images; this service generates from one image "
                                       f"(no first-and-last-frame videos): send one URL or base64 image")
        value = value[0]
    if not isinstance(value, str):
        raise ServiceError(400, "image_url must be an image URL, a data URL or base64 image bytes (or a list of "
                                "one)", param="image_url", code="invalid_value")
    text = value.strip()
    if ":" in text[:16]:  # a scheme: https://..., data:...
        return text
    return _BARE_BASE64 + text


def _check_aspect(req: ZhipuCreateRequest, config: AppConfig) -> None:
    ratio = _ratio(req.aspect_ratio or "")
    if ratio is None:
        raise ServiceError(400, f"aspect_ratio must look like 'W:H' (e.g. '3:2'), got {req.aspect_ratio!r}",
                           param="aspect_ratio", code="invalid_value")
    if req.size:
        w, _, h = req.size.lower().partition("x")
        size, what = (w, h), f"size {req.size}"
    else:
        model = config.model_named(req.model) or config.model
        preset = model.preset()
        size, what = (str(preset.width), str(preset.height)), f"the native size {preset.width}x{preset.height}"
    try:
        width, height = int(size[0]), int(size[1])
    except ValueError:
        return  # the size's own check names it
    if width * ratio[1] != height * ratio[0]:
        raise _refuse("aspect_ratio", f"aspect_ratio {req.aspect_ratio} disagrees with {what}; the aspect follows "
                                      "size: send the size you want (or leave aspect_ratio out)")


def idempotency_key(req: ZhipuCreateRequest) -> str | None:
    return None if req.request_id is None else IDEMPOTENCY_NAMESPACE + req.request_id


# ---- answers ----------------------------------------------------------------------------------------------------


_STATUS: dict[str, TaskStatus] = {"queued": "PROCESSING", "in_progress": "PROCESSING", "completed": "SUCCESS",
                                  "failed": "FAIL", "cancelled": "FAIL"}


def task_status(video: Video) -> TaskStatus:
    return _STATUS[video.status]


def result(video: Video, request_id: str) -> ZhipuResult:
    items = []
    if video.status == "completed" and video.video_url:
        items = [ZhipuVideoResult(url=video.video_url, cover_image_url=video.thumbnail_url or "")]
    error = None
    if video.status in ("failed", "cancelled"):
        err = video.error
        error = ZhipuTaskError(code=err.code if err else video.status,
                               message=err.message if err else f"the task was {video.status}")
    return ZhipuResult(id=video.id, model=video.model, request_id=request_id, task_status=task_status(video),
                       video_result=items, error=error)


# ---- errors -----------------------------------------------------------------------------------------------------

# this service's error codes as Zhipu's (https://open.bigmodel.cn/dev/api/error-code/service-error)
_CODES = {
    "missing_api_key": "1001", "invalid_api_key": "1002",
    "permission_denied": "1220",
    "model_not_found": "1211",
    "missing_prompt": "1213",
    "content_policy": "1301",
    "concurrency_limited": "1302", "rate_limited": "1303", "quota_exceeded": "1304", "overloaded": "1305",
    "internal_error": "500",
}
_BY_STATUS = {401: "1000", 403: "1220", 404: "1222", 429: "1305", 500: "500", 503: "1305"}


def zhipu_code(status: int, code: str | None) -> str:
    """Zhipu's error code for one of this service's errors (1214, invalid parameter, for most 4xx)."""
    if code in _CODES:
        return _CODES[code]
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    return "1214" if status < 500 else "500"


def error_body(status: int, message: str, param: str | None, code: str | None) -> dict[str, Any]:
    return ZhipuErrorEnvelope(error=ZhipuErrorBody(code=zhipu_code(status, code), message=message, param=param,
                                                   videogen_code=code)).model_dump()


def is_zhipu_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def check_request_id(request_id: str | None) -> None:
    """A `request_id` the job can keep and send on (as its X-Request-ID) and the idempotency store can key by:
    1..128 visible ASCII characters."""
    if request_id is not None and not is_request_id(request_id):
        raise ServiceError(400, f"request_id must be 1 to {MAX_REQUEST_ID_LEN} visible ASCII characters (no "
                                f"spaces; {len(request_id)} characters given)", param="request_id",
                           code="invalid_value")


def as_zhipu_error(exc: ServiceError) -> ServiceError:
    """A refusal from the shared create path worded for these routes: the idempotency key is the body's
    `request_id`, and the clip length is `duration` (what `/v1/videos` calls `seconds`)."""
    if exc.param == IDEMPOTENCY_HEADER:
        message = exc.message.replace(IDEMPOTENCY_HEADER, "request_id")
        return ServiceError(exc.status, message, param="request_id", code=exc.code, headers=exc.headers)
    if exc.param == "seconds":  # the message speaks of seconds and frames, which `duration` is too
        return ServiceError(exc.status, exc.message, param="duration", code=exc.code, headers=exc.headers)
    return exc
