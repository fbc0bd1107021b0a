"""A job record as the API shows it: the `Video` object, with fresh presigned URLs once it is completed.

Used by the service for every answer and by the end-of-job hook for the webhook payload.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from serve.api.wire import Video, VideoError, WebhookStatus
from serve.config import AppConfig
from serve.jobs.record import JobRecord, stage_progress
from serve.storage import Storage


def progress_of(job: JobRecord) -> int:
    if job.status == "completed":
        return 100
    if job.status != "in_progress":
        return 0
    return stage_progress(job.stage, job.step, job.total_steps)



class VideoView:
    """`view(job)` -> the job's `Video`; presigns its media URLs per call (they expire)."""

    def __init__(self, config: AppConfig, storage: Storage, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._storage = storage
        self._clock = clock

    def __call__(self, job: JobRecord) -> Video:
        p = job.params
        urls: dict[str, Any] = {}
        if job.status == "completed" and job.result:
            ttl = self._config.s3.presign_expires_s
            urls = {
                "video_url": self._storage.presign_get(job.result.video_key, filename=f"{job.id}.mp4",
                                                       content_type="video/mp4"),
                "thumbnail_url": (self._storage.presign_get(job.result.cover_key, content_type="image/jpeg")
                                  if job.result.cover_key else None),
                "url_expires_at": int(self._clock()) + ttl,
            }
        return Video(
            id=job.id, created_at=job.created_at, completed_at=job.completed_at, expires_at=job.expires_at,
            status=job.status, progress=progress_of(job), model=job.model, prompt=job.prompt,
            seconds=p.seconds, size=p.size,
            error=VideoError(**job.error.model_dump()) if job.error else None,
            stage=job.stage if job.status == "in_progress" else None, step=job.step,
            total_steps=job.total_steps, num_frames=p.delivered_frames, fps=p.delivered_fps, seed=p.seed,
            num_inference_steps=p.num_inference_steps, guidance_scale=p.guidance_scale,
            use_dynamic_cfg=p.use_dynamic_cfg, quality=p.quality, image_fit=p.image_fit if p.image_input else None,
            negative_prompt=p.negative_prompt,
            attempts=job.attempts, deadline_at=int(job.deadline_at) if job.deadline_at else None,
            request_id=job.request_id, **urls,
            webhook=None if job.webhook is None else WebhookStatus(**job.webhook.model_dump(
                include={"state", "attempts", "status_code", "error"})),
        )
