"""Job policy at the VAE replica's last step (serve/jobs/delivery.py), without Ray: a video reaches S3 only
while its job still wants it, and a delete that lands during the upload leaves nothing behind."""

from __future__ import annotations

import numpy as np
import pytest

from serve.config import JobsConfig, S3Config
from serve.jobs.delivery import NoLongerWanted, publish_if_wanted, still_wanted
from serve.jobs.record import JobRecord, new_job_id
from serve.jobs.store import JobStore
from serve.media import publishing
from serve.media.publishing import video_keys
from serve.stages.types import GenerationRequest
from serve.storage import Storage
from tests.params import example_params

FRAMES = (np.random.default_rng(0).random((9, 48, 64, 3)) * 255).astype(np.uint8)


@pytest.fixture
def store(s3_config: S3Config) -> JobStore:
    storage = Storage.from_config(s3_config)
    storage.ensure_bucket()
    return JobStore.from_config(storage, JobsConfig())


def _job(store: JobStore, **fields) -> tuple[JobRecord, GenerationRequest]:
    params = example_params(width=64, height=48, num_frames=9, num_inference_steps=2)
    job = store.create(JobRecord(id=new_job_id(), created_at=0, model="m", prompt="a cat", params=params,
                                 status="in_progress", **fields))
    return job, GenerationRequest(job_id=job.id, prompt=job.prompt, negative_prompt=None, params=params.sampling,
                                  model="m")


def _objects(store: JobStore, job_id: str) -> list[str]:
    return [k for k in video_keys(store.storage, job_id).values() if store.storage.exists(k)]


def test_a_wanted_job_gets_its_objects_and_the_chain_result(store: JobStore):
    job, req = _job(store)
    out = publish_if_wanted(store, store.storage, req, FRAMES, {"denoiser_s": 1.0})
    assert out.result.video_key == video_keys(store.storage, job.id)["video_key"]
    assert set(out.timings) == {"denoiser_s", "encode_s", "upload_s"}
    assert len(_objects(store, job.id)) == 3


def test_a_cancelled_job_gets_nothing(store: JobStore):
    job, req = _job(store, cancel_requested=True)
    assert not still_wanted(store, job.id)
    with pytest.raises(NoLongerWanted, match="cancelled or deleted while"):
        publish_if_wanted(store, store.storage, req, FRAMES, {})
    assert _objects(store, job.id) == []  # uploaded, then removed: one read of the record decides


def test_a_delete_during_the_upload_leaves_nothing_behind(store: JobStore):
    job, req = _job(store)

    def upload_then_deleted(*args, **kwargs):  # the tenant's DELETE lands while the objects are written
        added = publishing.publish_video(*args, **kwargs)
        assert len(_objects(store, job.id)) == 3
        store.delete(job.id)
        return added

    with pytest.raises(NoLongerWanted, match="deleted while"):
        publish_if_wanted(store, store.storage, req, FRAMES, {}, publish=upload_then_deleted)
    assert _objects(store, job.id) == []
