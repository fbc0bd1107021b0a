"""What a job's end gives back, once, when its terminal transition lands (`JobRunner(on_finished=...)`).

`JobEnd` releases the job's concurrency slot, writes the usage record (completed jobs only, once) and charges the
GPU-seconds to the tenant's daily quota, and schedules the signed webhook. The bill cannot be lost: the terminal
write itself marks it pending (and keeps the job's active marker), and until `bill` has written the usage record
every replica's reclaim scan finds it and tries again (`JobRunner.settle`); the record is put-if-absent, so a repeat
never bills twice, and a quota charge that did not happen is rebuilt from the records by the limiter's reconcile.
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
from serve.jobs.store import JobStore
from serve.webhooks.events import Notifier, WebhookEvent

log = logging.getLogger(__name__)

class JobEnd:
    """What happens once when a job's terminal transition lands (`JobRunner(on_finished=...)`)."""

    def __init__(self, config: AppConfig, limiter: Limiter, ledger: UsageLedger,
                 webhooks: Notifier | None, view: Callable[[JobRecord], Video], store: JobStore | None = None) -> None:
        self._config = config
        self._limiter = limiter
        self._ledger = ledger
        self._webhooks = webhooks
        self._view = view
        self._store = store

    async def __call__(self, job: JobRecord) -> None:
        try:
            await self._limiter.release(job.tenant, job.id)
        except Exception:  # noqa: BLE001 - the reconcile loop repairs the count
            log.warning("job %s: concurrency slot not released", job.id, exc_info=True)
        if job.status == "completed" and self._config.usage.enabled:
            try:
                await self.bill(job)
            except Exception:  # noqa: BLE001 - still pending in the record: any replica's reclaim scan retries
                log.warning("job %s: usage not recorded yet; its bill stays pending", job.id, exc_info=True)
        self._notify(job)

    async def bill(self, job: JobRecord) -> bool:
        """Write the completed job's usage record (once: put-if-absent), charge the daily quota the first time, then
        mark the bill recorded (its outbox marker goes). Raises while S3 refuses; safe to repeat anywhere."""
        rec = UsageRecord.from_job(job, gpus_per_stage(job, self._config.usage.gpus_per_stage))
        if await asyncio.to_thread(self._ledger.record, rec):  # first time only: never billed twice
            try:
                await self._limiter.charge_gpu_seconds(job.tenant, rec.gpu_seconds_total, day=rec.day)
            except Exception:  # noqa: BLE001 - the limiter's reconcile rebuilds the day from the usage records
                log.warning("job %s: quota charge deferred to the next reconcile", job.id, exc_info=True)
        if self._store is not None and job.billing == "pending":
            await asyncio.to_thread(self._store.billing_recorded, job.id)
        return True

    def _notify(self, job: JobRecord) -> None:
        url = self._webhooks.url_for(job.tenant, job.webhook_url) if self._webhooks is not None else None
        if url:
            data = self._view(job).model_dump(mode="json")
            self._webhooks.schedule(WebhookEvent.for_status(
                job.status, job_id=job.id, tenant=job.tenant, url=url, data=data,
                occurred_at=job.completed_at or int(datetime.now(timezone.utc).timestamp()),
                request_id=job.request_id))

