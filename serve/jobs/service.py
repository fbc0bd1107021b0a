"""What the `/v1/videos` endpoints do, independent of HTTP and of Ray: create, read, list, delete, content.

The ingress deployment builds one `VideoService` per replica around the shared S3 job store; the
FastAPI routes in `serve/api/routes.py` only translate HTTP to these calls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone

from serve.admission.gate import Admission, Admitted
from serve.api.wire import (
    CreateVideoRequest,
    ModelInfo,
    ModelList,
    UploadedFile,
    Video,
    VideoDeleted,
    VideoList,
)
from serve.billing.usage import UsageLedger, UsageResponse, parse_usage_period
from serve.config import AppConfig, ModelConfig
from serve.errors import ServiceError
from serve.jobs.params import resolve_request
from serve.jobs.record import JobError, JobRecord, is_job_id, new_job_id
from serve.jobs.runner import JobRunner
from serve.jobs.store import JobStore
from serve.jobs.view import VideoView
from serve.logcontext import bind_job
from serve.media.publishing import input_image_key, job_object_keys, video_keys  # noqa: F401 - video_keys: callers import it here
from serve.media.reference import AcceptedImage, accept_image, has_image
from serve.stages.types import InputImage
from serve.storage import NotFound, Storage
from serve.tenancy.keys import Principal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Content:
    """A completed video's stored object (`variant` video or thumbnail), before any byte is read."""

    job_id: str
    variant: str
    key: str
    size: int
    media_type: str
    filename: str


def _gone(job_id: str, variant: str) -> ServiceError:
    # the record outlived its object (a lifecycle rule after `expires_at`, or a manual cleanup)
    return ServiceError(404, f"the {variant} of {job_id} is no longer stored", param="video_id", code="not_found")


