"""Retention keeps its word (issue 14, part 5): after `expires_at` a job's objects, input image, record and index
entries are gone and it answers 404; usage records stay; a job still within retention, or unbilled, is kept; the
S3 lifecycle rule covers the objects. Over a real JobStore on the local moto S3."""

from __future__ import annotations

import asyncio

import pytest

from serve.admission.limits import LocalLimiter
from serve.config import AppConfig, JobsConfig
from serve.errors import ServiceError
from serve.jobs.record import JobRecord, JobResult, new_job_id
from serve.jobs.retention import RULE_ID, apply_lifecycle
from serve.jobs.service import video_keys
from serve.jobs.wiring import build_ingress
from serve.stages.types import GenerationParams, InputImage
from serve.storage import Storage

DAY = 86400
RETENTION = 7 * DAY
PARAMS = GenerationParams(width=48, height=32, size="48x32", num_frames=9, fps=8, seconds="1",
                          num_inference_steps=4, guidance_scale=6, use_dynamic_cfg=False, seed=1)


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Never:
    async def run(self, job: JobRecord):  # the sweep never runs a chain
        raise AssertionError("no chain runs here")


def graph(storage: Storage, clock: Clock):
    cfg = AppConfig(s3=storage.cfg, jobs=JobsConfig(retention_s=RETENTION, lease_s=5, heartbeat_s=1))
    return build_ingress(cfg, storage=storage, pipeline=Never(), owner="ingress-a", limiter=LocalLimiter(),
                         clock=clock)


def completed_job(g, storage: Storage, tenant: str, created: float, completed: float, *, image: bool = False,
                  billing: str | None = "recorded") -> JobRecord:
    job_id = new_job_id(int(created * 1000))
    keys = video_keys(storage, job_id)
    for key in keys.values():
        storage.put_bytes(key, b"x", "application/octet-stream")
    input_image = None
    if image:
        input_image = InputImage(key=storage.key("videos", f"{job_id}.input.png"), sha256="0" * 64, size_bytes=1,
                                 media_type="image/png", width=16, height=16)
        storage.put_bytes(input_image.key, b"x", "image/png")
    g.store.create(JobRecord(id=job_id, tenant=tenant, created_at=int(created), model="m", prompt="p",
                             params=PARAMS, total_steps=4, input_image=input_image))
    rec = g.store.finish(job_id, None, "completed", result=JobResult(**keys), bill=billing is not None)
    return g.store.update(job_id, lambda r: r.model_copy(update={"completed_at": int(completed),
                                                                  "expires_at": int(completed) + RETENTION,
                                                                  "billing": billing})) if rec else rec


def test_expired_jobs_are_deleted_everywhere_and_the_rest_stays(storage: Storage) -> None:
    now = 1_800_000_000.0
    clock = Clock(now)
    g = graph(storage, clock)
    old = completed_job(g, storage, "acme", now - 10 * DAY, now - 9 * DAY, image=True)
    young = completed_job(g, storage, "acme", now - 3 * DAY, now - 3 * DAY)
    late = completed_job(g, storage, "globex", now - 8 * DAY, now - 2 * DAY)  # created long ago, completed late
    usage = storage.key("usage", "acme", "2027-01-01", "x.json")
    storage.put_bytes(usage, b"{}", "application/json")

    deleted = asyncio.run(g.sweeper.sweep())
    assert deleted == [old.id]
    left = storage.list_keys(storage.key(""))
    assert not [k for k in left if old.id in k]  # video, cover, metadata, input image, record, index entries
    assert g.store.get(young.id) is not None and g.store.get(late.id) is not None
    assert usage in left  # the bill stays

    async def answer() -> None:
        with pytest.raises(ServiceError) as info:
            await g.service.get(old.id, "acme")
        assert info.value.status == 404
        page = await g.service.list(None, 10, tenant="acme")
        assert [v.id for v in page.data] == [young.id]

    asyncio.run(answer())
    clock.t = now + 6 * DAY  # later, the late one expires too (its own expires_at, not its creation)
    assert set(asyncio.run(g.sweeper.sweep())) == {late.id, young.id}
    assert [k for k in storage.list_keys(storage.key("")) if k.startswith(storage.key("jobs", ""))] == []


def test_an_unbilled_job_is_billed_before_it_is_deleted(storage: Storage) -> None:
    now = 1_800_000_000.0
    g = graph(storage, Clock(now))
    job = completed_job(g, storage, "acme", now - 10 * DAY, now - 9 * DAY, billing="pending")
    assert asyncio.run(g.sweeper.sweep()) == [job.id]
    assert [k for k in storage.list_keys(storage.key("usage", "acme", "")) if job.id in k]  # billed on the way


def test_the_lifecycle_rule_expires_the_videos_prefix_and_keeps_other_rules(storage: Storage) -> None:
    storage.put_lifecycle([{"ID": "someone-elses", "Status": "Enabled", "Filter": {"Prefix": "logs/"},
                            "Expiration": {"Days": 30}}])
    apply_lifecycle(storage, RETENTION)
    rules = {r["ID"]: r for r in storage.get_lifecycle()}
    assert set(rules) == {"someone-elses", RULE_ID}
    ours = rules[RULE_ID]
    assert ours["Filter"]["Prefix"] == storage.key("videos", "") and ours["Expiration"]["Days"] == 8
    apply_lifecycle(storage, 2 * DAY)  # applying again replaces ours only
    rules = {r["ID"]: r for r in storage.get_lifecycle()}
    assert rules[RULE_ID]["Expiration"]["Days"] == 3 and "someone-elses" in rules
