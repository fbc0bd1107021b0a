"""The durable job record: what the ingress writes on POST /v1/videos and every replica reads and moves.

Stored as JSON at `jobs/<id>.json` by `serve.jobs.store.JobStore` (conditional writes; `version` bumps per write).
The API layer turns it into the OpenAI-shaped video object; the job runner moves it through the statuses while it
holds the lease (`lease_owner` / `lease_expires_at`).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.config.tenancy import TENANT_PATTERN
from serve.stages.stage import (
    DENOISER,
    ENHANCER,
    PHASES,
    TEXT_ENCODER,
    UPLOADING,
    VAE_DECODER,
)
from serve.stages.types import GenerationParams, InputImage

JobStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled"]
TERMINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})

# Pipeline stages in the order a job passes them; progress only moves forward along this list.
STAGES: tuple[str, ...] = PHASES
# Share of the 0..100 progress bar each stage spans: denoising dominates wall time (tens of DiT steps).
_STAGE_BANDS: dict[str, tuple[int, int]] = {
    "queued": (0, 0),
    TEXT_ENCODER.phase: (0, 5),
    DENOISER.phase: (5, 90),
    VAE_DECODER.phase: (90, 95),
    ENHANCER.phase: (95, 98),  # enhanced jobs only
    UPLOADING: (98, 99),
}

JOB_ID_PREFIX = "video_"
# Tenants appear in index keys (`index/<tenant>/...`): a '/' would let one tenant's prefix cover another's.
_JOB_ID_RE = re.compile(r"^video_[0-9a-f]{12}[0-9a-f]{16}$")
# A request id a job keeps and sends on (an HTTP header value, a log field): printable ASCII, no spaces, so it
# can neither split a header nor forge a log line.
MAX_REQUEST_ID_LEN = 128
_REQUEST_ID_RE = re.compile(rf"[!-~]{{1,{MAX_REQUEST_ID_LEN}}}")


def new_job_id(now_ms: int | None = None) -> str:
    """`video_<12 hex ms><16 hex random>`: ids sort by creation time and carry it (see `job_created_ms`)."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    return f"{JOB_ID_PREFIX}{now_ms:012x}{secrets.token_hex(8)}"


def is_job_id(value: str) -> bool:
    return bool(_JOB_ID_RE.match(value))


def is_request_id(value: str) -> bool:
    """1..128 visible ASCII characters (0x21-0x7e): what a job stores as its `request_id`."""
    return bool(_REQUEST_ID_RE.fullmatch(value))  # fullmatch: `$` would let a trailing newline through


def job_created_ms(job_id: str) -> int:
    if not is_job_id(job_id):
        raise ValueError(f"not a job id: {job_id!r} (expected 'video_' + 28 lowercase hex digits)")
    return int(job_id[len(JOB_ID_PREFIX) : len(JOB_ID_PREFIX) + 12], 16)


def stage_index(stage: str | None) -> int:
    """Position of `stage` in STAGES; -1 for None or an unknown stage."""
    try:
        return STAGES.index(stage) if stage is not None else -1
    except ValueError:
        return -1


def stage_progress(stage: str | None, step: int = 0, total_steps: int = 0) -> int:
    """0..99 for a running job (100 is reserved for `completed`)."""
    lo, hi = _STAGE_BANDS.get(stage or "", (0, 0))
    if total_steps <= 0:
        return lo
    frac = min(max(step / total_steps, 0.0), 1.0)
    return min(99, int(lo + (hi - lo) * frac))


class JobError(BaseModel):
    code: str = Field(description="Machine-readable reason, e.g. 'internal_error', 'timeout', 'cancelled'.")
    message: str = Field(description="Human-readable detail.")


class WebhookDelivery(BaseModel):
    """The job's terminal webhook (its `video.*` event) as an obligation in the record: pending from the terminal
    write until a replica has delivered it or given up; `claimed_until` is how long the replica delivering it may
    take before another one delivers it again (same `webhook-id`: receivers deduplicate)."""

    state: Literal["pending", "delivered", "failed", "refused"] = "pending"
    attempts: int = Field(default=0, ge=0, description="HTTP attempts of the delivery that ended.")
    status_code: int | None = Field(default=None, description="Of the last response, if any.")
    error: str | None = Field(default=None, description="Why it failed (no URL, no address: client-safe).")
    claimed_until: float | None = Field(default=None, description="Unix seconds; past it any replica redelivers.")
    finished_at: float | None = None


class JobResult(BaseModel):
    video_key: str = Field(description="S3 key of the mp4.")
    cover_key: str | None = Field(default=None, description="S3 key of the cover image.")
    metadata_key: str | None = Field(default=None, description="S3 key of the metadata JSON.")


