"""Rebuild the shared limiter from S3 (active jobs, today's usage): after its restart, or to repair drift."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from serve.admission.limits import Limiter
from serve.billing.usage import UsageLedger
from serve.jobs.store import JobStore


async def reconcile_limits(store: JobStore, ledger: UsageLedger, limiter: Limiter, now: float) -> None:
    """Rebuild the shared limiter from S3 (active jobs, today's usage): after a restart, or to repair drift."""
    active: dict[str, set[str]] = {}
    for job_id in await asyncio.to_thread(store.list_active_ids):
        job = await asyncio.to_thread(store.get, job_id)
        if job is not None and not job.is_terminal:
            active.setdefault(job.tenant, set()).add(job.id)
    today = datetime.fromtimestamp(now, timezone.utc).date().isoformat()
    usage = {(t, today): s for t, s in (await asyncio.to_thread(ledger.load_day_totals, today)).items()}
    await limiter.reconcile(active, usage, as_of=now)
