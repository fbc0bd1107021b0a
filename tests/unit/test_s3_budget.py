"""A lean serving layer (issue 14, part 4): the S3 requests the ingress makes for one job, from its POST to the end of
its obligations (usage recorded, outbox marker gone), counted at the boto3 client: one conditional write per state
change and no read where nothing is decided. The stage side (progress, the VaeDecoder's one read, the uploads) is
counted by benchmarks/serving_benchmark.py at the S3 server."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import httpx

from serve.admission.limits import LocalLimiter
from serve.api.routes import create_app
from serve.config import AppConfig, JobsConfig, S3Config
from serve.jobs.record import ChainResult, JobRecord, JobResult
from serve.jobs.service import video_keys
from serve.jobs.wiring import build_ingress
from serve.storage import Storage

API_KEY = "sk-unit-budget"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"prompt": "a heron lands", "size": "64x48", "num_frames": 9, "num_inference_steps": 4}


class Counting:
    """A boto3 client that records (operation, key or prefix) of every call it forwards."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target) or name.startswith(("generate_", "get_paginator", "can_", "meta")):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            what = kwargs.get("Key") or kwargs.get("Prefix") or ""
            op = name + ("(if)" if "IfMatch" in kwargs or "IfNoneMatch" in kwargs else "")
            with self._lock:
                self.calls.append((op, what.split("/", 1)[0] if "/" in what else what))
            return target(*args, **kwargs)

        return call

    def take(self) -> Counter:
        with self._lock:
            out, self.calls = Counter(self.calls), []
        return out


class Instant:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def run(self, job: JobRecord) -> ChainResult:
        return ChainResult(JobResult(**video_keys(self.storage, job.id)), {"denoiser_s": 0.1})


def test_one_job_costs_the_ingress_nine_requests_and_no_read(s3_config: S3Config, s3_client: Any) -> None:
    Storage(s3_config, client=s3_client).ensure_bucket()
    counting = Counting(s3_client)
    storage = Storage(s3_config, client=counting)
    config = AppConfig.model_validate({
        "s3": s3_config.model_dump(), "api": {"api_keys": [API_KEY]}, "keys": {"legacy_plan": "enterprise"},
        # no heartbeat and no reclaim scan falls inside a job here
        "jobs": JobsConfig(lease_s=30, heartbeat_s=10, reclaim_interval_s=600, retry_backoff_s=0).model_dump(),
        "usage": {"gpus_per_stage": {"denoiser": 1}},
    })
    graph = build_ingress(config, storage=storage, pipeline=Instant(storage), owner="unit", limiter=LocalLimiter())
    store = graph.store

    async def settled(job_id: str) -> JobRecord:
        for _ in range(500):
            rec = store.get(job_id)  # not counted: see below
            if rec is not None and rec.is_terminal and not rec.obligations_pending:
                return rec
            await asyncio.sleep(0.01)
        raise AssertionError("the job did not settle")

    async def main() -> list[Counter]:
        async def ready() -> dict[str, Any]:
            return {"s3": True}

        per_job = []
        transport = httpx.ASGITransport(app=create_app(graph, ready))
        async with httpx.AsyncClient(transport=transport, base_url="http://ingress") as client:
            try:
                for _ in range(3):
                    counting.take()
                    r = await client.post("/v1/videos", json=BODY, headers=AUTH)
                    assert r.status_code == 200, r.text
                    job_id = r.json()["id"]
                    for _ in range(500):  # wait without reading through the counted client
                        if job_id not in graph.runner.running and not graph.runner.queued:
                            break
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(0.05)
                    per_job.append(counting.take())
                    assert (await settled(job_id)).billing == "recorded"
            finally:
                await graph.runner.stop()
        return per_job

    per_job = asyncio.run(main())
    steady = per_job[-1]  # the first job also writes the tenant's usage day marker
    assert sum(steady.values()) <= 9, steady
    assert not [c for c in steady if c[0] in ("get_object", "head_object", "list_objects_v2")], steady
    # one conditional write per state change: created, leased + started, finished, bill recorded
    assert steady[("put_object(if)", "jobs")] == 4, steady
    assert sum(per_job[0].values()) == sum(steady.values()) + 1  # + the usage day marker, once