@dataclass(frozen=True)
class ChainResult:
    """What one successful pass of the stage chain gives back to the runner (the last stage returns it):
    the video's object keys, the seconds each step took and the GPUs each stage's replica held (as Ray
    assigned them: what the job is billed by)."""

    result: JobResult
    timings: dict[str, float]
    gpus: dict[str, float] = field(default_factory=dict)


class JobRecord(BaseModel):
    # extra="allow": a field written by a newer replica survives a read-modify-write by an older one during a
    # rolling upgrade instead of being silently dropped.
    model_config = ConfigDict(extra="allow")

    id: str = Field(pattern=_JOB_ID_RE.pattern, description="video_<12 hex ms><16 hex random>.")
    tenant: str = Field(
        default="default",
        pattern=TENANT_PATTERN,
        description="Owner; listing is per tenant. Used in S3 keys, hence no '/'.",
    )
    status: JobStatus = Field(default="queued")
    progress: int = Field(default=0, ge=0, le=100, description="Percent, 100 only when completed.")
    stage: str | None = Field(default="queued",
                              description="queued/encoding/denoising/decoding/(enhancing)/uploading.")
    step: int = Field(default=0, ge=0, description="Denoising step done.")
    total_steps: int = Field(default=0, ge=0)
    created_at: int = Field(description="Unix seconds.")
    started_at: int | None = Field(default=None, description="Unix seconds of the first attempt's start.")
    completed_at: int | None = Field(default=None, description="Unix seconds of the terminal transition.")
    expires_at: int | None = Field(default=None, description="Unix seconds after which the video may be removed.")
    model: str
    prompt: str
    params: GenerationParams = Field(description="What the video is generated with, resolved once at create.")
    attempts: int = Field(default=0, ge=0, description="Chain attempts started.")
    error: JobError | None = None
    result: JobResult | None = None
    lease_owner: str | None = Field(default=None, description="Replica running the job now.")
    lease_expires_at: float | None = Field(default=None, description="Unix seconds; past it anyone may take over.")
    cancel_requested: bool = False
    deleted: bool = False
    deadline_at: float | None = Field(default=None, description="Unix seconds; the job fails past it.")
    webhook_url: str | None = Field(default=None, description="Where video.* events for this job are sent.")
    request_id: str | None = Field(
        default=None, description="The create request's id (its X-Request-ID: the client's own or Serve's), sent "
                                  "as X-Request-ID with the job's webhooks. None on records older than the field.")
    user_id: str | None = Field(
        default=None, max_length=128,
        description="The caller's end user, as its request named them (Zhipu's `user_id`), for abuse tracing.")
    input_image: InputImage | None = Field(
        default=None, description="Image-to-video: the accepted input image, stored beside the video (its key, "
                                  "SHA-256 and size; never the image). Every attempt encodes these bytes.")
    webhook: WebhookDelivery | None = Field(
        default=None, description="The terminal webhook's delivery (jobs with a webhook URL); its active marker stays "
                                  "while it is pending, so a replica that dies before delivering leaves it to another.")
    billing: Literal["pending", "recorded"] | None = Field(
        default=None, description="A completed job's bill: 'pending' from its terminal write (durably: its active "
                                  "marker stays, so any replica's reclaim scan finds it) until its usage record is "
                                  "in S3, then 'recorded'. None: nothing to bill (not completed, or usage off).")
    timings: dict[str, float] = Field(default_factory=dict, description="Seconds per stage.")
    gpus: dict[str, float] = Field(
        default_factory=dict, description="GPUs each stage's replica held for this job (text_encoder, ...), as "
                                          "Ray assigned them; usage bills timings x these.")
    version: int = Field(default=0, ge=0, description="Bumped by the store on every write.")
    updated_at: float = Field(default=0.0, description="Unix seconds of the last write.")

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def obligations_pending(self) -> bool:
        """A terminal job that still owes its bill or its webhook (its active marker is the outbox entry)."""
        return self.billing == "pending" or (self.webhook is not None and self.webhook.state == "pending")

    @property
    def created_ms(self) -> int:
        return job_created_ms(self.id)

    def lease_is_free(self, now: float) -> bool:
        """Nobody holds the lease, or the holder let it expire (crashed or stuck)."""
        return self.lease_owner is None or self.lease_expires_at is None or self.lease_expires_at <= now

    def to_json_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")

    @classmethod
    def from_json_bytes(cls, data: bytes) -> JobRecord:
        return cls.model_validate_json(data)
