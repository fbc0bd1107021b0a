"""Billing through a real S3 outage (issue 14, "what it must show"): the local moto server behind a WSGI wrapper that answers every
request under `usage/` with 503 ServiceUnavailable for a while (botocore retries and all), while jobs complete on a
running ingress graph (JobRunner with its reclaim loop, JobStore, UsageLedger, LocalLimiter). Afterwards every
completed job has exactly one usage record, the daily quota holds the sum of them, and no job owes anything. The
issue's outage is 30 s; here it lasts OUTAGE_S, and the runner's intervals are scaled down alike."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest

from serve.admission.limits import LocalLimiter
from serve.config import AppConfig, JobsConfig, S3Config
from serve.jobs.record import ChainResult, JobRecord, JobResult, new_job_id
from serve.jobs.service import video_keys
from serve.jobs.wiring import build_ingress
from serve.local_s3 import LocalS3Server
from serve.storage import Storage
from tests.params import example_params

OUTAGE_S = 3.0
_BODY = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
         b"<Message>injected usage outage</Message></Error>")


class UsageOutage:
    """WSGI middleware: until `until` (monotonic), every request for a key under usage/ is refused (503)."""

    def __init__(self, app: Callable[..., Any]) -> None:
        self._app = app
        self.until = 0.0
        self.refused = 0

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if "/usage/" in environ.get("PATH_INFO", "") and time.monotonic() < self.until:
            self.refused += 1
            environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
            start_response("503 Service Unavailable",
                           [("Content-Type", "application/xml"), ("Content-Length", str(len(_BODY)))])
            return [_BODY]
        return self._app(environ, start_response)


@pytest.fixture(scope="module")
def outage_s3() -> Iterator[tuple[str, UsageOutage]]:
    outages: list[UsageOutage] = []

    def wrap(app: Callable[..., Any]) -> UsageOutage:  # applied when the server starts
        outages.append(UsageOutage(app))
        return outages[0]

    server = LocalS3Server(middleware=wrap)
    try:
        yield server.start(), outages[0]
    finally:
        server.stop()


class Instant:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def run(self, job: JobRecord) -> ChainResult:
        await asyncio.sleep(0.05)
        return ChainResult(JobResult(**video_keys(self.storage, job.id)), {"text_encoder_s": 0.5, "denoiser_s": 2.0,
                                                                         "vae_decoder_s": 0.5})


def test_usage_puts_failing_for_a_while_leave_every_completed_job_billed_exactly_once(outage_s3) -> None:
    endpoint, outage = outage_s3
    s3 = S3Config(bucket="billing-outage", endpoint_url=endpoint, max_attempts=2, create_bucket=True)
    storage = Storage.from_config(s3)
    storage.ensure_bucket()
    config = AppConfig(s3=s3, jobs=JobsConfig(lease_s=5, heartbeat_s=0.2, reclaim_interval_s=0.3, retry_backoff_s=0),
                       usage={"gpus_per_stage": {"text_encoder": 1, "denoiser": 1, "vae_decoder": 1}})
    limiter = LocalLimiter()
    g = build_ingress(config, storage=storage, pipeline=Instant(storage), owner="ingress-a", limiter=limiter)

    async def main() -> list[JobRecord]:
        g.runner.start()  # the reclaim loop: what settles pending bills in production
        try:
            outage.until = time.monotonic() + OUTAGE_S
            jobs = []
            for _ in range(6):  # completing while usage/ is down
                job = g.store.create(JobRecord(id=new_job_id(), tenant="acme", created_at=int(time.time()), model="m",
                                               prompt="p", params=example_params(num_inference_steps=4, seed=1),
                                               total_steps=4))
                g.runner.submit(job.id, job.tenant, job.model)
                jobs.append(job)
                await asyncio.sleep(0.2)
            await asyncio.sleep(max(0.0, outage.until - time.monotonic()))
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                recs = [g.store.get(j.id) for j in jobs]
                if all(r.is_terminal and not r.obligations_pending for r in recs) and not g.store.list_active_ids():
                    return recs
                await asyncio.sleep(0.1)
            raise AssertionError(f"obligations still pending: {[(r.id, r.billing) for r in recs]}")
        finally:
            await g.runner.stop()

    recs = asyncio.run(main())
    assert outage.refused > 0  # the outage did refuse usage writes while jobs completed
    assert all(r.status == "completed" and r.billing == "recorded" for r in recs)
    keys = [k for k in storage.list_keys(storage.key("usage", "")) if "/_days/" not in k]
    billed = [json.loads(storage.get_bytes(k)) for k in keys]
    assert sorted(b["job_id"] for b in billed) == sorted(r.id for r in recs)  # exactly one record per job
    charged = sum(limiter.state.gpu_seconds_used("acme", day) for day in {b["day"] for b in billed})
    assert charged == pytest.approx(sum(b["gpu_seconds_total"] for b in billed))  # and the quota reflects them
