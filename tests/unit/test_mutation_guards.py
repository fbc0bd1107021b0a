"""Exact-boundary guards that a mutation run showed no unit test held: a foreign tenant's DELETE, one GPU-second
charge per completed job, progress bounds while running, and the plan ceilings at exactly the limit and one over.

Same fakes as test_routes/test_runner (a fake stage chain injected through `JobRunner`), real JobStore and usage
ledger on the local moto S3; no Ray, no torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest

from serve.admission.limits import LocalLimiter
from serve.api.wire import CreateVideoRequest
from serve.billing.usage import UsageLedger, UsageRecord
from serve.config import AppConfig, UsageConfig
from serve.config.tenancy import Plan, PlansConfig
from serve.errors import ServiceError
from serve.jobs.hooks import JobEnd
from serve.jobs.record import STAGES, JobRecord, new_job_id, stage_progress
from serve.jobs.runner import JobRunner
from serve.jobs.service import VideoService, video_keys
from serve.jobs.store import JobStore
from serve.jobs.view import progress_of
from serve.jobs.wiring import build_ingress
from serve.storage import Storage
from serve.tenancy.plans import check_cost, cost_of
from tests.params import example_params
from tests.unit.test_routes import SMALL, WritesVideo, video_bytes
from tests.unit.test_runner import (
    TIMINGS,
    Succeeds,
    jobs_config,
    make_job,
    until_ended,
    wait_for,
)

GPUS = {"text_encoder": 0.5, "denoiser": 2.0, "vae_decoder": 1.0}


def run(coro: Awaitable[None]) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def raised(excinfo: pytest.ExceptionInfo[ServiceError]) -> tuple[int, str | None, str | None]:
    e = excinfo.value
    return e.status, e.code, e.param


# ---- 1. a tenant cannot delete another tenant's video ---------------------------------------------------------


def _service(storage: Storage, pipeline) -> tuple[VideoService, JobStore, JobRunner]:
    config = AppConfig(s3=storage.cfg, jobs=jobs_config())
    graph = build_ingress(config, storage=storage, pipeline=pipeline, owner="ingress-unit")
    return graph.service, graph.store, graph.runner


async def _refused_like_an_unknown_id(service: VideoService, job_id: str, tenant: str) -> None:
    unknown = new_job_id()
    with pytest.raises(ServiceError) as unknown_err:
        await service.delete(unknown, tenant)
    with pytest.raises(ServiceError) as foreign_err:
        await service.delete(job_id, tenant)
    # indistinguishable from an id that does not exist: no hint that the job is there
    assert raised(foreign_err) == raised(unknown_err) == (404, "not_found", "video_id")
    assert foreign_err.value.message == unknown_err.value.message.replace(unknown, job_id)


def test_another_tenants_delete_of_a_completed_video_is_not_found_and_keeps_it(storage: Storage) -> None:
    async def main() -> None:
        service, store, runner = _service(storage, WritesVideo(storage))
        try:
            vid = (await service.create(CreateVideoRequest(prompt="a cat", **SMALL), "tenant-a")).id
            await until_ended(store, vid, runner)
            before = sorted(storage.list_keys(storage.key("")))

            await _refused_like_an_unknown_id(service, vid, "tenant-b")

            assert sorted(storage.list_keys(storage.key(""))) == before
            assert all(storage.exists(k) for k in video_keys(storage, vid).values())
            assert (await service.get(vid, "tenant-a")).status == "completed"
            content = await service.content(vid, "video", "tenant-a")
            read = b"".join(service.open_content(content, 0, content.size - 1))
            assert (read, content.media_type) == (video_bytes(vid), "video/mp4")
            assert [v.id for v in (await service.list(None, 10, tenant="tenant-a")).data] == [vid]
            # the owner still can
            assert (await service.delete(vid, "tenant-a")).deleted
        finally:
            await runner.stop()

    run(main())


def test_another_tenants_delete_of_a_running_video_does_not_stop_it(storage: Storage) -> None:
    async def main() -> None:
        pipeline = WritesVideo(storage)
        pipeline.gate.clear()
        service, store, runner = _service(storage, pipeline)
        try:
            vid = (await service.create(CreateVideoRequest(prompt="a cat", **SMALL), "tenant-a")).id
            await wait_for(lambda: pipeline.calls == 1, "the chain to start")

            await _refused_like_an_unknown_id(service, vid, "tenant-b")

            assert vid in runner.running and pipeline.cancelled == 0
            assert (await service.get(vid, "tenant-a")).status == "in_progress"
            pipeline.gate.set()
            rec = await until_ended(store, vid, runner)
        finally:
            await runner.stop()
        assert rec.status == "completed" and pipeline.calls == 1 and pipeline.cancelled == 0
        assert all(storage.exists(k) for k in video_keys(storage, vid).values())

    run(main())


# ---- 2. the end-of-job hook bills a job once, however often it runs --------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["one-after-the-other", "at-once"])
def test_end_of_job_hook_run_twice_records_and_charges_once(storage: Storage, overlap: bool) -> None:
    async def main() -> None:
        config = AppConfig(s3=storage.cfg, jobs=jobs_config(), usage=UsageConfig(gpus_per_stage=GPUS))
        limiter = LocalLimiter(config.limits)
        ledger = UsageLedger(storage)
        hook = JobEnd(config, limiter, ledger, None, view=None)
        store = JobStore.from_config(storage, config.jobs)
        job = make_job(store, tenant="acme")
        runner = JobRunner(store, Succeeds(), config.jobs, owner="ingress-a", on_finished=hook)
        try:
            runner.submit(job.id, job.tenant)
            done = await until_ended(store, job.id, runner)  # the hook ran once here
            # and again, as a second replica or a retried finish would run it
            if overlap:
                await asyncio.gather(runner.finished(done), runner.finished(done))
            else:
                await runner.finished(done)
        finally:
            await runner.stop()

        rec = UsageRecord.from_job(done, GPUS)
        assert rec.gpu_seconds_total == pytest.approx(0.1 * 0.5 + 1.5 * 2.0 + 0.2 * 1.0) and done.timings == TIMINGS
        assert storage.list_keys(storage.key("usage", "acme", "")) == [ledger.record_key("acme", rec.day, job.id)]
        assert ledger.summarize("acme", rec.day, rec.day).totals.gpu_seconds.total == rec.gpu_seconds_total
        assert limiter.state.gpu_seconds_used("acme", rec.day) == pytest.approx(rec.gpu_seconds_total)

    run(main())


# ---- 4. progress: 0..99 while running, 100 only when completed -------------------------------------------------

RUNNING = [s for s in STAGES if s != "queued"]


@pytest.mark.parametrize("stage", RUNNING)
@pytest.mark.parametrize("total", [1, 4, 50])
def test_stage_progress_is_clamped_to_its_band_and_below_100(stage: str, total: int) -> None:
    first, last = stage_progress(stage, 0, total), stage_progress(stage, total, total)
    assert 0 <= first <= last <= 99
    assert stage_progress(stage, -1, total) == stage_progress(stage, -total, total) == first
    assert stage_progress(stage, total + 1, total) == stage_progress(stage, 10 * total, total) == last
    values = [stage_progress(stage, step, total) for step in range(-2, total + 3)]
    assert values == sorted(values) and min(values) >= 0 and max(values) <= 99
    assert stage_progress(stage, 5, 0) == stage_progress(stage, -5, 0) == first  # no total yet


def test_progress_moves_forward_through_the_stages_and_never_overlaps_the_next() -> None:
    total = 4
    for earlier, later in zip(RUNNING, RUNNING[1:]):
        # a runaway step count in one stage must not show more than the start of the next
        assert stage_progress(earlier, 10 * total, total) <= stage_progress(later, 0, total), (earlier, later)
    assert stage_progress("uploading", 10 * total, total) == 99
    assert stage_progress("queued", 3, total) == stage_progress(None, 3, total) == 0


@pytest.mark.parametrize("step,total", [(0, 4), (4, 4), (5, 4), (400, 4), (0, 0), (7, 0)])
@pytest.mark.parametrize("stage", STAGES)
def test_video_progress_is_0_to_99_in_progress_and_100_only_when_completed(stage: str, step: int,
                                                                           total: int) -> None:
    job = JobRecord(id=new_job_id(), created_at=0, model="m", prompt="p", params=example_params(), status="in_progress", stage=stage,
                    step=step, total_steps=total)
    assert 0 <= progress_of(job) <= 99
    assert progress_of(job.model_copy(update={"status": "queued"})) == 0
    assert progress_of(job.model_copy(update={"status": "completed"})) == 100


def test_a_side_channel_step_past_the_total_shows_at_most_99(storage: Storage) -> None:
    store = JobStore(storage)
    rec = store.create(JobRecord(id=new_job_id(), created_at=0, model="m", prompt="p", params=example_params(), total_steps=4))
    running = store.update(rec.id, lambda r: r.model_copy(update={"status": "in_progress", "stage": "encoding",
                                                                   "attempts": 1}))
    for stage, step in (("denoising", 9), ("uploading", 9)):
        assert store.put_progress(rec.id, stage, step, 4, attempt=1)
        shown = store.merge_progress(running)
        assert shown.stage == stage and 0 <= shown.progress <= 99 and 0 <= progress_of(shown) <= 99
    assert store.merge_progress(running).progress == stage_progress("uploading", 4, 4)


# ---- 5. plan ceilings: exactly the limit is accepted, one over is refused ------------------------------------

TINY = {"num_frames": 9, "width": 64, "height": 48}


def params_with(params, **changes):
    return params.model_copy(update=changes)


@pytest.mark.parametrize("name", list(PlansConfig().plans))
def test_plan_max_steps_exact_boundary(name: str) -> None:
    plan = PlansConfig().get(name)
    at = example_params(**TINY, num_inference_steps=plan.max_steps)
    assert cost_of(params_with(at, num_inference_steps=plan.max_steps + 1)) < plan.max_cost  # only the steps are over
    check_cost(plan, at, plan_name=name)
    with pytest.raises(ServiceError) as err:
        check_cost(plan, params_with(at, num_inference_steps=plan.max_steps + 1), plan_name=name)
    assert raised(err) == (400, "max_steps_exceeded", "num_inference_steps")
    assert f"num_inference_steps is {plan.max_steps + 1}" in err.value.message
    assert f"at most {plan.max_steps}" in err.value.message and f"plan {name!r}" in err.value.message


@pytest.mark.parametrize("name", list(PlansConfig().plans))
def test_plan_max_cost_exact_boundary(name: str) -> None:
    base = PlansConfig().get(name)
    params = example_params(**TINY, num_inference_steps=base.max_steps)
    cost = cost_of(params)
    check_cost(base.model_copy(update={"max_cost": cost}), params, plan_name=name)  # exactly at the ceiling
    one_under = base.model_copy(update={"max_cost": cost - 1})  # the request is max_cost + 1
    with pytest.raises(ServiceError) as err:
        check_cost(one_under, params, plan_name=name)
    assert raised(err) == (400, "cost_ceiling_exceeded", "num_inference_steps")
    assert f"costs {cost:,}" in err.value.message and f"at most {cost - 1:,}" in err.value.message
    assert f"num_inference_steps to {base.max_steps - 1} or less" in err.value.message


def test_plan_max_steps_boundary_holds_for_a_custom_plan_too() -> None:
    plan = Plan(max_steps=7, max_cost=10**12)
    check_cost(plan, example_params(**TINY, num_inference_steps=7))
    check_cost(plan, example_params(**TINY, num_inference_steps=1))
    with pytest.raises(ServiceError) as err:
        check_cost(plan, example_params(**TINY, num_inference_steps=8))
    assert raised(err) == (400, "max_steps_exceeded", "num_inference_steps") and "your plan" in err.value.message
