"""Retention that keeps its word: after a job's `expires_at` its video, cover, metadata and input image are deleted,
and so are its record and index entries (it then answers 404 like any unknown id). Usage records stay: they are
the bill.

Two mechanisms, both needed:
- `RetentionSweeper` (every ingress replica, every `jobs.retention_sweep_interval_s`) deletes what a lifecycle rule
  cannot express: the record and index entries, at the record's own `expires_at`, after settling a pending bill.
  Each tenant's oldest-first index is read from its oldest job and the scan stops at the first job created within
  `retention_s` of now: no job created later can have expired (it completes after it is created).
- `lifecycle_rules` is the S3 lifecycle rule for the objects under `videos/` (expire a day after `retention_s`
  has passed since upload), a backstop for objects the sweep missed (a replica down, an orphan upload) and the
  cleanup of unfinished multipart uploads. Apply it with `python -m serve.jobs.retention apply-lifecycle`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable

from serve.jobs.record import JobRecord
from serve.jobs.store import JobStore
from serve.media.publishing import job_object_keys
from serve.storage import Storage

log = logging.getLogger(__name__)

RULE_ID = "videogen-videos-retention"
PAGE = 100


def lifecycle_rules(storage: Storage, retention_s: int) -> list[dict]:
    """The bucket's lifecycle rule for this service's objects (S3 counts whole days from each object's upload)."""
    days = math.ceil(retention_s / 86400) + 1  # a day of slack: the sweep deletes at expires_at itself
    return [{
        "ID": RULE_ID, "Status": "Enabled", "Filter": {"Prefix": storage.key("videos", "")},
        "Expiration": {"Days": days},
        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
    }]


def apply_lifecycle(storage: Storage, retention_s: int) -> list[dict]:
    """Put this service's rule into the bucket's lifecycle configuration, keeping every other rule."""
    others = [r for r in storage.get_lifecycle() if r.get("ID") != RULE_ID]
    rules = [*others, *lifecycle_rules(storage, retention_s)]
    storage.put_lifecycle(rules)
    return rules


class RetentionSweeper:
    def __init__(self, store: JobStore, storage: Storage, settle: Callable[[JobRecord], Awaitable[bool]],
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._storage = storage
        self._settle = settle
        self._clock = clock

    async def sweep(self) -> list[str]:
        """Delete every job past its `expires_at`; returns their ids."""
        retention = self._store.retention_s
        if retention is None:
            return []
        now = self._clock()
        deleted = []
        for tenant in await asyncio.to_thread(self._store.tenants):
            after = None
            while True:
                page, more = await asyncio.to_thread(self._store.list, PAGE, after, tenant=tenant, order="asc")
                for job in page:
                    if job.created_at > now - retention:  # this one and every later one are within retention
                        more = False
                        break
                    if job.is_terminal and job.expires_at is not None and job.expires_at <= now:
                        if await self._expire(job):
                            deleted.append(job.id)
                if not more or not page:
                    break
                after = page[-1].id
        if deleted:
            log.info("retention: %d expired jobs deleted", len(deleted))
        return deleted

    async def _expire(self, job: JobRecord) -> bool:
        if job.billing == "pending" and not await self._settle(job):
            return False  # never deleted unbilled: the next sweep tries again
        # objects first: a sweep that fails half-way is repeated
        await asyncio.to_thread(self._storage.delete_many, job_object_keys(self._storage, job))
        await asyncio.to_thread(self._store.delete, job.id)
        return True


def main(argv: list[str] | None = None) -> int:
    """`python -m serve.jobs.retention apply-lifecycle --config configs/gpu-5b.yaml [--show]`"""
    parser = argparse.ArgumentParser(description="The S3 lifecycle rule of this service's videos.")
    parser.add_argument("command", choices=["apply-lifecycle", "show-lifecycle"])
    parser.add_argument("--config", required=True, help="the Serve config file the service is deployed with")
    args = parser.parse_args(argv)
    from deployments.serve_config import load_app_config

    config = load_app_config(args.config)
    storage = Storage.from_config(config.s3)
    rules = (apply_lifecycle(storage, config.jobs.retention_s) if args.command == "apply-lifecycle"
             else storage.get_lifecycle())
    print(json.dumps(rules, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
