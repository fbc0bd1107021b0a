"""Admission costs one round trip to the shared limiter (issue 14, part 4): the rate, the tenant's concurrency and
quota and the service's capacity are decided in one `admit`, which reserves the job's slot; a refusal after it
(prompt policy, webhook URL) gives the slot back; an idempotent retry of a job that holds the tenant's last slot
is answered with that job, not a 429. Over the real ingress graph (JobStore on moto S3, LocalLimiter)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from serve.admission.limits import LocalLimiter
from serve.api.routes import create_app
from serve.config import AppConfig, JobsConfig
from serve.jobs.record import ChainResult, JobRecord, JobResult
from serve.jobs.service import video_keys
from serve.jobs.wiring import build_ingress
from serve.storage import Storage

API_KEY = "sk-unit-admission"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"prompt": "a cat on a skateboard", "size": "64x48", "num_frames": 9, "num_inference_steps": 4}


class CountingLimiter(LocalLimiter):
    """A LocalLimiter that counts its calls by method: each is one round trip to the actor in production."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    async def admit(self, *args: Any, **kwargs: Any):
        self.calls["admit"] += 1
        return await super().admit(*args, **kwargs)

    async def release(self, *args: Any, **kwargs: Any):
        self.calls["release"] += 1
        return await super().release(*args, **kwargs)


class Held:
    """A chain that holds every job until `go` is set."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.go = asyncio.Event()

    async def run(self, job: JobRecord) -> ChainResult:
        await self.go.wait()
        return ChainResult(JobResult(**video_keys(self.storage, job.id)), {"denoiser_s": 0.1})


@asynccontextmanager
async def serving(storage: Storage, max_concurrent_jobs: int = 1) -> AsyncIterator[tuple[httpx.AsyncClient,
                                                                                          CountingLimiter]]:
    config = AppConfig.model_validate({
        "s3": storage.cfg.model_dump(), "api": {"api_keys": [API_KEY]}, "keys": {"legacy_plan": "p"},
        "jobs": JobsConfig(lease_s=5, heartbeat_s=0.5, reclaim_interval_s=60, retry_backoff_s=0).model_dump(),
        "plans": {"plans": {"p": {"max_cost": 10**12, "max_steps": 200, "requests_per_minute": 6000, "burst": 100,
                                  "max_concurrent_jobs": max_concurrent_jobs}}},
        "safety": {"blocked_terms": {"test": ["forbidden-word"]}},
    })
    limiter = CountingLimiter()
    pipeline = Held(storage)
    graph = build_ingress(config, storage=storage, pipeline=pipeline, owner="unit", limiter=limiter)

    async def ready() -> dict[str, Any]:
        return {"s3": True}

    transport = httpx.ASGITransport(app=create_app(graph, ready))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            yield client, limiter
    finally:
        pipeline.go.set()
        await graph.runner.stop()


def test_a_post_makes_one_limiter_round_trip(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, max_concurrent_jobs=10) as (client, limiter):
            r = await client.post("/v1/videos", json=BODY, headers=AUTH)
            assert r.status_code == 200, r.text
            r = await client.post("/v1/videos", json=BODY, headers={**AUTH, "Idempotency-Key": "k-1"})
            assert r.status_code == 200, r.text
            assert limiter.calls == {"admit": 2}, limiter.calls  # one per POST, nothing given back
            assert limiter.state.outstanding() == 2  # both jobs hold their slot

    asyncio.run(main())


def test_a_refusal_after_the_limiter_gives_the_slot_back(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, max_concurrent_jobs=1) as (client, limiter):
            r = await client.post("/v1/videos", json={**BODY, "prompt": "a forbidden-word"}, headers=AUTH)
            assert r.status_code == 400, r.text
            assert limiter.calls == {"admit": 1, "release": 1}
            assert limiter.state.outstanding() == 0
            r = await client.post("/v1/videos", json=BODY, headers=AUTH)  # the only slot is free again
            assert r.status_code == 200, r.text

    asyncio.run(main())


def test_an_idempotent_retry_of_the_job_holding_the_last_slot_gets_that_job(storage: Storage) -> None:
    async def main() -> None:
        async with serving(storage, max_concurrent_jobs=1) as (client, limiter):
            headers = {**AUTH, "Idempotency-Key": "retry-me"}
            first = await client.post("/v1/videos", json=BODY, headers=headers)
            assert first.status_code == 200, first.text
            again = await client.post("/v1/videos", json=BODY, headers=headers)
            assert again.status_code == 200, again.text
            assert again.json()["id"] == first.json()["id"]
            assert again.headers.get("Idempotent-Replayed") == "true"
            other = await client.post("/v1/videos", json=BODY, headers=AUTH)  # a new job: the slot is taken
            assert other.status_code == 429 and other.json()["error"]["code"] == "concurrency_limited"
            assert limiter.state.outstanding() == 1

    asyncio.run(main())
