"""The ingress's graph takes new settings while it runs (the Ingress's `reconfigure`): the next request sees
them, the runner and its chains in flight are the same objects, and a config that cannot work changes nothing.

Real JobStore on the local moto S3, a fake stage chain; no Ray, no torch.
"""

from __future__ import annotations

import asyncio

import pytest

from serve.api.wire import CreateVideoRequest
from serve.config import AppConfig
from serve.errors import ServiceError
from serve.jobs.record import JobRecord, new_job_id
from serve.jobs.wiring import build_ingress
from serve.storage import Storage
from tests.unit.test_routes import SMALL, WritesVideo
from tests.unit.test_runner import jobs_config, until_ended

TERM = "quokka parade"


class Gate(WritesVideo):
    """The chain waits until released: a job stays in flight across the reconfigure."""

    def __init__(self, storage: Storage) -> None:
        super().__init__(storage)
        self.release = asyncio.Event()

    async def run(self, job):
        await self.release.wait()
        return await super().run(job)


def settings(storage: Storage, **changes) -> AppConfig:
    return AppConfig.model_validate({"s3": storage.cfg.model_dump(), "jobs": jobs_config().model_dump(), **changes})


def test_new_settings_apply_to_the_next_request_and_the_chain_in_flight_goes_on(storage: Storage) -> None:
    async def main() -> None:
        chain = Gate(storage)
        graph = build_ingress(settings(storage), storage=storage, pipeline=chain, owner="ingress-unit")
        runner, store = graph.runner, graph.store
        try:
            in_flight = (await graph.service.create(CreateVideoRequest(prompt=f"a {TERM}", **SMALL), "acme")).id
            blocked = settings(storage, safety={"blocked_terms": {"test": [TERM]}},
                               jobs={**jobs_config().model_dump(), "max_concurrent_per_replica": 7})
            await graph.reconfigure(blocked)
            assert graph.runner is runner and graph.store is store and graph.config is blocked
            assert runner._cfg.max_concurrent_per_replica == 7
            with pytest.raises(ServiceError) as refused:
                await graph.service.create(CreateVideoRequest(prompt=f"another {TERM}", **SMALL), "acme")
            assert refused.value.status == 400 and "content policy" in refused.value.message
            chain.release.set()
            done = await until_ended(store, in_flight, runner)
            assert done.status == "completed"  # accepted before the change, finished after it
        finally:
            await runner.stop()
            graph.close()

    asyncio.run(main())


def test_a_config_that_cannot_work_changes_nothing(storage: Storage) -> None:
    async def main() -> None:
        graph = build_ingress(settings(storage), storage=storage, pipeline=WritesVideo(storage), owner="ingress-unit")
        service, config = graph.service, graph.config
        try:
            bad = settings(storage, keys={"legacy_plan": "platinum"}, jobs={**jobs_config().model_dump(),
                                                                            "max_concurrent_per_replica": 9})
            with pytest.raises(ValueError, match="plans missing from `plans`"):
                await graph.reconfigure(bad)
            assert graph.service is service and graph.config is config
            assert graph.runner._cfg.max_concurrent_per_replica != 9
        finally:
            await graph.runner.stop()
            graph.close()

    asyncio.run(main())


class HoldsGpus(WritesVideo):
    """A chain whose stage replicas report the GPUs Ray gave them (as deployments/stage.py does)."""

    async def run(self, job):
        out = await super().run(job)
        return type(out)(out.result, {"text_encoder_s": 2.0, "denoiser_s": 10.0, "vae_decoder_s": 4.0},
                         gpus={"text_encoder": 0.25, "denoiser": 1.0, "vae_decoder": 0.75})


@pytest.mark.parametrize(("override", "billed"), [
    (None, {"text_encoder": 0.5, "denoiser": 10.0, "vae_decoder": 3.0}),  # what the replicas held
    ({"text_encoder": 1, "denoiser": 1, "vae_decoder": 1}, {"text_encoder": 2.0, "denoiser": 10.0, "vae_decoder": 4.0}),
])
def test_a_job_is_billed_by_the_gpus_its_replicas_held_unless_overridden(storage: Storage, override, billed) -> None:
    async def main() -> None:
        config = settings(storage, usage={"gpus_per_stage": override})
        graph = build_ingress(config, storage=storage, pipeline=HoldsGpus(storage), owner="ingress-unit")
        try:
            vid = (await graph.service.create(CreateVideoRequest(prompt="a cat", **SMALL), "acme")).id
            done = await until_ended(graph.store, vid, graph.runner)
            assert done.gpus == {"text_encoder": 0.25, "denoiser": 1.0, "vae_decoder": 0.75}  # kept in the record
            day = done.completed_at
            from serve.billing.usage import day_of

            summary = await asyncio.to_thread(graph.ledger.summarize, "acme", day_of(day), day_of(day))
            got = summary.totals.gpu_seconds.model_dump()
            assert {k: got[k] for k in billed} == billed
        finally:
            await graph.runner.stop()
            graph.close()

    asyncio.run(main())


def test_a_job_of_a_model_this_replica_does_not_route_yet_waits_for_the_settings_then_fails_cleanly() -> None:
    from deployments.ingress import ModelRouter
    from serve.jobs.runner import NonRetryableError
    from tests.params import example_params

    class Chain:
        async def run(self, job):
            return f"ran {job.model}"

    job = JobRecord(id=new_job_id(), tenant="acme", model="late", prompt="a cat", params=example_params(),
                    created_at=1)

    async def main() -> None:
        router = ModelRouter(grace_s=2)
        running = asyncio.ensure_future(router.run(job))
        await asyncio.sleep(0.3)
        router.route({"late": Chain()})  # the settings that add the model reach this replica
        assert await running == "ran late"
        with pytest.raises(NonRetryableError, match="no longer served"):  # a model that never comes
            await ModelRouter(grace_s=0.6).run(job.model_copy(update={"model": "gone"}))

    asyncio.run(main())
