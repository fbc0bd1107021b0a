"""A small typed client of the public `/v1` HTTP API: what the `videogen` CLI (and scripts) call.

Depends on httpx only, never on server modules, so it works when installed alone. Every call retries a 429/503
(honouring `Retry-After`, bounded) and a connection that could not be opened; a call that is safe to repeat also
retries a connection lost mid-request. `create` sends an `Idempotency-Key`, the same on every retry, so a retried
POST never makes two jobs. `create(..., image=...)` sends an image-to-video request as multipart/form-data (the
image as the file part `input_reference`, as the OpenAI SDK does); its retries resend the same bytes.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Literal

import httpx

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
RETRY_STATUSES = frozenset({429, 503})
USER_AGENT = "videogen-cli/0.1"

Variant = Literal["video", "thumbnail"]
# (filename, bytes, media type), or (filename, bytes) to have the type read from the bytes, like the OpenAI SDK's
# `input_reference=("a.png", data, "image/png")`; a path is read whole
ImageInput = str | os.PathLike[str] | tuple[str, bytes] | tuple[str, bytes, str]
MAX_IMAGE_BYTES = 10 * 1024 * 1024  # the server's default cap on an input image (a deployment may set its own)


class ClientError(Exception):
    """An error answer of the API, parsed from its envelope `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, code: str | None, message: str, param: str | None = None,
                 retry_after: float | None = None, type: str | None = None) -> None:
        super().__init__(status, code, message, param, retry_after, type)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.retry_after = retry_after
        self.type = type

    def __str__(self) -> str:
        detail = self.code or f"HTTP {self.status}"
        if self.param:
            detail += f", param {self.param}"
        return f"{self.message} ({detail})"


class ServerUnreachable(Exception):
    """No HTTP answer at all: connection refused, DNS failure, timeout, connection dropped."""

    def __init__(self, url: str, reason: str, connected: bool = False) -> None:
        super().__init__(url, reason, connected)
        self.url = url
        self.reason = reason
        self.connected = connected  # True: the connection was made, then lost or timed out

    def __str__(self) -> str:
        if self.connected:
            return f"no answer from {self.url}: {self.reason}"
        return f"cannot reach {self.url}: is the server running? ({self.reason})"


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Video:
    """The job as `GET /v1/videos/{id}` shows it; `raw` keeps every field, including ones added later."""

    id: str
    status: str
    progress: int = 0
    stage: str | None = None
    step: int | None = None
    total_steps: int | None = None
    error: JobError | None = None
    model: str | None = None
    prompt: str | None = None
    size: str | None = None
    seconds: str | None = None
    num_frames: int | None = None
    fps: int | None = None
    seed: int | None = None
    created_at: int | None = None
    completed_at: int | None = None
    video_url: str | None = None
    thumbnail_url: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    poll_after_s: float | None = field(default=None, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: dict[str, Any], poll_after_s: float | None = None) -> Video:
        err = data.get("error")
        return cls(
            id=data["id"], status=data["status"], progress=int(data.get("progress") or 0), stage=data.get("stage"),
            step=data.get("step"), total_steps=data.get("total_steps"),
            error=JobError(str(err.get("code")), str(err.get("message"))) if isinstance(err, dict) else None,
            model=data.get("model"), prompt=data.get("prompt"), size=data.get("size"), seconds=data.get("seconds"),
            num_frames=data.get("num_frames"), fps=data.get("fps"), seed=data.get("seed"),
            created_at=data.get("created_at"), completed_at=data.get("completed_at"),
            video_url=data.get("video_url"), thumbnail_url=data.get("thumbnail_url"),
            raw=data, poll_after_s=poll_after_s,
        )


@dataclass(frozen=True)
class VideoPage:
    data: list[Video]
    has_more: bool
    last_id: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def _retry_after_s(value: str | None) -> float | None:
    """`Retry-After` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _poll_after_s(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["openai-poll-after-ms"]) / 1000
    except (KeyError, ValueError):
        return None


def _error_from(response: httpx.Response) -> ClientError:
    retry_after = _retry_after_s(response.headers.get("retry-after"))
    try:
        body = response.json()
        err = body["error"]
        return ClientError(response.status_code, err.get("code"), str(err.get("message")), err.get("param"),
                           retry_after, err.get("type"))
    except (ValueError, KeyError, TypeError, AttributeError):
        # not our envelope: a proxy or load balancer answered
        text = " ".join(response.text.split())[:200] or response.reason_phrase
        return ClientError(response.status_code, None, f"HTTP {response.status_code}: {text}",
                           retry_after=retry_after)


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ClientError(response.status_code, "invalid_response",
                          f"{response.request.url} answered with something that is not JSON; "
                          "is the base URL the videogen API (ending in /v1)?") from None


def _video(response: httpx.Response) -> Video:
    data = _json(response)
    try:
        return Video.from_json(data, _poll_after_s(response))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ClientError(response.status_code, "invalid_response",
                          f"{response.request.url} answered with JSON that is not a video job") from None


def image_media_type(data: bytes) -> str:
    """The image's type from its first bytes (PNG, JPEG, WebP); anything else is `application/octet-stream`, which
    the server refuses with a message naming the formats it takes."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def image_part(image: ImageInput) -> tuple[str, bytes, str]:
    """`(filename, bytes, media type)` of the `input_reference` file part; a path is read here, once."""
    if isinstance(image, tuple):
        name, data = image[0], image[1]
        media_type = image[2] if len(image) > 2 else image_media_type(data)  # type: ignore[misc]
        return str(name), bytes(data), media_type
    path = Path(image)
    data = path.read_bytes()
    return path.name, data, image_media_type(data)


def _form_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def normalize_base_url(base_url: str) -> str:
    """`http://host:8000` means `http://host:8000/v1` (the OpenAI SDK convention is a base URL ending in /v1)."""
    url = httpx.URL(base_url.strip())
    if url.path in ("", "/"):
        url = url.copy_with(path="/v1")
    return str(url).rstrip("/")


