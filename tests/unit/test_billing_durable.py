"""Billing cannot be lost or doubled (issue 14, part 1): the terminal write of a completed job says its bill is
pending and keeps its active marker; until the usage record is in S3, any replica's reclaim scan settles it; the
record is write-once, so settling again never bills twice. Over a real JobStore, JobRunner and UsageLedger on the
local moto S3; the stage chain is instant."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from serve.admission.limits import LocalLimiter
from serve.billing.usage import UsageLedger
from serve.config import AppConfig, JobsConfig
from serve.jobs.record import ChainResult, JobRecord, JobResult, new_job_id
from serve.jobs.service import video_keys
from serve.jobs.wiring import build_ingress
from serve.stages.types import GenerationParams
from serve.storage import Storage, StorageError

PARAMS = GenerationParams(width=48, height=32, size="48x32", num_frames=9, fps=8, seconds="1",
                          num_inference_steps=4, guidance_scale=6, use_dynamic_cfg=False, seed=1)


class Instant:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def run(self, job: JobRecord) -> ChainResult:
        keys = video_keys(self.storage, job.id)
        return ChainResult(JobResult(**keys), {"text_encoder_s": 0.5, "denoiser_s": 2.0, "vae_decoder_s": 0.5})


def config(storage: Storage) -> AppConfig:
    return AppConfig(s3=storage.cfg, jobs=JobsConfig(lease_s=5, heartbeat_s=0.2, reclaim_interval_s=60,
                                                     retry_backoff_s=0),
                     usage={"gpus_per_stage": {"text_encoder": 1, "denoiser": 1, "vae_decoder": 1}})


def graph(storage: Storage, owner: str, limiter: LocalLimiter | None = None):
    return build_ingress(config(storage), storage=storage, pipeline=Instant(storage), owner=owner,
                         limiter=limiter or LocalLimiter())


def usage_keys(storage: Storage) -> list[str]:
    return [k for k in storage.list_keys(storage.key("usage", "")) if "/_days/" not in k]


def queued_job(g, tenant: str = "acme") -> JobRecord:
    job = JobRecord(id=new_job_id(), tenant=tenant, created_at=0, model="m", prompt="p", params=PARAMS,
                    total_steps=4)
    return g.store.create(job)


@pytest.fixture
def usage_down(monkeypatch: pytest.MonkeyPatch):
    """S3 refuses every usage write until `state["down"]` is False (the rest of S3 works)."""
    state = {"down": True, "refused": 0}
    real = UsageLedger.record

    def record(self: UsageLedger, rec: Any) -> bool:
        if state["down"]:
            state["refused"] += 1
            raise StorageError("put usage/... failed: ServiceUnavailable")
        return real(self, rec)

    monkeypatch.setattr(UsageLedger, "record", record)
    return state


async def run_to_end(g, job: JobRecord) -> JobRecord:
    g.runner.submit(job.id, job.tenant)
    for _ in range(500):
        rec = g.store.get(job.id)
        if rec.is_terminal and job.id not in g.runner.running:
            return rec
        await asyncio.sleep(0.01)
    raise AssertionError("the job did not end")


def test_a_job_completed_during_a_usage_outage_is_billed_once_s3_is_back(storage: Storage, usage_down) -> None:
    async def main() -> None:
        limiter = LocalLimiter()
        g = graph(storage, "ingress-a", limiter)
        jobs = [await run_to_end(g, queued_job(g)) for _ in range(3)]
        assert usage_down["refused"] == 3 and usage_keys(storage) == []
        for job in jobs:  # the bill is pending in the record, and the job keeps its outbox marker
            assert job.status == "completed" and job.billing == "pending"
            assert job.id in g.store.list_active_ids()
        await g.runner.reclaim_once()  # S3 still refuses: still pending, nothing lost
        assert all(g.store.get(j.id).billing == "pending" for j in jobs)

        usage_down["down"] = False
        await asyncio.sleep(0.25)  # a heartbeat after completion: the scan settles what is left over
        await g.runner.reclaim_once()
        assert len(usage_keys(storage)) == 3
        for job in jobs:
            assert g.store.get(job.id).billing == "recorded" and job.id not in g.store.list_active_ids()
        assert (await limiter.snapshot())["usage"]["acme"]  # and the daily quota was charged
        charged = sum((await limiter.snapshot())["usage"]["acme"].values())
        assert charged == pytest.approx(3 * 3.0)
        # settling again (another replica, a replay) bills nothing twice
        for job in jobs:
            assert await g.runner.settle(g.store.get(job.id).model_copy(update={"billing": "pending"}))
        assert len(usage_keys(storage)) == 3
        assert sum((await limiter.snapshot())["usage"]["acme"].values()) == pytest.approx(charged)
        await g.runner.stop()

    asyncio.run(main())


def test_a_replica_that_dies_after_the_terminal_write_leaves_the_bill_to_another(storage: Storage) -> None:
    async def main() -> None:
        a, b = graph(storage, "ingress-a"), graph(storage, "ingress-b")
        job = queued_job(a)
        # replica A takes the job and writes its terminal transition, then dies before its end-of-job hook
        assert a.store.try_acquire_lease(job.id, "ingress-a", 5) is not None
        done = a.store.finish(job.id, "ingress-a", "completed", result=JobResult(**video_keys(storage, job.id)),
                              timings={"denoiser_s": 1.0}, bill=True)
        assert done.billing == "pending" and usage_keys(storage) == []
        await asyncio.sleep(0.25)
        await b.runner.reclaim_once()  # replica B's scan finds the pending bill
        assert len(usage_keys(storage)) == 1 and b.store.get(job.id).billing == "recorded"
        await a.runner.stop()
        await b.runner.stop()

    asyncio.run(main())


def test_a_video_is_not_deleted_unbilled(storage: Storage, usage_down) -> None:
    async def main() -> None:
        g = graph(storage, "ingress-a")
        job = await run_to_end(g, queued_job(g))
        assert job.billing == "pending"
        from serve.errors import ServiceError

        with pytest.raises(ServiceError) as info:  # S3 still refuses the usage record: the delete waits
            await g.service.delete(job.id, job.tenant)
        assert info.value.status == 503 and info.value.code == "billing_pending"
        assert g.store.get(job.id) is not None
        usage_down["down"] = False
        await g.service.delete(job.id, job.tenant)  # bills first, then deletes
        assert len(usage_keys(storage)) == 1 and g.store.get(job.id) is None
        await g.runner.stop()

    asyncio.run(main())


def test_failed_and_cancelled_jobs_owe_nothing_and_drop_their_marker(storage: Storage) -> None:
    g = graph(storage, "ingress-a")
    job = queued_job(g)
    ended = g.store.finish(job.id, None, "cancelled", bill=True)
    assert ended.billing is None and job.id not in g.store.list_active_ids()
