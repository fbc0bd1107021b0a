"""Webhooks at least once (issue 14, part 2): the job record is the outbox. The terminal write makes the webhook
pending and keeps the job's active marker; the outcome is written back; a delivery whose replica died is sent again
by another replica's reclaim scan once its claim lapses, with the same webhook-id; a delivery that exhausts its
retries is on the job. Real JobStore/JobRunner/WebhookSender on moto S3; the receiver is an httpx MockTransport."""

from __future__ import annotations

import asyncio
import json

import httpx

from serve.admission.limits import LocalLimiter
from serve.api.wire import CreateVideoRequest
from serve.config import AppConfig, JobsConfig
from serve.config.webhooks import WebhookConfig
from serve.jobs.record import ChainResult, JobRecord, JobResult, new_job_id
from serve.jobs.service import video_keys
from serve.jobs.wiring import build_ingress
from serve.storage import Storage
from serve.webhooks.sender import WebhookSender
from serve.webhooks.signing import WebhookSecrets, decode_secret, generate_secret

URL = "http://hooks.test/h"
SECRET = generate_secret()


class Instant:
    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    async def run(self, job: JobRecord) -> ChainResult:
        return ChainResult(JobResult(**video_keys(self.storage, job.id)), {"denoiser_s": 0.1})


class Receiver:
    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.received: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.received.append(request)
        return httpx.Response(self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0])


def resolver(host, port, *args, **kwargs):
    return [(2, 1, 6, "", ("127.0.0.1", port or 80))]


def graph(storage: Storage, owner: str, receiver: Receiver, max_attempts: int = 3):
    hooks = WebhookConfig(enabled=True, require_https=False, allow_hosts=["hooks.test"], base_backoff_s=0.01,
                          max_backoff_s=0.02, timeout_s=2, max_attempts=max_attempts)
    sender = WebhookSender(hooks, WebhookSecrets(default=[decode_secret(SECRET)]), resolver=resolver,
                           transport=httpx.MockTransport(receiver))
    cfg = AppConfig(s3=storage.cfg, webhooks=hooks, keys={"legacy_plan": "enterprise"},
                    jobs=JobsConfig(lease_s=5, heartbeat_s=0.2, reclaim_interval_s=60, retry_backoff_s=0))
    return build_ingress(cfg, storage=storage, pipeline=Instant(storage), owner=owner, limiter=LocalLimiter(),
                         webhooks=sender), sender


async def until(predicate, timeout_s: float = 10.0) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached")


def test_a_delivered_webhook_is_recorded_on_the_job_and_its_outbox_entry_goes(storage: Storage) -> None:
    async def main() -> None:
        receiver = Receiver(204)
        g, sender = graph(storage, "ingress-a", receiver)
        video = await g.service.create(CreateVideoRequest(prompt="p", webhook_url=URL, size="96x64",
                                                          num_frames=9), "acme")
        await until(lambda: (g.store.get(video.id).webhook or None) is not None
                    and g.store.get(video.id).webhook.state == "delivered")
        rec = g.store.get(video.id)
        assert (rec.webhook.attempts, rec.webhook.status_code) == (1, 204)
        assert video.id not in g.store.list_active_ids()  # nothing owed any more
        assert (await g.service.get(video.id, "acme")).webhook.state == "delivered"
        (sent,) = receiver.received
        assert sent.headers["webhook-id"] == f"msg_{video.id}_completed"
        assert "webhook" not in json.loads(sent.content)["data"]  # the payload is the video, not its own delivery
        await g.runner.stop()
        await sender.aclose()

    asyncio.run(main())


def test_a_webhook_whose_replica_died_is_sent_by_another_with_the_same_id(storage: Storage) -> None:
    async def main() -> None:
        receiver = Receiver(204)
        a, sender_a = graph(storage, "ingress-a", receiver)
        b, sender_b = graph(storage, "ingress-b", receiver)
        job = a.store.create(JobRecord(id=new_job_id(), tenant="acme", created_at=0, model="m", prompt="p",
                                       params=_params(), webhook_url=URL))
        assert a.store.try_acquire_lease(job.id, "ingress-a", 5) is not None
        # A writes the terminal transition, claiming the webhook for a moment, then dies before sending it
        done = a.store.finish(job.id, "ingress-a", "completed", result=JobResult(**video_keys(storage, job.id)),
                              notify=lambda rec: True, notify_claim_s=0.1)
        assert done.webhook.state == "pending" and job.id in a.store.list_active_ids()
        await b.runner.reclaim_once()  # the claim still holds: B leaves it
        assert receiver.received == []
        await asyncio.sleep(0.15)
        await b.runner.reclaim_once()  # lapsed: B claims and sends it
        await until(lambda: b.store.get(job.id).webhook.state == "delivered")
        assert [r.headers["webhook-id"] for r in receiver.received] == [f"msg_{job.id}_completed"]
        assert job.id not in b.store.list_active_ids()
        for g, s in ((a, sender_a), (b, sender_b)):
            await g.runner.stop()
            await s.aclose()

    asyncio.run(main())


def test_a_delivery_that_exhausts_its_retries_is_on_the_job(storage: Storage) -> None:
    async def main() -> None:
        receiver = Receiver(503)
        g, sender = graph(storage, "ingress-a", receiver, max_attempts=2)
        video = await g.service.create(CreateVideoRequest(prompt="p", webhook_url=URL, size="96x64",
                                                          num_frames=9), "acme")
        await until(lambda: (g.store.get(video.id).webhook is not None
                             and g.store.get(video.id).webhook.state == "failed"))
        shown = (await g.service.get(video.id, "acme")).webhook
        assert (shown.state, shown.attempts, shown.status_code) == ("failed", 2, 503)
        assert "gave up after 2 attempts" in shown.error and len(receiver.received) == 2
        assert video.id not in g.store.list_active_ids()
        await g.runner.stop()
        await sender.aclose()

    asyncio.run(main())


def _params():
    from serve.stages.types import GenerationParams

    return GenerationParams(width=48, height=32, size="48x32", num_frames=9, fps=8, seconds="1",
                            num_inference_steps=4, guidance_scale=6, use_dynamic_cfg=False, seed=1)