class VideogenClient:
    """Synchronous client of `/v1/videos` and `/v1/usage`. `transport` lets tests serve it in-process."""

    def __init__(self, base_url: str = DEFAULT_BASE_URL, api_key: str = "", timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None, *, max_retries: int = 3,
                 max_retry_wait_s: float = 30.0, sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = normalize_base_url(base_url)
        self.max_retries = max_retries
        self.max_retry_wait_s = max_retry_wait_s
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url, transport=transport,
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
            headers={"Authorization": f"Bearer {api_key}", "User-Agent": USER_AGENT, "Accept": "application/json"},
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> VideogenClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints -------------------------------------------------------------------------------
    def create(self, prompt: str, *, idempotency_key: str | None = None, webhook_url: str | None = None,
               image: ImageInput | None = None, **options: Any) -> Video:
        """`POST /v1/videos`; options are the wire fields (size, seconds, num_frames, seed, ...), None = omitted.

        Without `image` the body is JSON. With one (a path, or `(filename, bytes[, media type])`) it is
        multipart/form-data: the fields as text parts and the image as the file part `input_reference`, an
        image-to-video job (the model must take an image: `GET /v1/models` lists `inputs`).
        """
        body = {"prompt": prompt, **{k: v for k, v in options.items() if v is not None}}
        if webhook_url is not None:
            body["webhook_url"] = webhook_url
        headers = {"Idempotency-Key": idempotency_key or f"videogen-{uuid.uuid4()}"}
        if image is None:
            return _video(self._request("POST", "/videos", json=body, headers=headers, idempotent=True))
        # the bytes are read once, here: every retry re-encodes the same image, with the same key
        part = image_part(image)
        return _video(self._request("POST", "/videos", data={k: _form_value(v) for k, v in body.items()},
                                    files={"input_reference": part}, headers=headers, idempotent=True))

    def get(self, video_id: str) -> Video:
        return _video(self._request("GET", f"/videos/{video_id}"))

    def list(self, limit: int | None = None, after: str | None = None) -> VideoPage:
        params = {k: v for k, v in {"limit": limit, "after": after}.items() if v is not None}
        r = self._request("GET", "/videos", params=params)
        body = _json(r)
        try:
            return VideoPage([Video.from_json(v) for v in body.get("data", [])], bool(body.get("has_more")),
                             body.get("last_id"), body)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ClientError(r.status_code, "invalid_response", f"{r.request.url} answered with JSON that is "
                              "not a list of video jobs") from None

    def cancel(self, video_id: str) -> Video:
        # repeating a cancel asks for the same end state, so it is safe to retry
        return _video(self._request("POST", f"/videos/{video_id}/cancel", idempotent=True))

    def delete(self, video_id: str) -> dict[str, Any]:
        return _json(self._request("DELETE", f"/videos/{video_id}"))

    def usage(self, start: date | str | None = None, end: date | str | None = None) -> dict[str, Any]:
        """`GET /v1/usage?start=YYYY-MM-DD&end=YYYY-MM-DD`, returned as the server's JSON."""
        params = {k: str(v) for k, v in {"start": start, "end": end}.items() if v is not None}
        return _json(self._request("GET", "/usage", params=params))

    def download(self, video_id: str, path: str | os.PathLike[str], variant: Variant = "video") -> Path:
        """Stream the mp4 (or cover JPEG) to a temp file beside `path`, then rename: `path` is whole or absent."""
        dest = Path(path)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                def write(response: httpx.Response) -> None:
                    out.seek(0)
                    out.truncate()
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                self._request("GET", f"/videos/{video_id}/content", params={"variant": variant},
                              headers={"Accept": "*/*"}, consume=write)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return dest

    def poll(self, video_id: str, default_interval_s: float = 1.0) -> Iterator[Video]:
        """Yield the job at each poll until it ends (the last one yielded is terminal).

        Waits what the server asks (`openai-poll-after-ms`), bounded to 0.05..10 s.
        """
        while True:
            video = self.get(video_id)
            yield video
            if video.done:
                return
            wait = video.poll_after_s if video.poll_after_s is not None else default_interval_s
            self._sleep(min(max(wait, 0.05), 10.0))

    # -- transport -------------------------------------------------------------------------------
    def _request(self, method: str, path: str, *, idempotent: bool | None = None,
                 consume: Callable[[httpx.Response], None] | None = None, **kwargs: Any) -> httpx.Response:
        """Send with bounded retries; raise `ClientError` for an error answer, `ServerUnreachable` for none.

        `consume` reads a streamed body (downloads); otherwise the body is read into the response.
        """
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "PUT", "DELETE")
        attempt = 0
        while True:
            try:
                with self._http.stream(method, path, **kwargs) as response:
                    if response.is_success:
                        if consume is not None:
                            consume(response)
                        else:
                            response.read()
                        return response
                    response.read()
                    error = _error_from(response)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # nothing was sent: any request may be repeated
                if attempt >= self.max_retries:
                    raise ServerUnreachable(self.base_url, _reason(exc)) from None
                self._sleep(self._backoff(attempt))
                attempt += 1
                continue
            except httpx.TransportError as exc:
                # the request may have been applied: repeat only what is safe to repeat
                if not idempotent or attempt >= self.max_retries:
                    raise ServerUnreachable(self.base_url, _reason(exc), connected=True) from None
                self._sleep(self._backoff(attempt))
                attempt += 1
                continue
            if error.status not in RETRY_STATUSES or attempt >= self.max_retries:
                raise error
            wait = error.retry_after if error.retry_after is not None else self._backoff(attempt)
            if wait > self.max_retry_wait_s:
                raise error  # longer than a person waits at a prompt: say so instead
            self._sleep(wait)
            attempt += 1

    @staticmethod
    def _backoff(attempt: int) -> float:
        return min(0.25 * 2**attempt, 4.0)


def _reason(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
