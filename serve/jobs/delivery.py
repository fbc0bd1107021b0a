"""A finished video reaches S3 only while its job still wants it (the VAE replica's last step, job policy).

A job cancelled or deleted before or while its video was uploaded loses what was uploaded (one read of its record,
after the upload, decides), so nothing outlives its record (the delete may have listed the keys before they
existed).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from serve.jobs.record import ChainResult, JobResult
from serve.jobs.store import JobStore
from serve.media.publishing import publish_video, video_keys
from serve.stages.types import GenerationRequest
from serve.storage import Storage


class NoLongerWanted(RuntimeError):
    """The job was cancelled or deleted before its video was published (nothing of it is left in S3)."""


def still_wanted(store: JobStore, job_id: str) -> bool:
    job = store.get(job_id)
    return job is not None and not job.cancel_requested and not job.is_terminal


def publish_if_wanted(store: JobStore, storage: Storage, req: GenerationRequest, frames: np.ndarray,
                      timings: dict[str, float], computed: dict | None = None, *, gpus: dict[str, float] | None = None,
                      publish: Callable[..., dict[str, float]] = publish_video) -> ChainResult:
    """Encode and upload `frames` for `req`'s job unless the job is no longer wanted; the chain's result.
    `publish` is `publish_video` (tests wrap it to land a delete mid-upload)."""
    keys = video_keys(storage, req.job_id)
    # no read before the upload: a job cancelled meanwhile has its chain cancelled by the runner, and the one read
    # after the upload (the decision that matters) deletes what a job deleted in between would otherwise keep
    added = publish(storage, keys, req, frames, timings, computed)
    if not still_wanted(store, req.job_id):
        storage.delete_many(list(keys.values()))
        raise NoLongerWanted(f"job {req.job_id} was cancelled or deleted while its video was uploaded")
    return ChainResult(result=JobResult(**keys), timings={**timings, **added}, gpus=dict(gpus or {}))
