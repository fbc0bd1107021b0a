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
import time
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

    def wants_webhook(self, job: JobRecord) -> bool:
        """Whether the job's end is to be sent (its own URL, or its tenant's default, with webhooks on)."""
        return self._webhooks is not None and bool(self._webhooks.url_for(job.tenant, job.webhook_url))

    def _notify(self, job: JobRecord) -> None:
        if job.webhook is not None and job.webhook.state != "pending":
            return
        url = self._webhooks.url_for(job.tenant, job.webhook_url) if self._webhooks is not None else None
        if not url:
            return
        data = self._view(job).model_dump(mode="json", exclude={"webhook"})
        event = WebhookEvent.for_status(
            job.status, job_id=job.id, tenant=job.tenant, url=url, data=data,
            occurred_at=job.completed_at or int(datetime.now(timezone.utc).timestamp()),
            request_id=job.request_id)
        on_done = None
        if job.webhook is not None and self._store is not None:
            store = self._store

            async def on_done(result) -> None:  # the outcome goes into the record: the outbox entry ends
                state = result.outcome if result.outcome in ("delivered", "failed", "refused") else "failed"
                await asyncio.to_thread(store.webhook_finished, job.id, state, attempts=result.attempts,
                                        status_code=result.status_code, error=result.error)
        if not self._webhooks.schedule(event, on_done=on_done):
            log.warning("job %s: webhook not scheduled here; it stays pending for another replica", job.id)

    async def redeliver(self, job: JobRecord) -> None:
        """A pending webhook whose claim lapsed (its replica died, or it was not scheduled): send it from here."""
        if self._store is None or self._webhooks is None:
            return
        claimed = await asyncio.to_thread(self._store.claim_webhook, job.id, time.time() + self._webhooks.claim_s())
        if claimed is not None:
            self._notify(claimed)
