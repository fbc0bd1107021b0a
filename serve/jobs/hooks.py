"""What a job's end gives back, once, when its terminal transition lands (`JobRunner(on_finished=...)`).

`JobEnd` releases the job's concurrency slot, writes the usage record (completed jobs only, once) and charges the
GPU-seconds to the tenant's daily quota, and schedules the signed webhook.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone

from serve.admission.limits import Limiter
from serve.api.wire import Video
from serve.billing.usage import UsageLedger, UsageRecord, gpus_per_stage
from serve.config import AppConfig
from serve.jobs.record import JobRecord
from serve.webhooks.events import Notifier, WebhookEvent

log = logging.getLogger(__name__)

class JobEnd:
    """What happens once when a job's terminal transition lands (`JobRunner(on_finished=...)`)."""

    def __init__(self, config: AppConfig, limiter: Limiter, ledger: UsageLedger,
                 webhooks: Notifier | None, view: Callable[[JobRecord], Video]) -> None:
        self._config = config
        self._limiter = limiter
        self._ledger = ledger
        self._webhooks = webhooks
        self._view = view

    async def __call__(self, job: JobRecord) -> None:
        try:
            await self._limiter.release(job.tenant, job.id)
        except Exception:  # noqa: BLE001 - the reconcile loop repairs the count
            log.warning("job %s: concurrency slot not released", job.id, exc_info=True)
        if job.status == "completed" and self._config.usage.enabled:
            try:
                rec = UsageRecord.from_job(job, gpus_per_stage(job, self._config.usage.gpus_per_stage))
                if await asyncio.to_thread(self._ledger.record, rec):  # first time only: never billed twice
                    await self._limiter.charge_gpu_seconds(job.tenant, rec.gpu_seconds_total, day=rec.day)
            except Exception:  # noqa: BLE001 - a later sweep can re-record (records are idempotent)
                log.exception("job %s: usage not recorded", job.id)
        url = self._webhooks.url_for(job.tenant, job.webhook_url) if self._webhooks is not None else None
        if url:
            data = self._view(job).model_dump(mode="json")
            self._webhooks.schedule(WebhookEvent.for_status(
                job.status, job_id=job.id, tenant=job.tenant, url=url, data=data,
                occurred_at=job.completed_at or int(datetime.now(timezone.utc).timestamp()),
                request_id=job.request_id))