class VideoService:
    """Built by `serve.jobs.wiring.build_ingress` (the ingress and the tests alike)."""

    wait_first_poll_s = 0.2  # `wait`: the first re-read of the record; doubling up to wait_max_poll_s
    wait_max_poll_s = 1.0

    def __init__(self, config: AppConfig, store: JobStore, storage: Storage, runner: JobRunner,
                 admission: Admission, ledger: UsageLedger, view: VideoView, clock=time.time) -> None:
        self._config = config
        self._store = store
        self._storage = storage
        self._runner = runner
        self._clock = clock
        self._view = view
        self.ledger = ledger
        self.admission = admission

    def principal(self, tenant: str) -> Principal:
        """A caller known only by tenant (tests, tools): the legacy keys' plan."""
        return Principal(tenant=tenant, plan=self._config.keys.legacy_plan, key_id="internal")

    # -- create ----------------------------------------------------------------------------------
    async def create(self, req: CreateVideoRequest, principal: Principal | str,
                     idempotency_key: str | None = None, headers: dict[str, str] | None = None, *,
                     request_id: str | None = None, user_id: str | None = None, upload: UploadedFile | None = None,
                     image_param: str = "input_reference") -> Video:
        """Validate and admit, write the job record (queued), start driving it; returns at once.

        `headers` receives the rate-limit headers (and `Idempotent-Replayed` for a replay). `request_id` and
        `user_id` (the caller's end user) are stored on the job. An image-to-video request's image is
        `req.input_reference` or `upload` (a multipart file); refusals of it name `image_param`."""
        if isinstance(principal, str):
            principal = self.principal(principal)
        model = self._config.model if req.model is None else self._config.model_named(req.model)
        if model is None:
            names = [n for m in self._config.all_models() for n in m.names]
            raise ServiceError(400, f"unknown model {req.model!r}; this deployment serves {names}", param="model",
                           code="model_not_found")
        params = resolve_request(req, model, self._config.api)
        self._check_image_fits(model, has_image(req.input_reference, upload), image_param)
        # the plan may leave image input out: refused before a byte of the image is read
        self.admission.check_plan(params, principal)
        accepted = await accept_image(req.input_reference, upload, self._config.images, param=image_param)
        now = self._clock()
        # an idempotent retry sends the same image in any form: the image's hash stands for it in the fingerprint
        fingerprint = None if accepted is None else {"input_reference": {"sha256": accepted.image.sha256}}
        admitted = await self.admission.check(req, params, principal, new_job_id(int(now * 1000)), idempotency_key,
                                              fingerprint=fingerprint)
        if headers is not None:
            headers.update(admitted.headers)
        if admitted.replay is not None:
            if headers is not None:
                headers["Idempotent-Replayed"] = "true"
            return self.to_wire(admitted.replay)
        bind_job(admitted.job_id, principal.tenant)  # the rest of this request's log lines are about this job
        job = JobRecord(
            id=admitted.job_id, tenant=principal.tenant, status="queued", progress=0, stage="queued",
            step=0, total_steps=params.num_inference_steps, created_at=int(now), model=model.name,
            prompt=req.prompt, params=params, updated_at=now,
            deadline_at=now + req.deadline_seconds if req.deadline_seconds else None, webhook_url=req.webhook_url,
            request_id=request_id, user_id=user_id,
            input_image=None if accepted is None else self._input_image(admitted.job_id, accepted),
        )
        # shielded: a client that disconnects mid-create must not leave a written record whose slot and
        # idempotency claim were given back (a retry would then create a second job)
        image_data = None if accepted is None else accepted.image.data
        job = await asyncio.shield(asyncio.ensure_future(self._create_and_submit(job, admitted, image_data)))
        return self.to_wire(job)

    def _check_image_fits(self, model: ModelConfig, given: bool, param: str) -> None:
        """An image-to-video model needs an image; a text-to-video model takes none. Each 400 names the models
        that do what the request asked."""
        if model.preset().image_input == given:
            return
        takes = [m.name for m in self._config.all_models() if m.preset().image_input == given]
        if given:
            raise ServiceError(400, f"{model.name} ({model.family}) generates from text and takes no {param}; models "
                                    f"that take an image: {takes or 'none on this deployment'}", param=param,
                               code="image_not_supported")
        raise ServiceError(400, f"{model.name} ({model.family}) generates from an image and a prompt: send the image "
                                f"as {param}; text-to-video models: {takes or 'none on this deployment'}",
                           param=param, code="image_required")

    def _input_image(self, job_id: str, accepted: AcceptedImage) -> InputImage:
        image = accepted.image
        return InputImage(key=input_image_key(self._storage, job_id, image.format), sha256=image.sha256,
                          size_bytes=image.size_bytes, media_type=image.media_type, width=image.width,
                          height=image.height, source=accepted.source)

    async def _create_and_submit(self, job: JobRecord, admitted: Admitted, image: bytes | None = None) -> JobRecord:
        try:
            if job.input_image is not None:  # the image first: a record never names an image that is not stored
                await asyncio.to_thread(self._storage.put_bytes, job.input_image.key, image,
                                        job.input_image.media_type)
            try:
                job = await asyncio.to_thread(self._store.create, job)
            except Exception:
                if job.input_image is not None:
                    await asyncio.to_thread(self._delete_quietly, job.input_image.key)
                raise
        except Exception:
            await self.admission.failed_to_create(job.tenant, admitted)
            raise
        self._runner.submit(job.id, job.tenant, job.model)
        return job

    def _delete_quietly(self, key: str) -> None:
        try:
            self._storage.delete_many([key])
        except Exception:  # noqa: BLE001 - an orphan image costs storage, not correctness
            log.warning("could not delete the input image of a job that was not created", exc_info=True)

    # -- read ------------------------------------------------------------------------------------
    async def _load(self, job_id: str, tenant: str) -> JobRecord:
        job = await asyncio.to_thread(self._store.get, job_id) if is_job_id(job_id) else None
        if job is None or job.tenant != tenant:
            raise ServiceError(404, f"no video with id {job_id!r}", param="video_id", code="not_found")
        return job

    async def get(self, job_id: str, tenant: str) -> Video:
        job = await self._load(job_id, tenant)
        if job.status == "in_progress":
            job = await asyncio.to_thread(self._store.merge_progress, job)
        return self._placed(job)

    def _placed(self, job: JobRecord) -> Video:
        """The job's `Video`; a queued one with its place in the cluster's queue and its estimated start, as far
        as this replica's last reclaim scan knows them (`JobRunner.backlog`)."""
        video = self.to_wire(job)
        backlog = self._runner.backlog
        if job.status != "queued" or backlog is None:
            return video
        start = backlog.estimated_start(job.id, job.tenant, self._clock())
        return video.model_copy(update={"queue_position": backlog.position(job.id, job.tenant),
                                        "estimated_start_at": None if start is None else int(start)})

    async def wait(self, job_id: str, tenant: str, timeout_s: float) -> Video:
        """The job once it ended, or as it stands after `timeout_s` (POST /v1/videos/sync). Reads the record at
        growing intervals (0.2 s up to 1 s), sooner when this replica sees the job end (`JobRunner.ended`); a
        job that outlives the wait is not touched: it keeps running."""
        deadline = time.monotonic() + timeout_s
        pause = self.wait_first_poll_s
        job = await self._load(job_id, tenant)
        while not job.is_terminal and (left := deadline - time.monotonic()) > 0:
            # the terminal record itself when the job ends here: no read; else (another replica, or the pause
            # is over) the record as it stands
            job = await self._runner.ended(job_id, min(pause, left)) or await self._load(job_id, tenant)
            pause = min(pause * 2, self.wait_max_poll_s)
        if job.status == "in_progress":
            job = await asyncio.to_thread(self._store.merge_progress, job)
        return self._placed(job)

    def models(self) -> ModelList:
        """The served models, the default first, with what a request may ask of each."""
        out = []
        for m in self._config.all_models():
            p = m.preset()
            size_factors = m.enhance.size_factors() if m.enhance is not None else []
            fps_factors = m.enhance.fps_factors() if m.enhance is not None else []
            out.append(ModelInfo(id=m.name, default=m.name == self._config.model.name, aliases=list(m.aliases),
                                 family=m.family, width=p.width, height=p.height, num_frames=p.num_frames, fps=p.fps,
                                 frame_rule=f"{p.frame_multiple}N+1", max_frames=p.max_frames, max_side=p.max_side,
                                 max_steps=p.max_steps, inputs=["text", "image"] if p.image_input else ["text"],
                                 size_rule=p.size_rule_text(), native_sizes=[p.size], size_factors=size_factors,
                                 fps_factors=fps_factors, deliverable_fps=[p.fps, *(p.fps * f for f in fps_factors)]))
        return ModelList(data=out)

    async def list(self, after: str | None, limit: int, order: str = "desc", *, tenant: str) -> VideoList:
        if not 1 <= limit <= 100:
            raise ServiceError(400, f"limit must be 1..100, got {limit}", param="limit", code="invalid_value")
        if order not in ("asc", "desc"):
            raise ServiceError(400, f"order must be 'asc' (oldest first) or 'desc' (newest first), got {order!r}",
                               param="order", code="invalid_value")
        if after is not None and not is_job_id(after):
            raise ServiceError(400, f"after must be a video id from a previous page, got {after!r}", param="after",
                           code="invalid_value")
        jobs, has_more = await asyncio.to_thread(self._store.list, limit, after, tenant=tenant, order=order)
        data = await asyncio.to_thread(lambda: [self.to_wire(j) for j in jobs])  # presigning is CPU work
        return VideoList(data=data, has_more=has_more, first_id=data[0].id if data else None,
                         last_id=data[-1].id if data else None)

    async def content(self, job_id: str, variant: str, tenant: str) -> Content:
        """The stored object of a completed video's `variant` (size known, nothing read yet)."""
        job = await self._load(job_id, tenant)
        if variant not in ("video", "thumbnail"):
            raise ServiceError(400, f"variant must be 'video' or 'thumbnail', got {variant!r}", param="variant",
                           code="invalid_value")
        if job.status != "completed" or not job.result:
            raise ServiceError(409, f"video {job_id} is {job.status}; content is available once it is completed",
                           param="video_id", code="video_not_ready")
        key = job.result.video_key if variant == "video" else job.result.cover_key
        if key is None:
            raise ServiceError(404, f"video {job_id} has no {variant}", param="variant", code="not_found")
        try:
            info = await asyncio.to_thread(self._storage.head, key)
        except NotFound:
            raise _gone(job_id, variant) from None
        mp4 = variant == "video"
        return Content(job_id=job_id, variant=variant, key=key, size=info.size,
                       media_type="video/mp4" if mp4 else "image/jpeg", filename=f"{job_id}.{'mp4' if mp4 else 'jpg'}")

    def open_content(self, content: Content, start: int, end: int) -> Iterator[bytes]:
        """Bytes `start..end` (inclusive) of `content`, streamed from S3 (blocking: run it in a thread)."""
        try:
            return self._storage.open_range(content.key, start, end)
        except NotFound:
            raise _gone(content.job_id, content.variant) from None

    def content_url(self, content: Content) -> str:
        """A presigned S3 URL of `content` (blocking), for `api.content_redirect`."""
        return self._storage.presign_get(content.key, filename=content.filename, content_type=content.media_type)

    # -- cancel ----------------------------------------------------------------------------------
    async def cancel(self, job_id: str, tenant: str) -> Video:
        """Stop the job at the next stage boundary or denoising step; it ends `cancelled`."""
        job = await self._load(job_id, tenant)
        if job.is_terminal:
            raise ServiceError(409, f"video {job_id} already ended ({job.status}); nothing to cancel",
                           param="video_id", code="invalid_state")

        def request(rec: JobRecord) -> JobRecord | None:
            if rec.is_terminal or rec.cancel_requested:
                return None
            return rec.model_copy(update={"cancel_requested": True, "updated_at": self._clock()})

        await asyncio.to_thread(self._store.update, job_id, request)
        if not self._runner.cancel_local(job_id):
            # nobody here drives it: end it now if nobody holds it (queued), else its owner's heartbeat will
            ended = await asyncio.to_thread(self._store.finish, job_id, None, "cancelled",
                                            error=JobError(code="cancelled", message="the job was cancelled"))
            if ended is not None:
                await self._runner.finished(ended)
        return await self.get(job_id, tenant)

    # -- delete ----------------------------------------------------------------------------------
    async def delete(self, job_id: str, tenant: str) -> VideoDeleted:
        """Delete the job and its objects; a running chain is cancelled (its owner loses the lease)."""
        job = await self._load(job_id, tenant)
        if job.billing == "pending" and not await self._runner.settle(job):
            # the delete would take the bill's outbox marker with it: a video is never deleted unbilled
            raise ServiceError(503, f"video {job_id} is still being billed; retry the delete shortly",
                               code="billing_pending", headers={"Retry-After": "5"})
        # objects first, record last: a DELETE that fails half-way can be retried (the record still answers)
        await asyncio.to_thread(self._storage.delete_many, job_object_keys(self._storage, job))
        job = await asyncio.to_thread(self._store.delete, job_id)
        self._runner.cancel_local(job_id)  # at once if this replica drives it; others see it at their heartbeat
        if job is not None:
            await self.admission.release(job.tenant, job_id)
        return VideoDeleted(id=job_id)

    # -- usage -----------------------------------------------------------------------------------
    async def usage(self, tenant: str, start: str | None, end: str | None) -> UsageResponse:
        today = datetime.fromtimestamp(self._clock(), timezone.utc).date()
        first, last = parse_usage_period(start, end, today, self._config.usage.max_range_days)
        summary = await asyncio.to_thread(self.ledger.summarize, tenant, first, last)
        return summary.to_wire()

    def to_wire(self, job: JobRecord) -> Video:
        return self._view(job)
