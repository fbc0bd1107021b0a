"""Wire models of `/v1/videos`: the OpenAI Videos API shape plus CogVideoX extensions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


@dataclass(frozen=True)
class UploadedFile:
    """A multipart file part: its bytes (never in the repr, so never in a log line), declared type and name."""

    data: bytes = field(repr=False)
    content_type: str | None = None
    filename: str | None = None


class InputReference(BaseModel):
    """`input_reference` as an object (the SDK's `ImageInputReferenceParam`); in a multipart form, the fields
    `input_reference[image_url]` and `input_reference[file_id]`. A file part is the other form
    (serve/media/reference.py)."""

    model_config = ConfigDict(extra="forbid")

    image_url: str | None = Field(
        default=None, description="A base64 data URL (`data:image/png;base64,...`), or an https:// URL where the "
                                  "operator enabled remote fetching.")
    file_id: str | None = Field(default=None, description="Not accepted: this service stores no uploaded files.")


class CreateVideoRequest(BaseModel):
    """Body of `POST /v1/videos` (JSON or multipart/form-data; form values arrive as strings)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the video shows.")
    model: str | None = Field(default=None, description="A configured model name; default: the served model.")
    seconds: str | None = Field(default=None, description="Clip length in seconds; ignored if num_frames is set.")
    size: str | None = Field(default=None, description="WIDTHxHEIGHT, each a multiple of 16.")
    width: int | None = Field(default=None, description="With `height`, instead of `size` (as vLLM-Omni accepts).")
    height: int | None = Field(default=None, description="With `width`, instead of `size`.")
    input_reference: InputReference | None = Field(
        default=None, description="Image-to-video: the input image, as an object with `image_url` (a base64 data "
                                  "URL, or an https:// URL where the operator enabled fetching); or, in a multipart "
                                  "body, a file part named input_reference (PNG, JPEG or WebP). Only for models "
                                  "whose `inputs` (GET /v1/models) include 'image'.")
    negative_prompt: str | None = Field(default=None, description="What the video should not show.")
    seed: int | None = Field(default=None, description="0..2**32-1; random when omitted (returned).")
    num_inference_steps: int | None = Field(default=None, description="Denoising steps.")
    guidance_scale: float | None = Field(default=None, description="CFG scale; <= 1 disables CFG.")
    use_dynamic_cfg: bool | None = Field(default=None, description="CogVideoX's cosine CFG schedule.")
    num_frames: int | None = Field(default=None, description="8N+1 (16N+1 for CogVideoX1.5).")
    fps: int | None = Field(default=None, description="Frames per second of the mp4.")
    quality: Literal["quality", "speed"] | None = Field(
        default=None, description="'speed' uses the deployment's step cache (faster, lossy); default 'quality'.")
    image_fit: Literal["stretch", "crop", "pad"] | None = Field(
        default=None, description="Image-to-video: how the input image meets the video's size. 'stretch' (default) "
                                  "resizes it as CogVideoXImageToVideoPipeline does; 'crop' keeps its aspect and cuts "
                                  "the overhang (centred); 'pad' keeps all of it on black bars.")
    deadline_seconds: float | None = Field(
        default=None, description="Give up (status failed, code deadline_exceeded) this long after submission.")
    webhook_url: str | None = Field(default=None, description="POSTed signed video.* events for this job.")

    @field_validator("input_reference", mode="before")
    @classmethod
    def _url_alone(cls, value: object) -> object:
        # a bare string (a JSON string, or a multipart text field named input_reference) is the image_url
        return {"image_url": value} if isinstance(value, str) else value


class VideoError(BaseModel):
    code: str
    message: str


class WebhookStatus(BaseModel):
    state: Literal["pending", "delivered", "failed", "refused"]
    attempts: int = 0
    status_code: int | None = None
    error: str | None = None


class Video(BaseModel):
    """The job as clients see it (OpenAI `Video` plus extension fields)."""

    id: str
    object: Literal["video"] = "video"
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    status: Literal["queued", "in_progress", "completed", "failed", "cancelled"]
    progress: int
    model: str
    prompt: str | None = None
    seconds: str
    size: str
    error: VideoError | None = None
    remixed_from_video_id: str | None = None
    # extensions
    stage: str | None = Field(default=None, description="encoding, denoising, decoding, uploading.")
    step: int | None = Field(default=None, description="Denoising steps done.")
    total_steps: int | None = None
    num_frames: int
    fps: int
    seed: int
    num_inference_steps: int
    guidance_scale: float
    use_dynamic_cfg: bool
    quality: str = "quality"
    image_fit: str | None = Field(default=None, description="Image-to-video jobs: how the input image was fitted.")
    negative_prompt: str | None = None
    attempts: int = 0
    deadline_at: int | None = Field(default=None, description="Unix seconds after which the job fails.")
    video_url: str | None = Field(default=None, description="Fresh presigned URL of the mp4 (completed only).")
    thumbnail_url: str | None = Field(default=None, description="Fresh presigned URL of the cover JPEG.")
    url_expires_at: int | None = None
    request_id: str | None = Field(
        default=None, description="The id of the request that created it (its X-Request-ID, or Zhipu's request_id).")
    webhook: WebhookStatus | None = Field(
        default=None, description="Its terminal webhook's delivery (jobs with a webhook URL): pending, delivered, "
                                  "failed after its retries, or refused by the address check. Not in webhooks.")
    queue_position: int | None = Field(
        default=None, description="Queued only: jobs ahead of it in the cluster's queue (0: next), as of the "
                                  "last scan (every jobs.reclaim_interval_s).")
    estimated_start_at: int | None = Field(
        default=None, description="Queued only: Unix seconds it should start at the recent pace; null while "
                                  "the pace is unknown.")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class ModelInfo(BaseModel):
    """One served model (`GET /v1/models`): OpenAI's model object plus what a request may ask of it."""

    id: str = Field(description="The name requests pass as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(default=0, description="Unix seconds; 0: not tracked.")
    owned_by: str = "videogen"
    default: bool = Field(description="Requests without `model` use this one.")
    aliases: list[str] = Field(description="Other names accepted for it.")
    family: str = Field(description="The CogVideoX family its defaults and limits come from.")
    width: int = Field(description="Native (default) width.")
    height: int = Field(description="Native (default) height.")
    num_frames: int = Field(description="Default frames.")
    fps: int = Field(description="Default frames per second.")
    frame_rule: str = Field(description="Allowed frame counts, e.g. '8N+1'.")
    max_frames: int
    max_side: int = Field(description="Largest width or height; both multiples of 16.")
    max_steps: int
    inputs: list[Literal["text", "image"]] = Field(
        description="What a request brings: ['text'] (text-to-video) or ['text', 'image'] (image-to-video: the "
                    "image is required).")
    size_rule: str = Field(description="The sizes it makes, in words (image-to-video models make fewer).")
    native_sizes: list[str] = Field(
        description="Its generation envelope's native size(s); with size_rule and max_side, the sizes it generates "
                    "directly.")
    size_factors: list[int] = Field(
        default_factory=list, description="Super-resolution factors its Enhancer applies to a size it generates "
                                          "(a request for such a multiple is generated at the smaller size).")
    fps_factors: list[int] = Field(
        default_factory=list, description="Frame-interpolation factors its Enhancer applies to its fps.")
    deliverable_fps: list[int] = Field(description="The frame rates a request may ask for: fps x each factor.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelInfo]


class VideoDeleted(BaseModel):
    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True
